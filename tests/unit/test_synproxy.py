"""SYN-proxy building blocks (dataplane/synproxy.py) against their pure-Python twin
(tests/naive/synproxy.py) and scapy: SipHash vectors, cookie round trips, expiry and forgery,
options in the timestamp, handshake packets parsed back by scapy, sequence/timestamp/window
translation at the 2**32 wrap, and a whole proxied handshake in pure functions."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from numba import njit
from scapy.all import IP, TCP, IPOption_EOL, IPOption_NOP, Raw

from control.synproxy_settings import SYSCTL_NAMES, SynproxySettings
from dataplane import consts as C
from dataplane import nat
from dataplane import synproxy as S
from dataplane import tables as T
from tests.naive import synproxy as N

M32 = 0xFFFFFFFF
NOW = 1_700_000_000 * C.NS              # a wall-clock-like now_ns: counter and TS clock are large
CLIENT, VIP, RS = "198.51.100.7", "172.16.1.100", "172.16.2.13"
KEY = bytes(range(16))

u32 = st.integers(0, M32)
u64 = st.integers(0, 2**64 - 1)
port = st.integers(0, 65535)


def secret(seed):
    return np.random.default_rng(seed).integers(0, 2**64, 4, dtype=np.uint64)


SECRET = secret(1)
SECRETS = np.stack([SECRET, secret(2)])
CFG = SynproxySettings(wscale=7).as_array()


def ip2i(s):
    return T.ip2int(s)


def to_buf(pkt, cap=256):
    b = bytes(pkt)
    buf = np.zeros(cap, np.uint8)
    buf[:len(b)] = np.frombuffer(b, np.uint8)
    return buf, len(b)


def checksums_ok(b):
    p = IP(bytes(b))
    q = p.copy()
    del q.chksum
    del q[TCP].chksum
    q = IP(bytes(q))
    return p.chksum == q.chksum and p[TCP].chksum == q[TCP].chksum


def opts(b):
    return IP(bytes(b))[TCP].options


# ================================================================================================
# SipHash-2-4
# ================================================================================================

@pytest.mark.parametrize("n,expect", [(0, 0x726FDB47DD0E0E31), (8, 0x93F5F5799A932462),
                                      (15, 0xA129CA6149BE45E5), (16, 0x3F2ACC7F57C29BDB)])
def test_siphash_twin_reference_vectors(n, expect):
    """The paper's vectors (key 00..0f, message 00..n-1) pin the twin down."""
    assert N.siphash24(KEY, bytes(range(n))) == expect


def test_siphash_numba_reference_vector():
    k0, k1 = struct.unpack("<QQ", KEY)
    m0, m1 = struct.unpack("<QQ", bytes(range(16)))
    assert int(S.siphash24_16(k0, k1, m0, m1)) == 0x3F2ACC7F57C29BDB


@given(u64, u64, u64, u64)
@settings(max_examples=300)
def test_siphash_matches_twin(k0, k1, m0, m1):
    h = S.siphash24_16(np.uint64(k0), np.uint64(k1), np.uint64(m0), np.uint64(m1))
    assert int(h) == N.siphash24(struct.pack("<QQ", k0, k1),
                                                            struct.pack("<QQ", m0, m1))


# ================================================================================================
# Cookies
# ================================================================================================

TUPLE = (ip2i(CLIENT), ip2i(VIP), 40000, 80)


@pytest.mark.parametrize("mss_idx", range(S.N_MSS))
@pytest.mark.parametrize("age", range(S.COUNTER_TRIES))
def test_cookie_round_trip_every_mss_and_age(mss_idx, age):
    count = S.cookie_count(NOW)
    isn = 0x12345678
    c = S.cookie_make(SECRET, *TUPLE, isn, count - age, mss_idx)
    assert c == N.cookie_make(SECRET, *TUPLE, isn, count - age, mss_idx)
    assert S.cookie_check(SECRET, *TUPLE, c, isn, count, S.COUNTER_TRIES) == mss_idx
    assert N.cookie_check(SECRET, *TUPLE, c, isn, count, S.COUNTER_TRIES) == mss_idx


@pytest.mark.parametrize("mss_idx", range(S.N_MSS))
@pytest.mark.parametrize("wscale", [-1, 0, 1, 7, 14])
@pytest.mark.parametrize("sack", [0, 1])
@pytest.mark.parametrize("ecn", [0, 1])
def test_cookie_and_timestamp_round_trip_every_option_combination(mss_idx, wscale, sack, ecn):
    """What the SYN-ACK carries (cookie, TS value) comes back from the ACK intact."""
    clock = S.ts_now(NOW)
    tsval = S.ts_encode(clock, wscale, sack, ecn)
    assert tsval == N.ts_encode(clock, wscale, sack, ecn)
    assert tsval <= clock and clock - tsval < 64
    assert S.ts_decode(tsval) == (wscale, sack, ecn) == N.ts_decode(tsval)
    count = S.cookie_count(NOW)
    c = S.cookie_make(SECRET, *TUPLE, 99, count, mss_idx)
    assert S.cookie_check(SECRET, *TUPLE, c, 99, count, 4) == mss_idx


@given(u32, u32, port, port, u32, st.integers(0, 2**40), st.integers(0, S.N_MSS - 1),
       st.integers(0, 6))
@settings(max_examples=300)
def test_cookie_matches_twin(saddr, daddr, sport, dport, isn, count, idx, age):
    c = S.cookie_make(SECRET, saddr, daddr, sport, dport, isn, count, idx)
    assert c == N.cookie_make(SECRET, saddr, daddr, sport, dport, isn, count, idx)
    now = count + age
    expect = idx if age < 4 else -1
    assert S.cookie_check(SECRET, saddr, daddr, sport, dport, c, isn, now, 4) == expect
    assert N.cookie_check(SECRET, saddr, daddr, sport, dport, c, isn, now, 4) == expect


def test_cookie_expires_after_max_age_and_rejects_the_future():
    count = 1000
    c = S.cookie_make(SECRET, *TUPLE, 5, count, 2)
    for age in range(-3, 300):
        got = S.cookie_check(SECRET, *TUPLE, c, 5, count + age, 4)
        assert got == (2 if 0 <= age < 4 else -1), age
    # a shorter lifetime (the mainline kernel's MAX_SYNCOOKIE_AGE is 2)
    assert S.cookie_check(SECRET, *TUPLE, c, 5, count + 1, 2) == 2
    assert S.cookie_check(SECRET, *TUPLE, c, 5, count + 2, 2) == -1


@pytest.mark.parametrize("count", [255, 256, 2**32 - 2, 2**32 - 1, 2**32])
def test_cookie_counter_wraps(count):
    """The counter's top byte and 32-bit hash input both wrap without losing a valid cookie."""
    c = S.cookie_make(SECRET, *TUPLE, M32, count, 4)
    for age in range(4):
        assert S.cookie_check(SECRET, *TUPLE, c, M32, count + age, 4) == 4
    assert S.cookie_check(SECRET, *TUPLE, c, M32, count + 4, 4) == -1


def test_cookie_binds_tuple_isn_and_secret():
    count = S.cookie_count(NOW)
    c = S.cookie_make(SECRET, *TUPLE, 777, count, 3)
    saddr, daddr, sport, dport = TUPLE
    for t in [(saddr + 1, daddr, sport, dport), (saddr, daddr + 1, sport, dport),
              (saddr, daddr, sport + 1, dport), (saddr, daddr, sport, dport + 1),
              (daddr, saddr, dport, sport)]:
        assert S.cookie_check(SECRET, *t, c, 777, count, 4) == -1
    assert S.cookie_check(secret(3), *TUPLE, c, 777, count, 4) == -1
    # The ISN is added, not hashed (as in the kernel): an ISN k too high reads as index 3 - k,
    # so a small error may pass with a smaller MSS, a large one never does. Same for the low
    # cookie bits; any other bit flip lands outside the table or the counter window.
    assert S.cookie_check(SECRET, *TUPLE, c, 778, count, 4) == 2
    assert S.cookie_check(SECRET, *TUPLE, c, 777 + 1000, count, 4) == -1
    assert S.cookie_check(SECRET, *TUPLE, c, 777 - 5, count, 4) == -1
    for bit in range(32):
        got = S.cookie_check(SECRET, *TUPLE, c ^ (1 << bit), 777, count, 4)
        assert got == -1 if bit >= 3 else got != 3, bit


@njit
def _accepted_with_top_byte(sec, saddr, daddr, sport, dport, isn, count, top, max_age):
    """How many of the 2**24 cookies whose stripped value has top byte `top` check."""
    h0 = S.cookie_hash(sec[0], sec[1], saddr, daddr, sport, dport, 0)
    n = 0
    for low in range(1 << 24):
        c = (h0 + isn + (top << 24) + low) & 0xFFFFFFFF
        if S.cookie_check(sec, saddr, daddr, sport, dport, c, isn, count, max_age) >= 0:
            n += 1
    return n


@njit
def _accepted_random(sec, saddr, daddr, sport, dport, isn, count, max_age, cookies):
    n = 0
    for c in cookies:
        if S.cookie_check(sec, saddr, daddr, sport, dport, c, isn, count, max_age) >= 0:
            n += 1
    return n


def test_forged_cookie_false_accept_rate_is_exact():
    """Exhaustively over the low 24 bits: a counter byte inside the window accepts exactly N_MSS
    of the 2**24 values (one per MSS index), any other byte none. So exactly
    max_age * N_MSS of the 2**32 possible acks pass: a random forgery succeeds with probability
    4 * 5 / 2**32 (4.7e-9) per secret generation tried."""
    count = 5000
    args = (SECRET, *TUPLE, 4242, count)
    for d, expect in [(0, S.N_MSS), (3, S.N_MSS), (4, 0), (255, 0)]:
        assert _accepted_with_top_byte(*args, (count - d) & 0xFF, 4) == expect, d


def test_forged_random_acks_are_rejected():
    """2**21 random acks: the expected number of false accepts is 2**21 * 20 / 2**32 = 0.01."""
    cookies = np.random.default_rng(7).integers(0, 2**32, 1 << 21, dtype=np.int64)
    assert _accepted_random(SECRET, *TUPLE, 4242, 5000, 4, cookies) == 0


@pytest.mark.parametrize("mss,idx", [(0, 0), (535, 0), (536, 0), (1299, 0), (1300, 1),
                                     (1439, 1), (1440, 2), (1451, 2), (1452, 3), (1459, 3),
                                     (1460, 4), (9000, 4)])
def test_mss_index(mss, idx):
    assert S.mss_index(mss) == idx == N.mss_index(mss)


@given(st.integers(0, 2**34), st.integers(-1, 15), st.booleans(), st.booleans())
@settings(max_examples=300)
def test_ts_encode_never_runs_ahead_and_matches_twin(clock, wscale, sack, ecn):
    ts = S.ts_encode(clock, wscale, int(sack), int(ecn))
    assert ts == N.ts_encode(clock, wscale, sack, ecn)
    c = clock & M32
    assert (c - ts) & M32 < 64          # at most 63 ms behind, mod 2**32 (clock < 64 wraps)
    assert S.ts_decode(ts) == N.ts_decode(ts)


# ================================================================================================
# The SYN-ACK
# ================================================================================================

LINUX = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 0)), ("NOP", None), ("WScale", 7)]
WINDOWS = [("MSS", 1460), ("NOP", None), ("WScale", 8), ("NOP", None), ("NOP", None),
           ("SAckOK", b"")]
SYN_CASES = {
    "linux": dict(options=LINUX),
    "windows_no_ts": dict(options=WINDOWS),
    "no_options": dict(options=[]),
    "mss_only_small": dict(options=[("MSS", 1400)]),
    "ts_only": dict(options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 0))]),
    "ts_sack_no_ws": dict(options=[("MSS", 1300), ("SAckOK", b""), ("Timestamp", (9, 0))]),
    "jumbo_mss_eol": dict(options=[("MSS", 8960), ("WScale", 14), ("Timestamp", (1, 0)),
                                   ("EOL", None)]),
    "ip_options": dict(options=LINUX, ip_options=True),
    "payload": dict(options=LINUX, payload=b"TFO-ish data in a SYN"),
}


def make_syn(options, ip_options=False, payload=b"", seq=0xFFFFFFF0, window=64240):
    ip = IP(src=CLIENT, dst=VIP, ttl=57, tos=0x10, id=4321,
            options=[IPOption_NOP()] * 3 + [IPOption_EOL()] if ip_options else [])
    return ip / TCP(sport=40000, dport=80, flags="S", seq=seq, window=window,
                    options=options) / Raw(payload)


def expected_synack(syn, settings_row, now_ns, sec=SECRET):
    """The SYN-ACK as the twin computes it from the SYN's options and the settings row."""
    tcp = bytes(syn[TCP])
    o = N.parse_options(tcp)
    mss_c = o.get("mss", 0) or 536
    mss = min(mss_c, settings_row[S.SPC_INIT_MSS])
    ts_ok = bool(settings_row[S.SPC_TIMESTAMP]) and "ts" in o
    ws_ok = ts_ok and settings_row[S.SPC_WSCALE] > 0 and "wscale" in o
    sack = int(ts_ok and bool(settings_row[S.SPC_SACK]) and o.get("sack_ok", 0) == 1)
    ts_val = N.ts_encode(now_ns // 10**6, o["wscale"] if ws_ok else -1, sack, 0) if ts_ok else -1
    cookie = N.cookie_make(sec, ip2i(syn[IP].src), ip2i(syn[IP].dst), syn[TCP].sport,
                           syn[TCP].dport, syn[TCP].seq, (now_ns // (60 * C.NS)) & M32,
                           N.mss_index(mss))
    return N.synack_from_syn(bytes(syn), cookie, mss,
                             int(settings_row[S.SPC_WSCALE]) if ws_ok else -1, sack, ts_val,
                             o["ts"][0] if ts_ok else -1, int(settings_row[S.SPC_SYNACK_TTL]),
                             int(settings_row[S.SPC_SYNACK_WIN])), cookie, ts_val


SETTINGS_CASES = {
    "default": SynproxySettings(),
    "wscale7": SynproxySettings(wscale=7),
    "no_timestamps": SynproxySettings(wscale=7, timestamp=False),
    "no_sack": SynproxySettings(sack=False, wscale=9),
    "mss1460_win0_ttl200": SynproxySettings(init_mss=1460, synack_window=0, synack_ttl=200),
}


@pytest.mark.parametrize("case", SYN_CASES)
@pytest.mark.parametrize("sname", SETTINGS_CASES)
def test_synack_from_scapy_syn(case, sname):
    row = SETTINGS_CASES[sname].as_array()
    syn = make_syn(**SYN_CASES[case])
    buf, n = to_buf(syn)
    out_len = S.synproxy_syn(buf, 0, n, len(buf), SECRETS, row, NOW)
    out = bytes(buf[:out_len])
    expect, cookie, ts_val = expected_synack(IP(bytes(syn)), row, NOW)
    assert out == expect
    p = IP(out)
    assert checksums_ok(out)
    assert (p.src, p.dst, p[TCP].sport, p[TCP].dport) == (VIP, CLIENT, 80, 40000)
    assert p[TCP].flags == "SA" and p.ttl == row[S.SPC_SYNACK_TTL] and p.flags == "DF"
    assert p[TCP].seq == cookie and p[TCP].ack == (syn[TCP].seq + 1) & M32
    assert p.ihl == 5 and p.tos == 0 and len(p[TCP].payload) == 0
    got = dict((k, v) for k, v in p[TCP].options if k not in ("NOP", "EOL"))
    client = dict((k, v) for k, v in syn[TCP].options if k not in ("NOP", "EOL"))
    ts_ok = row[S.SPC_TIMESTAMP] and "Timestamp" in client
    assert got["MSS"] == min(client.get("MSS", 536), row[S.SPC_INIT_MSS])
    if ts_ok:
        assert got["Timestamp"] == (ts_val, client["Timestamp"][0])
        assert ("SAckOK" in got) == bool(row[S.SPC_SACK] and "SAckOK" in client)
        if row[S.SPC_WSCALE] and "WScale" in client:
            assert got["WScale"] == row[S.SPC_WSCALE]
        else:
            assert "WScale" not in got
    else:   # the kernel's rule: no timestamps, no other options
        assert set(got) == {"MSS"}
    win = row[S.SPC_SYNACK_WIN]
    assert p[TCP].window == (syn[TCP].window if win < 0 else win)


def test_synack_needs_room_and_a_sane_syn():
    syn = make_syn(LINUX)
    buf, n = to_buf(syn)
    assert S.synproxy_syn(buf, 0, n, S.SYNACK_MIN_CAP - 1, SECRETS, CFG, NOW) == -1
    assert S.synack_from_syn(buf, 0, 39, 256, 1, 1460, -1, 0, -1, -1, 63, -1) == -1
    buf[32] = 0x20      # doff 8 words but the segment is shorter
    assert S.synproxy_syn(buf, 0, 40, 256, SECRETS, CFG, NOW) == -1


def test_synack_at_an_offset_in_a_batch_buffer():
    syn = make_syn(LINUX)
    b = bytes(syn)
    buf = np.full(600, 0xEE, np.uint8)
    buf[100:100 + len(b)] = np.frombuffer(b, np.uint8)
    n = S.synproxy_syn(buf, 100, len(b), 200, SECRETS, CFG, NOW)
    expect, _, _ = expected_synack(IP(b), CFG, NOW)
    assert bytes(buf[100:100 + n]) == expect
    assert (buf[:100] == 0xEE).all() and (buf[100 + 200:] == 0xEE).all()


@given(st.lists(st.sampled_from([("MSS", 1460), ("MSS", 600), ("SAckOK", b""), ("NOP", None),
                                 ("WScale", 3), ("WScale", 15), ("Timestamp", (7, 0)),
                                 ("Timestamp", (M32, 5))]), max_size=6),
       st.binary(max_size=4))
@settings(max_examples=200)
def test_tcp_options_matches_twin(options, junk):
    """Random option lists, and random trailing junk bytes (often malformed options)."""
    raw = bytes(TCP(options=options))
    tcp = raw[20:] + junk
    tcp = tcp + b"\0" * (-len(tcp) % 4)
    if len(tcp) > 40:
        return
    hdr = bytearray(raw[:20])
    hdr[12] = ((20 + len(tcp)) // 4) << 4
    seg = bytes(hdr) + tcp
    buf = np.frombuffer(seg, np.uint8).copy()
    mss, ws, sack, tsval, tsecr = S.tcp_options(buf, 0)
    o = N.parse_options(seg)
    assert mss == o.get("mss", -1) and ws == o.get("wscale", -1) and sack == o.get("sack_ok", 0)
    assert (tsval, tsecr) == o.get("ts", (-1, -1))


# ================================================================================================
# Packets the balancer originates
# ================================================================================================

@given(u32, u32, port, port, u32, st.integers(0, 65535), st.integers(-1, 14), st.booleans(),
       st.integers(-1, M32), u32)
@settings(max_examples=100)
def test_syn_to_rs_matches_twin_and_scapy(saddr, daddr, sport, dport, isn, mss, ws, sack, tsv,
                                          tse):
    tx = np.zeros(T.TX_SLOT * 2, np.uint8)
    n = S.syn_to_rs(tx, T.TX_SLOT, saddr, daddr, sport, dport, isn, mss, ws, int(sack), tsv, tse)
    out = bytes(tx[T.TX_SLOT:T.TX_SLOT + n])
    assert out == N.syn_to_rs(saddr, daddr, sport, dport, isn, mss, ws, int(sack), tsv, tse)
    assert not tx[:T.TX_SLOT].any()
    p = IP(out)
    assert checksums_ok(out) and p[TCP].flags == "S" and p[TCP].seq == isn and p.ttl == 64
    got = dict((k, v) for k, v in p[TCP].options if k != "NOP")
    assert got["MSS"] == mss and ("SAckOK" in got) == sack
    assert got.get("WScale", -1) == ws
    assert got.get("Timestamp") == ((tsv, tse) if tsv >= 0 else None)


@given(u32, u32, port, port, u32, u32, st.integers(0, 65535), st.integers(-1, M32), u32,
       st.sampled_from([0, ip2i(CLIENT)]), port)
@settings(max_examples=100)
def test_ack_to_rs_matches_twin_and_scapy(saddr, daddr, sport, dport, seq, ack, win, tsv, tse,
                                          toa_addr, toa_port):
    tx = np.zeros(T.TX_SLOT, np.uint8)
    n = S.ack_to_rs(tx, 0, saddr, daddr, sport, dport, seq, ack, win, tsv, tse, toa_addr,
                    toa_port)
    out = bytes(tx[:n])
    assert out == N.ack_to_rs(saddr, daddr, sport, dport, seq, ack, win, tsv, tse, toa_addr,
                              toa_port)
    p = IP(out)
    assert checksums_ok(out) and p[TCP].flags == "A" and (p[TCP].seq, p[TCP].ack) == (seq, ack)
    assert p[TCP].window == win
    if toa_addr:    # TOA first, as the RS's toa module expects it in the handshake ACK
        assert out[40:48] == struct.pack("!BBHI", 254, 8, toa_port, toa_addr)


@pytest.mark.parametrize("ack", [-1, 0, 12345])
def test_rst_build(ack):
    tx = np.zeros(64, np.uint8)
    n = S.rst_build(tx, 0, ip2i(VIP), ip2i(CLIENT), 80, 40000, 0xFFFFFFFF, ack, 63)
    assert n == 40
    out = bytes(tx[:n])
    assert out == N.rst_build(ip2i(VIP), ip2i(CLIENT), 80, 40000, 0xFFFFFFFF, ack, 63)
    p = IP(out)
    assert checksums_ok(out) and p[TCP].flags == ("R" if ack < 0 else "RA")
    assert p[TCP].seq == M32 and p[TCP].ack == max(ack, 0)


# ================================================================================================
# Translation
# ================================================================================================

def seg(flags="A", seq=1, ack=1, window=1000, options=(), payload=b"", sport=80, dport=40000):
    return bytes(IP(src=RS, dst=CLIENT) / TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                              ack=ack, window=window, options=list(options))
                 / Raw(payload))


def translate(pkt, *args):
    buf, n = to_buf(pkt)
    S.tcp_translate(buf, 20, *args)
    return bytes(buf[:n])


option_lists = st.lists(st.one_of(
    st.tuples(st.just("Timestamp"), st.tuples(u32, u32)),
    st.tuples(st.just("SAck"), st.lists(st.tuples(u32, u32), min_size=1, max_size=4).map(
        lambda blocks: tuple(e for b in blocks for e in b))),
    st.just(("NOP", None)), st.just(("MSS", 1460)), st.just(("WScale", 3))), max_size=4)


@given(option_lists, st.sampled_from(["A", "PA", "S", "SA", "R", "RA", "FA", ""]), u32, u32,
       st.integers(0, 65535), u32, u32, u32, u32, st.integers(-14, 14), st.binary(max_size=40))
@settings(max_examples=400)
def test_translate_matches_twin(options, flags, seq, ack, window, seq_add, ack_sub, tsval_add,
                                tsecr_sub, win_shift, payload):
    """Random segments (TS and SACK at any alignment, NOPs), random deltas (wrapping freely),
    both window directions: in-place incremental result == twin's full recompute."""
    size = {"Timestamp": 10, "NOP": 1, "MSS": 4, "WScale": 3}
    if sum(size.get(k) or 2 + 4 * len(v) for k, v in options) > 40:
        return      # does not fit in a TCP header
    pkt = seg(flags, seq, ack, window, options, payload)
    out = translate(pkt, seq_add, ack_sub, tsval_add, tsecr_sub, win_shift)
    assert out == N.tcp_translate(pkt, seq_add, ack_sub, tsval_add, tsecr_sub, win_shift)
    assert checksums_ok(out)


def test_translate_at_the_wrap():
    """seq 2**32 - 16 + 32 -> 16; ack 16 - 32 -> 2**32 - 16; SACK edges straddling the wrap;
    TS value and echo wrap too."""
    pkt = seg("A", seq=M32 - 15, ack=16, options=[
        ("NOP", None), ("NOP", None), ("Timestamp", (M32 - 4, 3)),
        ("NOP", None), ("NOP", None), ("SAck", (M32 - 9, 6, 20, 40))])
    out = IP(translate(pkt, 32, 32, 10, 10, 0))
    assert (out[TCP].seq, out[TCP].ack) == (16, M32 - 15)
    o = dict(out[TCP].options)
    assert o["Timestamp"] == (5, M32 - 6)
    assert o["SAck"] == (M32 - 41, M32 - 25, M32 - 11, 8)
    assert checksums_ok(bytes(out))


def test_translate_misaligned_timestamp():
    """A TS option at an odd offset (single NOP before it): the checksum still holds."""
    pkt = seg("A", options=[("NOP", None), ("Timestamp", (0x01020304, 0xA0B0C0D0)), ("NOP", None)])
    assert pkt[40 + 1] == 8         # kind at TCP offset 21
    out = translate(pkt, 0, 0, 0x10203, 0x70605, 0)
    assert dict(IP(out)[TCP].options)["Timestamp"] == (0x01030507, (0xA0B0C0D0 - 0x70605) & M32)
    assert checksums_ok(out) and out == N.tcp_translate(pkt, 0, 0, 0x10203, 0x70605, 0)


def test_translate_is_undone_by_its_inverse():
    pkt = seg("PA", seq=5, ack=M32, options=[("NOP", None), ("NOP", None),
                                             ("Timestamp", (9, 1)), ("NOP", None),
                                             ("NOP", None), ("SAck", (1, 2))], payload=b"xyz")
    fwd = translate(pkt, 0x80000000, 0x7FFFFFFF, 77, 88, 0)
    assert translate(fwd, -0x80000000, -0x7FFFFFFF, -77, -88, 0) == pkt


def test_translate_leaves_ack_and_sack_alone_without_ack_flag():
    pkt = seg("S", seq=1, ack=0xDEAD, options=[("SAck", (100, 200))])
    out = IP(translate(pkt, 0, 5, 0, 0, 3))
    assert out[TCP].ack == 0xDEAD and dict(out[TCP].options)["SAck"] == (100, 200)
    assert out[TCP].window == 1000     # no rescaling on SYNs


@pytest.mark.parametrize("win,shift,expect", [(1000, 2, 4000), (0xFFFF, 1, 0xFFFF),
                                              (1000, -2, 250), (3, -2, 0), (1000, 0, 1000),
                                              (0x4000, 2, 0xFFFF)])
def test_window_rescale(win, shift, expect):
    assert S.window_rescale(win, shift) == expect == N.window_rescale(win, shift)


def test_ack_storm_drops_a_long_run_of_identical_acks():
    st_ = (0, 0, 0)
    drops = []
    for seq, ack in [(1, 1)] + [(5, 9)] * 14 + [(5, 10)] + [(5, 10)] * 3:
        drop, *st_ = S.ack_storm(seq, ack, *st_, 10)
        drops.append(drop)
    assert drops == [False] * 11 + [True] * 4 + [False] * 4
    assert S.ack_storm(5, 9, 5, 9, 50, 0)[0] is False      # threshold 0: off


@given(st.integers(0, 7), st.integers(-1, 14), st.integers(0, 1), st.integers(0, 1),
       st.integers(0, 65535), st.integers(0, 7))
def test_handshake_state_packs_into_32_bits(idx, ws, sack, ts, win, retries):
    aux = S.hs_pack(idx, ws, sack, ts, win, retries)
    assert 0 <= aux <= M32
    assert S.hs_unpack(aux) == (idx, ws, sack, ts, win, retries)


# ================================================================================================
# A whole proxied handshake, in pure functions
# ================================================================================================

def nat_to(pkt_bytes, direction, vaddr, vport, daddr, dport):
    """Masquerade like the pipeline: in = destination to the RS, out = source to the VIP."""
    buf, n = to_buf(pkt_bytes)
    which = 1 if direction == C.DIR_IN else 0
    nat.set_addr(buf, 0, C.IPPROTO_TCP, 20, True, which, daddr if which else vaddr)
    nat.set_port(buf, C.IPPROTO_TCP, 20, True, which, dport if which else vport)
    return buf, n


@pytest.mark.parametrize("client_isn,rs_isn", [(0xFFFFFFF0, 0x00000100), (1000, 0xFFFFFFFE),
                                               (0x7FFFFFFF, 0x7FFFFFFF)])
@pytest.mark.parametrize("client_kind", ["linux", "windows_no_ts"])
def test_handshake_end_to_end(client_isn, rs_isn, client_kind):
    """client SYN -> cookie SYN-ACK -> client ACK checked -> SYN to the RS -> RS SYN-ACK ->
    ACK to the RS -> data both ways translated (NAT): each side sees a consistent TCP
    conversation, checked with scapy."""
    row = SynproxySettings(wscale=7).as_array()
    linux = client_kind == "linux"
    syn = make_syn(LINUX if linux else WINDOWS, seq=client_isn)
    caddr, vaddr, raddr = ip2i(CLIENT), ip2i(VIP), ip2i(RS)
    now = NOW

    # (1) SYN -> SYN-ACK in place; no state.
    buf, n = to_buf(syn)
    n = S.synproxy_syn(buf, 0, n, len(buf), SECRETS, row, now)
    synack = IP(bytes(buf[:n]))
    assert checksums_ok(bytes(synack))
    cookie = synack[TCP].seq
    sa_opts = dict(synack[TCP].options)
    tb = sa_opts["Timestamp"][0] if linux else -1

    # (2) the client's ACK, a little later (next minute even: the counter moves on).
    now += 61 * C.NS
    tc1 = 123460
    ack_opts = [("NOP", None), ("NOP", None), ("Timestamp", (tc1, tb))] if linux else []
    ack = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="A", seq=client_isn + 1,
                                        ack=(cookie + 1) & M32, window=502, options=ack_opts)
    abuf, _ = to_buf(ack)
    mss, ws, sack, tsval, tsecr = S.synproxy_ack(abuf, 0, SECRETS, row, now)
    assert mss == 1452
    if linux:
        assert (ws, sack, tsval, tsecr) == (7, 1, tc1, tb)
    else:   # no timestamps: window scale and SACK are lost, as with kernel syncookies
        assert (ws, sack, tsval, tsecr) == (-1, 0, -1, -1)
        assert set(sa_opts) == {"MSS"}
    # a forged ACK (wrong cookie) and one from another client port are refused
    bad = ack.copy()
    bad[TCP].ack = (cookie + 1) ^ 0x5A5A5A5A
    assert S.synproxy_ack(to_buf(bad)[0], 0, SECRETS, row, now)[0] == -1
    bad = ack.copy()
    bad[TCP].sport = 40001
    assert S.synproxy_ack(to_buf(bad)[0], 0, SECRETS, row, now)[0] == -1

    # SYN to the RS (NAT: source stays the client), from the Tx ring.
    tx = np.zeros(4 * T.TX_SLOT, np.uint8)
    n = S.syn_to_rs(tx, 0, caddr, raddr, 40000, 8080, client_isn, mss, ws, sack, tsval, 0)
    rs_syn = IP(bytes(tx[:n]))
    assert checksums_ok(bytes(rs_syn)) and rs_syn[TCP].flags == "S"
    assert rs_syn[TCP].seq == client_isn and (rs_syn.src, rs_syn.dst) == (CLIENT, RS)
    got = dict(rs_syn[TCP].options)
    assert got["MSS"] == 1452
    if linux:
        assert got["Timestamp"] == (tc1, 0) and got["WScale"] == 7 and "SAckOK" in got
    else:
        assert set(k for k, _ in rs_syn[TCP].options) == {"MSS"}

    # (3) The RS answers with its own ISN, TS clock (tr0) and window scale (9); lvs-dp builds
    # the ACK that completes the RS's handshake and learns the deltas.
    tr0 = 0xFFFFFF00
    rs_opts = [("MSS", 1460)]
    if linux:
        rs_opts += [("SAckOK", b""), ("Timestamp", (tr0, tc1)), ("NOP", None), ("WScale", 9)]
    rs_synack = IP(src=RS, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA", seq=rs_isn,
                                             ack=(client_isn + 1) & M32, window=65160,
                                             options=rs_opts)
    rbuf, _ = to_buf(rs_synack)
    ws_offered = 7 if linux else -1
    n, seq_delta, ts_delta, win_shift, shift_in = S.synproxy_rs_synack(
        rbuf, 0, tx, T.TX_SLOT, cookie, tb, ws_offered, ws, 502, 0, 0)
    assert seq_delta == (cookie - rs_isn) & M32
    assert ts_delta == ((tb - tr0) & M32 if linux else 0)
    assert win_shift == (2 if linux else 0) and shift_in == 0
    rs_ack = IP(bytes(tx[T.TX_SLOT:T.TX_SLOT + n]))
    assert checksums_ok(bytes(rs_ack)) and rs_ack[TCP].flags == "A"
    assert (rs_ack.src, rs_ack.dst) == (CLIENT, RS)
    assert (rs_ack[TCP].sport, rs_ack[TCP].dport) == (40000, 8080)
    assert (rs_ack[TCP].seq, rs_ack[TCP].ack) == ((client_isn + 1) & M32, (rs_isn + 1) & M32)
    assert rs_ack[TCP].window == 502
    if linux:
        assert dict(rs_ack[TCP].options)["Timestamp"] == (tc1, tr0)

    # (4) Data, RS -> client: after NAT and translation the client sees a continuation of the
    # SYN-ACK it got: seq = cookie + 1, TS values after tb, window in its scale.
    resp = b"HTTP/1.1 200 OK\r\n\r\n"
    req_len = 18
    ts_rs = [("NOP", None), ("NOP", None), ("Timestamp", ((tr0 + 5) & M32, tc1))] if linux else []
    data_out = IP(src=RS, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="PA",
                                            seq=(rs_isn + 1) & M32,
                                            ack=(client_isn + 1 + req_len) & M32, window=1000,
                                            options=ts_rs) / Raw(resp)
    obuf, on = nat_to(bytes(data_out), C.DIR_OUT, vaddr, 80, raddr, 8080)
    S.tcp_translate(obuf, 20, seq_delta, 0, ts_delta, 0, win_shift)
    seen = IP(bytes(obuf[:on]))
    assert checksums_ok(bytes(seen))
    assert (seen.src, seen[TCP].sport) == (VIP, 80)
    assert seen[TCP].seq == (cookie + 1) & M32
    assert seen[TCP].ack == (client_isn + 1 + req_len) & M32
    assert seen[TCP].window == (4000 if linux else 1000)
    if linux:
        assert dict(seen[TCP].options)["Timestamp"] == ((tb + 5) & M32, tc1)
    assert bytes(seen[TCP].payload) == resp

    # Client -> RS: a duplicate ACK with a SACK block in the client's (cookie) space; the RS
    # sees its own sequence space and its own TS clock echoed.
    sack_left = (cookie + 1 + 100) & M32
    c_opts = [("NOP", None), ("NOP", None), ("SAck", (sack_left, (sack_left + 50) & M32))]
    if linux:
        c_opts = [("NOP", None), ("NOP", None), ("Timestamp", (tc1 + 9, (tb + 5) & M32))] + c_opts
    data_in = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="A",
                                            seq=(client_isn + 1 + req_len) & M32,
                                            ack=(cookie + 1 + len(resp)) & M32, window=500,
                                            options=c_opts)
    ibuf, inn = nat_to(bytes(data_in), C.DIR_IN, vaddr, 80, raddr, 8080)
    S.tcp_translate(ibuf, 20, 0, seq_delta, 0, ts_delta, 0)
    rs_sees = IP(bytes(ibuf[:inn]))
    assert checksums_ok(bytes(rs_sees))
    assert (rs_sees.dst, rs_sees[TCP].dport) == (RS, 8080)
    assert rs_sees[TCP].seq == (client_isn + 1 + req_len) & M32
    assert rs_sees[TCP].ack == (rs_isn + 1 + len(resp)) & M32
    assert rs_sees[TCP].window == 500
    o = dict(rs_sees[TCP].options)
    assert o["SAck"] == ((rs_isn + 1 + 100) & M32, (rs_isn + 1 + 150) & M32)
    if linux:
        assert o["Timestamp"] == (tc1 + 9, (tr0 + 5) & M32)

    # The RS never answering instead: the RST to the client is one it accepts at once.
    n = S.rst_build(tx, 2 * T.TX_SLOT, vaddr, caddr, 80, 40000, (cookie + 1) & M32,
                    (client_isn + 1) & M32, 63)
    rst = IP(bytes(tx[2 * T.TX_SLOT:2 * T.TX_SLOT + n]))
    assert rst[TCP].flags == "RA" and rst[TCP].seq == (cookie + 1) & M32
    assert checksums_ok(bytes(rst))


def test_rs_declining_window_scaling_is_bridged():
    """We offered the client a shift of 7; the RS answers without a window-scale option (so it
    reads and writes unscaled windows): its windows are shifted down by 7 towards the client,
    the client's (shift 8) up by 8 towards the RS, saturating."""
    rs_synack = IP(src=RS, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA", seq=5, ack=11,
                                             options=[("MSS", 1460)])
    tx = np.zeros(T.TX_SLOT, np.uint8)
    n, seq_delta, ts_delta, out, inn = S.synproxy_rs_synack(
        to_buf(rs_synack)[0], 0, tx, 0, 1000, 77, 7, 8, 300, 0, 0)
    assert (seq_delta, ts_delta, out, inn) == (995, 0, -7, 8)
    assert IP(bytes(tx[:n]))[TCP].window == 0xFFFF      # 300 << 8, saturated
    assert IP(translate(seg("A", window=65535), 0, 0, 0, 0, out))[TCP].window == 511
    assert IP(translate(seg("A", window=100), 0, 0, 0, 0, inn))[TCP].window == 25600
    not_synack = rs_synack.copy()
    not_synack[TCP].flags = "RA"
    assert S.synproxy_rs_synack(to_buf(not_synack)[0], 0, tx, 0, 1, 1, 7, 8, 1, 0, 0)[0] == -1


@given(u32, u32, st.integers(0, 65535), u32, u32, u32, u32, st.integers(-3, 3),
       st.sampled_from(["A", "PA", "FA"]), st.binary(max_size=30))
@settings(max_examples=200)
def test_translate_fast_path_matches_twin(seq, ack, window, tsv, tse, d1, d2, shift, flags,
                                          payload):
    """The common segment (NOP NOP TS, nothing else) takes a shortcut; same result."""
    pkt = seg(flags, seq, ack, window, [("NOP", None), ("NOP", None), ("Timestamp", (tsv, tse))],
              payload)
    for args in [(d1, 0, d2, 0, shift), (0, d1, 0, d2, 0)]:
        out = translate(pkt, *args)
        assert out == N.tcp_translate(pkt, *args) and checksums_ok(out)


def test_ack_cannot_claim_options_the_settings_do_not_offer():
    """The TS echo's low bits are the client's word: with window scaling (or SACK) off in the
    settings they are ignored."""
    syn = make_syn(LINUX, seq=55)
    buf, n = to_buf(syn)
    n = S.synproxy_syn(buf, 0, n, len(buf), SECRETS, CFG, NOW)
    cookie = IP(bytes(buf[:n]))[TCP].seq
    forged_ecr = S.ts_encode(S.ts_now(NOW), 9, 1, 0)
    ack = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="A", seq=56,
                                        ack=(cookie + 1) & M32,
                                        options=[("NOP", None), ("NOP", None),
                                                 ("Timestamp", (60, forged_ecr))])
    abuf, _ = to_buf(ack)
    assert S.synproxy_ack(abuf, 0, SECRETS, CFG, NOW) == (1452, 9, 1, 60, forged_ecr)
    off = SynproxySettings(wscale=0, sack=False).as_array()
    assert S.synproxy_ack(abuf, 0, SECRETS, off, NOW) == (1452, -1, 0, 60, forged_ecr)


def test_previous_secret_generation_still_checks():
    """Rotation: cookies made before the control plane rotated the secret stay valid (tried
    second), cookies made with a secret that is neither current nor previous do not."""
    syn = make_syn(LINUX, seq=55)
    buf, n = to_buf(syn)
    old = np.stack([secret(9), SECRET])
    n = S.synproxy_syn(buf, 0, n, len(buf), old, CFG, NOW)
    cookie = IP(bytes(buf[:n]))[TCP].seq
    ack = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="A", seq=56,
                                        ack=(cookie + 1) & M32)
    abuf, _ = to_buf(ack)
    rotated = np.stack([secret(10), secret(9)])
    assert S.synproxy_ack(abuf, 0, rotated, CFG, NOW)[0] == 1452
    assert S.synproxy_ack(abuf, 0, np.stack([secret(10), secret(11)]), CFG, NOW)[0] == -1


# ================================================================================================
# Settings
# ================================================================================================

def test_settings_defaults_are_the_patchs():
    s = SynproxySettings()
    patch = {"init_mss": 1452, "sack": 1, "wscale": 0, "synack_ttl": 63, "defer": 0,
             "conn_reuse": 1, "conn_reuse_close": 1, "conn_reuse_time_wait": 1,
             "conn_reuse_fin_wait": 0, "conn_reuse_close_wait": 0, "conn_reuse_last_ack": 0,
             "ack_store_max": 3, "ack_storm_thresh": 10, "syn_retry": 3}
    assert {k: int(getattr(s, k)) for k in patch} == patch
    assert s.timestamp is True      # the one deliberate difference (module docstring)
    assert s.validate() == []


def test_settings_sysctl_names_round_trip():
    s = SynproxySettings(init_mss=1400, wscale=7, defer=True, syn_retry=5)
    sysctls = s.to_sysctls()
    assert all(k.startswith("net.ipv4.vs.synproxy_") for k in sysctls)
    assert sysctls["net.ipv4.vs.synproxy_ack_skb_store_thresh"] == 3
    assert SynproxySettings.from_sysctls(sysctls) == s
    assert SynproxySettings.from_sysctls({"net/ipv4/vs/synproxy_sack": "0"}).sack is False
    with pytest.raises(ValueError):
        SynproxySettings.from_sysctls({"synproxy_bogus": 1})
    assert set(SYSCTL_NAMES) <= {f for f in SynproxySettings.__dataclass_fields__}


def test_settings_array_and_reuse_mask():
    a = SynproxySettings().as_array()
    assert a.dtype == np.int64 and a.shape == (S.N_SPC,)
    assert a[S.SPC_REUSE_STATES] == (1 << C.IP_VS_TCP_S_CLOSE) | (1 << C.IP_VS_TCP_S_TIME_WAIT)
    assert (a[S.SPC_INIT_MSS], a[S.SPC_SYNACK_TTL], a[S.SPC_MAX_AGE]) == (1452, 63, 4)
    assert SynproxySettings(conn_reuse=False).as_array()[S.SPC_REUSE_STATES] == 0


@pytest.mark.parametrize("kw", [dict(wscale=15), dict(synack_ttl=0), dict(ack_store_max=6),
                                dict(syn_retry=7), dict(init_mss=70000), dict(cookie_max_age=0)])
def test_settings_validate_ranges(kw):
    assert len(SynproxySettings(**kw).validate()) == 1
