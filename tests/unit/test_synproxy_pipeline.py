"""SYN-proxy through process_batch: golden exchanges, checked with scapy from each end's point of
view. The client only ever sees VIP:vport, the cookie's sequence space and our TS clock; the real
server sees the client (NAT) or laddr:lport (FULLNAT), its own ISN and its own TS clock. The
generated packets (SYN and ACK to the real server, RSTs) are taken from the batch's tx ring."""

import struct

import numpy as np
from scapy.all import IP, TCP, Raw

from control.synproxy_settings import SynproxySettings
from dataplane import conntrack as CT
from dataplane import consts as C
from dataplane import synproxy as SP
from dataplane import tables as T
from dataplane.batch import Batch
from tests.unit.test_pipeline import CLIENT, RS3, VIP, build

LADDRS = ["172.16.2.200", "172.16.2.201"]
NOW = 1000 * C.NS
M32 = 2**32 - 1
OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (100, 0)), ("WScale", 7)]


def run(cfg, wk, pkts, now=NOW):
    """[(verdict, IP)], [IP generated]"""
    b = Batch(max_pkts=max(1, len(pkts)))
    for p in pkts:
        b.add(bytes(p))
    v = b.run(cfg, wk, now)
    return [(int(v[i]), IP(b.packet(i))) for i in range(b.n)], [IP(x) for x in b.tx_packets()]


def one(cfg, wk, pkt, now=NOW):
    [(v, out)], tx = run(cfg, wk, [pkt], now)
    return v, out, tx


def valid(pkt):
    raw = bytes(pkt)
    again = IP(raw)
    del again.chksum
    del again[TCP].chksum
    return bytes(IP(bytes(again))) == raw


def opts(pkt):
    return dict(pkt[TCP].options)


def cli(flags, seq, ack=0, options=(), data=b"", sport=40000):
    p = IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags=flags, seq=seq % 2**32,
                                      ack=ack % 2**32, options=list(options))
    return p / Raw(data) if data else p


def handshake(cfg, wk, isn, sport=40000, tsval=100):
    """SYN -> cookie SYN-ACK; the client's ACK -> SYN to the RS. Returns (synack, rs_syn)."""
    o = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (tsval, 0)), ("WScale", 7)]
    v, synack, tx = one(cfg, wk, cli("S", isn, options=o, sport=sport))
    assert v == C.VERDICT_REWRITE and not tx
    tb = opts(synack)["Timestamp"][0]
    v, _, tx = one(cfg, wk, cli("A", isn + 1, synack[TCP].seq + 1,
                                [("NOP", None), ("NOP", None), ("Timestamp", (tsval + 1, tb))],
                                sport=sport))
    assert v == C.VERDICT_DROP and len(tx) == 1
    return synack, tx[0]


def test_syn_answered_with_cookie_and_no_state():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY)
    v, out, tx = one(cfg, wk, cli("S", 1000, options=OPTS))
    assert v == C.VERDICT_REWRITE and valid(out) and not tx
    assert (out.src, out.dst, out[TCP].sport, out[TCP].dport) == (VIP, CLIENT, 80, 40000)
    assert out[TCP].flags == "SA" and out[TCP].ack == 1001
    o = opts(out)
    assert o["MSS"] == 1452 and "SAckOK" in o and o["Timestamp"][1] == 100
    assert "WScale" not in o                    # synproxy_wscale 0: no window scaling offered
    assert wk.ctl[T.CTL_N_CONNS] == 0 and wk.stats[C.STAT_SYNPROXY_COOKIE_SENT] == 1
    # Without timestamps only the MSS is offered.
    v, out, _ = one(cfg, wk, cli("S", 5, options=[("MSS", 1300)], sport=40001))
    assert v == C.VERDICT_REWRITE and opts(out) == {"MSS": 1300}


def test_forged_and_stale_acks_are_dropped_and_counted():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY)
    v, synack, _ = one(cfg, wk, cli("S", 1000, options=OPTS))
    # (As the kernel's, the ISN is added, not hashed: off by less than N_MSS decodes as a
    # neighbouring MSS index; only someone who saw the SYN-ACK can do that.)
    for ack in (12345, synack[TCP].seq + 1 + 2**20, synack[TCP].seq - 100):
        v, _, tx = one(cfg, wk, cli("A", 1001, ack))
        assert v == C.VERDICT_DROP and not tx
    v, _, tx = one(cfg, wk, cli("A", 1001, synack[TCP].seq + 1), now=NOW + 10 * 60 * C.NS)
    assert v == C.VERDICT_DROP and not tx          # older than the cookie lifetime
    assert wk.stats[C.DROP_SYNPROXY_BAD_ACK] == 4 and wk.ctl[T.CTL_N_CONNS] == 0
    # RST/FIN with no connection: the local stack answers, as without SYN-proxy.
    v, _, _ = one(cfg, wk, cli("R", 1001))
    assert v == C.VERDICT_ACCEPT and wk.stats[C.STAT_NOT_SYN] == 1


def test_previous_secret_generation_still_checks():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY)
    v, synack, _ = one(cfg, wk, cli("S", 1000, options=OPTS))
    T.rotate_sp_secrets(cfg)
    v, _, tx = one(cfg, wk, cli("A", 1001, synack[TCP].seq + 1))
    assert v == C.VERDICT_DROP and len(tx) == 1 and wk.stats[C.STAT_SYNPROXY_OK_ACK] == 1
    T.rotate_sp_secrets(cfg)
    _, synack, _ = one(cfg, wk, cli("S", 1000, sport=40001))
    T.rotate_sp_secrets(cfg)
    T.rotate_sp_secrets(cfg)
    v, _, tx = one(cfg, wk, cli("A", 1001, synack[TCP].seq + 1, sport=40001))
    assert v == C.VERDICT_DROP and not tx and wk.stats[C.DROP_SYNPROXY_BAD_ACK] == 1


def test_nat_full_exchange_with_sequence_wrap():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY)
    isn = 2**32 - 3                                 # the client's stream wraps after 2 bytes
    synack, syn = handshake(cfg, wk, isn)
    cookie, tb = synack[TCP].seq, opts(synack)["Timestamp"][0]
    # The SYN to the real server: the client's tuple, ISN and TS value; the cookie's MSS.
    assert valid(syn) and (syn.src, syn.dst, syn[TCP].sport, syn[TCP].dport) == (CLIENT, RS3, 40000, 80)
    assert syn[TCP].flags == "S" and syn[TCP].seq == isn
    o = opts(syn)
    assert o["MSS"] == 1452 and "SAckOK" in o and o["Timestamp"] == (101, 0)
    c = wk.conn[1]
    assert c["state"] == C.IP_VS_TCP_S_SYN_SENT and c["flags"] & C.CONN_F_SYNPROXY
    assert wk.stats[C.STAT_SYNPROXY_OK_ACK] == 1
    # Client data while the RS has not answered: the first segment is held, later ones dropped.
    early = cli("PA", isn + 1, cookie + 1, [("NOP", None), ("NOP", None), ("Timestamp", (102, tb))],
                b"early")
    v, _, tx = one(cfg, wk, early)
    assert v == C.VERDICT_DROP and not tx and wk.stats[C.STAT_SYNPROXY_ACK_STORED] == 1
    v, _, tx = one(cfg, wk, early)
    assert v == C.VERDICT_DROP and not tx and wk.stats[C.DROP_SYNPROXY_SYN_SENT] == 1
    # The RS's SYN-ACK (ISN near the wrap too) is consumed; our ACK completes its handshake.
    rs_isn = 2**32 - 1
    v, _, tx = one(cfg, wk, IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA", seq=rs_isn,
                                                         ack=isn + 1, options=[("MSS", 1460), ("SAckOK", b""),
                                                                               ("Timestamp", (5000, 101))]))
    assert v == C.VERDICT_DROP and len(tx) == 2
    ack, held = tx
    # The held segment follows our ACK, already in the RS's spaces.
    assert valid(held) and (held.src, held.dst, held[TCP].dport) == (CLIENT, RS3, 80)
    assert held[TCP].seq == (isn + 1) % 2**32 and held[TCP].ack == 0
    assert opts(held)["Timestamp"] == (102, 5000) and bytes(held[TCP].payload) == b"early"
    assert valid(ack) and (ack.src, ack.dst, ack[TCP].sport, ack[TCP].dport) == (CLIENT, RS3, 40000, 80)
    assert ack[TCP].flags == "A" and ack[TCP].seq == (isn + 1) % 2**32 and ack[TCP].ack == 0
    assert opts(ack)["Timestamp"] == (101, 5000)
    assert wk.conn[1]["state"] == C.IP_VS_TCP_S_ESTABLISHED and wk.stats[C.STAT_SYNPROXY_RS_SYNACK] == 1
    did = cfg.svc_dests[1, 0]
    assert wk.active[did] == 1 and wk.inactive[did] == 0
    # Data both ways, each side in its own sequence and TS space.
    v, out, _ = one(cfg, wk, cli("PA", isn + 1, cookie + 1, [("NOP", None), ("NOP", None),
                                                             ("Timestamp", (102, tb))], b"GET /"))
    assert v == C.VERDICT_REWRITE and valid(out) and out.dst == RS3 and out.src == CLIENT
    assert out[TCP].seq == (isn + 1) % 2**32 and out[TCP].ack == 0          # rs_isn + 1, wrapped
    assert opts(out)["Timestamp"] == (102, 5000) and bytes(out[TCP].payload) == b"GET /"
    v, back, _ = one(cfg, wk, IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="PA", seq=0,
                                                            ack=(isn + 6) % 2**32,
                                                            options=[("NOP", None), ("NOP", None),
                                                                     ("Timestamp", (5003, 102))]) / Raw(b"hello"))
    assert v == C.VERDICT_REWRITE and valid(back) and (back.src, back.dst) == (VIP, CLIENT)
    assert back[TCP].seq == (cookie + 1) % 2**32 and back[TCP].ack == (isn + 6) % 2**32
    assert opts(back)["Timestamp"] == ((tb + 3) % 2**32, 102) and bytes(back[TCP].payload) == b"hello"
    # SACK blocks from the client move into the RS's space.
    v, out, _ = one(cfg, wk, cli("A", isn + 6, cookie + 1, [("NOP", None), ("NOP", None),
                                                            ("SAck", ((cookie + 10) % 2**32, (cookie + 20) % 2**32))]))
    assert valid(out) and opts(out)["SAck"] == (9, 19)


def test_rs_refuses_or_never_answers():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    synack, syn = handshake(cfg, wk, 1000)
    v, _, tx = one(cfg, wk, IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="RA", seq=0, ack=1001))
    assert v == C.VERDICT_DROP and len(tx) == 1
    rst = tx[0]
    assert valid(rst) and (rst.src, rst.dst, rst[TCP].sport, rst[TCP].dport) == (VIP, CLIENT, 80, 40000)
    assert rst[TCP].flags == "RA" and rst[TCP].seq == synack[TCP].seq + 1 and rst[TCP].ack == 1001
    assert wk.ctl[T.CTL_N_CONNS] == 0 and wk.stats[C.DROP_SYNPROXY_RS_RST] == 1
    # Silent RS: the client's retransmissions drive SYN retries, then a RST.
    synack, syn = handshake(cfg, wk, 2000, sport=40001)
    now = NOW
    retries = []
    for k in range(1, 5):
        now += 2 * C.NS
        v, _, tx = one(cfg, wk, cli("PA", 2001, synack[TCP].seq + 1, data=b"x", sport=40001), now=now)
        assert v == C.VERDICT_DROP
        retries.append([(str(p[TCP].flags), p.dst) for p in tx])
    syn_retry = [("S", RS3)]
    assert retries[:3] == [syn_retry] * 3 and retries[3] == [("RA", CLIENT)]
    assert wk.stats[C.STAT_SYNPROXY_RS_SYN_RETRY] == 3 and wk.ctl[T.CTL_N_CONNS] == 0


def test_ack_storm_from_rs_is_cut():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    synack, syn = handshake(cfg, wk, 1000)
    one(cfg, wk, IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA", seq=7, ack=1001))
    dup = IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="A", seq=8, ack=1001)
    verdicts = [one(cfg, wk, dup)[0] for _ in range(12)]
    # The first sets the pair; repeats 1..9 pass, the 10th and 11th are dropped.
    assert verdicts == [C.VERDICT_REWRITE] * 10 + [C.VERDICT_DROP] * 2
    assert wk.stats[C.DROP_SYNPROXY_ACK_STORM] == 2


def test_sack_duplicate_acks_from_rs_are_loss_recovery_not_a_storm():
    """A receiving RS answers every segment after a hole with a duplicate ACK: same (seq, ack),
    a new SACK block each. Bug: counted as an ACK storm from the 10th on and dropped, so the
    client lost the SACK information of a large window's recovery (a 50 MB upload with 1 %
    loss dropped a few per lost segment). Segments carrying SACK are now not counted; a run of
    identical ACKs without them is still cut."""
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    synack, syn = handshake(cfg, wk, 1000)
    cookie = synack[TCP].seq
    one(cfg, wk, IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA", seq=7, ack=1001))
    sacked = []
    for k in range(30):
        blk = (1001 + 1448 * (k + 2), 1001 + 1448 * (k + 3))
        dup = IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="A", seq=8, ack=1001,
                                            options=[("NOP", None), ("NOP", None),
                                                     ("SAck", (1001 + 1448, blk[1]))])
        v, out, _ = one(cfg, wk, dup)
        assert v == C.VERDICT_REWRITE and valid(out) and out[TCP].seq == (cookie + 1) % 2**32
        sacked.append(opts(out)["SAck"])
    assert wk.stats[C.DROP_SYNPROXY_ACK_STORM] == 0
    assert sacked[-1] == (1001 + 1448, 1001 + 1448 * 32)       # the client's space: unchanged
    plain = IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="A", seq=8, ack=1001)
    verdicts = [one(cfg, wk, plain)[0] for _ in range(12)]
    assert verdicts == [C.VERDICT_REWRITE] * 10 + [C.VERDICT_DROP] * 2


def fnat(**kw):
    return build(fwd=C.FWD_FULLNAT, laddrs=LADDRS, **kw)


def test_fullnat_synproxy_exchange_with_toa():
    cfg, wk, _, _ = fnat(flags=C.SVC_F_SYNPROXY | C.SVC_F_TOA)
    isn = 2**32 - 2
    synack, syn = handshake(cfg, wk, isn)
    cookie, tb = synack[TCP].seq, opts(synack)["Timestamp"][0]
    assert valid(syn) and syn.src in LADDRS and syn.dst == RS3 and syn[TCP].dport == 80
    assert 5000 <= syn[TCP].sport <= 65535 and syn[TCP].flags == "S"
    assert "Timestamp" not in opts(syn) and opts(syn)["MSS"] == 1452
    laddr, lport, s0 = syn.src, syn[TCP].sport, syn[TCP].seq
    assert wk.conn[1]["flags"] & C.CONN_F_FULLNAT
    v, _, tx = one(cfg, wk, cli("PA", isn + 1, cookie + 1, data=b"held"))
    assert v == C.VERDICT_DROP and not tx
    v, _, tx = one(cfg, wk, IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="SA", seq=2**32 - 1,
                                                         ack=(s0 + 1) % 2**32, options=[("MSS", 1460)]))
    assert v == C.VERDICT_DROP and len(tx) == 2
    ack, held = tx
    assert valid(ack) and (ack.src, ack.dst, ack[TCP].sport, ack[TCP].dport) == (laddr, RS3, lport, 80)
    assert ack[TCP].seq == (s0 + 1) % 2**32 and ack[TCP].ack == 0
    raw = bytes(ack[TCP])[20:ack[TCP].dataofs * 4]
    assert raw[:2] == b"\xfe\x08" and raw[2:4] == struct.pack("!H", 40000)
    assert raw[4:8] == bytes(map(int, CLIENT.split(".")))
    assert valid(held) and (held.src, held.dst, held[TCP].sport, held[TCP].dport) == (laddr, RS3, lport, 80)
    assert held[TCP].seq == (s0 + 1) % 2**32 and held[TCP].ack == 0 and bytes(held[TCP].payload) == b"held"
    v, out, _ = one(cfg, wk, cli("PA", isn + 1, cookie + 1, [("NOP", None), ("NOP", None),
                                                             ("Timestamp", (102, tb))], b"GET /"))
    assert v == C.VERDICT_REWRITE and valid(out)
    assert (out.src, out.dst, out[TCP].sport, out[TCP].dport) == (laddr, RS3, lport, 80)
    assert out[TCP].seq == (s0 + 1) % 2**32 and out[TCP].ack == 0
    assert bytes(out[TCP].payload) == b"GET /"
    v, back, _ = one(cfg, wk, IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="PA", seq=0,
                                                           ack=(s0 + 6) % 2**32) / Raw(b"hello"))
    assert v == C.VERDICT_REWRITE and valid(back)
    assert (back.src, back.dst, back[TCP].sport, back[TCP].dport) == (VIP, CLIENT, 80, 40000)
    assert back[TCP].seq == (cookie + 1) % 2**32 and back[TCP].ack == (isn + 6) % 2**32
    assert bytes(back[TCP].payload) == b"hello"


def test_window_scaling_offered_and_rescaled():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    cfg.sp_cfg[SP.SPC_WSCALE] = 2
    synack, syn = handshake(cfg, wk, 1000)
    assert opts(synack)["WScale"] == 2 and opts(syn)["WScale"] == 7
    one(cfg, wk, IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA", seq=7, ack=1001,
                                               options=[("WScale", 5)]))
    v, back, _ = one(cfg, wk, IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="A", seq=8,
                                                            ack=1001, window=1000))
    assert valid(back) and back[TCP].window == 8000          # 1000 << (5 - 2)


def test_non_synproxy_service_unchanged():
    cfg, wk, _, _ = build()
    v, out, tx = one(cfg, wk, cli("S", 1000, options=OPTS))
    assert v == C.VERDICT_REWRITE and out.dst == RS3 and not tx
    assert wk.stats[C.STAT_SYNPROXY_COOKIE_SENT] == 0


# --- held client segments (synproxy_ack_skb_store_thresh) ----------------------------------------

def rs_synack(seq, ack, tsecr=101):
    return IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA", seq=seq, ack=ack,
                                         options=[("MSS", 1460), ("Timestamp", (5000, tsecr))])


def test_up_to_ack_store_max_segments_held_and_released_in_order():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    assert cfg.sp_cfg[SP.SPC_ACK_STORE_MAX] == 3               # the patch's default
    isn = 2**32 - 7                                             # the stream wraps while held
    synack, syn = handshake(cfg, wk, isn)
    cookie, tb = synack[TCP].seq, opts(synack)["Timestamp"][0]
    ts = [("NOP", None), ("NOP", None), ("Timestamp", (102, tb))]
    segs = [cli("PA", isn + 1 + 5 * k, cookie + 1, ts, b"seg-%d" % k) for k in range(3)]
    segs.append(cli("FA", isn + 16, cookie + 1, ts))            # a 4th: one too many
    for seg in segs + [segs[1], cli("A", isn + 16, cookie + 1, ts)]:   # a retransmission, a pure ACK
        v, _, tx = one(cfg, wk, seg)
        assert v == C.VERDICT_DROP and not tx
    assert wk.stats[C.STAT_SYNPROXY_ACK_STORED] == 3
    assert wk.stats[C.DROP_SYNPROXY_SYNSEND_QLEN] == 1 and wk.stats[C.DROP_SYNPROXY_SYN_SENT] == 2
    rs_isn = 2**31
    v, _, tx = one(cfg, wk, rs_synack(rs_isn, isn + 1))
    assert v == C.VERDICT_DROP and len(tx) == 4
    ack, held = tx[0], tx[1:]
    assert ack[TCP].flags == "A" and ack[TCP].ack == rs_isn + 1
    for k, h in enumerate(held):                                # in order, in the RS's spaces
        assert valid(h) and (h.src, h.dst, h[TCP].sport, h[TCP].dport) == (CLIENT, RS3, 40000, 80)
        assert h[TCP].seq == (isn + 1 + 5 * k) % 2**32 and h[TCP].ack == rs_isn + 1
        assert opts(h)["Timestamp"] == (102, 5000) and bytes(h[TCP].payload) == b"seg-%d" % k
    assert not wk.sp_wait_cid.any() and wk.conn[1]["state"] == C.IP_VS_TCP_S_ESTABLISHED
    assert wk.svc_cnt[1, T.CNT_INPKTS] == 3


def test_ack_store_max_zero_holds_nothing():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    cfg.sp_cfg[SP.SPC_ACK_STORE_MAX] = 0
    synack, _ = handshake(cfg, wk, 1000)
    one(cfg, wk, cli("PA", 1001, synack[TCP].seq + 1, data=b"x"))
    assert wk.stats[C.DROP_SYNPROXY_SYNSEND_QLEN] == 1 and wk.stats[C.STAT_SYNPROXY_ACK_STORED] == 0
    v, _, tx = one(cfg, wk, rs_synack(7, 1001))
    assert [str(p[TCP].flags) for p in tx] == ["A"]


def test_wait_slot_of_an_expired_connection_is_taken_over():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),), max_conns=4)
    synack, _ = handshake(cfg, wk, 1000)
    h = int(np.nonzero(wk.sp_wait_cid)[0][0])
    CT.conn_free(wk, 1)                 # gone (say, expired) while still SYN_SENT
    assert wk.sp_wait_cid[h] == 1       # stale until someone looks
    synack, _ = handshake(cfg, wk, 2000, sport=40001)
    assert wk.sp_wait_cid[h] == 1 and wk.conn[1]["cport"] == 40001 and wk.sp_hold_n[h] == 0
    assert (wk.sp_wait_cid != 0).sum() == 1


# --- connection reuse (synproxy_conn_reuse_*) ------------------------------------------------------

def established(cfg, wk, isn, sport=40000, state=C.IP_VS_TCP_S_TIME_WAIT):
    """A SYN-proxy connection through its handshake, then put in `state`."""
    synack, _ = handshake(cfg, wk, isn, sport=sport)
    one(cfg, wk, IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=sport, flags="SA", seq=7, ack=isn + 1))
    cid = int(np.nonzero(wk.conn["flags"])[0][0])
    CT.set_state(wk, cid, state)
    return synack, cid


def fresh_cookie(cfg, isn, sport=40000):
    """A cookie SYN-ACK for a SYN that never met the worker under test (same secrets)."""
    _, wk2, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    return one(cfg, wk2, cli("S", isn, options=OPTS, sport=sport))[1]


def test_syn_on_a_time_wait_entry_gets_a_cookie_and_frees_it():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    established(cfg, wk, 1000)
    v, out, tx = one(cfg, wk, cli("S", 5000, options=OPTS))
    assert v == C.VERDICT_REWRITE and out[TCP].flags == "SA" and out.src == VIP and not tx
    assert wk.stats[C.STAT_SYNPROXY_CONN_REUSED] == 1 and wk.ctl[T.CTL_N_CONNS] == 0
    assert wk.stats[C.STAT_CONN_REUSED] == 0          # not conn_reuse_mode's rule


def test_cookie_ack_on_a_reusable_entry_starts_a_new_connection():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    _, old = established(cfg, wk, 1000, state=C.IP_VS_TCP_S_CLOSE)
    synack = fresh_cookie(cfg, 9000)
    v, _, tx = one(cfg, wk, cli("A", 9001, synack[TCP].seq + 1))
    assert v == C.VERDICT_DROP and len(tx) == 1
    assert tx[0][TCP].flags == "S" and tx[0][TCP].seq == 9000 and tx[0].dst == RS3
    assert wk.stats[C.STAT_SYNPROXY_CONN_REUSED] == 1 and wk.ctl[T.CTL_N_CONNS] == 1
    cid = int(np.nonzero(wk.conn["flags"])[0][0])
    assert wk.conn[cid]["state"] == C.IP_VS_TCP_S_SYN_SENT and wk.conn[cid]["aux"] == 9000


def test_outside_the_reuse_states_the_old_connection_keeps_its_packets():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    _, cid = established(cfg, wk, 1000, state=C.IP_VS_TCP_S_FIN_WAIT)    # fin_wait: off by default
    synack = fresh_cookie(cfg, 9000)
    ack = cli("A", 9001, synack[TCP].seq + 1)
    v, out, tx = one(cfg, wk, ack)
    assert v == C.VERDICT_REWRITE and out.dst == RS3 and not tx        # the old connection's
    assert wk.stats[C.STAT_SYNPROXY_CONN_REUSED] == 0 and wk.conn[cid]["flags"] != 0
    # A forged ACK on a reusable entry is not a cookie: the old connection's too.
    CT.set_state(wk, cid, C.IP_VS_TCP_S_TIME_WAIT)
    v, out, _ = one(cfg, wk, cli("A", 9001, synack[TCP].seq + 99))
    assert v == C.VERDICT_REWRITE and wk.stats[C.STAT_SYNPROXY_CONN_REUSED] == 0
    # synproxy_conn_reuse_fin_wait on: the same cookie ACK now starts over.
    CT.set_state(wk, cid, C.IP_VS_TCP_S_FIN_WAIT)
    cfg.sp_cfg[:] = SynproxySettings(conn_reuse_fin_wait=True).as_array()
    v, _, tx = one(cfg, wk, ack)
    assert v == C.VERDICT_DROP and [str(p[TCP].flags) for p in tx] == ["S"]
    assert wk.stats[C.STAT_SYNPROXY_CONN_REUSED] == 1
    # conn_reuse off: a SYN on a TIME_WAIT entry is the old connection's.
    cfg.sp_cfg[:] = SynproxySettings(conn_reuse=False).as_array()
    cid = int(np.nonzero(wk.conn["flags"])[0][0])
    CT.set_state(wk, cid, C.IP_VS_TCP_S_TIME_WAIT)
    v, out, _ = one(cfg, wk, cli("S", 9000, sport=40000))
    assert v == C.VERDICT_REWRITE and out.dst == RS3 and wk.stats[C.STAT_SYNPROXY_CONN_REUSED] == 1


# --- SYN retries on a timer (sp_retry_scan) ---------------------------------------------------------

def test_silent_rs_retried_by_the_scan_then_the_client_reset():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    cfg.sp_cfg[SP.SPC_SYN_RETRY] = 2
    synack, syn = handshake(cfg, wk, 1000)
    one(cfg, wk, cli("PA", 1001, synack[TCP].seq + 1, data=b"held"))   # held, then discarded
    sent = []
    for step in range(1, 41):            # empty batches, as the backends run while idle: 4 s
        now = NOW + step * C.NS // 10
        _, tx = run(cfg, wk, [], now)
        sent += [(step, str(p[TCP].flags), p.dst, p[TCP].seq) for p in tx]
    assert sent == [(10, "S", RS3, 1000), (20, "S", RS3, 1000),
                    (30, "RA", CLIENT, (synack[TCP].seq + 1) % 2**32)]
    assert wk.stats[C.STAT_SYNPROXY_RS_SYN_RETRY] == 2 and wk.stats[C.DROP_SYNPROXY_RS_RST] == 1
    assert wk.ctl[T.CTL_N_CONNS] == 0 and not wk.sp_wait_cid.any()


def test_retry_scan_is_rate_limited_and_frees_stale_slots():
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY, dests=((RS3, 80, 1),))
    handshake(cfg, wk, 1000)
    assert wk.ctl[T.CTL_SP_SCAN_NS] == NOW + C.NS // 10
    CT.set_state(wk, 1, C.IP_VS_TCP_S_ESTABLISHED)              # no longer waiting
    run(cfg, wk, [], NOW + C.NS // 20)                          # not due yet: nothing visited
    assert wk.sp_wait_cid.any()
    run(cfg, wk, [], NOW + C.NS // 10)
    assert not wk.sp_wait_cid.any()


def test_fullnat_synack_mss_leaves_room_for_toa_and_proxy_header():
    """The cookie SYN-ACK tells the client how much the balancer takes per segment; on the way
    to the RS the client's first segment gains TOA (8) and the PROXY header, so the MSS offered
    is lowered by both (as fnat_packet lowers the RS's SYN-ACK without SYN-proxy). Bug: it was
    min(client MSS, synproxy_init_mss) alone, so a full-size first segment became 1520 bytes,
    over the 1500-byte MTU towards the RS: DF, dropped at every retransmission, the upload
    stalled. The cookie (hence the SYN to the RS: what the RS may send) keeps the full MSS."""
    cfg, wk, _, _ = fnat(flags=C.SVC_F_SYNPROXY | C.SVC_F_TOA | C.SVC_F_PROXY_V2)
    isn = 5000
    synack, syn = handshake(cfg, wk, isn)
    assert valid(synack) and opts(synack)["MSS"] == 1452 - 8 - 28
    assert opts(syn)["MSS"] == 1452
    laddr, lport, s0 = syn.src, syn[TCP].sport, syn[TCP].seq
    cookie, tb = synack[TCP].seq, opts(synack)["Timestamp"][0]
    rs_synack = IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="SA", seq=7,
                                             ack=(s0 + 1) % 2**32, options=[("MSS", 1460)])
    v, _, tx = one(cfg, wk, rs_synack)
    assert v == C.VERDICT_DROP and len(tx) == 1
    # A full-size first segment as Linux sends it: MSS minus the 12 bytes of TS option.
    data = bytes(range(256)) * 6
    data = data[:opts(synack)["MSS"] - 12]
    first = cli("A", isn + 1, cookie + 1, [("NOP", None), ("NOP", None), ("Timestamp", (102, tb))],
                data)
    assert len(first) == 20 + opts(synack)["MSS"] + 20
    v, out, _ = one(cfg, wk, first)
    assert v == C.VERDICT_REWRITE and valid(out) and len(out) <= 1500
    payload = bytes(out[TCP].payload)
    assert payload[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and payload[28:] == data
    assert bytes(out[TCP])[20:22] == b"\xfe\x08"                       # TOA first
    # PROXY v1: lowered by the header this client's tuple gives, TOA off: nothing else.
    cfg, wk, _, _ = fnat(flags=C.SVC_F_SYNPROXY | C.SVC_F_PROXY_V1)
    v, synack, _ = one(cfg, wk, cli("S", isn, options=OPTS))
    assert opts(synack)["MSS"] == 1452 - len(f"PROXY TCP4 {CLIENT} {VIP} 40000 80\r\n")
    # NAT: nothing is inserted, the MSS stays.
    cfg, wk, _, _ = build(flags=C.SVC_F_SYNPROXY)
    v, synack, _ = one(cfg, wk, cli("S", isn, options=OPTS))
    assert opts(synack)["MSS"] == 1452


def test_fullnat_proxy_v2_retransmissions_and_sack_both_ways():
    """SYN-proxy + FULLNAT + PROXY v2 under loss: the stream start is retransmitted with the
    header until the RS acknowledges it, and without it afterwards; SACK blocks (and a D-SACK)
    cross both ways shifted by the right delta, the RS's retransmitted data lands on the same
    client sequence numbers. (The e2e twin: tests/netns/test_synproxy_loss_e2e.py.)"""
    cfg, wk, _, _ = fnat(flags=C.SVC_F_SYNPROXY | C.SVC_F_PROXY_V2)
    isn, rs_isn = 2**32 - 50, 2**32 - 10            # both streams wrap
    synack, syn = handshake(cfg, wk, isn)
    cookie, tb = synack[TCP].seq, opts(synack)["Timestamp"][0]
    laddr, lport, s0 = syn.src, syn[TCP].sport, syn[TCP].seq
    one(cfg, wk, IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="SA", seq=rs_isn,
                                              ack=(s0 + 1) % 2**32))
    ts = [("NOP", None), ("NOP", None), ("Timestamp", (200, tb))]
    a, b = b"A" * 100, b"B" * 100

    def client(seq, data=b"", flags="PA", options=ts):
        v, out, _ = one(cfg, wk, cli(flags, seq, cookie + 1, options, data))
        assert v == C.VERDICT_REWRITE and valid(out)
        assert (out.src, out.dst, out[TCP].sport, out[TCP].dport) == (laddr, RS3, lport, 80)
        return out

    def rs(seq, ack, sack=None, data=b""):
        o = [("NOP", None), ("NOP", None), ("SAck", tuple(x % 2**32 for x in sack))] if sack else []
        p = IP(src=RS3, dst=laddr) / TCP(sport=80, dport=lport, flags="PA" if data else "A",
                                         seq=seq % 2**32, ack=ack % 2**32, options=o)
        v, out, _ = one(cfg, wk, p / Raw(data) if data else p)
        assert v == C.VERDICT_REWRITE and valid(out)
        assert (out.src, out.dst, out[TCP].sport, out[TCP].dport) == (VIP, CLIENT, 80, 40000)
        return out

    hdr = b"\r\n\r\n\x00\r\nQUIT\n"
    out = client(isn + 1, a)                        # lost after the balancer
    assert out[TCP].seq == (s0 + 1) % 2**32 and bytes(out[TCP].payload)[:12] == hdr
    out = client(isn + 101, b)
    assert out[TCP].seq == (s0 + 1 + 28 + 100) % 2**32 and bytes(out[TCP].payload) == b
    # The RS has B only: a duplicate ACK of its ISN + 1 with B SACKed, in the client's space.
    back = rs(rs_isn + 1, s0 + 1, sack=(s0 + 129, s0 + 229))
    assert back[TCP].ack == (isn + 1) % 2**32 and back[TCP].seq == (cookie + 1) % 2**32
    assert opts(back)["SAck"] == ((isn + 101) % 2**32, (isn + 201) % 2**32)
    out = client(isn + 1, a)                        # retransmitted: the header again
    payload = bytes(out[TCP].payload)
    assert out[TCP].seq == (s0 + 1) % 2**32 and payload[:16] == hdr + b"\x21\x11\x00\x0c"
    assert payload[28:] == a and out[TCP].ack == (rs_isn + 1) % 2**32
    back = rs(rs_isn + 1, s0 + 229)
    assert back[TCP].ack == (isn + 201) % 2**32
    assert wk.conn[1]["flags"] & C.CONN_F_PP_ACKED
    # A spurious retransmission now goes without the header, at the shifted sequence; the RS's
    # D-SACK for it comes back naming the client's bytes.
    out = client(isn + 1, a)
    assert out[TCP].seq == (s0 + 29) % 2**32 and bytes(out[TCP].payload) == a
    back = rs(rs_isn + 1, s0 + 229, sack=(s0 + 29, s0 + 129))
    assert opts(back)["SAck"] == ((isn + 1) % 2**32, (isn + 101) % 2**32)
    # RS -> client data and its retransmission: the same client sequence numbers, and the
    # client's SACK of the second segment reaches the RS in its own space.
    first = rs(rs_isn + 1, s0 + 229, data=b"x" * 50)
    again = rs(rs_isn + 1, s0 + 229, data=b"x" * 50)
    assert first[TCP].seq == again[TCP].seq == (cookie + 1) % 2**32
    sack = ((cookie + 51) % 2**32, (cookie + 101) % 2**32)
    out = client(isn + 201, flags="A", options=[("NOP", None), ("NOP", None), ("SAck", sack)])
    assert out[TCP].ack == (rs_isn + 1) % 2**32
    assert opts(out)["SAck"] == ((rs_isn + 51) % 2**32, (rs_isn + 101) % 2**32)
    assert wk.stats[C.DROP_TOO_BIG] == 0 and wk.stats[C.DROP_SYNPROXY_ACK_STORM] == 0
