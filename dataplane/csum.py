"""Byte access in network order and Internet checksums (RFC 1071 full sums, RFC 1624 incremental
updates) over the batch buffer.

Every function works on a uint8 buffer and offsets and returns plain ints; checksum values are the
16-bit numbers as stored in the header (big-endian read). Incremental updates are what the packet
path uses: a NAT rewrite touches 4 to 12 bytes and must not re-sum the payload. Full sums are for
ICMP errors (their inner headers change and the message is short), for packets whose checksum the
kernel left unfinished (`l4_settle`) and for tests.
"""

import numpy as np
from numba import njit

from dataplane import consts as C

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


@njit(**JIT)
def pseudo_sum(buf, o, proto, l4_len):
    """Folded (not complemented) IPv4 pseudo-header sum: saddr, daddr, proto, l4_len. This is what
    a CHECKSUM_PARTIAL packet carries in its TCP/UDP check field (~csum_tcpudp_magic(.., 0))."""
    return fold(sum16(buf, o + 12, 8) + proto + l4_len)


# l4_settle results
SETTLE_NONE = 0         # not TCP/UDP: nothing to settle (ICMP checksums are always summed in full)
SETTLE_DONE = 1
SETTLE_CANNOT = -1      # a TCP/UDP fragment or inconsistent lengths: the caller drops and counts


@njit(**JIT)
def l4_settle(buf, o, skbinfo):
    """Write the TCP/UDP check field of the (rewritten) IPv4 packet at ``o`` from scratch, in the
    form the kernel needs after a rewrite verdict, for a packet queued with NFQA_SKB_INFO flags
    ``skbinfo`` (consts.NFQA_SKB_*); call it only when ``skbinfo`` has CSUMNOTREADY or GSO.

    Why from scratch: such a packet's check field did not hold a checksum when it arrived
    (CHECKSUM_PARTIAL: only the pseudo-header sum), so the incremental updates of the rewrite
    left it meaningless. Which form: ``nfqnl_mangle()`` marks every packet given back with a
    payload ``CHECKSUM_NONE`` -- nothing in the kernel completes a partial checksum after us --
    so a packet that leaves as it is gets its full checksum. A GSO packet is segmented on its way
    out, and segmentation starts from the check field as a pseudo-header sum (UDP:
    ``__udp_gso_segment`` adjusts it per segment; TCP: ``tcp4_gso_segment`` rewrites it itself
    because the packet is no longer CHECKSUM_PARTIAL), so it gets the pseudo-header sum of the
    whole packet (``pseudo_sum``), as the sender's stack had put there. kernel-notes/
    nfqueue-path.md §3.3 has the kernel side. Returns SETTLE_*."""
    ihl = (np.int64(buf[o]) & 0xF) * 4
    tot = rd16(buf, o + 2)
    proto = np.int64(buf[o + 9])
    if proto == C.IPPROTO_TCP:
        at = o + ihl + 16
        min_l4 = 20
    elif proto == C.IPPROTO_UDP:
        at = o + ihl + 6
        min_l4 = 8
    else:
        return SETTLE_NONE
    if (rd16(buf, o + 6) & 0x3FFF) != 0 or tot < ihl + min_l4:
        return SETTLE_CANNOT
    l4_len = tot - ihl
    if skbinfo & C.NFQA_SKB_GSO:
        wr16(buf, at, pseudo_sum(buf, o, proto, l4_len))
        return SETTLE_DONE
    wr16(buf, at, 0)
    c = ~fold(sum16(buf, o + 12, 8) + proto + l4_len + sum16(buf, o + ihl, l4_len)) & 0xFFFF
    if proto == C.IPPROTO_UDP and c == 0:
        c = 0xFFFF
    wr16(buf, at, c)
    return SETTLE_DONE
