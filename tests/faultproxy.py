"""A TCP proxy on loopback that can hold a reply: the request reaches the server (a write
lands) while its answer arrives late, past the caller's deadline. Threads and blocking
sockets, so a test drives it from any thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_port``. ``hold_next_reply(s)`` delays the next
    chunk any upstream connection sends back by ``s`` seconds; ``blackhole(True)`` accepts
    connections and bytes but forwards nothing either way until ``blackhole(False)`` (a
    network partition: no error, no answer); ``sent`` is every byte the clients sent."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._hold_s = 0.0
        self.held = 0
        self.sent = bytearray()
        self._socks: list[socket.socket] = []
        self._closed = False
        self._open = threading.Event()
        self._open.set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold_next_reply(self, seconds: float) -> None:
        with self._lock:
            self._hold_s = seconds

    def blackhole(self, on: bool) -> None:
        if on:
            self._open.clear()
        else:
            self._open.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._socks.append(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()  # in a blackout the client's connection is accepted, and that is all
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self._lock:
            self._socks.append(upstream)
        threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(1 << 16):
                self._open.wait()
                if from_client:
                    with self._lock:
                        self.sent += chunk
                else:
                    with self._lock:
                        hold, self._hold_s = self._hold_s, 0.0
                    if hold:
                        self.held += 1
                        time.sleep(hold)
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()
