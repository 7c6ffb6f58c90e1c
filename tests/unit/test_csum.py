"""Incremental checksum updates (RFC 1624) against full recomputation on random packets."""

import struct

import numpy as np
from hypothesis import given, settings, strategies as st
from scapy.all import IP, TCP, UDP, Raw

from dataplane import csum, nat
from tests.naive import csum as naive

addr = st.integers(0, 2**32 - 1)
port = st.integers(0, 65535)


def _buf(pkt):
    return np.frombuffer(bytes(pkt), np.uint8).copy()


@given(st.binary(min_size=0, max_size=200))
def test_sum16_matches_naive(data):
    buf = np.frombuffer(data + b"\0", np.uint8).copy()
    assert csum.fold(csum.sum16(buf, 0, len(data))) == naive.ones_sum(data)


@given(addr, addr, port, port, st.binary(max_size=300), st.sampled_from(["tcp", "udp"]),
       st.integers(0, 2), addr, port)
@settings(max_examples=300)
def test_rewrite_matches_full_recompute(src, dst, sport, dport, payload, kind, nopts, new_addr,
                                        new_port):
    ip = IP(src=".".join(str(src >> s & 255) for s in (24, 16, 8, 0)),
            dst=".".join(str(dst >> s & 255) for s in (24, 16, 8, 0)),
            options=[b"\x01" * 4] * nopts if nopts else [])
    l4 = TCP(sport=sport, dport=dport, flags="S") if kind == "tcp" else UDP(sport=sport, dport=dport)
    pkt = bytes(ip / l4 / Raw(payload))
    for direction in (0, 1):
        buf = _buf(pkt)
        ihl = (pkt[0] & 0xF) * 4
        proto = pkt[9]
        if direction == 0:
            nat.set_addr(buf, 0, proto, ihl, True, 1, new_addr)
            nat.set_port(buf, proto, ihl, True, 1, new_port)
        else:
            nat.set_addr(buf, 0, proto, ihl, True, 0, new_addr)
            nat.set_port(buf, proto, ihl, True, 0, new_port)
        out = buf.tobytes()
        na = struct.pack("!I", new_addr)
        if direction == 0:
            ref = naive.nat_rewrite(pkt, 0, b"", 0, na, new_port)
        else:
            ref = naive.nat_rewrite(pkt, 1, na, new_port, b"", 0)
        assert out == ref
        assert naive.ip_header_checksum(out[:ihl]) == struct.unpack("!H", out[10:12])[0]
        assert naive.stored_l4_checksum(out) == naive.l4_checksum(out)


def test_udp_zero_checksum_stays_zero():
    pkt = bytearray(bytes(IP(src="1.2.3.4", dst="5.6.7.8") / UDP(sport=1, dport=2) / b"x"))
    pkt[26:28] = b"\0\0"
    buf = _buf(pkt)
    nat.set_addr(buf, 0, 17, 20, True, 1, 0x0A000001)
    nat.set_port(buf, 17, 20, True, 1, 99)
    assert buf[26] == 0 and buf[27] == 0


def test_full_checksums_match_scapy():
    pkt = bytes(IP(src="10.1.2.3", dst="10.4.5.6") / TCP(sport=1234, dport=80, flags="PA") / (b"a" * 33))
    buf = _buf(pkt)
    assert csum.ip_checksum(buf, 0, 20) == struct.unpack("!H", pkt[10:12])[0]
    assert csum.l4_checksum(buf, 0, 20, len(pkt) - 20, 6, 36) == struct.unpack("!H", pkt[36:38])[0]
