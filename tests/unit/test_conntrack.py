"""The connection index and table: insert/lookup/delete against a dict, expiry, bounded size."""


import numpy as np
from hypothesis import given, settings, strategies as st

from dataplane import conntrack as CT
from dataplane import consts as C
from dataplane import tables as T

keys = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 65535),
                 st.integers(0, 65535), st.sampled_from([6, 17, 6 | T.TEMPLATE_KEY_BIT]))


def _key(*fields):
    # Keys above 2**63 must reach numba typed as uint64, not as a Python int.
    return tuple(np.uint64(k) for k in CT.make_key(*fields))


@given(st.lists(st.tuples(st.booleans(), keys), max_size=400))
@settings(max_examples=60, deadline=None)
def test_index_matches_dict(ops):
    wk = T.new_worker(max_conns=64)      # index of 256 slots: probe chains wrap around
    ref = {}
    val = 2
    for insert, key in ops:
        k0, k1 = _key(*key)
        if insert and (key in ref or len(ref) < 120):
            CT.idx_insert(wk, k0, k1, val)
            ref[key] = val
            val += 1
        elif key in ref:
            CT.idx_delete(wk, k0, k1, ref.pop(key))
        for rk, rv in ref.items():
            assert CT.idx_lookup(wk, *_key(*rk)) == rv
        if not insert:
            assert CT.idx_lookup(wk, k0, k1) == ref.get(key, 0)
    assert int(np.count_nonzero(T.idx_vals(wk))) == len(ref)


def test_delete_keeps_newer_entry():
    wk = T.new_worker(max_conns=16)
    k0, k1 = _key(1, 2, 3, 4, 6)
    CT.idx_insert(wk, k0, k1, 10)
    CT.idx_insert(wk, k0, k1, 12)      # key reused by a newer connection
    CT.idx_delete(wk, k0, k1, 10)      # the old one's removal must not remove the new entry
    assert CT.idx_lookup(wk, k0, k1) == 12


def _setup(max_conns=8):
    cfg = T.new_config()
    wk = T.new_worker(max_conns=max_conns)
    cfg.svc[1]["proto"] = 6
    cfg.dest[1]["svc"] = 1
    cfg.dest[1]["addr"] = T.ip2int("172.16.2.13")
    cfg.dest[1]["port"] = 80
    cfg.dest[1]["weight"] = 1
    cfg.dest[1]["flags"] = C.DEST_F_AVAILABLE
    return cfg, wk


def test_table_full_then_expiry_frees():
    cfg, wk = _setup(max_conns=8)
    now = 10 * C.NS
    ids = [CT.conn_new(wk, cfg, 1, 1, 6, 0x0A000001, 1000 + i, 0xAC100164, 80, now, 0, 0, 0)
           for i in range(8)]
    assert sorted(ids) == list(range(1, 9))
    assert CT.conn_new(wk, cfg, 1, 1, 6, 0x0A000001, 2000, 0xAC100164, 80, now, 0, 0, 0) == 0
    assert wk.active[1] == 8
    # All are in state NONE (2 s timeout): a sweep after 3 s frees them all.
    freed = CT.sweep(wk, cfg, now + 3 * C.NS, 100)
    assert freed == 8
    assert wk.ctl[T.CTL_N_CONNS] == 0 and wk.active[1] == 0
    assert int(np.count_nonzero(T.idx_vals(wk))) == 0
    assert CT.conn_new(wk, cfg, 1, 1, 6, 0x0A000001, 2000, 0xAC100164, 80, now, 0, 0, 0) != 0


def test_sweep_is_bounded():
    cfg, wk = _setup(max_conns=1000)
    for i in range(1000):
        CT.conn_new(wk, cfg, 1, 1, 6, 0x0A000001, i, 0xAC100164, 80, 0, 0, 0, 0)
    assert CT.sweep(wk, cfg, 100 * C.NS, 10) == 10
    assert wk.ctl[T.CTL_N_CONNS] == 990


def test_tcp_states_follow_ipvs_table():
    cfg, wk = _setup()
    cid = CT.conn_new(wk, cfg, 1, 1, 6, 1, 1, 2, 80, 0, 0, 0, 0)
    seq = [(C.DIR_IN, C.TH_SYN, C.IP_VS_TCP_S_SYN_RECV),
           (C.DIR_OUT, C.TH_SYN | C.TH_ACK, C.IP_VS_TCP_S_SYN_RECV),
           (C.DIR_IN, C.TH_ACK, C.IP_VS_TCP_S_ESTABLISHED),
           (C.DIR_IN, C.TH_FIN | C.TH_ACK, C.IP_VS_TCP_S_CLOSE_WAIT),
           (C.DIR_OUT, C.TH_FIN | C.TH_ACK, C.IP_VS_TCP_S_TIME_WAIT)]
    for d, f, want in seq:
        CT.tcp_transition(wk, cfg, cid, d, f, 0)
        assert wk.conn[cid]["state"] == want, C.STATE_NAMES[want]
        if want == C.IP_VS_TCP_S_ESTABLISHED:
            assert wk.active[1] == 1 and wk.inactive[1] == 0
    assert wk.active[1] == 0 and wk.inactive[1] == 1
    assert wk.conn[cid]["expire_ns"] == cfg.timeouts_ns[C.IP_VS_TCP_S_TIME_WAIT]


def test_template_outlives_its_connections():
    cfg, wk = _setup()
    cfg.svc[1]["persist_timeout_s"] = 50
    t = CT.template_new(wk, 1, 1, 6, 0x0A000000, 0xAC100164, 80, 50 * C.NS, 0)
    cid = CT.conn_new(wk, cfg, 1, 1, 6, 0x0A000001, 5, 0xAC100164, 80, 0, t, 0, 0)
    CT.tcp_transition(wk, cfg, cid, C.DIR_IN, C.TH_ACK, 0)   # NONE + ack -> CLOSE (10 s)
    wk.conn[cid]["expire_ns"] = 100 * C.NS
    CT.sweep(wk, cfg, 60 * C.NS, 10)          # template expired but controls cid: re-armed
    assert wk.conn[t]["flags"] != 0 and wk.persist[1] == 1
    CT.sweep(wk, cfg, 101 * C.NS, 10)          # cid gone
    assert wk.conn[cid]["flags"] == 0 and wk.conn[t]["n_control"] == 0
    CT.sweep(wk, cfg, 200 * C.NS, 10)
    assert wk.conn[t]["flags"] == 0 and wk.persist[1] == 0
