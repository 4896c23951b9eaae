"""Messages between the HLT roles (documented in docs/deployment.md).

Every message is a ZeroMQ multipart message whose first frame is a short ASCII command; bodies
are MessagePack. Arrays travel as ``{"dtype": "<u4", "shape": [n, ...], "data": bytes}``.
"""
from __future__ import annotations

import msgpack
import numpy as np

FORMAT_VERSION = 1
BATCH_TYPE = "eclreco.batch"

# distributor <-> worker (ROUTER/DEALER on the workers address)
READY = b"READY"        # worker -> distributor: {pid, host, credit, metrics_port, ...}
CREDIT = b"CREDIT"      # worker -> distributor: b"<n>", n more events may be sent
HB = b"HB"              # worker -> distributor: {state, counters}; heartbeat
BYE = b"BYE"            # worker -> distributor: leaving; its unconfirmed events go elsewhere
EV = b"EV"              # distributor -> worker: EV, seqs (uint64 LE bytes), lengths (uint32 LE), envelopes back to back
END_RUN = b"END_RUN"    # distributor -> worker/collector: end the run (all events confirmed)
TERMINATE = b"TERMINATE"  # distributor -> worker/collector: exit
WHO = b"WHO"            # distributor -> worker/collector: unknown to me, register again

# collector/supervisor/clients -> distributor (ROUTER on the control address)
HELLO = b"HELLO"        # collector/supervisor: register {role, pid, ...}
CONFIRM = b"CONFIRM"    # collector: seqs (uint64 LE bytes) taken by the output (processed; latency ends)
SAVED = b"SAVED"        # collector: seqs now in the output file (a collector that says "saves" in HELLO)
STATUS = b"STATUS"      # collector/supervisor: periodic report {...}; client: request -> reply
RUN_ENDED = b"RUN_ENDED"  # collector: output of the run closed {run_index, filename, events_written}
LOW = b"LOW"            # distributor -> collector: b"<seq>", every seq below was confirmed; answering HELLO also
                        # b"<run_index>" joined, b"1" when that run has not started, and the distributor's instance
                        # token (random per process: the same one after a reconnect, no handover; docs/deployment.md)
REFUSED = b"REFUSED"    # distributor -> collector: {reason}; another live collector is registered
STOP = b"STOP"          # client: end the run -> reply when the output is closed
START = b"START"        # client: start a new run
OK = b"OK"
ERR = b"ERR"
FINAL = b"FINAL"        # distributor -> supervisors: final statistics, just before exiting

# The collector's STATUS report interval. Its control connection lost (a network glitch, `ss -K`), a live collector
# reconnects under a new identity and registers again with its next report, later while a batch keeps it busy: the
# distributor takes a closed connection for its death only after COLLECTOR_RECONNECT_REPORTS of them
COLLECTOR_REPORT_S = 0.5
COLLECTOR_RECONNECT_REPORTS = 4

# the roles of `hlt run` (each with its own key of --curve-dir, by its role name) and whom their sockets connect to
CURVE_ROLES = ("control", "distributor", "collector", "worker")


def curve_servers(role: str, args) -> tuple[str, ...]:
    """The CURVE key names of the parties a farm role's sockets connect to (curve_option_error checks their public
    keys before any socket): the one list for the role's own command and for hlt run, which checks every role it
    starts with its own options. args: the role's options (hlt run's for all of them)."""
    if role == "control":
        return ("distributor",)
    if role == "distributor":  # --input-connect: its input connects to a DAQ that binds
        return ("daq",) if args.input_connect else ()
    if role == "worker":
        return ("distributor", "collector")
    if role == "collector":  # and reco (steering/reco.py -i) for a tcp:// output it does not bind
        output = ("reco",) if args.output.startswith("tcp://") and not getattr(args, "output_bind", False) else ()
        return ("distributor",) + output
    raise ValueError(f"unknown farm role {role!r} (one of {', '.join(CURVE_ROLES)})")


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data) -> object:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def decode_array(d: dict) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])


def envelope_frames(envelopes) -> list:
    """The two frames that carry raw events to a worker: their lengths (uint32 LE) and their bytes
    back to back. One frame for many events: a frame per event cost both ends ~3.5 µs of CPU per
    event in ZeroMQ (tcp, 256 per message), the joined frame ~1 µs, the join included."""
    return [np.fromiter(map(len, envelopes), "<u4", len(envelopes)).tobytes(), b"".join(envelopes)]


def envelopes_from_frames(frames, n: int):
    """(bytes, offsets int64 [n + 1]) of the n raw events of envelope_frames; ValueError when the
    frames do not hold n events exactly."""
    if len(frames) != 2:
        raise ValueError(f"raw events in {len(frames)} frames, expected 2 (lengths, bytes)")
    lengths, blob = frames
    if len(lengths) != 4 * n:
        raise ValueError(f"{len(lengths) // 4} lengths for {n} sequence ids")
    off = np.zeros(n + 1, np.int64)
    np.cumsum(np.frombuffer(lengths, "<u4"), out=off[1:])
    if off[-1] != len(blob):
        raise ValueError(f"lengths add up to {off[-1]} bytes, the frame has {len(blob)}")
    return bytes(blob), off


def seqs_to_bytes(seqs) -> bytes:
    return np.asarray(seqs, dtype="<u8").tobytes()


def seqs_from_bytes(data) -> np.ndarray:
    return np.frombuffer(data, dtype="<u8")


META_COLUMNS = ("exp", "run", "evt", "error_flags", "time_ns", "detector")


def batch_to_message(batch, collections=("ECLClusters",), count_collections=("ECLDigits",), columns=(),
                     seq_collection="HLTSequence", include_rejected=True, strip_discarded=("ECLClusters",)) -> dict:
    """One batch as the ZMQOutput message (a dict, MessagePack-ready); see docs/deployment.md.
    The collections of strip_discarded go without the rows of discarded events (their count 0)."""
    n = len(batch)
    msg = {"v": FORMAT_VERSION, "type": BATCH_TYPE, "n": n,
           "meta": {name: encode_array(getattr(batch, name)) for name in META_COLUMNS}}
    if seq_collection and seq_collection in batch:
        msg["seq"] = encode_array(batch[seq_collection]["seq"].astype("<u8"))
    rej = batch.rejections()
    if rej and include_rejected:
        msg["rejections"] = [[int(i), r[0], r[1]] for i, r in sorted(rej.items())]
    errors = batch.errors()
    if errors:
        msg["errors"] = [[int(i), m] for i, m in sorted(errors.items())]
    discards = batch.discards()
    if discards:
        msg["discards"] = [[int(i), r] for i, r in sorted(discards.items())]
    cols = {}
    wanted = set(columns)
    discarded = None
    if discards and strip_discarded:
        discarded = np.zeros(n, bool)
        discarded[list(discards)] = True
    for name in collections:
        if name not in batch:
            continue
        c = batch[name]
        counts = np.diff(c.offsets).astype("<i4")
        names = [k for k in c.columns() if not wanted or k in wanted]
        if discarded is not None and name in strip_discarded:
            # what an event filter drops costs no bandwidth; a per-event collection (ECLEventInformation,
            # not stripped) keeps its one row per event
            rows = np.repeat(~discarded, counts)
            counts[discarded] = 0
            cols[name] = {"counts": encode_array(counts), "columns": {k: encode_array(c[k][rows]) for k in names}}
        else:
            cols[name] = {"counts": encode_array(counts), "columns": {k: encode_array(c[k]) for k in names}}
    for name in count_collections:
        if name in batch and name not in cols:
            cols[name] = {"counts": encode_array(np.diff(batch[name].offsets).astype("<i4")), "columns": {}}
    msg["collections"] = cols
    return msg


class DecodedBatch:
    """A ZMQOutput message as numpy arrays (read-only views on the message bytes)."""

    def __init__(self, msg: dict):
        if msg.get("type") != BATCH_TYPE or msg.get("v") != FORMAT_VERSION:
            raise ValueError(f"not an eclreco batch message of version {FORMAT_VERSION}")
        self.n = int(msg["n"])
        self.meta = {k: decode_array(v) for k, v in msg["meta"].items()}
        self.seq = decode_array(msg["seq"]) if "seq" in msg else None
        self.rejections = {int(i): (reason, detail) for i, reason, detail in msg.get("rejections", [])}
        self.errors = {int(i): m for i, m in msg.get("errors", [])}
        self.discards = {int(i): r for i, r in msg.get("discards", [])}
        self.collections = {name: (decode_array(c["counts"]), {k: decode_array(v) for k, v in c["columns"].items()})
                            for name, c in msg.get("collections", {}).items()}
        # who sent it (ZMQOutput: host and pid in every message, its path as JSON now and then)
        producer = msg.get("producer")
        if producer is not None and not (isinstance(producer, dict) and isinstance(producer.get("host"), str)
                                         and isinstance(producer.get("pid"), int)):
            raise ValueError("batch message: producer must be {host: str, pid: int}")
        self.producer = None if producer is None else (producer["host"], producer["pid"])
        self.provenance = msg.get("provenance")
        if self.provenance is not None and not isinstance(self.provenance, str):
            raise ValueError("batch message: provenance must be a string (JSON)")
        # consistent before anything is built from it (a stray or damaged message must not crash
        # the collector, nor put rows under the wrong events)
        n = self.n
        if n < 0 or any(len(self.meta.get(k, ())) != n for k in META_COLUMNS) or (
                self.seq is not None and len(self.seq) != n):
            raise ValueError(f"batch message: the metadata {', '.join(META_COLUMNS)} must each have n = {n} entries")
        for name, (counts, cols) in self.collections.items():
            if len(counts) != n or (counts < 0).any() or any(len(a) != int(counts.sum()) for a in cols.values()):
                raise ValueError(f"batch message: collection {name!r} does not match its counts")
        if any(not 0 <= i < n for i in list(self.rejections) + list(self.errors) + list(self.discards)):
            raise ValueError("batch message: rejection, error or discard index out of range")
        if not all(isinstance(r, str) and r for r in self.discards.values()):
            raise ValueError("batch message: a discard needs a reason (a non-empty string)")


def fill_batch(batch, parts: list[DecodedBatch], keeps: list[np.ndarray]):
    """Fill an empty EventBatch with the kept events of decoded messages (concatenated)."""
    n = int(sum(int(k.sum()) for k in keeps))
    batch.resize(n)
    if n == 0:
        return
    for name in META_COLUMNS:
        if name != "error_flags" and all(name in p.meta for p in parts):  # flags: from the reasons below
            getattr(batch, name)[:] = np.concatenate([p.meta[name][k] for p, k in zip(parts, keeps)])
    # Every collection of any part: a message without one (a worker's batch whose every event failed in
    # the module that makes it: one event, at a low rate) gives its events none of its rows, as
    # EventBatch::concat does; taking only the collections of every message dropped the clusters of all
    # the events merged with it. The columns: those of every message that has the collection.
    names = set().union(*[set(p.collections) for p in parts])
    for name in sorted(names):
        counts_l, cols_l = [], {}
        colnames = set.intersection(*[set(p.collections[name][1]) for p in parts if name in p.collections])
        for p, k in zip(parts, keeps):
            if name not in p.collections:
                counts_l.append(np.zeros(int(k.sum()), np.int64))
                continue
            counts, cols = p.collections[name]
            counts_l.append(counts[k])
            row_keep = np.repeat(k, counts)
            for c in colnames:
                cols_l.setdefault(c, []).append(cols[c][row_keep])
        counts = np.concatenate(counts_l).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        batch.add_collection(name, offsets, {c: np.concatenate(v) for c, v in cols_l.items()})
    # Rejections, module errors and discards, renumbered to the kept events (they set the error flags; a flag
    # that came without its reason keeps a generic one, so that the event is still counted as such).
    from eclreco import _core

    base = 0
    for p, k in zip(parts, keeps):
        newidx = np.cumsum(k) - 1
        for i, (reason, detail) in p.rejections.items():
            if k[i]:
                batch.reject(base + int(newidx[i]), reason, detail)
        for i, m in p.errors.items():
            if k[i]:
                batch.flag_error(base + int(newidx[i]), m)
        for i, r in p.discards.items():
            if k[i]:
                batch.discard(base + int(newidx[i]), r)
        flags = p.meta.get("error_flags")
        unexplained = [] if flags is None else [
            (_core.ERROR_REJECTED, p.rejections,
             lambda j: batch.reject(j, "rejected_upstream", "flagged rejected without a reason")),
            (_core.ERROR_MODULE, p.errors, lambda j: batch.flag_error(j, "module error upstream (no message)")),
            (_core.ERROR_DISCARDED, p.discards, lambda j: batch.discard(j, "discarded_upstream"))]
        for bit, explained, mark in unexplained:
            for i in np.flatnonzero(k & ((flags & bit) != 0)).tolist():
                if i not in explained:
                    mark(base + int(newidx[i]))
        base += int(k.sum())
