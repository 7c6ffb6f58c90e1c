"""IPv4 / TCP / UDP / ICMP header parsing into a flow description.

`parse_packet` validates one packet and fills a small int64 array (`P_*` slots below) instead of
returning an object, so the batch loop allocates nothing per packet. It never raises: an
inconsistent header returns a negative status that the pipeline counts as DROP_MALFORMED.
"""

import numpy as np
from numba import njit

from dataplane import consts as C
from dataplane.csum import JIT, rd16, rd32

# Header layouts (offsets from the start of each header), named as in the kernel / scapy.
IP_VER_IHL = 0
IP_TOS = 1
IP_TOT_LEN = 2
IP_ID = 4
IP_FRAG_OFF = 6
IP_TTL = 8
IP_PROTOCOL = 9
IP_CHECK = 10
IP_SADDR = 12
IP_DADDR = 16
IP_MF = 0x2000
IP_DF = 0x4000
IP_OFFSET = 0x1FFF

TCP_SPORT = 0
TCP_DPORT = 2
TCP_SEQ = 4
TCP_ACK = 8
TCP_DOFF = 12
TCP_FLAGS = 13
TCP_WINDOW = 14
TCP_CHECK = 16

UDP_SPORT = 0
UDP_DPORT = 2
UDP_LEN = 4
UDP_CHECK = 6

ICMP_TYPE = 0
ICMP_CODE = 1
ICMP_CHECK = 2
ICMP_DEST_UNREACH = 3
ICMP_SOURCE_QUENCH = 4
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETERPROB = 12
ICMP_FRAG_NEEDED = 4       # code of ICMP_DEST_UNREACH

# Slots of the parse result array.
P_PROTO = 0
P_SADDR = 1
P_DADDR = 2
P_SPORT = 3
P_DPORT = 4
P_L4OFF = 5      # absolute offset of the L4 header in buf
P_L4LEN = 6      # bytes from the L4 header to the end of the IP datagram
P_TCPFLAGS = 7
P_IHL = 8        # IP header length in bytes
P_TOTLEN = 9
P_FRAG = 10      # 1 when the packet is a fragment (MF set or offset non-zero)
P_FRAG_FIRST = 11
P_ICMP_TYPE = 12
P_ICMP_CODE = 13
N_P = 16

PARSE_OK = 0
PARSE_MALFORMED = -1
PARSE_NOT_IPV4 = -2


@njit(**JIT)
def parse_packet(buf, o, length, p):
    """Fill p (int64[N_P]) from the packet at buf[o:o+length]; return PARSE_*."""
    for i in range(N_P):
        p[i] = 0
    if length < 20:
        return PARSE_MALFORMED
    vi = np.int64(buf[o])
    if (vi >> 4) != 4:
        return PARSE_NOT_IPV4
    ihl = (vi & 0xF) * 4
    tot = rd16(buf, o + IP_TOT_LEN)
    if ihl < 20 or tot < ihl or tot > length:
        return PARSE_MALFORMED
    proto = np.int64(buf[o + IP_PROTOCOL])
    frag = rd16(buf, o + IP_FRAG_OFF)
    p[P_PROTO] = proto
    p[P_SADDR] = rd32(buf, o + IP_SADDR)
    p[P_DADDR] = rd32(buf, o + IP_DADDR)
    p[P_IHL] = ihl
    p[P_TOTLEN] = tot
    p[P_L4OFF] = o + ihl
    p[P_L4LEN] = tot - ihl
    if frag & (IP_MF | IP_OFFSET):
        p[P_FRAG] = 1
        if (frag & IP_OFFSET) != 0:
            # No L4 header in a later fragment: the caller decides by addresses alone.
            return PARSE_OK
        p[P_FRAG_FIRST] = 1
    l4 = o + ihl
    l4len = tot - ihl
    if proto == C.IPPROTO_TCP:
        if l4len < 20:
            return PARSE_MALFORMED
        doff = (np.int64(buf[l4 + TCP_DOFF]) >> 4) * 4
        if doff < 20 or doff > l4len:
            return PARSE_MALFORMED
        p[P_SPORT] = rd16(buf, l4 + TCP_SPORT)
        p[P_DPORT] = rd16(buf, l4 + TCP_DPORT)
        p[P_TCPFLAGS] = np.int64(buf[l4 + TCP_FLAGS])
    elif proto == C.IPPROTO_UDP:
        if l4len < 8:
            return PARSE_MALFORMED
        ulen = rd16(buf, l4 + UDP_LEN)
        if ulen < 8 or (ulen > l4len and p[P_FRAG] == 0):
            return PARSE_MALFORMED
        p[P_SPORT] = rd16(buf, l4 + UDP_SPORT)
        p[P_DPORT] = rd16(buf, l4 + UDP_DPORT)
    elif proto == C.IPPROTO_ICMP:
        if l4len < 8:
            return PARSE_MALFORMED
        p[P_ICMP_TYPE] = np.int64(buf[l4 + ICMP_TYPE])
        p[P_ICMP_CODE] = np.int64(buf[l4 + ICMP_CODE])
    return PARSE_OK


@njit(**JIT)
def icmp_is_error(icmp_type):
    return (icmp_type == ICMP_DEST_UNREACH or icmp_type == ICMP_SOURCE_QUENCH
            or icmp_type == ICMP_TIME_EXCEEDED or icmp_type == ICMP_PARAMETERPROB)


@njit(**JIT)
def parse_icmp_inner(buf, l4, l4len, q):
    """Parse the datagram quoted by an ICMP error (at l4 + 8) into q, as parse_packet does, but
    tolerating truncation after the first 8 bytes of its L4 header (all RFC 792 guarantees)."""
    for i in range(N_P):
        q[i] = 0
    o = l4 + 8
    n = l4len - 8
    if n < 20:
        return PARSE_MALFORMED
    vi = np.int64(buf[o])
    if (vi >> 4) != 4:
        return PARSE_MALFORMED
    ihl = (vi & 0xF) * 4
    if ihl < 20 or n < ihl + 8:
        return PARSE_MALFORMED
    proto = np.int64(buf[o + IP_PROTOCOL])
    q[P_PROTO] = proto
    q[P_SADDR] = rd32(buf, o + IP_SADDR)
    q[P_DADDR] = rd32(buf, o + IP_DADDR)
    q[P_IHL] = ihl
    q[P_L4OFF] = o + ihl
    q[P_L4LEN] = n - ihl
    if (rd16(buf, o + IP_FRAG_OFF) & IP_OFFSET) != 0:
        return PARSE_MALFORMED
    if proto == C.IPPROTO_TCP or proto == C.IPPROTO_UDP:
        q[P_SPORT] = rd16(buf, o + ihl)
        q[P_DPORT] = rd16(buf, o + ihl + 2)
        return PARSE_OK
    return PARSE_MALFORMED
