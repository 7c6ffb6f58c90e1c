"""Bad input: random, truncated and mutated packets never crash the data plane and never corrupt
its tables. After every batch the connection table's invariants are checked from scratch."""

import numpy as np
from hypothesis import given, settings, strategies as st
from scapy.all import ICMP, IP, TCP, UDP, Raw

from dataplane import conntrack as CT
from dataplane import consts as C
from dataplane import tables as T
from dataplane.batch import Batch
from tests.unit.test_pipeline import CLIENT, RS3, RS4, VIP, build


def check_invariants(wk):
    """Every live connection has its index entries, every index entry points at a live
    connection with its key, the free stack and the live rows partition the ids, and the
    real servers' active/inactive counts match the rows."""
    live = np.nonzero(wk.conn["flags"])[0]
    n_free = int(wk.ctl[T.CTL_FREE_TOP])
    free = set(int(x) for x in wk.free[:n_free])
    assert not (free & set(live.tolist()))
    assert n_free + len(live) == len(wk.conn) - 1
    assert wk.ctl[T.CTL_N_CONNS] == len(live)
    entries = {}
    vals = T.idx_vals(wk)
    for j in np.nonzero(vals)[0]:
        entries[int(vals[j])] = (np.uint64(wk.idx[j, 0]), np.uint64(wk.idx[j, 1]) & T.IDX_KEY_MASK)
    expected = 0
    active = np.zeros_like(wk.active)
    inactive = np.zeros_like(wk.inactive)
    for cid in live:
        cid = int(cid)
        k_in = CT.in_key(wk, cid)
        assert entries.get(cid * 2) == tuple(np.uint64(k) for k in k_in)
        expected += 1
        if not wk.conn[cid]["flags"] & C.IP_VS_CONN_F_TEMPLATE:
            k_out = CT.out_key(wk, cid)
            assert entries.get(cid * 2 + 1) == tuple(np.uint64(k) for k in k_out)
            expected += 1
            d = wk.conn[cid]["dest"]
            if wk.conn[cid]["flags"] & C.IP_VS_CONN_F_INACTIVE:
                inactive[d] += 1
            else:
                active[d] += 1
    assert len(entries) == expected
    assert np.array_equal(active, wk.active) and np.array_equal(inactive, wk.inactive)


def valid_packets():
    return st.sampled_from([
        bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S")),
        bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="A") / Raw(b"GET / HTTP/1.0\r\n\r\n")),
        bytes(IP(src=RS3, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA")),
        bytes(IP(src=RS4, dst=CLIENT) / TCP(sport=80, dport=40001, flags="FA")),
        bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=80) / Raw(b"x" * 30)),
        bytes(IP(src=CLIENT, dst=VIP, flags="MF", id=7) / UDP(sport=5001, dport=80) / Raw(b"y" * 40)),
        bytes(IP(src=CLIENT, dst=VIP, frag=6, id=7, proto=17) / Raw(b"z" * 40)),
        bytes(IP(src="172.16.2.1", dst=CLIENT) / ICMP(type=3, code=4) /
              bytes(IP(src=CLIENT, dst=RS3) / TCP(sport=40000, dport=80))[:28]),
        bytes(IP(src=CLIENT, dst=VIP, options=[b"\x94\x04\x00\x00"]) / TCP(sport=40002, dport=80, flags="S")),
    ])


@st.composite
def mangled(draw):
    pkt = bytearray(draw(valid_packets()))
    how = draw(st.sampled_from(["truncate", "flip", "random", "keep", "lengths"]))
    if how == "truncate":
        pkt = pkt[: draw(st.integers(0, len(pkt)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(pkt) - 1))
            pkt[i] = draw(st.integers(0, 255))
    elif how == "random":
        pkt = bytearray(draw(st.binary(max_size=120)))
    elif how == "lengths":
        # Header length fields that lie: IHL, total length, TCP data offset, UDP length.
        i = draw(st.sampled_from([0, 2, 3, 20 + 12, 20 + 4, 20 + 5]))
        if i < len(pkt):
            pkt[i] = draw(st.integers(0, 255))
    return bytes(pkt)


@given(st.lists(mangled(), min_size=1, max_size=40))
@settings(max_examples=300)
def test_mangled_packets_never_crash_or_corrupt(pkts):
    cfg, wk, _, _ = build(max_conns=64)
    b = Batch(max_pkts=len(pkts), slot=256)
    for p in pkts:
        b.add(p)
    v = b.run(cfg, wk, 10 * C.NS)
    assert set(v.tolist()) <= {C.VERDICT_DROP, C.VERDICT_ACCEPT, C.VERDICT_REWRITE}
    for i in range(b.n):
        assert b.length[i] <= b.cap[i]
    check_invariants(wk)
    # Time passes: everything expires cleanly too.
    b.clear()
    b.run(cfg, wk, 10_000 * C.NS)
    for _ in range(20):
        b.run(cfg, wk, 10_000 * C.NS)
    check_invariants(wk)
    assert wk.ctl[T.CTL_N_CONNS] == 0


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 7), st.sampled_from(["S", "SA", "A", "FA", "R"])),
                max_size=200))
@settings(max_examples=100)
def test_random_flows_keep_tables_consistent(events):
    """Random TCP events on a few flows (both directions), with the table smaller than the
    flows, time moving on: the invariants hold throughout."""
    cfg, wk, _, _ = build(max_conns=4)
    now = 0
    for client, port, flags in events:
        now += 3 * C.NS
        caddr = f"10.0.0.{client + 1}"
        inbound = flags in ("S", "A", "FA", "R") and port % 2 == 0
        if inbound:
            pkt = IP(src=caddr, dst=VIP) / TCP(sport=1000 + port, dport=80, flags=flags)
        else:
            pkt = IP(src=RS3 if port % 4 < 2 else RS4, dst=caddr) / TCP(sport=80, dport=1000 + port, flags=flags)
        b = Batch(max_pkts=1, slot=128)
        b.add(bytes(pkt))
        b.run(cfg, wk, now)
    check_invariants(wk)


def test_first_and_later_fragments_are_translated():
    cfg, wk, _, _ = build(proto=C.IPPROTO_UDP, port=53, dests=((RS3, 5353, 1),))
    whole = IP(src=CLIENT, dst=VIP, id=99) / UDP(sport=5000, dport=53) / Raw(b"A" * 3000)
    from scapy.all import fragment
    frags = [bytes(f) for f in fragment(whole, fragsize=1480)]
    assert len(frags) == 3
    b = Batch(max_pkts=3, slot=2048)
    for f in frags:
        b.add(f)
    v = b.run(cfg, wk, C.NS)
    assert list(v) == [C.VERDICT_REWRITE] * 3
    outs = [IP(b.packet(i)) for i in range(3)]
    assert {(o.src, o.dst) for o in outs} == {(CLIENT, RS3)}
    # Reassembled, the datagram is the original one addressed to the real server, with a valid
    # UDP checksum over the whole of it.
    from scapy.all import defragment
    [re] = defragment(outs)
    assert re[UDP].dport == 5353 and bytes(re[UDP].payload) == b"A" * 3000
    chk = re[UDP].chksum
    del re[UDP].chksum
    assert IP(bytes(re))[UDP].chksum == chk
    assert wk.stats[C.STAT_FRAG_XLATE] == 2
