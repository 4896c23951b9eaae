"""A TCP proxy process: python _tcp_proxy.py LISTEN_PORT UPSTREAM_HOST:UPSTREAM_PORT. Killing it closes every
connection through it at once, as a network glitch or `ss -K` does, while the processes on both sides live on;
started again on the same port, it takes their reconnections. It prints `ready` once it listens."""
import selectors
import socket
import sys


def main():
    port = int(sys.argv[1])
    host, upstream_port = sys.argv[2].rsplit(":", 1)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    peer = {}
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if s is lsock:
                down, _ = lsock.accept()
                try:
                    up = socket.create_connection((host, int(upstream_port)))
                except OSError:
                    down.close()
                    continue
                peer[down], peer[up] = up, down
                sel.register(down, selectors.EVENT_READ)
                sel.register(up, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(1 << 16)
            except OSError:
                data = b""
            other = peer.get(s)
            if data and other is not None:
                other.sendall(data)  # (blocking: the control link carries little)
                continue
            for x in (s, other):
                if x is not None:
                    sel.unregister(x)
                    peer.pop(x, None)
                    x.close()


if __name__ == "__main__":
    main()
