"""The output of the farm's roles: each print() in one write(2), so that a log they share keeps their lines whole.

The roles of a farm write to one log (`hlt run` gives each role its own stdout; separate services share a
journal or a file). print() writes its text and its end ("\\n") separately, and unbuffered (PYTHONUNBUFFERED=1,
`python -u`: the stream writes through to the file descriptor) each is a write(2) of its own: a line of another
process came in between, `... 287 events/s[worker] pid 7992 run ended`. Buffered, print(flush=True) happened to
make one write, up to the buffer's size. A stream of our own at each role's start covers every print of the
process (the roles', the framework's, the library's warnings) without a print-like function at each call.
"""
from __future__ import annotations

import io
import os
import sys
import threading


class WholeLines(io.TextIOBase):
    """A text stream over the file descriptor of `stream` (sys.stdout, sys.stderr): what is written is kept until it
    ends a line (print's last write, its `end`) or until flush(), then goes out in one os.write, whatever the
    buffering of `stream`. A print() of several lines ("run ended\\n{statistics}") is one write too. The encoding
    and errors are `stream`'s; what the kernel takes in part (a signal, a full pipe) is continued, and what a full
    non-blocking descriptor refuses is kept for the next write or flush, not dropped."""

    def __init__(self, stream):
        self.stream = stream
        self._fd = stream.fileno()
        self._pending: list[str] = []
        # encoded, not yet taken by the kernel: kept when os.write fails (a non-blocking descriptor that is full:
        # BlockingIOError), sent first by the next write or flush, as Python's buffered writer keeps it
        self._unwritten = bytearray()
        # the metrics server's and the event loop's threads may print too. Reentrant: a signal handler runs in the
        # thread it interrupts, which may hold it (the distributor's SIGTERM handler prints "stopping run N")
        self._lock = threading.RLock()
        self._writing = False  # _write_out is under way in the thread that holds the lock

    @property
    def encoding(self) -> str:
        return self.stream.encoding

    @property
    def errors(self) -> str:
        return self.stream.errors

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return self.stream.isatty()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            self._pending.append(text)
            if text.endswith("\n"):
                self._write_out()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._write_out()

    def _write_out(self) -> None:
        # A signal handler that prints while os.write below blocks (a full pipe) or is between its parts only adds
        # its text: it goes out after the text it interrupted, each whole. (With a plain lock it waited for its own
        # thread: the role hung.)
        if self._writing:
            return
        self._writing = True
        try:
            while self._pending or self._unwritten:
                self._unwritten += "".join(self._pending).encode(self.encoding, self.errors)
                self._pending.clear()
                while self._unwritten:
                    del self._unwritten[:os.write(self._fd, self._unwritten)]
        finally:
            self._writing = False


def whole_lines() -> None:
    """Each role calls this at its start: sys.stdout and sys.stderr become WholeLines over their file descriptors.
    A stream without one (pytest's capsys) stays as it is; a second call changes nothing."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, WholeLines):
            continue
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            continue
        stream.flush()  # what it holds goes first
        setattr(sys, name, WholeLines(stream))
