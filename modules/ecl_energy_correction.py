"""ECLEnergyCorrection: the CNN energy correction of ECLClusters with onnxruntime.

All clusters of a batch above `min_energy_gev` (raw energy) go through ONE inference call (in slices of at
most `max_clusters_per_batch`): their images and features are gathered from the zero-copy column views in C++
(ECLEnergyCorrection.inputs). When the model's metadata `feature_names` lists extra features after the cluster
features (eclreco.cnn_model.EXTRA_FEATURE_NAMES), they are appended in that order: `energy_in` =
ECLClusters.energy as it arrives here (after ECLLeakageCorrection: the classical correction, which the shipped
models refine as a residual), event-level features (belle2-ecl: event_oot_digits, which ECLUnpacker counts
into ECLEventInformation) taken from the event's row of that collection
(eclreco.cnn_model.EVENT_FEATURE_COLUMNS) and repeated per cluster. The network computes the corrected energy
itself (normalisation inside the graph, see python/eclreco/cnn_model.py), so the module only writes the output
into ECLClusters.energy. Clusters outside the model's domain keep the energy they have (the classical leakage
correction, when ECLLeakageCorrection ran before): outside `min_energy_gev`..`max_energy_gev` (the Geant4
training samples span 50 MeV to 6 GeV of true energy: below 50 MeV raw the networks answer with what their
sample says of a cluster that soft, a photon that lost energy, and raised 35-45 MeV photons by 16-51 %; above
6 GeV they extrapolate, the array30 one to 0.86 x E_true at 10 GeV; benchmarks/cnn_domain_scan.py), out of
time (|time| > `max_abs_time_ns`: beam background; the models saw only in-time photons), and, after inference,
clusters whose CNN energy is more than `max_ratio_to_classical` times the energy they arrived with: the
belle2-ecl network, trained on photons, raised in-time beam-background clusters of 30-50 MeV to several GeV;
of its held-out Geant4 photons 0.02-0.13 % are above 2x (docs/physics-validation.md, "Domain of the CNN").
"""
from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
import warnings

import numpy as np

from eclreco import Module, _core
from eclreco.cnn_model import E_RAW_INDEX, EVENT_FEATURE_COLUMNS, FEATURE_NAMES, split_feature_names
from eclreco.rawdata import DETECTOR_NAMES

# max_ratio_to_classical = -1: belle2-ecl's beam-background clusters were raised up to ~600x (x2 keeps the
# fakes at the classical rate); array30 has no background, and there the CNN's large raises are photons
# that showered into the aluminium gaps: a x2 guard widened its sigma68 by up to a third (2 GeV: 0.41 -> 0.54
# of the raw sum's). docs/physics-validation.md, "Domain of the CNN".
DEFAULT_MAX_RATIO = {"belle2-ecl": 2.0, "array30": 0.0}
# The cluster columns event() reads; time (last) only with the max_abs_time_ns cut.
READ_COLUMNS = ("energy_raw", "energy", "image", "features", "time")
MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def shipped_model(detector: str) -> str:
    return os.path.join(MODEL_DIR, f"{detector}.onnx")


class ModelError(RuntimeError):
    """A missing or incompatible ONNX model."""


# The sessions made in this process, by (SHA-256 of the model's bytes, intra-op threads), the last few: a --model
# was loaded twice at a job's start, by the check of its option (reconstruction.chain_file_error) and by the
# chain's initialize, and an HLT worker loaded its models again at every run. Same bytes and options, same
# session (onnxruntime's run is thread-safe); a file replaced on disk has other bytes and gets its own.
_SESSIONS: collections.OrderedDict = collections.OrderedDict()
_SESSIONS_KEPT = 4  # the two shipped models and a --model, with room for one more
_SESSIONS_LOCK = threading.Lock()


def _session_of(model_bytes: bytes, digest: str, threads: int):
    """The onnxruntime session of these model bytes with `threads` intra-op threads: made once (_SESSIONS)."""
    import onnxruntime as ort

    key = (digest, int(threads))
    with _SESSIONS_LOCK:  # (paths initialized on two threads at once)
        sess = _SESSIONS.get(key)
        if sess is None:
            so = ort.SessionOptions()
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
            _SESSIONS[key] = sess
            while len(_SESSIONS) > _SESSIONS_KEPT:
                _SESSIONS.popitem(last=False)
        _SESSIONS.move_to_end(key)
        return sess


def load_session(path: str, threads: int = 1, expected_detector: str | None = None,
                 image_size: int | None = None, n_features: int | None = None):
    """An onnxruntime session of a checked energy-correction model: (session, metadata dict). The
    metadata's `file` is {path, sha256} of the bytes the session was made from (the file is read
    once: a model replaced on disk meanwhile cannot be recorded under the wrong digest). A session
    of the same bytes and threads made before in the process is reused (_SESSIONS); the checks run
    every time."""
    if not path or not os.path.exists(path):
        raise ModelError(f"ECLEnergyCorrection: model file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ModelError(f"ECLEnergyCorrection: model {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            model_bytes = f.read()
        digest = hashlib.sha256(model_bytes).hexdigest()
        sess = _session_of(model_bytes, digest, threads)
    except Exception as err:  # onnxruntime raises its own exception types
        raise ModelError(f"ECLEnergyCorrection: cannot load model {path!r}: {err}") from err
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    if set(inputs) != {"image", "features"} or outputs != ["energy"]:
        raise ModelError(f"ECLEnergyCorrection: model {path!r} has inputs {sorted(inputs)} and outputs {outputs}; "
                         "expected inputs ['features', 'image'] and output ['energy']")
    img, feat = inputs["image"].shape, inputs["features"].shape
    out_shape = sess.get_outputs()[0].shape  # declared; _warm_up checks what a call returns
    if out_shape is not None and len(out_shape) != 1:
        raise ModelError(f"ECLEnergyCorrection: model {path!r} declares energy of shape {out_shape}; expected [N], "
                         "one energy per cluster")
    if len(img) != 3 or len(feat) != 2:
        raise ModelError(f"ECLEnergyCorrection: model {path!r}: image must be [N,S,S] and features [N,F], got {img}, {feat}")
    if isinstance(img[0], int) or isinstance(feat[0], int):
        raise ModelError(f"ECLEnergyCorrection: model {path!r} has no dynamic batch axis ({img}, {feat})")
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    det = meta.get("detector")
    if expected_detector is not None and det is not None and det != expected_detector:
        raise ModelError(f"ECLEnergyCorrection: model {path!r} was trained for detector {det!r}, "
                         f"the events are {expected_detector!r}")
    if image_size is not None and (img[1] != image_size or img[2] != image_size):
        raise ModelError(f"ECLEnergyCorrection: model {path!r} expects {img[1]}x{img[2]} images, "
                         f"ECLClusterizer makes {image_size}x{image_size}")
    # feature vector: ECLClusters.features, then the extra features the metadata lists
    # (eclreco.cnn_model.EXTRA_FEATURE_NAMES); a model without feature_names cannot be fed safely
    names = meta.get("feature_names")
    if not names:
        raise ModelError(f"ECLEnergyCorrection: model {path!r} has no 'feature_names' metadata")
    try:
        _, extra = split_feature_names(names.split(","))
    except ValueError as err:
        raise ModelError(f"ECLEnergyCorrection: model {path!r}: {err}") from err
    have = list(_core.cluster_feature_names())
    core = names.split(",")[: len(names.split(",")) - len(extra)]
    if core != have:
        raise ModelError(f"ECLEnergyCorrection: model {path!r} was trained on features {core}, "
                         f"ECLClusters.features are {have}")
    if n_features is not None and feat[1] != n_features + len(extra):
        raise ModelError(f"ECLEnergyCorrection: model {path!r} expects {feat[1]} features, its metadata lists "
                         f"{n_features + len(extra)} ({names})")
    meta["extra_features"] = tuple(extra)
    meta["file"] = {"path": os.path.abspath(path), "sha256": digest}
    return sess, meta


def _check_output(out, n: int, path: str):
    """A model's energy must be one value per cluster: numpy would broadcast a [1] to every cluster."""
    if out.shape != (n,):
        raise ModelError(f"ECLEnergyCorrection: model {path!r} returned energy of shape {list(out.shape)} for {n} "
                         f"clusters; expected [{n}], one energy per cluster")


class ECLEnergyCorrection(Module):
    """CNN energy correction of ECLClusters.energy (onnxruntime, one batched call per batch)."""

    def __init__(self):
        super().__init__()
        self.add_param("model", "", "ONNX model file; '' = the shipped model of the events' detector")
        self.add_param("detector", "", "the events' detector, belle2-ecl or array30: only its shipped model is "
                                       "loaded, and a model trained for another one is an error ('' = any)")
        self.add_param("threads", 1, "onnxruntime intra-op threads per session")
        self.add_param("min_energy_gev", 0.05, "clusters with energy_raw below keep their (classical) energy, GeV "
                                               "(the training samples start at 50 MeV of true energy)")
        self.add_param("max_energy_gev", 6.0, "clusters with energy_raw above keep their (classical) energy, GeV "
                                              "(the training samples end at 6 GeV of true energy); 0: no limit")
        self.add_param("max_abs_time_ns", 50.0, "clusters with |time| above keep their (classical) energy: out of time, "
                                                "beam background; <= 0: no cut")
        self.add_param("max_ratio_to_classical", -1.0, "a CNN energy more than this factor above the energy the cluster "
                                                       "arrived with (the classical correction) is not written (the "
                                                       "cluster keeps it); 0: no guard; -1: the detector's (belle2-ecl "
                                                       "2, array30 none)")
        # 1024: onnxruntime's intermediate activations (~1.4 kB per cluster) of one call then stay
        # in the L2 cache; whole batches (~3000 clusters) ran 25 % slower in the chain (measured)
        self.add_param("max_clusters_per_batch", 1024, "at most this many clusters per inference call (a batch's "
                                                       "clusters go in calls of equal size)")
        self.add_param("collection", "ECLClusters", "cluster collection to correct")
        self._sessions = {}
        self._model_files = {}
        self._image_shapes = {}
        self._lock = threading.Lock()
        self._n_corrected = 0
        self._n_out_of_time = 0
        self._n_guarded = 0
        self._n_calls = 0
        self._seconds = 0.0
        self._checked_energy_in = False

    # -- sessions -----------------------------------------------------------------------------
    def makes(self):  # it changes ECLClusters.energy
        return ()

    def requires(self):
        return (self.param("collection"),)

    def initialize(self):
        self._sessions = {}
        self._model_files = {}
        self._image_shapes = {}
        # (the counters run on over the module's life: Prometheus counters of a process that runs
        # many runs, as the HLT worker's, must not fall back to 0 at each one)
        self._checked_energy_in = False
        ratio = self.param("max_ratio_to_classical")
        if ratio not in (0, -1) and ratio <= 1:
            raise ValueError("ECLEnergyCorrection: max_ratio_to_classical must be > 1 (or 0: no guard, -1: the "
                             f"detector's), not {ratio}")
        if not 1 <= self.param("threads") <= 64:
            raise ValueError("ECLEnergyCorrection: threads must be 1..64 (onnxruntime intra-op threads)")
        if self.param("max_clusters_per_batch") < 1:
            raise ValueError("ECLEnergyCorrection: max_clusters_per_batch must be >= 1")
        lo, hi = self.param("min_energy_gev"), self.param("max_energy_gev")
        if not (lo >= 0 and (hi == 0 or hi > lo)):
            raise ValueError(f"ECLEnergyCorrection: need min_energy_gev >= 0 and max_energy_gev > min_energy_gev (or 0: "
                             f"no limit), not {lo} and {hi}")
        det = self.param("detector")
        if det and det not in ("belle2-ecl", "array30"):
            raise ValueError(f"ECLEnergyCorrection: unknown detector {det!r}")
        # the image size is a clusterizer parameter: checked against the data in event()
        n_feat = len(_core.cluster_feature_names())
        model = self.param("model")
        if model:
            sess, meta = load_session(model, self.param("threads"), det or None, n_features=n_feat)
            self._sessions["*"] = (sess, meta)
        else:
            # shipped models: load (and check) every detector's model now, so that a broken
            # installation fails at initialize and not in the middle of a run
            dets = [det] if det else list(DETECTOR_NAMES.values())
            for d in dets:
                self._sessions[d] = load_session(shipped_model(d), self.param("threads"), d, n_features=n_feat)
        self._model_files = {key: meta["file"] for key, (_, meta) in self._sessions.items()}
        # what event() reads, read once
        self._config = (self.param("collection"), lo, hi, self.param("max_abs_time_ns"),
                        self.param("max_clusters_per_batch"), model)
        self._max_ratios = {code: self._max_ratio(code) for code in DETECTOR_NAMES}
        for sess, meta in self._sessions.values():
            self._warm_up(sess, meta["file"]["path"])

    def provenance(self) -> dict:
        """The model files loaded at initialize, by detector ('*': the model parameter's), for the
        output file's metadata: which network made cluster_energy."""
        return {"models": dict(self._model_files)}

    def _warm_up(self, sess, path):
        """Two calls of a full slice at initialize: onnxruntime's first calls allocate its buffers
        (~2 ms each, 3x a steady call); an online chain should not pay that on its first events.
        They also check that the model returns one energy per cluster (a model declaring no output
        shape, or a wrong one, fails here and not in every event)."""
        shapes = {i.name: i.shape for i in sess.get_inputs()}
        n = self.param("max_clusters_per_batch")
        img = np.zeros((n, *shapes["image"][1:]), np.float32)
        feat = np.zeros((n, shapes["features"][1]), np.float32)
        feat[:, E_RAW_INDEX] = 0.1  # GeV: a valid cluster
        feat[:, len(FEATURE_NAMES):] = 0.1  # extra features (energy_in, counts): finite
        for _ in range(2):
            out = sess.run(["energy"], {"image": img, "features": feat})[0]
            _check_output(out, n, path)

    def _session(self, detector_code: int):
        name = DETECTOR_NAMES.get(int(detector_code))
        if "*" in self._sessions:
            sess, meta = self._sessions["*"]
            # an explicit model without `detector`: its events are checked here (a model of
            # another detector would run without error and give wrong energies)
            trained = meta.get("detector")
            if trained is not None and name != trained:
                raise ModelError(f"ECLEnergyCorrection: model {self.param('model')!r} was trained for detector "
                                 f"{trained!r}, the events are {name or int(detector_code)!r}")
            return sess, meta
        if name not in self._sessions:
            raise ModelError(f"ECLEnergyCorrection: no model for detector {name or int(detector_code)!r}")
        return self._sessions[name]

    # -- processing ---------------------------------------------------------------------------
    def _image_shape(self, sess):
        """Expected image shape [S, S] of a session (cached: get_inputs() builds new objects)."""
        shapes = self._image_shapes
        shape = shapes.get(id(sess))
        if shape is None:
            inp = sess.get_inputs()
            full = inp[0].shape if inp[0].name == "image" else inp[1].shape
            shape = shapes[id(sess)] = tuple(full[1:])
        return shape

    def event(self, batch):
        coll, t_max = self._config[0], self._config[3]
        if len(batch) == 0:
            return
        if coll not in batch:  # a path without the clusterizer, or a typo: not silently uncorrected
            raise ModelError(f"ECLEnergyCorrection: no collection {coll!r} in the batch (ECLClusterizer makes it)")
        cl = batch[coll]
        try:
            self._correct(batch, cl)
        except KeyError:  # a column missing: the job ends with one message, not every event on its own
            self.require_columns(cl, READ_COLUMNS if t_max > 0 else READ_COLUMNS[:-1])
            raise

    def _correct(self, batch, cl):
        # Few Python and numpy steps per batch: after the clusterizer each one runs cold (~5 µs for a
        # parameter read or a column view, against ~0.2 when repeated), so the selection and gathers are
        # one C++ call, the write-back another (docs/performance.md).
        step, model = self._config[4], self._config[5]
        code = int(batch.detector[0])  # the usual batch: one detector; inference_inputs says when not
        try:
            session = self._session(code)
        except ModelError:  # no model for event 0's detector: the events worked on may be of another
            session = None
        if session is not None:
            rows, n_oot, images, features, found = self._inputs(batch, session)
            groups = [(code, session, (rows, images, features))]
        if session is None or found != code and (found != -1 or rows.size or n_oot):  # other detectors: by detector
            groups, n_oot = [], 0
            for c in np.unique(np.asarray(batch.detector)[batch.active()]):
                session = self._session(c)
                rows, outside, images, features, _ = self._inputs(batch, session, int(c))
                groups.append((int(c), session, (rows, images, features)))
                n_oot += outside
        n_done, n_guarded, t_inf = 0, 0, 0.0
        for code, (sess, meta), (rows, images, features) in groups:
            if rows.size == 0:
                continue
            names = meta["extra_features"]
            if "energy_in" in names and not self._checked_energy_in:
                self._check_energy_in(np.asarray(cl["energy_raw"])[rows],
                                      features[:, len(FEATURE_NAMES) + names.index("energy_in")])
            parts = []
            for a, b in self.call_slices(rows.size, step):
                t0 = time.perf_counter()
                out = sess.run(["energy"], {"image": images[a:b], "features": features[a:b]})[0]
                t_inf += time.perf_counter() - t0
                _check_output(out, b - a, model or meta["file"]["path"])
                parts.append(out)
                n_done += out.shape[0]
            # the CNN energies written, those above max_ratio x the energy in kept at that (a NaN too)
            n_guarded += _core.write_rows(cl, "energy", rows, parts, self._max_ratios.get(code, 0.0))
        self._count(n_oot, n_guarded, n_done - n_guarded, calls=1 if n_done else 0, seconds=t_inf)

    def _inputs(self, batch, session, detector=None):
        """ECLEnergyCorrection.inputs of the batch for the model `session` ((session, metadata)), with the module's
        parameters: the clusters of the events of `detector` (None: every event worked on)."""
        coll, lo, hi, t_max = self._config[:4]
        sess, meta = session
        return self.inputs(batch, coll, meta["extra_features"], self._image_shape(sess), lo, t_max, hi, detector)

    def _count(self, n_oot=0, n_guarded=0, n_corrected=0, calls=0, seconds=0.0):
        with self._lock:  # batches run on several framework threads
            self._n_out_of_time += n_oot
            self._n_guarded += n_guarded
            self._n_corrected += n_corrected
            self._n_calls += calls
            self._seconds += seconds

    def _max_ratio(self, detector_code) -> float:
        """The max_ratio_to_classical of a detector's clusters (0: no guard): a cluster whose CNN energy is above
        it x the energy it arrived with keeps that energy."""
        ratio = self.param("max_ratio_to_classical")
        if ratio < 0:
            ratio = DEFAULT_MAX_RATIO.get(DETECTOR_NAMES.get(int(detector_code)), 0.0)
        return ratio

    @staticmethod
    def call_slices(n: int, max_per_call: int):
        """(start, stop) of the inference calls for n clusters: the fewest calls of at most
        max_per_call, of equal size within one (3225 clusters: 4 x 806, not 3 x 1024 + 153)."""
        if n <= 0:
            return []
        k = -(-n // max_per_call)
        bounds = [n * i // k for i in range(k + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    @staticmethod
    def inputs(batch, collection, names, image_shape, min_energy_gev, max_abs_time_ns, max_energy_gev=0.0,
               detector=None):
        """(rows, n_out_of_time, images [len(rows), S, S], features [len(rows), F + len(names)], detector) of a batch's
        clusters in the model's domain: the events it works on (not rejected or discarded; of `detector` unless
        None), energy_raw >= min_energy_gev, <= max_energy_gev when that is > 0 and, when max_abs_time_ns > 0,
        |time| <= max_abs_time_ns (n_out_of_time: how many that left out). Their ECLClusters.image, and
        ECLClusters.features followed by the extra features `names` in that order (energy_in: the collection's
        energy column as it is now, before this module writes it; event-level features: the cluster's event's
        row of EVENT_FEATURE_COLUMNS), float32; images of another shape than image_shape (None: any) are a
        ModelError; detector: the code of the events it worked on, -1 for several (or none). One C++ call
        (_core.inference_inputs): as separate numpy steps after the clusterizer, with its caches cold, they cost
        ~3x the work (docs/performance.md)."""
        blocks = [("", "features")]
        for n in names:
            if n == "energy_in":
                blocks.append(("", "energy"))
            elif n in EVENT_FEATURE_COLUMNS:
                blocks.append(EVENT_FEATURE_COLUMNS[n])
            else:
                raise ModelError(f"ECLEnergyCorrection: unknown extra feature {n!r}")
        try:
            rows, n_oot, images, features, found = _core.inference_inputs(
                batch, collection, blocks, min_energy_gev, max_energy_gev, max_abs_time_ns, detector)
        except ValueError as err:  # an event-level collection missing, or with several rows for one event
            raise ModelError(f"ECLEnergyCorrection: event features {[n for n in names if n != 'energy_in']}: "
                             f"{err}") from err
        if image_shape is not None and images.shape[1:] != tuple(image_shape):
            raise ModelError(f"ECLEnergyCorrection: model expects images {tuple(image_shape)}, clusters have "
                             f"{images.shape[1:]}")
        return rows, n_oot, images, features, found

    def _check_energy_in(self, e_raw, e_in):
        """Once per run: a model refining the classical correction (energy_in) was fed clusters
        whose energy is still the raw energy, i.e. ECLLeakageCorrection did not run before."""
        if e_raw.size == 0:
            return
        self._checked_energy_in = True
        if np.array_equal(np.asarray(e_raw, np.float32), np.asarray(e_in, np.float32)):
            warnings.warn("ECLEnergyCorrection: the model refines the classical correction (feature energy_in), "
                          "but the clusters' energy is their raw energy: is ECLLeakageCorrection missing before "
                          "ECLEnergyCorrection in the path?", RuntimeWarning, stacklevel=2)

    def counters(self):
        return {"clusters_corrected": float(self._n_corrected), "inference_seconds": float(self._seconds),
                "inference_calls": float(self._n_calls), "clusters_out_of_time": float(self._n_out_of_time),
                "clusters_guarded": float(self._n_guarded)}
