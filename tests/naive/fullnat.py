"""Pure-Python twins of dataplane/fullnat.py: bytes in, bytes out, every checksum recomputed from
scratch, options parsed into lists, the port rings modelled with deques. Written for clarity,
not speed; no incremental checksum tricks, no shared code with the kernel under test."""

from __future__ import annotations

import ipaddress
import struct
from collections import deque

from tests.naive.csum import ip_header_checksum, l4_checksum

M32 = 0xFFFFFFFF
TH_SYN, TH_RST, TH_ACK = 0x02, 0x04, 0x10


# --- local addresses and ports ---
def steer_index(key: int, count: int) -> int:
    if count <= 1:
        return 0
    mask = (1 << (count - 1).bit_length()) - 1
    return (key & mask) % count


def owned_ports(lo: int, hi: int, worker: int, n_workers: int) -> list[int]:
    return [p for p in range(max(lo, 0), min(hi, 65535) + 1) if steer_index(p, n_workers) == worker]


class PortPool:
    """Free ports per laddr id, oldest first: a deque per id with a width limit."""

    def __init__(self, width: int):
        self.width = width
        self.free: dict[int, deque] = {}

    def init(self, lid, lo, hi, worker, n_workers) -> int:
        self.free[lid] = deque(owned_ports(lo, hi, worker, n_workers)[:self.width])
        return len(self.free[lid])

    def alloc(self, lid) -> int:
        q = self.free.get(lid)
        return q.popleft() if q else -1

    def release(self, lid, port) -> int:
        q = self.free.setdefault(lid, deque())
        if len(q) >= self.width:
            return -1
        q.append(port)
        return 0

    def count(self, lid) -> int:
        return len(self.free.get(lid, ()))


def laddr_pick(pool: list[int], pool_counts, cursor: int):
    """(laddr id or -1, new cursor): round robin from `cursor`, skipping ids without ports."""
    n = len(pool)
    for k in range(n):
        i = (cursor + k) % n
        if pool[i] != 0 and pool_counts(pool[i]) > 0:
            return pool[i], (i + 1) % n
    return -1, cursor


# --- TCP segment helpers ---
def _split(pkt: bytes):
    ihl = (pkt[0] & 0xF) * 4
    doff = (pkt[ihl + 12] >> 4) * 4
    return ihl, doff


def _fix(pkt: bytearray) -> bytes:
    """Recompute the IP header checksum and the TCP checksum."""
    ihl = (pkt[0] & 0xF) * 4
    pkt[10:12] = struct.pack("!H", ip_header_checksum(bytes(pkt[:ihl])))
    pkt[ihl + 16:ihl + 18] = struct.pack("!H", l4_checksum(bytes(pkt)))
    return bytes(pkt)


def parse_options(opts: bytes):
    """[(offset within opts, kind, raw bytes)] up to EOL, stopping at a malformed option;
    returns (list, ok) where ok is False when the walk stopped on a malformed option."""
    out = []
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            return out, True
        if kind == 1:
            out.append((i, 1, opts[i:i + 1]))
            i += 1
            continue
        if i + 1 >= len(opts):
            return out, False
        size = opts[i + 1]
        if size < 2 or i + size > len(opts):
            return out, False
        out.append((i, kind, opts[i:i + size]))
        i += size
    return out, True


def find_option(pkt: bytes, kind: int) -> int:
    """Absolute offset (from the IP header) of the first option `kind`, or -1."""
    ihl, doff = _split(pkt)
    opts, _ = parse_options(pkt[ihl + 20:ihl + doff])
    for off, k, _raw in opts:
        if k == kind and kind != 1:
            return ihl + 20 + off
    return -1


def set_mss(pkt: bytes, new_mss: int):
    at = find_option(pkt, 2)
    if at < 0 or pkt[at + 1] != 4:
        return pkt, -1
    old = struct.unpack("!H", pkt[at + 2:at + 4])[0]
    if new_mss < 0 or new_mss >= old:
        return pkt, old
    b = bytearray(pkt)
    b[at + 2:at + 4] = struct.pack("!H", new_mss)
    return _fix(b), new_mss


def ts_strip(pkt: bytes):
    at = find_option(pkt, 8)
    if at < 0 or pkt[at + 1] != 10:
        return pkt, 0
    b = bytearray(pkt)
    b[at:at + 10] = b"\x01" * 10
    return _fix(b), 1


def toa_insert(pkt: bytes, cap: int, client_addr: int, client_port: int):
    ihl, doff = _split(pkt)
    if doff + 8 > 60:
        return pkt, -1
    if len(pkt) + 8 > cap:
        return pkt, -2
    toa = struct.pack("!BBHI", 254, 8, client_port, client_addr)
    l4 = ihl
    b = bytearray(pkt[:l4 + 20] + toa + pkt[l4 + 20:])
    b[l4 + 12] = (((doff + 8) // 4) << 4) | (b[l4 + 12] & 0xF)
    b[2:4] = struct.pack("!H", struct.unpack("!H", pkt[2:4])[0] + 8)
    return _fix(b), len(b)


def adjust_seq(pkt: bytes, delta_seq: int, delta_ack: int) -> bytes:
    ihl, _ = _split(pkt)
    b = bytearray(pkt)
    seq, ack = struct.unpack("!II", pkt[ihl + 4:ihl + 12])
    b[ihl + 4:ihl + 8] = struct.pack("!I", (seq + delta_seq) & M32)
    if pkt[ihl + 13] & TH_ACK:
        b[ihl + 8:ihl + 12] = struct.pack("!I", (ack - delta_ack) & M32)
    return _fix(b)


def sack_adjust(pkt: bytes, delta: int):
    ihl, doff = _split(pkt)
    if delta & M32 == 0 or doff <= 20:
        return pkt, 0
    b = bytearray(pkt)
    opts, _ = parse_options(pkt[ihl + 20:ihl + doff])
    n = 0
    for off, kind, raw in opts:
        if kind == 5 and len(raw) >= 10 and (len(raw) - 2) % 8 == 0:
            base = ihl + 20 + off + 2
            for j in range(0, len(raw) - 2, 4):
                v = struct.unpack("!I", b[base + j:base + j + 4])[0]
                b[base + j:base + j + 4] = struct.pack("!I", (v - delta) & M32)
                n += 1
    return (_fix(b) if n else pkt), n


def sack_blocks(pkt: bytes):
    """[(left, right)] of every SACK option of a packet."""
    ihl, doff = _split(pkt)
    opts, _ = parse_options(pkt[ihl + 20:ihl + doff])
    out = []
    for _off, kind, raw in opts:
        if kind == 5 and len(raw) >= 10 and (len(raw) - 2) % 8 == 0:
            for j in range(2, len(raw), 8):
                out.append(struct.unpack("!II", raw[j:j + 8]))
    return out


def set_tuple(pkt: bytes, saddr: int, daddr: int, sport: int, dport: int) -> bytes:
    ihl, _ = _split(pkt)
    b = bytearray(pkt)
    b[12:20] = struct.pack("!II", saddr, daddr)
    b[ihl:ihl + 4] = struct.pack("!HH", sport, dport)
    return _fix(b)


def payload_insert(pkt: bytes, cap: int, data: bytes):
    ihl, doff = _split(pkt)
    tot = struct.unpack("!H", pkt[2:4])[0]
    if len(pkt) + len(data) > cap or tot + len(data) > 0xFFFF:
        return pkt, -1
    at = ihl + doff
    b = bytearray(pkt[:at] + data + pkt[at:])
    b[2:4] = struct.pack("!H", tot + len(data))
    return _fix(b), len(b)


# --- PROXY protocol ---
def proxy_v1(client_addr: int, client_port: int, vip: int, vport: int) -> bytes:
    c = ipaddress.IPv4Address(client_addr)
    v = ipaddress.IPv4Address(vip)
    return f"PROXY TCP4 {c} {v} {client_port} {vport}\r\n".encode()


def proxy_v2(client_addr: int, client_port: int, vip: int, vport: int) -> bytes:
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
            + struct.pack("!IIHH", client_addr, vip, client_port, vport))


# --- policy ---
def seq_diff(a: int, b: int) -> int:
    d = (a - b) & M32
    return d - (1 << 32) if d >= 1 << 31 else d


def toa_wanted(tflags: int, seq: int, client_isn: int) -> bool:
    if tflags & TH_RST:
        return False
    if tflags & TH_SYN:
        return not tflags & TH_ACK
    return bool(tflags & TH_ACK) and seq == (client_isn + 1) & M32


def pp_in_plan(tflags, seq, client_isn, seq_delta_in, pp_len, pp_acked):
    base = (seq_delta_in - pp_len) & M32
    full = seq_delta_in & M32
    if tflags & TH_SYN:
        return False, base
    if pp_acked or seq != (client_isn + 1) & M32:
        return False, full
    if tflags & TH_RST:
        return False, base
    return True, base


def pp_out_ack(ack, client_isn, seq_delta_in):
    start = (client_isn + 1) & M32
    if seq_diff(ack, (start + seq_delta_in) & M32) >= 0:
        return seq_delta_in & M32, True
    return (ack - start) & M32, False


# --- timestamp translation ---
TS_TICK_NS = 1_000_000


def ts_clock(laddr: int, now_ns: int) -> int:
    """A local address's TS clock: milliseconds plus a base fixed by the address."""
    base = ((laddr * 0x9E3779B97F4A7C15) % (1 << 64)) >> 32
    return (now_ns // TS_TICK_NS + base) & M32


def ts_value(pkt: bytes) -> int:
    at = find_option(pkt, 8)
    if at < 0 or pkt[at + 1] != 10:
        return -1
    return struct.unpack("!I", pkt[at + 2:at + 6])[0]


def ts_adjust(pkt: bytes, val_add: int, ecr_sub: int):
    """(packet, 1) with TS value += val_add and TS echo -= ecr_sub, or (packet, 0) without a
    timestamp option."""
    at = find_option(pkt, 8)
    if at < 0 or pkt[at + 1] != 10:
        return pkt, 0
    b = bytearray(pkt)
    val, ecr = struct.unpack("!II", pkt[at + 2:at + 10])
    b[at + 2:at + 10] = struct.pack("!II", (val + val_add) & M32, (ecr - ecr_sub) & M32)
    return _fix(b), 1
