"""Drivers for the SYN-cookie benchmark (bench/bench_engine.py::test_syn_cookie), importable only
once dataplane/synproxy.py exists. They loop inside numba over prebuilt 4-tuples, as the engine
would per SYN (cookie_make, for the SYN-ACK's sequence number) and per returning ACK
(cookie_check), without packets: the cookie arithmetic alone."""

import numpy as np
from numba import njit

from dataplane import synproxy as SP
from dataplane.csum import JIT


@njit(**JIT)
def cookies_make(secret, saddrs, sports, daddr, dport, isns, count, out):
    for i in range(len(saddrs)):
        out[i] = SP.cookie_make(secret, saddrs[i], daddr, sports[i], dport, isns[i], count,
                                i % SP.N_MSS)


@njit(**JIT)
def cookies_check(secret, saddrs, sports, daddr, dport, isns, cookies, count_now, max_age, out):
    """out[i] = the MSS index cookie i carries, -1 when refused; returns how many passed."""
    ok = 0
    for i in range(len(saddrs)):
        r = SP.cookie_check(secret, saddrs[i], daddr, sports[i], dport, cookies[i], isns[i],
                            count_now, max_age)
        out[i] = r
        if r >= 0:
            ok += 1
    return ok


def random_secret(seed=7):
    return np.random.default_rng(seed).integers(0, 2 ** 63, size=4, dtype=np.int64).astype(np.uint64)
