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
