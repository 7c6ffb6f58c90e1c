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
from dataplane import consts as C
from dataplane import nat as N
from dataplane import parse as P
from dataplane import tables as T
from dataplane.csum import JIT
from dataplane.sched import schedule

SWEEP_PER_PACKET = 2
SWEEP_IDLE = 4096
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
def process_packet(cfg, wk, buf, o, length, mark, now_ns, p, q):
    """Run one packet through the stages; return its verdict."""
    st = P.parse_packet(buf, o, length, p)
    if st == P.PARSE_NOT_IPV4:
        wk.stats[C.STAT_NOT_OURS] += 1
        return C.VERDICT_ACCEPT
    if st != P.PARSE_OK:
        wk.stats[C.DROP_MALFORMED] += 1
        return C.VERDICT_DROP
    if p[P.P_IHL] > 20:
        wk.stats[C.STAT_IP_OPTIONS] += 1
    proto = p[P.P_PROTO]
    l4 = p[P.P_L4OFF]
    nbytes = p[P.P_TOTLEN]

    if proto == C.IPPROTO_ICMP:
        return _icmp(cfg, wk, buf, o, p, q)
    if proto != C.IPPROTO_TCP and proto != C.IPPROTO_UDP:
        wk.stats[C.STAT_NOT_OURS] += 1
        return C.VERDICT_ACCEPT
    if p[P.P_FRAG] != 0 and p[P.P_FRAG_FIRST] == 0:
        # A later fragment carries no ports, so it cannot be matched to a connection. The
        # kernel reassembles before the raw table when conntrack is loaded (our CT rule loads
        # it), so this is rare: drop it if it is for a service address, count it either way.
        wk.stats[C.DROP_FRAGMENT] += 1
        return C.VERDICT_DROP

    saddr = p[P.P_SADDR]
    daddr = p[P.P_DADDR]
    sport = p[P.P_SPORT]
    dport = p[P.P_DPORT]
    tflags = p[P.P_TCPFLAGS]
    l4_complete = p[P.P_FRAG] == 0

    k0, k1 = CT.make_key(saddr, daddr, sport, dport, proto)
    v = CT.idx_lookup(wk, k0, k1)
    cid = np.int64(0)
    direction = C.DIR_IN
    if v != 0:
        cid = v >> 1
        direction = v & 1
        c = wk.conn[cid]
        expired = c['expire_ns'] <= now_ns
        reuse = (direction == C.DIR_IN and proto == C.IPPROTO_TCP
                 and (tflags & (C.TH_SYN | C.TH_ACK | C.TH_RST)) == C.TH_SYN
                 and CT.is_new_conn_expected(c))
        if expired or reuse:
            if reuse:
                wk.stats[C.STAT_CONN_REUSED] += 1
            else:
                wk.stats[C.STAT_CONN_EXPIRED] += 1
            CT.conn_free(wk, cid)
            cid = 0
            direction = C.DIR_IN

    if cid == 0:
        svc_id = svc_lookup(cfg, proto, daddr, dport, np.int64(mark))
        if svc_id == 0:
            wk.stats[C.STAT_NOT_OURS] += 1
            return C.VERDICT_ACCEPT
        if proto == C.IPPROTO_TCP and (tflags & (C.TH_SYN | C.TH_ACK | C.TH_RST)) != C.TH_SYN:
            wk.stats[C.STAT_NOT_SYN] += 1
            return C.VERDICT_ACCEPT
        d, template = pick_dest(cfg, wk, svc_id, proto, saddr, sport, daddr, dport, now_ns)
        if d == 0:
            wk.stats[C.DROP_NO_DEST] += 1
            return C.VERDICT_DROP
        if d < 0:
            wk.stats[C.DROP_CONN_FULL] += 1
            return C.VERDICT_DROP
        cid = CT.conn_new(wk, cfg, svc_id, d, proto, saddr, sport, daddr, dport, now_ns, template)
        if cid == 0:
            wk.stats[C.DROP_CONN_FULL] += 1
            return C.VERDICT_DROP

    c = wk.conn[cid]
    if proto == C.IPPROTO_TCP:
        CT.tcp_transition(wk, cfg, cid, direction, tflags, now_ns)
    else:
        c['expire_ns'] = now_ns + cfg.timeouts_ns[c['state']]
    N.nat_rewrite(buf, o, proto, l4, l4_complete, direction, c)
    _count(wk, np.int64(c['svc']), np.int64(c['dest']), direction, nbytes)
    wk.stats[C.STAT_REWRITTEN] += 1
    return C.VERDICT_REWRITE


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


@njit(**JIT)
def process_batch(cfg, wk, buf, off, length, cap, mark, verdict, n, now_ns, tx):
    """Process packets 0..n-1 of a batch in place; fill verdict[i] (and length[i] if it
    changes). Also expires a bounded number of connections, more when the batch is empty."""
    p = np.zeros(P.N_P, np.int64)
    q = np.zeros(P.N_P, np.int64)
    for i in range(n):
        wk.stats[C.STAT_PKTS] += 1
        verdict[i] = process_packet(cfg, wk, buf, off[i], np.int64(length[i]),
                                    np.int64(mark[i]), now_ns, p, q)
    CT.sweep(wk, cfg, now_ns, SWEEP_IDLE if n == 0 else SWEEP_PER_PACKET * n + 16)
