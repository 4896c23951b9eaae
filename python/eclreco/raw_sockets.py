"""The sockets that receive raw events (ZMQInput, the HLT distributor's input): their connection
events (libzmq's socket monitor) and multipart messages, so that nothing they drop goes unseen."""
from __future__ import annotations

import zmq
from zmq.utils.monitor import recv_monitor_message

_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class ConnectionMonitor:
    """Counts connections, disconnects and refused handshakes of `sock` (attach before bind or
    connect). libzmq reports a message over ZMQ_MAXMSGSIZE only as a disconnect of that peer,
    which then reconnects at once: a rising disconnect count with a steady set of senders means
    oversized messages (a sender closing its socket counts there too). A refused handshake is a
    CURVE peer with an unknown key, or a peer without CURVE."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                               | sum(_HANDSHAKE_FAILED))
        self.connections = self.disconnects = self.auth_failures = 0

    def poll(self) -> None:
        """Takes the events that arrived (non-blocking)."""
        while self.monitor is not None:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
                self.connections += 1
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
            elif ev["event"] in _HANDSHAKE_FAILED:
                self.auth_failures += 1

    def close(self) -> None:
        if self.monitor is not None:
            self.poll()
            self.sock.disable_monitor()
            self.monitor.close(0)
            self.monitor = None

    def counters(self) -> dict:
        return {"disconnects": float(self.disconnects), "connections": float(self.connections),
                "auth_failures": float(self.auth_failures)}


def recv_message(sock: zmq.Socket, flags: int = zmq.NOBLOCK) -> bytes:
    """One message as one bytes object (zmq.Again when none is waiting). The wire format sends one
    event per message in a single frame: the frames of a multipart message are joined into one
    malformed message, which the envelope decoder rejects with its reason (and keeps), instead of
    each frame passing for an event of its own."""
    # A Frame's `more` instead of getsockopt(RCVMORE): pyzmq's getsockopt costs ~0.8 µs, more than
    # the receive (0.4 µs for bytes, 0.86 µs for a Frame and its bytes; 5.75 kB messages).
    frame = sock.recv(flags, copy=False)
    if not frame.more:
        return frame.bytes
    parts = [frame.bytes]
    while frame.more:
        frame = sock.recv(copy=False)
        parts.append(frame.bytes)
    return b"".join(parts)
