"""FULLNAT timestamp translation (SVC_F_FNAT_TS_XLATE, ``lvs-dp run --fnat-timestamp translate``).

The building blocks (`ts_clock`, `ts_value`, `ts_adjust`) against their pure-Python twins in
tests/naive/fullnat.py, then whole exchanges through process_batch: the real server sees its
local address's clock (non-decreasing over every connection from that address, whatever the
clients' clocks), the client gets its own values back as TS echoes, both across 2**32."""

import struct

import numpy as np
from hypothesis import given, settings, strategies as st
from scapy.all import IP, TCP, Raw

from dataplane import consts as C
from dataplane import fullnat as F
from dataplane import tables as T
from dataplane.batch import run_packets
from tests.naive import fullnat as N
from tests.unit.test_fullnat import checksums_ok, dump, load, option_block, with_options
from tests.unit.test_fullnat_pipeline import LADDRS, NOW, fnat, one, valid
from tests.unit.test_pipeline import CLIENT, RS3, VIP
from tests.unit import test_synproxy_pipeline as SPT

M32 = 2**32 - 1
XLATE = C.SVC_F_FNAT_TS_XLATE
u32 = st.integers(0, M32)


# ==================================================================================================
# building blocks against the twins
# ==================================================================================================

@given(u32, st.integers(0, 2**62))
def test_ts_clock_matches_naive(laddr, now_ns):
    assert F.ts_clock(laddr, now_ns) == N.ts_clock(laddr, now_ns)


def test_ts_clock_ticks_in_ms_and_differs_per_laddr():
    a, b = T.ip2int(LADDRS[0]), T.ip2int(LADDRS[1])
    t = 12345 * C.NS
    assert F.ts_clock(a, t + 999_999) == F.ts_clock(a, t)
    assert (F.ts_clock(a, t + 7 * 10**6) - F.ts_clock(a, t)) & M32 == 7
    assert F.ts_clock(a, t) != F.ts_clock(b, t)


@settings(max_examples=300)
@given(option_block(), st.binary(max_size=30), u32, u32, st.sampled_from(["S", "A", "PA", "SA"]))
def test_ts_adjust_and_value_match_naive(opts, payload, val_add, ecr_sub, flags):
    pkt = with_options(opts, payload, flags=flags)
    buf, l4, doff = load(pkt)
    assert F.ts_value(buf, l4, doff) == N.ts_value(pkt)
    ref, found = N.ts_adjust(pkt, val_add, ecr_sub)
    assert F.ts_adjust(buf, l4, doff, val_add, ecr_sub) == found
    out = dump(buf, len(pkt))
    assert out == ref and checksums_ok(out)


@given(u32, u32, u32, u32)
def test_ts_adjust_usual_layout_wraps_and_round_trips(val, ecr, val_add, ecr_sub):
    # NOP NOP TS: the shortcut without an option walk; then undo it
    pkt = with_options(b"\x01\x01" + struct.pack("!BBII", 8, 10, val, ecr), b"data")
    buf, l4, doff = load(pkt)
    assert doff == 32
    assert F.ts_adjust(buf, l4, doff, val_add, ecr_sub) == 1
    out = dump(buf, len(pkt))
    assert out[len(out) - 4 - 8:len(out) - 4] == struct.pack("!II", (val + val_add) & M32,
                                                              (ecr - ecr_sub) & M32)
    assert checksums_ok(out) and out == N.ts_adjust(pkt, val_add, ecr_sub)[0]
    F.ts_adjust(buf, l4, doff, -val_add & M32, -ecr_sub & M32)
    assert dump(buf, len(pkt)) == pkt


def test_ts_adjust_odd_alignment_and_absent():
    opts = b"\x03\x03\x07" + struct.pack("!BBII", 8, 10, 0xFFFFFFFE, 5) + b"\x02\x04\x05\xb4"
    pkt = with_options(opts, flags="S")
    buf, l4, doff = load(pkt)
    assert F.ts_adjust(buf, l4, doff, 3, 6) == 1
    out = dump(buf, len(pkt))
    assert checksums_ok(out) and out == N.ts_adjust(pkt, 3, 6)[0]
    assert N.ts_value(out) == 1
    bare = with_options(b"\x02\x04\x05\xb4", flags="S")
    buf, l4, doff = load(bare)
    assert F.ts_adjust(buf, l4, doff, 3, 6) == 0 and F.ts_value(buf, l4, doff) == -1
    assert dump(buf, len(bare)) == bare


# ==================================================================================================
# through process_batch
# ==================================================================================================

def tcp_ts(pkt):
    return dict(pkt[TCP].options).get("Timestamp")


def c2v(flags, seq, ack=0, ts=None, data=b"", sport=40000, src=CLIENT):
    o = [("MSS", 1460), ("SAckOK", b"")] if "S" in flags else []
    if ts is not None:
        o += [("NOP", None), ("NOP", None), ("Timestamp", ts)]
    p = IP(src=src, dst=VIP) / TCP(sport=sport, dport=80, flags=flags, seq=seq % 2**32,
                                    ack=ack % 2**32, options=o)
    return p / Raw(data) if data else p


def rs2l(laddr, lport, flags, seq, ack, ts=None, data=b""):
    o = [("NOP", None), ("NOP", None), ("Timestamp", ts)] if ts is not None else []
    if "S" in flags:
        o = [("MSS", 1460)] + o
    p = IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags=flags, seq=seq % 2**32,
                                     ack=ack % 2**32, options=o)
    return p / Raw(data) if data else p


def expected_in(pkt, ts_off, seq_delta, laddr, lport):
    """The twin's composition for a client -> RS segment: TS value shifted, seq shifted, the
    four-tuple rewritten (every checksum recomputed from scratch)."""
    raw, _ = N.ts_adjust(bytes(pkt), ts_off, 0)
    raw = N.adjust_seq(raw, seq_delta, 0)
    return N.set_tuple(raw, T.ip2int(laddr), T.ip2int(RS3), lport, 80)


def expected_out(pkt, ts_off, seq_delta):
    raw, _ = N.ts_adjust(bytes(pkt), 0, ts_off)
    raw = N.adjust_seq(raw, 0, seq_delta)
    return N.set_tuple(raw, T.ip2int(VIP), T.ip2int(CLIENT), 80, 40000)


def test_strip_is_the_default():
    cfg, wk, _, _ = fnat()
    _, out = one(cfg, wk, c2v("S", 1000, ts=(5, 0)))
    assert tcp_ts(out) is None and not wk.conn[1]["flags"] & C.CONN_F_TS_XLATE


def test_translate_exchange_bytes_match_the_twin_across_the_wrap():
    cfg, wk, _, _ = fnat(flags=XLATE)
    tc0 = 2**32 - 3                                   # the client's clock wraps during the exchange
    syn = c2v("S", 1000, ts=(tc0, 0))
    v, out = one(cfg, wk, syn)
    assert v == C.VERDICT_REWRITE and valid(out)
    laddr, lport = out.src, out[TCP].sport
    clock = N.ts_clock(T.ip2int(laddr), NOW)
    assert tcp_ts(out) == (clock, 0)                  # the RS sees the laddr's clock
    ts_off = (clock - tc0) & M32
    seq_delta = (out[TCP].seq - 1000) & M32
    assert bytes(out) == expected_in(syn, ts_off, seq_delta, laddr, lport)
    assert wk.conn[1]["flags"] & C.CONN_F_TS_XLATE and wk.conn[1]["ts_off"] == ts_off
    # A retransmitted SYN keeps the connection's offset.
    v, again = one(cfg, wk, c2v("S", 1000, ts=((tc0 + 1000) & M32, 0)), now=NOW + C.NS)
    assert tcp_ts(again) == ((clock + 1000) & M32, 0)
    # The RS answers with its own clock and echoes the laddr clock; the client gets its own value.
    synack = rs2l(laddr, lport, "SA", 7000, out[TCP].seq + 1, ts=(0xFFFFFFF0, clock))
    v, back = one(cfg, wk, synack)
    assert valid(back) and tcp_ts(back) == (0xFFFFFFF0, tc0)
    assert bytes(back) == expected_out(synack, ts_off, seq_delta)
    # Data both ways; the client's value wraps (tc0 + 10), the RS's too.
    for i, (tc, tr) in enumerate([(tc0 + 2, 0xFFFFFFF0), (tc0 + 10, 0xFFFFFFFF), (tc0 + 200, 3)]):
        data = c2v("PA", 1001 + i, 7001, ts=(tc % 2**32, tr), data=b"x")
        v, out = one(cfg, wk, data)
        assert valid(out) and tcp_ts(out) == ((clock + tc - tc0) & M32, tr)
        assert bytes(out) == expected_in(data, ts_off, seq_delta, laddr, lport)
        reply = rs2l(laddr, lport, "PA", 7001, out[TCP].seq + 1, ts=((tr + 1) & M32, tcp_ts(out)[0]),
                     data=b"y")
        v, back = one(cfg, wk, reply)
        assert valid(back) and tcp_ts(back) == ((tr + 1) & M32, tc % 2**32)   # round trip
        assert bytes(back) == expected_out(reply, ts_off, seq_delta)


def test_retransmission_is_translated_identically():
    cfg, wk, _, _ = fnat(flags=XLATE)
    _, out = one(cfg, wk, c2v("S", 1, ts=(77, 0)))
    seg = c2v("PA", 2, 9, ts=(80, 5), data=b"abc")
    _, first = one(cfg, wk, seg)
    _, again = one(cfg, wk, seg, now=NOW + 3 * C.NS)
    assert bytes(first) == bytes(again)


def test_many_clients_one_laddr_port_reused_never_go_back_in_time():
    """Clients with unrelated clocks, one local address and a single port: every SYN the RS
    sees carries a TS value after everything the previous connection on that tuple sent, which
    is what the RS's TIME_WAIT (PAWS) asks of a reused four-tuple."""
    cfg, wk, _, _ = fnat(flags=XLATE, laddrs=LADDRS[:1], port_lo=6000, port_hi=6000,
                         dests=((RS3, 80, 1),))
    rng = np.random.default_rng(3)
    now = NOW
    last_sent = None
    for k in range(8):
        src = f"10.0.{k}.1"
        tc = int(rng.integers(0, 2**32))
        _, syn = one(cfg, wk, c2v("S", 100, ts=(tc, 0), src=src), now=now)
        assert syn[TCP].sport == 6000
        val = tcp_ts(syn)[0]
        if last_sent is not None:
            assert 0 < N.seq_diff(val, last_sent), (k, val, last_sent)
        # The connection runs for 2 s at the client's 1 kHz clock, sending its last segment.
        now += 2 * C.NS
        _, last = one(cfg, wk, c2v("PA", 101, 1, ts=((tc + 2000) & M32, 0), data=b"bye", src=src),
                      now=now)
        last_sent = tcp_ts(last)[0]
        assert N.seq_diff(last_sent, val) == 2000
        # reset (CLOSE) and expired: the port comes back for the next client
        one(cfg, wk, c2v("R", 104, src=src), now=now)
        now += 30 * C.NS
        for _ in range(3):
            run_packets(cfg, wk, [], now)
        assert wk.lport_count[cfg.svc_laddrs[1, 0]] == 1
        now += 1 * C.NS


def test_no_timestamp_option_stays_without():
    cfg, wk, _, _ = fnat(flags=XLATE)
    _, out = one(cfg, wk, c2v("S", 1000))
    assert tcp_ts(out) is None and not wk.conn[1]["flags"] & C.CONN_F_TS_XLATE


def test_reply_to_a_local_address_without_connection_is_counted():
    cfg, wk, _, _ = fnat()
    v, _ = one(cfg, wk, rs2l(LADDRS[0], 5001, "A", 1, 1))
    assert v == C.VERDICT_ACCEPT and wk.stats[C.STAT_FNAT_REPLY_NO_CONN] == 1
    v, _ = one(cfg, wk, IP(src=RS3, dst="172.16.2.99") / TCP(sport=80, dport=5001, flags="A"))
    assert wk.stats[C.STAT_FNAT_REPLY_NO_CONN] == 1


def test_synproxy_fullnat_translate():
    """SYN-proxy in front: the SYN to the RS carries the client's value on the laddr's clock;
    afterwards the RS's values are shifted into our cookie clock (ts_delta) and the client's
    into the laddr's (ts_off), echoes back."""
    cfg, wk, _, _ = SPT.fnat(flags=C.SVC_F_SYNPROXY | XLATE)
    isn = 2**32 - 2
    synack, syn = SPT.handshake(cfg, wk, isn, tsval=2**32 - 2)      # the ACK carries 2**32 - 1
    cookie, tb = synack[TCP].seq, tcp_ts(synack)[0]
    laddr, lport, s0 = syn.src, syn[TCP].sport, syn[TCP].seq
    clock = N.ts_clock(T.ip2int(laddr), NOW)
    assert tcp_ts(syn) == (clock, 0) and SPT.valid(syn)
    ts_off = (clock - (2**32 - 1)) & M32
    tr = 0xFFFFFF00
    v, _, tx = SPT.one(cfg, wk, IP(src=RS3, dst=laddr) / TCP(
        sport=80, dport=lport, flags="SA", seq=500, ack=(s0 + 1) % 2**32,
        options=[("MSS", 1460), ("NOP", None), ("NOP", None), ("Timestamp", (tr, clock))]))
    assert v == C.VERDICT_DROP and len(tx) == 1
    assert tcp_ts(tx[0]) == (clock, tr)                             # our ACK to the RS
    # client -> RS: value on the laddr clock, echo of our cookie clock mapped to the RS's
    v, out, _ = SPT.one(cfg, wk, SPT.cli("PA", isn + 1, cookie + 1,
                                         [("NOP", None), ("NOP", None), ("Timestamp", (5, tb))],
                                         b"GET /"))
    assert v == C.VERDICT_REWRITE and SPT.valid(out)
    assert tcp_ts(out) == ((5 + ts_off) & M32, tr)
    # RS -> client: value into the cookie clock, echo back to the client's own value
    v, back, _ = SPT.one(cfg, wk, IP(src=RS3, dst=laddr) / TCP(
        sport=80, dport=lport, flags="PA", seq=501, ack=(s0 + 6) % 2**32,
        options=[("NOP", None), ("NOP", None), ("Timestamp", ((tr + 20) & M32, (5 + ts_off) & M32))])
        / Raw(b"hello"))
    assert v == C.VERDICT_REWRITE and SPT.valid(back)
    assert tcp_ts(back) == ((tb + 20) & M32, 5)
