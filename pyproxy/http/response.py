"""Response bytes as pure functions: values in, bytes out, nothing called back.

The two writers of a reply the proxy makes itself, side by side:

- ``local_reply``: the router's and the filters' local replies (Envoy's
  ``sendLocalReply``), for a request that has an exchange: the route's
  response header operations were already applied to ``fields``;
- ``refusal``: the codec's answer to bytes that never became a request (a
  malformed head, a header over a limit), always closing the connection.
"""

from __future__ import annotations

from ..errors import STATUS_LINES, status_line

# Written by local_reply itself, whatever a route's operations say.
LOCAL_REPLY_OWN = frozenset({b"content-length", b"transfer-encoding", b"connection", b"date", b"server"})


def local_reply(status: int, body: bytes, fields: list[tuple[bytes, bytes]], date: bytes, server_line: bytes,
                close: bool, send_body: bool) -> bytes:
    """A local reply: status line, content-length (none for a 204 or 1xx, as
    Envoy), ``fields`` except the ones this function owns, date, the
    ``server_line``, ``connection: close`` when ``close``, then the body
    unless ``send_body`` is false (HEAD)."""
    parts = [STATUS_LINES.get(status) or status_line(status)]
    if status != 204 and status >= 200:
        parts.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
    for name, value in fields:
        if name not in LOCAL_REPLY_OWN:
            parts.append(name + b": " + value + b"\r\n")
    parts.append(b"date: " + date + b"\r\n" + server_line)
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if body and send_body:
        parts.append(body)
    return b"".join(parts)


def refusal(status: int, body: bytes, close: bool = True) -> bytes:
    """The codec's reply to a request it refused before it had an exchange."""
    head = STATUS_LINES.get(status) or status_line(status)
    return (
        head
        + b"content-length: " + str(len(body)).encode() + b"\r\ncontent-type: text/plain\r\n"
        + (b"connection: close\r\n" if close else b"")
        + b"\r\n" + body
    )
