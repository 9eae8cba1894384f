"""Hot-path mechanics that optimisations rely on (fake loop, fake
transports, no sockets): writes coalesced per upstream read, request ids."""

from __future__ import annotations

import os
import uuid

from pyproxy.http import headers
from pyproxy.http.headers import new_request_id
from tests.unit.fakes import Mesh, service


def mesh() -> Mesh:
    return Mesh(service("svc", [1001]))


def test_head_body_and_last_chunk_of_one_upstream_read_leave_in_one_write() -> None:
    m = mesh()
    ex, down = m.request("svc")
    up = m.loop.upstream_of(ex)
    up.conn.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert down.writes == 1
    assert down.status == 200 and down.body == b"5\r\nhello\r\n0\r\n\r\n"
    assert not down.corked and ex.finished


def test_a_head_whose_body_comes_later_is_not_held_back() -> None:
    m = mesh()
    ex, down = m.request("svc")
    up = m.loop.upstream_of(ex)
    up.conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    assert down.writes == 1 and down.status == 200 and down.body == b""
    up.conn.data_received(b"hel")
    up.conn.data_received(b"lo")
    assert down.writes == 3 and down.body == b"hello" and ex.finished


def test_request_ids_are_uuid4_and_unique_across_batches() -> None:
    ids = [new_request_id() for _ in range(3 * headers._RANDOM_BATCH // 16 + 7)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        u = uuid.UUID(rid.decode("ascii"))
        assert u.version == 4 and u.variant == uuid.RFC_4122
        assert str(u).encode() == rid  # lower-case, canonical dashes


def test_a_forked_child_does_not_reuse_the_parents_random_bytes() -> None:
    new_request_id()  # the parent has a partly used batch
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.write(w, new_request_id())
        os._exit(0)
    os.close(w)
    child = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    assert child != new_request_id()
    assert uuid.UUID(child.decode()).version == 4
