"""Packets queued with NFQA_CFG_F_GSO: partial checksums (NFQA_SKB_CSUMNOTREADY) and GSO packets
through process_batch, every rewrite path, checked against scapy.

What the kernel does with our rewritten packet decides what a correct result is (kernel-notes/
nfqueue-path.md §3.3): ``nfqnl_mangle()`` marks it CHECKSUM_NONE, so

* a packet that is not GSO leaves as it is: its L4 check field must hold the full checksum
  (``valid_l4``: what the receiver verifies);
* a GSO packet is segmented on its way out, starting from its check field as the pseudo-header
  sum: the field must be ``naive.pseudo_header_sum`` of the rewritten packet, and finishing it the
  kernel's way (``naive.kernel_complete``: sum from csum_start, field included, folded,
  complemented) must give the checksum scapy computes for the rewritten packet.

Inputs are built by scapy with correct checksums and turned partial with ``naive.make_partial``
(the check field then holds only the pseudo-header sum, as a sender's stack queues it).
"""

import struct

import numpy as np
from hypothesis import given, settings, strategies as st
from scapy.all import IP, TCP, UDP, Raw

from dataplane import consts as C
from dataplane import csum
from dataplane.batch import Batch, run_packets
from tests.naive import csum as naive
from tests.unit.test_pipeline import CLIENT, RS3, VIP, build

LADDRS = ["172.16.2.200", "172.16.2.201"]
NOW = 1000 * C.NS
PARTIAL = C.NFQA_SKB_CSUMNOTREADY
GSO = C.NFQA_SKB_CSUMNOTREADY | C.NFQA_SKB_GSO

payloads = st.binary(min_size=0, max_size=3000)
big_payloads = st.binary(min_size=1, max_size=9000)


def valid_l4(raw):
    """The receiver's test: the one's complement sum over pseudo-header and segment is 0xFFFF."""
    ihl = (raw[0] & 0xF) * 4
    tot = struct.unpack("!H", raw[2:4])[0]
    pseudo = raw[12:20] + struct.pack("!BBH", 0, raw[9], tot - ihl)
    return naive.ones_sum(pseudo + raw[ihl:tot]) == 0xFFFF


def valid_ip(raw):
    ihl = (raw[0] & 0xF) * 4
    return naive.ones_sum(raw[:ihl]) == 0xFFFF


def settled_ok(raw, info):
    """Is the rewritten packet what the kernel needs for a packet queued with ``info``?"""
    if not valid_ip(raw):
        return False
    if info & C.NFQA_SKB_GSO:
        field = naive.stored_l4_checksum(raw)
        return (field == naive.pseudo_header_sum(raw)
                and valid_l4(naive.kernel_complete(raw)))
    return valid_l4(raw)


def send(cfg, wk, pkt, info, now=NOW):
    """One packet, made partial when info says so; returns (verdict, rewritten bytes)."""
    raw = bytes(pkt)
    if info & (C.NFQA_SKB_CSUMNOTREADY | C.NFQA_SKB_GSO):
        raw = naive.make_partial(raw)
    [(v, out)] = run_packets(cfg, wk, [raw], now, skbinfo=[info])
    return v, out


def fnat(**kw):
    return build(fwd=C.FWD_FULLNAT, laddrs=LADDRS, **kw)


# --- the settle step against its twin -------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(payload=payloads, udp=st.booleans(), gso=st.booleans(), sport=st.integers(1, 65535))
def test_l4_settle_matches_naive(payload, udp, gso, sport):
    l4 = UDP(sport=sport, dport=53) if udp else TCP(sport=sport, dport=80, flags="PA", seq=7)
    raw = naive.make_partial(bytes(IP(src=CLIENT, dst=VIP) / l4 / Raw(payload)))
    buf = np.frombuffer(raw + b"\0" * 8, np.uint8).copy()
    info = GSO if gso else PARTIAL
    assert csum.l4_settle(buf, 0, info) == csum.SETTLE_DONE
    out = buf[:len(raw)].tobytes()
    assert settled_ok(out, info)
    if not gso:
        assert out == naive.finished(raw)
    assert out[:naive._check_at(raw)] == raw[:naive._check_at(raw)]     # nothing else moved


def test_l4_settle_refuses_fragments_and_skips_icmp():
    frag = bytes(IP(src=CLIENT, dst=VIP, flags="MF") / UDP(sport=1, dport=53) / Raw(b"x" * 40))
    buf = np.frombuffer(frag, np.uint8).copy()
    assert csum.l4_settle(buf, 0, PARTIAL) == csum.SETTLE_CANNOT
    icmp = bytes(IP(src=CLIENT, dst=VIP, proto=1) / Raw(b"\x08\0\0\0\0\0\0\0"))
    buf = np.frombuffer(icmp, np.uint8).copy()
    assert csum.l4_settle(buf, 0, GSO) == csum.SETTLE_NONE and buf.tobytes() == icmp


# --- NAT, both directions --------------------------------------------------------------------------
def _nat_tcp_established(cfg, wk, sport):
    v, _ = send(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags="S", seq=1),
                PARTIAL)
    assert v == C.VERDICT_REWRITE
    v, _ = send(cfg, wk, IP(src=RS3, dst=CLIENT) / TCP(sport=8080, dport=sport, flags="SA", seq=7,
                                                       ack=2), PARTIAL)
    assert v == C.VERDICT_REWRITE


@settings(max_examples=60, deadline=None)
@given(payload=big_payloads, gso=st.booleans(), sport=st.integers(1024, 65535))
def test_nat_tcp_both_directions(payload, gso, sport):
    cfg, wk, _, _ = build(dests=((RS3, 8080, 1),))
    _nat_tcp_established(cfg, wk, sport)
    info = GSO if gso else PARTIAL
    v, out = send(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags="PA", seq=2,
                                                         ack=8) / Raw(payload), info)
    assert v == C.VERDICT_REWRITE and settled_ok(out, info)
    got = IP(out)
    assert (got.dst, got[TCP].dport, bytes(got[TCP].payload)) == (RS3, 8080, payload)
    v, back = send(cfg, wk, IP(src=RS3, dst=CLIENT) / TCP(sport=8080, dport=sport, flags="PA",
                                                          seq=8, ack=2 + len(payload))
                   / Raw(payload[::-1]), info)
    assert v == C.VERDICT_REWRITE and settled_ok(back, info)
    got = IP(back)
    assert (got.src, got[TCP].sport, bytes(got[TCP].payload)) == (VIP, 80, payload[::-1])
    assert wk.stats[C.STAT_CSUM_SETTLED] == 4
    assert wk.stats[C.STAT_GSO_PACKETS] == (2 if gso else 0)


@settings(max_examples=40, deadline=None)
@given(payload=payloads, gso=st.booleans())
def test_nat_udp_both_directions(payload, gso):
    cfg, wk, _, _ = build(proto=C.IPPROTO_UDP, port=53, dests=((RS3, 5353, 1),))
    info = GSO if gso else PARTIAL
    v, out = send(cfg, wk, IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / Raw(payload), info)
    assert v == C.VERDICT_REWRITE and settled_ok(out, info)
    assert IP(out).dst == RS3 and IP(out)[UDP].dport == 5353
    v, back = send(cfg, wk, IP(src=RS3, dst=CLIENT) / UDP(sport=5353, dport=5000) / Raw(payload),
                   info)
    assert v == C.VERDICT_REWRITE and settled_ok(back, info)
    assert IP(back).src == VIP and IP(back)[UDP].sport == 53


def test_flag_off_is_todays_incremental_rewrite():
    """skbinfo 0: the checksum is updated incrementally, so a bad one stays bad (not laundered)."""
    cfg, wk, _, _ = build(proto=C.IPPROTO_UDP, port=53, dests=((RS3, 5353, 1),))
    raw = bytearray(bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / Raw(b"abc")))
    raw[-1] ^= 1                                       # corrupted on the wire
    [(v, out)] = run_packets(cfg, wk, [bytes(raw)], NOW, skbinfo=[C.NFQA_SKB_CSUM_NOTVERIFIED])
    assert v == C.VERDICT_REWRITE and not valid_l4(out)
    assert wk.stats[C.STAT_CSUM_SETTLED] == 0


def test_fragment_with_partial_checksum_is_dropped_and_counted():
    cfg, wk, _, _ = build(proto=C.IPPROTO_UDP, port=53, dests=((RS3, 5353, 1),))
    first = IP(src=CLIENT, dst=VIP, flags="MF", id=9) / UDP(sport=5000, dport=53, len=1008) / Raw(b"a" * 64)
    v, _ = send(cfg, wk, first, PARTIAL)
    assert v == C.VERDICT_DROP and wk.stats[C.DROP_CSUM_PARTIAL] == 1


def test_not_ours_partial_packet_is_accepted_untouched():
    cfg, wk, _, _ = build()
    raw = naive.make_partial(bytes(IP(src=CLIENT, dst="172.16.1.11") / TCP(dport=22) / Raw(b"x" * 3000)))
    [(v, out)] = run_packets(cfg, wk, [raw], NOW, skbinfo=[GSO])
    assert v == C.VERDICT_ACCEPT and out == raw      # the kernel keeps it CHECKSUM_PARTIAL
    assert wk.stats[C.STAT_GSO_PACKETS] == 1


# --- FULLNAT, both directions, with TOA / PROXY headers --------------------------------------------
def _fnat_open(cfg, wk, sport, isn, info):
    v, out = send(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags="S", seq=isn,
                                                         options=[("MSS", 1460)]), PARTIAL)
    assert v == C.VERDICT_REWRITE and settled_ok(out, PARTIAL)
    o = IP(out)
    laddr, lport, s0 = o.src, o[TCP].sport, o[TCP].seq
    v, back = send(cfg, wk, IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="SA", seq=500,
                                                         ack=s0 + 1, options=[("MSS", 1460)]),
                   PARTIAL)
    assert v == C.VERDICT_REWRITE and settled_ok(back, PARTIAL)
    return laddr, lport, s0


@settings(max_examples=40, deadline=None)
@given(payload=big_payloads, gso=st.booleans(), extra=st.sampled_from(
    [0, C.SVC_F_TOA, C.SVC_F_PROXY_V2, C.SVC_F_PROXY_V1, C.SVC_F_TOA | C.SVC_F_PROXY_V2]),
    isn=st.integers(0, 2**32 - 1))
def test_fullnat_tcp_both_directions(payload, gso, extra, isn):
    """The client's first data segment is the one that grows (TOA option, PROXY header): the
    property holds for it, and for the real server's answer."""
    cfg, wk, _, _ = fnat(flags=extra)
    sport = 40000
    laddr, lport, s0 = _fnat_open(cfg, wk, sport, isn, PARTIAL)
    info = GSO if gso else PARTIAL
    first = IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags="PA", seq=(isn + 1) % 2**32,
                                          ack=501) / Raw(payload)
    v, out = send(cfg, wk, first, info)
    assert v == C.VERDICT_REWRITE and settled_ok(out, info)
    o = IP(out)
    assert (o.src, o.dst, o[TCP].sport) == (laddr, RS3, lport)
    body = bytes(o[TCP].payload)
    assert body.endswith(payload)
    grew = len(body) - len(payload)
    if extra & (C.SVC_F_PROXY_V1 | C.SVC_F_PROXY_V2):
        assert grew > 0 and body.startswith(b"PROXY" if extra & C.SVC_F_PROXY_V1 else b"\r\n\r\n")
    else:
        assert grew == 0
    if extra & C.SVC_F_TOA:
        assert b"\xfe\x08" in bytes(o[TCP])[20:o[TCP].dataofs * 4]
    v, back = send(cfg, wk, IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="PA", seq=501,
                                                         ack=(s0 + 1 + len(body)) % 2**32)
                   / Raw(payload[::-1]), info)
    assert v == C.VERDICT_REWRITE and settled_ok(back, info)
    b = IP(back)
    assert (b.src, b.dst, b[TCP].sport, b[TCP].dport) == (VIP, CLIENT, 80, sport)
    assert b[TCP].ack == (isn + 1 + len(payload)) % 2**32
    assert bytes(b[TCP].payload) == payload[::-1]


@settings(max_examples=30, deadline=None)
@given(payload=payloads, gso=st.booleans())
def test_fullnat_udp_both_directions(payload, gso):
    cfg, wk, _, _ = fnat(proto=C.IPPROTO_UDP, port=53, dests=((RS3, 5353, 1),))
    info = GSO if gso else PARTIAL
    v, out = send(cfg, wk, IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / Raw(payload), info)
    assert v == C.VERDICT_REWRITE and settled_ok(out, info)
    o = IP(out)
    assert o.src in LADDRS and o.dst == RS3
    v, back = send(cfg, wk, IP(src=RS3, dst=o.src) / UDP(sport=5353, dport=o[UDP].sport)
                   / Raw(payload), info)
    assert v == C.VERDICT_REWRITE and settled_ok(back, info)
    assert (IP(back).src, IP(back).dst) == (VIP, CLIENT)


# --- SYN-proxy ---------------------------------------------------------------------------------------
def _cli(flags, seq, ack=0, options=(), data=b""):
    p = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags=flags, seq=seq % 2**32,
                                      ack=ack % 2**32, options=list(options))
    return p / Raw(data) if data else p


def _run(cfg, wk, pkt, info):
    b = Batch(max_pkts=1)
    raw = naive.make_partial(bytes(pkt)) if info else bytes(pkt)
    b.add(raw, skbinfo=info)
    v = int(b.run(cfg, wk, NOW)[0])
    return v, b.packet(0), b.tx_packets()


def test_synproxy_partial_syn_held_segments_and_gso_while_syn_sent():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    isn = 1000
    v, synack, tx = _run(cfg, wk, _cli("S", isn, options=[("MSS", 1460)]), PARTIAL)
    assert v == C.VERDICT_REWRITE and settled_ok(synack, PARTIAL) and not tx
    cookie = IP(synack)[TCP].seq
    v, _, tx = _run(cfg, wk, _cli("A", isn + 1, cookie + 1), PARTIAL)
    assert v == C.VERDICT_DROP and len(tx) == 1                # our SYN to the RS
    # While the RS has not answered: a partial data segment is held (and finished before it is
    # copied: it leaves through the raw socket), a GSO one is dropped and counted, never held.
    v, _, tx = _run(cfg, wk, _cli("PA", isn + 1, cookie + 1, data=b"held"), PARTIAL)
    assert v == C.VERDICT_DROP and wk.stats[C.STAT_SYNPROXY_ACK_STORED] == 1
    v, _, tx = _run(cfg, wk, _cli("PA", isn + 5, cookie + 1, data=b"g" * 5000), GSO)
    assert v == C.VERDICT_DROP and wk.stats[C.DROP_SYNPROXY_SYN_SENT] == 1
    # Longer than a hold slot without being GSO (a jumbo frame): dropped too, never truncated.
    v, _, tx = _run(cfg, wk, _cli("PA", isn + 5, cookie + 1, data=b"j" * 3000), PARTIAL)
    assert v == C.VERDICT_DROP and wk.stats[C.DROP_SYNPROXY_SYN_SENT] == 2
    assert wk.stats[C.STAT_SYNPROXY_ACK_STORED] == 1
    rs = IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA", seq=77, ack=isn + 1,
                                       options=[("MSS", 1460)])
    v, _, tx = _run(cfg, wk, rs, PARTIAL)
    assert v == C.VERDICT_DROP and len(tx) == 2               # our ACK, then the held segment
    held = tx[1]
    assert valid_ip(held) and valid_l4(held) and bytes(IP(held)[TCP].payload) == b"held"
    # Established: GSO both ways, sequence numbers translated, checksums settled.
    v, out, _ = _run(cfg, wk, _cli("PA", isn + 5, cookie + 1, data=b"d" * 7000), GSO)
    assert v == C.VERDICT_REWRITE and settled_ok(out, GSO) and IP(out)[TCP].ack == 78
    back = IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="PA", seq=78,
                                         ack=isn + 7005) / Raw(b"r" * 6000)
    v, out, _ = _run(cfg, wk, back, GSO)
    assert v == C.VERDICT_REWRITE and settled_ok(out, GSO)
    assert IP(out)[TCP].seq == cookie + 1 and IP(out).src == VIP
