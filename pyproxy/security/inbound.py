"""The inbound listener with mutual TLS (spec §2.2): Envoy's TLS inspector
plus Istio's PERMISSIVE/STRICT filter chains, for an HTTP port.

With a workload certificate the inbound listener accepts sockets itself,
peeks at the first bytes (never consuming them) and picks, per connection:

- DISABLE: plaintext HTTP;
- PERMISSIVE: a TLS ClientHello offering an istio ALPN (istio,
  istio-peer-exchange, istio-http/1.0, istio-http/1.1, istio-h2) → mTLS + HTTP;
  plaintext → HTTP; TLS without an istio ALPN → closed (no filter chain
  matches an HTTP port, as in Istio);
- STRICT: any ClientHello → mTLS + HTTP; plaintext → closed.

The mTLS handshake requires a client certificate that chains to the mesh
root and carries a ``spiffe://TRUST_DOMAIN/`` URI SAN. The peek waits at most
``--request-header-timeout`` for a complete ClientHello (at most 64 KiB, like
Envoy's inspector) and the handshake gets the same bound: a client that
trickles or never finishes is cut off, others are served meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any

from .certs import ISTIO_ALPNS, TLS_STATS, parse_spiffe, uri_sans
from .clienthello import MAX_CLIENT_HELLO, NEED_MORE, NOT_TLS, TOO_LARGE, inspect

if TYPE_CHECKING:
    from .certs import CertStore

log = logging.getLogger("pyproxy.security")

for _name in ("no_filter_chain_match", "downstream_pre_cx_timeout", "tls_inspector.tls_found",
              "tls_inspector.tls_not_found", "tls_inspector.client_hello_too_large"):
    TLS_STATS.setdefault(_name, 0)

# Re-peek interval while a ClientHello is incomplete (the socket stays
# readable while unread bytes wait, so readiness cannot tell "more arrived").
_PEEK_RETRY = 0.005
_PEEK_RETRY_MAX = 0.05


class TLSPeer:
    """The authenticated peer of one inbound mTLS connection."""

    __slots__ = ("uri", "xfcc", "namespace", "sni")

    def __init__(self, uri: str, xfcc: bytes, namespace: str, sni: str = "") -> None:
        self.uri = uri
        self.xfcc = xfcc
        self.namespace = namespace
        self.sni = sni  # the ClientHello's server name (AuthorizationPolicy connection.sni)


def xfcc_value(local_uri: str, peer_der: bytes, peer_uris: list[str]) -> bytes:
    """Envoy's x-forwarded-client-cert element as Istio configures it
    (APPEND_FORWARD with Subject, URI and DNS): By, Hash, Subject, URI."""
    parts = [f"By={local_uri}", f"Hash={hashlib.sha256(peer_der).hexdigest()}", 'Subject=""']
    parts.extend(f"URI={u}" for u in peer_uris)
    return ";".join(parts).encode()


def verify_client(transport: Any, certs: CertStore, sni: str = "") -> TLSPeer | None:
    """After the handshake (the chain was checked by OpenSSL): the client's
    URI SAN must be in our trust domain. None = refuse (counted)."""
    creds = certs.current
    sslobj = transport.get_extra_info("ssl_object")
    peercert = transport.get_extra_info("peercert")
    if creds is None or sslobj is None or not peercert:
        TLS_STATS["ssl.fail_verify_no_cert"] += 1
        TLS_STATS["ssl.connection_error"] += 1
        return None
    prefix = f"spiffe://{creds.identity.trust_domain}/"
    uris = uri_sans(peercert)
    if not any(u.startswith(prefix) for u in uris):
        TLS_STATS["ssl.fail_verify_san"] += 1
        TLS_STATS["ssl.connection_error"] += 1
        log.info("inbound mTLS refused: client certificate URI SANs %s are not in %s", uris, prefix)
        return None
    TLS_STATS["ssl.handshake"] += 1
    der = sslobj.getpeercert(binary_form=True) or b""
    uri = next(u for u in uris if u.startswith(prefix))
    ident = parse_spiffe(uri)
    return TLSPeer(uri, xfcc_value(creds.uri, der, uris), ident.namespace if ident else "", sni)


class InboundAcceptor:
    """Accepts the inbound listener's connections and routes each to
    plaintext or mTLS (see the module docstring)."""

    def __init__(self, listener: Any, certs: CertStore) -> None:
        self.listener = listener
        self.certs = certs
        self.sock: socket.socket | None = None
        self.task: asyncio.Task | None = None
        self.pending: set[asyncio.Task] = set()

    def start(self, sock: socket.socket) -> None:
        """Serve the listening socket ``sock`` (bound by the listener)."""
        sock.setblocking(False)
        self.sock = sock
        self.task = self.listener.worker.loop.create_task(self._accept_loop())


    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def _accept_loop(self) -> None:
        loop = self.listener.worker.loop
        sock = self.sock
        assert sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and the like: keep accepting
                log.warning("inbound accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    def _mode(self, conn: socket.socket) -> str:
        from ..http.downstream import original_dst

        worker = self.listener.worker
        port = worker.identity.app_port
        dst = original_dst(conn)
        if dst is not None:
            port = dst[1]
        return worker.snapshot.peer_policy.for_port(port)

    async def _serve(self, conn: socket.socket) -> None:
        listener = self.listener
        worker = listener.worker
        loop = worker.loop
        timeout = worker.limits.header_timeout
        try:
            mode = self._mode(conn)
            use_tls = False
            sni = ""
            if mode != "DISABLE":
                hello = await self._peek(conn, timeout)
                if hello is None:  # closed by the client before sending anything
                    conn.close()
                    return
                if hello == TOO_LARGE:
                    TLS_STATS["tls_inspector.client_hello_too_large"] += 1
                    self._refuse(conn)
                    return
                if hello == NOT_TLS:
                    TLS_STATS["tls_inspector.tls_not_found"] += 1
                    if mode == "STRICT":
                        TLS_STATS["no_filter_chain_match"] += 1
                        self._refuse(conn)
                        return
                else:
                    TLS_STATS["tls_inspector.tls_found"] += 1
                    assert not isinstance(hello, str)
                    if mode == "PERMISSIVE" and not ISTIO_ALPNS.intersection(hello.alpn):
                        # An HTTP port has no chain for TLS from outside the mesh.
                        TLS_STATS["no_filter_chain_match"] += 1
                        self._refuse(conn)
                        return
                    use_tls = True
                    sni = hello.sni
            if not use_tls:
                await loop.connect_accepted_socket(listener._new_connection, conn)
                return
            creds = self.certs.current
            assert creds is not None
            try:
                await loop.connect_accepted_socket(
                    lambda: listener._new_tls_connection(lambda t: verify_client(t, self.certs, sni)),
                    conn, ssl=creds.server_context,
                    ssl_handshake_timeout=timeout)
            except (ssl.SSLError, OSError, TimeoutError) as exc:
                TLS_STATS["ssl.connection_error"] += 1
                if isinstance(exc, ssl.SSLError) and "CERTIFICATE" in str(exc).upper():
                    TLS_STATS["ssl.fail_verify_error"] += 1
                elif isinstance(exc, TimeoutError) or "longer than" in str(exc):
                    # (asyncio/uvloop abort a slow handshake with ConnectionAbortedError
                    # "SSL handshake is taking longer than N seconds".)
                    TLS_STATS["downstream_pre_cx_timeout"] += 1
                log.debug("inbound TLS handshake failed: %s", exc)
                conn.close()
        except TimeoutError:
            TLS_STATS["downstream_pre_cx_timeout"] += 1
            self._refuse(conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except OSError as exc:
            log.debug("inbound connection failed before serving: %s", exc)
            conn.close()

    @staticmethod
    def _refuse(conn: socket.socket) -> None:
        # A reset, as Envoy's no-filter-chain close looks to the client.
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        conn.close()

    async def _peek(self, conn: socket.socket, timeout: float) -> Any:
        """The TLS inspector: peek until the ClientHello is complete (or the
        bytes are plainly not TLS), bounded in time and size."""
        loop = self.listener.worker.loop
        deadline = loop.time() + timeout
        await self._readable(conn, timeout)
        delay = _PEEK_RETRY
        while True:
            try:
                data = conn.recv(MAX_CLIENT_HELLO, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            if data == b"":
                return None
            if data:
                result = inspect(data)
                if result != NEED_MORE:
                    return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, _PEEK_RETRY_MAX)

    async def _readable(self, conn: socket.socket, timeout: float) -> None:
        loop = self.listener.worker.loop
        fut = loop.create_future()
        fd = conn.fileno()
        loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            loop.remove_reader(fd)
