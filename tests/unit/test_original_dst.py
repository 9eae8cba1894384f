"""Unit tests for SO_ORIGINAL_DST decoding (pyproxy.http.downstream.original_dst)
with stand-in socket objects; the real kernel path runs in
tests/integration/test_transparent.py."""

from __future__ import annotations

import socket
import struct

import pytest

from pyproxy.http.downstream import SO_ORIGINAL_DST, original_dst, unmap_ipv4


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_pton(socket.AF_INET, ip))


def sockaddr_in6(ip: str, port: int) -> bytes:
    return struct.pack("!HHI16sI", socket.AF_INET6, port, 0, socket.inet_pton(socket.AF_INET6, ip), 0)


class FakeSock:
    def __init__(self, family: int, local: tuple, answers: dict[tuple[int, int], bytes | OSError]) -> None:
        self.family = family
        self.local = local
        self.answers = answers
        self.asked: list[tuple[int, int, int]] = []

    def getsockname(self) -> tuple:
        return self.local

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        self.asked.append((level, option, size))
        answer = self.answers.get((level, option), OSError(2, "No such file or directory"))
        if isinstance(answer, OSError):
            raise answer
        return answer


V4 = (socket.SOL_IP, SO_ORIGINAL_DST)
V6 = (socket.IPPROTO_IPV6, SO_ORIGINAL_DST)


def test_ipv4_redirected_connection() -> None:
    sock = FakeSock(socket.AF_INET, ("127.0.0.1", 15001), {V4: sockaddr_in("198.18.0.3", 8080)})
    assert original_dst(sock) == ("198.18.0.3", 8080)
    assert sock.asked == [(socket.SOL_IP, 80, 16)]


def test_ipv6_redirected_connection() -> None:
    sock = FakeSock(socket.AF_INET6, ("::1", 15001, 0, 0), {V6: sockaddr_in6("fd00:198:18::3", 8080)})
    assert original_dst(sock) == ("fd00:198:18::3", 8080)
    assert sock.asked == [(socket.IPPROTO_IPV6, 80, 28)]


def test_ipv4_connection_on_a_dual_stack_socket_uses_the_ipv4_option() -> None:
    sock = FakeSock(socket.AF_INET6, ("::ffff:127.0.0.1", 15001, 0, 0),
                    {V4: sockaddr_in("198.18.0.3", 8080), V6: OSError(2, "No such file or directory")})
    assert original_dst(sock) == ("198.18.0.3", 8080)
    assert sock.asked == [(socket.SOL_IP, 80, 16)]


@pytest.mark.parametrize(
    "sock",
    [
        # Not redirected: the kernel has no NAT entry.
        FakeSock(socket.AF_INET, ("127.0.0.1", 15001), {}),
        FakeSock(socket.AF_INET6, ("::1", 15001, 0, 0), {}),
        # Not redirected, but the kernel answers with the connection's own destination.
        FakeSock(socket.AF_INET, ("127.0.0.1", 15001), {V4: sockaddr_in("127.0.0.1", 15001)}),
        FakeSock(socket.AF_INET6, ("::ffff:127.0.0.1", 15001, 0, 0), {V4: sockaddr_in("127.0.0.1", 15001)}),
        FakeSock(socket.AF_INET6, ("fd00::2", 15006, 0, 0), {V6: sockaddr_in6("fd00::2", 15006)}),
        # Other families and short answers.
        FakeSock(socket.AF_UNIX, "/tmp/s", {}),
        FakeSock(socket.AF_INET, ("127.0.0.1", 15001), {V4: b"\x02\x00"}),
    ],
)
def test_not_redirected(sock: FakeSock) -> None:
    assert original_dst(sock) is None


def test_same_port_other_address_is_redirected() -> None:
    # The inbound listener on 0.0.0.0:15006 sees the pod address as local; a
    # connection to another address's 15006 was still redirected.
    sock = FakeSock(socket.AF_INET, ("198.18.0.2", 9080), {V4: sockaddr_in("198.18.0.9", 9080)})
    assert original_dst(sock) == ("198.18.0.9", 9080)


def test_unmap_ipv4() -> None:
    assert unmap_ipv4("::ffff:10.1.2.3") == "10.1.2.3"
    for ip in ("10.1.2.3", "::1", "fd00::ffff:1", "::ffff:a0a:a0a"):
        assert unmap_ipv4(ip) is ip
