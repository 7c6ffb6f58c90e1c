"""FULLNAT through process_batch: golden exchanges, forward then reverse, checked with scapy from
each end's point of view (the client sees VIP:vport and its own sequence space; the real server
sees laddr:lport, its sequence space, the TOA option or the PROXY header)."""

import struct

from scapy.all import IP, TCP, UDP, Raw

from dataplane import consts as C
from dataplane.batch import run_packets
from tests.unit.test_pipeline import CLIENT, RS3, VIP, build

LADDRS = ["172.16.2.200", "172.16.2.201"]
NOW = 1000 * C.NS


def fnat(**kw):
    return build(fwd=C.FWD_FULLNAT, laddrs=kw.pop("laddrs", LADDRS), **kw)


def one(cfg, wk, pkt, now=NOW):
    [(v, out)] = run_packets(cfg, wk, [bytes(pkt)], now)
    return v, IP(out)


def valid(pkt):
    """Both checksums as scapy computes them."""
    raw = bytes(pkt)
    again = IP(raw)
    del again.chksum
    del again[again.payload.__class__].chksum
    return bytes(IP(bytes(again))) == raw


def test_tcp_exchange_both_directions():
    cfg, wk, _, _ = fnat()
    syn = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S", seq=1000,
                                        options=[("MSS", 1460), ("Timestamp", (5, 0)), ("SAckOK", b"")])
    v, out = one(cfg, wk, syn)
    assert v == C.VERDICT_REWRITE and valid(out)
    assert out.src in LADDRS and out.dst == RS3 and out[TCP].dport == 80
    assert 5000 <= out[TCP].sport <= 65535
    assert "Timestamp" not in dict(out[TCP].options)        # stripped: PAWS per laddr
    laddr, lport, rs_isn_base = out.src, out[TCP].sport, out[TCP].seq
    # The real server answers the local address.
    synack = IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="SA", seq=77, ack=rs_isn_base + 1,
                                          options=[("MSS", 1460)])
    v, back = one(cfg, wk, synack)
    assert valid(back) and back.src == VIP and back.dst == CLIENT
    assert back[TCP].sport == 80 and back[TCP].dport == 40000
    assert back[TCP].ack == 1001                           # the client's own sequence space
    data = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="PA", seq=1001, ack=78) / Raw(b"GET /")
    v, out = one(cfg, wk, data)
    assert valid(out) and out[TCP].seq == rs_isn_base + 1 and out[TCP].ack == 78
    assert bytes(out[TCP].payload) == b"GET /"
    reply = IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="PA", seq=78, ack=rs_isn_base + 6) / Raw(b"hi")
    v, back = one(cfg, wk, reply)
    assert valid(back) and back[TCP].ack == 1006 and bytes(back[TCP].payload) == b"hi"
    assert wk.laddr_conns[cfg.svc_laddrs[1, 0]] + wk.laddr_conns[cfg.svc_laddrs[1, 1]] == 1


def test_proxy_v2_header_rides_in_the_handshake_ack():
    cfg, wk, _, _ = fnat(flags=C.SVC_F_PROXY_V2)
    _, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=40001, dport=80, flags="S", seq=2**32 - 3,
                                                       options=[("MSS", 1460)]))
    laddr, lport, s0 = out.src, out[TCP].sport, out[TCP].seq
    _, back = one(cfg, wk, IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="SA", seq=500,
                                                        ack=s0 + 1, options=[("MSS", 1460)]))
    assert back[TCP].ack == (2**32 - 3 + 1) % 2**32
    assert dict(back[TCP].options)["MSS"] == 1460 - 28      # room for a re-inserted header
    # The handshake ACK carries the header: exactly 28 bytes, v2 signature, the client address.
    _, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=40001, dport=80, flags="A",
                                                       seq=(2**32 - 2) % 2**32, ack=501))
    hdr = bytes(out[TCP].payload)
    assert valid(out) and len(hdr) == 28 and hdr[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    assert hdr[16:20] == bytes(map(int, CLIENT.split("."))) and struct.unpack("!H", hdr[24:26])[0] == 40001
    assert out[TCP].seq == (s0 + 1) % 2**32
    # The RS acknowledges the header; the client never sees those 28 bytes (wrap at 2**32).
    _, back = one(cfg, wk, IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="A", seq=501,
                                                        ack=(s0 + 1 + 28) % 2**32))
    assert back[TCP].ack == (2**32 - 2) % 2**32
    _, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=40001, dport=80, flags="PA", seq=2**32 - 2,
                                                       ack=501) / Raw(b"abcd"))
    assert out[TCP].seq == (s0 + 1 + 28) % 2**32 and bytes(out[TCP].payload) == b"abcd"
    wk_flags = wk.conn[1]["flags"]
    assert wk_flags & C.CONN_F_PP_ACKED


def test_toa_in_syn_and_first_ack():
    cfg, wk, _, _ = fnat(flags=C.SVC_F_TOA)
    _, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=40002, dport=80, flags="S", seq=9,
                                                       options=[("MSS", 1460)]))
    raw = bytes(out[TCP])
    assert valid(out)
    opts = raw[20:out[TCP].dataofs * 4]
    i = opts.find(b"\xfe\x08")
    assert i >= 0 and opts[i + 2:i + 4] == struct.pack("!H", 40002)
    assert opts[i + 4:i + 8] == bytes(map(int, CLIENT.split(".")))
    laddr, lport, s0 = out.src, out[TCP].sport, out[TCP].seq
    _, back = one(cfg, wk, IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="SA", seq=1,
                                                        ack=s0 + 1, options=[("MSS", 1460)]))
    assert dict(back[TCP].options)["MSS"] == 1452
    _, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=40002, dport=80, flags="A", seq=10, ack=2))
    assert b"\xfe\x08" in bytes(out[TCP])[20:out[TCP].dataofs * 4] and valid(out)


def test_udp_fullnat():
    cfg, wk, _, _ = fnat(proto=C.IPPROTO_UDP, port=53, dests=((RS3, 5353, 1),))
    v, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / b"q")
    assert valid(out) and out.src in LADDRS and out.dst == RS3 and out[UDP].dport == 5353
    v, back = one(cfg, wk, IP(src=RS3, dst=out.src) / UDP(sport=5353, dport=out[UDP].sport) / b"a")
    assert valid(back) and (back.src, back.dst, back[UDP].sport, back[UDP].dport) == (VIP, CLIENT, 53, 5000)


def test_pool_exhaustion_drops_new_and_frees_ports_on_expiry():
    cfg, wk, _, _ = fnat(laddrs=["172.16.2.200"], port_lo=6000, port_hi=6009, max_conns=64)
    verdicts = [one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=1000 + i, dport=80, flags="S"))[0]
                for i in range(12)]
    assert verdicts == [C.VERDICT_REWRITE] * 10 + [C.VERDICT_DROP] * 2
    assert wk.stats[C.DROP_LADDR_EXHAUSTED] == 2
    # Established ones keep working; after they expire, the ports come back.
    v, _ = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=1000, dport=80, flags="A"))
    assert v == C.VERDICT_REWRITE
    later = NOW + 200 * C.NS
    for _ in range(5):
        run_packets(cfg, wk, [], later)
    v, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=2000, dport=80, flags="S"), now=later)
    # 6000 still serves the established connection; 6001..6009 came back in expiry order and
    # the first one freed is the first one reused.
    assert v == C.VERDICT_REWRITE and out[TCP].sport == 6001


def test_many_connections_no_port_collision():
    cfg, wk, _, _ = fnat(max_conns=4096)
    seen = set()
    for i in range(2000):
        _, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=10000 + i, dport=80, flags="S"))
        key = (out.src, out[TCP].sport, out.dst, out[TCP].dport)
        assert key not in seen
        seen.add(key)
    assert {k[0] for k in seen} == set(LADDRS)
