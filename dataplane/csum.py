"""Byte access in network order and Internet checksums (RFC 1071 full sums, RFC 1624 incremental
updates) over the batch buffer.

Every function works on a uint8 buffer and offsets and returns plain ints; checksum values are the
16-bit numbers as stored in the header (big-endian read). Incremental updates are what the packet
path uses: a NAT rewrite touches 4 to 12 bytes and must not re-sum the payload. Full sums are for
ICMP errors (their inner headers change and the message is short) and for tests.
"""

import numpy as np
from numba import njit

JIT = dict(cache=True, nogil=True)
# Tiny scalar helpers of the per-packet path: inlined into their callers at numba IR level, so
# the fast path pays no call (and no array reference counting) for them.
INLINE = dict(cache=True, nogil=True, inline="always")


@njit(**INLINE)
def rd16(buf, o):
    return (np.int64(buf[o]) << 8) | np.int64(buf[o + 1])


@njit(**INLINE)
def rd32(buf, o):
    return ((np.int64(buf[o]) << 24) | (np.int64(buf[o + 1]) << 16)
            | (np.int64(buf[o + 2]) << 8) | np.int64(buf[o + 3]))


@njit(**INLINE)
def wr16(buf, o, v):
    buf[o] = (v >> 8) & 0xFF
    buf[o + 1] = v & 0xFF


@njit(**INLINE)
def wr32(buf, o, v):
    buf[o] = (v >> 24) & 0xFF
    buf[o + 1] = (v >> 16) & 0xFF
    buf[o + 2] = (v >> 8) & 0xFF
    buf[o + 3] = v & 0xFF


@njit(**INLINE)
def fold(s):
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


@njit(**INLINE)
def csum_replace2(check, old, new):
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for one 16-bit word."""
    s = (~check & 0xFFFF) + (~old & 0xFFFF) + (new & 0xFFFF)
    return ~fold(s) & 0xFFFF


@njit(**INLINE)
def csum_replace4(check, old, new):
    s = ((~check & 0xFFFF) + (~(old >> 16) & 0xFFFF) + (~old & 0xFFFF)
         + ((new >> 16) & 0xFFFF) + (new & 0xFFFF))
    return ~fold(s) & 0xFFFF


@njit(**JIT)
def sum16(buf, o, n):
    """One's-complement sum (unfolded) of n bytes from o, odd tail padded with zero."""
    s = np.int64(0)
    end = o + (n & ~1)
    i = o
    while i < end:
        s += (np.int64(buf[i]) << 8) | np.int64(buf[i + 1])
        i += 2
    if n & 1:
        s += np.int64(buf[end]) << 8
    return s


@njit(**JIT)
def ip_checksum(buf, o, ihl_bytes):
    """Checksum of an IPv4 header whose checksum field is taken as zero."""
    s = sum16(buf, o, ihl_bytes) - rd16(buf, o + 10)
    return ~fold(s) & 0xFFFF


@njit(**JIT)
def l4_checksum(buf, ip_o, l4_o, l4_len, proto, check_at):
    """TCP/UDP checksum with the IPv4 pseudo-header, the field at check_at taken as zero."""
    s = sum16(buf, ip_o + 12, 8) + proto + l4_len
    s += sum16(buf, l4_o, l4_len) - rd16(buf, check_at)
    return ~fold(s) & 0xFFFF


@njit(**JIT)
def icmp_checksum(buf, o, n):
    s = sum16(buf, o, n) - rd16(buf, o + 2)
    return ~fold(s) & 0xFFFF
