"""FULLNAT building blocks: local ports, TCP option surgery (MSS, timestamps, TOA), sequence
translation (seq/ack/SACK) and PROXY protocol headers.

FULLNAT rewrites both ends of a connection: client ``caddr:cport -> vaddr:vport`` leaves as
``laddr:lport -> daddr:dport`` and the real server's reply ``daddr:dport -> laddr:lport`` leaves
as ``vaddr:vport -> caddr:cport`` (kernel-notes/fullnat-synproxy.md §1). This module holds the
pieces; dataplane/pipeline.py composes them. Every function is ``@njit``, takes arrays and plain
ints (addresses, ports, sequence numbers in host order), writes in place, never raises, and
reports a problem as a negative return. Twins: tests/naive/fullnat.py; tests:
tests/unit/test_fullnat.py (the last test there, ``test_worked_example_*``, is the composition
below run end to end with scapy).

Hot or not. Functions marked *inline* (``csum.INLINE``) run on every packet of an established
FULLNAT connection and are inlined at numba IR level into their caller, so they cost no call and
no array refcounting there (see process_batch's docstring). The others are ordinary jitted
functions for handshake packets and new connections only.

API
===

Local addresses and ports (new connections only)::

    steer_index(key, count) -> int                     inline; == control.rules.steer_index
    lport_capacity(port_lo, port_hi, worker, n_workers) -> int     ports this worker owns
    lport_init(fifo, head, count, laddr_id, port_lo, port_hi, worker, n_workers) -> n ports
    lport_alloc(fifo, head, count, laddr_id) -> port | -1          oldest free port first
    lport_free(fifo, head, count, laddr_id, port) -> 0 | -1        appended last (-1: row full)
    laddr_pick(svc_laddrs, svc_id, n_laddrs, lport_count, rr) -> laddr_id | -1
    laddr_bind(svc_laddrs, svc_id, n_laddrs, fifo, head, count, rr) -> (laddr_id, lport) | (-1, -1)

TCP options (handshake packets)::

    tcp_find_option(buf, l4, doff, kind, length) -> offset of the kind byte | -1   inline
    tcp_get_mss(buf, l4, doff) -> mss | -1                                   inline
    tcp_set_mss(buf, o, l4, doff, new_mss) -> mss now in the packet | -1 (no MSS option)
    ts_strip(buf, o, l4, doff) -> 1 stripped | 0 no timestamp option
    ts_value(buf, l4, doff) -> TS value | -1                                 inline
    ts_clock(laddr, now_ns) -> the local address's TS clock (ms), mod 2**32  inline
    ts_adjust(buf, l4, doff, val_add, ecr_sub) -> 1 | 0 (no option)          inline, every packet
    toa_insert(buf, o, l4, length, cap, client_addr, client_port)
        -> new length | TOA_NO_ROOM (-1: no 8 bytes left of the 40 of options)
                      | TOA_NO_CAP (-2: buffer capacity or 64 KiB)          packet untouched

Sequence numbers (every packet; all inline)::

    seq_add(seq, delta) -> (seq + delta) mod 2**32
    seq_diff(a, b) -> a - b as a signed 32-bit int (> 0: a is after b)
    tcp_adjust_seq(buf, l4, delta_seq, delta_ack)      seq += delta_seq; if ACK: ack -= delta_ack
    sack_adjust(buf, l4, doff, delta) -> n edges       every SACK block edge -= delta
    tcp_set_tuple(buf, o, l4, saddr, daddr, sport, dport)   all four, incremental checksums

PROXY protocol (handshake packets)::

    proxy_v1_header(out, client_addr, client_port, vip, vport) -> length | -1 (out too small)
    proxy_v2_header(out, client_addr, client_port, vip, vport) -> 28 | -1
    payload_insert(buf, o, l4, length, cap, data, n) -> new length | -1 (untouched)

Policy helpers (the decisions below as scalar functions; all inline)::

    toa_wanted(tflags, seq, client_isn) -> bool
    pp_in_plan(tflags, seq, client_isn, seq_delta_in, pp_len, pp_acked) -> (insert, delta_seq)
    pp_out_ack(ack, client_isn, seq_delta_in) -> (delta_ack, header_acked)

Checksums: option edits (MSS, timestamps, SACK) and seq/ack/tuple rewrites update the TCP checksum
incrementally (RFC 1624), at any byte alignment; inserts (TOA, PROXY) recompute it over the
segment (handshake packets only) and update the IP checksum for the new total length. Each
function leaves both checksums valid, so they compose in any order.

Tables (Worker, dataplane/tables.py; the tests here build them with plain numpy)
=================================================================================
::

    lport_fifo   uint16[MAX_LADDR, lport_capacity(lo, hi, worker, n_workers)]
                 free local ports per laddr id, a ring: oldest free at lport_head
    lport_head   int32[MAX_LADDR]     ring index of the oldest free port
    lport_count  int32[MAX_LADDR]     free ports (0 = exhausted; 0 for ids with no pool)
    laddr_rr     int32[MAX_SVC]       per-service round-robin cursor into Config.svc_laddrs
                                      (any 1-D int array works, a Worker.sched column too)

A laddr id is a row of Config.laddr (1..255, 0 unused), as in Config.svc_laddrs; row 0 of the
port arrays is never used. Per connection: Conn.laddr_id (to give the port back), Conn.pp_len,
Conn.aux = the client's ISN, and the flag CONN_F_PP_ACKED ("the RS acknowledged the header").
With one worker and ports 5000-65535 the ring is 60536 ports: 256 ids x 118 KiB = 30 MiB per
worker, shrinking with the number of workers (each owns its share of the ports).

Local ports
===========
A port belongs to the worker that receives the real server's replies to it. control/rules.py
steers FULLNAT replies by destination port with ``steer_index(lport, n) = (lport & mask) % n``
(mask = 2**ceil(log2 n) - 1) and client packets by client address, so a worker owns exactly the
ports with ``steer_index(port, n_workers) == worker``; `lport_init` fills a laddr's ring with
those, ascending (DPVS's sa_pool idea: per-lcore port sets, so the reply lands on the core that
holds the connection). With n not a power of two the split is uneven, as the rules are.

`lport_alloc` takes the oldest free port, `lport_free` appends at the tail: a port whose
connection just closed -- perhaps still in TIME_WAIT on the real server -- is reused last, after
every other free port. Both are O(1). Unlike the Alibaba patch (a port is unique per laddr *and*
RS:port, found by probing the connection table up to ``fullnat_lport_tries`` times) a port here is
unique per laddr, so a laddr carries at most ~64K connections over all workers; no probing, no
conflict. The lead frees the port when the connection row is freed (conn_free / sweep), not on
FIN: the row outlives the RS's TIME_WAIT only if the TIME_WAIT timeout does, so keep the
balancer's TIME_WAIT timeout >= the RS's 60 s (IPVS default 120 s) — the FIFO is the second line.

`laddr_pick` is round robin over the service's pool (Config.svc_laddrs[svc, :n_laddrs]),
skipping ids whose ring is empty; -1 when all are: the caller drops and counts
DROP_LADDR_EXHAUSTED. `laddr_bind` is pick + alloc. Choose the range away from the balancer's own
ephemeral ports (net.ipv4.ip_local_port_range, 32768-60999 by default) if its own sockets
(health checks) ever use a laddr as source; the patch uses 5000-65535, DPVS 1025-65535.

Composition (what the lead writes in pipeline.py)
=================================================
Client -> RS (conn direction in), in this order::

    SYN (no ACK):   ts_strip                                   (fullnat_timestamp_remove_entry)
                    or, translating (SVC_F_FNAT_TS_XLATE, first SYN): Conn.ts_off =
                    ts_clock(laddr, now) - TS value, CONN_F_TS_XLATE
    translating:    ts_adjust(buf, l4, doff, ts_off, ts_delta)  (ts_delta: SYN-proxy, else 0)
                    new ISN for the laddr:lport->RS tuple; seq_delta_in = new_isn - client_isn
                    Conn.aux = client_isn;  with PROXY: seq_delta_in += pp_len (see below)
    TOA service:    if toa_wanted(...): toa_insert  (< 0: count STAT_TOA_NO_ROOM, forward as is)
    PROXY service:  insert, dseq = pp_in_plan(...); if insert: payload_insert(header)
                    else dseq = seq_delta_in (no PROXY: always)
    all:            tcp_adjust_seq(buf, l4, dseq, seq_delta_out)   (seq_delta_out: SYN-proxy)
                    if ACK and doff > 20 and seq_delta_out:
                        sack_adjust(buf, l4, doff, seq_delta_out)
                    tcp_set_tuple(buf, o, l4, laddr, daddr, lport, dport)

RS -> client (direction out)::

    translating:    ts_adjust(buf, l4, doff, ts_delta, ts_off)   the client gets its own echoes
    SYN-ACK:        tcp_set_mss(mss - 8) with TOA   (fullnat_mss_adjust_entry: room for TOA)
    all:            dack, acked = pp_out_ack(ack, Conn.aux, seq_delta_in)   (if ACK set;
                    without PROXY pp_out_ack just returns seq_delta_in once past the SYN-ACK)
                    if acked and PROXY: set the connection's "header acknowledged" flag
                    tcp_adjust_seq(buf, l4, seq_delta_out, dack)
                    if ACK and doff > 20: sack_adjust(buf, l4, doff, seq_delta_in)
                    tcp_set_tuple(buf, o, l4, vaddr, caddr, vport, cport)

Timestamps are stripped from the SYN because many clients share one laddr:lport space toward a
RS, each with its own clock: without timestamps the RS's PAWS and per-peer timestamp state never
compare two clients' clocks (Alibaba's tcp_opt_remove_timestamp; DPVS tcp_in_remove_ts). A SYN
without the option disables timestamps for the whole connection (RFC 7323), so later segments
need no stripping. The new ISN (tcp_in_init_seq in both) keeps a reused laddr:lport->RS tuple's
sequence numbers moving forward, so an RS still in TIME_WAIT for it accepts the new SYN.

Or timestamps are translated (``lvs-dp run --fnat-timestamp translate``): every local address
has one clock, `ts_clock` (ms of the engine's monotonic now_ns plus a base fixed by the address),
and each connection's client values are shifted onto it at its first SYN (Conn.ts_off), echoes
shifted back. Values from one laddr then never go back, across clients, workers and ports, which
is what the RS's PAWS checks compare; the RS keeps timestamps (RTT, PAWS, SACK/wscale in its
syncookies). kernel-notes/fullnat-synproxy.md ("strip or translate") has the reasoning.

TOA
---
Kind 254 (TCPOPT_TOA), length 8, client port (big-endian), client IPv4 address, inserted right
after the fixed TCP header. The RS's toa module copies it from the segment that *completes the
handshake* (tcp_v4_syn_recv_sock), so that segment must carry it. The Alibaba patch inserts it in
the SYN and in every client segment whose ack equals the RS's ISN + 1 (fdata_seq: the handshake
ACK and data sent before the server's first byte), never with SYN/RST/FIN; DPVS does the latter
only (FIN allowed), pruning NOPs when the header is full. lvs-dp has no column for the RS's ISN,
so `toa_wanted` keys on the client's stream start instead: the SYN, and every non-RST client
segment with ``seq == client_isn + 1`` (the handshake ACK, the first data segment and their
retransmissions; a server-speaks-first client's pure ACKs too, harmlessly). This misses one case
the patch covers: handshake ACK *and* first data segment both lost, and a later data segment
completing the handshake. The SYN-ACK's MSS is lowered by 8 so a full-size first data segment
still fits the path MTU with TOA in it.

PROXY protocol (v1 text / v2 binary, haproxy's proxy-protocol.txt)
------------------------------------------------------------------
The header is prepended to the client's byte stream, so the RS sees ``header + client data``
and the client must never see it: every later client -> RS segment gets ``seq += pp_len`` and
every RS -> client segment ``ack -= pp_len``, SACK edges likewise. lvs-dp keeps one delta:
``seq_delta_in = (new_isn - client_isn) + pp_len`` from the SYN on; "base" below is
``seq_delta_in - pp_len``. Stream start S (RS space) = client_isn + 1 + base.

1. The header rides in the client's **handshake ACK** (seq == client_isn + 1, no data): that ACK
   becomes a pure-header segment ``[S, S + pp_len)``, translated with the base delta. This way a
   full-size first data segment is never grown past the MTU, and server-speaks-first protocols
   (SMTP, MySQL, FTP: the client sends nothing until the server greets, and a PROXY-enabled
   server greets only after the header) work.
2. The RS acknowledges the header like any data. On RS -> client segments `pp_out_ack` maps an
   ack at or past ``S + pp_len`` with the full delta and reports ``acked``; an ack below it (the
   SYN-ACK's ``S``, a dup ACK while the header is missing) is mapped to the client's stream
   start ``client_isn + 1``, i.e. nothing of the client's data acknowledged. SACK blocks always
   use the full delta (they lie beyond rcv_nxt).
3. Until the header is acknowledged, **every** client segment starting at ``client_isn + 1``
   (not SYN/RST) gets the header inserted again and is translated with the base delta: if the
   handshake ACK was lost after the balancer, the client's first data segment (or a later pure
   ACK) carries ``header + data`` from S, and the RS takes it as a retransmission with new data
   (the header bytes are identical each time). Once acknowledged, stream-start segments (a
   server-first client's pure ACKs) use the full delta, like everything else. `pp_in_plan`
   encodes this; its inputs are the stored client ISN (Conn.aux) and one "header acknowledged"
   flag bit (CONN_F_PP_ACKED in Conn.flags).
4. Re-insertion into a full-size first data segment can exceed the path MTU (DF set) or the
   buffer (`payload_insert` returns -1). Either lower the SYN-ACK's MSS by pp_len as for TOA
   (simplest, always fits; costs ~2-4 % of segment payload), or, when it does not fit, emit the
   header as a standalone ``ACK seq=S`` segment through the Tx ring and forward the client's
   segment with the full delta (DPVS's proxy_proto_send_standalone).

DPVS itself (4582d20d, ip_vs_proto_tcp.c tcp_fnat_in_handler / ip_vs_proxy_proto.c) inserts the
header in the client's *first data segment* (ack == fdata_seq and seq == isn + 1), and since
61866427 (2023) explicitly never in a pure ACK, falling back to a standalone segment when the grown
packet exceeds the MTU; with a server-speaks-first protocol it therefore never sends the header.
The scheme above is the brief's, not DPVS's; the building blocks serve both.

v1 header length depends on the digits (at most 56 bytes for TCP4); v2 for TCP over IPv4 is
always 28. Store pp_len per connection (or recompute the header: it is deterministic).
"""

import numpy as np
from numba import njit

from dataplane import consts as C
from dataplane import parse as P
from dataplane.csum import INLINE, JIT, csum_replace2, csum_replace4, fold, l4_checksum, rd16, \
    rd32, wr16, wr32

# --- TCP options (include/net/tcp.h names; toa.h for TOA) -----------------------------------------
TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_SACK = 5
TCPOPT_TIMESTAMP = 8
TCPOPT_TOA = 254            # Alibaba TOA (ip_vs.h TCPOPT_ADDR, toa.h TCPOPT_TOA), IPv4
TCPOLEN_MSS = 4
TCPOLEN_WINDOW = 3
TCPOLEN_SACK_PERM = 2
TCPOLEN_TIMESTAMP = 10
TCPOLEN_SACK_BASE = 2
TCPOLEN_SACK_PERBLOCK = 8
TCPOLEN_TOA = 8
TCP_MAX_HDR = 60            # doff is 4 bits of 32-bit words: 40 bytes of options at most
TCP_MAX_WSCALE = 14         # RFC 7323; larger values are clamped (the patch does the same)

TOA_NO_ROOM = -1            # no 8 bytes left in the TCP header (count STAT_TOA_NO_ROOM)
TOA_NO_CAP = -2             # the buffer (cap) or the 64 KiB IP length cannot take 8 more bytes

# --- PROXY protocol (haproxy proxy-protocol.txt) --------------------------------------------------
PP_V2_SIG = np.array([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A],
                     dtype=np.uint8)          # "\r\n\r\n\0\r\nQUIT\n"
PP_V2_VER_CMD_PROXY = 0x21  # version 2, command PROXY
PP_V2_FAM_TCP4 = 0x11       # AF_INET, SOCK_STREAM
PP_V2_LEN_TCP4 = 28         # 16-byte fixed part + 12 bytes of addresses and ports
PP_V1_MAX_LEN_TCP4 = 56     # "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"

# --- local ports ----------------------------------------------------------------------------------
LPORT_MIN = 5000            # the patch's fullnat_lport_min / _max defaults
LPORT_MAX = 65535

M32 = 0xFFFFFFFF

# --- timestamp translation ------------------------------------------------------------------------
TS_TICK_NS = 1_000_000      # a local address's TS clock ticks once a millisecond (RFC 7323 §5.4:
                            # 1 ms..1 s per tick; no client clock runs faster)
_TS_BASE_M = np.uint64(0x9E3779B97F4A7C15)
_NOP_NOP_TS = (TCPOPT_NOP << 24) | (TCPOPT_NOP << 16) | (TCPOPT_TIMESTAMP << 8) | TCPOLEN_TIMESTAMP


# ================================================================================================
# Local addresses and ports
# ================================================================================================

@njit(**INLINE)
def steer_index(key, count):
    """Queue index of a steering key: control.rules.steer_index, bit for bit."""
    if count <= 1:
        return np.int64(0)
    bits = 0
    v = count - 1
    while v > 0:
        bits += 1
        v >>= 1
    return (np.int64(key) & ((np.int64(1) << bits) - 1)) % count


@njit(**JIT)
def lport_capacity(port_lo, port_hi, worker, n_workers):
    """Number of ports in [port_lo, port_hi] that `worker` of `n_workers` owns: the column
    count its lport_fifo needs."""
    n = 0
    for port in range(max(port_lo, 0), min(port_hi, 65535) + 1):
        if steer_index(port, n_workers) == worker:
            n += 1
    return n


@njit(**JIT)
def lport_init(fifo, head, count, laddr_id, port_lo, port_hi, worker, n_workers):
    """Fill laddr `laddr_id`'s ring with the ports of [port_lo, port_hi] this worker owns
    (``steer_index(port, n_workers) == worker``), ascending; returns how many (at most the
    ring's width: the rest are left out). Replaces whatever the row held."""
    cap = fifo.shape[1]
    n = 0
    for port in range(max(port_lo, 0), min(port_hi, 65535) + 1):
        if n >= cap:
            break
        if steer_index(port, n_workers) == worker:
            fifo[laddr_id, n] = port
            n += 1
    head[laddr_id] = 0
    count[laddr_id] = n
    return n


@njit(**JIT)
def lport_alloc(fifo, head, count, laddr_id):
    """Take the oldest free port of a laddr; -1 when none is left."""
    n = np.int64(count[laddr_id])
    if n <= 0:
        return np.int64(-1)
    h = np.int64(head[laddr_id])
    port = np.int64(fifo[laddr_id, h])
    h += 1
    if h >= fifo.shape[1]:
        h = 0
    head[laddr_id] = h
    count[laddr_id] = n - 1
    return port


@njit(**JIT)
def lport_free(fifo, head, count, laddr_id, port):
    """Give a port back at the tail (reused after every other free port). Returns 0, or -1 when
    the ring is already full (a double free: nothing is written)."""
    cap = fifo.shape[1]
    n = np.int64(count[laddr_id])
    if n >= cap:
        return np.int64(-1)
    t = np.int64(head[laddr_id]) + n
    if t >= cap:
        t -= cap
    fifo[laddr_id, t] = port
    count[laddr_id] = n + 1
    return np.int64(0)


@njit(**JIT)
def laddr_pick(svc_laddrs, svc_id, n_laddrs, lport_count, rr):
    """Next laddr id of the service's pool (svc_laddrs[svc_id, :n_laddrs]) in round-robin
    order that still has a free port, advancing rr[svc_id] past it; -1 when every one is
    exhausted (or the pool is empty): drop and count DROP_LADDR_EXHAUSTED."""
    if n_laddrs <= 0:
        return np.int64(-1)
    start = np.int64(rr[svc_id]) % n_laddrs
    if start < 0:
        start += n_laddrs
    for k in range(n_laddrs):
        i = start + k
        if i >= n_laddrs:
            i -= n_laddrs
        lid = np.int64(svc_laddrs[svc_id, i])
        if lid != 0 and lport_count[lid] > 0:
            nxt = i + 1
            rr[svc_id] = nxt if nxt < n_laddrs else 0
            return lid
    return np.int64(-1)


@njit(**JIT)
def laddr_bind(svc_laddrs, svc_id, n_laddrs, fifo, head, count, rr):
    """laddr_pick then lport_alloc: (laddr_id, lport), or (-1, -1) when the pool is exhausted."""
    lid = laddr_pick(svc_laddrs, svc_id, n_laddrs, count, rr)
    if lid < 0:
        return np.int64(-1), np.int64(-1)
    return lid, lport_alloc(fifo, head, count, lid)


# ================================================================================================
# Checksum helpers for edits at any alignment inside the TCP segment
# ================================================================================================

@njit(**INLINE)
def _seg_sum(buf, l4, a, n):
    """Folded one's-complement contribution of bytes [a, a+n) to the checksum of the segment at
    l4: a byte at an even distance from l4 is a high byte, at an odd one a low byte."""
    s = np.int64(0)
    for i in range(a, a + n):
        if ((i - l4) & 1) == 0:
            s += np.int64(buf[i]) << 8
        else:
            s += np.int64(buf[i])
    return fold(s)


@njit(**INLINE)
def _ip_set_tot_len(buf, o, new_tot):
    old = rd16(buf, o + P.IP_TOT_LEN)
    wr16(buf, o + P.IP_TOT_LEN, new_tot)
    wr16(buf, o + P.IP_CHECK, csum_replace2(rd16(buf, o + P.IP_CHECK), old, new_tot))


@njit(**JIT)
def _tcp_full_checksum(buf, o, l4):
    tot = rd16(buf, o + P.IP_TOT_LEN)
    seg = tot - (l4 - o)
    wr16(buf, l4 + P.TCP_CHECK, l4_checksum(buf, o, l4, seg, C.IPPROTO_TCP, l4 + P.TCP_CHECK))


@njit(**JIT)
def _open_gap(buf, at, end, n):
    """Move bytes [at, end) to [at+n, end+n) (overlapping, so from the back)."""
    i = end - 1
    while i >= at:
        buf[i + n] = buf[i]
        i -= 1


# ================================================================================================
# TCP options
# ================================================================================================

@njit(**INLINE)
def tcp_option_size(buf, i, end):
    """Bytes the TCP option at i takes (1 for NOP), or -1 where a walk over the options ending
    at `end` stops: EOL, or a malformed option (length < 2 or past the header), as the kernel's
    tcp_parse_options does. Every option walk here steps with it."""
    k = np.int64(buf[i])
    if k == TCPOPT_EOL:
        return np.int64(-1)
    if k == TCPOPT_NOP:
        return np.int64(1)
    if i + 1 >= end:
        return np.int64(-1)
    size = np.int64(buf[i + 1])
    if size < 2 or i + size > end:
        return np.int64(-1)
    return size


@njit(**INLINE)
def tcp_find_option(buf, l4, doff, kind, length):
    """Absolute offset of the first option `kind` in the TCP header at l4 (doff bytes long),
    or -1 (also when the walk stops first, see tcp_option_size). With `length` > 0, a first
    `kind` of another length counts as none (an MSS or timestamp option of the wrong size is
    not read); 0 takes any length."""
    i = l4 + 20
    end = l4 + doff
    while i < end:
        size = tcp_option_size(buf, i, end)
        if size < 0:
            return np.int64(-1)
        if size > 1 and np.int64(buf[i]) == kind:
            return i if length == 0 or size == length else np.int64(-1)
        i += size
    return np.int64(-1)


@njit(**INLINE)
def tcp_get_mss(buf, l4, doff):
    """The MSS option's value, or -1 when there is none (or it is not 4 bytes long)."""
    at = tcp_find_option(buf, l4, doff, TCPOPT_MSS, TCPOLEN_MSS)
    if at < 0:
        return np.int64(-1)
    return rd16(buf, at + 2)


@njit(**JIT)
def tcp_set_mss(buf, o, l4, doff, new_mss):
    """Lower the MSS option to new_mss (never raises it); returns the MSS now in the packet,
    -1 when it has no MSS option. The IP header (o) is not touched."""
    at = tcp_find_option(buf, l4, doff, TCPOPT_MSS, TCPOLEN_MSS)
    if at < 0:
        return np.int64(-1)
    old = rd16(buf, at + 2)
    if new_mss < 0 or new_mss >= old:
        return old
    ck = rd16(buf, l4 + P.TCP_CHECK)
    before = _seg_sum(buf, l4, at + 2, 2)
    wr16(buf, at + 2, new_mss)
    wr16(buf, l4 + P.TCP_CHECK, csum_replace2(ck, before, _seg_sum(buf, l4, at + 2, 2)))
    return np.int64(new_mss)


@njit(**JIT)
def ts_strip(buf, o, l4, doff):
    """Overwrite the timestamp option (kind 8, length 10) with ten NOPs, the patched kernel's
    tcp_opt_remove_timestamp; returns 1, or 0 when there is none. Checksum updated."""
    at = tcp_find_option(buf, l4, doff, TCPOPT_TIMESTAMP, TCPOLEN_TIMESTAMP)
    if at < 0:
        return np.int64(0)
    ck = rd16(buf, l4 + P.TCP_CHECK)
    before = _seg_sum(buf, l4, at, TCPOLEN_TIMESTAMP)
    for i in range(TCPOLEN_TIMESTAMP):
        buf[at + i] = TCPOPT_NOP
    wr16(buf, l4 + P.TCP_CHECK, csum_replace2(ck, before, _seg_sum(buf, l4, at, TCPOLEN_TIMESTAMP)))
    return np.int64(1)


@njit(**INLINE)
def ts_clock(laddr, now_ns):
    """The TCP timestamp clock of local address `laddr` at now_ns: milliseconds of now_ns plus a
    base fixed by the address (a multiplicative hash), mod 2**32. Every worker computes the same
    value, and it survives a restart of lvs-dp (now_ns is CLOCK_MONOTONIC), so the SYNs one
    local address sends carry non-decreasing TS values whichever worker or port sends them."""
    base = (np.uint64(laddr) * _TS_BASE_M) >> np.uint64(32)
    return (np.int64(now_ns) // TS_TICK_NS + np.int64(base)) & M32


@njit(**INLINE)
def ts_value(buf, l4, doff):
    """The TS value of the segment's timestamp option (kind 8, length 10), or -1."""
    at = tcp_find_option(buf, l4, doff, TCPOPT_TIMESTAMP, TCPOLEN_TIMESTAMP)
    if at < 0:
        return np.int64(-1)
    return rd32(buf, at + 2)


@njit(**INLINE)
def ts_adjust(buf, l4, doff, val_add, ecr_sub):
    """TS value += val_add and TS echo -= ecr_sub (mod 2**32) in the segment's timestamp option,
    at any alignment, checksum updated; returns 1, or 0 when there is no such option. NOP NOP TS
    alone (the usual data-segment layout) is found without an option walk. The FULLNAT
    translation: client -> RS (ts_off, ts_delta), RS -> client (ts_delta, ts_off)."""
    if doff <= 20:
        return np.int64(0)
    if doff == 32 and rd32(buf, l4 + 20) == _NOP_NOP_TS:
        at = l4 + 22
    else:
        at = tcp_find_option(buf, l4, doff, TCPOPT_TIMESTAMP, TCPOLEN_TIMESTAMP)
        if at < 0:
            return np.int64(0)
    if ((np.int64(val_add) | np.int64(ecr_sub)) & M32) == 0:
        return np.int64(1)
    ck = rd16(buf, l4 + P.TCP_CHECK)
    before = _seg_sum(buf, l4, at + 2, 8)
    wr32(buf, at + 2, (rd32(buf, at + 2) + np.int64(val_add)) & M32)
    wr32(buf, at + 6, (rd32(buf, at + 6) - np.int64(ecr_sub)) & M32)
    wr16(buf, l4 + P.TCP_CHECK, csum_replace2(ck, before, _seg_sum(buf, l4, at + 2, 8)))
    return np.int64(1)


@njit(**JIT)
def toa_insert(buf, o, l4, length, cap, client_addr, client_port):
    """Insert the TOA option (254, 8, port, IPv4 address) right after the fixed TCP header,
    moving the other options and the payload down 8 bytes; doff += 2 words, IP total length
    += 8, IP checksum updated, TCP checksum recomputed. Returns the new packet length, or
    TOA_NO_ROOM / TOA_NO_CAP with the packet untouched."""
    doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
    if doff + TCPOLEN_TOA > TCP_MAX_HDR:
        return np.int64(TOA_NO_ROOM)
    tot = rd16(buf, o + P.IP_TOT_LEN)
    if length + TCPOLEN_TOA > cap or tot + TCPOLEN_TOA > 0xFFFF:
        return np.int64(TOA_NO_CAP)
    at = l4 + 20
    _open_gap(buf, at, o + length, TCPOLEN_TOA)
    buf[at] = TCPOPT_TOA
    buf[at + 1] = TCPOLEN_TOA
    wr16(buf, at + 2, client_port)
    wr32(buf, at + 4, client_addr)
    buf[l4 + P.TCP_DOFF] = (((doff + TCPOLEN_TOA) >> 2) << 4) | (buf[l4 + P.TCP_DOFF] & 0x0F)
    _ip_set_tot_len(buf, o, tot + TCPOLEN_TOA)
    _tcp_full_checksum(buf, o, l4)
    return length + TCPOLEN_TOA


# ================================================================================================
# Sequence numbers
# ================================================================================================

@njit(**INLINE)
def seq_add(seq, delta):
    return (np.int64(seq) + np.int64(delta)) & M32


@njit(**INLINE)
def seq_diff(a, b):
    """a - b in sequence space: positive when a is after b (RFC 1982 / the kernel's after())."""
    d = (np.int64(a) - np.int64(b)) & M32
    if d >= 0x80000000:
        d -= 0x100000000
    return d


@njit(**INLINE)
def tcp_adjust_seq(buf, l4, delta_seq, delta_ack):
    """seq += delta_seq; ack -= delta_ack when the ACK flag is set (a SYN's or bare RST's ack
    field means nothing and is left alone); mod 2**32; checksum updated incrementally."""
    ck = rd16(buf, l4 + P.TCP_CHECK)
    ck0 = ck
    if delta_seq & M32:
        old = rd32(buf, l4 + P.TCP_SEQ)
        new = (old + delta_seq) & M32
        wr32(buf, l4 + P.TCP_SEQ, new)
        ck = csum_replace4(ck, old, new)
    if (delta_ack & M32) and (buf[l4 + P.TCP_FLAGS] & C.TH_ACK):
        old = rd32(buf, l4 + P.TCP_ACK)
        new = (old - delta_ack) & M32
        wr32(buf, l4 + P.TCP_ACK, new)
        ck = csum_replace4(ck, old, new)
    if ck != ck0:
        wr16(buf, l4 + P.TCP_CHECK, ck)


@njit(**INLINE)
def sack_adjust(buf, l4, doff, delta):
    """Subtract delta (mod 2**32) from every edge of every SACK option (kind 5, 2 + 8k bytes);
    pass the same delta as tcp_adjust_seq's delta_ack. Returns the number of edges changed.
    Malformed options end the walk (the segment is still forwarded, as IPVS does)."""
    n = np.int64(0)
    if (delta & M32) == 0 or doff <= 20:
        return n
    ck = rd16(buf, l4 + P.TCP_CHECK)
    i = l4 + 20
    end = l4 + doff
    while i < end:
        size = tcp_option_size(buf, i, end)
        if size < 0:
            break
        k = np.int64(buf[i])
        if (k == TCPOPT_SACK and size >= TCPOLEN_SACK_BASE + TCPOLEN_SACK_PERBLOCK
                and (size - TCPOLEN_SACK_BASE) % TCPOLEN_SACK_PERBLOCK == 0):
            j = i + 2
            even = ((j - l4) & 1) == 0      # NOP NOP SACK, the usual layout
            while j < i + size:
                old = rd32(buf, j)
                new = (old - delta) & M32
                if even:
                    wr32(buf, j, new)
                    ck = csum_replace4(ck, old, new)
                else:
                    before = _seg_sum(buf, l4, j, 4)
                    wr32(buf, j, new)
                    ck = csum_replace2(ck, before, _seg_sum(buf, l4, j, 4))
                j += 4
                n += 1
        i += size
    if n:
        wr16(buf, l4 + P.TCP_CHECK, ck)
    return n


@njit(**INLINE)
def tcp_set_tuple(buf, o, l4, saddr, daddr, sport, dport):
    """Rewrite both addresses and both ports of a TCP segment; IP and TCP checksums updated
    incrementally (the FULLNAT rewrite, either direction)."""
    ipck = rd16(buf, o + P.IP_CHECK)
    ck = rd16(buf, l4 + P.TCP_CHECK)
    old = rd32(buf, o + P.IP_SADDR)
    wr32(buf, o + P.IP_SADDR, saddr)
    ipck = csum_replace4(ipck, old, saddr)
    ck = csum_replace4(ck, old, saddr)
    old = rd32(buf, o + P.IP_DADDR)
    wr32(buf, o + P.IP_DADDR, daddr)
    ipck = csum_replace4(ipck, old, daddr)
    ck = csum_replace4(ck, old, daddr)
    old = rd16(buf, l4 + P.TCP_SPORT)
    wr16(buf, l4 + P.TCP_SPORT, sport)
    ck = csum_replace2(ck, old, sport)
    old = rd16(buf, l4 + P.TCP_DPORT)
    wr16(buf, l4 + P.TCP_DPORT, dport)
    ck = csum_replace2(ck, old, dport)
    wr16(buf, o + P.IP_CHECK, ipck)
    wr16(buf, l4 + P.TCP_CHECK, ck)


# ================================================================================================
# PROXY protocol
# ================================================================================================

@njit(**INLINE)
def _put_dec(out, i, v):
    """Write v (>= 0) in decimal at out[i]; returns the index after it."""
    if v == 0:
        out[i] = 48
        return i + 1
    n = 0
    t = v
    while t > 0:
        n += 1
        t //= 10
    j = i + n - 1
    while v > 0:
        out[j] = 48 + v % 10
        v //= 10
        j -= 1
    return i + n


@njit(**INLINE)
def _put_ipv4(out, i, addr):
    for s in (24, 16, 8, 0):
        i = _put_dec(out, i, (addr >> s) & 0xFF)
        if s != 0:
            out[i] = 46     # '.'
            i += 1
    return i


@njit(**JIT)
def proxy_v1_header(out, client_addr, client_port, vip, vport):
    """``PROXY TCP4 <client> <vip> <cport> <vport>\\r\\n`` into out[0:]; returns its length, or
    -1 when out is shorter than PP_V1_MAX_LEN_TCP4 (nothing written)."""
    if len(out) < PP_V1_MAX_LEN_TCP4:
        return np.int64(-1)
    i = 0
    for ch in (80, 82, 79, 88, 89, 32, 84, 67, 80, 52, 32):     # "PROXY TCP4 "
        out[i] = ch
        i += 1
    i = _put_ipv4(out, i, np.int64(client_addr))
    out[i] = 32
    i = _put_ipv4(out, i + 1, np.int64(vip))
    out[i] = 32
    i = _put_dec(out, i + 1, np.int64(client_port))
    out[i] = 32
    i = _put_dec(out, i + 1, np.int64(vport))
    out[i] = 13
    out[i + 1] = 10
    return np.int64(i + 2)


@njit(**JIT)
def proxy_v2_header(out, client_addr, client_port, vip, vport):
    """Binary v2 header, PROXY command, TCP over IPv4: signature, 0x21, 0x11, length 12,
    source and destination address, source and destination port (big-endian). Returns 28, or
    -1 when out is too short."""
    if len(out) < PP_V2_LEN_TCP4:
        return np.int64(-1)
    for i in range(12):
        out[i] = PP_V2_SIG[i]
    out[12] = PP_V2_VER_CMD_PROXY
    out[13] = PP_V2_FAM_TCP4
    wr16(out, 14, PP_V2_LEN_TCP4 - 16)
    wr32(out, 16, client_addr)
    wr32(out, 20, vip)
    wr16(out, 24, client_port)
    wr16(out, 26, vport)
    return np.int64(PP_V2_LEN_TCP4)


@njit(**JIT)
def payload_insert(buf, o, l4, length, cap, data, n):
    """Insert data[:n] at the start of the TCP payload (right after the TCP header); IP total
    length += n, IP checksum updated, TCP checksum recomputed. Returns the new packet length, or
    -1 (untouched) when cap or the 64 KiB IP length cannot take it. Sequence numbers are the
    caller's (see the PROXY scheme in the module docstring)."""
    tot = rd16(buf, o + P.IP_TOT_LEN)
    if n < 0 or n > len(data) or length + n > cap or tot + n > 0xFFFF:
        return np.int64(-1)
    if n == 0:
        return np.int64(length)
    doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
    at = l4 + doff
    _open_gap(buf, at, o + length, n)
    for i in range(n):
        buf[at + i] = data[i]
    _ip_set_tot_len(buf, o, tot + n)
    _tcp_full_checksum(buf, o, l4)
    return length + n


# ================================================================================================
# Policy helpers: which client segments get TOA / the PROXY header, and with which delta
# ================================================================================================

@njit(**INLINE)
def toa_wanted(tflags, seq, client_isn):
    """TOA goes in the SYN and in every non-RST client segment that starts the client's stream
    (seq == client_isn + 1: the handshake ACK, the first data segment, their retransmissions)."""
    if tflags & C.TH_RST:
        return False
    if tflags & C.TH_SYN:
        return (tflags & C.TH_ACK) == 0
    return (tflags & C.TH_ACK) != 0 and (np.int64(seq) & M32) == ((np.int64(client_isn) + 1) & M32)


@njit(**INLINE)
def pp_in_plan(tflags, seq, client_isn, seq_delta_in, pp_len, pp_acked):
    """For a client -> RS segment of a PROXY-protocol connection: (insert the header here?,
    delta to add to its seq). seq_delta_in already includes pp_len (set at the SYN).

    * SYN: base delta (the header comes after the ISN).
    * Stream start (seq == client_isn + 1) while the RS has not acknowledged the header:
      insert (not into a RST), base delta: the segment then starts at S with the header.
    * Everything else: full delta."""
    base = (np.int64(seq_delta_in) - pp_len) & M32
    full = np.int64(seq_delta_in) & M32
    if tflags & C.TH_SYN:
        return False, base
    if pp_acked or (np.int64(seq) & M32) != ((np.int64(client_isn) + 1) & M32):
        return False, full
    if tflags & C.TH_RST:
        return False, base
    return True, base


@njit(**INLINE)
def pp_out_ack(ack, client_isn, seq_delta_in):
    """For an RS -> client segment with ACK set: (delta_ack for tcp_adjust_seq, whether the ack
    covers everything up to the client's stream start, header included). An ack short of that
    (the SYN-ACK, a dup ACK while the header is missing) is mapped to client_isn + 1. Without a
    PROXY header this is simply (seq_delta_in, True) past the SYN-ACK."""
    start = (np.int64(client_isn) + 1) & M32
    end = (start + np.int64(seq_delta_in)) & M32
    if seq_diff(ack, end) >= 0:
        return np.int64(seq_delta_in) & M32, True
    return (np.int64(ack) - start) & M32, False
