"""Schedulers: the real server of a new connection, as IPVS's ip_vs_{rr,wrr,lc,wlc,sed,nq,sh,dh,mh}

Theory of operation
-------------------

``schedule()`` is called by the packet path once per new connection (never for packets of a known
connection, never for a connection placed by a persistence template). It reads the service row
(``svc[svc_id]['sched']`` chooses the algorithm), the service's list of real servers
(``svc_dests[svc_id, :n_dests]``, config order), the real-server rows, the service's lookup ring
(sh/dh/mh only) and this worker's per-real-server connection counts, and returns a dest id, or 0
when no real server can take the connection (the caller then tries the sorry server, else drops
with ``DROP_NO_DEST``). It never raises and never allocates.

Schedulable real server (IPVS's ``!is_unavailable(dest)``, plus our flags):

* owned by the service (``dest[d]['svc'] == svc_id``: a ring not yet rebuilt after a deletion
  must not reach a freed or reused dest id);
* ``DEST_F_AVAILABLE`` set (control clears it on a failed health check; IPVS removes the dest
  from the service list instead) and ``DEST_F_SORRY`` clear (the sorry server is the caller's
  business, IPVS keeps it out of the list too);
* ``weight > 0`` (weight 0 = quiesced: established connections continue, no new ones);
* not overloaded: ``u_threshold > 0 and active + inactive >= u_threshold`` is overloaded.

  IPVS sets ``IP_VS_DEST_F_OVERLOAD`` at that same point, but clears it only once the count drops
  below ``l_threshold`` (or below 3/4 of ``u_threshold`` when ``l_threshold`` is 0). That
  hysteresis needs one remembered bit per real server, and the table contract has no per-worker
  per-dest flag column, so here the overload test is stateless: ``l_threshold`` is ignored and a
  real server is schedulable again as soon as it drops below ``u_threshold``. The counts are this
  worker's (``Worker.active``/``inactive``), so with N workers the effective limit is about N times
  ``u_threshold``.

Per-service scheduler state lives in ``Worker.sched[svc_id]`` (int64, zeroed = freshly created):

* ``SS_RR_POS``: rr and wrr cursor, the index in ``svc_dests[svc_id]`` at which the next scan
  starts, i.e. one past the last pick. 0 is IPVS's "list head" (nothing picked yet).
* ``SS_WRR_CW``: wrr current weight ``cw``; 0 = not set yet.

The algorithms, one function each, with IPVS's semantics:

* rr: the next schedulable server after the last pick, wrapping, at most one full turn.
* wrr: IPVS's gcd/max-weight stepping: ``di`` = gcd of the positive weights, ``mw`` = max weight
  ``- (di - 1)``; a pass over the list picks servers with ``weight >= cw``; at the end of a pass
  ``cw -= di`` and when it reaches 0 it wraps to ``mw``. Weights 4:3:2 give ``AABABCABC``.
  IPVS caches ``mw``/``di`` and re-normalises ``cw`` from its ``dest_changed`` hook; the data plane
  gets no such call, so it recomputes ``mw``/``di`` on every pick (O(n), n <= 255) and applies the
  same ``cw`` re-normalisation each time (a no-op while nothing changes). The one thing it does not
  mirror is the cursor reset to the list head on a dest change (the cursor is only clamped).
* lc: least ``active * 256 + inactive`` (``ip_vs_dest_conn_overhead``), first in list order on ties.
* wlc: least overhead / weight, compared by cross multiplication in 64 bits.
* sed: least ``(active + 1) / weight``, same comparison.
* nq: the first idle server (``active == 0``) in list order, else as sed.
* sh: ``ring[hash(caddr [+ cport])]``; mh: the same lookup on a Maglev ring. The port is hashed
  only with ``SVC_F_SH_PORT`` (ipvsadm's sh-port / mh-port).

  Fallback is always on for sh and mh (IPVS makes it optional, with the sh-fallback / mh-fallback
  flags, which have no ``SVC_F_*`` bit here): when the ring's server is not schedulable, the lookup
  is retried with the key offset by ``ihash + i``, i = 0, 1, ... (IPVS mh's
  ``ip_vs_mh_get_fallback`` probe, used for sh too: it spreads a failed server's clients over all
  the survivors, where IPVS sh's ``offset + hash`` probe walks the neighbouring buckets, which in
  an sh ring all belong to the next server in the list). An empty slot (0) ends the search. Before
  walking up to ``RING_SIZE`` probes, one O(n) scan of the service's list checks that some server
  is schedulable at all, so an all-overloaded service costs O(n), not O(RING_SIZE).
* dh: ``ring[hash(pkt_daddr)]``, no fallback (IPVS dh has none).

Hash (sh, dh, mh and control's tests): the kernel's ``hash_32`` (multiplicative, Fibonacci-style
with ``GOLDEN_RATIO_32``) on ``(addr + port + offset) mod 2**32``, reduced to a slot by keeping its
high bits: ``slot = (h * size) >> 32``, which is ``hash_32(key, bits)`` generalised to the prime
ring size. The rings themselves are built by ``control/rings.py``; the data plane only hashes and
indexes. ``tests/naive/sched.py`` is the pure-Python twin of everything here.
"""

import numpy as np
from numba import njit

from dataplane import consts as C
from dataplane.tables import SS_RR_POS, SS_WRR_CW

GOLDEN_RATIO_32 = 0x61C88647     # include/linux/hash.h
_M32 = 0xFFFFFFFF


@njit(cache=True, nogil=True)
def hash_slot(key, size):
    """Slot in [0, size) of a 32-bit key: kernel hash_32, high bits scaled to ``size``."""
    k = np.int64(key) & _M32
    h = (k * GOLDEN_RATIO_32) & _M32      # < 2**63: no int64 overflow
    return (h * np.int64(size)) >> 32


@njit(cache=True, nogil=True)
def _in_list(dest, svc_id, d):
    """In the service's IPVS destination list: its own available, non-sorry real server.

    The owner check keeps a ring that control has not rebuilt yet from sending a connection to a
    dest id that was deleted (svc 0) or reused by another service."""
    if d <= 0 or d >= dest.shape[0]:
        return False
    if np.int64(dest[d]['svc']) != svc_id:
        return False
    flags = dest[d]['flags']
    if (flags & C.DEST_F_AVAILABLE) == 0:
        return False
    return (flags & C.DEST_F_SORRY) == 0


@njit(cache=True, nogil=True)
def _overloaded(dest, active, inactive, d):
    # (explicit ifs: a value-returning `and` here costs numba ~30 ns per call)
    u = np.int64(dest[d]['u_threshold'])
    if u == 0:
        return False
    return np.int64(active[d]) + np.int64(inactive[d]) >= u


@njit(cache=True, nogil=True)
def _dest_ok(dest, active, inactive, svc_id, d):
    """Schedulable: in the list, weight > 0, not overloaded."""
    if not _in_list(dest, svc_id, d):
        return False
    if dest[d]['weight'] <= 0:
        return False
    if _overloaded(dest, active, inactive, d):
        return False
    return True


@njit(cache=True, nogil=True)
def _sched_rr(dest, svc_dests, sched, active, inactive, svc_id, n):
    pos = sched[svc_id, SS_RR_POS]
    if pos < 0:
        pos = 0
    for k in range(n):
        i = (pos + k) % n
        d = np.int64(svc_dests[svc_id, i])
        if _dest_ok(dest, active, inactive, svc_id, d):
            sched[svc_id, SS_RR_POS] = i + 1
            return d
    return 0


@njit(cache=True, nogil=True)
def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


@njit(cache=True, nogil=True)
def _sched_wrr(dest, svc_dests, sched, active, inactive, svc_id, n):
    # mw, di over the list (ip_vs_wrr_gcd_weight / ip_vs_wrr_max_weight)
    g = np.int64(0)
    maxw = np.int64(0)
    for i in range(n):
        d = np.int64(svc_dests[svc_id, i])
        if not _in_list(dest, svc_id, d):
            continue
        w = np.int64(dest[d]['weight'])
        if w > 0:
            g = w if g == 0 else _gcd(w, g)
            if w > maxw:
                maxw = w
    di = g if g > 0 else np.int64(1)
    mw = maxw - (di - 1)

    # cursor and cw, re-normalised as ip_vs_wrr_dest_changed does (idempotent when unchanged)
    pos = sched[svc_id, SS_RR_POS]
    if pos < 0 or pos > n:
        pos = 0
    cw = sched[svc_id, SS_WRR_CW]
    if cw > mw or cw <= 0:
        cw = mw
    elif di > 1:
        cw = (cw // di) * di + 1

    if mw <= 0:                         # no weight > 0: err_noavail, state unchanged
        return 0

    last = pos - 1                      # index of the last pick, -1 = list head
    stop = np.int64(-2)                 # -2 = no stop mark
    last_pass = False
    restarted = False
    start = pos
    while True:
        for i in range(start, n):
            d = np.int64(svc_dests[svc_id, i])
            if _in_list(dest, svc_id, d) and np.int64(dest[d]['weight']) >= cw:
                if not _overloaded(dest, active, inactive, d):
                    sched[svc_id, SS_RR_POS] = i + 1
                    sched[svc_id, SS_WRR_CW] = cw
                    return d
            if i == stop:               # err_over: all checked for weight >= 1
                sched[svc_id, SS_RR_POS] = i + 1
                sched[svc_id, SS_WRR_CW] = cw
                return 0
        cw -= di
        if cw <= 0:
            cw = mw
            if last_pass or last < 0:
                sched[svc_id, SS_RR_POS] = 0
                sched[svc_id, SS_WRR_CW] = cw
                return 0
            restarted = True
        last_pass = cw <= di
        if last_pass and restarted and last >= 0:
            stop = last
        start = 0


@njit(cache=True, nogil=True)
def _sched_least(dest, svc_dests, active, inactive, svc_id, n, algo):
    """lc, wlc, sed and nq: one scan keeping the least loaded server."""
    least = np.int64(0)
    loh = np.int64(0)
    lw = np.int64(0)
    for i in range(n):
        d = np.int64(svc_dests[svc_id, i])
        if not _dest_ok(dest, active, inactive, svc_id, d):
            continue
        a = np.int64(active[d])
        w = np.int64(dest[d]['weight'])
        if algo == C.SCHED_LC or algo == C.SCHED_WLC:
            doh = (a << 8) + np.int64(inactive[d])
        else:
            doh = a + 1
        if algo == C.SCHED_NQ and a == 0:
            return d
        if least == 0:
            better = True
        elif algo == C.SCHED_LC:
            better = doh < loh
        else:
            better = loh * w > doh * lw
        if better:
            least = d
            loh = doh
            lw = w
    return least


@njit(cache=True, nogil=True)
def _any_ok(dest, svc_dests, active, inactive, svc_id, n):
    for i in range(n):
        if _dest_ok(dest, active, inactive, svc_id, np.int64(svc_dests[svc_id, i])):
            return True
    return False


@njit(cache=True, nogil=True)
def _sched_ring(dest, svc_dests, ring, active, inactive, svc_id, n, key, fallback):
    """sh/dh/mh lookup; with ``fallback``, IPVS mh's re-hash probe (see module doc)."""
    size = ring.shape[1]
    ihash = hash_slot(key, size)
    d = np.int64(ring[svc_id, ihash])
    if d == 0:
        return 0
    if _dest_ok(dest, active, inactive, svc_id, d):
        return d
    if not fallback:
        return 0
    if not _any_ok(dest, svc_dests, active, inactive, svc_id, n):
        return 0
    for off in range(size):
        roff = (off + ihash) % size
        d = np.int64(ring[svc_id, hash_slot(key + roff, size)])
        if d == 0:
            return 0
        if _dest_ok(dest, active, inactive, svc_id, d):
            return d
    return 0


@njit(cache=True, nogil=True)
def schedule(svc, dest, svc_dests, ring, sched, active, inactive, svc_id, caddr, cport, pkt_daddr):
    """Dest id for a new connection of service ``svc_id``, 0 if no real server is schedulable.

    svc, dest, svc_dests, ring: Config tables; sched, active, inactive: this Worker's. ``caddr`` and
    ``cport`` are the client's address and port (sh/mh), ``pkt_daddr`` the packet's destination
    address (dh). Updates ``sched[svc_id]`` for rr/wrr only.
    """
    algo = np.int64(svc[svc_id]['sched'])
    n = np.int64(svc[svc_id]['n_dests'])
    if n == 0:
        return 0
    if algo == C.SCHED_RR:
        return _sched_rr(dest, svc_dests, sched, active, inactive, svc_id, n)
    if algo == C.SCHED_WRR:
        return _sched_wrr(dest, svc_dests, sched, active, inactive, svc_id, n)
    if (algo == C.SCHED_LC or algo == C.SCHED_WLC or algo == C.SCHED_SED
            or algo == C.SCHED_NQ):
        return _sched_least(dest, svc_dests, active, inactive, svc_id, n, algo)
    if algo == C.SCHED_SH or algo == C.SCHED_MH:
        key = np.int64(caddr) & _M32
        if np.int64(svc[svc_id]['flags']) & C.SVC_F_SH_PORT:
            key += np.int64(cport) & 0xFFFF
        return _sched_ring(dest, svc_dests, ring, active, inactive, svc_id, n, key, True)
    if algo == C.SCHED_DH:
        key = np.int64(pkt_daddr) & _M32
        return _sched_ring(dest, svc_dests, ring, active, inactive, svc_id, n, key, False)
    return 0
