"""FULLNAT building blocks (dataplane/fullnat.py) against their naive twins (tests/naive/fullnat.py)
on scapy-built and random packets, then composed as pipeline.py will compose them in worked
examples: whole TCP exchanges through the balancer, checked from each end's point of view.

Packets sit at an odd offset inside a larger buffer (as in a batch), so checksum code that
mistakes buffer alignment for segment alignment fails here."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scapy.all import IP, TCP, Raw
from scapy.layers.inet import in4_chksum
from scapy.utils import checksum as scapy_checksum

from control.rules import steer_index as rules_steer_index
from dataplane import fullnat as F
from tests.naive import fullnat as N

M32 = 0xFFFFFFFF
O = 3           # packet offset inside the test buffer (odd on purpose)
CAP = 1600      # capacity from O
addr = st.integers(0, M32)
port = st.integers(0, 65535)
u32 = st.integers(0, M32)


# ==================================================================================================
# helpers
# ==================================================================================================

def ip_str(n):
    return ".".join(str(n >> s & 255) for s in (24, 16, 8, 0))


def load(pkt, cap=CAP):
    buf = np.zeros(O + cap + 8, np.uint8)
    buf[O:O + len(pkt)] = np.frombuffer(pkt, np.uint8)
    ihl = (pkt[0] & 0xF) * 4
    doff = (pkt[ihl + 12] >> 4) * 4
    return buf, O + ihl, doff


def dump(buf, length):
    return buf[O:O + length].tobytes()


def checksums_ok(raw):
    """Both checksums verify, computed by scapy over the raw bytes (sum including the field
    is zero), and scapy parses the packet as IP/TCP."""
    p = IP(raw)
    ihl = p.ihl * 4
    return (TCP in p and scapy_checksum(raw[:ihl]) == 0
            and in4_chksum(6, p, raw[ihl:p.len]) == 0)


def with_options(opts: bytes, payload=b"", flags="A", seq=1000, ack=2000,
                 src="10.0.0.1", dst="10.9.9.9", sport=40000, dport=80):
    """An IPv4/TCP packet with exactly these option bytes (padded with EOL to 4 bytes)."""
    opts = opts + b"\0" * (-len(opts) % 4)
    base = bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, seq=seq, ack=ack,
                                            flags=flags, window=5000))
    b = bytearray(base[:40] + opts + payload)
    b[2:4] = struct.pack("!H", len(b))
    b[32] = ((20 + len(opts)) // 4) << 4
    return N._fix(b)


# Option encodings (kind, length, value) for the strategies.
def _o_mss(v):
    return b"\x02\x04" + struct.pack("!H", v)


def _o_ts(a, b):
    return b"\x08\x0a" + struct.pack("!II", a, b)


def _o_sack(edges):
    return bytes([5, 2 + 4 * len(edges)]) + b"".join(struct.pack("!I", e) for e in edges)


option = st.one_of(
    st.just(b"\x01"),
    st.integers(0, 65535).map(_o_mss),
    st.integers(0, 14).map(lambda v: b"\x03\x03" + bytes([v])),
    st.just(b"\x04\x02"),
    st.tuples(u32, u32).map(lambda t: _o_ts(*t)),
    st.lists(u32, min_size=1, max_size=4).map(lambda es: _o_sack(es + es[:len(es) % 2])),
    st.tuples(st.sampled_from([30, 34, 253, 254]), st.binary(max_size=6)).map(
        lambda t: bytes([t[0], 2 + len(t[1])]) + t[1]),
)


@st.composite
def option_block(draw, max_len=40):
    parts = draw(st.lists(option, max_size=8))
    out = b""
    for p in parts:
        if len(out) + len(p) <= max_len:
            out += p
    return out


# ==================================================================================================
# local addresses and ports
# ==================================================================================================

@given(st.integers(0, 2**32 - 1), st.integers(1, 300))
def test_steer_index_matches_rules(key, count):
    assert F.steer_index(key, count) == rules_steer_index(key, count) == N.steer_index(key, count)


@pytest.mark.parametrize("n_workers", [1, 2, 3, 4, 5, 6, 8])
def test_lport_init_partitions_the_range_by_reply_steering(n_workers):
    lo, hi = 1024, 65535
    seen = set()
    for w in range(n_workers):
        width = F.lport_capacity(lo, hi, w, n_workers)
        fifo = np.zeros((3, width), np.uint16)
        head = np.full(3, 7, np.int32)
        count = np.zeros(3, np.int32)
        assert F.lport_init(fifo, head, count, 2, lo, hi, w, n_workers) == width
        assert head[2] == 0 and count[2] == width and count[1] == 0
        ports = fifo[2].tolist()
        assert ports == sorted(ports) == N.owned_ports(lo, hi, w, n_workers)
        # a real server's reply to laddr:lport is queued (rules.py, steer='dport') to worker w
        assert all(rules_steer_index(p, n_workers) == w for p in ports)
        assert seen.isdisjoint(ports)
        seen.update(ports)
    assert seen == set(range(lo, hi + 1))


def test_lport_init_truncates_to_the_ring_width():
    fifo = np.zeros((2, 10), np.uint16)
    head = np.zeros(2, np.int32)
    count = np.zeros(2, np.int32)
    assert F.lport_init(fifo, head, count, 1, 5000, 65535, 0, 1) == 10
    assert fifo[1].tolist() == list(range(5000, 5010))


def test_lport_fifo_reuses_the_oldest_free_port_first():
    fifo = np.zeros((2, 8), np.uint16)
    head = np.zeros(2, np.int32)
    count = np.zeros(2, np.int32)
    F.lport_init(fifo, head, count, 1, 100, 103, 0, 1)
    got = [F.lport_alloc(fifo, head, count, 1) for _ in range(3)]
    assert got == [100, 101, 102]
    assert F.lport_free(fifo, head, count, 1, 101) == 0     # just closed: reused last
    assert F.lport_free(fifo, head, count, 1, 100) == 0
    assert [F.lport_alloc(fifo, head, count, 1) for _ in range(4)] == [103, 101, 100, -1]
    assert count[1] == 0


def test_lport_exhaustion_and_double_free():
    fifo = np.zeros((2, 3), np.uint16)
    head = np.zeros(2, np.int32)
    count = np.zeros(2, np.int32)
    assert F.lport_alloc(fifo, head, count, 1) == -1         # never initialised: no ports
    F.lport_init(fifo, head, count, 1, 7, 9, 0, 1)
    assert F.lport_free(fifo, head, count, 1, 7) == -1       # ring full: refused, unchanged
    assert fifo[1].tolist() == [7, 8, 9] and count[1] == 3
    for p in (7, 8, 9):
        assert F.lport_alloc(fifo, head, count, 1) == p
    assert F.lport_alloc(fifo, head, count, 1) == -1
    for p in (9, 7, 8):                                      # wraps around the ring
        assert F.lport_free(fifo, head, count, 1, p) == 0
    assert [F.lport_alloc(fifo, head, count, 1) for _ in range(3)] == [9, 7, 8]


@settings(max_examples=150)
@given(st.integers(1, 12), st.lists(st.tuples(st.sampled_from(["alloc", "free"]),
                                              st.integers(1, 2), st.integers(0, 100)),
                                    max_size=80))
def test_lport_ops_match_naive(width, ops):
    fifo = np.zeros((3, width), np.uint16)
    head = np.zeros(3, np.int32)
    count = np.zeros(3, np.int32)
    ref = N.PortPool(width)
    for lid in (1, 2):
        assert F.lport_init(fifo, head, count, lid, 2000 * lid, 2000 * lid + 20, 1, 3) == \
            ref.init(lid, 2000 * lid, 2000 * lid + 20, 1, 3)
    held = {1: [], 2: []}
    for op, lid, pick in ops:
        if op == "alloc":
            got = F.lport_alloc(fifo, head, count, lid)
            assert got == ref.alloc(lid)
            if got >= 0:
                held[lid].append(got)
        elif held[lid]:
            p = held[lid].pop(pick % len(held[lid]))
            assert F.lport_free(fifo, head, count, lid, p) == ref.release(lid, p) == 0
        assert count[lid] == ref.count(lid)
    for lid in (1, 2):       # drain: same ports in the same order
        assert [F.lport_alloc(fifo, head, count, lid) for _ in range(ref.count(lid))] == \
            list(ref.free[lid])


def _pool(ids, counts_by_id, svc=3):
    svc_laddrs = np.zeros((8, 16), np.uint16)
    svc_laddrs[svc, :len(ids)] = ids
    lport_count = np.zeros(256, np.int32)
    for lid, c in counts_by_id.items():
        lport_count[lid] = c
    return svc_laddrs, lport_count


@settings(max_examples=150)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=10),
       st.dictionaries(st.integers(1, 6), st.integers(0, 3)), st.integers(0, 30),
       st.integers(1, 25))
def test_laddr_bind_matches_naive(ids, counts, cursor, n_picks):
    svc = 3
    svc_laddrs, lport_count = _pool(ids, counts)
    fifo = np.zeros((256, 4), np.uint16)
    head = np.zeros(256, np.int32)
    for lid in set(ids):        # give each id lport_count[lid] ports
        c = counts.get(lid, 0)
        F.lport_init(fifo, head, lport_count, lid, 1000 * lid, 1000 * lid + c - 1, 0, 1)
    rr = np.zeros(8, np.int64)
    rr[svc] = cursor
    ref_counts = {lid: counts.get(lid, 0) for lid in set(ids)}
    ref_cursor = cursor % len(ids)
    for _ in range(n_picks):
        want, ref_cursor2 = N.laddr_pick(ids, lambda lid: ref_counts[lid], ref_cursor)
        lid, lport = F.laddr_bind(svc_laddrs, svc, len(ids), fifo, head, lport_count, rr)
        assert lid == want
        if want < 0:
            assert lport == -1
            break
        assert lport == 1000 * lid + counts[lid] - ref_counts[lid]
        ref_counts[lid] -= 1
        ref_cursor = ref_cursor2
        assert rr[svc] == ref_cursor


def test_laddr_pick_round_robin_skips_exhausted_and_reports_exhaustion():
    svc_laddrs, lport_count = _pool([4, 5, 6], {4: 1, 5: 0, 6: 2})
    rr = np.zeros(8, np.int32)
    picks = [F.laddr_pick(svc_laddrs, 3, 3, lport_count, rr) for _ in range(4)]
    assert picks == [4, 6, 4, 6]
    lport_count[4] = lport_count[6] = 0
    assert F.laddr_pick(svc_laddrs, 3, 3, lport_count, rr) == -1     # DROP_LADDR_EXHAUSTED
    assert F.laddr_pick(svc_laddrs, 3, 0, lport_count, rr) == -1     # empty pool
    assert F.laddr_bind(svc_laddrs, 3, 3, np.zeros((256, 1), np.uint16), np.zeros(256, np.int32),
                        lport_count, rr) == (-1, -1)


def test_laddr_pick_cursor_may_be_a_column_of_worker_sched():
    svc_laddrs, lport_count = _pool([4, 5], {4: 9, 5: 9})
    sched = np.zeros((8, 4), np.int64)          # Worker.sched shape, a strided column view
    rr = sched[:, 2]
    assert [F.laddr_pick(svc_laddrs, 3, 2, lport_count, rr) for _ in range(3)] == [4, 5, 4]
    assert sched[3, 2] == 1 and sched[3, 0] == 0


# ==================================================================================================
# TCP options
# ==================================================================================================

@settings(max_examples=300)
@given(option_block(), st.binary(max_size=40))
def test_find_option_matches_naive(opts, payload):
    pkt = with_options(opts, payload)
    buf, l4, doff = load(pkt)
    for kind in (2, 3, 4, 5, 8, 30, 253, 254, 99):
        want = N.find_option(pkt, kind)
        for length in (0, 4, 10):      # any length, MSS's, timestamp's
            ok = want >= 0 and (length == 0 or pkt[want + 1] == length)
            assert F.tcp_find_option(buf, l4, doff, kind, length) == (want + O if ok else -1)


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=40))
def test_find_option_survives_garbage(raw):
    raw = raw[:len(raw) & ~3]
    pkt = with_options(raw)
    buf, l4, doff = load(pkt)
    for kind in (2, 5, 8, 254):
        want = N.find_option(pkt, kind)
        assert F.tcp_find_option(buf, l4, doff, kind, 0) == (want + O if want >= 0 else -1)
    F.ts_strip(buf, O, l4, doff)
    F.tcp_set_mss(buf, O, l4, doff, 100)
    F.sack_adjust(buf, l4, doff, 12345)
    assert checksums_ok(dump(buf, len(pkt)))


@settings(max_examples=200)
@given(option_block(), st.integers(-1, 70000), st.binary(max_size=30))
def test_set_mss_matches_naive(opts, new_mss, payload):
    pkt = with_options(opts, payload, flags="SA")
    buf, l4, doff = load(pkt)
    ref, ref_mss = N.set_mss(pkt, new_mss)
    assert F.tcp_set_mss(buf, O, l4, doff, new_mss) == ref_mss
    out = dump(buf, len(pkt))
    assert out == ref and checksums_ok(out)
    assert F.tcp_get_mss(buf, l4, doff) == ref_mss


def test_set_mss_only_lowers():
    pkt = with_options(_o_mss(1460), flags="SA")
    buf, l4, doff = load(pkt)
    assert F.tcp_set_mss(buf, O, l4, doff, 1500) == 1460
    assert dump(buf, len(pkt)) == pkt
    assert F.tcp_set_mss(buf, O, l4, doff, 1452) == 1452
    assert IP(dump(buf, len(pkt)))[TCP].options[0] == ("MSS", 1452)
    nomss = with_options(b"\x04\x02")
    buf, l4, doff = load(nomss)
    assert F.tcp_set_mss(buf, O, l4, doff, 1000) == -1 and F.tcp_get_mss(buf, l4, doff) == -1


@settings(max_examples=300)
@given(option_block(), st.binary(max_size=30))
def test_ts_strip_matches_naive(opts, payload):
    pkt = with_options(opts, payload, flags="S")
    buf, l4, doff = load(pkt)
    ref, stripped = N.ts_strip(pkt)
    assert F.ts_strip(buf, O, l4, doff) == stripped
    out = dump(buf, len(pkt))
    assert out == ref and checksums_ok(out)
    if stripped:
        at = N.find_option(pkt, 8)
        assert out[at:at + 10] == b"\x01" * 10


def test_ts_strip_linux_syn_at_odd_alignment():
    # WS (3 bytes) first puts the timestamp option at an odd distance from the TCP header
    opts = b"\x03\x03\x07" + _o_ts(0xDEADBEEF, 0) + _o_mss(1460) + b"\x04\x02\x01"
    pkt = with_options(opts, flags="S")
    buf, l4, doff = load(pkt)
    assert F.ts_strip(buf, O, l4, doff) == 1
    out = dump(buf, len(pkt))
    assert checksums_ok(out) and out[43:53] == b"\x01" * 10
    assert F.ts_strip(buf, O, l4, doff) == 0


@settings(max_examples=300)
@given(option_block(), st.binary(max_size=60), addr, port, st.integers(0, 100))
def test_toa_insert_matches_naive(opts, payload, caddr, cport, slack):
    pkt = with_options(opts, payload, flags="A")
    cap = len(pkt) + slack
    buf, l4, doff = load(pkt, cap)
    ref, ref_len = N.toa_insert(pkt, cap, caddr, cport)
    got = F.toa_insert(buf, O, l4, len(pkt), cap, caddr, cport)
    assert got == ref_len
    if got < 0:
        assert dump(buf, len(pkt)) == pkt          # untouched
        assert got == (F.TOA_NO_ROOM if doff + 8 > 60 else F.TOA_NO_CAP)
        return
    out = dump(buf, got)
    assert out == ref and checksums_ok(out)
    t = IP(out)[TCP]
    assert t.options[0] == (254, struct.pack("!HI", cport, caddr))
    assert bytes(t.payload) == payload and t.dataofs * 4 == doff + 8


def test_toa_no_room_when_options_are_full():
    pkt = with_options(b"\x01" * 36)                # 56-byte header: 4 bytes of room
    buf, l4, doff = load(pkt)
    assert F.toa_insert(buf, O, l4, len(pkt), CAP, 1, 2) == F.TOA_NO_ROOM
    assert dump(buf, len(pkt)) == pkt
    pkt = with_options(b"\x01" * 32)                # exactly 8 bytes of room: fits
    buf, l4, doff = load(pkt)
    assert F.toa_insert(buf, O, l4, len(pkt), CAP, 1, 2) == len(pkt) + 8


# ==================================================================================================
# sequence numbers
# ==================================================================================================

@given(u32, st.integers(-2**33, 2**33))
def test_seq_add_and_diff(seq, delta):
    s = F.seq_add(seq, delta)
    assert s == (seq + delta) % 2**32
    d = delta % 2**32
    d = d - 2**32 if d >= 2**31 else d
    assert F.seq_diff(s, seq) == d == N.seq_diff(s, seq)


def test_seq_wraps_at_2_32():
    assert F.seq_add(0xFFFFFFFF, 1) == 0
    assert F.seq_add(0xFFFFFFF0, 0x20) == 0x10
    assert F.seq_add(5, -10) == 0xFFFFFFFB
    assert F.seq_diff(0x10, 0xFFFFFFF0) == 0x20
    assert F.seq_diff(0xFFFFFFF0, 0x10) == -0x20


@settings(max_examples=300)
@given(u32, u32, u32, u32, st.sampled_from(["S", "SA", "A", "PA", "R", "RA", "FA"]),
       option_block(), st.binary(max_size=30))
def test_adjust_seq_matches_naive(seq, ack, dseq, dack, flags, opts, payload):
    pkt = with_options(opts, payload, flags=flags, seq=seq, ack=ack)
    buf, l4, doff = load(pkt)
    F.tcp_adjust_seq(buf, l4, dseq, dack)
    out = dump(buf, len(pkt))
    assert out == N.adjust_seq(pkt, dseq, dack) and checksums_ok(out)
    t = IP(out)[TCP]
    assert t.seq == (seq + dseq) % 2**32
    assert t.ack == ((ack - dack) % 2**32 if "A" in flags else ack)


def test_adjust_seq_wrap_both_ways():
    pkt = with_options(b"", flags="A", seq=0xFFFFFFFE, ack=3)
    buf, l4, doff = load(pkt)
    F.tcp_adjust_seq(buf, l4, 5, 7)
    t = IP(dump(buf, len(pkt)))[TCP]
    assert (t.seq, t.ack) == (3, 0xFFFFFFFC) and checksums_ok(dump(buf, len(pkt)))


@st.composite
def sack_packet(draw):
    pre = draw(st.sampled_from([b"\x01\x01", b"", b"\x01", b"\x03\x03\x07", b"\x01\x01\x01"]))
    edges = draw(st.lists(u32, min_size=2, max_size=8).map(lambda es: es[:len(es) & ~1]))
    opts = pre + _o_sack(edges)
    tail = draw(st.sampled_from([b"", _o_ts(1, 2)]))
    if len(opts) + len(tail) <= 40:
        opts += tail
    return with_options(opts, draw(st.binary(max_size=20)))


@settings(max_examples=300)
@given(sack_packet(), u32)
def test_sack_adjust_matches_naive(pkt, delta):
    buf, l4, doff = load(pkt)
    ref, n = N.sack_adjust(pkt, delta)
    assert F.sack_adjust(buf, l4, doff, delta) == n
    out = dump(buf, len(pkt))
    assert out == ref and checksums_ok(out)
    assert N.sack_blocks(out) == [((a - delta) % 2**32, (b - delta) % 2**32)
                                  for a, b in N.sack_blocks(pkt)]


@settings(max_examples=100)
@given(option_block(), u32)
def test_sack_adjust_random_options_matches_naive(opts, delta):
    pkt = with_options(opts)
    buf, l4, doff = load(pkt)
    ref, n = N.sack_adjust(pkt, delta)
    assert F.sack_adjust(buf, l4, doff, delta) == n
    assert dump(buf, len(pkt)) == ref


def test_sack_blocks_across_the_wrap():
    pkt = with_options(b"\x01\x01" + _o_sack([0xFFFFFFF0, 0x10, 0x20, 0x30]))
    buf, l4, doff = load(pkt)
    assert F.sack_adjust(buf, l4, doff, 0x18) == 4
    out = dump(buf, len(pkt))
    assert N.sack_blocks(out) == [(0xFFFFFFD8, 0xFFFFFFF8), (0x8, 0x18)] and checksums_ok(out)


@settings(max_examples=200)
@given(addr, addr, port, port, option_block(), st.binary(max_size=30))
def test_set_tuple_matches_naive(sa, da, sp, dp, opts, payload):
    pkt = with_options(opts, payload)
    buf, l4, doff = load(pkt)
    F.tcp_set_tuple(buf, O, l4, sa, da, sp, dp)
    out = dump(buf, len(pkt))
    assert out == N.set_tuple(pkt, sa, da, sp, dp) and checksums_ok(out)


# ==================================================================================================
# PROXY protocol
# ==================================================================================================

@given(addr, port, addr, port)
def test_proxy_v1_matches_naive(ca, cp, va, vp):
    out = np.zeros(F.PP_V1_MAX_LEN_TCP4, np.uint8)
    n = F.proxy_v1_header(out, ca, cp, va, vp)
    ref = N.proxy_v1(ca, cp, va, vp)
    assert out[:n].tobytes() == ref and n <= F.PP_V1_MAX_LEN_TCP4
    _, proto, src, dst, sport, dport = ref.decode().rstrip("\r\n").split(" ")
    assert (proto, src, dst, int(sport), int(dport)) == ("TCP4", ip_str(ca), ip_str(va), cp, vp)


def test_proxy_v1_longest_and_short_buffer():
    out = np.zeros(60, np.uint8)
    n = F.proxy_v1_header(out, M32, 65535, M32, 65535)
    assert n == F.PP_V1_MAX_LEN_TCP4
    assert out[:n].tobytes() == b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert F.proxy_v1_header(out, 0, 0, 0, 0) == len(b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n")
    small = np.zeros(40, np.uint8)
    assert F.proxy_v1_header(small, 1, 1, 1, 1) == -1 and not small.any()


@given(addr, port, addr, port)
def test_proxy_v2_matches_naive(ca, cp, va, vp):
    out = np.zeros(40, np.uint8)
    assert F.proxy_v2_header(out, ca, cp, va, vp) == 28
    raw = out[:28].tobytes()
    assert raw == N.proxy_v2(ca, cp, va, vp)
    sig, vc, fam, ln, src, dst, sport, dport = struct.unpack("!12sBBHIIHH", raw)
    assert (sig, vc, fam, ln) == (b"\r\n\r\n\x00\r\nQUIT\n", 0x21, 0x11, 12)
    assert (src, dst, sport, dport) == (ca, va, cp, vp)
    assert F.proxy_v2_header(np.zeros(27, np.uint8), ca, cp, va, vp) == -1


@settings(max_examples=200)
@given(option_block(), st.binary(max_size=100), st.binary(max_size=60), st.integers(0, 80))
def test_payload_insert_matches_naive(opts, payload, data, slack):
    pkt = with_options(opts, payload, flags="PA")
    cap = len(pkt) + slack
    buf, l4, doff = load(pkt, cap)
    arr = np.frombuffer(data + b"\xEE", np.uint8).copy()   # longer than n: only n are used
    ref, ref_len = N.payload_insert(pkt, cap, data)
    got = F.payload_insert(buf, O, l4, len(pkt), cap, arr, len(data))
    assert got == ref_len
    if got < 0:
        assert dump(buf, len(pkt)) == pkt
        return
    out = dump(buf, got)
    assert out == ref and checksums_ok(out)
    assert bytes(IP(out)[TCP].payload) == data + payload


def test_payload_insert_refuses_more_than_data():
    pkt = with_options(b"", b"x")
    buf, l4, _ = load(pkt)
    assert F.payload_insert(buf, O, l4, len(pkt), CAP, np.zeros(4, np.uint8), 5) == -1
    assert dump(buf, len(pkt)) == pkt


# ==================================================================================================
# policy helpers
# ==================================================================================================

flags_st = st.sampled_from([0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x19])


@settings(max_examples=300)
@given(flags_st, u32, u32, u32, st.sampled_from([0, 28, 44, 56]), st.booleans(), st.booleans())
def test_policy_helpers_match_naive(tflags, seq, isn, delta, pp_len, acked, at_start):
    if at_start:
        seq = (isn + 1) % 2**32
    assert F.toa_wanted(tflags, seq, isn) == N.toa_wanted(tflags, seq, isn)
    assert F.pp_in_plan(tflags, seq, isn, delta, pp_len, acked) == \
        N.pp_in_plan(tflags, seq, isn, delta, pp_len, acked)
    assert F.pp_out_ack(seq, isn, delta) == N.pp_out_ack(seq, isn, delta)


def test_pp_out_ack_maps_short_acks_to_the_stream_start():
    isn, base, pp = 0xFFFFFFF0, 0x12345, 28
    delta = base + pp
    start_rs = (isn + 1 + base) % 2**32                  # S: the SYN-ACK acks this
    assert F.pp_out_ack(start_rs, isn, delta) == ((start_rs - isn - 1) % 2**32, False)
    assert F.pp_out_ack(start_rs + 10, isn, delta)[1] is False
    assert F.pp_out_ack((start_rs + pp) % 2**32, isn, delta) == (delta, True)
    assert F.pp_out_ack((start_rs + pp + 999) % 2**32, isn, delta) == (delta, True)


# ==================================================================================================
# worked examples: whole TCP exchanges through the balancer
# ==================================================================================================

class Peer:
    """A TCP endpoint that checks every packet it receives from its own point of view: both
    checksums (scapy), its own 4-tuple, acks within [snd_una, snd_nxt], SACK blocks inside data
    it sent and not yet acknowledged, retransmitted bytes identical to what it already has, and
    pure ACKs exactly at rcv_nxt. It reassembles the peer's byte stream."""

    def __init__(self, name, addr, port, peer_addr, peer_port, isn):
        self.name, self.addr, self.port = name, addr, port
        self.peer_addr, self.peer_port = peer_addr, peer_port
        self.isn = isn
        self.snd_una = self.snd_nxt = isn
        self.irs = self.rcv_nxt = None
        self.stream = bytearray()       # in-order bytes received from the peer
        self.ooo = {}                   # rel offset -> bytes, beyond rcv_nxt
        self.sent = {}                  # abs seq -> data (for SACK checks and retransmission)
        self.fin_rcvd = False
        self.seen = []                  # every received scapy TCP layer

    # --- sending --------------------------------------------------------------------------------
    def _pkt(self, flags, seq, data=b"", options=()):
        ack = self.rcv_nxt if "A" in flags else 0
        p = IP(src=ip_str(self.addr), dst=ip_str(self.peer_addr), id=1) / TCP(
            sport=self.port, dport=self.peer_port, seq=seq, ack=ack or 0, flags=flags,
            window=65535, options=list(options))
        return bytes(p / Raw(data)) if data else bytes(p)

    def syn(self, options):
        self.snd_nxt = (self.isn + 1) % 2**32
        return self._pkt("S", self.isn, options=options)

    def synack(self, options):
        self.snd_nxt = (self.isn + 1) % 2**32
        return self._pkt("SA", self.isn, options=options)

    def send(self, data, flags="PA", seq=None):
        seq = self.snd_nxt if seq is None else seq
        self.sent[seq] = data
        end = (seq + len(data) + ("F" in flags)) % 2**32
        if N.seq_diff(end, self.snd_nxt) > 0:
            self.snd_nxt = end
        return self._pkt(flags, seq, data, options=self._sack_opts())

    def ack(self):
        return self._pkt("A", self.snd_nxt, options=self._sack_opts())

    def _sack_opts(self):
        if not self.ooo:
            return ()
        blocks = []
        for off, data in sorted(self.ooo.items())[:3]:
            left = (self.rcv_nxt + off - len(self.stream)) % 2**32
            blocks += [left, (left + len(data)) % 2**32]
        return [("NOP", None), ("NOP", None), ("SAck", tuple(blocks))]

    # --- receiving ------------------------------------------------------------------------------
    def recv(self, raw):
        assert checksums_ok(raw), f"{self.name}: bad checksum"
        ip = IP(raw)
        t = ip[TCP]
        self.seen.append(t)
        assert (ip.src, ip.dst, t.sport, t.dport) == (
            ip_str(self.peer_addr), ip_str(self.addr), self.peer_port, self.port), \
            f"{self.name}: not my 4-tuple: {ip.src}:{t.sport} -> {ip.dst}:{t.dport}"
        flags = int(t.flags)
        if flags & 0x02:
            if self.irs is None:
                self.irs = t.seq
                self.rcv_nxt = (t.seq + 1) % 2**32
            assert t.seq == self.irs, f"{self.name}: SYN with a new ISN"
        if flags & 0x10:
            assert 0 <= N.seq_diff(t.ack, self.snd_una) and N.seq_diff(t.ack, self.snd_nxt) <= 0, \
                f"{self.name}: unacceptable ack {t.ack:#x} " \
                f"(una {self.snd_una:#x} nxt {self.snd_nxt:#x})"
            self.snd_una = t.ack
        for kind, val in t.options:
            if kind == "SAck":
                for left, right in zip(val[::2], val[1::2]):
                    assert N.seq_diff(right, self.snd_nxt) <= 0, f"{self.name}: SACK past snd_nxt"
                    assert any(s == left and (s + len(d)) % 2**32 == right
                               for s, d in self.sent.items()), \
                        f"{self.name}: SACK block {left:#x}-{right:#x} is not a segment I sent"
        data = bytes(t.payload)
        if flags & 0x02:
            assert not data
            return t
        off = N.seq_diff(t.seq, self.rcv_nxt)
        if not data and not flags & 0x01:
            assert off == 0, f"{self.name}: pure ACK at {t.seq:#x}, expected {self.rcv_nxt:#x}"
        if off <= 0:
            have = self.stream[len(self.stream) + off:]
            assert data[:len(have)] == have[:len(data)], f"{self.name}: retransmission differs"
            self._append(data[-off:] if off < 0 else data)
            if flags & 0x01 and off + len(data) >= 0:
                self.fin_rcvd = True
                self.rcv_nxt = (self.rcv_nxt + 1) % 2**32
        else:
            self.ooo[len(self.stream) + off] = data
        return t

    def _append(self, data):
        self.stream += data
        self.rcv_nxt = (self.rcv_nxt + len(data)) % 2**32
        while len(self.stream) in self.ooo:
            self._append_raw(self.ooo.pop(len(self.stream)))
        for k in [k for k in self.ooo if k < len(self.stream)]:
            d = self.ooo.pop(k)
            tail = d[len(self.stream) - k:]
            if tail:
                self._append_raw(tail)

    def _append_raw(self, data):
        self.stream += data
        self.rcv_nxt = (self.rcv_nxt + len(data)) % 2**32


class Balancer:
    """The FULLNAT composition the module docstring prescribes, for one connection (what
    pipeline.py will do with a Conn row)."""

    def __init__(self, mode, caddr, cport, vaddr, vport, laddr, lport, daddr, dport, new_isn,
                 delta_out=0):
        self.mode = mode                        # "pp2", "pp1" or "toa"
        self.caddr, self.cport, self.vaddr, self.vport = caddr, cport, vaddr, vport
        self.laddr, self.lport, self.daddr, self.dport = laddr, lport, daddr, dport
        self.new_isn = new_isn
        self.seq_delta_in = 0
        self.seq_delta_out = delta_out          # as SYN-proxy would set it: exercises both SACKs
        self.aux = 0                            # client ISN
        self.pp_acked = False
        self.hdr = np.zeros(64, np.uint8)
        if mode == "pp2":
            self.pp_len = F.proxy_v2_header(self.hdr, caddr, cport, vaddr, vport)
        elif mode == "pp1":
            self.pp_len = F.proxy_v1_header(self.hdr, caddr, cport, vaddr, vport)
        else:
            self.pp_len = 0
        self.inserted = 0

    @staticmethod
    def _parse(buf):
        ihl = (int(buf[O]) & 0xF) * 4
        l4 = O + ihl
        return l4, (int(buf[l4 + 12]) >> 4) * 4, int(buf[l4 + 13]), \
            int.from_bytes(buf[l4 + 4:l4 + 8].tobytes(), "big"), \
            int.from_bytes(buf[l4 + 8:l4 + 12].tobytes(), "big")

    def inbound(self, raw):
        buf, _, _ = load(raw)
        length = len(raw)
        l4, doff, tflags, seq, _ack = self._parse(buf)
        if tflags & 0x02 and not tflags & 0x10:
            F.ts_strip(buf, O, l4, doff)
            self.aux = seq
            self.seq_delta_in = (self.new_isn - seq + self.pp_len) % 2**32
        dseq = self.seq_delta_in
        if self.mode == "toa" and F.toa_wanted(tflags, seq, self.aux):
            length = F.toa_insert(buf, O, l4, length, CAP, self.caddr, self.cport)
            assert length > 0
        if self.pp_len:
            insert, dseq = F.pp_in_plan(tflags, seq, self.aux, self.seq_delta_in, self.pp_len,
                                        self.pp_acked)
            if insert:
                length = F.payload_insert(buf, O, l4, length, CAP, self.hdr, self.pp_len)
                assert length > 0
                self.inserted += 1
        F.tcp_adjust_seq(buf, l4, dseq, self.seq_delta_out)
        doff = (int(buf[l4 + 12]) >> 4) * 4
        if tflags & 0x10 and doff > 20:
            F.sack_adjust(buf, l4, doff, self.seq_delta_out)
        F.tcp_set_tuple(buf, O, l4, self.laddr, self.daddr, self.lport, self.dport)
        return dump(buf, length)

    def outbound(self, raw):
        buf, _, _ = load(raw)
        l4, doff, tflags, _seq, ack = self._parse(buf)
        if tflags & 0x12 == 0x12 and self.mode == "toa":
            F.tcp_set_mss(buf, O, l4, doff, F.tcp_get_mss(buf, l4, doff) - F.TCPOLEN_TOA)
        dack = 0
        if tflags & 0x10:
            dack, acked = F.pp_out_ack(ack, self.aux, self.seq_delta_in)
            self.pp_acked |= bool(acked)
        F.tcp_adjust_seq(buf, l4, self.seq_delta_out, dack)
        if tflags & 0x10 and doff > 20:
            F.sack_adjust(buf, l4, doff, self.seq_delta_in)
        F.tcp_set_tuple(buf, O, l4, self.vaddr, self.caddr, self.vport, self.cport)
        return dump(buf, len(raw))


CADDR, CPORT = 0x0A000001, 40000            # 10.0.0.1
VADDR, VPORT = 0xAC100164, 80               # 172.16.1.100
LADDR, DADDR, DPORT = 0x0A010005, 0x0A01000B, 8080
SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 0)), ("NOP", None),
            ("WScale", 7)]
SYNACK_OPTS = [("MSS", 1460), ("NOP", None), ("NOP", None), ("SAckOK", b""), ("NOP", None),
               ("WScale", 7)]


def _setup(mode, delta_out=0, c_isn=0xFFFFFFFD, new_isn=0xFFFFFFD8, rs_isn=0xFFFFFFFB):
    fifo = np.zeros((4, F.lport_capacity(F.LPORT_MIN, F.LPORT_MAX, 1, 2)), np.uint16)
    head = np.zeros(4, np.int32)
    count = np.zeros(4, np.int32)
    F.lport_init(fifo, head, count, 1, F.LPORT_MIN, F.LPORT_MAX, 1, 2)
    svc_laddrs = np.zeros((2, 4), np.uint16)
    svc_laddrs[1, 0] = 1
    rr = np.zeros(2, np.int32)
    lid, lport = F.laddr_bind(svc_laddrs, 1, 1, fifo, head, count, rr)
    assert lid == 1 and rules_steer_index(lport, 2) == 1     # replies come back to worker 1
    client = Peer("client", CADDR, CPORT, VADDR, VPORT, c_isn)
    rs = Peer("rs", DADDR, DPORT, LADDR, lport, rs_isn)
    lb = Balancer(mode, CADDR, CPORT, VADDR, VPORT, LADDR, lport, DADDR, DPORT, new_isn, delta_out)
    return client, rs, lb


def _handshake(client, rs, lb):
    syn = rs.recv(lb.inbound(client.syn(SYN_OPTS)))
    assert syn.seq == lb.new_isn
    assert "Timestamp" not in [k for k, _ in syn.options]          # stripped: ten NOPs
    client.recv(lb.outbound(rs.synack(SYNACK_OPTS)))
    assert client.snd_una == (client.isn + 1) % 2**32
    return syn


@pytest.mark.parametrize("delta_out", [0, 0x89ABCDEF])
@pytest.mark.parametrize("mode", ["pp2", "pp1"])
def test_worked_example_proxy_protocol(mode, delta_out):
    """SYN, SYN-ACK, ACK (+ PROXY header), server speaks first, client data with a lost
    segment (SACK from the RS), RS data with a lost segment (SACK from the client), FIN both
    ways. Both sequence spaces wrap at 2**32 during the exchange."""
    client, rs, lb = _setup(mode, delta_out)
    _handshake(client, rs, lb)
    hdr = lb.hdr[:lb.pp_len].tobytes()
    assert hdr.startswith(b"PROXY TCP4 10.0.0.1 172.16.1.100 40000 80\r\n" if mode == "pp1"
                          else b"\r\n\r\n\x00\r\nQUIT\n")

    # the handshake ACK carries the header: the RS sees it at the start of the stream
    t = rs.recv(lb.inbound(client.ack()))
    assert t.seq == (lb.new_isn + 1) % 2**32 and bytes(t.payload) == hdr
    assert rs.stream == hdr and lb.inserted == 1

    # server speaks first; its ack covers the header, which the client never sees
    greeting = b"220 rs ready\r\n"
    t = client.recv(lb.outbound(rs.send(greeting)))
    assert lb.pp_acked and t.ack == (client.isn + 1) % 2**32
    t = rs.recv(lb.inbound(client.ack()))                 # pure ACK at the stream start
    assert not bytes(t.payload) and lb.inserted == 1

    # client data across the wrap of both spaces; B is lost, the RS SACKs C
    a, b, c = b"A" * 100, b"B" * 100, b"C" * 100
    pa, pb, pc = client.send(a), client.send(b), client.send(c)
    assert IP(pa)[TCP].seq == 0xFFFFFFFE and IP(pc)[TCP].seq == 0xC6   # client space wraps
    rs.recv(lb.inbound(pa))
    lb.inbound(pb)                                          # lost after the balancer
    rs.recv(lb.inbound(pc))
    t = client.recv(lb.outbound(rs.ack()))
    blocks = [v for k, v in t.options if k == "SAck"]
    assert blocks == [(IP(pc)[TCP].seq, (IP(pc)[TCP].seq + 100) % 2**32)]
    assert client.snd_una == (IP(pb)[TCP].seq)
    rs.recv(lb.inbound(pb))                                 # retransmitted
    client.recv(lb.outbound(rs.ack()))
    assert client.snd_una == client.snd_nxt

    # RS data across its wrap; D1 lost, the client SACKs D2
    d1, d2 = bytes(range(256)) * 4, b"d" * 500
    p1, p2 = rs.send(d1), rs.send(d2)
    lb.outbound(p1)                                         # lost
    client.recv(lb.outbound(p2))
    t = rs.recv(lb.inbound(client.ack()))
    blocks = [v for k, v in t.options if k == "SAck"]
    assert blocks == [(IP(p2)[TCP].seq, (IP(p2)[TCP].seq + 500) % 2**32)]   # RS's own space
    client.recv(lb.outbound(p1))
    rs.recv(lb.inbound(client.ack()))

    # FIN both ways
    rs.recv(lb.inbound(client.send(b"", flags="FA")))
    client.recv(lb.outbound(rs.send(b"", flags="FA")))
    rs.recv(lb.inbound(client.ack()))

    assert bytes(rs.stream) == hdr + a + b + c              # RS: header, then client data
    assert bytes(client.stream) == greeting + d1 + d2       # client: never the header
    assert rs.fin_rcvd and client.fin_rcvd
    assert client.snd_una == client.snd_nxt and rs.snd_una == rs.snd_nxt
    assert lb.inserted == 1


def test_worked_example_proxy_header_ack_lost():
    """The handshake ACK carrying the header is lost after the balancer: the client's first data
    segment starts at the stream start and gets the header again. The RS's ACK is then lost
    *before* the balancer, so the client's retransmission gets the header once more (identical
    bytes: the RS takes it as a retransmission). The next RS ACK passes the balancer (the header
    is now known to be acknowledged) and is lost after it: the client's second retransmission
    is translated with the full delta and carries no header."""
    client, rs, lb = _setup("pp2", c_isn=0x7FFFFFF0, new_isn=0xFFFFFFF0, rs_isn=0x1000)
    _handshake(client, rs, lb)
    hdr = lb.hdr[:lb.pp_len].tobytes()
    lb.inbound(client.ack())                                # lost after the balancer
    first = b"GET / HTTP/1.0\r\n\r\n"
    pkt = client.send(first)
    t = rs.recv(lb.inbound(pkt))
    assert t.seq == (lb.new_isn + 1) % 2**32 and bytes(t.payload) == hdr + first
    rs.ack()                                                # lost before the balancer
    t = rs.recv(lb.inbound(pkt))                            # client retransmits
    assert t.seq == (lb.new_isn + 1) % 2**32 and bytes(t.payload) == hdr + first
    assert lb.inserted == 3 and not lb.pp_acked
    lb.outbound(rs.ack())                                   # passes the balancer, then lost
    assert lb.pp_acked
    t = rs.recv(lb.inbound(pkt))                            # second retransmission
    assert t.seq == (lb.new_isn + 1 + 28) % 2**32 and bytes(t.payload) == first
    client.recv(lb.outbound(rs.ack()))
    assert client.snd_una == client.snd_nxt
    reply = b"HTTP/1.0 200 OK\r\n\r\nhi"
    client.recv(lb.outbound(rs.send(reply)))
    rs.recv(lb.inbound(client.send(b"more")))
    assert bytes(rs.stream) == hdr + first + b"more" and bytes(client.stream) == reply
    assert lb.inserted == 3


def test_worked_example_toa():
    """TOA in the SYN and in every client segment that starts the stream (the handshake ACK
    and the first data segment), not later; the SYN-ACK's MSS lowered by 8."""
    client, rs, lb = _setup("toa")
    syn = _handshake(client, rs, lb)
    toa = (254, struct.pack("!HI", CPORT, CADDR))
    assert syn.options[0] == toa
    assert client.seen[0].options[0] == ("MSS", 1452)
    t = rs.recv(lb.inbound(client.ack()))
    assert t.options[0] == toa and t.dataofs == 7
    t = rs.recv(lb.inbound(client.send(b"x" * 1452)))       # full-size first segment
    assert t.options[0] == toa and len(bytes(t.payload)) == 1452
    assert t.underlayer.len == 20 + 28 + 1452              # fits a 1500-byte MTU
    t = rs.recv(lb.inbound(client.send(b"y" * 10)))
    assert t.options == [] and t.dataofs == 5
    client.recv(lb.outbound(rs.ack()))
    client.recv(lb.outbound(rs.send(b"ok")))
    rs.recv(lb.inbound(client.ack()))
    assert bytes(rs.stream) == b"x" * 1452 + b"y" * 10 and bytes(client.stream) == b"ok"
    assert client.snd_una == client.snd_nxt
