"""SYN-proxy building blocks: SYN cookies, the packets of a proxied handshake, and the sequence,
timestamp and window translation that lasts for the connection's life.

What SYN-proxy is for
---------------------
A SYN flood fills a server's half-open queue. With SYN-proxy (the Alibaba LVS patch,
``syn_proxy`` in keepalived, ``IP_VS_CONN_F_SYNPROXY``; DPVS has a port) the balancer answers the
client's handshake itself with a SYN cookie and keeps **nothing** for a SYN it answered. Only a
client that completes the handshake -- returns a valid cookie, which needs a real address --
gets a connection entry and a real server, to which the balancer then opens a second handshake
of its own. Spoofed SYNs cost one SYN-ACK each and no memory; a real server never sees them.

Theory of operation: which packet does what
-------------------------------------------
::

    client                      lvs-dp                                   real server (RS)
      SYN  isn=c, opts  --->  (1) answered IN PLACE: the queued SYN becomes the SYN-ACK
           <---  SYN-ACK seq=cookie ack=c+1 [MSS, SACK_PERM, TS(tb, ecr), WS]   (no state)
      ACK  seq=c+1 ack=cookie+1 [TS(tc, ecr=tb)]
                        --->  (2) cookie_check(ack-1, seq-1): the MSS index is in the cookie,
                                  wscale/SACK/ECN in tb's low 6 bits (echoed as ecr); schedule,
                                  create the connection in SYN_SENT; syn_to_rs() builds
                                  SYN seq=c [MSS, SACK_PERM, TS(tc, 0), WS(client's)]  --->  (Tx)
                                                      <---  SYN-ACK seq=r ack=c+1 [TS(tr, tc), WS]
                              (3) the RS's SYN-ACK is consumed (dropped): seq_delta = cookie - r,
                                  ts_delta = tb - tr, win_shift_out = ws_rs - ws_offered;
                                  ack_to_rs() builds ACK seq=c+1 ack=r+1 [TOA, TS(tc, tr)]  --->
                                  ESTABLISHED; client segments held meanwhile are translated
                                  and sent on via Tx (pipeline.py: _sp_hold / _sp_release)
      data <===========>      (4) every packet, both ways (tcp_translate):
                                  client -> RS: ack -= seq_delta, SACK edges -= seq_delta,
                                                TS ecr -= ts_delta
                                  RS -> client: seq += seq_delta, TS val += ts_delta,
                                                window rescaled by win_shift_out
      (RS never answers: after the SYN retries, rst_build() -> client, seq=cookie+1 ack=c+1)

`synproxy_syn`, `synproxy_ack` and `synproxy_rs_synack` do legs 1-3 in one call each; the
pieces they are made of (`cookie_make`, `cookie_check`, `ts_encode`, `ts_decode`,
`tcp_options`, `synack_from_syn`, `syn_to_rs`, `ack_to_rs`, `rst_build`) are public too.
Generated packets (SYN and ACK to the RS, RSTs) are written into a `tables.Tx` slot with the
addresses already as on the wire: the raw socket's packets do not pass through the pipeline.

``seq_delta`` is ``(cookie - rs_isn) mod 2**32``, the patched kernel's ``syn_proxy_seq.delta``:
it maps the RS's sequence space onto the one the client saw (the cookie's). In lvs-dp's table it
is ``Conn.seq_delta_out`` (added to seq going out, subtracted from ack coming in); FULLNAT's own
ISN shift of the client's space is ``Conn.seq_delta_in``, and `tcp_translate` takes both, so one
call serves NAT, FULLNAT, SYN-proxy and their combination.

Which state is kept where
-------------------------
* **Unanswered SYN: none.** The cookie (the SYN-ACK's seq) binds the 4-tuple, the client's ISN,
  a minute counter and the MSS-table index; the SYN-ACK's TS value carries the client's window
  scale, SACK-permitted and ECN bits. The client hands both back in its ACK (ack - 1 and the TS
  echo).
* **Secrets** (control plane, shared by all workers, read-only here): two generations of four
  uint64 (two SipHash-2-4 keys each), ``uint64[2, 4]``. `cookie_check` is called with the current
  one, then the previous one; the control plane rotates them no more often than the cookie
  lifetime (``max_age`` minutes), so the previous key covers every cookie still in flight.
* **SYN_SENT (after a valid ACK, until the RS answers)**: the cookie, the client's ISN, its TS
  value, our TS value (``tb``, the ACK's echo), its window, the decoded options and a SYN retry
  count. `hs_pack` / `hs_unpack` pack the small ones into one uint32. The client's ISN is
  what FULLNAT keeps in ``Conn.aux`` anyway, the cookie can wait in ``Conn.seq_delta_out``,
  and the rest can borrow fields that only mean something once ESTABLISHED (``ts_delta`` for
  tb, the ACK-storm pair for the client's TS value and the packed word).
* **ESTABLISHED**: ``seq_delta`` (``Conn.seq_delta_out``), ``ts_delta``, ``win_shift_out``
  (and ``win_shift_in``, non-zero only when the RS declined window scaling), and the ACK-storm
  detector's last (seq, ack) and repeat count (`ack_storm`).

API
---
::

    Cookies (inline)
    cookie_count(now_ns) -> count                      minutes, 32 bits
    cookie_make(secret, saddr, daddr, sport, dport, isn, count, mss_idx) -> cookie
    cookie_check(secret, saddr, daddr, sport, dport, cookie, client_isn, count_now, max_age)
        -> mss_idx | -1                                secret: uint64[4], one generation
    cookie_make_k / cookie_check_k (k0, k1, k2, k3, ...)   the same, key as four scalars
    mss_index(mss) -> idx;  MSSTAB[idx] -> mss
    ts_now(now_ns) -> ms clock;  ts_encode(clock, wscale, sack_ok, ecn_ok) -> tsval
    ts_decode(ts_ecr) -> (wscale | -1, sack_ok, ecn_ok)
    tcp_options(buf, l4) -> (mss, wscale, sack_ok, ts_val, ts_ecr)     -1 / 0: absent

    Packets (inline; -1 / omitted option conventions in each docstring)
    synack_from_syn(buf, o, length, cap, cookie, mss, wscale, sack_ok, ts_val, ts_ecr, ttl,
                    win) -> new_length | -1        in place
    syn_to_rs(tx_buf, at, saddr, daddr, sport, dport, isn, mss, wscale, sack_ok, ts_val,
              ts_ecr) -> length
    ack_to_rs(tx_buf, at, saddr, daddr, sport, dport, seq, ack, win, ts_val, ts_ecr,
              toa_addr, toa_port) -> length
    rst_build(tx_buf, at, saddr, daddr, sport, dport, seq, ack, ttl) -> 40

    Every packet of the connection (inline)
    tcp_translate(buf, l4, seq_add, ack_sub, tsval_add, tsecr_sub, win_shift)
    window_rescale(win, shift) -> win
    ack_storm(seq, ack, last_seq, last_ack, dup_count, thresh)
        -> (drop, last_seq, last_ack, dup_count)
    hs_pack(mss_idx, wscale, sack_ok, ts_ok, client_win, syn_retries) -> uint32;  hs_unpack

    One call per handshake leg (jitted; secrets uint64[2, 4], cfg int64[N_SPC])
    synproxy_syn(buf, o, length, cap, secrets, cfg, now_ns) -> new_length | -1
    synproxy_ack(buf, o, secrets, cfg, now_ns) -> (mss | -1, wscale, sack_ok, ts_val, ts_ecr)
    synproxy_rs_synack(buf, o, tx_buf, at, cookie, tb, ws_offered, ws_client, client_win,
                       toa_addr, toa_port)
        -> (ack_length | -1, seq_delta, ts_delta, win_shift_out, win_shift_in)

Settings: control/synproxy_settings.py (``SynproxySettings.as_array()`` fills the ``SPC_*``
row). Twin: tests/naive/synproxy.py; tests: tests/unit/test_synproxy.py.

Options, as the kernel's syncookies do them
-------------------------------------------
The cookie itself (``net/ipv4/syncookies.c``, ``secure_tcp_syn_cookie``)::

    cookie = H0(saddr, daddr, sport, dport)              + isn + (count << 24)
           + ((H1(saddr, daddr, sport, dport, count) + mss_idx) mod 2**24)

with H0, H1 two keyed hashes (SipHash-2-4 here, as the kernel's ``siphash_4u32``) and ``count``
a minute counter (`cookie_count`). Checking strips H0 + isn, reads the counter from the top 8
bits, refuses it when ``max_age`` or more minutes old (or from the future), and recovers
``mss_idx`` as the low 24 bits minus H1; anything not a table index is a forgery. A random ACK
passes with probability ``max_age * N_MSS / 2**32`` per secret generation tried (4 * 5 / 2**32,
about 4.7e-9; twice that with the previous secret). As in the kernel the ISN is added, not
hashed: an ACK whose seq (or ack) is off by k < N_MSS from the real one decodes as a
neighbouring MSS index; only someone who saw the SYN-ACK can do that, and they could as well
complete the handshake.

MSS table `MSSTAB` = (536, 1300, 1440, 1452, 1460): the kernel's msstab plus 1452, the patched
kernel's ``synproxy_init_mss`` (1460 minus the 8-byte TOA option FULLNAT inserts), so that the
default clamp survives the round trip exactly.

Window scale, SACK-permitted and ECN go into the low 6 bits of our SYN-ACK's TS value
(``cookie_init_timestamp``: ``| ECN | SACK | wscale(4) |``, wscale 0xF = none; the value is
rounded down so it never runs ahead of the clock), and come back in the ACK's TS echo
(`ts_decode`). **When the client sent no timestamp option (or timestamps are disabled) these
options are lost**, exactly as with the kernel's syncookies: the SYN-ACK then offers MSS only,
and neither side scales windows or uses SACK. (The patched kernel instead puts them in the
cookie's data bits, which multiplies the forgery rate above by the number of option
combinations, 2 * 16 = 32.) Hence ``synproxy_timestamp`` defaults to 1 in lvs-dp; and a FULLNAT
service that strips timestamps towards the RS should not offer them to clients either, at the
price of these options. ECN is not negotiated: the bit is encoded and decoded but always 0,
and the SYN-ACK's flags are exactly SYN|ACK, as in the patch.

Window scaling: the client believes the RS scales its windows by the shift *we* offered
(``synproxy_wscale``); the RS uses its own. `tcp_translate` rescales the RS's windows by
``win_shift_out = ws_rs - ws_offered`` (rounding down, saturating: never over-promises; the
patch does not, and over-promises when the RS's shift is smaller). The SYN to the RS carries
the client's own shift, so client windows need no translation -- unless the RS declines window
scaling, when they are shifted up by the client's shift (``win_shift_in``). With
``synproxy_wscale`` 0 (the patched kernel's default) no window-scale option is offered to either
side, and both shifts are 0.

Timestamps: the SYN to the RS carries the client's TS value (not ours, unlike the patch), so the
RS's PAWS state follows the client's clock; the RS's TS values are shifted by ``ts_delta = tb -
tr`` towards the client (which saw ``tb`` first), and the client's echoes shifted back.

Costs (reference machine, loaded; CPU time): SipHash-2-4 of 16 bytes about 17 ns, so a cookie
about 35 ns (two, dependent), a check as much per secret generation tried; `synproxy_syn`, SYN
in to SYN-ACK out with a Linux client's options, about 155 ns. `tcp_translate` on a segment
whose only option is NOP NOP TS (the common case, a shortcut) 12-23 ns, with a SACK block about
75 ns (option walks), without options 5-17 ns. Everything but the three ``synproxy_*`` handlers is
``csum.INLINE`` (inlined into the caller at numba IR level: no call, no array reference
counting); the handlers are ordinary jitted functions, called once per handshake leg.

All functions take and return plain ints (addresses, ports and sequence numbers in host order),
write in place into uint8 buffers, never raise, and report a problem as a negative return.
"""

import numpy as np
from numba import njit

from dataplane import consts as C
from dataplane import fullnat as FN
from dataplane import parse as P
from dataplane.csum import INLINE, JIT, csum_replace2, fold, rd16, rd32, wr16, wr32
# TCP options: fullnat.py owns their names (include/net/tcp.h) and the option walk.
from dataplane.fullnat import (TCP_MAX_WSCALE, TCPOLEN_MSS, TCPOLEN_SACK_PERM, TCPOLEN_TIMESTAMP,
                               TCPOLEN_TOA, TCPOLEN_WINDOW, TCPOPT_MSS, TCPOPT_NOP,
                               TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP, TCPOPT_TOA, TCPOPT_WINDOW,
                               tcp_option_size)

# --- cookies --------------------------------------------------------------------------------------
COOKIEBITS = 24             # the counter lives in the top 8 bits
COOKIEMASK = (1 << COOKIEBITS) - 1
COUNTER_TRIES = 4           # cookie lifetime in counter ticks (the patched kernel's value)
COOKIE_PERIOD_NS = 60 * C.NS    # one counter tick: a minute, as tcp_cookie_time()
MSSTAB = np.array([536, 1300, 1440, 1452, 1460], dtype=np.int64)
N_MSS = 5
SECRET_WORDS = 4            # one generation: SipHash keys (k0, k1) of H0, then (k2, k3) of H1

# --- options in the TS value (cookie_init_timestamp) ----------------------------------------------
TSBITS = 6
TSMASK = (1 << TSBITS) - 1
TS_OPT_WSCALE_MASK = 0xF    # 0xF: the SYN had no window-scale option
TS_OPT_SACK = 1 << 4
TS_OPT_ECN = 1 << 5

# --- generated packets ---------------------------------------------------------------------------
IPDEFTTL = 64               # TTL of packets the balancer sends to real servers
RS_SYN_WINDOW = 65535       # window of our SYN to the RS (the patch: 5000, "FIX_ME"); our ACK
#                             then carries the client's real window
SYNACK_MIN_CAP = 60         # IPv4 20 + TCP 20 + options 20: room `synack_from_syn` needs

# --- settings array (Config row written by control/synproxy_settings.py) ----------------------
SPC_INIT_MSS = 0            # MSS upper bound offered to clients (synproxy_init_mss)
SPC_SACK = 1                # 0/1 (synproxy_sack)
SPC_WSCALE = 2              # shift offered to clients, 0 = no window scaling (synproxy_wscale)
SPC_TIMESTAMP = 3           # 0/1 (synproxy_timestamp)
SPC_SYNACK_TTL = 4          # (synproxy_synack_ttl)
SPC_DEFER = 5               # 0/1: wait for an ACK with data (synproxy_defer)
SPC_REUSE_STATES = 6        # bit (1 << IP_VS_TCP_S_*) set: a cookie-valid ACK reuses the entry
SPC_ACK_STORE_MAX = 7       # ACKs held in SYN_SENT (synproxy_ack_skb_store_thresh)
SPC_ACK_STORM_THRESH = 8    # identical RS ACKs before dropping, 0 = off (..._ack_storm_thresh)
SPC_SYN_RETRY = 9           # SYN retransmissions to the RS (synproxy_syn_retry)
SPC_MAX_AGE = 10            # cookie lifetime in minutes (COUNTER_TRIES)
SPC_SYNACK_WIN = 11         # window of the SYN-ACK, -1 = the client's own (as the patch)
N_SPC = 16

M32 = 0xFFFFFFFF
_U = np.uint64
_C0 = _U(0x736F6D6570736575)
_C1 = _U(0x646F72616E646F6D)
_C2 = _U(0x6C7967656E657261)
_C3 = _U(0x7465646279746573)
_LEN16 = _U(16) << _U(56)       # SipHash final block of a 16-byte message
_FF = _U(0xFF)
_M32U = _U(0xFFFFFFFF)
_NOP_NOP_TS = (TCPOPT_NOP << 24) | (TCPOPT_NOP << 16) | (TCPOPT_TIMESTAMP << 8) | TCPOLEN_TIMESTAMP


# ================================================================================================
# SipHash-2-4 of one 16-byte message (two little-endian 64-bit words)
# ================================================================================================

@njit(**INLINE)
def _rotl(x, b):
    return (x << _U(b)) | (x >> _U(64 - b))


@njit(**INLINE)
def _sipround(v0, v1, v2, v3):
    v0 += v1
    v1 = _rotl(v1, 13)
    v1 ^= v0
    v0 = _rotl(v0, 32)
    v2 += v3
    v3 = _rotl(v3, 16)
    v3 ^= v2
    v0 += v3
    v3 = _rotl(v3, 21)
    v3 ^= v0
    v2 += v1
    v1 = _rotl(v1, 17)
    v1 ^= v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


@njit(**INLINE)
def siphash24_16(k0, k1, m0, m1):
    """SipHash-2-4 (Aumasson & Bernstein) with key (k0, k1) of the 16 bytes m0 | m1, each word
    little-endian; returns the uint64 hash. Reference vector: key 00..0f, message 00..0f ->
    0x3f2acc7f57c29bdb."""
    k0 = _U(k0)
    k1 = _U(k1)
    m0 = _U(m0)
    m1 = _U(m1)
    v0 = k0 ^ _C0
    v1 = k1 ^ _C1
    v2 = k0 ^ _C2
    v3 = k1 ^ _C3
    v3 ^= m0
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= m0
    v3 ^= m1
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= m1
    v3 ^= _LEN16
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= _LEN16
    v2 ^= _FF
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


# ================================================================================================
# Cookies
# ================================================================================================

@njit(**INLINE)
def cookie_hash(k0, k1, saddr, daddr, sport, dport, count):
    """32-bit keyed hash of the 4-tuple and counter (the kernel's cookie_hash): message word 0 is
    saddr << 32 | daddr, word 1 is sport << 48 | dport << 32 | count (low 32 bits)."""
    m0 = (_U(saddr & M32) << _U(32)) | _U(daddr & M32)
    m1 = (_U(sport & 0xFFFF) << _U(48)) | (_U(dport & 0xFFFF) << _U(32)) | _U(count & M32)
    return np.int64(siphash24_16(k0, k1, m0, m1) & _M32U)


@njit(**INLINE)
def cookie_count(now_ns):
    """The cookie clock: minutes of the caller's clock (tcp_cookie_time). Every worker must use
    the same clock (now_ns from one CLOCK_MONOTONIC) so that any of them can check a cookie."""
    return np.int64(now_ns // COOKIE_PERIOD_NS) & M32


@njit(**INLINE)
def cookie_make_k(k0, k1, k2, k3, saddr, daddr, sport, dport, isn, count, mss_idx):
    """`cookie_make` with the secret generation as four scalars (no array on the call)."""
    h0 = cookie_hash(k0, k1, saddr, daddr, sport, dport, 0)
    h1 = cookie_hash(k2, k3, saddr, daddr, sport, dport, count)
    return (h0 + isn + ((count & 0xFF) << COOKIEBITS) + ((h1 + mss_idx) & COOKIEMASK)) & M32


@njit(**INLINE)
def cookie_check_k(k0, k1, k2, k3, saddr, daddr, sport, dport, cookie, client_isn, count_now,
                   max_age):
    """`cookie_check` with the secret generation as four scalars (no array on the call)."""
    h0 = cookie_hash(k0, k1, saddr, daddr, sport, dport, 0)
    c = (cookie - h0 - client_isn) & M32
    diff = (count_now - (c >> COOKIEBITS)) & 0xFF
    if diff >= max_age:
        return np.int64(-1)
    h1 = cookie_hash(k2, k3, saddr, daddr, sport, dport, (count_now - diff) & M32)
    data = (c - h1) & COOKIEMASK
    if data >= N_MSS:
        return np.int64(-1)
    return np.int64(data)


@njit(**INLINE)
def cookie_make(secret, saddr, daddr, sport, dport, isn, count, mss_idx):
    """The SYN-ACK's sequence number for a SYN (saddr:sport -> daddr:dport, seq isn) at cookie
    time `count`, carrying `mss_idx` (< N_MSS). `secret` is one generation, uint64[4]."""
    return cookie_make_k(secret[0], secret[1], secret[2], secret[3], saddr, daddr, sport, dport,
                         isn, count, mss_idx)


@njit(**INLINE)
def cookie_check(secret, saddr, daddr, sport, dport, cookie, client_isn, count_now, max_age):
    """The MSS index a cookie carries, or -1 when it is not one of ours: wrong tuple, ISN or
    secret, made `max_age` or more ticks ago, or from the future. `cookie` is the ACK's ack - 1,
    `client_isn` its seq - 1 (both mod 2**32). Call it with the current secret generation, then
    (on -1) with the previous one."""
    return cookie_check_k(secret[0], secret[1], secret[2], secret[3], saddr, daddr, sport, dport,
                          cookie, client_isn, count_now, max_age)


@njit(**INLINE)
def mss_index(mss):
    """Index of the largest MSSTAB entry <= mss (0 when mss is below them all, as the kernel)."""
    i = N_MSS - 1
    while i > 0 and mss < MSSTAB[i]:
        i -= 1
    return np.int64(i)


# ================================================================================================
# Options in the timestamp
# ================================================================================================

@njit(**INLINE)
def ts_now(now_ns):
    """Our TCP timestamp clock: milliseconds, 32 bits (Linux's since 4.13)."""
    return np.int64(now_ns // 1_000_000) & M32


@njit(**INLINE)
def ts_encode(ts_clock, wscale, sack_ok, ecn_ok):
    """cookie_init_timestamp: the SYN-ACK's TS value with the client's window scale (-1 = none),
    SACK-permitted and ECN in its low 6 bits, never ahead of `ts_clock`."""
    opts = np.int64(TS_OPT_WSCALE_MASK)
    if wscale >= 0:
        opts = min(wscale, TCP_MAX_WSCALE)
    if sack_ok:
        opts |= TS_OPT_SACK
    if ecn_ok:
        opts |= TS_OPT_ECN
    ts_clock &= M32
    ts = (ts_clock & ~np.int64(TSMASK)) | opts
    if ts > ts_clock:
        ts -= 1 << TSBITS
    return ts & M32


@njit(**INLINE)
def ts_decode(ts_ecr):
    """cookie_timestamp_decode: (wscale or -1, sack_ok, ecn_ok) from the ACK's TS echo."""
    w = ts_ecr & TS_OPT_WSCALE_MASK
    wscale = np.int64(-1) if w == TS_OPT_WSCALE_MASK else np.int64(min(w, TCP_MAX_WSCALE))
    return wscale, np.int64((ts_ecr & TS_OPT_SACK) != 0), np.int64((ts_ecr & TS_OPT_ECN) != 0)


@njit(**INLINE)
def tcp_options(buf, l4):
    """Parse the TCP options of the header at l4: (mss, wscale, sack_ok, ts_val, ts_ecr), -1 for
    an absent option (sack_ok 0). Stops at EOL or at the first malformed option, like
    tcp_parse_options; the caller has validated doff."""
    doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
    mss = np.int64(-1)
    wscale = np.int64(-1)
    sack = np.int64(0)
    tsval = np.int64(-1)
    tsecr = np.int64(-1)
    i = l4 + 20
    end = l4 + doff
    while i < end:
        size = tcp_option_size(buf, i, end)
        if size < 0:
            break
        kind = np.int64(buf[i])
        if kind == TCPOPT_MSS and size == TCPOLEN_MSS:
            mss = rd16(buf, i + 2)
        elif kind == TCPOPT_WINDOW and size == TCPOLEN_WINDOW:
            wscale = min(np.int64(buf[i + 2]), TCP_MAX_WSCALE)
        elif kind == TCPOPT_SACK_PERM and size == TCPOLEN_SACK_PERM:
            sack = 1
        elif kind == TCPOPT_TIMESTAMP and size == TCPOLEN_TIMESTAMP:
            tsval = rd32(buf, i + 2)
            tsecr = rd32(buf, i + 6)
        i += size
    return mss, wscale, sack, tsval, tsecr


# ================================================================================================
# Packet builders
# ================================================================================================

@njit(**INLINE)
def _put_handshake_opts(buf, i, mss, wscale, sack_ok, ts_val, ts_ecr):
    """Linux's tcp_options_write order: MSS; SACK_PERM+TS or NOP NOP TS; NOP NOP SACK_PERM when
    there is no TS; NOP WSCALE. mss < 0, wscale < 0, ts_val < 0 omit the option. Returns the end."""
    if mss >= 0:
        buf[i] = TCPOPT_MSS
        buf[i + 1] = TCPOLEN_MSS
        wr16(buf, i + 2, mss)
        i += 4
    if ts_val >= 0:
        if sack_ok:
            buf[i] = TCPOPT_SACK_PERM
            buf[i + 1] = TCPOLEN_SACK_PERM
        else:
            buf[i] = TCPOPT_NOP
            buf[i + 1] = TCPOPT_NOP
        buf[i + 2] = TCPOPT_TIMESTAMP
        buf[i + 3] = TCPOLEN_TIMESTAMP
        wr32(buf, i + 4, ts_val)
        wr32(buf, i + 8, max(ts_ecr, 0))
        i += 12
    elif sack_ok:
        buf[i] = TCPOPT_NOP
        buf[i + 1] = TCPOPT_NOP
        buf[i + 2] = TCPOPT_SACK_PERM
        buf[i + 3] = TCPOLEN_SACK_PERM
        i += 4
    if wscale >= 0:
        buf[i] = TCPOPT_NOP
        buf[i + 1] = TCPOPT_WINDOW
        buf[i + 2] = TCPOLEN_WINDOW
        buf[i + 3] = min(wscale, TCP_MAX_WSCALE)
        i += 4
    return i


@njit(**INLINE)
def _put_ip(buf, at, tot_len, ttl, saddr, daddr):
    """A 20-byte IPv4 header: no TOS, IP id 0, DF (as Linux for handshake packets), TCP."""
    buf[at] = 0x45
    buf[at + P.IP_TOS] = 0
    wr16(buf, at + P.IP_TOT_LEN, tot_len)
    wr16(buf, at + P.IP_ID, 0)
    wr16(buf, at + P.IP_FRAG_OFF, P.IP_DF)
    buf[at + P.IP_TTL] = ttl & 0xFF
    buf[at + P.IP_PROTOCOL] = C.IPPROTO_TCP
    wr16(buf, at + P.IP_CHECK, 0)
    wr32(buf, at + P.IP_SADDR, saddr)
    wr32(buf, at + P.IP_DADDR, daddr)


@njit(**INLINE)
def _put_tcp(buf, l4, sport, dport, seq, ack, doff, flags, win):
    wr16(buf, l4 + P.TCP_SPORT, sport)
    wr16(buf, l4 + P.TCP_DPORT, dport)
    wr32(buf, l4 + P.TCP_SEQ, seq & M32)
    wr32(buf, l4 + P.TCP_ACK, ack & M32)
    buf[l4 + P.TCP_DOFF] = (doff // 4) << 4
    buf[l4 + P.TCP_FLAGS] = flags
    wr16(buf, l4 + P.TCP_WINDOW, win & 0xFFFF)
    wr16(buf, l4 + P.TCP_CHECK, 0)
    wr16(buf, l4 + 18, 0)       # urgent pointer


@njit(**INLINE)
def _sum_words(buf, a, n):
    """One's-complement sum (unfolded) of n bytes from a, n even."""
    s = np.int64(0)
    for k in range(0, n, 2):
        s += (np.int64(buf[a + k]) << 8) | np.int64(buf[a + k + 1])
    return s


@njit(**INLINE)
def _finish(buf, at, tot_len):
    """Both checksums of a fresh TCP packet at `at` (20-byte IP header, checksum fields zero,
    tot_len even: headers only); returns tot_len. Inline sums: no call on the SYN path."""
    wr16(buf, at + P.IP_CHECK, ~fold(_sum_words(buf, at, 20)) & 0xFFFF)
    s = _sum_words(buf, at + P.IP_SADDR, 8) + C.IPPROTO_TCP + (tot_len - 20)
    wr16(buf, at + 20 + P.TCP_CHECK, ~fold(s + _sum_words(buf, at + 20, tot_len - 20)) & 0xFFFF)
    return tot_len


@njit(**INLINE)
def synack_from_syn(buf, o, length, cap, cookie, mss, wscale, sack_ok, ts_val, ts_ecr, ttl, win):
    """Turn the SYN at buf[o:o+length] into our SYN-ACK, in place; return its length, or -1 when
    the SYN is malformed or `cap` (< SYNACK_MIN_CAP bytes) leaves no room.

    Addresses and ports swapped, seq = cookie, ack = the SYN's seq + 1, flags SYN|ACK (no ECN),
    IP options and any SYN payload dropped, TOS 0, id 0, DF, TTL `ttl`; options MSS `mss`,
    SACK_PERM if `sack_ok`, TS (`ts_val`, `ts_ecr`) unless ts_val < 0, WSCALE `wscale` unless
    < 0 (Linux's order and padding); window `win`, or the SYN's own when win < 0 (the patch).
    The lead accepts the result from raw PREROUTING (accept_local=1, kernel-notes)."""
    if length < 40 or cap < SYNACK_MIN_CAP:
        return np.int64(-1)
    ihl = (np.int64(buf[o]) & 0xF) * 4
    if ihl < 20 or length < ihl + 20:
        return np.int64(-1)
    l4 = o + ihl
    saddr = rd32(buf, o + P.IP_SADDR)
    daddr = rd32(buf, o + P.IP_DADDR)
    sport = rd16(buf, l4 + P.TCP_SPORT)
    dport = rd16(buf, l4 + P.TCP_DPORT)
    isn = rd32(buf, l4 + P.TCP_SEQ)
    if win < 0:
        win = rd16(buf, l4 + P.TCP_WINDOW)
    optend = _put_handshake_opts(buf, o + 40, mss, wscale, sack_ok, ts_val, ts_ecr)
    doff = optend - (o + 20)
    _put_ip(buf, o, optend - o, ttl, daddr, saddr)
    _put_tcp(buf, o + 20, dport, sport, cookie, isn + 1, doff, C.TH_SYN | C.TH_ACK, win)
    return _finish(buf, o, optend - o)


@njit(**INLINE)
def syn_to_rs(tx_buf, at, saddr, daddr, sport, dport, isn, mss, wscale, sack_ok, ts_val, ts_ecr):
    """Build at tx_buf[at:] the SYN the balancer sends to the real server; return its length.

    Addresses and ports are those on the wire to the RS (the caller has applied NAT/FULLNAT:
    saddr = client or laddr, daddr = RS), `isn` the client's ISN (plus FULLNAT's seq_delta_in).
    Options as decoded from the cookie: MSS `mss`, SACK_PERM, TS (`ts_val` = the client's TS
    value, `ts_ecr` normally 0; omitted when ts_val < 0), WSCALE = the client's shift (omitted
    when < 0). TTL 64, DF, window RS_SYN_WINDOW."""
    end = _put_handshake_opts(tx_buf, at + 40, mss, wscale, sack_ok, ts_val, ts_ecr)
    _put_ip(tx_buf, at, end - at, IPDEFTTL, saddr, daddr)
    _put_tcp(tx_buf, at + 20, sport, dport, isn, 0, end - at - 20, C.TH_SYN, RS_SYN_WINDOW)
    return _finish(tx_buf, at, end - at)


@njit(**INLINE)
def ack_to_rs(tx_buf, at, saddr, daddr, sport, dport, seq, ack, win, ts_val, ts_ecr, toa_addr,
              toa_port):
    """Build at tx_buf[at:] the ACK completing the real server's handshake; return its length.

    From the RS's SYN-ACK: seq = its ack, ack = its seq + 1, ts_val = its TS echo (the client's
    value), ts_ecr = its TS value (ts_val < 0: no TS option, when the RS declined timestamps).
    `win` is the client's raw window (the RS knows the client's shift from our SYN). With
    toa_addr != 0 the TOA option (kind 254: port, address) goes first: the RS's toa module
    reads it from this ACK (FULLNAT). TTL 64, DF."""
    i = at + 40
    if toa_addr != 0:
        tx_buf[i] = TCPOPT_TOA
        tx_buf[i + 1] = TCPOLEN_TOA
        wr16(tx_buf, i + 2, toa_port)
        wr32(tx_buf, i + 4, toa_addr)
        i += 8
    if ts_val >= 0:
        tx_buf[i] = TCPOPT_NOP
        tx_buf[i + 1] = TCPOPT_NOP
        tx_buf[i + 2] = TCPOPT_TIMESTAMP
        tx_buf[i + 3] = TCPOLEN_TIMESTAMP
        wr32(tx_buf, i + 4, ts_val)
        wr32(tx_buf, i + 8, max(ts_ecr, 0))
        i += 12
    _put_ip(tx_buf, at, i - at, IPDEFTTL, saddr, daddr)
    _put_tcp(tx_buf, at + 20, sport, dport, seq, ack, i - at - 20, C.TH_ACK, win)
    return _finish(tx_buf, at, i - at)


@njit(**INLINE)
def rst_build(tx_buf, at, saddr, daddr, sport, dport, seq, ack, ttl):
    """Build at tx_buf[at:] a RST (RST|ACK when ack >= 0); return its length (40).

    To the client when the real server never answers or refuses: saddr:sport = VIP:vport,
    daddr:dport = client, seq = cookie + 1 (what the client expects next, so RFC 5961 accepts
    it at once), ack = client ISN + 1 (+ bytes held). Also usable towards a real server."""
    flags = C.TH_RST
    if ack >= 0:
        flags |= C.TH_ACK
    else:
        ack = 0
    _put_ip(tx_buf, at, 40, ttl, saddr, daddr)
    _put_tcp(tx_buf, at + 20, sport, dport, seq, ack, 20, flags, 0)
    return _finish(tx_buf, at, 40)


# ================================================================================================
# Translation for the connection's life
# ================================================================================================

@njit(**INLINE)
def _patch32(buf, l4, at, new, ck):
    """Write the 32-bit value `new` at `at` (any alignment inside the TCP header at l4) and
    return the incrementally updated checksum `ck` (RFC 1624 over the covering 16-bit words)."""
    a = l4 + ((at - l4) & ~np.int64(1))
    n = ((at - l4 + 5) & ~np.int64(1)) - ((at - l4) & ~np.int64(1))
    old = fold(_sum_words(buf, a, n))
    wr32(buf, at, new & M32)
    return csum_replace2(ck, old, fold(_sum_words(buf, a, n)))


@njit(**INLINE)
def window_rescale(win, shift):
    """A window scaled by 2**a re-expressed for a reader scaling by 2**(a - shift): rounds down
    and saturates, so it never promises more than the sender offered."""
    if shift > 0:
        return min(win << shift, 0xFFFF)
    if shift < 0:
        return win >> -shift
    return win


@njit(**INLINE)
def tcp_translate(buf, l4, seq_add, ack_sub, tsval_add, tsecr_sub, win_shift):
    """Shift one TCP segment between sequence spaces, in place, checksum updated incrementally
    (the pseudo-header is not touched: do addresses/ports with nat.py or fullnat.py before or
    after):

      seq += seq_add; if ACK: ack -= ack_sub and every SACK block edge -= ack_sub;
      TS value += tsval_add; TS echo -= tsecr_sub; window rescaled by win_shift (not on SYNs).

    All mod 2**32. A SYN-proxy connection, client -> RS: (seq_delta_in, seq_delta_out, 0,
    ts_delta, win_shift_in); RS -> client: (seq_delta_out, seq_delta_in, ts_delta, 0,
    win_shift_out). A FULLNAT-only connection passes zeros for the SYN-proxy terms, and
    all-zero arguments leave the segment as it was. seq/ack and SACK are FULLNAT's own helpers
    (fullnat.tcp_adjust_seq, fullnat.sack_adjust); this adds timestamps and windows, and a
    shortcut for the usual options block, NOP NOP TS alone, which needs no option walk. Only
    the first TS option is translated (a segment with two is malformed); malformed options end
    the walk (the segment is still forwarded, as IPVS does)."""
    FN.tcp_adjust_seq(buf, l4, seq_add, ack_sub)
    flags = np.int64(buf[l4 + P.TCP_FLAGS])
    if win_shift != 0 and (flags & C.TH_SYN) == 0:
        old = rd16(buf, l4 + P.TCP_WINDOW)
        new = window_rescale(old, win_shift)
        wr16(buf, l4 + P.TCP_WINDOW, new)
        wr16(buf, l4 + P.TCP_CHECK, csum_replace2(rd16(buf, l4 + P.TCP_CHECK), old, new))
    doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
    if doff <= 20:
        return
    ts_at = np.int64(-1)
    if doff == 32 and rd32(buf, l4 + 20) == _NOP_NOP_TS:
        ts_at = l4 + 22     # aligned, and no room left for a SACK option
    else:
        if (flags & C.TH_ACK) != 0:
            FN.sack_adjust(buf, l4, doff, ack_sub)
        if (tsval_add & M32) != 0 or (tsecr_sub & M32) != 0:
            ts_at = FN.tcp_find_option(buf, l4, doff, TCPOPT_TIMESTAMP, TCPOLEN_TIMESTAMP)
    if ts_at >= 0 and ((tsval_add & M32) != 0 or (tsecr_sub & M32) != 0):
        ck = rd16(buf, l4 + P.TCP_CHECK)
        if tsval_add & M32:
            ck = _patch32(buf, l4, ts_at + 2, rd32(buf, ts_at + 2) + tsval_add, ck)
        if tsecr_sub & M32:
            ck = _patch32(buf, l4, ts_at + 6, rd32(buf, ts_at + 6) - tsecr_sub, ck)
        wr16(buf, l4 + P.TCP_CHECK, ck)


@njit(**INLINE)
def ack_storm(seq, ack, last_seq, last_ack, dup_count, thresh):
    """syn_proxy_is_ack_storm for one RS -> client segment with ACK set (raw seq/ack, before
    translation): returns (drop, last_seq, last_ack, dup_count) to store back. A run of
    `thresh` or more segments repeating the same (seq, ack) is dropped (counted
    DROP_SYNPROXY_ACK_STORM); thresh 0 disables. The pipeline passes 0 for segments carrying
    SACK blocks (the duplicate ACKs of loss recovery, one per segment received after a hole);
    as in the patch, recovery's duplicate ACKs without SACK are counted: keep it well above 3."""
    if thresh <= 0:
        return False, last_seq, last_ack, dup_count
    if seq == last_seq and ack == last_ack:
        dup_count += 1
        if dup_count >= thresh:
            return True, last_seq, last_ack, np.int64(thresh)
        return False, last_seq, last_ack, dup_count
    return False, seq, ack, np.int64(0)


# ================================================================================================
# SYN_SENT state packed in one uint32
# ================================================================================================
# bits 0-15 client window (raw) | 16-18 MSS index | 19-22 client wscale (0xF none) |
# 23 SACK-permitted | 24 timestamps | 25-27 SYN retransmissions sent

@njit(**INLINE)
def hs_pack(mss_idx, wscale, sack_ok, ts_ok, client_win, syn_retries):
    w = TS_OPT_WSCALE_MASK if wscale < 0 else min(wscale, TCP_MAX_WSCALE)
    return ((client_win & 0xFFFF) | ((mss_idx & 7) << 16) | (w << 19) | ((sack_ok & 1) << 23)
            | ((ts_ok & 1) << 24) | ((syn_retries & 7) << 25))


@njit(**INLINE)
def hs_unpack(word):
    """(mss_idx, wscale or -1, sack_ok, ts_ok, client_win, syn_retries)."""
    w = (word >> 19) & 0xF
    return ((word >> 16) & 7, np.int64(-1) if w == TS_OPT_WSCALE_MASK else np.int64(w),
            (word >> 23) & 1, (word >> 24) & 1, word & 0xFFFF, (word >> 25) & 7)


# ================================================================================================
# One call per handshake leg (what the pipeline calls)
# ================================================================================================

@njit(**JIT)
def synproxy_syn(buf, o, length, cap, secrets, cfg, now_ns):
    """Leg 1: answer the client's SYN at buf[o:o+length] in place with the cookie SYN-ACK;
    return its length, or -1 (malformed SYN / no room: the caller drops it).

    MSS offered = min(client's MSS (536 if none), SPC_INIT_MSS) -- the patch's choice -- and
    the cookie carries it rounded down to MSSTAB. Timestamps are answered when SPC_TIMESTAMP is
    set and the client sent them; only then are SACK (SPC_SACK) and window scaling
    (SPC_WSCALE > 0) offered, their client-side values riding in our TS value.
    `secrets` is uint64[2, 4] (current generation first), `cfg` the int64[N_SPC] settings row.
    The caller has checked that this is a SYN (no ACK/RST/FIN) to a SVC_F_SYNPROXY service and
    accepts the result as VERDICT_REWRITE (counting STAT_SYNPROXY_COOKIE_SENT)."""
    ihl = (np.int64(buf[o]) & 0xF) * 4
    l4 = o + ihl
    if length < ihl + 20:
        return np.int64(-1)
    doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
    if doff < 20 or length < ihl + doff:
        return np.int64(-1)
    mss_c, ws_c, sack_c, tsval_c, _ = tcp_options(buf, l4)
    if mss_c <= 0:
        mss_c = 536
    mss = min(mss_c, cfg[SPC_INIT_MSS])
    ts_ok = cfg[SPC_TIMESTAMP] != 0 and tsval_c >= 0
    ws_ok = ts_ok and cfg[SPC_WSCALE] > 0 and ws_c >= 0
    sack = np.int64(1) if ts_ok and cfg[SPC_SACK] != 0 and sack_c != 0 else np.int64(0)
    ts_val = np.int64(-1)
    if ts_ok:
        ts_val = ts_encode(ts_now(now_ns), ws_c if ws_ok else np.int64(-1), sack, 0)
    cookie = cookie_make_k(secrets[0, 0], secrets[0, 1], secrets[0, 2], secrets[0, 3],
                           rd32(buf, o + P.IP_SADDR), rd32(buf, o + P.IP_DADDR), rd16(buf, l4),
                           rd16(buf, l4 + 2), rd32(buf, l4 + P.TCP_SEQ), cookie_count(now_ns),
                           mss_index(mss))
    return synack_from_syn(buf, o, length, cap, cookie, mss,
                           cfg[SPC_WSCALE] if ws_ok else np.int64(-1), sack, ts_val, tsval_c,
                           cfg[SPC_SYNACK_TTL], cfg[SPC_SYNACK_WIN])


@njit(**JIT)
def synproxy_ack(buf, o, secrets, cfg, now_ns):
    """Leg 2: check the client's handshake ACK at buf[o:]; returns
    (mss, wscale, sack_ok, ts_val, ts_ecr): mss -1 when the cookie is bad (DROP_SYNPROXY_BAD_ACK),
    else the MSS for the RS SYN, the client's window shift (-1 none), SACK-permitted, the
    client's TS value and its echo of ours (tb) (both -1 without timestamps). Tries the current
    then the previous secret generation. The caller has checked flags (ACK only), headers and
    SPC_DEFER (an ACK without data is dropped then).

    The shift our SYN-ACK offered (leg 3's `ws_offered`) is cfg[SPC_WSCALE] when wscale >= 0:
    it is not in the cookie, so changing synproxy_wscale affects handshakes in flight (for at
    most the cookie lifetime; the rescaling then under-promises or over-promises by that
    difference)."""
    ihl = (np.int64(buf[o]) & 0xF) * 4
    l4 = o + ihl
    saddr = rd32(buf, o + P.IP_SADDR)
    daddr = rd32(buf, o + P.IP_DADDR)
    sport = rd16(buf, l4)
    dport = rd16(buf, l4 + 2)
    cookie = (rd32(buf, l4 + P.TCP_ACK) - 1) & M32
    isn = (rd32(buf, l4 + P.TCP_SEQ) - 1) & M32
    count = cookie_count(now_ns)
    age = cfg[SPC_MAX_AGE]
    idx = np.int64(-1)
    for g in range(secrets.shape[0]):
        idx = cookie_check_k(secrets[g, 0], secrets[g, 1], secrets[g, 2], secrets[g, 3], saddr,
                             daddr, sport, dport, cookie, isn, count, age)
        if idx >= 0:
            break
    if idx < 0:
        return np.int64(-1), np.int64(-1), np.int64(0), np.int64(-1), np.int64(-1)
    _, _, _, tsval, tsecr = tcp_options(buf, l4)
    wscale = np.int64(-1)
    sack = np.int64(0)
    if tsval >= 0:
        wscale, sack, _ = ts_decode(tsecr)
        if cfg[SPC_WSCALE] <= 0:    # not offered (now): the TS bits cannot turn it on
            wscale = -1
        if cfg[SPC_SACK] == 0:
            sack = 0
    return MSSTAB[idx], wscale, sack, tsval, tsecr


@njit(**JIT)
def synproxy_rs_synack(buf, o, tx_buf, at, cookie, tb, ws_offered, ws_client, client_win,
                       toa_addr, toa_port):
    """Leg 3: the RS's SYN-ACK at buf[o:] (as it arrived: RS -> client or laddr). Builds the
    ACK that completes the RS's handshake at tx_buf[at:] and returns
    (ack_length, seq_delta, ts_delta, win_shift_out, win_shift_in) for the connection:

    * seq_delta = cookie - RS ISN (Conn.seq_delta_out);
    * ts_delta = `tb` (our SYN-ACK's TS value, echoed in the client's ACK) - RS TS value, 0
      when the RS declined timestamps;
    * win_shift_out, for RS -> client windows: RS shift - `ws_offered` (the shift our SYN-ACK
      offered the client; <= 0 when window scaling is off with the client: then 0);
    * win_shift_in, for client -> RS windows: the client's shift `ws_client` when we offered
      scaling but the RS declined it (RFC 7323: then it reads the client's windows unscaled),
      else 0. The ACK built here already carries `client_win` rescaled so.

    The caller drops the SYN-ACK, and may first check that its ack is the SYN's seq + 1.
    ack_length -1: not a SYN-ACK (flags other than SYN|ACK)."""
    ihl = (np.int64(buf[o]) & 0xF) * 4
    l4 = o + ihl
    if (np.int64(buf[l4 + P.TCP_FLAGS]) & (C.TH_SYN | C.TH_ACK | C.TH_RST)) != C.TH_SYN | C.TH_ACK:
        return np.int64(-1), np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    rs_isn = rd32(buf, l4 + P.TCP_SEQ)
    _, ws_rs, _, tsval, tsecr = tcp_options(buf, l4)
    ts_delta = np.int64(0)
    if tsval >= 0:
        ts_delta = (tb - tsval) & M32
    shift_out = np.int64(0)
    shift_in = np.int64(0)
    if ws_offered > 0:
        shift_out = max(ws_rs, 0) - ws_offered
        if ws_rs < 0:
            shift_in = max(ws_client, 0)
    n = ack_to_rs(tx_buf, at, rd32(buf, o + P.IP_DADDR), rd32(buf, o + P.IP_SADDR),
                  rd16(buf, l4 + 2), rd16(buf, l4), rd32(buf, l4 + P.TCP_ACK), rs_isn + 1,
                  window_rescale(client_win, shift_in), tsecr if tsval >= 0 else np.int64(-1),
                  tsval, toa_addr, toa_port)
    return n, (cookie - rs_isn) & M32, ts_delta, shift_out, shift_in
