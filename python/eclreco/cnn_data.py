"""Cluster samples for the CNN energy correction, made THROUGH THE PROJECT'S OWN CHAIN.

Geant4 true deposits (or fast-simulation events) -> [beam-background overlay] -> electronics
(noise, zero suppression, time, quality) -> wire format (`eclreco.rawdata.encode_events`) -> a
real path: `G4EnvelopeSource` -> ECLUnpacker -> ECLClusterizer -> ECLLeakageCorrection
[-> ECLEnergyCorrection] -> `MatchedClusterCollector`. So training and validation see exactly
the clusters (images, features, raw and classical energies) that the online reconstruction sees.
"""
from __future__ import annotations

import zipfile

import numpy as np

from eclreco import Module, _core
from eclreco.framework import RAW
from eclreco.cnn_model import EVENT_FEATURE_NAMES, event_features

G4_DEFAULT = {"array30": "g4_array30_train.npz", "belle2-ecl": "g4_belle2_train.npz"}
MATCH_ANGLE_RAD = 0.1
TEST_FRACTION = 0.2  # the last 20 % of every Geant4 file: never used in training or early stopping
VAL_FRACTION = 0.125  # of the remaining 80 %: validation set for early stopping (10 % of the file)
# The units of a Geant4 sample (MeV): its photons have 50-6000 MeV (/work/shared/data/README.md) and their
# showers leave most of it in the crystals (the median of an event's deposits over its true energy is 0.89 in
# array30's reference file, 0.97 in belle2-ecl's). A file written in GeV passed every check and failed after
# the chain with "no matched cluster" (nothing above the thresholds), which pointed away from the mistake;
# the bounds are a factor 5 below the lowest energy of such a sample, a factor 18 below the median fraction and,
# above, twice what energy conservation allows (an event's deposits cannot exceed its photon's energy).
MIN_LARGEST_TRUE_MEV = 10.0
DEPOSIT_FRACTION_RANGE = (0.05, 2.0)
# An event's deposits cannot exceed its photon's energy (energy conservation; the reference files reach 1.0000001
# of it, float32 rounding). True energies out of step with the deposits (one array sorted or shuffled, files merged
# in another order) passed the median check above and trained on wrong targets: 43-47 % of such events exceed it.
MAX_DEPOSIT_FRACTION = 1.01
# array30's entry points (xy_mm) in mm: they lie a median 14 mm from the energy centroid of their event's deposits
# in the reference file (crystals on a 60 mm pitch), 39 mm when the file gives them in cm (10x too small: two
# thirds of the photons, not 15 %, then "entered" the aluminium gap at x or y = 0 in validate's gap truth). An
# entry point that fits the deposits this many times better when read as cm is refused as such; near the origin,
# where the two readings agree, neither wins.
ENTRY_CM_FACTOR = 2.0
# ... and where their deposits are: a median 14 mm from the centroid (18 mm for 50-100 MeV photons, which leave most
# of their energy in one crystal), against 61 mm for cellIds counted from 0 (every deposit one crystal off: the
# corner crystal, cellId 0 then, is never hit, so the range check passed) and 43 mm for entry points of zeros. Half
# the 60 mm crystal pitch.
ENTRY_CENTROID_MAX_MM = 30.0
# The beam of array30's reference samples: x, y uniform over the 60 x 60 mm cell of the crystal at col 15, row 15
# (spec/detector.md), centred here; it stands for the entry point of a sample without xy_mm. The deposits' energy
# centroid lies a median 9.7 mm from it in the reference file (9.8 mm in the held-out file, which has no xy_mm),
# 61 mm for cellIds counted from 0, which then passed every check without xy_mm: ENTRY_CENTROID_MAX_MM applies.
BEAM_CENTRE_MM = (30.0, 30.0)
# belle2-ecl's photon directions and where their deposits are: the energy centroid of an event's crystals lies more
# than MATCH_ANGLE_RAD from the photon's direction in 0.25 % of the reference file's events (1.6 % at 50-70 MeV),
# which the chain leaves without a matched cluster. Directions in another frame (z reversed: 94 %, x and y swapped:
# 96 %) passed the unit-vector check, and the training ran silently on the few photons near the symmetry plane.
MAX_OFF_DIRECTION_FRACTION = 0.1


# ---------------------------------------------------------------------------------------------
# Geant4 files
# ---------------------------------------------------------------------------------------------

def check_copies(detector: str, copies: int) -> None:
    """How many times training events may enter: 1..8, more than once only for array30 (the 8
    symmetries of its reference beam spot, G4Sample.symmetric_copies). ValueError otherwise."""
    if not 1 <= copies <= 8:
        raise ValueError(f"training copies (--augment) must be 1..8, not {copies}")
    if copies > 1 and detector != "array30":
        raise ValueError("training copies (--augment) above 1 need the symmetries of the array30 reference beam, "
                         f"which {detector} does not have")


def g4_event_count(path: str, detector: str) -> int:
    """The number of events of the Geant4 file `path` of `detector`, from the header of its true-energy array
    (G4Sample.REQUIRED) without its data: `eclreco train` checks a --cache's --max-events against it, and
    G4Sample reads and checks every array (seconds, and a few times the file's size in memory, for a 1 GB
    sample). A file whose header does not give it so is read by G4Sample, whose error names what is wrong."""
    name = next(iter(G4Sample.REQUIRED[detector]))
    headers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
            shape = headers[np.lib.format.read_magic(f)](f)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        shape = None
    if shape is not None and (shape[1:] == ((1, 4) if name == "photons" else ())):
        return int(shape[0])
    return G4Sample(path, detector).n


class G4SampleError(ValueError):
    """A file that is not a usable Geant4 sample: `why`, of `path` (the message is PATH: WHY). The commands
    name the option that gave the file instead of the bare path (train.g4_file_named)."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


class G4Sample:
    """Events of a Geant4 file (columnar deposits) with their true energy / direction."""

    # the arrays a Geant4 file of each detector holds (/work/shared/data/README.md): belle2-ecl's photons
    # come from the interaction point in every direction (`photons`: energy and direction), array30's at
    # normal incidence (`true_energy_mev`; `xy_mm`, the entry point, optional)
    REQUIRED = {"array30": {"true_energy_mev": "the photons' true energies"},
                "belle2-ecl": {"photons": "the photons' directions"}}

    def __init__(self, path: str, detector: str):
        needed = {"offsets": "the events' deposits", "cell": "the cellIds", "edep_mev": "the deposits",
                  **self.REQUIRED[detector]}
        with open(path, "rb") as f:  # (a missing file or a folder: open's error, which names it)
            head = f.read(4)
        if head != b"PK\x03\x04":  # np.load's "pickled (object) data ... load it unsafely" is no advice to follow
            raise G4SampleError(path, "not a readable Geant4 sample (an .npz of the arrays offsets, cell, edep_mev, "
                               "...): not an .npz file " + (f"(it begins with {head!r})" if head else "(empty)"))
        key = None  # the array being read: numpy's errors name none
        try:
            with np.load(path) as npz:
                names = list(npz.files)
                missing = [n for n in needed if n not in names]
                d = {}
                for key in ([] if missing else [n for n in names if n in (*needed, "photons", "xy_mm")]):
                    d[key] = npz[key]
        except (ValueError, EOFError, TypeError, zipfile.BadZipFile) as err:  # a text, pickle, .npy, truncated file
            if key is not None and "allow_pickle" in str(err):  # np.savez of a list of per-event arrays
                raise G4SampleError(path, f"{key!r} holds Python objects (a list of arrays per event?), not an "
                                   "array of numbers: one flat array for all events, their boundaries in 'offsets' "
                                   "(data/README.md)") from None
            raise G4SampleError(path, "not a readable Geant4 sample (an .npz of the arrays offsets, cell, edep_mev, "
                               "...): " + (f"{key!r}: " if key is not None else "") + f"{err}") from None
        if missing:
            # a sample of the other detector is named as such: its true-energy array is that detector's
            other = [o for o, arrays in self.REQUIRED.items() if o != detector and all(a in names for a in arrays)]
            raise G4SampleError(path, f"has no {missing[0]!r} array ({needed[missing[0]]}): not a Geant4 sample "
                               f"of {detector}" + (f" (it holds {', '.join(names)})" if names else "")
                               + (f": a sample of {other[0]}, whose photons its {next(iter(self.REQUIRED[other[0]]))!r} "
                                  "array gives?" if other else ""))
        if "photons" in d and (d["photons"].ndim != 3 or d["photons"].shape[1:] != (1, 4)):
            # a sample of several photons per event (pi0s) has no single true energy and direction
            raise G4SampleError(path, f"'photons' has shape {d['photons'].shape}, not (n_events, 1, 4): one photon "
                               "per event (energy in MeV, unit direction) is what a Geant4 sample holds")
        self._check_arrays(path, d)
        self.path = path
        self.detector = detector
        from eclreco.rawdata import N_CELLS

        cell = d["cell"]  # checked before the cast: int32 kept the low bits of an int64 2**32 + 403, as 403
        if cell.size and (cell.min() < 1 or cell.max() > N_CELLS[detector]):
            raise G4SampleError(path, f"cellIds {cell.min()}..{cell.max()} are not those of {detector} "
                               f"(1..{N_CELLS[detector]}): a Geant4 sample of another detector?")
        self.cell = cell.astype(np.int32)
        self.edep_gev = d["edep_mev"].astype(np.float64) * 1e-3
        if "photons" in d:
            ph = d["photons"][:, 0, :].astype(np.float64)
            self.e_true = ph[:, 0] * 1e-3
            self.direction = ph[:, 1:4]
        else:
            self.e_true = d["true_energy_mev"].astype(np.float64) * 1e-3
            self.direction = np.tile([0.0, 0.0, 1.0], (self.e_true.size, 1))
        # array30: the photon's entry point on the front plane (truth, for validation only)
        self.entry_xy_mm = d["xy_mm"].astype(np.float64) if "xy_mm" in d else None
        self.n = self.e_true.size
        self._check_lengths(path, d["offsets"])
        self.offsets = d["offsets"].astype(np.int64)  # (0..len(cell) now: the cast keeps every value)
        if self.entry_xy_mm is not None and self.entry_xy_mm.shape != (self.n, 2):
            raise G4SampleError(path, f"'xy_mm' has shape {self.entry_xy_mm.shape}, not ({self.n}, 2): one entry "
                               "point (x, y in mm) per photon")
        self._check_values(path)

    @staticmethod
    def _check_arrays(path, d):
        """Shapes and dtypes (data/README.md): a 2-D deposit array was broadcast against the 1-D ones (memory
        without bound), a 2-D true energy failed in torch, a float cellId was truncated to another crystal."""
        kinds = {"offsets": "i", "cell": "i", "edep_mev": "f", "true_energy_mev": "f", "photons": "f", "xy_mm": "f"}
        for name, kind in kinds.items():
            if name not in d:
                continue
            a = d[name]
            if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
                raise G4SampleError(path, f"{name!r} is {a.dtype}, not an array of numbers (data/README.md)")
            if kind == "i" and np.issubdtype(a.dtype, np.floating) and not np.all(a == np.round(a)):
                raise G4SampleError(path, f"{name!r} ({a.dtype}) holds values that are not integers (the first "
                                   f"{a[a != np.round(a)][0]:g})")
            if name not in ("photons", "xy_mm") and a.ndim != 1:
                raise G4SampleError(path, f"{name!r} has shape {a.shape}, not one value per "
                                   + ("event" if name == "true_energy_mev" else "entry" if name != "offsets"
                                      else "event boundary") + " (a 1-D array)")

    def _check_lengths(self, path, off):
        """The arrays describe the same events and entries (data/README.md), each mismatch named by its arrays.
        `off`: 'offsets' as stored, checked in its own dtype: cast to int64 first, a uint64 2**64 - 3 was
        named as -3 (and a float above 2**63 as -2**63), values the file does not hold; np.diff of a uint64
        array wraps instead of going below 0, so the decrease is found by comparing neighbours."""
        true = "'photons'" if self.detector == "belle2-ecl" else "'true_energy_mev'"
        n, n_entries = self.n, self.cell.size

        def value(x):  # as stored (an integral float, checked by _check_arrays, as an integer; inf as inf)
            return int(x) if np.isfinite(x) else float(x)
        out = np.flatnonzero(~((off >= 0) & (off <= n_entries))) if off.size == n + 1 else []
        why = (f"'offsets' holds {off.size} event boundaries, not {n + 1} (one more than the {n} photons of {true})"
               if off.size != n + 1 else
               f"'offsets' begins at {value(off[0])}, not 0" if off[0] != 0 else
               f"'offsets' ends at {value(off[-1])}, but 'cell' holds {n_entries} entries" if off[-1] != n_entries
               else f"'offsets' holds {value(off[out[0]])} at event boundary {out[0]}, outside the 0..{n_entries} "
               "entries of 'cell'" if len(out)
               else f"'edep_mev' holds {self.edep_gev.size} entries, 'cell' {n_entries}"
               if self.edep_gev.size != n_entries else "")
        if not why and (down := np.flatnonzero(off[1:] < off[:-1])).size:
            why = f"'offsets' decreases at event {down[0]} ({value(off[down[0]])} then {value(off[down[0] + 1])})"
        if why:
            raise G4SampleError(path, f"{why}: the arrays do not describe the same events and entries")

    def _check_values(self, path):
        """Energies, entry points and directions a training can learn from: a NaN or infinite deposit went through
        the electronics as a saturated crystal or none, a true energy <= 0, NaN or infinite made the target
        log(E_true / E_raw) non-finite (a network that never left its initial weights, written as trained),
        and a crystal listed twice in an event failed in the middle of the chain."""
        if self.n == 0:
            raise G4SampleError(path, "holds no events")

        def event_of(entry):
            return int(np.searchsorted(self.offsets, entry, side="right") - 1)
        bad = np.flatnonzero(~np.isfinite(self.edep_gev) | (self.edep_gev < 0))
        if bad.size:
            raise G4SampleError(path, f"'edep_mev' holds {bad.size} deposit(s) that are not finite energies >= 0 (the "
                               f"first {self.edep_gev[bad[0]] * 1e3:g} MeV, in event {event_of(bad[0])})")
        if self.entry_xy_mm is not None:  # a NaN entry point was counted outside the gaps (validate's gap truth)
            bad = np.flatnonzero(~np.isfinite(self.entry_xy_mm).all(1))
            if bad.size:
                raise G4SampleError(path, f"'xy_mm' gives {bad.size} photon(s) an entry point that is not finite (the "
                                   f"first {self.entry_xy_mm[bad[0]].tolist()} mm, event {bad[0]})")
        bad = np.flatnonzero(~np.isfinite(self.e_true) | (self.e_true <= 0))
        if bad.size:
            name = "photons" if self.detector == "belle2-ecl" else "true_energy_mev"
            raise G4SampleError(path, f"{name!r} gives {bad.size} photon(s) a true energy that is not finite and > 0 "
                               f"(the first {self.e_true[bad[0]] * 1e3:g} MeV, event {bad[0]})")
        self._check_units(path)
        self._check_entry_points(path)
        norm = np.linalg.norm(self.direction, axis=1)
        bad = np.flatnonzero(~(np.abs(norm - 1) < 1e-3))  # (NaN too) the cluster matching takes cosines
        if bad.size:
            raise G4SampleError(path, f"'photons' gives {bad.size} photon(s) a direction that is not a unit vector "
                               f"(the first of length {norm[bad[0]]:g}, event {bad[0]})")
        self._check_directions(path)
        stride = int(self.cell.max()) + 1 if self.cell.size else 1
        key = np.sort(np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.offsets)) * stride + self.cell)
        twice = np.flatnonzero(np.diff(key) == 0)
        if twice.size:
            k = int(key[twice[0]])
            raise G4SampleError(path, f"event {k // stride} lists cellId {k % stride} twice: a Geant4 sample holds one "
                               "deposit per crystal and event (sum the hits of a crystal)")

    def _check_units(self, path):
        """MeV where MeV are due (MIN_LARGEST_TRUE_MEV, DEPOSIT_FRACTION_RANGE): the true energies, then the
        deposits against them; then each event's deposits within its photon's energy (MAX_DEPOSIT_FRACTION)."""
        name = "'photons' [:, 0, 0]" if self.detector == "belle2-ecl" else "'true_energy_mev'"
        lo, hi = float(self.e_true.min()) * 1e3, float(self.e_true.max()) * 1e3
        if hi < MIN_LARGEST_TRUE_MEV:
            raise G4SampleError(path, f"the true energies ({name}) are {lo:g}..{hi:g} MeV, far below the 50-6000 MeV "
                               "of a Geant4 sample: are they in GeV? The file holds energies in MeV (data/README.md)")
        cs = np.concatenate([[0.0], np.cumsum(self.edep_gev)])
        sums = cs[self.offsets[1:]] - cs[self.offsets[:-1]]
        hit = sums > 0  # (a photon that missed the crystals says nothing of the units)
        if not hit.any():
            return
        frac = float(np.median(sums[hit] / self.e_true[hit]))
        if not DEPOSIT_FRACTION_RANGE[0] <= frac <= DEPOSIT_FRACTION_RANGE[1]:
            unit = "GeV" if frac < DEPOSIT_FRACTION_RANGE[0] else "keV"
            raise G4SampleError(path, f"the deposits ('edep_mev') of an event sum to a median {frac:.3g} times its "
                               f"photon's true energy ({name}), where a shower leaves most of it (about 0.9) in the "
                               f"crystals: are the deposits in {unit}? The file holds both in MeV (data/README.md)")
        over = np.flatnonzero(sums > MAX_DEPOSIT_FRACTION * self.e_true)
        if over.size:
            k = over[0]
            raise G4SampleError(path, f"{over.size} event(s) deposit more than their photon's true energy ({name}), "
                               f"which energy conservation forbids (the first, event {k}: {sums[k] * 1e3:g} MeV of "
                               f"{self.e_true[k] * 1e3:g} MeV): are the true energies in the order of the events' "
                               "deposits, and the deposits without beam background? (data/README.md)")

    def _deposit_centroids(self, axes):
        """(hit, centroid): the events with deposits (a photon into a gap may leave none) and the energy centroid of
        their crystals' front faces (spec/detector.md; _core.Geometry, in cm), [n_hit, len(axes)]."""
        geo = _core.Geometry.get(self.detector)
        front = np.stack([np.asarray(getattr(geo, f"front_{a}")) for a in axes], 1)[self.cell - 1]
        ev = np.repeat(np.arange(self.n), np.diff(self.offsets))
        total = np.bincount(ev, self.edep_gev, minlength=self.n)
        hit = total > 0
        sums = [np.bincount(ev, self.edep_gev * front[:, k], minlength=self.n)[hit] for k in range(len(axes))]
        return hit, np.stack(sums, 1) / total[hit, None]

    def _check_entry_points(self, path):
        """array30's entry points: in mm (ENTRY_CM_FACTOR) and where the events' deposits are
        (ENTRY_CENTROID_MAX_MM), against the deposits' energy centroid on the front plane; without xy_mm, the
        deposits where the reference beam is (BEAM_CENTRE_MM)."""
        if self.detector != "array30":
            return
        hit, centroid = self._deposit_centroids("xy")
        if not hit.any():
            return
        centroid = centroid * 10.0  # cm -> mm
        if self.entry_xy_mm is None:
            beam = float(np.median(np.hypot(*(centroid - BEAM_CENTRE_MM).T)))
            if beam > ENTRY_CENTROID_MAX_MM:
                raise G4SampleError(path, f"the energy centroid of the events' deposits ('cell') lies a median "
                                   f"{beam:.3g} mm from the centre of the reference beam's crystal (x, y = "
                                   f"{BEAM_CENTRE_MM[0]:g}, {BEAM_CENTRE_MM[1]:g} mm: col 15, row 15), more than "
                                   f"{ENTRY_CENTROID_MAX_MM:g} mm (half the crystal pitch): cellIds counted from 0, not "
                                   "1, or a beam elsewhere? (spec/detector.md, data/README.md)")
            return
        as_mm, as_cm = (float(np.median(np.hypot(*(centroid - f * self.entry_xy_mm[hit]).T))) for f in (1.0, 10.0))
        if as_cm * ENTRY_CM_FACTOR < as_mm:
            raise G4SampleError(path, f"'xy_mm' puts the photons' entry points a median {as_mm:.3g} mm from the energy "
                               f"centroid of their deposits, {as_cm:.3g} mm if they were cm: are they in cm? The file "
                               "holds them in mm (data/README.md)")
        if as_mm > ENTRY_CENTROID_MAX_MM:
            raise G4SampleError(path, f"'xy_mm' puts the photons' entry points a median {as_mm:.3g} mm from the energy "
                               f"centroid of their deposits, more than {ENTRY_CENTROID_MAX_MM:g} mm (half the crystal "
                               "pitch): entry points of other events, or cellIds ('cell') counted from 0, not 1? "
                               "(data/README.md)")

    def _check_directions(self, path):
        """belle2-ecl's photon directions where their deposits are (MAX_OFF_DIRECTION_FRACTION): the angle between
        the direction and the deposits' energy centroid."""
        if self.detector != "belle2-ecl":
            return
        hit, centroid = self._deposit_centroids("xyz")
        if not hit.any():
            return
        cos = np.sum(centroid * self.direction[hit], 1) / np.linalg.norm(centroid, axis=1)
        off = float(np.mean(~(cos > np.cos(MATCH_ANGLE_RAD))))
        if off > MAX_OFF_DIRECTION_FRACTION:
            raise G4SampleError(path, f"'photons' gives {off:.1%} of the photons a direction more than {MATCH_ANGLE_RAD:g} "
                               "rad (the cluster matching's cone) from the energy centroid of their deposits, which the "
                               f"chain would leave without a matched cluster (at most {MAX_OFF_DIRECTION_FRACTION:.0%}): "
                               "directions of other events, or in another frame (axes swapped, z reversed)? "
                               "(data/README.md)")

    def split(self):
        """(train, validation, test) event indices: test = the last TEST_FRACTION of the file."""
        n_test = int(round(self.n * TEST_FRACTION))
        n_rest = self.n - n_test
        n_val = int(round(n_rest * VAL_FRACTION))
        idx = np.arange(self.n)
        splits = idx[: n_rest - n_val], idx[n_rest - n_val: n_rest], idx[n_rest:]
        for name, part in zip(("training", "validation", "test"), splits):
            if part.size == 0:  # (the chain of an empty split returned nothing: KeyError 'evt', IndexError)
                raise G4SampleError(self.path, f"{self.n} events are too few for the split "
                                   f"(test: the last {TEST_FRACTION:.0%}, validation: {VAL_FRACTION:g} of the rest): "
                                   f"the {name} split would be empty")
        return splits

    def symmetric_copies(self, idx, copies=8):
        """A G4Sample with the events idx seen under `copies` (1..8) symmetries of the array30
        reference beam: the setup (normal incidence, entry point uniform over the 60 x 60 mm cell of
        the crystal at col 15, row 15; spec/detector.md) is invariant under the 8 reflections and
        rotations of the square about the cell's centre (x, y = 30, 30 mm), which map col -> 30 - col,
        row -> 30 - row and swap row and col. Copy k of event i is event k * len(idx) + i; copy 0 is
        the event itself. Deposits that would fall outside the array (col or row 0 reflected to 30:
        ~3e-8 of the energy of the shipped file) are dropped (`dropped_gev`)."""
        check_copies(self.detector, copies)
        idx = np.asarray(idx, np.int64)
        off, cell, e = self.deposits(idx)
        row, col = (cell - 1) // 30, (cell - 1) % 30
        cells, energies, counts, entries, dropped = [], [], [], [], 0.0
        ev_of = np.repeat(np.arange(idx.size), np.diff(off))
        xy = self.entry_xy_mm[idx] if self.entry_xy_mm is not None else np.tile(BEAM_CENTRE_MM, (idx.size, 1))
        for k in range(copies):
            r = 30 - row if k & 1 else row
            c = 30 - col if k & 2 else col
            x = 60.0 - xy[:, 0] if k & 2 else xy[:, 0]
            y = 60.0 - xy[:, 1] if k & 1 else xy[:, 1]
            if k & 4:
                r, c, x, y = c, r, y, x
            entries.append(np.stack([x, y], 1))
            keep = (r < 30) & (c < 30)
            dropped += float(e[~keep].sum())
            cells.append((1 + 30 * r + c)[keep])
            energies.append(e[keep])
            counts.append(np.bincount(ev_of[keep], minlength=idx.size))
        out = object.__new__(G4Sample)
        out.path = self.path
        out.detector = self.detector
        out.offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
        out.cell = np.concatenate(cells).astype(np.int32)
        out.edep_gev = np.concatenate(energies)
        out.e_true = np.tile(self.e_true[idx], copies)
        out.direction = np.tile(self.direction[idx], (copies, 1))
        out.entry_xy_mm = np.concatenate(entries)
        out.n = out.e_true.size
        out.dropped_gev = dropped
        return out

    def deposits(self, idx):
        """Columnar deposits (offsets, cell, edep_gev) of the events idx (in that order)."""
        idx = np.asarray(idx, np.int64)
        lo, hi = self.offsets[idx], self.offsets[idx + 1]
        counts = hi - lo
        off = np.zeros(idx.size + 1, np.int64)
        np.cumsum(counts, out=off[1:])
        take = np.repeat(lo - off[:-1], counts) + np.arange(off[-1])
        return off, self.cell[take], self.edep_gev[take]


# ---------------------------------------------------------------------------------------------
# Path modules
# ---------------------------------------------------------------------------------------------

class G4EnvelopeSource(Module):
    """Feeds pre-digitised events as raw envelopes (the wire format, as the DAQ sends them)."""

    def __init__(self, chunks=None):
        super().__init__()
        self.add_param("detector", "array30", "detector")
        self._chunks = chunks  # iterator of dicts from _digitise
        self._pending = None
        self._pos = 0

    def is_source(self):
        return True

    def makes(self):
        return RAW

    def requires(self):
        return ()

    def _next_chunk(self):
        try:
            self._pending = next(self._chunks)
        except StopIteration:
            self._pending = None
        self._pos = 0

    def next_batch(self, batch, max_events):
        if self._pending is None or self._pos >= self._pending["n"]:
            self._next_chunk()
            if self._pending is None:
                batch.resize(0)
                return False
        c = self._pending
        a, b = self._pos, min(self._pos + max_events, c["n"])
        self._pos = b
        _core.append_envelopes(batch, c["envelopes"][a:b])
        return True


class PartsCollector(Module):
    """A module that keeps a dict of arrays per batch (self.parts, in input order) for a script to
    read after the job: concatenated() joins them."""

    def __init__(self):
        super().__init__()
        self.parts = []

    def ordered(self):
        return True

    def makes(self):  # it keeps what it reads, outside the batch
        return ()

    def concatenated(self) -> dict:
        if not self.parts:
            return {}
        return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}


class MatchedClusterCollector(PartsCollector):
    """Collects per event the cluster matched to the true photon (and the raw digit sum)."""

    def __init__(self, detector="array30", direction=None, match_angle=MATCH_ANGLE_RAD):
        super().__init__()
        self.detector = detector
        self.direction = direction  # (n_events, 3) true directions indexed by evt, belle2-ecl
        self.match_angle = match_angle

    def requires(self):  # the event features (ECLEventInformation) are NaN where the batch lacks them
        return ("ECLDigits", "ECLClusters")

    def event(self, batch):
        n = len(batch)
        evt = np.array(batch.evt, dtype=np.int64)
        dig = batch["ECLDigits"]
        doff = np.asarray(dig.offsets)
        de = np.asarray(dig["energy"], np.float64)
        cs = np.concatenate([[0.0], np.cumsum(de)])
        raw_sum = cs[doff[1:]] - cs[doff[:-1]]
        ev_feat = event_features(batch, EVENT_FEATURE_NAMES)  # the same function ECLEnergyCorrection uses
        cl = batch["ECLClusters"]
        off = np.asarray(cl.offsets)
        counts = np.diff(off)
        ev_of = np.repeat(np.arange(n), counts)
        e_raw = np.asarray(cl["energy_raw"])
        ok = np.ones(e_raw.size, bool)
        if self.detector == "belle2-ecl" and self.direction is not None:
            th, ph = np.asarray(cl["theta"], np.float64), np.asarray(cl["phi"], np.float64)
            u = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], 1)
            t = self.direction[evt[ev_of]]
            ok = np.sum(u * t, 1) > np.cos(self.match_angle)
        # the most energetic (raw) cluster among the candidates of each event
        cand = np.flatnonzero(ok)
        order = np.lexsort((-e_raw[cand], ev_of[cand]))
        cand = cand[order]
        evs, first = np.unique(ev_of[cand], return_index=True)
        sel = cand[first]
        rec = {
            "evt": evt,
            "raw_sum": raw_sum,
            "n_clusters": counts,
            "event_features": ev_feat,
            "has": np.zeros(n, bool),
            "energy_raw": np.zeros(n, np.float32),
            "energy": np.zeros(n, np.float32),
            "image": np.zeros((n,) + np.asarray(cl["image"]).shape[1:], np.float32),
            "features": np.zeros((n,) + np.asarray(cl["features"]).shape[1:], np.float32),
            "classical": np.zeros(n, np.float32),
        }
        rec["has"][evs] = True
        rec["energy_raw"][evs] = e_raw[sel]
        rec["energy"][evs] = np.asarray(cl["energy"])[sel]
        rec["image"][evs] = np.asarray(cl["image"])[sel]
        rec["features"][evs] = np.asarray(cl["features"])[sel]
        if "energy_classical" in cl.columns():
            rec["classical"][evs] = np.asarray(cl["energy_classical"])[sel]
        else:
            rec["classical"][evs] = rec["energy"][evs]
        self.parts.append(rec)

    def result(self):
        out = self.concatenated()
        if not out:
            return {}
        order = np.argsort(out["evt"], kind="stable")
        return {k: v[order] for k, v in out.items()}


class ClassicalSnapshot(Module):
    """Copies ECLClusters.energy (after the classical correction) into energy_classical."""

    def makes(self):  # a column of ECLClusters, not a collection
        return ()

    def requires(self):  # without it, MatchedClusterCollector took the energy it finds for the classical one
        return ("ECLClusters",)

    def event(self, batch):
        cl = batch["ECLClusters"]
        cl["energy_classical"] = np.array(cl["energy"], np.float32)


def add_correction_chain(path, model=None, **cnn_params):
    """The chain the networks are trained and validated on, after a source of raw events: ECLUnpacker,
    ECLClusterizer, ECLLeakageCorrection, the classical energy kept in energy_classical, then (model not
    None) ECLEnergyCorrection with that model and cnn_params."""
    for name in ("ECLUnpacker", "ECLClusterizer", "ECLLeakageCorrection"):
        path.add_module(name)
    path.add_module(ClassicalSnapshot())
    if model is not None:
        path.add_module("ECLEnergyCorrection", model=model, **cnn_params)


# ---------------------------------------------------------------------------------------------
# Digitisation and the chain
# ---------------------------------------------------------------------------------------------

def _digitise(detector, off, cell, e_gev, evt, rng, level):
    from eclreco.rawdata import encode_events
    from eclreco.sim import add_electronics, overlay_background

    t = np.zeros(e_gev.size)
    if level > 0:
        off, cell, e_gev, t = overlay_background(detector, off, cell, e_gev, t, level, rng)
    o, c, a, tt, q = add_electronics(detector, off, cell, e_gev, rng, hit_time_ns=t)
    return {"n": len(evt), "envelopes": encode_events(detector, 0, 1, [int(x) for x in evt], o, c, a, tt, q)}


def run_chain(detector, sample_iter, direction=None, model=None, min_energy_gev=None,
              batch_size=256, background_level=0.0):
    """Run chunks (dicts from _digitise) through the reconstruction path; returns the
    per-event matched clusters (dict of arrays indexed like the chunks' events)."""
    import eclreco

    path = eclreco.create_path()
    src = G4EnvelopeSource(sample_iter)
    src.set_param("detector", detector)
    path.add_module(src)
    add_correction_chain(path, model, **({} if min_energy_gev is None else {"min_energy_gev": min_energy_gev}))
    col = MatchedClusterCollector(detector, direction)
    path.add_module(col)
    eclreco.process(path, threads=1, batch_size=batch_size, install_signal_handlers=False)
    res = col.result()
    # what made the samples, recorded in the model card and the validation report
    res["chain"] = np.array("+".join(["wire"] + [m.type for m in path.modules[1:-1] if m.type != "ClassicalSnapshot"]))
    return res


def g4_chain_sample(g4: G4Sample, idx, seed, levels=None, chunk=2000, model=None, progress=None,
                    min_energy_gev=None):
    """Clusters of the Geant4 events idx through the chain.

    levels: None (no background), a number, (lo, hi): a level drawn uniformly per chunk of
    `chunk` events, or (lo, hi, p_zero): level 0 with probability p_zero, else uniform in [lo, hi]. Returns a dict of per-event arrays plus e_true, g4_index, background.
    """
    idx = np.asarray(idx, np.int64)
    rng = np.random.default_rng(seed)
    chunk_levels = []

    def chunks():
        for a in range(0, idx.size, chunk):
            sub = idx[a: a + chunk]
            if levels is None:
                lv = 0.0
            elif np.isscalar(levels):
                lv = float(levels)
            else:
                lv = float(rng.uniform(levels[0], levels[1]))
                if len(levels) > 2 and rng.random() < levels[2]:
                    lv = 0.0
            chunk_levels.append((a, sub.size, lv))
            off, cell, e = g4.deposits(sub)
            yield _digitise(g4.detector, off, cell, e, sub, rng, lv)
            if progress is not None:
                progress.update(sub.size)

    res = run_chain(g4.detector, chunks(), direction=g4.direction, model=model, min_energy_gev=min_energy_gev)
    bg = np.zeros(idx.size)
    for a, n, lv in chunk_levels:
        bg[a: a + n] = lv
    pos = {int(e): i for i, e in enumerate(idx)} if idx.size < 1000 else None
    if pos is None:
        lookup = np.full(g4.n, -1, np.int64)
        lookup[idx] = np.arange(idx.size)
        where = lookup[res["evt"]]
    else:
        where = np.array([pos[int(e)] for e in res["evt"]], np.int64)
    res["e_true"] = g4.e_true[res["evt"]]
    res["g4_index"] = res["evt"]
    res["background"] = bg[where]
    return res
