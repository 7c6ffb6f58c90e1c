"""Engine-only benchmarks: `process_batch` on prebuilt batches, no kernel, no sockets.

* ``test_established`` -- ns per packet for established NAT and FULLNAT traffic (client -> VIP,
  64-byte packets) in batches of 64 picked in random order over 4 thousand or 1 million live connections
  (in the daemon's default 2**20-slot table). Connections are opened first by running a SYN and
  an ACK per client through process_batch. Each batch is restored from a pristine copy before it
  runs, because the engine rewrites in place (a rewritten client -> real-server packet matches no
  connection and would take the cheap "not ours" path); the restore is timed by the same driver
  without the engine and subtracted (both figures are reported). The 1M case also reports the
  bytes per connection and the process's resident size.
* ``test_new_connection`` -- ns per SYN for never-seen 4-tuples while older connections expire
  (the clock advances per batch so that about 4 thousand / 1 million connections are live, and
  the engine's per-batch sweep frees the expired ones): scheduling, connection create, index
  inserts, and the expiry work the churn causes.
* ``test_syn_cookie`` -- ns to make a SYN cookie (per SYN) and to check it (per returning ACK),
  with dataplane/synproxy.py's SipHash cookies; skipped, with the reason in the report, while
  that module does not exist.
* ``test_synproxy_syn`` -- ns per SYN to a SYN-proxy service through process_batch: answered in
  place with a cookie SYN-ACK, no state kept (the SYN-flood path).

Every benchmark also checks what it measured: verdicts, counters, and the rewritten packets
(addresses, ports, checksums; one packet compared with scapy). Under ``--benchmark-disable`` each
runs once, briefly, as a correctness test.
"""

import inspect
import time

import numpy as np
import pytest
from scapy.all import IP, TCP

from bench import engine_kit as K
from dataplane import consts as C
from dataplane import pipeline
from dataplane import tables as T
from dataplane.pipeline import process_batch

pytestmark = pytest.mark.benchmark(group="engine", disable_gc=True)

TABLE_SLOTS = 1 << 20           # lvs-dp run --max-conns default
# case -> (live connections, forwarding method); FULLNAT from engine_kit.LADDRS (no TOA/PROXY).
EST_CASES = {"4k": (4096, C.FWD_MASQ), "1M": (1_000_000, C.FWD_MASQ),
             "fnat-4k": (4096, C.FWD_FULLNAT), "fnat-1M": (1_000_000, C.FWD_FULLNAT)}
EST_TARGET_NS = {"4k": 100, "1M": 250}      # from the issue "Speed", by table size
# Packets per timed call (a whole random permutation of the connections for 1M), and rounds.
EST_PKTS = {"4k": 1 << 16, "1M": 1_000_000}
EST_ROUNDS = {"4k": 30, "1M": 5}


def _size(case):
    return case.split("-")[-1]
# New connections: (table slots, live connections at steady state, batches per call, rounds).
NEW_CASES = {"4k": (1 << 14, 1 << 12, 256, 30), "1M": (1 << 21, 1 << 20, 4096, 5)}
VADDR = T.ip2int(K.VIP)
RS_ADDRS = {T.ip2int(a) for a in K.RS}


def est_tuple_new(n):
    """(caddr, cport) int64 arrays of n distinct clients in NEW_NET."""
    i = np.arange(n, dtype=np.int64)
    return K.NEW_NET + 1 + i // K.PORTS_PER_ADDR, K.PORT_BASE + i % K.PORTS_PER_ADDR


def _drops(wk):
    return int(wk.stats[:C.N_DROP].sum())


def _median_time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _check_rewritten(s, original, wk, golden=True):
    """The batch in `s` is `original` (pristine bytes of the same slots) after the engine: every
    packet rewritten to its connection's real server, checksums valid, one compared with scapy."""
    assert np.all(s.verdict[:K.BATCH] == C.VERDICT_REWRITE), s.verdict[:K.BATCH]
    assert K.checksums_ok(s.buf, s.off, K.BATCH) == K.BATCH
    for i in range(K.BATCH):
        o = int(s.off[i])
        src = IP(original[o:o + int(s.length[i])].tobytes())
        got = IP(s.packet(i))
        daddr, dport, laddr, lport = K.lookup_dest(wk, T.ip2int(src.src), VADDR, src[TCP].sport,
                                                   K.VPORT)
        assert daddr in RS_ADDRS and dport == K.VPORT
        if laddr:       # FULLNAT: from the local address, sequence numbers moved
            assert (got.src, got.dst, got[TCP].sport, got[TCP].dport) == (
                T.int2ip(laddr), T.int2ip(daddr), lport, dport)
            assert got[TCP].payload.load == src[TCP].payload.load
            continue
        assert (got.src, got.dst, got[TCP].sport, got[TCP].dport) == (
            src.src, T.int2ip(daddr), src[TCP].sport, dport)
        if golden and i == 0:
            want = src.copy()
            want.dst = T.int2ip(daddr)
            del want.chksum, want[TCP].chksum
            assert s.packet(i) == bytes(IP(bytes(want)))


@pytest.fixture(scope="module")
def est_tables():
    """size -> (cfg, wk, info); built on first use, kept for the module (4k and 1M)."""
    built = {}

    def get(case):
        if case not in built:
            n, fwd = EST_CASES[case]
            rss0 = K.rss_bytes()
            cfg, wk = K.build_tables(TABLE_SLOTS, fwd=fwd)
            t0 = time.perf_counter()
            K.prime(cfg, wk, n)
            prime_s = time.perf_counter() - t0
            info = {"rss_before": rss0, "rss_after": K.rss_bytes(), "prime_s": prime_s}
            assert wk.ctl[T.CTL_N_CONNS] == n
            assert int(wk.active.sum()) == n, "every primed connection is ESTABLISHED"
            built[case] = (cfg, wk, info)
        return built[case]

    yield get
    built.clear()


@pytest.mark.parametrize("case", list(EST_CASES))
def test_established(benchmark, est_tables, case):
    n_conns, fwd = EST_CASES[case]
    cfg, wk, info = est_tables(case)
    n_pkts = EST_PKTS[_size(case)]
    pristine, order = K.established_pristine(n_conns, n_pkts, seed=len(case))
    nb = n_pkts // K.BATCH
    s = K.Slots(K.BATCH)
    tx = T.new_tx(16)
    now = np.int64(K.NOW_NS)
    calls = []

    def engine():
        calls.append(1)
        K.run_established(cfg, wk, pristine, s.buf, s.off, s.length, s.cap, s.mark, s.skbinfo,
                          s.verdict, nb, now, tx, True)

    def restore_only():
        K.run_established(cfg, wk, pristine, s.buf, s.off, s.length, s.cap, s.mark, s.skbinfo,
                          s.verdict, nb, now, tx, False)

    rewritten0, drops0, notours0 = int(wk.stats[C.STAT_REWRITTEN]), _drops(wk), int(wk.stats[C.STAT_NOT_OURS])
    benchmark.pedantic(engine, rounds=EST_ROUNDS[_size(case)], warmup_rounds=1, iterations=1)

    # What was measured is what we meant: every packet found its connection and was rewritten.
    done = len(calls) * nb * K.BATCH
    assert int(wk.stats[C.STAT_REWRITTEN]) - rewritten0 == done
    assert _drops(wk) == drops0 and int(wk.stats[C.STAT_NOT_OURS]) == notours0
    assert wk.ctl[T.CTL_N_CONNS] == n_conns
    last = ((nb - 1) % (len(pristine) // (K.BATCH * K.SLOT))) * K.BATCH * K.SLOT
    _check_rewritten(s, pristine[last:last + K.BATCH * K.SLOT], wk)

    if benchmark.disabled:
        return
    gross = benchmark.stats.stats.median / (nb * K.BATCH) * 1e9
    gross_min = benchmark.stats.stats.min / (nb * K.BATCH) * 1e9
    restore = _median_time(restore_only, 5) / (nb * K.BATCH) * 1e9
    # The per-batch Python call a backend pays (np.copyto + dispatch + engine), on fewer batches.
    py_batches = min(nb, 2048)
    K.python_call_loop(cfg, wk, pristine, s, 4, tx)
    py = _median_time(lambda: K.python_call_loop(cfg, wk, pristine, s, py_batches, tx), 3)
    py_ns = py / (py_batches * K.BATCH) * 1e9
    # numba's dispatch alone: a one-packet batch of a non-IPv4 packet (cheapest path).
    one = K.Slots(1)
    one.buf[0] = 0x60
    one_call = lambda: process_batch(cfg, wk, one.buf, one.off, one.length, one.cap, one.mark,
                                     one.skbinfo, one.verdict, 1, now, tx)
    one_call()
    dispatch_us = _median_time(lambda: [one_call() for _ in range(200)], 5) / 200 * 1e6
    net = gross - restore
    ex = benchmark.extra_info
    ex.update({
        "kind": "engine_established", "case": case, "conns": n_conns, "table_slots": TABLE_SLOTS,
        "method": C.FWD_NAMES[fwd],
        "batch": K.BATCH, "pkt_bytes": K.PKT_LEN, "pkts_per_round": nb * K.BATCH,
        "ns_per_pkt": round(net, 1), "ns_per_pkt_gross": round(gross, 1),
        "ns_per_pkt_best": round(gross_min - restore, 1),
        "restore_ns_per_pkt": round(restore, 1), "python_call_ns_per_pkt": round(py_ns, 1),
        "dispatch_us_per_call": round(dispatch_us, 2),
        "mpps": round(1e3 / net, 3) if net > 0 else None,
        "target_ns": EST_TARGET_NS[_size(case)],
        "meets_target": bool(net < EST_TARGET_NS[_size(case)]),
        "prime_s": round(info["prime_s"], 2),
    })
    if case == "1M":
        tb = K.table_bytes(wk)
        ex.update({
            "conn_entry_bytes": T.CONN_DTYPE.itemsize,
            "index_bytes_per_slot": round(tb["index"] / TABLE_SLOTS, 1),
            "index_bytes_per_live_conn": 2 * wk.idx.itemsize * wk.idx.shape[1],     # two entries: in and out keys
            "free_stack_bytes_per_slot": round(tb["free"] / TABLE_SLOTS, 1),
            "table_bytes_per_slot": round(tb["total"] / TABLE_SLOTS, 1),
            "table_mib": round(tb["total"] / 2 ** 20, 1),
            "rss_mib": round(info["rss_after"] / 2 ** 20, 1),
            "rss_delta_mib": round((info["rss_after"] - info["rss_before"]) / 2 ** 20, 1),
            "rss_delta_bytes_per_conn": round((info["rss_after"] - info["rss_before"]) / n_conns, 1),
        })


@pytest.mark.parametrize("case", list(NEW_CASES))
def test_new_connection(benchmark, case):
    slots, live, nb, rounds = NEW_CASES[case]
    cfg, wk = K.build_tables(slots)
    s = K.Slots(K.BATCH)
    s.length[:] = 40
    tx = T.new_tx(16)
    template = np.zeros(K.SLOT, np.uint8)
    K.fill_tcp(template, np.zeros(1, np.int64), np.array([K.NEW_NET + 1]), np.array([K.PORT_BASE]),
               VADDR, K.VPORT, C.TH_SYN, 1000, 40)
    # A SYN_RECV connection lives timeout_ns; `live` connections at steady state means the clock
    # moves timeout / (live / BATCH) per batch.
    timeout_ns = int(cfg.timeouts_ns[C.IP_VS_TCP_S_SYN_RECV])
    dt = np.int64(timeout_ns // (live // K.BATCH))
    state = np.array([0, K.NOW_NS], np.int64)

    def run(n_batches, st=state, process=True):
        K.run_new_conns(cfg, wk, template, s.buf, s.off, s.length, s.cap, s.mark, s.skbinfo,
                        s.verdict, n_batches, st, dt, tx, process)

    # Reach steady state: connections expire after live/BATCH batches and the sweep needs
    # slots / (2 * BATCH + 16) batches for a full pass over the table.
    warm = live // K.BATCH + slots // (2 * K.BATCH + 16) + 1
    run(warm)
    assert wk.stats[C.STAT_CONN_EXPIRED] > 0, "the clock must expire connections (churn)"
    new0, exp0, ids0 = int(wk.stats[C.STAT_CONN_NEW]), int(wk.stats[C.STAT_CONN_EXPIRED]), int(state[0])
    benchmark.pedantic(run, args=(nb,), rounds=rounds, warmup_rounds=1, iterations=1)

    syns = int(state[0]) - ids0
    assert int(wk.stats[C.STAT_CONN_NEW]) - new0 == syns, "every SYN made a connection"
    assert _drops(wk) == 0
    assert int(wk.stats[C.STAT_CONN_EXPIRED]) > exp0
    n_live = int(wk.ctl[T.CTL_N_CONNS])
    assert n_live < slots
    # The last batch: SYNs for new tuples, each rewritten to its new connection's real server.
    original = np.zeros_like(s.buf)
    for i in range(K.BATCH):
        original[int(s.off[i]):int(s.off[i]) + K.SLOT] = template
    expect = state[0] - K.BATCH + np.arange(K.BATCH)
    for i in range(K.BATCH):
        o = int(s.off[i])
        original[o + 12:o + 16] = np.frombuffer(int(K.NEW_NET + 1 + expect[i] // K.PORTS_PER_ADDR).to_bytes(4, "big"), np.uint8)
        original[o + 20:o + 22] = np.frombuffer(int(K.PORT_BASE + expect[i] % K.PORTS_PER_ADDR).to_bytes(2, "big"), np.uint8)
    # (`original` has stale checksums; only addresses and ports are compared against it.)
    _check_rewritten(s, original, wk, golden=False)

    if benchmark.disabled:
        return
    gross = benchmark.stats.stats.median / (nb * K.BATCH) * 1e9
    gross_min = benchmark.stats.stats.min / (nb * K.BATCH) * 1e9
    restore = _median_time(lambda: run(nb, state.copy(), False), 5) / (nb * K.BATCH) * 1e9
    net = gross - restore
    benchmark.extra_info.update({
        "kind": "engine_new_conn", "case": case, "live_conns_target": live, "table_slots": slots,
        "live_conns_end": n_live, "batch": K.BATCH,
        "ns_per_conn": round(net, 1), "ns_per_conn_gross": round(gross, 1),
        "ns_per_conn_best": round(gross_min - restore, 1),
        "restore_ns_per_pkt": round(restore, 1),
        "conns_per_s_per_core": round(1e9 / net) if net > 0 else None,
        "expired_during_bench": int(wk.stats[C.STAT_CONN_EXPIRED]) - exp0,
    })


def test_syn_cookie(benchmark):
    """SYN-cookie cost: making the cookie for a SYN and checking it on the returning ACK
    (dataplane/synproxy.py's cookie_make / cookie_check, SipHash-2-4 keyed), looped in numba.
    The whole SYN-proxy path through process_batch is measured once the pipeline runs it."""
    try:
        from dataplane import synproxy as SP
        from bench import synproxy_kit as S
    except ImportError:
        pytest.skip("SYN-proxy not built yet (no dataplane/synproxy.py): no SYN-cookie cost")
    n = 1 << 16
    caddrs, cports = est_tuple_new(n)
    isns = np.random.default_rng(3).integers(0, 2 ** 32, size=n, dtype=np.int64)
    secret = S.random_secret()
    cookies = np.zeros(n, np.int64)
    got = np.zeros(n, np.int64)
    count = np.int64(SP.cookie_count(np.int64(K.NOW_NS)))
    max_age = np.int64(4)

    def make():
        S.cookies_make(secret, caddrs, cports, VADDR, K.VPORT, isns, count, cookies)

    def check():
        return S.cookies_check(secret, caddrs, cports, VADDR, K.VPORT, isns, cookies, count,
                               max_age, got)

    make()
    check()
    benchmark.pedantic(lambda: (make(), check()), rounds=30, warmup_rounds=1, iterations=1)

    # Every cookie checks and carries its MSS index; a cookie for another tuple, from another
    # secret, or too old does not.
    assert check() == n and np.array_equal(got, np.arange(n) % SP.N_MSS)
    wrong_port = S.cookies_check(secret, caddrs, cports ^ 1, VADDR, K.VPORT, isns, cookies, count,
                                 max_age, got)
    other_secret = S.cookies_check(S.random_secret(8), caddrs, cports, VADDR, K.VPORT, isns, cookies,
                                   count, max_age, got)
    too_old = S.cookies_check(secret, caddrs, cports, VADDR, K.VPORT, isns, cookies,
                              count + max_age, max_age, got)
    assert wrong_port <= 2 and other_secret <= 2 and too_old == 0, (wrong_port, other_secret, too_old)

    if benchmark.disabled:
        return
    make_ns = _median_time(make, 9) / n * 1e9
    check_ns = _median_time(check, 9) / n * 1e9
    benchmark.extra_info.update({
        "kind": "engine_syn_cookie", "cookies_per_round": n,
        "make_ns": round(make_ns, 1), "check_ns": round(check_ns, 1),
        "make_and_check_ns": round(benchmark.stats.stats.median / n * 1e9, 1),
        "pipeline_has_synproxy": "synproxy" in inspect.getsource(pipeline).lower(),
    })


def test_synproxy_syn(benchmark):
    """A SYN to a SYN-proxy service through process_batch: answered in place with a cookie
    SYN-ACK, no state kept (the SYN-flood path). Same driver and fresh 4-tuples as
    test_new_connection."""
    try:
        from dataplane import synproxy as SP
        from bench import synproxy_kit as S
    except ImportError:
        pytest.skip("SYN-proxy not built yet (no dataplane/synproxy.py)")
    if "SVC_F_SYNPROXY" not in inspect.getsource(pipeline):
        pytest.skip("the pipeline has no SYN-proxy stage yet")
    cfg, wk = K.build_tables(1 << 16, flags=C.SVC_F_SYNPROXY)
    s = K.Slots(K.BATCH)
    s.length[:] = 40
    tx = T.new_tx(16)
    template = np.zeros(K.SLOT, np.uint8)
    K.fill_tcp(template, np.zeros(1, np.int64), np.array([K.NEW_NET + 1]), np.array([K.PORT_BASE]),
               VADDR, K.VPORT, C.TH_SYN, 1000, 40)
    state = np.array([0, K.NOW_NS], np.int64)
    nb = 256

    def run(n_batches, st=state, process=True):
        s.length[:] = 40
        K.run_new_conns(cfg, wk, template, s.buf, s.off, s.length, s.cap, s.mark, s.skbinfo,
                        s.verdict, n_batches, st, np.int64(1000), tx, process)

    run(4)
    sent0, ids0 = int(wk.stats[C.STAT_SYNPROXY_COOKIE_SENT]), int(state[0])
    benchmark.pedantic(run, args=(nb,), rounds=30, warmup_rounds=1, iterations=1)

    syns = int(state[0]) - ids0
    assert int(wk.stats[C.STAT_SYNPROXY_COOKIE_SENT]) - sent0 == syns
    assert wk.ctl[T.CTL_N_CONNS] == 0 and _drops(wk) == 0, "SYN-proxy keeps no state for a SYN"
    # The last batch: each SYN became our SYN-ACK to its client, carrying a cookie that checks.
    assert np.all(s.verdict == C.VERDICT_REWRITE)
    assert K.checksums_ok(s.buf, s.off, K.BATCH) == K.BATCH
    ids = state[0] - K.BATCH + np.arange(K.BATCH)
    caddrs = K.NEW_NET + 1 + ids // K.PORTS_PER_ADDR
    cports = K.PORT_BASE + ids % K.PORTS_PER_ADDR
    cookies = np.zeros(K.BATCH, np.int64)
    isn = 1000 + K.PORT_BASE            # the template's seq (run_new_conns changes only the tuple)
    for i in range(K.BATCH):
        p = IP(s.packet(i))
        assert (p.src, p.dst, p[TCP].sport, p[TCP].dport) == (K.VIP, T.int2ip(caddrs[i]), K.VPORT, cports[i])
        assert str(p[TCP].flags) == "SA" and p[TCP].ack == isn + 1
        cookies[i] = p[TCP].seq
    got = np.zeros(K.BATCH, np.int64)
    count = np.int64(SP.cookie_count(np.int64(state[1])))
    ok = S.cookies_check(np.ascontiguousarray(cfg.sp_secrets[0]), caddrs, cports, VADDR, K.VPORT,
                         np.full(K.BATCH, isn, np.int64), cookies, count, np.int64(4), got)
    assert ok == K.BATCH, got

    if benchmark.disabled:
        return
    gross = benchmark.stats.stats.median / (nb * K.BATCH) * 1e9
    restore = _median_time(lambda: run(nb, state.copy(), False), 5) / (nb * K.BATCH) * 1e9
    benchmark.extra_info.update({
        "kind": "engine_synproxy_syn", "batch": K.BATCH,
        "ns_per_syn": round(gross - restore, 1), "ns_per_syn_gross": round(gross, 1),
        "restore_ns_per_pkt": round(restore, 1),
        "syn_per_s_per_core": round(1e9 / (gross - restore)) if gross > restore else None,
    })
