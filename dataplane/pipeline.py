"""The data plane's one entry point: `process_batch`.

A batch is one byte buffer with an offset, length and capacity per packet (the IPv4 header starts
at the offset). For each packet the pipeline runs the stages of an L4 balancer, each returning a
verdict or "continue":

  parse -> connection lookup (either direction) -> [miss] service lookup -> schedule (template,
  scheduler, sorry server) -> connection create -> state machine -> rewrite -> counters

and writes a verdict (consts.VERDICT_*). Rewrites happen in place in the buffer. Nothing here
reads a clock, touches a socket or raises: `now_ns` comes in, verdicts and counters go out, and
every drop is counted under its reason in `wk.stats`. Expiry is a bounded sweep per batch.

The same function serves the netfilterqueue adapter, the batched netlink backend, pcap replay and
the tests.
"""

import numpy as np
from numba import njit

from dataplane import conntrack as CT
from dataplane import fullnat as FN
from dataplane import consts as C
from dataplane import nat as N
from dataplane import parse as P
from dataplane import synproxy as SP
from dataplane import tables as T
from dataplane.borrow import borrow
from dataplane.csum import INLINE, JIT, SETTLE_CANNOT, SETTLE_DONE, csum_replace2, csum_replace4, \
    l4_settle, rd16, rd32, wr16, wr32
from dataplane.prefetch import prefetch, prefetch_row
from dataplane.sched import schedule

SWEEP_PER_PACKET = 2
SWEEP_IDLE = 4096
SKB_SETTLE = C.NFQA_SKB_CSUMNOTREADY | C.NFQA_SKB_GSO     # skbinfo bits that need l4_settle
_SVC_HASH_M = np.uint64(0x9E3779B97F4A7C15)
_S40 = np.uint64(40)


@njit(**JIT)
def svc_slot(key, mask):
    """Home slot of a service key; control/apply.py inserts with the same function."""
    return np.int64((np.uint64(key) * _SVC_HASH_M) >> _S40) & mask


@njit(**JIT)
def svc_lookup_key(cfg, key):
    hk = cfg.svc_hkey
    mask = len(hk) - 1
    k = np.uint64(key)
    i = svc_slot(key, mask)
    while True:
        v = hk[i]
        if v == 0:
            return np.int64(0)
        if v == k:
            return np.int64(cfg.svc_hval[i])
        i = (i + 1) & mask


@njit(**JIT)
def svc_lookup(cfg, proto, daddr, dport, mark):
    """Service for a client packet: fwmark first (as IPVS), then addr:port, then a port-0 one."""
    if mark != 0:
        s = svc_lookup_key(cfg, (np.int64(1) << 56) | mark)
        if s != 0:
            return s
    s = svc_lookup_key(cfg, (proto << 48) | (dport << 32) | daddr)
    if s != 0:
        return s
    return svc_lookup_key(cfg, (proto << 48) | daddr)


@njit(**JIT)
def _count(wk, svc_id, dest_id, direction, nbytes):
    if direction == C.DIR_IN:
        wk.svc_cnt[svc_id, T.CNT_INPKTS] += 1
        wk.svc_cnt[svc_id, T.CNT_INBYTES] += nbytes
        wk.dest_cnt[dest_id, T.CNT_INPKTS] += 1
        wk.dest_cnt[dest_id, T.CNT_INBYTES] += nbytes
    else:
        wk.svc_cnt[svc_id, T.CNT_OUTPKTS] += 1
        wk.svc_cnt[svc_id, T.CNT_OUTBYTES] += nbytes
        wk.dest_cnt[dest_id, T.CNT_OUTPKTS] += 1
        wk.dest_cnt[dest_id, T.CNT_OUTBYTES] += nbytes


@njit(**JIT)
def _dest_usable(cfg, d):
    return d != 0 and (cfg.dest[d]['flags'] & C.DEST_F_AVAILABLE) != 0


@njit(**JIT)
def pick_dest(cfg, wk, svc_id, proto, caddr, cport, vaddr, vport, now_ns):
    """Choose the real server for a new connection; return (dest_id, template_id).

    Persistent services first look for the client's template (IPVS keeps using a template's
    real server while it is available, even at weight 0, so quiesced servers drain persistent
    clients gently); otherwise the scheduler picks and a template is created. When no real
    server is schedulable the sorry server, if any, takes the connection."""
    svc = cfg.svc[svc_id]
    template = np.int64(0)
    if svc['flags'] & C.SVC_F_PERSISTENT:
        masked = caddr & np.int64(svc['persist_mask'])
        tport = vport if svc['port'] != 0 else 0
        k0, k1 = CT.make_key(masked, vaddr, 0, tport, proto | T.TEMPLATE_KEY_BIT)
        v = CT.idx_lookup(wk, k0, k1)
        if v != 0:
            t = v >> 1
            tc = wk.conn[t]
            d = np.int64(tc['dest'])
            if tc['expire_ns'] > now_ns and _dest_usable(cfg, d) and cfg.dest[d]['svc'] == svc_id:
                tc['expire_ns'] = now_ns + np.int64(svc['persist_timeout_s']) * C.NS
                wk.stats[C.STAT_TEMPLATE_HIT] += 1
                return d, t
            if tc['n_control'] <= 0:
                CT.conn_free(wk, t)
        d = schedule(cfg.svc, cfg.dest, cfg.svc_dests, cfg.ring, wk.sched, wk.active,
                     wk.inactive, svc_id, caddr, cport, vaddr)
        if d != 0:
            template = CT.template_new(wk, svc_id, d, proto, masked, vaddr, tport,
                                       np.int64(svc['persist_timeout_s']) * C.NS, now_ns)
            if template == 0:
                return np.int64(-1), np.int64(0)
            return d, template
    else:
        d = schedule(cfg.svc, cfg.dest, cfg.svc_dests, cfg.ring, wk.sched, wk.active,
                     wk.inactive, svc_id, caddr, cport, vaddr)
        if d != 0:
            return d, template
    s = np.int64(svc['sorry_dest'])
    if _dest_usable(cfg, s):
        wk.stats[C.STAT_SORRY] += 1
        return s, template
    return np.int64(0), template


@njit(**JIT)
def is_laddr(cfg, addr):
    """Whether addr is one of the FULLNAT local addresses (a linear scan: for packets that
    matched neither a connection nor a service)."""
    la = cfg.laddr
    for i in range(1, len(la)):
        if la[i] == addr and addr != 0:
            return True
    return False


SP_MISS = -16   # new_conn: r <= SP_MISS means "TCP to SYN-proxy service SP_MISS - r, no connection"


@njit(**JIT)
def new_conn(cfg, wk, proto, saddr, sport, daddr, dport, tflags, mark, now_ns):
    """A client packet that matched no connection. Returns cid * 2 (direction in) when a
    connection was made, SP_MISS - svc_id for TCP to a SYN-proxy service (the caller runs
    `synproxy_miss`), else -1 - verdict (the verdict to give, its reason counted)."""
    svc_id = svc_lookup(cfg, proto, daddr, dport, mark)
    res = np.int64(-1 - C.VERDICT_ACCEPT)
    if svc_id == 0:
        wk.stats[C.STAT_NOT_OURS] += 1
        if is_laddr(cfg, daddr):
            wk.stats[C.STAT_FNAT_REPLY_NO_CONN] += 1
    elif proto == C.IPPROTO_TCP and (cfg.svc[svc_id]['flags'] & C.SVC_F_SYNPROXY) != 0:
        res = SP_MISS - svc_id
    elif proto == C.IPPROTO_TCP and (tflags & (C.TH_SYN | C.TH_ACK | C.TH_RST)) != C.TH_SYN:
        wk.stats[C.STAT_NOT_SYN] += 1
    else:
        res = place_conn(cfg, wk, svc_id, proto, saddr, sport, daddr, dport, now_ns)
    return res


@njit(**JIT)
def place_conn(cfg, wk, svc_id, proto, saddr, sport, daddr, dport, now_ns):
    """Schedule a new connection of service svc_id (real server, FULLNAT local address and
    port) and create it. Returns cid * 2, or -1 - VERDICT_DROP with the reason counted."""
    d, template = pick_dest(cfg, wk, svc_id, proto, saddr, sport, daddr, dport, now_ns)
    res = np.int64(-1 - C.VERDICT_DROP)
    if d == 0:
        wk.stats[C.DROP_NO_DEST] += 1
    elif d < 0:
        wk.stats[C.DROP_CONN_FULL] += 1
    else:
        lid = np.int64(0)
        lport = np.int64(0)
        if cfg.dest[d]['fwd'] == C.FWD_FULLNAT:
            lid, lport = FN.laddr_bind(cfg.svc_laddrs, svc_id, np.int64(cfg.svc[svc_id]['n_laddrs']),
                                       wk.lport_fifo, wk.lport_head, wk.lport_count,
                                       wk.laddr_rr)
        if lid < 0:
            wk.stats[C.DROP_LADDR_EXHAUSTED] += 1
        else:
            cid = CT.conn_new(wk, cfg, svc_id, d, proto, saddr, sport, daddr, dport, now_ns,
                              template, lid, lport)
            if cid == 0:
                wk.stats[C.DROP_CONN_FULL] += 1
                if lid > 0:
                    FN.lport_free(wk.lport_fifo, wk.lport_head, wk.lport_count, lid, lport)
            else:
                res = cid * 2
    return res


@njit(**JIT)
def slow_path(cfg, wk, buf, o, length, p, q, now_ns):
    """Packets the fast path does not classify: not IPv4, malformed, ICMP, later fragments,
    protocols we do not balance. Returns a verdict."""
    st = P.parse_packet(buf, o, length, p)
    v = C.VERDICT_ACCEPT
    if st == P.PARSE_NOT_IPV4:
        wk.stats[C.STAT_NOT_OURS] += 1
    elif st != P.PARSE_OK:
        wk.stats[C.DROP_MALFORMED] += 1
        v = C.VERDICT_DROP
    elif p[P.P_PROTO] == C.IPPROTO_ICMP:
        v = _icmp(cfg, wk, buf, o, p, q)
    elif p[P.P_PROTO] != C.IPPROTO_TCP and p[P.P_PROTO] != C.IPPROTO_UDP:
        wk.stats[C.STAT_NOT_OURS] += 1
    elif p[P.P_FRAG] != 0 and p[P.P_FRAG_FIRST] == 0:
        v = _later_fragment(cfg, wk, buf, o, p, now_ns)
    else:
        # A well-formed TCP/UDP packet reaches here only when the fast path's own checks
        # disagreed with parse_packet, which they must not: count it rather than guess.
        wk.stats[C.DROP_MALFORMED] += 1
        v = C.VERDICT_DROP
    return v


@njit(**JIT)
def _frag_slot(saddr, daddr, ip_id, proto, mask):
    k0, k1 = CT.make_key(saddr, daddr, ip_id, 0, proto)
    return k0, k1, CT._slot(k0, k1, mask)


@njit(**JIT)
def remember_fragment(wk, saddr, daddr, ip_id, proto, val, now_ns):
    """A first fragment was balanced: let its later fragments (which carry no ports) find the
    connection by (addresses, protocol, IP id) for FRAG_TIMEOUT_NS. Direct-mapped: a collision
    forgets the older datagram, whose later fragments are then dropped and counted."""
    k0, k1, i = _frag_slot(saddr, daddr, ip_id, proto, len(wk.frag_val) - 1)
    wk.frag_k0[i] = k0
    wk.frag_k1[i] = k1
    wk.frag_val[i] = val
    wk.frag_exp[i] = now_ns + T.FRAG_TIMEOUT_NS


@njit(**JIT)
def _later_fragment(cfg, wk, buf, o, p, now_ns):
    ip_id = rd16(buf, o + P.IP_ID)
    k0, k1, i = _frag_slot(p[P.P_SADDR], p[P.P_DADDR], ip_id, p[P.P_PROTO], len(wk.frag_val) - 1)
    v = C.VERDICT_DROP
    if wk.frag_k0[i] == k0 and wk.frag_k1[i] == k1 and wk.frag_exp[i] > now_ns:
        val = np.int64(wk.frag_val[i])
        cid = val >> 1
        c = wk.conn[cid]
        if c['flags'] != 0:
            N.nat_rewrite(buf, o, p[P.P_PROTO], p[P.P_L4OFF], False, val & 1, c)
            if c['flags'] & C.CONN_F_FULLNAT:
                # The other address too (ports live in the first fragment only).
                if (val & 1) == C.DIR_IN:
                    N.set_addr(buf, o, p[P.P_PROTO], p[P.P_L4OFF], False, 0, np.int64(c['laddr']))
                else:
                    N.set_addr(buf, o, p[P.P_PROTO], p[P.P_L4OFF], False, 1, np.int64(c['caddr']))
            _count(wk, np.int64(c['svc']), np.int64(c['dest']), val & 1, p[P.P_TOTLEN])
            wk.stats[C.STAT_FRAG_XLATE] += 1
            v = C.VERDICT_REWRITE
    if v == C.VERDICT_DROP:
        wk.stats[C.DROP_FRAGMENT] += 1
    return v


@njit(**JIT)
def _icmp(cfg, wk, buf, o, p, q):
    """ICMP: errors quoting a balanced datagram are translated; everything else is not ours."""
    if not P.icmp_is_error(p[P.P_ICMP_TYPE]):
        wk.stats[C.STAT_NOT_OURS] += 1
        return C.VERDICT_ACCEPT
    l4 = p[P.P_L4OFF]
    l4len = p[P.P_L4LEN]
    if P.parse_icmp_inner(buf, l4, l4len, q) != P.PARSE_OK:
        wk.stats[C.STAT_NOT_OURS] += 1
        return C.VERDICT_ACCEPT
    # The quoted datagram went the other way: look it up reversed.
    k0, k1 = CT.make_key(q[P.P_DADDR], q[P.P_SADDR], q[P.P_DPORT], q[P.P_SPORT], q[P.P_PROTO])
    v = CT.idx_lookup(wk, k0, k1)
    if v == 0:
        # An error quoting a datagram to or from a service address with no connection is
        # stale (its connection expired): nobody could use it, so drop and count it.
        if (svc_lookup(cfg, q[P.P_PROTO], q[P.P_DADDR], q[P.P_DPORT], np.int64(0)) != 0 or
                svc_lookup(cfg, q[P.P_PROTO], q[P.P_SADDR], q[P.P_SPORT], np.int64(0)) != 0):
            wk.stats[C.DROP_ICMP_NO_CONN] += 1
            return C.VERDICT_DROP
        wk.stats[C.STAT_NOT_OURS] += 1
        return C.VERDICT_ACCEPT
    cid = v >> 1
    direction = v & 1
    c = wk.conn[cid]
    N.nat_icmp(buf, o, l4, l4len, q, direction, c)
    _count(wk, np.int64(c['svc']), np.int64(c['dest']), direction, p[P.P_TOTLEN])
    wk.stats[C.STAT_ICMP_XLATE] += 1
    return C.VERDICT_REWRITE


_ISN_M = np.uint64(0x9E3779B97F4A7C15)


@njit(**JIT)
def fnat_isn(laddr, lport, daddr, dport, now_ns):
    """ISN toward the real server (RFC 6528's shape: a hash of the tuple plus a 4 us clock), so a
    reused laddr:lport -> RS tuple starts above the previous connection's sequence numbers."""
    k0, k1 = CT.make_key(laddr, daddr, lport, dport, C.IPPROTO_TCP)
    h = (k0 * _ISN_M) ^ (k1 * _ISN_M)
    return (np.int64(h >> np.uint64(32)) + now_ns // 4000) & FN.M32


@njit(**JIT)
def fnat_pp_len(wk, c, sflags):
    """Length of the connection's PROXY protocol header (0 without one); v1's depends on the
    digits of the addresses, so it is built (into the worker's scratch) to be measured."""
    n = np.int64(0)
    if sflags & C.SVC_F_PROXY_V1:
        n = FN.proxy_v1_header(wk.scratch, np.int64(c['caddr']), np.int64(c['cport']),
                               np.int64(c['vaddr']), np.int64(c['vport']))
    elif sflags & C.SVC_F_PROXY_V2:
        n = np.int64(FN.PP_V2_LEN_TCP4)
    return n


@njit(**JIT)
def fnat_packet(cfg, wk, buf, o, plen, cap, l4, direction, cid, proto, tflags, now_ns):
    """FULLNAT: rewrite both addresses and ports, and for TCP translate sequence numbers, strip
    timestamps from the SYN or translate them (SVC_F_FNAT_TS_XLATE), insert TOA and the PROXY protocol header (dataplane/fullnat.py has
    the scheme). Returns the packet's new length, or -1 to drop it (counted)."""
    c = wk.conn[cid]
    if c['state'] == C.IP_VS_TCP_S_TIME_WAIT and proto == C.IPPROTO_TCP:
        c['expire_ns'] = now_ns + cfg.timeouts_ns[C.TIMEOUT_FNAT_TIME_WAIT]
    elif c['state'] == C.IP_VS_TCP_S_CLOSE and proto == C.IPPROTO_TCP:
        c['expire_ns'] = now_ns + cfg.timeouts_ns[C.TIMEOUT_FNAT_CLOSE]
    if proto == C.IPPROTO_UDP:
        if direction == C.DIR_IN:
            N.set_addr(buf, o, proto, l4, True, 0, np.int64(c['laddr']))
            N.set_addr(buf, o, proto, l4, True, 1, np.int64(c['daddr']))
            N.set_port(buf, proto, l4, True, 0, np.int64(c['lport']))
            N.set_port(buf, proto, l4, True, 1, np.int64(c['dport']))
        else:
            N.set_addr(buf, o, proto, l4, True, 0, np.int64(c['vaddr']))
            N.set_addr(buf, o, proto, l4, True, 1, np.int64(c['caddr']))
            N.set_port(buf, proto, l4, True, 0, np.int64(c['vport']))
            N.set_port(buf, proto, l4, True, 1, np.int64(c['cport']))
        return plen
    sflags = np.int64(cfg.svc[c['svc']]['flags'])
    length = plen
    doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
    seq = rd32(buf, l4 + P.TCP_SEQ)
    ack = rd32(buf, l4 + P.TCP_ACK)
    if direction == C.DIR_IN:
        if (tflags & C.TH_SYN) != 0 and (tflags & C.TH_ACK) == 0:
            if (c['flags'] & C.CONN_F_ISN_SET) == 0:
                isn = fnat_isn(np.int64(c['laddr']), np.int64(c['lport']), np.int64(c['daddr']),
                               np.int64(c['dport']), now_ns)
                pp_len = fnat_pp_len(wk, c, sflags)
                c['aux'] = seq
                c['pp_len'] = pp_len
                c['seq_delta_in'] = (isn - seq + pp_len) & FN.M32
                c['flags'] |= C.CONN_F_ISN_SET
                tsval = FN.ts_value(buf, l4, doff) if sflags & C.SVC_F_FNAT_TS_XLATE else -1
                if tsval >= 0:
                    # The RS sees the local address's clock from this SYN on (fullnat.py).
                    c['ts_off'] = (FN.ts_clock(np.int64(c['laddr']), now_ns) - tsval) & FN.M32
                    c['flags'] |= C.CONN_F_TS_XLATE
            if (c['flags'] & C.CONN_F_TS_XLATE) == 0:
                FN.ts_strip(buf, o, l4, doff)
        if c['flags'] & C.CONN_F_TS_XLATE:
            FN.ts_adjust(buf, l4, doff, np.int64(c['ts_off']), np.int64(c['ts_delta']))
        client_isn = np.int64(c['aux'])
        if (sflags & C.SVC_F_TOA) != 0 and FN.toa_wanted(tflags, seq, client_isn):
            r = FN.toa_insert(buf, o, l4, length, cap, np.int64(c['caddr']), np.int64(c['cport']))
            if r < 0:
                wk.stats[C.STAT_TOA_NO_ROOM] += 1
            else:
                length = r
        dseq = np.int64(c['seq_delta_in'])
        pp_len = np.int64(c['pp_len'])
        if pp_len > 0:
            ins, dseq = FN.pp_in_plan(tflags, seq, client_isn, dseq, pp_len,
                                      (c['flags'] & C.CONN_F_PP_ACKED) != 0)
            if ins:
                if sflags & C.SVC_F_PROXY_V1:
                    n = FN.proxy_v1_header(wk.scratch, np.int64(c['caddr']), np.int64(c['cport']),
                                           np.int64(c['vaddr']), np.int64(c['vport']))
                else:
                    n = FN.proxy_v2_header(wk.scratch, np.int64(c['caddr']), np.int64(c['cport']),
                                           np.int64(c['vaddr']), np.int64(c['vport']))
                r = FN.payload_insert(buf, o, l4, length, cap, wk.scratch, n)
                if r < 0:
                    # The real server must not see the stream without its header.
                    wk.stats[C.DROP_TOO_BIG] += 1
                    return np.int64(-1)
                length = r
        doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
        dout = np.int64(c['seq_delta_out'])
        FN.tcp_adjust_seq(buf, l4, dseq, dout)
        if (tflags & C.TH_ACK) != 0 and doff > 20 and dout != 0:
            FN.sack_adjust(buf, l4, doff, dout)
        FN.tcp_set_tuple(buf, o, l4, np.int64(c['laddr']), np.int64(c['daddr']),
                         np.int64(c['lport']), np.int64(c['dport']))
    else:
        if (tflags & C.TH_SYN) != 0 and (tflags & C.TH_ACK) != 0:
            # Leave room for what the client's first full-size segment may gain on its way.
            reduce = np.int64(c['pp_len'])
            if sflags & C.SVC_F_TOA:
                reduce += FN.TCPOLEN_TOA
            if reduce > 0:
                mss = FN.tcp_get_mss(buf, l4, doff)
                if mss > reduce:
                    FN.tcp_set_mss(buf, o, l4, doff, mss - reduce)
        if c['flags'] & C.CONN_F_TS_XLATE:
            FN.ts_adjust(buf, l4, doff, np.int64(c['ts_delta']), np.int64(c['ts_off']))
        dack = np.int64(0)
        din = np.int64(c['seq_delta_in'])
        if tflags & C.TH_ACK:
            dack, acked = FN.pp_out_ack(ack, np.int64(c['aux']), din)
            if acked and c['pp_len'] > 0:
                c['flags'] |= C.CONN_F_PP_ACKED
        FN.tcp_adjust_seq(buf, l4, np.int64(c['seq_delta_out']), dack)
        if (tflags & C.TH_ACK) != 0 and doff > 20:
            FN.sack_adjust(buf, l4, doff, din)
        FN.tcp_set_tuple(buf, o, l4, np.int64(c['vaddr']), np.int64(c['caddr']),
                         np.int64(c['vport']), np.int64(c['cport']))
    return length


# ================================================================================================
# SYN-proxy (dataplane/synproxy.py has the design; these wire its legs into the pipeline)
# ================================================================================================
# Choices made here:
# * FULLNAT + SYN-proxy: the SYN to the RS comes from laddr:lport with FULLNAT's own ISN
#   (fnat_isn; seq_delta_in = that - client ISN, as without SYN-proxy), and carries no TS option
#   (FULLNAT strips timestamps towards the RS: PAWS per laddr:lport); ts_delta is then 0 and the
#   client's TS options reach the RS, which ignores them. With --fnat-timestamp translate
#   (CONN_F_TS_XLATE) it carries the client's TS value on the local address's clock (+ ts_off);
#   fnat_packet then shifts values and echoes by ts_off and ts_delta both ways. TOA rides in our ACK to the RS (and in
#   the client's first segment, as fnat_packet does for seq == client ISN + 1). The PROXY header
#   goes in the client's first data segment (our handshake ACK carries no payload).
# * NAT + SYN-proxy: the SYN carries the client's ISN and TS value, so only the RS's side moves
#   (seq_delta_out, ts_delta).
# * Client segments while SYN_SENT: up to SPC_ACK_STORE_MAX with data (or FIN) are held in the
#   connection's wait slot (Worker.sp_wait_cid/sp_hold, STAT_SYNPROXY_ACK_STORED) and sent on,
#   translated and in order, right after our ACK to the RS; more are dropped
#   (DROP_SYNPROXY_SYNSEND_QLEN), retransmissions of held ones and pure ACKs too
#   (DROP_SYNPROXY_SYN_SENT): the client retransmits.
# * SYN retries to a silent RS: one more SYN when the last is SP_SYN_RETRY_NS old, up to
#   SPC_SYN_RETRY; then a RST to the client and the entry is freed. Checked on each client
#   segment and by sp_retry_scan (every SP_SCAN_NS, from process_batch, whose empty batches the
#   backends run while idle): a quiet client does not stall the retries. No clock is read here.
# * Connection reuse: a SYN, or an ACK carrying a valid cookie, from the client of an entry in a
#   synproxy_conn_reuse_* state (SPC_REUSE_STATES) frees the entry and starts over as a new
#   connection (ip_vs_synproxy_reuse_conn; STAT_SYNPROXY_CONN_REUSED). For SYN-proxy entries
#   these settings replace conn_reuse_mode's TIME_WAIT/CLOSE rule; in other states the packet
#   belongs to the old connection, as without reuse.

SP_SYN_RETRY_NS = C.NS      # at least this long between SYNs to a real server
SP_SCAN_NS = C.NS // 10     # sp_retry_scan runs at most this often


@njit(**JIT)
def _sp_waiting(wk, cid):
    """Connection cid is a SYN-proxy connection still waiting for its real server."""
    c = wk.conn[cid]
    return (c['flags'] & C.CONN_F_SYNPROXY) != 0 and c['state'] == C.IP_VS_TCP_S_SYN_SENT


@njit(**JIT)
def sp_wait_find(wk, cid):
    """The wait slot of connection cid (tables.py: Worker.sp_wait_cid), or -1."""
    for k in range(T.SP_WAIT_PROBE):
        h = (cid + k) & (T.SP_WAIT_SLOTS - 1)
        if wk.sp_wait_cid[h] == cid:
            return np.int64(h)
    return np.int64(-1)


@njit(**JIT)
def _sp_wait_claim(wk, cid):
    """An empty wait slot for connection cid, new in SYN_SENT: its own (left by an earlier
    connection with this id), else the first in its probe window that is free or whose owner no
    longer waits; -1 when every one there belongs to a waiting connection."""
    h = sp_wait_find(wk, cid)
    if h < 0:
        for k in range(T.SP_WAIT_PROBE):
            j = (cid + k) & (T.SP_WAIT_SLOTS - 1)
            owner = wk.sp_wait_cid[j]
            if owner == 0 or not _sp_waiting(wk, owner):
                h = np.int64(j)
                break
    if h >= 0:
        wk.sp_wait_cid[h] = cid
        wk.sp_hold_n[h] = 0
    return h


@njit(**JIT)
def _sp_syn_retry(cfg, wk, cid, tx, now_ns):
    """SYN_SENT connection cid: when its last SYN to the RS is SP_SYN_RETRY_NS old, send it again
    (STAT_SYNPROXY_RS_SYN_RETRY), or, SPC_SYN_RETRY retries on, give up (_sp_abort)."""
    c = wk.conn[cid]
    if now_ns - c['sp_syn_ns'] < SP_SYN_RETRY_NS:
        return
    word = np.int64(c['sp_last_ack'])
    retries = (word >> 25) & 7
    if retries >= cfg.sp_cfg[SP.SPC_SYN_RETRY]:
        _sp_abort(cfg, wk, cid, tx)
    else:
        c['sp_last_ack'] = (word & ~(np.int64(7) << 25)) | ((retries + 1) << 25)
        c['sp_syn_ns'] = now_ns
        if sp_syn_to_rs(cfg, wk, cid, tx):
            wk.stats[C.STAT_SYNPROXY_RS_SYN_RETRY] += 1


@njit(**JIT)
def sp_retry_scan(cfg, wk, now_ns, tx):
    """The RS SYN retry timer (the patch retransmits from ip_vs_conn_expire): visit every wait
    slot, retry or abort the connections due (_sp_syn_retry), free slots whose connection no
    longer waits. Bounded (SP_WAIT_SLOTS); process_batch calls it every SP_SCAN_NS."""
    wk.ctl[T.CTL_SP_SCAN_NS] = now_ns + SP_SCAN_NS
    for h in range(T.SP_WAIT_SLOTS):
        cid = wk.sp_wait_cid[h]
        if cid == 0:
            continue
        if not _sp_waiting(wk, cid):
            wk.sp_wait_cid[h] = 0
        elif wk.conn[cid]['expire_ns'] > now_ns:     # expired ones are the sweep's
            _sp_syn_retry(cfg, wk, cid, tx, now_ns)


@njit(**JIT)
def sp_reuse_ok(cfg, wk, buf, o, tflags, now_ns):
    """A client packet meeting a SYN-proxy entry in a reuse state: may it start a new
    connection? A SYN may (it gets a cookie); an ACK may if it carries a valid cookie."""
    if (tflags & (C.TH_SYN | C.TH_ACK | C.TH_RST | C.TH_FIN)) == C.TH_SYN:
        return True
    if (tflags & (C.TH_SYN | C.TH_ACK | C.TH_RST)) != C.TH_ACK:
        return False
    mss, _, _, _, _ = SP.synproxy_ack(buf, o, cfg.sp_secrets, cfg.sp_cfg, now_ns)
    return mss >= 0


@njit(**JIT)
def _tx_slot(wk, tx):
    """Index of the next free tx slot, or -1 (counted DROP_TX_FULL)."""
    k = tx.count[0]
    if k >= len(tx.off):
        wk.stats[C.DROP_TX_FULL] += 1
        return np.int64(-1)
    return np.int64(k)


@njit(**JIT)
def sp_syn_to_rs(cfg, wk, cid, tx):
    """(Re)build the SYN to the real server of a SYN_SENT connection from its stored handshake
    state into tx. Returns False when tx is full."""
    k = _tx_slot(wk, tx)
    if k < 0:
        return False
    c = wk.conn[cid]
    mss_idx, ws, sack, ts_ok, _, _ = SP.hs_unpack(np.int64(c['sp_last_ack']))
    client_isn = np.int64(c['aux'])
    if c['flags'] & C.CONN_F_FULLNAT:
        saddr = np.int64(c['laddr'])
        sport = np.int64(c['lport'])
        isn = (client_isn + np.int64(c['seq_delta_in'])) & SP.M32
        ts_val = np.int64(-1)
        if c['flags'] & C.CONN_F_TS_XLATE:      # the client's TS value on the laddr's clock
            ts_val = (np.int64(c['sp_last_seq']) + np.int64(c['ts_off'])) & SP.M32
    else:
        saddr = np.int64(c['caddr'])
        sport = np.int64(c['cport'])
        isn = client_isn
        ts_val = np.int64(c['sp_last_seq']) if ts_ok else np.int64(-1)
    n = SP.syn_to_rs(tx.buf, tx.off[k], saddr, np.int64(c['daddr']), sport, np.int64(c['dport']),
                     isn, SP.MSSTAB[mss_idx], ws, sack, ts_val, np.int64(0))
    tx.length[k] = n
    tx.count[0] = k + 1
    return True


@njit(**JIT)
def synproxy_miss(cfg, wk, buf, o, plen, cap, svc_id, tflags, now_ns, tx):
    """A TCP packet to a SYN-proxy service with no connection. Returns (verdict, new length):

    SYN -> the cookie SYN-ACK in place (VERDICT_REWRITE, nothing kept); ACK -> cookie checked,
    connection scheduled and created in SYN_SENT, SYN to the RS queued in tx, the ACK dropped;
    anything else -> the local stack (as without SYN-proxy: it answers with a RST)."""
    ihl = (np.int64(buf[o]) & 0xF) * 4
    l4 = o + ihl
    if (tflags & (C.TH_SYN | C.TH_ACK | C.TH_RST | C.TH_FIN)) == C.TH_SYN:
        n = SP.synproxy_syn(buf, o, plen, cap, cfg.sp_secrets, cfg.sp_cfg, now_ns)
        if n < 0:
            wk.stats[C.DROP_MALFORMED] += 1
            return C.VERDICT_DROP, plen
        # FULLNAT: leave room for what the client's first segment gains on its way (TOA, the
        # PROXY header), as fnat_packet does on the RS's SYN-ACK; the cookie keeps the full MSS
        # (it becomes the SYN's to the RS: what the RS may send).
        sflags = np.int64(cfg.svc[svc_id]['flags'])
        reduce = np.int64(FN.TCPOLEN_TOA) if sflags & C.SVC_F_TOA else np.int64(0)
        if sflags & C.SVC_F_PROXY_V1:
            reduce += FN.proxy_v1_header(wk.scratch, rd32(buf, o + P.IP_DADDR), rd16(buf, l4 + 2),
                                         rd32(buf, o + P.IP_SADDR), rd16(buf, l4))
        elif sflags & C.SVC_F_PROXY_V2:
            reduce += FN.PP_V2_LEN_TCP4
        if reduce > 0:
            doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
            mss = FN.tcp_get_mss(buf, l4, doff)
            if mss > reduce:
                FN.tcp_set_mss(buf, o, l4, doff, mss - reduce)
        wk.stats[C.STAT_SYNPROXY_COOKIE_SENT] += 1
        return C.VERDICT_REWRITE, n
    if (tflags & (C.TH_SYN | C.TH_ACK | C.TH_RST)) != C.TH_ACK:
        wk.stats[C.STAT_NOT_SYN] += 1
        return C.VERDICT_ACCEPT, plen
    doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
    payload = rd16(buf, o + P.IP_TOT_LEN) - ihl - doff
    if cfg.sp_cfg[SP.SPC_DEFER] != 0 and payload <= 0 and (tflags & C.TH_FIN) == 0:
        wk.stats[C.DROP_SYNPROXY_DEFER] += 1
        return C.VERDICT_DROP, plen
    mss, wscale, sack, tsval, tsecr = SP.synproxy_ack(buf, o, cfg.sp_secrets, cfg.sp_cfg, now_ns)
    if mss < 0:
        wk.stats[C.DROP_SYNPROXY_BAD_ACK] += 1
        return C.VERDICT_DROP, plen
    if tx.count[0] >= len(tx.off):
        wk.stats[C.DROP_TX_FULL] += 1
        return C.VERDICT_DROP, plen
    saddr = rd32(buf, o + P.IP_SADDR)
    daddr = rd32(buf, o + P.IP_DADDR)
    sport = rd16(buf, l4)
    dport = rd16(buf, l4 + 2)
    r = place_conn(cfg, wk, svc_id, np.int64(C.IPPROTO_TCP), saddr, sport, daddr, dport, now_ns)
    if r < 0:
        return -1 - r, plen
    cid = r >> 1
    c = wk.conn[cid]
    client_isn = (rd32(buf, l4 + P.TCP_SEQ) - 1) & SP.M32
    c['flags'] |= C.CONN_F_SYNPROXY
    CT.set_state(wk, cid, C.IP_VS_TCP_S_SYN_SENT)
    c['expire_ns'] = now_ns + cfg.timeouts_ns[C.IP_VS_TCP_S_SYN_SENT]
    c['aux'] = client_isn
    c['seq_delta_out'] = (rd32(buf, l4 + P.TCP_ACK) - 1) & SP.M32      # the cookie
    ts_ok = np.int64(1) if tsval >= 0 else np.int64(0)
    c['ts_delta'] = tsecr & SP.M32 if ts_ok else 0                      # tb
    c['sp_last_seq'] = tsval & SP.M32 if ts_ok else 0                   # the client's TS value
    c['sp_last_ack'] = SP.hs_pack(SP.mss_index(mss), wscale, sack, ts_ok,
                                  rd16(buf, l4 + P.TCP_WINDOW), 0)
    c['sp_dup_acks'] = 0
    c['win_shift_out'] = 0
    c['win_shift_in'] = 0
    c['sp_syn_ns'] = now_ns
    if _sp_wait_claim(wk, cid) < 0:
        wk.stats[C.STAT_SYNPROXY_NO_WAIT_SLOT] += 1
    if c['flags'] & C.CONN_F_FULLNAT:
        isn = fnat_isn(np.int64(c['laddr']), np.int64(c['lport']), np.int64(c['daddr']),
                       np.int64(c['dport']), now_ns)
        sflags = np.int64(cfg.svc[svc_id]['flags'])
        c['pp_len'] = fnat_pp_len(wk, c, sflags)
        # The SYN carries isn; the client's stream (client_isn + 1 ...) starts at isn + 1 + pp_len.
        c['seq_delta_in'] = (isn - client_isn) & SP.M32
        c['flags'] |= C.CONN_F_ISN_SET
        if ts_ok and (sflags & C.SVC_F_FNAT_TS_XLATE) != 0:
            c['ts_off'] = (FN.ts_clock(np.int64(c['laddr']), now_ns) - tsval) & SP.M32
            c['flags'] |= C.CONN_F_TS_XLATE
    sp_syn_to_rs(cfg, wk, cid, tx)
    if c['flags'] & C.CONN_F_FULLNAT and c['pp_len'] > 0:
        c['seq_delta_in'] = (np.int64(c['seq_delta_in']) + np.int64(c['pp_len'])) & SP.M32
    wk.stats[C.STAT_SYNPROXY_OK_ACK] += 1
    if payload > 0:
        wk.stats[C.STAT_SYNPROXY_ACK_DATA] += 1
    return C.VERDICT_DROP, plen


SP_HOLD_MAX = T.SP_HOLD_BYTES - 128     # room for TOA / a PROXY header on the way out


@njit(**JIT)
def _sp_hold(cfg, wk, buf, o, plen, l4, cid, tflags, info):
    """A client segment of a SYN_SENT connection. One with data or FIN is copied into the
    connection's wait slot, up to SPC_ACK_STORE_MAX of them (STAT_SYNPROXY_ACK_STORED; more:
    DROP_SYNPROXY_SYNSEND_QLEN). Pure ACKs, retransmissions of a held segment (same seq) and
    segments with no slot or too long to hold (SP_HOLD_MAX; every GSO packet, which would also
    be too long for the raw socket that sends held segments on): DROP_SYNPROXY_SYN_SENT, the
    client retransmits. A held copy leaves through the raw socket, as it is: a partial checksum
    (``info``, NFQA_SKB_CSUMNOTREADY) is finished before the copy. The caller drops the
    original either way."""
    doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
    payload = rd16(buf, o + P.IP_TOT_LEN) - (l4 - o) - doff
    h = sp_wait_find(wk, cid)
    if ((payload <= 0 and (tflags & C.TH_FIN) == 0) or (tflags & (C.TH_SYN | C.TH_RST)) != 0
            or h < 0 or plen > SP_HOLD_MAX or (info & C.NFQA_SKB_GSO) != 0):
        wk.stats[C.DROP_SYNPROXY_SYN_SENT] += 1
        return
    n = np.int64(wk.sp_hold_n[h])
    seq = rd32(buf, l4 + P.TCP_SEQ)
    for k in range(n):
        held = wk.sp_hold[h, k]
        if rd32(held, (np.int64(held[0]) & 0xF) * 4 + P.TCP_SEQ) == seq:
            wk.stats[C.DROP_SYNPROXY_SYN_SENT] += 1
            return
    if n >= min(cfg.sp_cfg[SP.SPC_ACK_STORE_MAX], np.int64(T.SP_HOLD_SEGS)):
        wk.stats[C.DROP_SYNPROXY_SYNSEND_QLEN] += 1
        return
    if info & C.NFQA_SKB_CSUMNOTREADY:
        l4_settle(buf, o, np.int64(C.NFQA_SKB_CSUMNOTREADY))
    for j in range(plen):
        wk.sp_hold[h, n, j] = buf[o + j]
    wk.sp_hold_len[h, n] = plen
    wk.sp_hold_n[h] = n + 1
    wk.stats[C.STAT_SYNPROXY_ACK_STORED] += 1


@njit(**JIT)
def _sp_release(cfg, wk, cid, tx, now_ns):
    """The real server's handshake is complete: send the held client segments on, in arrival
    order, translated and rewritten as established packets, through tx (after our ACK); free
    the wait slot."""
    h = sp_wait_find(wk, cid)
    if h < 0:
        return
    wk.sp_wait_cid[h] = 0
    c = wk.conn[cid]
    for s in range(np.int64(wk.sp_hold_n[h])):
        k = _tx_slot(wk, tx)
        if k < 0:
            break
        n = np.int64(wk.sp_hold_len[h, s])
        at = tx.off[k]
        for j in range(n):
            tx.buf[at + j] = wk.sp_hold[h, s, j]
        l4 = at + (np.int64(tx.buf[at]) & 0xF) * 4
        tflags = np.int64(tx.buf[l4 + P.TCP_FLAGS])
        CT.tcp_transition(wk, cfg, cid, C.DIR_IN, tflags, now_ns)
        if c['flags'] & C.CONN_F_FULLNAT:
            n = fnat_packet(cfg, wk, tx.buf, at, n, np.int64(T.TX_SLOT), l4, C.DIR_IN, cid,
                            np.int64(C.IPPROTO_TCP), tflags, now_ns)
            if n < 0:
                continue
            if c['win_shift_in'] != 0:
                SP.tcp_translate(tx.buf, l4, 0, 0, 0, 0, np.int64(c['win_shift_in']))
        else:
            SP.tcp_translate(tx.buf, l4, 0, np.int64(c['seq_delta_out']), 0,
                             np.int64(c['ts_delta']), np.int64(c['win_shift_in']))
            N.nat_rewrite(tx.buf, at, np.int64(C.IPPROTO_TCP), l4, True, C.DIR_IN, c)
        tx.length[k] = n
        tx.count[0] = k + 1
        _count(wk, np.int64(c['svc']), np.int64(c['dest']), C.DIR_IN,
               rd16(tx.buf, at + P.IP_TOT_LEN))
    wk.sp_hold_n[h] = 0


@njit(**JIT)
def _sp_abort(cfg, wk, cid, tx):
    """Give up on a SYN_SENT connection: RST to the client (from VIP:vport, seq = cookie + 1,
    ack = client ISN + 1) and free the entry."""
    c = wk.conn[cid]
    k = _tx_slot(wk, tx)
    if k >= 0:
        tx.length[k] = SP.rst_build(tx.buf, tx.off[k], np.int64(c['vaddr']), np.int64(c['caddr']),
                                    np.int64(c['vport']), np.int64(c['cport']),
                                    (np.int64(c['seq_delta_out']) + 1) & SP.M32,
                                    (np.int64(c['aux']) + 1) & SP.M32,
                                    cfg.sp_cfg[SP.SPC_SYNACK_TTL])
        tx.count[0] = k + 1
    wk.stats[C.DROP_SYNPROXY_RS_RST] += 1
    h = sp_wait_find(wk, cid)
    if h >= 0:
        wk.sp_wait_cid[h] = 0
    CT.conn_free(wk, cid)


@njit(**JIT)
def synproxy_conn(cfg, wk, buf, o, plen, cap, l4, direction, cid, tflags, now_ns, tx, info):
    """A packet of a SYN-proxy connection (CONN_F_SYNPROXY, TCP). Returns the packet's new
    length (VERDICT_REWRITE), or -1 to drop it (its reason or its consumption counted).

    SYN_SENT: the RS's SYN-ACK completes the RS's handshake (our ACK into tx; ESTABLISHED;
    the SYN-ACK is consumed), its RST aborts (RST to the client); client segments are dropped,
    and drive the SYN retries. Later: ACK-storm check on RS segments, the state machine, then
    the sequence/timestamp/window translation with the NAT or FULLNAT rewrite."""
    c = wk.conn[cid]
    if c['state'] == C.IP_VS_TCP_S_SYN_SENT:
        if direction == C.DIR_IN:
            _sp_hold(cfg, wk, buf, o, plen, l4, cid, tflags, info)
            _sp_syn_retry(cfg, wk, cid, tx, now_ns)
            return np.int64(-1)
        if tflags & C.TH_RST:
            _sp_abort(cfg, wk, cid, tx)
            return np.int64(-1)
        rs_side_isn = (np.int64(c['aux']) + np.int64(c['seq_delta_in'])
                       - np.int64(c['pp_len'])) & SP.M32
        if ((tflags & (C.TH_SYN | C.TH_ACK)) != (C.TH_SYN | C.TH_ACK)
                or rd32(buf, l4 + P.TCP_ACK) != ((rs_side_isn + 1) & SP.M32)):
            wk.stats[C.DROP_SYNPROXY_SYN_SENT] += 1
            return np.int64(-1)
        k = _tx_slot(wk, tx)
        if k < 0:
            return np.int64(-1)     # the RS retransmits its SYN-ACK
        _, ws, _, _, cwin, _ = SP.hs_unpack(np.int64(c['sp_last_ack']))
        ws_offered = cfg.sp_cfg[SP.SPC_WSCALE] if ws >= 0 else np.int64(0)
        toa_addr = np.int64(0)
        toa_port = np.int64(0)
        if (c['flags'] & C.CONN_F_FULLNAT) and (cfg.svc[c['svc']]['flags'] & C.SVC_F_TOA):
            toa_addr = np.int64(c['caddr'])
            toa_port = np.int64(c['cport'])
        n, sd, tsd, so, si = SP.synproxy_rs_synack(buf, o, tx.buf, tx.off[k],
                                                   np.int64(c['seq_delta_out']),
                                                   np.int64(c['ts_delta']), ws_offered, ws, cwin,
                                                   toa_addr, toa_port)
        if n < 0:
            wk.stats[C.DROP_SYNPROXY_SYN_SENT] += 1
            return np.int64(-1)
        tx.length[k] = n
        tx.count[0] = k + 1
        c['seq_delta_out'] = sd
        c['ts_delta'] = tsd
        c['win_shift_out'] = so
        c['win_shift_in'] = si
        c['sp_last_seq'] = 0
        c['sp_last_ack'] = 0
        c['sp_dup_acks'] = 0
        CT.set_state(wk, cid, C.IP_VS_TCP_S_ESTABLISHED)
        c['expire_ns'] = now_ns + cfg.timeouts_ns[C.IP_VS_TCP_S_ESTABLISHED]
        wk.stats[C.STAT_SYNPROXY_RS_SYNACK] += 1
        _sp_release(cfg, wk, cid, tx, now_ns)
        return np.int64(-1)
    if direction == C.DIR_OUT and (tflags & C.TH_ACK) != 0:
        ihl = np.int64(l4 - o)
        doff = (np.int64(buf[l4 + P.TCP_DOFF]) >> 4) * 4
        if rd16(buf, o + P.IP_TOT_LEN) - ihl - doff <= 0 and (tflags & (C.TH_SYN | C.TH_FIN | C.TH_RST)) == 0:
            # Duplicate ACKs with SACK blocks are loss recovery (each reports a new segment
            # received after a hole, a window's worth of them), not a storm: not counted.
            thresh = cfg.sp_cfg[SP.SPC_ACK_STORM_THRESH]
            if doff > 20 and FN.tcp_find_option(buf, l4, doff, FN.TCPOPT_SACK, 0) >= 0:
                thresh = np.int64(0)
            drop, ls, la, dc = SP.ack_storm(rd32(buf, l4 + P.TCP_SEQ), rd32(buf, l4 + P.TCP_ACK),
                                            np.int64(c['sp_last_seq']), np.int64(c['sp_last_ack']),
                                            np.int64(c['sp_dup_acks']), thresh)
            c['sp_last_seq'] = ls
            c['sp_last_ack'] = la
            c['sp_dup_acks'] = min(dc, 255)
            if drop:
                wk.stats[C.DROP_SYNPROXY_ACK_STORM] += 1
                return np.int64(-1)
    CT.tcp_transition(wk, cfg, cid, direction, tflags, now_ns)
    if c['flags'] & C.CONN_F_FULLNAT:
        r = fnat_packet(cfg, wk, buf, o, plen, cap, l4, direction, cid, np.int64(C.IPPROTO_TCP),
                        tflags, now_ns)
        if r >= 0:
            wsh = np.int64(c['win_shift_in'] if direction == C.DIR_IN else c['win_shift_out'])
            if wsh != 0:
                SP.tcp_translate(buf, l4, 0, 0, 0, 0, wsh)
        return r
    sd = np.int64(c['seq_delta_out'])
    tsd = np.int64(c['ts_delta'])
    if direction == C.DIR_IN:
        SP.tcp_translate(buf, l4, 0, sd, 0, tsd, np.int64(c['win_shift_in']))
    else:
        SP.tcp_translate(buf, l4, sd, 0, tsd, 0, np.int64(c['win_shift_out']))
    N.nat_rewrite(buf, o, np.int64(C.IPPROTO_TCP), l4, True, direction, c)
    return plen


@njit(**INLINE)
def _guess_slot(buf, o, plen, mask):
    """(index slot, k0, k1) of the packet at o read at fixed offsets as if it were plain TCP/UDP,
    or (-1, 0, 0) when it is too short for that: the prefetch passes' guess, which pass 3's
    real parse never trusts."""
    if plen >= 28:
        ihl = (np.int64(buf[o]) & 0xF) * 4
        if np.int64(plen) >= ihl + 4:
            k0, k1 = CT.make_key(rd32(buf, o + P.IP_SADDR), rd32(buf, o + P.IP_DADDR),
                                 rd16(buf, o + ihl), rd16(buf, o + ihl + 2),
                                 np.int64(buf[o + P.IP_PROTOCOL]))
            return CT._slot(k0, k1, mask), k0, k1
    return np.int64(-1), np.uint64(0), np.uint64(0)


@njit(**JIT)
def process_batch(cfg, wk, buf, off, length, cap, mark, skbinfo, verdict, n, now_ns, tx):
    """Process packets 0..n-1 of a batch in place; fill verdict[i] (and length[i] if it
    changes). Also expires a bounded number of connections, more when the batch is empty.

    ``skbinfo[i]`` (uint8) is the packet's NFQA_SKB_INFO flags (consts.NFQA_SKB_*), 0 for a
    finished packet (every caller but the batched netlink backend passes zeros). A packet whose
    checksum the kernel left unfinished (CSUMNOTREADY) or that is GSO is rewritten like any other
    (the incremental checksum updates then produce garbage in its L4 check field), and a last
    pass writes that field from scratch in the form the kernel needs (csum.l4_settle) for every
    such packet with a REWRITE verdict; one that cannot be settled (a fragment) is dropped and
    counted (DROP_CSUM_PARTIAL). Packets held or sent on by SYN-proxy are settled before they are
    copied (_sp_hold); GSO packets are never held.

    The established-connection path is written out here, in one function body, on purpose:
    every numba call that passes arrays and branches inside costs NRT reference counting that
    LLVM cannot prune (about 150 ns per call on the reference machine, more than the whole
    packet). Everything rarer (new connections, ICMP, fragments, bad packets) calls out, with
    the tables borrowed (dataplane/borrow.py): otherwise each call that takes the Worker pays
    an atomic increment and decrement per array in it, about a microsecond.
    """
    cfg = borrow(cfg)
    wk = borrow(wk)
    tx = borrow(tx)
    p = np.zeros(P.N_P, np.int64)
    q = np.zeros(P.N_P, np.int64)
    conn = wk.conn
    idx = wk.idx
    stats = wk.stats
    active = wk.active
    inactive = wk.inactive
    svc_cnt = wk.svc_cnt
    dest_cnt = wk.dest_cnt
    timeouts = cfg.timeouts_ns
    sp_reuse = cfg.sp_cfg[SP.SPC_REUSE_STATES]
    mask = len(idx) - 1
    # Pass 1: start loading every packet's index slot, so the cache misses of a large table
    # overlap (a guess from fixed offsets: a packet that is not plain TCP/UDP wastes one).
    for i in range(n):
        j, k0, k1 = _guess_slot(buf, off[i], length[i], mask)
        if j >= 0:
            prefetch(idx, j)
    # Pass 2: find each packet's connection (its slot is in flight from pass 1) and start
    # loading its row, which pass 3 reads. The lookup is repeated there: a packet earlier in
    # the batch may create or free connections, so nothing found here is trusted later.
    for i in range(n):
        j, k0, k1 = _guess_slot(buf, off[i], length[i], mask)
        while j >= 0:
            w1 = idx[j, 1]
            if w1 == 0:
                break
            if idx[j, 0] == k0 and (w1 & T.IDX_KEY_MASK) == k1:
                prefetch_row(conn, CT.idx_val_of(w1) >> 1)
                break
            j = (j + 1) & mask
    for i in range(n):
        stats[C.STAT_PKTS] += 1
        o = off[i]
        plen = np.int64(length[i])
        # --- classify: IPv4, TCP/UDP, no later fragment, sane lengths -------------------------
        fast = plen >= 28
        proto = np.int64(0)
        ihl = np.int64(0)
        tot = np.int64(0)
        frag = np.int64(0)
        tflags = np.int64(0)
        if fast:
            vi = np.int64(buf[o])
            ihl = (vi & 0xF) * 4
            tot = rd16(buf, o + P.IP_TOT_LEN)
            frag = rd16(buf, o + P.IP_FRAG_OFF)
            proto = np.int64(buf[o + P.IP_PROTOCOL])
            fast = ((vi >> 4) == 4 and ihl >= 20 and tot >= ihl + 8 and tot <= plen
                    and (frag & P.IP_OFFSET) == 0)
            if fast and proto == C.IPPROTO_TCP:
                doff = (np.int64(buf[o + ihl + P.TCP_DOFF]) >> 4) * 4
                fast = tot - ihl >= 20 and doff >= 20 and doff <= tot - ihl
                tflags = np.int64(buf[o + ihl + P.TCP_FLAGS])
            elif fast and proto == C.IPPROTO_UDP:
                ulen = rd16(buf, o + ihl + P.UDP_LEN)
                fast = ulen >= 8 and (ulen <= tot - ihl or (frag & P.IP_MF) != 0)
            else:
                fast = False
        if not fast:
            verdict[i] = slow_path(cfg, wk, buf, o, plen, p, q, now_ns)
            continue
        l4 = o + ihl
        saddr = rd32(buf, o + P.IP_SADDR)
        daddr = rd32(buf, o + P.IP_DADDR)
        sport = rd16(buf, l4)
        dport = rd16(buf, l4 + 2)
        if ihl > 20:
            stats[C.STAT_IP_OPTIONS] += 1
        # --- connection lookup (either direction) ---------------------------------------------
        k0, k1 = CT.make_key(saddr, daddr, sport, dport, proto)
        j = CT._slot(k0, k1, mask)
        val = np.int64(0)
        while True:
            w1 = idx[j, 1]
            if w1 == 0:
                break
            if idx[j, 0] == k0 and (w1 & T.IDX_KEY_MASK) == k1:
                val = CT.idx_val_of(w1)
                break
            j = (j + 1) & mask
        if val != 0:
            c = conn[val >> 1]
            if c['expire_ns'] <= now_ns:
                stats[C.STAT_CONN_EXPIRED] += 1
                CT.conn_free(wk, val >> 1)
                val = 0
            elif ((val & 1) == C.DIR_IN and proto == C.IPPROTO_TCP
                    and (c['flags'] & C.CONN_F_SYNPROXY) != 0):
                # SYN-proxy entries: the synproxy_conn_reuse_* states decide (sp_reuse_ok).
                if (((sp_reuse >> np.int64(c['state'])) & 1) != 0
                        and sp_reuse_ok(cfg, wk, buf, o, tflags, now_ns)):
                    stats[C.STAT_SYNPROXY_CONN_REUSED] += 1
                    CT.conn_free(wk, val >> 1)
                    val = 0
            elif ((val & 1) == C.DIR_IN and proto == C.IPPROTO_TCP
                    and (tflags & (C.TH_SYN | C.TH_ACK | C.TH_RST)) == C.TH_SYN
                    and (c['state'] == C.IP_VS_TCP_S_TIME_WAIT or c['state'] == C.IP_VS_TCP_S_CLOSE)):
                # IPVS conn_reuse_mode 1: a new SYN on a finished connection opens a new one.
                stats[C.STAT_CONN_REUSED] += 1
                CT.conn_free(wk, val >> 1)
                val = 0
        if val == 0:
            r = new_conn(cfg, wk, proto, saddr, sport, daddr, dport, tflags, np.int64(mark[i]), now_ns)
            if r < 0:
                if r <= SP_MISS:
                    vv, nl = synproxy_miss(cfg, wk, buf, o, plen, np.int64(cap[i]), SP_MISS - r,
                                           tflags, now_ns, tx)
                    length[i] = nl
                    verdict[i] = vv
                    continue
                verdict[i] = -1 - r
                continue
            val = r
        cid = val >> 1
        direction = val & 1
        c = conn[cid]
        # SYN-proxy and FULLNAT connections are rewritten out of line (they may grow, hold or
        # drop packets); `called_out` then holds the new length, or < 0 to drop.
        called_out = np.int64(0)
        is_called_out = (c['flags'] & C.CONN_F_SYNPROXY) != 0
        if is_called_out:
            called_out = synproxy_conn(cfg, wk, buf, o, plen, np.int64(cap[i]), l4, direction,
                                       cid, tflags, now_ns, tx, np.int64(skbinfo[i]))
        # --- state machine and timeout (IPVS set_tcp_state) -----------------------------------
        st = np.int64(c['state'])
        if proto == C.IPPROTO_TCP and not is_called_out:
            ev = CT.tcp_event(tflags)
            if ev >= 0:
                ns = np.int64(C.TCP_STATES[(C.TCP_DIR_INPUT if direction == C.DIR_IN
                                            else C.TCP_DIR_OUTPUT) + ev, st])
                if ns != st:
                    d = c['dest']
                    if (c['flags'] & C.IP_VS_CONN_F_INACTIVE) == 0:
                        if ns != C.IP_VS_TCP_S_ESTABLISHED:
                            active[d] -= 1
                            inactive[d] += 1
                            c['flags'] |= C.IP_VS_CONN_F_INACTIVE
                    elif ns == C.IP_VS_TCP_S_ESTABLISHED:
                        active[d] += 1
                        inactive[d] -= 1
                        c['flags'] &= ~C.IP_VS_CONN_F_INACTIVE
                    c['state'] = ns
                    st = ns
        if not is_called_out:
            c['expire_ns'] = now_ns + timeouts[st]
            if c['flags'] & C.CONN_F_FULLNAT:
                is_called_out = True
                called_out = fnat_packet(cfg, wk, buf, o, plen, np.int64(cap[i]), l4, direction,
                                         cid, proto, tflags, now_ns)
        if is_called_out:
            if called_out < 0:
                verdict[i] = C.VERDICT_DROP
                continue
            length[i] = called_out
            if (frag & P.IP_MF) != 0:
                remember_fragment(wk, saddr, daddr, rd16(buf, o + P.IP_ID), proto, val, now_ns)
            _count(wk, np.int64(c['svc']), np.int64(c['dest']), direction, tot)
            stats[C.STAT_REWRITTEN] += 1
            verdict[i] = C.VERDICT_REWRITE
            continue
        # --- rewrite (masquerading), incremental checksums ------------------------------------
        ck = l4 + (P.TCP_CHECK if proto == C.IPPROTO_TCP else P.UDP_CHECK)
        ipck = rd16(buf, o + P.IP_CHECK)
        l4ck = rd16(buf, ck)
        if direction == C.DIR_IN:
            a_at = o + P.IP_DADDR
            old_a = daddr
            new_a = np.int64(c['daddr'])
            p_at = l4 + 2
            old_p = dport
            new_p = np.int64(c['dport'])
        else:
            a_at = o + P.IP_SADDR
            old_a = saddr
            new_a = np.int64(c['vaddr'])
            p_at = l4
            old_p = sport
            new_p = np.int64(c['vport'])
        wr32(buf, a_at, new_a)
        wr16(buf, p_at, new_p)
        wr16(buf, o + P.IP_CHECK, csum_replace4(ipck, old_a, new_a))
        if not (proto == C.IPPROTO_UDP and l4ck == 0):     # UDP without checksum stays so
            l4ck = csum_replace2(csum_replace4(l4ck, old_a, new_a), old_p, new_p)
            if proto == C.IPPROTO_UDP and l4ck == 0:
                l4ck = 0xFFFF
            wr16(buf, ck, l4ck)
        if (frag & P.IP_MF) != 0:
            remember_fragment(wk, saddr, daddr, rd16(buf, o + P.IP_ID), proto, val, now_ns)
        # --- counters -------------------------------------------------------------------------
        sv = c['svc']
        d = c['dest']
        col = T.CNT_INPKTS if direction == C.DIR_IN else T.CNT_OUTPKTS
        svc_cnt[sv, col] += 1
        svc_cnt[sv, col + 2] += tot
        dest_cnt[d, col] += 1
        dest_cnt[d, col + 2] += tot
        stats[C.STAT_REWRITTEN] += 1
        verdict[i] = C.VERDICT_REWRITE
    # Pass 4: finish the checksums the kernel left partial (see the docstring).
    for i in range(n):
        info = np.int64(skbinfo[i])
        if info != 0:
            if info & C.NFQA_SKB_GSO:
                stats[C.STAT_GSO_PACKETS] += 1
            if (info & SKB_SETTLE) != 0 and verdict[i] == C.VERDICT_REWRITE:
                r = l4_settle(buf, off[i], info)
                if r == SETTLE_DONE:
                    stats[C.STAT_CSUM_SETTLED] += 1
                elif r == SETTLE_CANNOT:
                    stats[C.DROP_CSUM_PARTIAL] += 1
                    verdict[i] = C.VERDICT_DROP
    CT.sweep(wk, cfg, now_ns, SWEEP_IDLE if n == 0 else SWEEP_PER_PACKET * n + 16)
    if wk.ctl[T.CTL_SP_SCAN_NS] <= now_ns:
        sp_retry_scan(cfg, wk, now_ns, tx)
