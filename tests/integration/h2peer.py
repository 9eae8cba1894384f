"""A scripted HTTP/2 (h2c) server on real sockets, for tests of pyproxy's
HTTP/2 upstream side against peers that misbehave: the ``h2`` library's
server-side state machine for what is well-formed, hand-built frames
(``hyperframe``) for what is not.

One thread per accepted connection runs ``script(conn)``; the script reads
requests with ``conn.next_request()`` and answers them (or not) as it likes.
Blocking sockets, so a test can also make a peer that stops reading.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any, Self

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


class PeerConn:
    """One accepted connection, seen from the server side."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.h2.initiate_connection()
        self.lock = threading.Lock()
        self.events: list[Any] = []
        self.taken: set[int] = set()
        self.closed = False
        self.goaway: h2.events.ConnectionTerminated | None = None  # the first one
        self.goaways: list[int] = []  # the error codes of every GOAWAY received
        self.remote_settings: dict[int, int] = {}
        self.received: dict[int, int] = {}  # request body bytes per stream
        self.window_updates: dict[int, int] = {}  # WINDOW_UPDATE increments per stream (0: connection)
        self.flush()

    # -- input --------------------------------------------------------------

    def pump(self, timeout: float = 0.05, ack: bool = True) -> list[Any]:
        """Read what is there (up to ``timeout``) and process it. Request
        DATA is acknowledged unless ``ack`` is false."""
        if self.closed:
            return []
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return []
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return []
        try:
            new = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return []
        for ev in new:
            if isinstance(ev, h2.events.DataReceived):
                self.received[ev.stream_id] = self.received.get(ev.stream_id, 0) + len(ev.data)
                if ack and ev.flow_controlled_length:
                    try:
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    except h2.exceptions.StreamClosedError:
                        pass
            elif isinstance(ev, h2.events.ConnectionTerminated):
                if self.goaway is None:
                    self.goaway = ev
                self.goaways.append(ev.error_code)
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                for code, change in ev.changed_settings.items():
                    self.remote_settings[int(code)] = change.new_value
            elif isinstance(ev, h2.events.WindowUpdated):
                self.window_updates[ev.stream_id] = self.window_updates.get(ev.stream_id, 0) + ev.delta
        self.events.extend(new)
        self.flush()
        return new

    def wait(self, until: Callable[[], bool], limit: float = 10.0, ack: bool = True) -> bool:
        """Pump until ``until()`` holds; False if the connection closed first
        or ``limit`` seconds passed."""
        import time

        deadline = time.monotonic() + limit
        while not until():
            if self.closed or time.monotonic() > deadline:
                return until()
            self.pump(ack=ack)
        return True

    def next_request(self, limit: float = 10.0) -> tuple[int, dict[bytes, bytes]] | None:
        found: list[tuple[int, dict[bytes, bytes]]] = []

        def got() -> bool:
            for ev in self.events:
                if isinstance(ev, h2.events.RequestReceived) and ev.stream_id not in self.taken:
                    found.append((ev.stream_id, dict(ev.headers)))
                    return True
            return False

        if not self.wait(got, limit):
            return None
        sid, headers = found[0]
        self.taken.add(sid)
        return sid, headers

    def ended(self, sid: int) -> bool:
        return any(isinstance(e, h2.events.StreamEnded) and e.stream_id == sid for e in self.events)

    def was_reset(self, sid: int) -> bool:
        return any(isinstance(e, h2.events.StreamReset) and e.stream_id == sid for e in self.events)

    # -- output -------------------------------------------------------------

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.raw(data)

    def raw(self, data: bytes) -> None:
        with self.lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass  # (closed by the proxy: pump() reads what it said first)

    def respond(self, sid: int, body: bytes = b"ok", status: int = 200,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.h2.send_headers(sid, [(b":status", str(status).encode()), *(headers or []),
                                   (b"content-length", str(len(body)).encode())], end_stream=not body)
        if body:
            self.send_body(sid, body, end=True)
        self.flush()

    def send_body(self, sid: int, body: bytes, end: bool, ack: bool = True) -> bool:
        """Send ``body`` as the windows admit, waiting for WINDOW_UPDATEs;
        False if the connection or the stream ended first."""
        sent = 0
        while sent < len(body):
            try:
                window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            except (h2.exceptions.StreamClosedError, KeyError):
                return False
            if window <= 0:
                if self.closed or self.was_reset(sid):
                    return False
                self.pump(ack=ack)
                continue
            n = min(window, len(body) - sent)
            self.h2.send_data(sid, body[sent:sent + n], end_stream=end and sent + n == len(body))
            sent += n
            self.flush()
        if not body and end:
            self.h2.end_stream(sid)
            self.flush()
        return True

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


class H2Peer:
    """Listens on 127.0.0.1; ``script(conn)`` runs in a thread per connection."""

    def __init__(self, script: Callable[[PeerConn], None]) -> None:
        self.script = script
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.conns: list[PeerConn] = []
        self.errors: list[BaseException] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        self.listener.close()
        for c in self.conns:
            c.close()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = PeerConn(sock)
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: PeerConn) -> None:
        try:
            self.script(conn)
        except Exception as exc:  # noqa: BLE001 (reported by the test that reads .errors)
            if not conn.closed and not self.stopping:
                self.errors.append(exc)


def h2_service_entry(port: int, name: str = "h2svc") -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}]
  ports: [{{number: 9090, name: http2, protocol: HTTP2}}]
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{http2: {port}}}
"""
