"""Golden packets through process_batch: (description, input, expected verdict, expected output),
forward then reverse so the reverse case proves the connection state. Expected packets are built
by scapy independently of the engine."""

import numpy as np
from scapy.all import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror, Raw

from control.apply import DestSpec, ServiceSpec, TableWriter
from dataplane import consts as C
from dataplane import tables as T
from dataplane.batch import run_packets

VIP, CLIENT, RS3, RS4 = "172.16.1.100", "172.16.1.12", "172.16.2.13", "172.16.2.14"
NOW = 1000 * C.NS


def build(sched=C.SCHED_RR, proto=C.IPPROTO_TCP, port=80, dests=((RS3, 80, 1), (RS4, 80, 1)),
          max_conns=1024, **kw):
    cfg = T.new_config()
    wk = T.new_worker(max_conns=max_conns, port_lo=kw.pop("port_lo", T.LPORT_LO),
                      port_hi=kw.pop("port_hi", T.LPORT_HI))
    tw = TableWriter(cfg, on_new_laddr=lambda lid, _addr: T.init_laddr(wk, lid))
    fwd = kw.pop("fwd", C.FWD_MASQ)
    spec = ServiceSpec(proto=proto, addr=VIP, port=port, sched=sched, fwd=fwd,
                       dests=[DestSpec(a, p, w, fwd) for a, p, w in dests], **kw)
    tw.sync([spec])
    return cfg, wk, tw, spec


def same(a, b):
    """Compare packets as scapy sees them, with checksums recomputed by scapy for b."""
    return bytes(a) == bytes(IP(bytes(b)))


def one(cfg, wk, pkt, now=NOW, mark=0):
    [(v, out)] = run_packets(cfg, wk, [bytes(pkt)], now, marks=[mark])
    return v, out


def test_tcp_nat_forward_then_reverse():
    cfg, wk, _, _ = build()
    syn = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S", seq=1)
    v, out = one(cfg, wk, syn)
    assert v == C.VERDICT_REWRITE
    assert same(out, IP(src=CLIENT, dst=RS3) / TCP(sport=40000, dport=80, flags="S", seq=1))
    synack = IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA", seq=7, ack=2)
    v, out = one(cfg, wk, synack)
    assert v == C.VERDICT_REWRITE
    assert same(out, IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA", seq=7, ack=2))
    ack = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="A", seq=2, ack=8) / Raw(b"GET /")
    v, out = one(cfg, wk, ack)
    assert same(out, IP(src=CLIENT, dst=RS3) / TCP(sport=40000, dport=80, flags="A", seq=2, ack=8) / Raw(b"GET /"))
    # ESTABLISHED now: the real server counts one active connection.
    did = cfg.svc_dests[1, 0]
    assert wk.active[did] == 1 and wk.inactive[did] == 0
    assert wk.dest_cnt[did, T.CNT_CONNS] == 1
    assert wk.dest_cnt[did, T.CNT_INPKTS] == 2 and wk.dest_cnt[did, T.CNT_OUTPKTS] == 1
    assert wk.svc_cnt[1, T.CNT_INBYTES] == len(syn) + len(ack)


def test_rr_alternates_new_connections():
    cfg, wk, _, _ = build()
    dsts = []
    for i in range(6):
        v, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=41000 + i, dport=80, flags="S"))
        dsts.append(IP(out).dst)
    assert dsts == [RS3, RS4] * 3


def test_non_syn_without_connection_goes_to_local_stack():
    cfg, wk, _, _ = build()
    pkt = IP(src=CLIENT, dst=VIP) / TCP(sport=42000, dport=80, flags="A")
    v, out = one(cfg, wk, pkt)
    assert v == C.VERDICT_ACCEPT and out == bytes(pkt)
    assert wk.stats[C.STAT_NOT_SYN] == 1 and wk.ctl[T.CTL_N_CONNS] == 0


def test_not_ours_is_accepted_unchanged():
    cfg, wk, _, _ = build()
    for pkt in (IP(src=CLIENT, dst="172.16.1.11") / TCP(dport=22, flags="S"),
                IP(src=CLIENT, dst=VIP) / TCP(dport=443, flags="S"),
                IP(src=CLIENT, dst=VIP) / ICMP()):
        v, out = one(cfg, wk, pkt)
        assert v == C.VERDICT_ACCEPT and out == bytes(pkt)
    assert wk.stats[C.STAT_NOT_OURS] == 3


def test_udp_keeps_client_socket_on_one_real_server():
    cfg, wk, _, _ = build(proto=C.IPPROTO_UDP, port=53, dests=((RS3, 5353, 1), (RS4, 5353, 1)))
    outs = [IP(one(cfg, wk, IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / b"q")[1])
            for _ in range(3)]
    assert {(o.dst, o.dport) for o in outs} == {(RS3, 5353)}
    other = IP(one(cfg, wk, IP(src=CLIENT, dst=VIP) / UDP(sport=5001, dport=53) / b"q")[1])
    assert other.dst == RS4
    v, out = one(cfg, wk, IP(src=RS3, dst=CLIENT) / UDP(sport=5353, dport=5000) / b"a")
    assert same(out, IP(src=VIP, dst=CLIENT) / UDP(sport=53, dport=5000) / b"a")
    assert wk.conn[1]["state"] == C.IP_VS_UDP_S_NORMAL
    assert wk.conn[1]["expire_ns"] == NOW + 300 * C.NS


def test_icmp_frag_needed_from_real_server_side_is_translated():
    cfg, wk, _, _ = build()
    one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=43000, dport=80, flags="S"))
    # A router on the real-server side cannot forward the rewritten datagram (client -> RS3).
    quoted = IP(src=CLIENT, dst=RS3, flags="DF") / TCP(sport=43000, dport=80, flags="A", seq=5)
    err = IP(src="172.16.2.1", dst=CLIENT) / ICMP(type=3, code=4, nexthopmtu=1300) / bytes(quoted)[:28]
    v, out = one(cfg, wk, err)
    assert v == C.VERDICT_REWRITE
    got = IP(out)
    assert got.src == VIP and got.dst == CLIENT
    inner = got[IPerror]
    assert inner.src == CLIENT and inner.dst == VIP and got[TCPerror].dport == 80
    assert got[ICMP].nexthopmtu == 1300
    # Every checksum (outer IP, ICMP, quoted IP) is valid: rebuild with scapy and compare.
    rebuilt = IP(out)
    del rebuilt.chksum, rebuilt[ICMP].chksum, rebuilt[IPerror].chksum
    assert bytes(rebuilt) == out
    assert wk.stats[C.STAT_ICMP_XLATE] == 1


def test_icmp_port_unreachable_from_client_side_is_translated():
    cfg, wk, _, _ = build(proto=C.IPPROTO_UDP, port=53, dests=((RS3, 5353, 1),))
    one(cfg, wk, IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / b"q")
    # The client's socket closed; it answers the reply (VIP -> client) with port unreachable.
    quoted = IP(src=VIP, dst=CLIENT) / UDP(sport=53, dport=5000) / b"a"
    err = IP(src=CLIENT, dst=VIP) / ICMP(type=3, code=3) / bytes(quoted)
    v, out = one(cfg, wk, err)
    got = IP(out)
    assert v == C.VERDICT_REWRITE and got.dst == RS3
    assert got[IPerror].src == RS3 and got[UDPerror].sport == 5353


def test_stale_icmp_error_is_dropped_and_counted():
    cfg, wk, _, _ = build()
    quoted = IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=1234)
    err = IP(src=CLIENT, dst=VIP) / ICMP(type=3, code=3) / bytes(quoted)[:28]
    v, _ = one(cfg, wk, err)
    assert v == C.VERDICT_DROP and wk.stats[C.DROP_ICMP_NO_CONN] == 1


def test_persistence_template_keeps_client_on_one_server():
    cfg, wk, _, _ = build(flags=C.SVC_F_PERSISTENT, persist_timeout_s=50,
                          persist_mask="255.255.255.0")
    dsts = {IP(one(cfg, wk, IP(src=f"10.0.0.{i}", dst=VIP) / TCP(sport=1000 + i, dport=80, flags="S"))[1]).dst
            for i in range(1, 6)}
    assert len(dsts) == 1                  # one /24: one template
    other = IP(one(cfg, wk, IP(src="10.0.1.1", dst=VIP) / TCP(sport=999, dport=80, flags="S"))[1]).dst
    assert other != dsts.pop()
    assert wk.ctl[T.CTL_N_TEMPLATES] == 2 and wk.stats[C.STAT_TEMPLATE_HIT] == 4


def test_unavailable_servers_and_sorry_server():
    cfg, wk, tw, spec = build(sorry=DestSpec("172.16.2.99", 8080, 1))
    for d in spec.dests:
        tw.set_available(spec.key, d.key, False)
    v, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=44000, dport=80, flags="S"))
    assert v == C.VERDICT_REWRITE and IP(out).dst == "172.16.2.99" and IP(out).dport == 8080
    spec.sorry = None
    tw.sync([spec])
    v, _ = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=44001, dport=80, flags="S"))
    assert v == C.VERDICT_DROP and wk.stats[C.DROP_NO_DEST] == 1


def test_connection_table_full_drops_new_and_keeps_established():
    cfg, wk, _, _ = build(max_conns=2)
    for sp in (1, 2):
        assert one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=sp, dport=80, flags="S"))[0] == C.VERDICT_REWRITE
    v, _ = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=3, dport=80, flags="S"))
    assert v == C.VERDICT_DROP and wk.stats[C.DROP_CONN_FULL] == 1
    v, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=80, flags="A"))
    assert v == C.VERDICT_REWRITE and IP(out).dst == RS3


def test_syn_on_time_wait_connection_is_rescheduled():
    cfg, wk, _, _ = build()
    c2v = lambda f: IP(src=CLIENT, dst=VIP) / TCP(sport=45000, dport=80, flags=f)
    r2c = lambda f: IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=45000, flags=f)
    for pkt in (c2v("S"), r2c("SA"), c2v("A"), c2v("FA"), r2c("FA"), c2v("A")):
        one(cfg, wk, pkt)
    assert wk.conn[1]["state"] == C.IP_VS_TCP_S_TIME_WAIT
    v, out = one(cfg, wk, c2v("S"))
    assert v == C.VERDICT_REWRITE and IP(out).dst == RS4     # rr moved on: a new connection
    assert wk.stats[C.STAT_CONN_REUSED] == 1


def test_expired_connection_is_replaced():
    cfg, wk, _, _ = build(proto=C.IPPROTO_UDP, port=53, dests=((RS3, 5353, 1), (RS4, 5353, 1)))
    one(cfg, wk, IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53))
    v, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53), now=NOW + 301 * C.NS)
    assert IP(out).dst == RS4


def test_fwmark_service():
    cfg = T.new_config()
    wk = T.new_worker(max_conns=16)
    TableWriter(cfg).sync([ServiceSpec(proto=C.IPPROTO_TCP, addr=None, port=0, fwmark=7,
                                       sched=C.SCHED_RR, dests=[DestSpec(RS3, 0, 1)])])
    v, out = one(cfg, wk, IP(src=CLIENT, dst="172.16.1.200") / TCP(sport=5, dport=8080, flags="S"), mark=7)
    assert v == C.VERDICT_REWRITE and IP(out).dst == RS3 and IP(out).dport == 8080
    v, _ = one(cfg, wk, IP(src=CLIENT, dst="172.16.1.200") / TCP(sport=6, dport=8080, flags="S"))
    assert v == C.VERDICT_ACCEPT


def test_ip_options_are_handled():
    cfg, wk, _, _ = build()
    pkt = IP(src=CLIENT, dst=VIP, options=[b"\x94\x04\x00\x00"]) / TCP(sport=46000, dport=80, flags="S")
    v, out = one(cfg, wk, pkt)
    assert v == C.VERDICT_REWRITE
    assert same(out, IP(src=CLIENT, dst=RS3, options=[b"\x94\x04\x00\x00"]) / TCP(sport=46000, dport=80, flags="S"))
    assert wk.stats[C.STAT_IP_OPTIONS] == 1


def test_later_fragment_without_first_is_counted():
    cfg, wk, _, _ = build()
    frag = IP(src=CLIENT, dst=VIP, proto=6, frag=100) / Raw(b"x" * 40)
    v, _ = one(cfg, wk, frag)
    assert v == C.VERDICT_DROP and wk.stats[C.DROP_FRAGMENT] == 1


def test_one_batch_many_flows_interleaved():
    """The same packets give the same results whole-batch and one by one."""
    pkts = []
    for i in range(20):
        pkts.append(bytes(IP(src=f"10.9.0.{i}", dst=VIP) / TCP(sport=2000 + i, dport=80, flags="S")))
        pkts.append(bytes(IP(src="10.8.0.1", dst="10.8.0.2") / UDP(sport=1, dport=2)))
    cfg, wk, _, _ = build()
    batch = run_packets(cfg, wk, pkts, NOW)
    cfg2, wk2, _, _ = build()
    single = [run_packets(cfg2, wk2, [p], NOW)[0] for p in pkts]
    assert batch == single
    assert np.array_equal(wk.stats, wk2.stats)


def test_expire_nodest_conn_sends_the_next_packet_to_the_local_stack():
    from control.apply import expire_dest_conns
    cfg, wk, tw, spec = build()
    for sp in (1, 2, 3, 4):
        one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=sp, dport=80, flags="S"))
    rs3 = tw.dest_ids[(spec.key, (RS3, 80), False)]
    tw.set_available(spec.key, (RS3, 80), False)
    assert expire_dest_conns([wk], rs3) == 2
    # sport 1 was on RS3: its next packet finds no connection (RST from the local stack) ...
    v, _ = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=80, flags="A"))
    assert v == C.VERDICT_ACCEPT and wk.stats[C.STAT_NOT_SYN] == 1
    # ... sport 2 was on RS4 and continues; a new SYN from sport 1 goes to RS4.
    v, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=2, dport=80, flags="A"))
    assert v == C.VERDICT_REWRITE and IP(out).dst == RS4
    v, out = one(cfg, wk, IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=80, flags="S"))
    assert IP(out).dst == RS4
