"""Pure-Python twin of dataplane/sched.py: same algorithms, plain ints, lists and dicts.

Written from IPVS's ip_vs_*.c structure (pointer walks kept as index walks) rather than from the
numba code, so that the two can disagree. Inputs:

* ``svc``: dict with ``id``, ``sched``, ``flags`` (the service row; ``n_dests`` is
  ``len(svc_dests)``);
* ``dest``: dict dest id -> dict with ``svc``, ``weight``, ``flags``, ``u_threshold`` (the dest
  rows; a missing id is an unused row);
* ``svc_dests``: list of the service's dest ids, config order;
* ``ring``: list of dest ids (sh/dh/mh), any length;
* ``state``: list ``[rr_pos, wrr_cw]`` (Worker.sched[svc_id][:2]), updated in place;
* ``active``, ``inactive``: mappings dest id -> count (missing = 0).
"""

from dataplane import consts as C

GOLDEN_RATIO_32 = 0x61C88647
M32 = 0xFFFFFFFF


def hash_slot(key, size):
    h = ((key & M32) * GOLDEN_RATIO_32) & M32
    return (h * size) >> 32


def in_list(dest, svc_id, d):
    r = dest.get(d)
    return (r is not None and r["svc"] == svc_id and bool(r["flags"] & C.DEST_F_AVAILABLE)
            and not r["flags"] & C.DEST_F_SORRY)


def overloaded(dest, active, inactive, d):
    u = dest[d]["u_threshold"]
    return u > 0 and active.get(d, 0) + inactive.get(d, 0) >= u


def dest_ok(dest, active, inactive, svc_id, d):
    return (in_list(dest, svc_id, d) and dest[d]["weight"] > 0
            and not overloaded(dest, active, inactive, d))


def rr(svc_id, dest, svc_dests, state, active, inactive):
    n = len(svc_dests)
    # IPVS walks from the last pick (the cursor names the entry after it) round the list once.
    start = max(state[0], 0) % n
    for i in list(range(start, n)) + list(range(start)):
        if dest_ok(dest, active, inactive, svc_id, svc_dests[i]):
            state[0] = i + 1
            return svc_dests[i]
    return 0


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def wrr(svc_id, dest, svc_dests, state, active, inactive):
    n = len(svc_dests)
    ws = [dest[d]["weight"] for d in svc_dests
          if in_list(dest, svc_id, d) and dest[d]["weight"] > 0]
    di = 0
    for w in ws:
        di = _gcd(di, w)
    di = di or 1
    mw = (max(ws) if ws else 0) - (di - 1)
    cl = state[0] if 0 <= state[0] <= n else 0       # entries 0..cl-1 already passed
    cw = state[1]
    if cw > mw or cw <= 0:
        cw = mw
    elif di > 1:
        cw = cw // di * di + 1
    if mw <= 0:
        return 0

    last = cl - 1       # -1 is the list head
    stop = None
    last_pass = restarted = False
    i = cl
    while True:
        while i < n:
            d = svc_dests[i]
            if in_list(dest, svc_id, d) and not overloaded(dest, active, inactive, d) \
                    and dest[d]["weight"] >= cw:
                state[0], state[1] = i + 1, cw
                return d
            if i == stop:
                state[0], state[1] = i + 1, cw
                return 0
            i += 1
        cw -= di
        if cw <= 0:
            cw = mw
            if last_pass or last == -1:
                state[0], state[1] = 0, cw
                return 0
            restarted = True
        last_pass = cw <= di
        if last_pass and restarted and last != -1:
            stop = last
        i = 0


def lc(svc_id, dest, svc_dests, active, inactive):
    least, loh = 0, 0
    for d in svc_dests:
        if not dest_ok(dest, active, inactive, svc_id, d):
            continue
        doh = active.get(d, 0) * 256 + inactive.get(d, 0)
        if not least or doh < loh:
            least, loh = d, doh
    return least


def _least_ratio(svc_id, dest, svc_dests, active, inactive, overhead, idle_first):
    least, loh = 0, 0
    for d in svc_dests:
        if not dest_ok(dest, active, inactive, svc_id, d):
            continue
        if idle_first and active.get(d, 0) == 0:
            return d
        doh = overhead(d)
        # loh / w(least) > doh / w(d), without division
        if not least or loh * dest[d]["weight"] > doh * dest[least]["weight"]:
            least, loh = d, doh
    return least


def wlc(svc_id, dest, svc_dests, active, inactive):
    return _least_ratio(svc_id, dest, svc_dests, active, inactive,
                        lambda d: active.get(d, 0) * 256 + inactive.get(d, 0), False)


def sed(svc_id, dest, svc_dests, active, inactive):
    return _least_ratio(svc_id, dest, svc_dests, active, inactive,
                        lambda d: active.get(d, 0) + 1, False)


def nq(svc_id, dest, svc_dests, active, inactive):
    return _least_ratio(svc_id, dest, svc_dests, active, inactive,
                        lambda d: active.get(d, 0) + 1, True)


def ring_lookup(svc_id, dest, svc_dests, ring, active, inactive, key, fallback):
    size = len(ring)
    ihash = hash_slot(key, size)
    d = ring[ihash]
    if d == 0:
        return 0
    if dest_ok(dest, active, inactive, svc_id, d):
        return d
    if not fallback or not any(dest_ok(dest, active, inactive, svc_id, x) for x in svc_dests):
        return 0
    for off in range(size):
        d = ring[hash_slot(key + (off + ihash) % size, size)]
        if d == 0:
            return 0
        if dest_ok(dest, active, inactive, svc_id, d):
            return d
    return 0


def schedule(svc, dest, svc_dests, ring, state, active, inactive, caddr, cport, pkt_daddr):
    """Twin of dataplane.sched.schedule (the service row is ``svc``, the worker state ``state``)."""
    algo, svc_id = svc["sched"], svc["id"]
    if not svc_dests:
        return 0
    if algo == C.SCHED_RR:
        return rr(svc_id, dest, svc_dests, state, active, inactive)
    if algo == C.SCHED_WRR:
        return wrr(svc_id, dest, svc_dests, state, active, inactive)
    if algo == C.SCHED_LC:
        return lc(svc_id, dest, svc_dests, active, inactive)
    if algo == C.SCHED_WLC:
        return wlc(svc_id, dest, svc_dests, active, inactive)
    if algo == C.SCHED_SED:
        return sed(svc_id, dest, svc_dests, active, inactive)
    if algo == C.SCHED_NQ:
        return nq(svc_id, dest, svc_dests, active, inactive)
    if algo in (C.SCHED_SH, C.SCHED_MH):
        key = caddr & M32
        if svc["flags"] & C.SVC_F_SH_PORT:
            key += cport & 0xFFFF
        return ring_lookup(svc_id, dest, svc_dests, ring, active, inactive, key, True)
    if algo == C.SCHED_DH:
        return ring_lookup(svc_id, dest, svc_dests, ring, active, inactive, pkt_daddr & M32, False)
    return 0
