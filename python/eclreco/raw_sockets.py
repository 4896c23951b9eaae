"""The sockets that carry raw events (ZMQInput and the HLT distributor's input receive, the DAQ
emulator sends): their connection events (libzmq's socket monitor) and multipart messages, so
that nothing they drop goes unseen."""
from __future__ import annotations

import os
import socket
import struct
import sys
import termios
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from eclreco import _core

_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class ConnectionMonitor:
    """Counts connections, disconnects and refused handshakes of `sock` (attach before bind or
    connect). libzmq reports a message over ZMQ_MAXMSGSIZE only as a disconnect of that peer,
    which then reconnects at once: a rising disconnect count with a steady set of senders means
    oversized messages (a sender closing its socket counts there too). A refused handshake is a
    CURVE peer with an unknown key, or a peer without CURVE. A completed handshake (with or
    without CURVE) is a peer that messages can reach: a sender that never sees one delivered
    nothing, although its PUSH socket took every message."""

    def __init__(self, sock: zmq.Socket, hold_ipc: bool = False, track_tcp: bool = False):
        """hold_ipc: keep a duplicate of each ipc:// connection. A sender keeps them open past the socket's
        close until its peer has read them (close(keep_held=True), then hold_ipc_until_read); a receiver
        counts, when libzmq has dropped one, the bytes it left unread there (lost_bytes). track_tcp: know
        libzmq's fds of the open tcp:// connections, for a receiver's end_tcp_input."""
        self.sock = sock
        self.held: dict[int, int] = {}  # libzmq's fd of a held connection -> our duplicate of it
        self.hold_ipc = hold_ipc
        self.tcp_open: dict[int, tuple[bytes, bool]] = {} if track_tcp else None  # fd -> (endpoint, accepted)
        self.tcp_ending: dict[int, int] = {}  # libzmq's fd of a tcp:// connection end_tcp_input ended -> our dup
        self.tcp_ended: list[int] = []  # our dups of those that libzmq has closed since
        self.tcp_fin: set[int] = set()  # our dups whose connection is half-closed (shutdown SHUT_WR)
        self.lost_bytes = 0  # left unread in ipc:// connections that libzmq dropped
        self.monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                               | zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(_HANDSHAKE_FAILED))
        self.connections = self.disconnects = self.auth_failures = self.handshakes = 0
        self.started = time.monotonic()
        self.said_waiting = False

    def poll(self, timeout_s: float = 0.0) -> None:
        """Takes the events that arrived (waiting up to timeout_s for the first one)."""
        events = []
        while self.monitor is not None and self.monitor.poll(int(timeout_s * 1000)):
            timeout_s = 0.0
            events.append(recv_monitor_message(self.monitor))
        for i, ev in enumerate(events):
            if ev["event"] in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
                self.connections += 1
                # a connection already gone (its close read in the same go) is not held: its fd's number
                # may be another connection's by now
                fd = int(ev["value"])
                gone = any(e["event"] == zmq.EVENT_DISCONNECTED and int(e["value"]) == fd for e in events[i + 1:])
                if self.hold_ipc and ev["endpoint"].startswith(b"ipc://") and not gone:
                    self._hold(fd, ev["endpoint"], accepted=ev["event"] == zmq.EVENT_ACCEPTED)
                if self.tcp_open is not None and ev["endpoint"].startswith(b"tcp://") and not gone:
                    self.tcp_open[fd] = (ev["endpoint"], ev["event"] == zmq.EVENT_ACCEPTED)
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
                if self.tcp_open is not None:
                    self.tcp_open.pop(int(ev["value"]), None)
                    if (dup := self.tcp_ending.pop(int(ev["value"]), None)) is not None:
                        self.tcp_ended.append(dup)  # read out by unread_tcp_input
                self._release(int(ev["value"]), count_unread=True)
            elif ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1
            elif ev["event"] in _HANDSHAKE_FAILED:
                self.auth_failures += 1

    def say_while_unconnected(self, who: str, address: str, after_s: float = 5.0) -> bool:
        """For a socket that connects: a peer that is not there (not started yet, a wrong port, a host name
        that does not resolve) leaves it waiting without a word, since it queues what it sends. Prints once
        that `who` waits for `address` when no handshake completed within after_s of the monitor's start,
        and that it connected when one does after that. True once a handshake completed."""
        self.poll()
        if self.handshakes:
            if self.said_waiting:
                print(f"{who} connected to {address}", flush=True)
                self.said_waiting = False
            return True
        waited = time.monotonic() - self.started
        if not self.said_waiting and waited >= after_s:
            refused = f"; {self.auth_failures} handshakes refused (CURVE keys?)" if self.auth_failures else ""
            print(f"{who} waiting for {address}: no connection after {waited:.0f} s (is it running there? does the "
                  f"host name resolve?){refused}", flush=True)
            self.said_waiting = True
        return False

    def wait_for_handshake(self, timeout_s: float) -> None:
        """Until a peer has completed a handshake, or timeout_s."""
        deadline = time.monotonic() + timeout_s
        self.poll()
        while not self.handshakes and self.monitor is not None and time.monotonic() < deadline:
            self.poll(min(0.1, max(0.0, deadline - time.monotonic())))

    def _hold(self, fd: int, endpoint: bytes, accepted: bool) -> None:
        """Duplicates libzmq's fd of a new ipc:// connection (the events' value). Read after the fact, the
        number may be another file's by now: only a Unix stream socket on `endpoint`'s path is kept (our
        end of it when accepted, the peer's when connected; an abstract ipc://@NAME is not held)."""

        self._release(fd)
        try:
            dup = os.dup(fd)
        except OSError:  # closed since
            return
        try:
            with socket.socket(fileno=os.dup(dup)) as probe:
                name = probe.getsockname() if accepted else probe.getpeername()
                ok = (probe.family == socket.AF_UNIX and probe.type == socket.SOCK_STREAM
                      and name == os.fsdecode(endpoint[len(b"ipc://"):]))
        except OSError:
            ok = False
        if ok:
            self.held[fd] = dup
        else:
            os.close(dup)

    def end_tcp_input(self, end: bool = True) -> int:
        """A receiver's graceful end of its open tcp:// connections, before the socket closes them (end_input
        drives it): libzmq closes a connection with what the kernel holds for it unread (received, and what
        the sender's kernel has yet to send), which is lost on both sides without a word (the sender's libzmq
        counted it sent; ZeroMQ has no acknowledgement). end: each connection is half-closed (shutdown
        SHUT_WR on a duplicate of libzmq's fd): the sender's libzmq takes that for the connection's end and
        closes its side after what its kernel holds, which libzmq here reads to the end like any other input,
        then reports the disconnect; what the sender's libzmq had not written yet stays queued there (for its
        next connection). Not end: the connections are only taken (duplicated), for tcp_unread_bytes. The
        duplicates are held until unread_tcp_input, which counts what is left in those that the socket
        closed before their end (lost_bytes: libzmq, its queue full when the sender's close comes, drops the
        connection with what is left unread, as over ipc://). Returns how many connections libzmq has open
        (0: none left; call again, for connections made since)."""

        self.poll()
        for fd, (endpoint, accepted) in list(self.tcp_open.items()):
            dup = self.tcp_ending.get(fd)
            if dup is None:
                try:
                    dup = os.dup(fd)
                except OSError:  # closed since
                    self.tcp_open.pop(fd)
                    continue
                try:
                    with socket.socket(fileno=os.dup(dup)) as probe:
                        # the number may be another file's by now: only a TCP connection on the endpoint's port
                        port = (probe.getsockname() if accepted else probe.getpeername())[1]
                        ok = (probe.type == socket.SOCK_STREAM and probe.family in (socket.AF_INET, socket.AF_INET6)
                              and str(port) == endpoint.rsplit(b":", 1)[-1].decode())
                except OSError:
                    ok = False
                if not ok:
                    os.close(dup)
                    self.tcp_open.pop(fd)
                    continue
                self.tcp_ending[fd] = dup
            if end and dup not in self.tcp_fin:
                try:
                    with socket.socket(fileno=os.dup(dup)) as conn:
                        conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self.tcp_fin.add(dup)
        return len(self.tcp_open)

    def tcp_unread_bytes(self) -> int:
        """What the kernel holds received and unread by libzmq in the tcp:// connections taken by
        end_tcp_input (FIONREAD): more than 0 while a sender's bytes are on their way."""
        return sum(_socket_queue_bytes(dup, termios.FIONREAD) for dup in self.tcp_ending.values())

    def unread_tcp_input(self, timeout_s: float) -> int:
        """After end_tcp_input and the socket's unbind or disconnect: the bytes left in the connections that
        the socket closed before it had read them to the end, read off their duplicates until each sender
        has closed its side (it does after end_tcp_input) or timeout_s; added to lost_bytes and returned.
        Bytes, not events: libzmq stopped reading at any point of a message."""

        self.poll()
        lost, deadline = 0, time.monotonic() + timeout_s
        dups, self.tcp_ended = self.tcp_ended + list(self.tcp_ending.values()), []
        self.tcp_ending.clear()
        self.tcp_fin.clear()
        for dup in dups:
            with socket.socket(fileno=dup) as conn:
                try:
                    conn.shutdown(socket.SHUT_WR)  # (again) its sender closes its side after what it wrote
                except OSError:  # closed on both sides already (ENOTCONN): what the kernel holds is still there
                    pass
                try:
                    while (left := deadline - time.monotonic()) > 0:
                        conn.settimeout(left)
                        data = conn.recv(1 << 16)
                        if not data:
                            break
                        lost += len(data)
                except OSError:  # reset, or timed out: what came is counted
                    pass
        self.lost_bytes += lost
        return lost

    def _release(self, fd: int, count_unread: bool = False) -> None:
        """Closes our duplicate of a connection; count_unread: libzmq dropped it, and what the peer had
        written to it and libzmq not read is lost (counted in lost_bytes)."""

        dup = self.held.pop(fd, None)
        if dup is None:
            return
        if count_unread:
            self.lost_bytes += _socket_queue_bytes(dup, termios.FIONREAD)
        os.close(dup)

    def hold_ipc_until_read(self, timeout_s: float) -> int:
        """After the socket's close and its context's term: waits until the peers have read what was
        written to the held ipc:// connections, or timeout_s, then closes them; the bytes left unread
        (0: all read). Why: libzmq (4.3.5) on the reading side stops reading a connection while its
        pipe is full (ZMQ_RCVHWM reached) and, told then that the peer closed it (EPOLLHUP, which a
        Unix socket reports at once, data unread or not; TCP does not), drops the connection with
        what the kernel still holds for it unread: up to ~200 kB of events lost, without a word on
        either side. A duplicate of the connection keeps it open while libzmq closes its own."""
        deadline = time.monotonic() + timeout_s
        while (left := self.unread_ipc_bytes()) and time.monotonic() < deadline:
            time.sleep(0.01)
        for fd in list(self.held):
            self._release(fd)
        return left

    def unread_ipc_bytes(self) -> int:
        """What was written to the held ipc:// connections and not yet read by their peers, in the kernel's
        count (TIOCOUTQ: the memory of the writes, with its overhead); a connection read to the end is
        closed."""

        left = 0
        for fd, dup in list(self.held.items()):
            queued = _socket_queue_bytes(dup, termios.TIOCOUTQ)  # written, not yet read by the peer
            if queued == 0:
                self._release(fd)
            left += queued
        return left

    def close(self, keep_held: bool = False) -> None:
        """Stops monitoring; keep_held: the held ipc:// connections stay open (hold_ipc_until_read closes
        them)."""
        if self.monitor is not None:
            self.poll()
            self.sock.disable_monitor()
            self.monitor.close(0)
            self.monitor = None
        for fd in list(self.held) if not keep_held else ():
            self._release(fd)

        for dup in self.tcp_ended + list(self.tcp_ending.values()):  # not read out (unread_tcp_input)
            os.close(dup)
        self.tcp_ended, self.tcp_ending, self.tcp_fin = [], {}, set()

    def say_lost(self, who: str, address: str, before: int, at_end: bool = False) -> None:
        """Prints (stderr) what was lost in dropped connections since lost_bytes was `before`; at_end: at the end
        of the input (end_input), whose close also tears down the tcp:// connections that still held some."""
        if self.lost_bytes > before:
            why = ("libzmq dropped a connection that the sender closed while this input's queue was full "
                   "(rcvhwm reached; an ipc:// sender must keep its connection open until its events are read, "
                   "docs/deployment.md)")
            if at_end:
                why = f"the end of the input closed connections that still held them (tcp://), or {why}"
            print(f"{who} error: {self.lost_bytes - before} bytes of events sent to {address} were lost unread: "
                  f"{why}; {self.lost_bytes} bytes in all", file=sys.stderr, flush=True)

    def counters(self) -> dict:
        return {"disconnects": float(self.disconnects), "connections": float(self.connections),
                "auth_failures": float(self.auth_failures), "lost_bytes_at_disconnect": float(self.lost_bytes)}


def count_queued(sock: zmq.Socket, limit: int = 10_000_000, keep=None) -> int:
    """Reads what `sock` holds now, unprocessed (a receiver's end: what no run will take); how many
    messages (a multipart message counts once), at most `limit`. keep: called with each message, as
    recv_message returns it (the distributor's quarantine of them)."""
    n = 0
    try:
        while n < limit:
            msg = recv_message(sock)
            if keep is not None:
                keep(msg)
            n += 1
    except zmq.Again:
        pass
    return n


# A sender's libzmq writes what it holds without pausing: an input connection quiet this long (nothing queued,
# nothing unread in the kernel) has nothing more on its way, and its end brings no more than the sender's close.
INPUT_QUIET_S = 0.05


def end_input(sock: zmq.Socket, monitor: ConnectionMonitor, detach, force_after_s: float, max_s: float = 10.0,
              keep=None) -> int:
    """A receiver's end of its input (ZMQInput's terminate, the distributor's): what its sockets and connections
    hold when it stops reading, read and counted here (not processed), so that none of it goes uncounted.
    Returns how many messages it read (a multipart message counts once).

    The tcp:// connections (monitor made with track_tcp) are ended (end_tcp_input) once the input has been
    quiet for INPUT_QUIET_S; a source that sends on, once force_after_s has passed and what it had sent is
    read, and one faster than this reads 1 s later. Meanwhile the socket is read as fast as messages come.
    Ended while the sender still writes its backlog, a receive queue that fills (its high-water mark: 16
    messages at ZMQInput's default byte bound) stops libzmq reading the connection, and the sender's close
    then makes libzmq drop it with what the kernel held (counted in bytes only), while the sender's libzmq
    drops the batch it had not written yet (up to 8 kB, in no count). Then `detach()` unbinds
    or disconnects the socket (nothing more comes), what it holds is read until quiet (at most max_s from the
    start), and monitor.unread_tcp_input counts in bytes what a connection closed before its end left unread
    (monitor.lost_bytes). keep: called with each message read (count_queued)."""
    n = 0
    t0 = quiet_since = time.monotonic()
    while True:
        got = count_queued(sock, keep=keep)
        now = time.monotonic()
        unread = monitor.tcp_unread_bytes()
        if got or unread:
            quiet_since = now
        n += got
        waited = now - t0
        # a source that sends on: after force_after_s, at a moment when all it had sent is read (it then writes
        # what it sends as it sends it); one faster than this is read, 1 s later whatever it holds
        end = (now - quiet_since >= INPUT_QUIET_S or (waited >= force_after_s and not (got or unread))
               or waited >= force_after_s + 1.0)
        if not monitor.end_tcp_input(end=end) or waited >= force_after_s + 2.0:
            break  # none open any more (a sender closes at once when ended; 1 s more for one that is stopped)
        sock.poll(1, zmq.POLLIN)
    try:
        detach()
    except zmq.ZMQError:
        pass
    while True:
        n += count_queued(sock, keep=keep)
        # what the closed connections had delivered is in the socket's queue by now
        if time.monotonic() - t0 >= max_s or not sock.poll(int(INPUT_QUIET_S * 1000), zmq.POLLIN):
            break
    monitor.unread_tcp_input(2.0)  # a sender closes its side at once when told (end_tcp_input)
    return n


def _socket_queue_bytes(fd: int, request: int) -> int:
    """The bytes a socket's queue holds, as ioctl `request` counts them (FIONREAD: received, not read;
    TIOCOUTQ: written, not read by the peer); 0 when it cannot say (a closed connection)."""
    import array
    import fcntl

    n = array.array("i", [0])
    try:
        fcntl.ioctl(fd, request, n)
    except OSError:
        return 0
    return n[0]


def mark_multi_frame(frames) -> bytes:
    """The in-band form of a multipart message (cpp/ecl/envelope.hpp, kMultiFrameTag): the tag,
    the frame count and each frame's size (uint64 big-endian), then the frames. No envelope starts
    like this (0xc1 starts no MessagePack object); the envelope decoder rejects it as multi_frame,
    also in an HLT worker after the distributor forwarded it, and the quarantine keeps it."""
    sizes = [len(f) for f in frames]
    return b"".join([_core.MULTI_FRAME_TAG, struct.pack(f">{len(sizes) + 1}Q", len(sizes), *sizes), *frames])


def as_sent(msg: bytes) -> bytes:
    """A message as its producer sent it, from what recv_message returned: its escape (VERBATIM_TAG) taken off,
    as RejectedOutput does; a multipart message's mark stays (it holds the frame boundaries)."""
    tag = _core.VERBATIM_TAG
    return msg[len(tag):] if msg.startswith(tag) else msg


# The transports a job's input can be read from by another process (inproc:// is one process's own)
STREAM_TRANSPORTS = ("tcp://", "ipc://")


def is_stream_address(name: str | None) -> bool:
    """Whether an input name is a ZeroMQ address (tcp://HOST:PORT, ipc://PATH) rather than a file."""
    return (name or "").startswith(STREAM_TRANSPORTS)


def tcp_port(address: str) -> str | None:
    """The port part of a tcp://HOST:PORT address as written ('' without one); None for the other
    transports."""
    if not (address or "").startswith("tcp://"):
        return None
    return address.rsplit(":", 1)[-1] if ":" in address[6:] else ""


def check_address(address: str) -> None:
    """ValueError for what libzmq would misread: tcp://127.0.0.1:99999 is taken for port 34463 (the
    number modulo 2^16) without an error, and a job would wait on a port nobody sends to; an address
    without a transport is named as such (libzmq's EINVAL, "Invalid argument", does not say what is
    wrong with it)."""
    if "://" not in (address or ""):
        raise ValueError(f"ZeroMQ address {address!r} has no transport: write tcp://HOST:PORT "
                         "(or ipc://PATH, inproc://NAME)")
    port = tcp_port(address)
    if port is not None:
        if port != "*" and not (port.isdigit() and int(port) <= 65535):
            raise ValueError(f"ZeroMQ address {address!r}: the port must be 0..65535 or * (tcp://HOST:PORT)")


def _ipc_listened_on(path: str) -> bool:
    """Whether a live process listens on the socket file `path` (a connect is answered; the file of a
    process that died, or of one killed, is not)."""

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _tcp_port_taken(address: str) -> bool:
    """Whether binding tcp://HOST:PORT (a numbered port) would fail with "Address already in use": a
    probe bind with SO_REUSEADDR, as libzmq binds (a port of closed connections in TIME_WAIT is free). A
    host this cannot resolve (libzmq also takes interface names: eth0) is left to libzmq."""
    import errno

    host, _, port = address[len("tcp://"):].rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return False
    host = host.strip("[]")
    try:  # libzmq binds IPv4 (its IPV6 option off): '*' is 0.0.0.0, a name its IPv4 address
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            "0.0.0.0" if host in ("*", "") else host, int(port), socket.AF_INET6 if ":" in host else socket.AF_INET,
            socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
    except (OSError, IndexError):
        return False
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(sockaddr)
        return False
    except OSError as err:
        return err.errno == errno.EADDRINUSE
    finally:
        s.close()


# What to say of an address another process holds: a TCP port, an ipc:// socket file, another (ipc://@NAME)
_IN_USE = {"tcp://": "another process listens there (one already running?); stop it, or choose another port",
           "ipc://": "another process listens there (one already running?): binding would take its socket file "
                     "over and leave that process without senders; stop it, or choose another path",
           "": "another process listens there (one already running?); stop it, or choose another address"}


def address_in_use(address: str) -> str:
    """Why binding `address` would fail or do harm, '' when it would not: a TCP port another process
    listens on (libzmq fails with "Address already in use"), or an ipc:// socket file a live process
    listens on. libzmq binding such a file unlinks it and binds a new one, without an error: the first
    process stays up, bound to a file that is gone, and no new sender reaches it (a second farm or
    `reco.py -i ipc://PATH` took a running one's stream over without a word). The socket file of a
    process that died is free (a collector restarted on its address by `hlt run`); an abstract address
    (ipc://@NAME) is refused by the kernel itself, with "Address already in use"."""

    address = address or ""
    if address.startswith("tcp://"):
        return _IN_USE["tcp://"] if _tcp_port_taken(address) else ""
    path = address[len("ipc://"):] if address.startswith("ipc://") else ""
    if not path or path == "*" or path.startswith("@") or not os.path.exists(path):
        return ""
    return _IN_USE["ipc://"] if _ipc_listened_on(path) else ""


def bind_error(address: str) -> str:
    """Why binding `address` would fail or do harm, '' when it would not: an ipc:// socket file in a folder that
    does not exist (libzmq: 'No such file or directory for ipc path', naming no option), or address_in_use."""
    from eclreco.paths import missing_folder

    path = address[len("ipc://"):] if (address or "").startswith("ipc://") else ""
    if path and path != "*" and not path.startswith("@") and (folder := missing_folder(path)):
        return f"no directory {folder!r} for the socket file"
    return address_in_use(address)


class AddressInUse(OSError):
    """A bind refused because another process holds the address (address_in_use; errno EADDRINUSE), or because
    the folder of its ipc:// socket file does not exist (bind_error; errno ENOENT)."""

    def __init__(self, address: str, what: str, why: str):
        import errno

        self.address, self.what = address, what
        code = errno.ENOENT if why.startswith("no directory") else errno.EADDRINUSE
        super().__init__(code, f"{what}{' ' if what else ''}{address!r}: {why}")

    def __str__(self):
        return self.strerror


def attach(sock: zmq.Socket, address: str, bind: bool, what: str = "") -> None:
    """Bind or connect `sock`, after check_address. A bind refuses an address another process holds
    (AddressInUse, naming `what`: the option or parameter that gave the address), where libzmq would take an
    ipc:// socket file over (address_in_use) or fail with a bare "Address already in use", and an ipc:// address
    in a folder that does not exist (bind_error)."""
    check_address(address)
    if bind and address.startswith("ipc://") and (why := bind_error(address)):
        raise AddressInUse(address, what, why)
    try:
        (sock.bind if bind else sock.connect)(address)
    except zmq.ZMQError as err:
        if not bind or err.errno != zmq.EADDRINUSE:
            raise
        raise AddressInUse(address, what, _IN_USE["tcp://" if address.startswith("tcp://") else ""]) from None


def check_message_limits(who: str, max_bytes: int, refuse_bytes: int,
                         names: tuple[str, str] = ("max_message_bytes", "refuse_message_bytes")) -> None:
    """The two size limits of a raw-event input: above max_bytes a message is rejected and kept
    (mark_oversize), above refuse_bytes the socket refuses it unread (ZMQ_MAXMSGSIZE). `names`: what the
    caller calls them (a command line's options); `who` ('' for none) begins the message."""
    if max_bytes > 0 and 0 < refuse_bytes <= max_bytes:
        raise ValueError(f"{who}{': ' if who else ''}{names[1]} ({refuse_bytes}) must exceed {names[0]} ({max_bytes}) "
                         "or be 0: messages between the two would be refused with their connection instead of "
                         "rejected and kept")


def check_queue_bound(who: str, queue_bytes: int, refuse_bytes: int,
                      names: tuple[str, str] = ("max_queue_bytes", "refuse_message_bytes")) -> None:
    """ZMQInput's byte bound on its receive queue: libzmq counts the queue in messages, so the bound is
    queue_bytes // refuse_bytes messages of up to refuse_bytes each, which needs a refuse_bytes."""
    if queue_bytes > 0 and refuse_bytes == 0:
        raise ValueError(f"{who}{': ' if who else ''}{names[0]} bounds the receive queue through {names[1]} (the largest "
                         f"message it can hold), which is 0 (no limit): set {names[1]}, or {names[0]} 0 (no bound)")


def queue_hwm(hwm: int, queue_bytes: int, refuse_bytes: int) -> int:
    """The receive high-water mark that bounds a connection's queue in bytes (check_queue_bound): hwm
    messages, lowered so that messages of up to refuse_bytes each hold at most queue_bytes (at least 1);
    hwm itself when either is 0 (no bound; an hwm of 0 is libzmq's unlimited)."""
    if not queue_bytes or not refuse_bytes:
        return hwm
    cap = max(1, queue_bytes // refuse_bytes)
    return cap if hwm == 0 else min(hwm, cap)


def mark_oversize(message: bytes, limit: int) -> bytes:
    """The in-band form of a message over the receiver's limit (cpp/ecl/envelope.hpp,
    kOversizeTag): the tag, the limit (uint64 big-endian), the whole message. The envelope decoder
    rejects it as oversize, with the identifiers it can read, and the quarantine keeps it."""
    return b"".join([_core.OVERSIZE_TAG, struct.pack(">Q", limit), message])


def recv_message(sock: zmq.Socket, flags: int = zmq.NOBLOCK, max_bytes: int = 0) -> bytes:
    """One message as one bytes object (zmq.Again when none is waiting). The wire format sends one
    event per message in a single frame: a multipart message comes back marked (mark_multi_frame),
    so that the envelope decoder rejects it as multi_frame, with its frames kept, instead of the
    joined frames passing for an event (an envelope split over two frames, or one beside an empty
    frame) or each frame for an event of its own. A single-frame message of more than max_bytes
    (> 0) comes back marked too (mark_oversize): rejected and kept, where the socket's own limit
    would drop the sender's connection and the events behind the message on it. A single-frame
    message that starts with 0xc1, the marks' first byte, comes back escaped behind
    _core.VERBATIM_TAG, so that no producer's bytes pass for a mark."""
    # A Frame's `more` instead of getsockopt(RCVMORE): pyzmq's getsockopt costs ~0.8 µs, more than
    # the receive (0.4 µs for bytes, 0.86 µs for a Frame and its bytes; 5.75 kB messages).
    frame = sock.recv(flags, copy=False)
    if not frame.more:
        msg = frame.bytes
        if 0 < max_bytes < len(msg):
            return mark_oversize(msg, max_bytes)
        # A producer's message that starts like a mark (0xc1, as no envelope does) is escaped, so
        # that it is rejected as what it is (not_msgpack) and not under a mark's reason.
        return _core.VERBATIM_TAG + msg if msg[:1] == b"\xc1" else msg
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(copy=False)
        frames.append(frame.bytes)
    return mark_multi_frame(frames)
