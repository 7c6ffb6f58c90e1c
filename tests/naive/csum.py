"""Pure-Python twins of dataplane/csum.py and of the NAT rewrite, for tests: full recomputation,
no incremental tricks."""

import struct


def ones_sum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def ip_header_checksum(hdr: bytes) -> int:
    return checksum(hdr[:10] + b"\0\0" + hdr[12:])


def l4_checksum(pkt: bytes) -> int:
    """TCP/UDP checksum of an IPv4 packet computed from scratch (check field taken as zero)."""
    ihl = (pkt[0] & 0xF) * 4
    tot = struct.unpack("!H", pkt[2:4])[0]
    proto = pkt[9]
    seg = bytearray(pkt[ihl:tot])
    at = 16 if proto == 6 else 6
    seg[at:at + 2] = b"\0\0"
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, proto, len(seg))
    c = checksum(pseudo + bytes(seg))
    if proto == 17 and c == 0:
        c = 0xFFFF
    return c


def stored_l4_checksum(pkt: bytes) -> int:
    ihl = (pkt[0] & 0xF) * 4
    at = ihl + (16 if pkt[9] == 6 else 6)
    return struct.unpack("!H", pkt[at:at + 2])[0]


def nat_rewrite(pkt: bytes, direction: int, vaddr: bytes, vport: int, daddr: bytes, dport: int):
    """Reference masquerading: rewrite then recompute every checksum from scratch."""
    b = bytearray(pkt)
    ihl = (b[0] & 0xF) * 4
    if direction == 0:
        b[16:20] = daddr
        b[ihl + 2:ihl + 4] = struct.pack("!H", dport)
    else:
        b[12:16] = vaddr
        b[ihl:ihl + 2] = struct.pack("!H", vport)
    b[10:12] = struct.pack("!H", ip_header_checksum(bytes(b[:ihl])))
    at = ihl + (16 if b[9] == 6 else 6)
    if not (b[9] == 17 and pkt[at:at + 2] == b"\0\0"):
        b[at:at + 2] = struct.pack("!H", l4_checksum(bytes(b)))
    return bytes(b)


# --- CHECKSUM_PARTIAL (NFQA_SKB_CSUMNOTREADY) and GSO packets, as the kernel lays them out ---------
def _check_at(pkt: bytes) -> int:
    return (pkt[0] & 0xF) * 4 + (16 if pkt[9] == 6 else 6)


def pseudo_header_sum(pkt: bytes) -> int:
    """Folded, not complemented, pseudo-header sum of an IPv4 TCP/UDP packet: what a
    CHECKSUM_PARTIAL skb holds in its check field (~csum_tcpudp_magic(saddr, daddr, len, proto, 0))."""
    ihl = (pkt[0] & 0xF) * 4
    tot = struct.unpack("!H", pkt[2:4])[0]
    return ones_sum(pkt[12:20] + struct.pack("!BBH", 0, pkt[9], tot - ihl))


def make_partial(pkt: bytes) -> bytes:
    """The packet as a sender's stack queues it with checksum offload: the L4 check field holds
    the pseudo-header sum only."""
    b = bytearray(pkt)
    at = _check_at(pkt)
    b[at:at + 2] = struct.pack("!H", pseudo_header_sum(pkt))
    return bytes(b)


def kernel_complete(pkt: bytes) -> bytes:
    """Finish a partial checksum the way the kernel (skb_checksum_help, or a device) does: the
    one's complement sum of the L4 bytes from csum_start to the end, check field included,
    folded, complemented, stored at csum_start + csum_offset (0 -> 0xFFFF, CSUM_MANGLED_0)."""
    ihl = (pkt[0] & 0xF) * 4
    tot = struct.unpack("!H", pkt[2:4])[0]
    c = ~ones_sum(pkt[ihl:tot]) & 0xFFFF
    b = bytearray(pkt)
    at = _check_at(pkt)
    b[at:at + 2] = struct.pack("!H", c or 0xFFFF)
    return bytes(b)


def finished(pkt: bytes) -> bytes:
    """The packet with its L4 checksum computed from scratch (the reference result)."""
    b = bytearray(pkt)
    at = _check_at(pkt)
    b[at:at + 2] = struct.pack("!H", l4_checksum(pkt))
    return bytes(b)
