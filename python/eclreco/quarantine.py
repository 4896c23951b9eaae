"""Quarantine files: the rejected raw events that RejectedOutput keeps (`reco.py -i`, the HLT
workers' `--rejected`). Each record is a MessagePack map {reason, detail, message (the bytes as
sent), exp/run/evt where they could be read}, back to back.

    eclreco quarantine FILE...                   records per reason, with the first detail of each
    eclreco quarantine FILE... --list            one line per record
    eclreco quarantine FILE... --extract OUT     the messages, back to back: a raw file to replay
                                                 (reco.py -i OUT, eclreco daq-emulator --input OUT)

A farm worker's records carry the distributor's sequence id (`seq`). An event redelivered after its
worker died is rejected, and kept, again by the worker that takes it: the records of one sequence id
and one message, in any of the files read, are one rejected event, counted and extracted once; the
others are counted as repeats.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import stat
import sys
from typing import Iterator

import msgpack

from eclreco.cli_types import input_file
from eclreco.paths import OutputsChangedError, StagedOutputs, output_file_error, output_states
from eclreco.wording import count

# --list pads the reason to this: the longest of eclreco's own (duplicate_collector); the records are
# listed as they are read, so the width cannot come from the file
LIST_REASON_WIDTH = 19


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """The records of one quarantine file, in the order they were rejected; a file that is not one,
    or that ends inside a record (cut short), is an error that says at which byte."""
    name = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=0)
        end = 0  # where the last whole record ends: tell() at the end of the iteration can count a cut one
        try:
            for rec in unpacker:
                end = unpacker.tell()
                if not isinstance(rec, dict) or "reason" not in rec or not isinstance(rec.get("message"), bytes):
                    raise ValueError(f"{name}: the object ending at byte {end} is no quarantine "
                                     "record (a map with reason, detail, message): is this a quarantine file?")
                yield rec
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
            raise ValueError(f"{name}: not MessagePack after byte {end} ({err})") from None
        if end != size:
            raise ValueError(f"{name}: ends inside a record (the last {count(size - end, 'byte')})")


class RecordWriter:
    """Appends quarantine records to `path` (made at the first record, appended to when it exists; '' keeps none),
    the messages of at most `max_bytes` in all (0: no bound): the records of a process that has no module chain (the
    HLT distributor's unread_at_terminate). A record that would pass the bound, every one after it, and every one
    after a failed write (`error`: the file is cut back to the complete records, as RejectedOutput's) are counted
    in `not_kept`, not written."""

    def __init__(self, path: str, max_bytes: int = 0):
        self.path, self.max_bytes = path, max_bytes
        self.kept = self.kept_bytes = self.not_kept = 0
        self.full = False  # the bound was reached
        self.error = ""
        self._f = None
        self._good = 0  # the file's size after its last complete record

    def add(self, reason: str, detail: str, message: bytes, ids: dict | None = None) -> bool:
        """ids: the message's exp/run/evt, in the record where they could be read (rawdata.envelope_ids)."""
        if self.path and not self.error and self.max_bytes and self.kept_bytes + len(message) > self.max_bytes:
            self.full = True  # (the records after it too: the file keeps the first ones, in order)
        if not self.path or self.error or self.full:
            self.not_kept += 1
            return False
        rec = msgpack.packb({"reason": reason, "detail": detail, "message": message, **(ids or {})},
                            use_bin_type=True)
        try:
            if self._f is None:
                self._f = open(self.path, "ab", buffering=0)  # unbuffered: a failed write is seen at its record
                self._good = self._f.seek(0, os.SEEK_END)
            view = memoryview(rec)
            while view:
                view = view[self._f.write(view):]
        except OSError as err:
            self._fail(err)
            self.not_kept += 1
            return False
        self._good += len(rec)
        self.kept += 1
        self.kept_bytes += len(message)
        return True

    def _fail(self, err: OSError) -> None:
        self.error = (f"cannot write quarantine file {self.path!r}: {err.strerror or err} (kept the "
                      f"{count(self.kept, 'complete record')} before it)")
        if self._f is not None:
            try:
                self._f.truncate(self._good)
            except OSError:
                pass
            self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def repeat_key(rec: dict):
    """What makes two records one rejected event: the same sequence id (the HLT distributor's, which a
    redelivery keeps) and the same message; None for a record without one (reco.py's: no redelivery)."""
    if "seq" not in rec:
        return None
    return rec["seq"], hashlib.blake2b(rec["message"], digest_size=16).digest()


def _ids(rec: dict) -> str:
    return " ".join(f"{k} {rec[k]}" for k in ("exp", "run", "evt") if k in rec) or "(no exp/run/evt)"


def _is_stdout(st: os.stat_result) -> bool:
    """Whether `st` is the file (pipe, terminal, file) this process's stdout writes to."""
    try:
        return os.path.samestat(st, os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no stdout, or one without a file descriptor (a test's)
        return False


def _run(args) -> int:
    reasons = set(args.reason or ())
    counts: collections.Counter = collections.Counter()
    first: dict[str, dict] = {}
    n_bytes = 0
    every_reason: set[str] = set()  # of every record read, for a --reason that matches none
    seen: set = set()  # repeat_key of the records counted
    repeats = 0
    if args.extract and (why := output_file_error(args.extract, "--extract")):  # not the temporary file's name
        raise ValueError(why)
    if args.extract and os.path.exists(args.extract) and any(
            os.path.exists(p) and os.path.samefile(p, args.extract) for p in args.files):
        # opening OUT for writing would empty that input before it is read: its records would be gone
        raise ValueError(f"--extract {args.extract!r} is one of the quarantine files read: use another file")
    # A file OUT is written under a temporary name and renamed at the end: an input that is missing or
    # broken leaves an existing OUT as it was, never emptied or half-written. Through a symlink the target
    # is that file (the link stays). A pipe or a device is written directly, and OUT that is this process's
    # stdout (`--extract /dev/stdout | ...` or `> FILE`) through sys.stdout, the text going to stderr: a
    # rename put a regular file in the pipe's place (as root, in place of /dev/stdout itself), the reader
    # got nothing, and the summary was mixed into the messages.
    # (os.stat follows the links: /dev/stdout -> /proc/self/fd/1 -> a pipe, which realpath cannot name)
    st = os.stat(args.extract) if args.extract and os.path.exists(args.extract) else None
    to_stdout = st is not None and _is_stdout(st)
    direct = st is not None and (to_stdout or not stat.S_ISREG(st.st_mode))
    target = os.path.realpath(args.extract) if args.extract and not direct else ""
    text = sys.stderr if to_stdout else sys.stdout
    # OUT as it is before the inputs are read: replaced at the end only if still so, not a file put there meanwhile
    unchanged = output_states([target] if target else [])
    with StagedOutputs() as staged:
        if to_stdout:
            sys.stdout.flush()
            out = sys.stdout.buffer
        else:
            out = open(args.extract if direct else staged.path(target), "wb") if args.extract else None
        try:
            for path in args.files:
                for i, rec in enumerate(read_records(path)):
                    every_reason.add(rec["reason"])
                    if reasons and rec["reason"] not in reasons:
                        continue
                    key = repeat_key(rec)
                    if key is not None and key in seen:  # a redelivered event rejected again
                        repeats += 1
                        if args.list:
                            print(f"{path}:{i}  {rec['reason']:<{LIST_REASON_WIDTH}} {_ids(rec):<28} "
                                  f"(a repeat: seq {rec['seq']}, counted once)", file=text)
                        continue
                    if key is not None:
                        seen.add(key)
                    counts[rec["reason"]] += 1
                    first.setdefault(rec["reason"], rec)
                    n_bytes += len(rec["message"])
                    if args.list:
                        print(f"{path}:{i}  {rec['reason']:<{LIST_REASON_WIDTH}} {_ids(rec):<28} "
                              f"{len(rec['message']):>9} {'byte ' if len(rec['message']) == 1 else 'bytes'}  {rec.get('detail', '')}", file=text)
                    if out is not None:
                        out.write(rec["message"])
        finally:
            if to_stdout:
                out.flush()
            elif out is not None:
                out.close()
        try:  # a file OUT: every record read (an error above leaves OUT as it was)
            staged.publish(unchanged, "extraction")
        except OutputsChangedError as err:
            raise ValueError(f"--extract {args.extract!r}: {err}") from None
    total = sum(counts.values())
    if unmatched := sorted(reasons - every_reason):  # a misspelt reason read as "0 rejected events"
        print(f"eclreco quarantine: note: no record has reason {', '.join(map(repr, unmatched))} (the files' "
              f"reasons: {', '.join(sorted(every_reason)) or 'none'})", file=sys.stderr)
    if args.json:
        print(json.dumps({"records": total, "bytes": n_bytes, "by_reason": dict(counts.most_common()),
                          "first_detail": {r: first[r].get("detail", "") for r in counts}, "repeats": repeats}),
              file=text)
    elif not args.list:
        print(f"{count(total, 'rejected event')}, {count(n_bytes, 'byte')}, in {count(len(args.files), 'file')}"
              + (f"; {repeats} repeated record(s) not counted (a redelivered event rejected again: the same "
                 "sequence id and message)" if repeats else ""), file=text)
        width = max(map(len, counts), default=0)
        for reason, n in counts.most_common():
            rec = first[reason]
            print(f"  {reason:<{width}} {n:>8}   first: {_ids(rec)}: {rec.get('detail', '')}", file=text)
    if out is not None:
        print(f"{total} messages written to {args.extract} (a raw file: reco.py -i {args.extract})",
              file=sys.stderr)
    return 0


def _out_file(text: str) -> str:
    """--extract: a file name (an empty one, from an unset shell variable, extracted nothing, silently)."""
    if not text:
        raise argparse.ArgumentTypeError("names no file")
    return text


def add_quarantine_parser(subparsers) -> None:
    p = subparsers.add_parser("quarantine", help="list or extract the rejected raw events of quarantine files",
                              description=__doc__)
    p.add_argument("files", nargs="+", type=input_file("quarantine file"), metavar="FILE",
                   help="quarantine files (.msgpack) written by RejectedOutput")
    shown = p.add_mutually_exclusive_group()  # both on stdout: the lines made the JSON unreadable
    shown.add_argument("--list", action="store_true", help="one line per record: reason, exp/run/evt, size, detail")
    p.add_argument("--reason", action="append", help="only records of this reason (repeatable)")
    p.add_argument("--extract", type=_out_file, default=None, metavar="OUT",
                   help="write the messages as sent, back to back, to OUT (a raw file; a multi_frame record's "
                        "message keeps its mark, which a raw file reads as not_msgpack)")
    shown.add_argument("--json", action="store_true", help="the summary as one JSON object (not with --list)")
    p.set_defaults(func=_run)
