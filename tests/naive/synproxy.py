"""Pure-Python twin of dataplane/synproxy.py: bytes in, bytes out, checksums recomputed from
scratch, SipHash over arbitrary byte strings. Written from the specifications (the SipHash paper,
net/ipv4/syncookies.c, RFC 793/7323/2018, the Alibaba patch's option layout) rather than from
the numba code, so that the two can disagree.
"""

import struct

from tests.naive import csum as naive_csum

M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1
MSSTAB = (536, 1300, 1440, 1452, 1460)
COOKIEBITS = 24
COOKIEMASK = (1 << COOKIEBITS) - 1


# --- SipHash-2-4 ----------------------------------------------------------------------------------

def _rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & M64


def siphash24(key: bytes, msg: bytes) -> int:
    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D,
         k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rnd():
        v[0] = (v[0] + v[1]) & M64
        v[1] = _rotl(v[1], 13) ^ v[0]
        v[0] = _rotl(v[0], 32)
        v[2] = (v[2] + v[3]) & M64
        v[3] = _rotl(v[3], 16) ^ v[2]
        v[0] = (v[0] + v[3]) & M64
        v[3] = _rotl(v[3], 21) ^ v[0]
        v[2] = (v[2] + v[1]) & M64
        v[1] = _rotl(v[1], 17) ^ v[2]
        v[2] = _rotl(v[2], 32)

    n = len(msg)
    blocks = n // 8
    tail = msg[blocks * 8:] + b"\0" * (7 - n % 8) + bytes([n & 0xFF])
    for m in list(struct.unpack(f"<{blocks}Q", msg[:blocks * 8])) + [struct.unpack("<Q", tail)[0]]:
        v[3] ^= m
        rnd()
        rnd()
        v[0] ^= m
    v[2] ^= 0xFF
    for _ in range(4):
        rnd()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


# --- cookies (secure_tcp_syn_cookie / check_tcp_syn_cookie) ---------------------------------------

def cookie_hash(k0, k1, saddr, daddr, sport, dport, count):
    k0, k1, saddr, daddr, sport, dport, count = map(int, (k0, k1, saddr, daddr, sport, dport,
                                                          count))
    msg = struct.pack("<QQ", (saddr << 32) | daddr, (sport << 48) | (dport << 32) | (count & M32))
    return siphash24(struct.pack("<QQ", k0, k1), msg) & M32


def cookie_make(secret, saddr, daddr, sport, dport, isn, count, mss_idx):
    k = [int(x) for x in secret]
    isn, count = int(isn), int(count)
    return (cookie_hash(k[0], k[1], saddr, daddr, sport, dport, 0) + isn
            + ((count & 0xFF) << COOKIEBITS)
            + ((cookie_hash(k[2], k[3], saddr, daddr, sport, dport, count) + mss_idx)
               & COOKIEMASK)) & M32


def cookie_check(secret, saddr, daddr, sport, dport, cookie, isn, count, max_age):
    k = [int(x) for x in secret]
    cookie, isn, count = int(cookie), int(isn), int(count)
    c = (cookie - cookie_hash(k[0], k[1], saddr, daddr, sport, dport, 0) - isn) & M32
    diff = (count - (c >> COOKIEBITS)) & 0xFF
    if diff >= max_age:
        return -1
    data = (c - cookie_hash(k[2], k[3], saddr, daddr, sport, dport, (count - diff) & M32)) \
        & COOKIEMASK
    return data if data < len(MSSTAB) else -1


def mss_index(mss):
    idx = 0
    for i, m in enumerate(MSSTAB):
        if mss >= m:
            idx = i
    return idx


def ts_encode(clock, wscale, sack_ok, ecn_ok):
    clock, wscale = int(clock), int(wscale)
    opts = 0xF if wscale < 0 else min(wscale, 14)
    opts |= (0x10 if sack_ok else 0) | (0x20 if ecn_ok else 0)
    clock &= M32
    ts = (clock >> 6 << 6) | opts
    if ts > clock:
        ts -= 64
    return ts & M32


def ts_decode(ecr):
    ecr = int(ecr)
    w = ecr & 0xF
    return (-1 if w == 0xF else min(w, 14)), int(bool(ecr & 0x10)), int(bool(ecr & 0x20))


# --- headers --------------------------------------------------------------------------------------

def parse_options(tcp: bytes) -> dict:
    """{'mss': .., 'wscale': .., 'sack_ok': .., 'ts': (val, ecr)} for the options present."""
    doff = (tcp[12] >> 4) * 4
    out = {}
    i = 20
    while i < doff:
        kind = tcp[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= doff or tcp[i + 1] < 2 or i + tcp[i + 1] > doff:
            break
        size = tcp[i + 1]
        body = tcp[i + 2:i + size]
        if kind == 2 and size == 4:
            out["mss"] = struct.unpack("!H", body)[0]
        elif kind == 3 and size == 3:
            out["wscale"] = min(body[0], 14)
        elif kind == 4 and size == 2:
            out["sack_ok"] = 1
        elif kind == 8 and size == 10:
            out["ts"] = struct.unpack("!II", body)
        i += size
    return out


def handshake_options(mss, wscale, sack_ok, ts_val, ts_ecr) -> bytes:
    o = b""
    if mss >= 0:
        o += struct.pack("!BBH", 2, 4, mss)
    if ts_val >= 0:
        o += (b"\x04\x02" if sack_ok else b"\x01\x01") + struct.pack("!BBII", 8, 10, ts_val,
                                                                     max(ts_ecr, 0))
    elif sack_ok:
        o += b"\x01\x01\x04\x02"
    if wscale >= 0:
        o += struct.pack("!BBBB", 1, 3, 3, min(wscale, 14))
    return o


def packet(saddr, daddr, sport, dport, seq, ack, flags, win, ttl, options=b"", payload=b""):
    """IPv4 (20 bytes, id 0, DF) + TCP with correct checksums."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & M32, ack & M32,
                      (20 + len(options)) // 4 << 4, flags, win & 0xFFFF, 0, 0) + options
    tot = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, tot, 0, 0x4000, ttl, 6, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", naive_csum.ip_header_checksum(ip)) + ip[12:]
    pkt = bytearray(ip + tcp + payload)
    pkt[36:38] = struct.pack("!H", naive_csum.l4_checksum(bytes(pkt)))
    return bytes(pkt)


def synack_from_syn(syn, cookie, mss, wscale, sack_ok, ts_val, ts_ecr, ttl, win):
    ihl = (syn[0] & 0xF) * 4
    saddr, daddr = struct.unpack("!II", syn[12:20])
    sport, dport, seq = struct.unpack("!HHI", syn[ihl:ihl + 8])
    if win < 0:
        win = struct.unpack("!H", syn[ihl + 14:ihl + 16])[0]
    return packet(daddr, saddr, dport, sport, cookie, seq + 1, 0x12, win, ttl,
                  handshake_options(mss, wscale, sack_ok, ts_val, ts_ecr))


def syn_to_rs(saddr, daddr, sport, dport, isn, mss, wscale, sack_ok, ts_val, ts_ecr):
    return packet(saddr, daddr, sport, dport, isn, 0, 0x02, 65535, 64,
                  handshake_options(mss, wscale, sack_ok, ts_val, ts_ecr))


def ack_to_rs(saddr, daddr, sport, dport, seq, ack, win, ts_val, ts_ecr, toa_addr, toa_port):
    o = struct.pack("!BBHI", 254, 8, toa_port, toa_addr) if toa_addr else b""
    if ts_val >= 0:
        o += struct.pack("!BBBBII", 1, 1, 8, 10, ts_val, max(ts_ecr, 0))
    return packet(saddr, daddr, sport, dport, seq, ack, 0x10, win, 64, o)


def rst_build(saddr, daddr, sport, dport, seq, ack, ttl):
    return packet(saddr, daddr, sport, dport, seq, max(ack, 0), 0x14 if ack >= 0 else 0x04, 0, ttl)


def window_rescale(win, shift):
    if shift >= 0:
        return min(win << shift, 0xFFFF)
    return win >> -shift


def tcp_translate(pkt, seq_add, ack_sub, tsval_add, tsecr_sub, win_shift):
    """Reference translation of an IPv4/TCP packet; TCP checksum recomputed from scratch."""
    b = bytearray(pkt)
    t = (b[0] & 0xF) * 4
    flags = b[t + 13]
    seq, ack = struct.unpack("!II", b[t + 4:t + 12])
    b[t + 4:t + 8] = struct.pack("!I", (seq + seq_add) & M32)
    if flags & 0x10:
        b[t + 8:t + 12] = struct.pack("!I", (ack - ack_sub) & M32)
    if not flags & 0x02:
        (win,) = struct.unpack("!H", b[t + 14:t + 16])
        b[t + 14:t + 16] = struct.pack("!H", window_rescale(win, win_shift))
    doff = (b[t + 12] >> 4) * 4
    i = t + 20
    ts_done = False
    while i < t + doff:
        kind = b[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= t + doff or b[i + 1] < 2 or i + b[i + 1] > t + doff:
            break
        size = b[i + 1]
        if kind == 8 and size == 10 and not ts_done:     # the first TS option only
            ts_done = True
            val, ecr = struct.unpack("!II", b[i + 2:i + 10])
            b[i + 2:i + 10] = struct.pack("!II", (val + tsval_add) & M32, (ecr - tsecr_sub) & M32)
        elif kind == 5 and flags & 0x10 and size >= 10 and (size - 2) % 8 == 0:
            for j in range(i + 2, i + size, 4):
                (e,) = struct.unpack("!I", b[j:j + 4])
                b[j:j + 4] = struct.pack("!I", (e - ack_sub) & M32)
        i += size
    b[t + 16:t + 18] = struct.pack("!H", naive_csum.l4_checksum(bytes(b)))
    return bytes(b)
