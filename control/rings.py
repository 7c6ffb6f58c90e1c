"""Lookup rings of the hashing schedulers (sh, dh, mh): built by control, read by dataplane.sched.

A ring is ``uint16[size]`` of dest ids (0 = empty slot), one row of ``Config.ring``. The data plane
only hashes a key to a slot (``dataplane.sched.hash_slot``) and reads the dest id there; everything
about who owns which slot is decided here, in plain Python (this is not the hot path: a 4093-slot
Maglev ring builds in a few milliseconds).

* ``build_sh_ring``: IPVS ``ip_vs_sh_reassign``: slots are dealt round-robin over the dests in
  list order, each dest taking ``weight`` consecutive slots per turn (a dest with weight <= 0 still
  takes one, as in IPVS: its clients then fall back, see sched.py).
* ``build_dh_ring``: IPVS ``ip_vs_dh_assign``: one slot per dest per turn, weights ignored.
* ``build_maglev``: IPVS ``ip_vs_mh_permutate`` + ``ip_vs_mh_populate`` (Maglev, NSDI'16 §3.4):
  each dest gets ``offset = h1(key) % size`` and ``skip = h2(key) % (size - 1) + 1`` from two
  independent hashes of its key, and so a preference permutation ``offset + j * skip (mod size)``
  of all slots (``size`` must be prime). Dests take turns claiming their next preferred free slot
  until the ring is full; a dest takes ``turns`` slots per round, ``turns = (weight / gcd) >>
  rshift`` (at least 1 for a positive weight), where ``rshift`` keeps ``max_weight / gcd`` within
  ``MH_TAB_BITS`` bits as IPVS does, so that huge weights do not make one dest claim everything in
  one round. Dests with weight <= 0 get no slot.

Stability. The key is the dest's identity (``"addr:port"`` or bytes of it, not its dest id), so
the ring depends only on the set of (key, weight) and their order, never on id allocation. Control
passes only the available dests; when one goes away (health check, removal) the ring is rebuilt
without it, which moves that dest's ~1/N of the slots to the others and, Maglev being only nearly
minimal-disruption, a small extra fraction of other slots (about 1-2 % at N=5, size 4093); the
same holds in reverse when it comes back. Writing back only the slots that differ
(``np.flatnonzero(old != new)``) keeps the table update small. The hash functions are blake2b with
fixed personalisations, so every process and every restart builds the same ring.
"""

import hashlib
import math

import numpy as np

from dataplane import consts as C

MH_TAB_BITS = 6     # IPVS: IP_VS_MH_TAB_BITS = CONFIG_IP_VS_MH_TAB_INDEX (12) / 2


def _key_bytes(key):
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    if isinstance(key, str):
        return key.encode()
    return str(key).encode()


def _key_hash(key, person):
    return int.from_bytes(hashlib.blake2b(_key_bytes(key), digest_size=8, person=person).digest(),
                          "little")


def _is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _check(dest_ids, weights, size):
    dest_ids = [int(d) for d in dest_ids]
    weights = [int(w) for w in weights]
    if len(dest_ids) != len(weights):
        raise ValueError(f"{len(dest_ids)} dest ids but {len(weights)} weights")
    for d in dest_ids:
        if not 0 < d <= 0xFFFF:
            raise ValueError(f"dest id {d} out of range 1..65535")
    if len(set(dest_ids)) != len(dest_ids):
        raise ValueError("duplicate dest id")
    if size < 1:
        raise ValueError(f"ring size {size} < 1")
    return dest_ids, weights


def build_sh_ring(dest_ids, weights, size=C.RING_SIZE):
    """Source-hashing ring: round-robin over dests, each repeated ``weight`` times per turn."""
    dest_ids, weights = _check(dest_ids, weights, size)
    ring = np.zeros(size, np.uint16)
    if not dest_ids:
        return ring
    p = count = 0
    for i in range(size):
        ring[i] = dest_ids[p]
        count += 1
        if count >= weights[p]:
            p = (p + 1) % len(dest_ids)
            count = 0
    return ring


def build_dh_ring(dest_ids, weights=None, size=C.RING_SIZE):
    """Destination-hashing ring: round-robin over dests, one slot each per turn (weights unused)."""
    if weights is None:
        weights = [1] * len(dest_ids)
    dest_ids, _ = _check(dest_ids, weights, size)
    ring = np.zeros(size, np.uint16)
    if dest_ids:
        ring[:] = np.resize(np.array(dest_ids, np.uint16), size)
    return ring


def build_maglev(dest_ids, weights, keys, size=C.RING_SIZE):
    """Weighted Maglev ring (IPVS mh). ``keys[i]`` identifies dest i (``"addr:port"`` or bytes)."""
    dest_ids, weights = _check(dest_ids, weights, size)
    if keys is None or len(keys) != len(dest_ids):
        raise ValueError("build_maglev needs one key per dest")
    if not _is_prime(size):
        raise ValueError(f"Maglev ring size {size} is not prime")
    if len(dest_ids) > size:
        raise ValueError(f"{len(dest_ids)} dests do not fit a ring of {size}")
    ring = np.zeros(size, np.uint16)

    g = 0
    maxw = 0
    for w in weights:
        if w > 0:
            g = math.gcd(g, w)
            maxw = max(maxw, w)
    if g < 1:
        return ring         # no dest with a positive weight: empty ring (ip_vs_mh_reset)
    rshift = max(0, (maxw // g).bit_length() - MH_TAB_BITS)

    perm, skip, turns = [], [], []
    for key, w in zip(keys, weights):
        offset = _key_hash(key, b"lvs-dp mh offset") % size
        perm.append(offset)
        skip.append(_key_hash(key, b"lvs-dp mh skip") % (size - 1) + 1)
        turns.append((((w // g) >> rshift) or 1) if w > 0 else 0)

    taken = bytearray(size)
    filled = 0
    while True:
        for i, d in enumerate(dest_ids):
            for _ in range(turns[i]):
                c = perm[i]
                while taken[c]:
                    c += skip[i]
                    if c >= size:
                        c -= size
                perm[i] = c
                taken[c] = 1
                ring[c] = d
                filled += 1
                if filled == size:
                    return ring


def build_ring(sched, dest_ids, weights, keys=None, size=C.RING_SIZE):
    """The ring of a service with scheduler ``sched`` (SCHED_*); all zeros if it uses none."""
    if sched == C.SCHED_SH:
        return build_sh_ring(dest_ids, weights, size)
    if sched == C.SCHED_DH:
        return build_dh_ring(dest_ids, weights, size)
    if sched == C.SCHED_MH:
        return build_maglev(dest_ids, weights, keys, size)
    _check(dest_ids, weights, size)
    return np.zeros(size, np.uint16)
