"""Schedulers (dataplane/sched.py) against their pure-Python twins, IPVS's sequences and formulas,
and the ring builders of control/rings.py."""

import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from control import rings
from dataplane import consts as C
from dataplane import sched
from dataplane.tables import SS_RR_POS, SS_WRR_CW, int2ip, ip2int, new_config, new_worker
from tests.naive import sched as naive

AV = C.DEST_F_AVAILABLE
ALL_SCHEDS = sorted(C.SCHED_NAMES)
RING_SCHEDS = (C.SCHED_SH, C.SCHED_DH, C.SCHED_MH)
SVC = 7             # a service id that is not 1, to catch id/index mix-ups
FIRST_DEST = 40     # dest ids 40, 41, ... (not 1.. either)


# --- table helpers --------------------------------------------------------------------------------

class Svc:
    """One service with its real servers, in a fresh Config + Worker, and its twin's inputs."""

    def __init__(self, algo, dests, svc_flags=0, ring_dests="control"):
        """dests: list of dicts with optional weight (1), flags (AVAILABLE), u (0), l (0).
        ring_dests: "control" = build the ring from the schedulable-by-config dests (available,
        not sorry), as control does; "all" = from every dest (a stale ring, exercises fallback)."""
        self.cfg = new_config()
        self.wk = new_worker(max_conns=16)
        self.algo = algo
        row = self.cfg.svc[SVC]
        row["proto"] = C.IPPROTO_TCP
        row["fwd"] = C.FWD_MASQ
        row["sched"] = algo
        row["addr"] = ip2int("192.0.2.1")
        row["port"] = 80
        row["flags"] = svc_flags
        row["n_dests"] = len(dests)
        self.ids = []
        for i, spec in enumerate(dests):
            d = FIRST_DEST + i
            r = self.cfg.dest[d]
            r["svc"] = SVC
            r["fwd"] = C.FWD_MASQ
            r["addr"] = ip2int("10.0.0.0") + 1 + i
            r["port"] = 8080
            r["weight"] = spec.get("weight", 1)
            r["flags"] = spec.get("flags", AV)
            r["u_threshold"] = spec.get("u", 0)
            r["l_threshold"] = spec.get("l", 0)
            self.cfg.svc_dests[SVC, i] = d
            self.ids.append(d)
        self.rows = list(self.ids)      # every dest row written (the twin sees them all)
        self.ring_dests = ring_dests
        self.rebuild_ring()
        # twin state
        self.state = [0, 0]
        self.active = {}
        self.inactive = {}

    def key(self, d):
        return f"{int2ip(self.cfg.dest[d]['addr'])}:{int(self.cfg.dest[d]['port'])}"

    def rebuild_ring(self, exclude=()):
        ids = [d for d in self.ids if d not in exclude and (
            self.ring_dests == "all"
            or (self.cfg.dest[d]["flags"] & AV and not self.cfg.dest[d]["flags"] & C.DEST_F_SORRY))]
        weights = [int(self.cfg.dest[d]["weight"]) for d in ids]
        self.cfg.ring[SVC] = rings.build_ring(self.algo, ids, weights, [self.key(d) for d in ids])
        self.ring_list = [int(x) for x in self.cfg.ring[SVC]]

    def pick(self, caddr=0, cport=0, daddr=0):
        cfg, wk = self.cfg, self.wk
        return int(sched.schedule(cfg.svc, cfg.dest, cfg.svc_dests, cfg.ring, wk.sched, wk.active,
                                  wk.inactive, SVC, caddr, cport, daddr))

    def twin_pick(self, caddr=0, cport=0, daddr=0):
        row = self.cfg.svc[SVC]
        svc = {"id": SVC, "sched": int(row["sched"]), "flags": int(row["flags"])}
        dest = {d: {k: int(self.cfg.dest[d][k]) for k in ("svc", "weight", "flags", "u_threshold")}
                for d in self.rows}
        return naive.schedule(svc, dest, list(self.ids), self.ring_list, self.state, self.active,
                              self.inactive, caddr, cport, daddr)

    def drop_last_dest(self, reuse_for=0):
        """Control deletes the last real server of the list and frees its row (svc 0) or hands
        the id to another service; the ring is not rebuilt yet, rr/wrr cursors may point past the
        end of the list."""
        n = len(self.ids) - 1
        self.cfg.svc_dests[SVC, n] = 0
        self.cfg.svc[SVC]["n_dests"] = n
        self.cfg.dest[self.ids.pop()]["svc"] = reuse_for

    def set_load(self, d, active=None, inactive=None):
        if active is not None:
            self.wk.active[d] = active
            self.active[d] = active
        if inactive is not None:
            self.wk.inactive[d] = inactive
            self.inactive[d] = inactive

    def both(self, caddr=0, cport=0, daddr=0):
        got = self.pick(caddr, cport, daddr)
        want = self.twin_pick(caddr, cport, daddr)
        assert got == want, (C.SCHED_NAMES[self.algo], got, want)
        assert [int(self.wk.sched[SVC, SS_RR_POS]), int(self.wk.sched[SVC, SS_WRR_CW])] \
            == self.state
        return got


def names(s, picks):
    return "".join("ABCDEFGHIJ"[s.ids.index(d)] if d else "-" for d in picks)


# --- hash -----------------------------------------------------------------------------------------

@given(st.integers(0, 2**40), st.sampled_from([1, 2, 251, 4093, 65521]))
def test_hash_slot_matches_twin(key, size):
    got = int(sched.hash_slot(key, size))
    assert got == naive.hash_slot(key, size)
    assert 0 <= got < size


# --- rr / wrr -------------------------------------------------------------------------------------

def test_rr_alternates_exactly():
    s = Svc(C.SCHED_RR, [{}, {}, {}])
    assert names(s, [s.both() for _ in range(12)]) == "ABC" * 4


def test_rr_skips_unschedulable_and_keeps_its_place():
    s = Svc(C.SCHED_RR, [{}, {"weight": 0}, {}, {"flags": 0}])
    assert names(s, [s.both() for _ in range(6)]) == "ACACAC"
    s.cfg.dest[s.ids[1]]["weight"] = 1          # B is back: after C (and D), A, then B
    assert names(s, [s.both() for _ in range(6)]) == "ABCABC"
    assert names(s, [s.both()]) == "A"


@pytest.mark.parametrize("weights,period", [
    ((3, 1), "AAAB"),
    ((4, 3, 2), "AABABCABC"),       # the LVS documentation's example
    ((4, 2), "AAB"),                # gcd 2: mw = 4 - (2 - 1) = 3, cw 3 then 1
    ((1, 1, 1), "ABC"),
    ((2, 5, 0, 5), "BDBDBDABDABD"),
])
def test_wrr_exact_ipvs_sequence(weights, period):
    s = Svc(C.SCHED_WRR, [{"weight": w} for w in weights])
    picks = [s.both() for _ in range(3 * len(period))]
    assert names(s, picks) == period * 3


def test_wrr_ratio_over_4000_picks():
    s = Svc(C.SCHED_WRR, [{"weight": 3}, {"weight": 1}])
    picks = [s.pick() for _ in range(4000)]
    a = picks.count(s.ids[0]) / 4000
    assert abs(a - 0.75) < 0.02


def test_wrr_overloaded_dest_is_passed_over():
    s = Svc(C.SCHED_WRR, [{"weight": 3, "u": 2}, {"weight": 1}])
    s.set_load(s.ids[0], active=1, inactive=1)
    assert names(s, [s.both() for _ in range(5)]) == "BBBBB"
    s.set_load(s.ids[0], inactive=0)
    assert "A" in names(s, [s.both() for _ in range(5)])


def test_wrr_weight_change_mid_stream_matches_twin():
    s = Svc(C.SCHED_WRR, [{"weight": 6}, {"weight": 3}, {"weight": 9}])
    for step in range(60):
        if step == 20:
            s.cfg.dest[s.ids[2]]["weight"] = 2       # mw and di change under the cursor
        if step == 40:
            s.cfg.dest[s.ids[0]]["flags"] = 0
        s.both()


# --- lc / wlc / sed / nq --------------------------------------------------------------------------

def _expected_least(algo, loads, weights, ok):
    """Straight from the formulas, with exact fractions; the first minimum in list order wins."""
    cands = [i for i in range(len(loads)) if ok[i]]
    if not cands:
        return None
    if algo == C.SCHED_NQ:
        for i in cands:
            if loads[i][0] == 0:
                return i
    def cost(i):
        a, ina = loads[i]
        if algo == C.SCHED_LC:
            return a * 256 + ina
        if algo == C.SCHED_WLC:
            return Fraction(a * 256 + ina, weights[i])
        return Fraction(a + 1, weights[i])          # sed, nq
    return min(cands, key=cost)


@pytest.mark.parametrize("algo", [C.SCHED_LC, C.SCHED_WLC, C.SCHED_SED, C.SCHED_NQ])
@given(data=st.data())
@settings(max_examples=150)
def test_least_schedulers_follow_their_formula(algo, data):
    n = data.draw(st.integers(1, 6))
    weights = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    loads = data.draw(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 300)),
                               min_size=n, max_size=n))
    s = Svc(algo, [{"weight": w} for w in weights])
    for d, (a, i) in zip(s.ids, loads):
        s.set_load(d, a, i)
    want = _expected_least(algo, loads, weights, [w > 0 for w in weights])
    assert s.both() == (0 if want is None else s.ids[want])


def test_lc_prefers_inactive_over_active():
    s = Svc(C.SCHED_LC, [{}, {}])
    s.set_load(s.ids[0], active=1, inactive=0)      # overhead 256
    s.set_load(s.ids[1], active=0, inactive=255)    # overhead 255
    assert s.both() == s.ids[1]
    s.set_load(s.ids[1], inactive=256)              # tie: first in list
    assert s.both() == s.ids[0]


def test_nq_takes_an_idle_server_first():
    s = Svc(C.SCHED_NQ, [{"weight": 100}, {"weight": 1}])
    s.set_load(s.ids[0], active=1)
    assert s.both() == s.ids[1]             # idle, although sed would pick A (2/100 < 1/1)
    s.set_load(s.ids[1], active=1)
    assert s.both() == s.ids[0]


def test_wlc_spreads_by_weight_as_connections_accumulate():
    s = Svc(C.SCHED_WLC, [{"weight": 3}, {"weight": 1}])
    for _ in range(400):
        d = s.both()
        s.set_load(d, active=s.active.get(d, 0) + 1)
    assert s.active[s.ids[0]] == 300 and s.active[s.ids[1]] == 100


# --- sh / dh / mh ---------------------------------------------------------------------------------

def _clients(n, seed=1):
    rnd = random.Random(seed)
    return [(rnd.getrandbits(32), rnd.getrandbits(16)) for _ in range(n)]


@pytest.mark.parametrize("algo", [C.SCHED_SH, C.SCHED_MH])
def test_hashing_is_stable_per_client_and_spreads(algo):
    s = Svc(algo, [{"weight": 1}] * 4)
    clients = _clients(4000)
    first = [s.pick(a, p) for a, p in clients]
    for _ in range(3):
        assert [s.pick(a, p) for a, p in clients] == first
    for d in s.ids:
        assert abs(first.count(d) / 4000 - 0.25) < 0.04
    # the port does not matter without SVC_F_SH_PORT
    assert [s.pick(a, p ^ 0x5555) for a, p in clients[:200]] == first[:200]


@pytest.mark.parametrize("algo", [C.SCHED_SH, C.SCHED_MH])
def test_hashing_follows_weights(algo):
    s = Svc(algo, [{"weight": 3}, {"weight": 1}])
    picks = [s.pick(a) for a, _ in _clients(8000)]
    assert abs(picks.count(s.ids[0]) / 8000 - 0.75) < 0.03


@pytest.mark.parametrize("algo", [C.SCHED_SH, C.SCHED_MH])
def test_sh_port_flag_hashes_the_client_port(algo):
    s = Svc(algo, [{}] * 4, svc_flags=C.SVC_F_SH_PORT)
    caddr = ip2int("198.51.100.7")
    picks = {s.both(caddr, port) for port in range(1024, 1124)}
    assert picks == set(s.ids)
    assert s.pick(caddr, 4242) == s.pick(caddr, 4242)


def test_dh_hashes_the_packet_destination():
    s = Svc(C.SCHED_DH, [{}] * 3)
    daddrs = [a for a, _ in _clients(600)]
    picks = [s.both(caddr=1, daddr=a) for a in daddrs]
    assert set(picks) == set(s.ids)
    assert [s.pick(caddr=99, cport=7, daddr=a) for a in daddrs] == picks   # client ignored


def test_rings_hold_only_ids():
    for algo in RING_SCHEDS:
        s = Svc(algo, [{"weight": 2}, {"weight": 1}, {"flags": 0}])
        assert set(np.unique(s.cfg.ring[SVC])) == set(s.ids[:2])


def test_mh_removing_one_of_five_moves_about_a_fifth():
    s = Svc(C.SCHED_MH, [{}] * 5)
    clients = _clients(20000, seed=7)
    before = [s.pick(a, p) for a, p in clients]
    gone = s.ids[2]
    s.rebuild_ring(exclude=(gone,))
    s.cfg.dest[gone]["flags"] = 0                  # and control marks it down
    after = [s.pick(a, p) for a, p in clients]
    assert gone not in after
    changed = sum(b != a for b, a in zip(before, after)) / len(clients)
    assert changed <= 1 / 5 + 0.03
    survivors = [(b, a) for b, a in zip(before, after) if b != gone]
    stayed = sum(b == a for b, a in survivors) / len(survivors)
    assert stayed >= 0.97
    # and the slot-level view control writes back
    old = rings.build_maglev(s.ids, [1] * 5, [s.key(d) for d in s.ids])
    new = rings.build_maglev([d for d in s.ids if d != gone], [1] * 4,
                             [s.key(d) for d in s.ids if d != gone])
    assert np.count_nonzero(old != new) / C.RING_SIZE <= 1 / 5 + 0.03


@pytest.mark.parametrize("algo", [C.SCHED_SH, C.SCHED_MH])
def test_fallback_spreads_an_unavailable_dest_over_the_others(algo):
    s = Svc(algo, [{}] * 4, ring_dests="all")
    clients = _clients(4000)
    before = [s.pick(a, p) for a, p in clients]
    s.cfg.dest[s.ids[0]]["weight"] = 0          # quiesced, ring not rebuilt yet
    after = [s.both(a, p) for a, p in clients]
    assert s.ids[0] not in after and 0 not in after
    moved = [a for b, a in zip(before, after) if b == s.ids[0]]
    assert all(a == b for b, a in zip(before, after) if b != s.ids[0])
    for d in s.ids[1:]:
        assert moved.count(d) > len(moved) / 6       # spread, not all on the ring neighbour


def test_dh_has_no_fallback():
    s = Svc(C.SCHED_DH, [{}, {"weight": 0}], ring_dests="all")
    picks = {s.both(daddr=a) for a, _ in _clients(200)}
    assert picks == {s.ids[0], 0}


# --- availability, for every scheduler ------------------------------------------------------------

UNSCHEDULABLE = [
    {"flags": 0},                               # health check failed
    {"weight": 0},                              # quiesced
    {"u": 3},                                   # overloaded (load set below)
    {"flags": AV | C.DEST_F_SORRY},             # sorry server: the caller's business
    {"flags": C.DEST_F_SORRY},
]


@pytest.mark.parametrize("algo", ALL_SCHEDS)
def test_unschedulable_dests_are_never_picked(algo):
    good = {"weight": 1}
    s = Svc(algo, UNSCHEDULABLE[:3] + [good] + UNSCHEDULABLE[3:], ring_dests="all")
    s.set_load(s.ids[2], active=1, inactive=2)
    want = {s.ids[3], 0} if algo == C.SCHED_DH else {s.ids[3]}
    for a, p in _clients(300):
        assert s.both(a, p, a ^ p) in want


@pytest.mark.parametrize("algo", ALL_SCHEDS)
def test_no_schedulable_dest_gives_zero(algo):
    s = Svc(algo, UNSCHEDULABLE, ring_dests="all")
    s.set_load(s.ids[2], active=3)
    for a, p in _clients(50):
        assert s.both(a, p, a) == 0
    empty = Svc(algo, [])
    assert empty.both(1, 2, 3) == 0


@pytest.mark.parametrize("algo", ALL_SCHEDS)
def test_overload_is_u_threshold_on_active_plus_inactive(algo):
    s = Svc(algo, [{"u": 2}])
    s.set_load(s.ids[0], active=1, inactive=0)
    assert s.both(5, 6, 7) == s.ids[0]
    s.set_load(s.ids[0], inactive=1)
    assert s.both(5, 6, 7) == 0
    s.set_load(s.ids[0], active=0)              # no l_threshold hysteresis (stateless)
    assert s.both(5, 6, 7) == s.ids[0]


@pytest.mark.parametrize("algo", [C.SCHED_SH, C.SCHED_MH, C.SCHED_DH, C.SCHED_WRR])
def test_numpy_scalar_arguments_give_the_same_picks(algo):
    """The packet path passes numpy scalars (uint32 addresses, uint16 ports): no float promotion."""
    s = Svc(algo, [{"weight": 2}, {}, {}], svc_flags=C.SVC_F_SH_PORT)
    t = Svc(algo, [{"weight": 2}, {}, {}], svc_flags=C.SVC_F_SH_PORT)
    cfg, wk = t.cfg, t.wk
    for a, p in _clients(300):
        want = s.pick(a, p, a ^ 0xFFFFFFFF)
        got = sched.schedule(cfg.svc, cfg.dest, cfg.svc_dests, cfg.ring, wk.sched, wk.active,
                             wk.inactive, np.uint16(SVC), np.uint32(a), np.uint16(p),
                             np.uint32(a ^ 0xFFFFFFFF))
        assert got == want


def test_unknown_scheduler_gives_zero():
    s = Svc(C.SCHED_RR, [{}])
    s.cfg.svc[SVC]["sched"] = 0
    assert s.pick() == 0


# --- numba == twin on random sequences ------------------------------------------------------------

dest_spec = st.fixed_dictionaries({
    "weight": st.sampled_from([0, 1, 1, 2, 3, 4, 6, 9]),
    "flags": st.sampled_from([AV, AV, AV, AV, 0, AV | C.DEST_F_SORRY]),
    "u": st.sampled_from([0, 0, 0, 1, 2, 5]),
})
# op: (caddr, cport, daddr, action, dest index, value)
op = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 65535), st.integers(0, 2**32 - 1),
               st.integers(0, 6), st.integers(0, 7), st.integers(0, 9))


@given(st.sampled_from(ALL_SCHEDS), st.lists(dest_spec, min_size=1, max_size=8),
       st.sampled_from([0, C.SVC_F_SH_PORT]), st.sampled_from(["control", "all"]),
       st.lists(op, min_size=1, max_size=40))
@settings(max_examples=400)
def test_schedule_matches_twin(algo, dests, svc_flags, ring_dests, ops):
    s = Svc(algo, dests, svc_flags, ring_dests)
    for caddr, cport, daddr, action, di, value in ops:
        d = s.both(caddr, cport, daddr)
        x = s.ids[di % len(s.ids)]
        if action == 0 and d:               # new established connection
            s.set_load(d, active=s.active.get(d, 0) + 1)
        elif action == 1 and d:             # new connection still in SYN_RECV etc.
            s.set_load(d, inactive=s.inactive.get(d, 0) + 1)
        elif action == 2 and s.active.get(x, 0):    # a connection ends
            s.set_load(x, active=s.active[x] - 1)
        elif action == 3:                   # control changes a weight (ring not rebuilt)
            s.cfg.dest[x]["weight"] = value
        elif action == 4:                   # health check flips
            s.cfg.dest[x]["flags"] ^= AV
        elif action == 5 and len(s.ids) > 1:
            s.drop_last_dest(reuse_for=value % 2 * (SVC + 1))


# --- ring builders --------------------------------------------------------------------------------

def test_sh_ring_deals_weight_slots_per_turn():
    ring = rings.build_sh_ring([5, 6, 7], [2, 1, 0], size=11)
    assert ring.tolist() == [5, 5, 6, 7, 5, 5, 6, 7, 5, 5, 6]
    assert rings.build_sh_ring([], [], size=11).tolist() == [0] * 11


def test_dh_ring_is_round_robin():
    assert rings.build_dh_ring([5, 6, 7], [9, 1, 1], size=7).tolist() == [5, 6, 7, 5, 6, 7, 5]


def test_maglev_ring_is_full_weighted_and_deterministic():
    keys = ["10.0.0.1:80", "10.0.0.2:80", b"10.0.0.3:80"]
    ring = rings.build_maglev([1, 2, 3], [3, 1, 0], keys)
    assert ring.dtype == np.uint16 and ring.shape == (C.RING_SIZE,)
    counts = np.bincount(ring, minlength=4)
    assert counts[0] == 0 and counts[3] == 0
    assert abs(counts[1] / C.RING_SIZE - 0.75) < 0.01
    assert np.array_equal(ring, rings.build_maglev([1, 2, 3], [3, 1, 0], keys))
    # slots follow the keys, not the ids
    renamed = rings.build_maglev([7, 8, 9], [3, 1, 0], keys)
    assert np.array_equal(renamed, np.array([0, 7, 8, 9], np.uint16)[ring])


def test_maglev_huge_weights_are_shifted():
    ring = rings.build_maglev([1, 2], [1_000_000, 1], ["a", "b"], size=251)
    counts = np.bincount(ring, minlength=3)
    assert counts[2] >= 1 and counts[1] > 200


def test_maglev_equal_weights_are_balanced():
    ids = list(range(1, 8))
    ring = rings.build_maglev(ids, [1] * 7, [f"10.1.0.{i}:443" for i in ids])
    counts = np.bincount(ring)[1:]
    assert counts.max() - counts.min() <= 2


def test_build_ring_dispatch_and_validation():
    for algo in ALL_SCHEDS:
        ring = rings.build_ring(algo, [3, 4], [1, 1], ["x", "y"])
        assert ring.shape == (C.RING_SIZE,) and ring.dtype == np.uint16
        assert ring.any() == (algo in RING_SCHEDS)
    assert not rings.build_maglev([1, 2], [0, 0], ["x", "y"]).any()
    with pytest.raises(ValueError):
        rings.build_maglev([1, 2], [1, 1], ["x"])
    with pytest.raises(ValueError):
        rings.build_maglev([1], [1], ["x"], size=4096)
    with pytest.raises(ValueError):
        rings.build_sh_ring([1, 1], [1, 1])
    with pytest.raises(ValueError):
        rings.build_dh_ring([0], [1])
    with pytest.raises(ValueError):
        rings.build_ring(C.SCHED_SH, [1], [1, 2])
