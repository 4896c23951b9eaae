"""atheris fuzz harnesses for the envelope decoder and the payload unpacker.

    python fuzz/harness.py envelope [-runs=N] [libFuzzer options]
    python fuzz/harness.py payload  [-runs=N]

The extension is taken from ECLRECO_CORE (a path to a _core*.so, e.g. the coverage-instrumented
ASan + UBSan build made by fuzz/build_sanitized.sh) or else from the installed package.
ECLRECO_FUZZ_CORPUS names a corpus directory (created and seeded with valid inputs). A harness
fails only on a crash, a sanitizer report or an exception other than the decoder's ValueError;
rejections with a reason are the expected outcome for malformed input.
"""
from __future__ import annotations

import importlib.util
import os
import struct
import sys

import atheris
import msgpack


def load_core():
    path = os.environ.get("ECLRECO_CORE")
    if not path:
        from eclreco import _core

        return _core
    spec = importlib.util.spec_from_file_location("_core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


core = load_core()
REASON_PREFIXES = None


def check_reason(err: ValueError) -> None:
    # Every rejection carries "reason: detail" with a non-empty reason code (caught as core.RawDataRejection only:
    # any other ValueError, an argument error, is a finding).
    text = str(err)
    reason = text.split(":", 1)[0]
    if not reason or " " in reason:
        raise AssertionError(f"rejection without a reason code: {text!r}")


# Python-level coverage of the harness: with a build that has no native coverage (the normal
# g++ build of CI) libFuzzer would otherwise see no feature at all and stop at once ("no
# interesting inputs were found"); with the clang fuzz build it only adds a few edges.
@atheris.instrument_func
def fuzz_envelope(data: bytes) -> None:
    try:
        env = core.decode_envelope(data)
    except core.RawDataRejection as err:
        check_reason(err)
        return
    # A decoded envelope's payload lies inside the message, and so do the bytes of its run and evt
    # ints (the DAQ emulator's loop rewrites them).
    off, size = env["payload_offset"], env["payload_size"]
    assert 0 <= off and off + size <= len(data), (off, size, len(data))
    for key in ("run", "evt"):
        off, size = env[key + "_offset"], env[key + "_size"]
        assert 0 < off and off + size <= len(data) and size in (1, 2, 3, 5, 9), (key, off, size, len(data))
        assert msgpack.unpackb(data[off:off + size]) == env[key], key


def _channel_maps():
    """Per detector, a channel map other than the linear one (a conditions override): the cells
    in reverse address order, every 7th on a collector the linear map leaves unused."""
    maps = {}
    for detector, n_cells in (("belle2-ecl", 8736), ("array30", 900)):
        rows = []
        for k in range(n_cells):
            i = n_cells - 1 - k
            rows.append((i // 192 + 1, (i % 192) // 16 + 1, i % 16) if k % 7 else (200 + k // 192 % 50, k // 16 % 12 + 1, k % 16))
        maps[detector] = rows
    return maps


CHANNEL_MAPS = _channel_maps()


@atheris.instrument_func
def fuzz_payload(data: bytes) -> None:
    if not data:
        return
    # first byte: bit 0 the detector, bit 1 the spec's linear map or a conditions' channel map
    detector = "array30" if data[0] & 1 else "belle2-ecl"
    channel_map = CHANNEL_MAPS[detector] if data[0] & 2 else None
    payload = data[1:]
    try:
        digits = core.unpack_payload(payload, detector, None, None, channel_map)
    except core.RawDataRejection as err:
        check_reason(err)
        return
    cells = digits["cell"]
    n_cells = 900 if detector == "array30" else 8736
    assert len(cells) <= len(payload) // 4
    assert all(1 <= c <= n_cells for c in cells.tolist())
    assert all(a < b for a, b in zip(cells.tolist(), cells.tolist()[1:]))


def seed_corpus(kind: str) -> list[bytes]:
    """A few valid inputs so that the fuzzer starts inside the format."""
    def payload(cell_ids):
        words_by_block = {}
        for cid in cell_ids:
            i = cid - 1
            coll, shaper, ch = i // 192 + 1, (i % 192) // 16 + 1, i % 16
            words_by_block.setdefault(coll, {}).setdefault(shaper, []).append(ch)
        out = b""
        for coll, shapers in sorted(words_by_block.items()):
            words = []
            for shaper, chans in sorted(shapers.items()):
                mask = sum(1 << c for c in set(chans))
                words.append((0x10 << 24) | (shaper << 16) | mask)
                for _ in sorted(set(chans)):
                    words.append((0 << 30) | (5 << 18) | (1000 + 128))
            out += struct.pack("<I", (0xEC << 24) | (coll << 16) | len(words))
            out += struct.pack(f"<{len(words)}I", *words)
        return out

    p = payload([1, 2, 17, 200, 8736])
    if kind == "payload":
        return [b"\x00" + p, b"\x01" + payload([1, 31, 900])]
    env = {"v": 1, "exp": 0, "run": 1, "evt": 5, "det": "belle2-ecl", "ecl": p}
    import zlib

    m = msgpack.packb(env, use_bin_type=True)
    # a multipart ZeroMQ message as its receiver marks it (eclreco.raw_sockets.mark_multi_frame)
    marked = core.MULTI_FRAME_TAG + struct.pack(">3Q", 2, 10, len(m) - 10) + m
    # over the receiver's limit, and a producer's message that started with 0xc1 (recv_message)
    oversize = core.OVERSIZE_TAG + struct.pack(">Q", 16) + m
    escaped = core.VERBATIM_TAG + marked
    return [m, msgpack.packb({**env, "crc32": zlib.crc32(p), "time_ns": 123, "truth": {"a": 1}}, use_bin_type=True),
            marked, oversize, escaped]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("envelope", "payload"):
        sys.exit(__doc__)
    kind = sys.argv.pop(1)
    target = fuzz_envelope if kind == "envelope" else fuzz_payload
    corpus_dir = os.environ.get("ECLRECO_FUZZ_CORPUS")
    if corpus_dir:
        os.makedirs(corpus_dir, exist_ok=True)
        for k, s in enumerate(seed_corpus(kind)):
            with open(os.path.join(corpus_dir, f"seed{k}"), "wb") as f:
                f.write(s)
        sys.argv.append(corpus_dir)
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
