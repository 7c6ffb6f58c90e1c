"""The connection table: every change of a connection's existence or state happens here.

Theory of operation
-------------------
A connection (IPVS's ``struct ip_vs_conn``) is one row of ``Worker.conn``. It is created by the
pipeline when a client's first packet is scheduled, and is reachable from both directions through
two entries in the open-addressing index (see dataplane/tables.py for the keys). Its `state` moves
through IPVS's TCP state table (consts.TCP_STATES, copied verbatim from ip_vs_proto_tcp.c) on
every packet, and every packet pushes `expire_ns` to now + the timeout of the new state. UDP and
ICMP connections have a single state and timeout.

Expiry never stalls the packet path: `sweep` visits a bounded number of rows per batch, round
robin over the table, and frees those whose time has passed; a lookup that lands on an expired
row treats it as gone. A persistence template (IP_VS_CONN_F_TEMPLATE) outlives its timeout while
connections it placed are alive (`n_control`), as in IPVS.

The table is bounded: when the free stack is empty a new connection is refused and counted
(DROP_CONN_FULL) by the caller; established ones are unaffected.

Active/inactive counts per real server follow IPVS: a connection is active while ESTABLISHED
(TCP), inactive otherwise (flag IP_VS_CONN_F_INACTIVE); templates count in `persist`.
"""

import numpy as np
from numba import njit

from dataplane import consts as C
from dataplane import tables as T
from dataplane.csum import INLINE, JIT
from dataplane.fullnat import lport_free

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_S32 = np.uint64(32)
_S16 = np.uint64(16)
_S29 = np.uint64(29)
_ZERO64 = np.uint64(0)
_VAL_SHIFT = np.uint64(T.IDX_VAL_SHIFT)


@njit(**INLINE)
def make_key(saddr, daddr, sport, dport, proto):
    k0 = (np.uint64(saddr) << _S32) | np.uint64(daddr)
    k1 = (np.uint64(proto) << _S32) | (np.uint64(sport) << _S16) | np.uint64(dport)
    return k0, k1


@njit(**INLINE)
def _slot(k0, k1, mask):
    h = k0 * _M1 ^ (k1 + (k1 << _S16)) * _M2
    h ^= h >> _S29
    h *= _M1
    return np.int64(h >> _S32) & mask


@njit(**INLINE)
def idx_val_of(w1):
    """The value packed in an index entry's second word (0: empty slot)."""
    return np.int64(w1 >> _VAL_SHIFT)


@njit(**JIT)
def idx_lookup(wk, k0, k1):
    """Return idx_val (conn_id * 2 + dir) for the key, or 0."""
    idx = wk.idx
    mask = len(idx) - 1
    i = _slot(k0, k1, mask)
    while True:
        w1 = idx[i, 1]
        if w1 == 0:
            return np.int64(0)
        if idx[i, 0] == k0 and (w1 & T.IDX_KEY_MASK) == k1:
            return idx_val_of(w1)
        i = (i + 1) & mask


@njit(**JIT)
def idx_insert(wk, k0, k1, val):
    """Insert or overwrite; the table is sized so it never fills (2 entries per conn, load <= 1/2)."""
    idx = wk.idx
    mask = len(idx) - 1
    i = _slot(k0, k1, mask)
    while True:
        w1 = idx[i, 1]
        if w1 == 0 or (idx[i, 0] == k0 and (w1 & T.IDX_KEY_MASK) == k1):
            idx[i, 0] = k0
            idx[i, 1] = k1 | (np.uint64(val) << _VAL_SHIFT)
            return
        i = (i + 1) & mask


@njit(**JIT)
def idx_delete(wk, k0, k1, val):
    """Delete the entry for key if it still points at val; backward-shift the probe chain so no
    tombstones accumulate (Knuth's algorithm R for linear probing)."""
    idx = wk.idx
    mask = len(idx) - 1
    i = _slot(k0, k1, mask)
    while True:
        w1 = idx[i, 1]
        if w1 == 0:
            return
        if idx[i, 0] == k0 and (w1 & T.IDX_KEY_MASK) == k1:
            if idx_val_of(w1) != val:
                return      # the key was reused by a newer connection: leave it
            break
        i = (i + 1) & mask
    j = i
    while True:
        idx[i, 1] = _ZERO64
        while True:
            j = (j + 1) & mask
            w1 = idx[j, 1]
            if w1 == 0:
                return
            home = _slot(idx[j, 0], w1 & T.IDX_KEY_MASK, mask)
            # Move j back to i unless its home lies cyclically in (i, j].
            if i <= j:
                if i < home <= j:
                    continue
            else:
                if home <= j or home > i:
                    continue
            break
        idx[i, 0] = idx[j, 0]
        idx[i, 1] = idx[j, 1]
        i = j


@njit(**JIT)
def in_key(wk, cid):
    c = wk.conn[cid]
    if c['flags'] & C.IP_VS_CONN_F_TEMPLATE:
        return make_key(c['caddr'], c['vaddr'], 0, c['vport'], np.int64(c['proto']) | T.TEMPLATE_KEY_BIT)
    return make_key(c['caddr'], c['vaddr'], c['cport'], c['vport'], c['proto'])


@njit(**JIT)
def out_key(wk, cid):
    c = wk.conn[cid]
    if c['flags'] & C.CONN_F_FULLNAT:
        return make_key(c['daddr'], c['laddr'], c['dport'], c['lport'], c['proto'])
    return make_key(c['daddr'], c['caddr'], c['dport'], c['cport'], c['proto'])


@njit(**JIT)
def conn_alloc(wk):
    """Pop a free connection id, or 0 when the table is full."""
    top = wk.ctl[T.CTL_FREE_TOP]
    if top <= 0:
        return np.int64(0)
    top -= 1
    wk.ctl[T.CTL_FREE_TOP] = top
    return np.int64(wk.free[top])


@njit(**JIT)
def conn_new(wk, cfg, svc_id, dest_id, proto, caddr, cport, vaddr, vport, now_ns, template,
             laddr_id, lport):
    """Create a connection (client side keys from the packet, real server from dest_id), insert
    both index entries and count it. laddr_id/lport != 0 make it a FULLNAT connection (the port
    is already taken from the worker's ring; conn_free gives it back). Returns the id, or 0
    when the table is full."""
    cid = conn_alloc(wk)
    if cid == 0:
        return cid
    d = cfg.dest[dest_id]
    c = wk.conn[cid]
    c['caddr'] = caddr
    c['cport'] = cport
    c['vaddr'] = vaddr
    c['vport'] = vport
    c['daddr'] = d['addr']
    # A port-0 (all ports) persistent service keeps the client's destination port.
    c['dport'] = d['port'] if d['port'] != 0 else vport
    c['laddr'] = cfg.laddr[laddr_id] if laddr_id != 0 else 0
    c['lport'] = lport
    c['laddr_id'] = laddr_id
    c['pp_len'] = 0
    c['proto'] = proto
    c['svc'] = svc_id
    c['dest'] = dest_id
    c['n_control'] = 0
    c['template'] = template
    c['seq_delta_in'] = 0
    c['seq_delta_out'] = 0
    c['aux'] = 0
    c['ts_delta'] = 0
    c['ts_off'] = 0
    if proto == C.IPPROTO_TCP:
        c['state'] = C.IP_VS_TCP_S_NONE
    elif proto == C.IPPROTO_UDP:
        c['state'] = C.IP_VS_UDP_S_NORMAL
    else:
        c['state'] = C.IP_VS_ICMP_S_NORMAL
    c['expire_ns'] = now_ns + cfg.timeouts_ns[c['state']]
    # New connections count as active until the state machine says otherwise (ip_vs_bind_dest).
    c['flags'] = C.CONN_F_IN_USE | (C.CONN_F_FULLNAT if laddr_id != 0 else 0)
    if laddr_id != 0:
        wk.laddr_conns[laddr_id] += 1
    wk.active[dest_id] += 1
    if template != 0:
        wk.conn[template]['n_control'] += 1
    k0, k1 = in_key(wk, cid)
    idx_insert(wk, k0, k1, cid * 2 + C.DIR_IN)
    k0, k1 = out_key(wk, cid)
    idx_insert(wk, k0, k1, cid * 2 + C.DIR_OUT)
    wk.ctl[T.CTL_N_CONNS] += 1
    wk.stats[C.STAT_CONN_NEW] += 1
    wk.svc_cnt[svc_id, T.CNT_CONNS] += 1
    wk.dest_cnt[dest_id, T.CNT_CONNS] += 1
    return cid


@njit(**JIT)
def template_new(wk, svc_id, dest_id, proto, caddr_masked, vaddr, vport, timeout_ns, now_ns):
    cid = conn_alloc(wk)
    if cid == 0:
        return cid
    c = wk.conn[cid]
    c['caddr'] = caddr_masked
    c['cport'] = 0
    c['vaddr'] = vaddr
    c['vport'] = vport
    c['daddr'] = 0
    c['dport'] = 0
    c['laddr'] = 0
    c['lport'] = 0
    c['proto'] = proto
    c['state'] = C.IP_VS_TCP_S_NONE
    c['svc'] = svc_id
    c['dest'] = dest_id
    c['n_control'] = 0
    c['template'] = 0
    c['expire_ns'] = now_ns + timeout_ns
    c['flags'] = C.CONN_F_IN_USE | C.IP_VS_CONN_F_TEMPLATE
    k0, k1 = in_key(wk, cid)
    idx_insert(wk, k0, k1, cid * 2 + C.DIR_IN)
    wk.persist[dest_id] += 1
    wk.ctl[T.CTL_N_CONNS] += 1
    wk.ctl[T.CTL_N_TEMPLATES] += 1
    wk.stats[C.STAT_TEMPLATE_NEW] += 1
    return cid


@njit(**JIT)
def conn_free(wk, cid):
    """Remove a connection or template: index entries, counts, back on the free stack."""
    c = wk.conn[cid]
    flags = c['flags']
    if flags == 0:
        return
    dest_id = c['dest']
    k0, k1 = in_key(wk, cid)
    idx_delete(wk, k0, k1, cid * 2 + C.DIR_IN)
    if flags & C.IP_VS_CONN_F_TEMPLATE:
        wk.persist[dest_id] -= 1
        wk.ctl[T.CTL_N_TEMPLATES] -= 1
    else:
        k0, k1 = out_key(wk, cid)
        idx_delete(wk, k0, k1, cid * 2 + C.DIR_OUT)
        if flags & C.IP_VS_CONN_F_INACTIVE:
            wk.inactive[dest_id] -= 1
        else:
            wk.active[dest_id] -= 1
        t = c['template']
        if t != 0 and wk.conn[t]['flags'] != 0:
            wk.conn[t]['n_control'] -= 1
        if flags & C.CONN_F_FULLNAT:
            lid = np.int64(c['laddr_id'])
            lport_free(wk.lport_fifo, wk.lport_head, wk.lport_count, lid, np.int64(c['lport']))
            wk.laddr_conns[lid] -= 1
    c['flags'] = 0
    wk.ctl[T.CTL_N_CONNS] -= 1
    top = wk.ctl[T.CTL_FREE_TOP]
    wk.free[top] = cid
    wk.ctl[T.CTL_FREE_TOP] = top + 1


@njit(**INLINE)
def tcp_event(tcp_flags):
    """IPVS's tcp_state_idx: rst wins, then syn, fin, ack."""
    if tcp_flags & C.TH_RST:
        return C.TCP_EV_RST
    if tcp_flags & C.TH_SYN:
        return C.TCP_EV_SYN
    if tcp_flags & C.TH_FIN:
        return C.TCP_EV_FIN
    if tcp_flags & C.TH_ACK:
        return C.TCP_EV_ACK
    return C.TCP_EV_NONE


@njit(**JIT)
def set_state(wk, cid, new_state):
    """Move a connection to new_state, keeping the real server's active/inactive counts."""
    c = wk.conn[cid]
    if new_state == c['state']:
        return
    d = c['dest']
    inactive = (c['flags'] & C.IP_VS_CONN_F_INACTIVE) != 0
    if not inactive and new_state != C.IP_VS_TCP_S_ESTABLISHED:
        wk.active[d] -= 1
        wk.inactive[d] += 1
        c['flags'] |= C.IP_VS_CONN_F_INACTIVE
    elif inactive and new_state == C.IP_VS_TCP_S_ESTABLISHED:
        wk.active[d] += 1
        wk.inactive[d] -= 1
        c['flags'] &= ~C.IP_VS_CONN_F_INACTIVE
    c['state'] = new_state


@njit(**JIT)
def tcp_transition(wk, cfg, cid, direction, tcp_flags, now_ns):
    """Advance the TCP state machine for one packet in `direction` and re-arm the timeout."""
    c = wk.conn[cid]
    ev = tcp_event(tcp_flags)
    if ev >= 0:
        off = C.TCP_DIR_INPUT if direction == C.DIR_IN else C.TCP_DIR_OUTPUT
        set_state(wk, cid, np.int64(C.TCP_STATES[off + ev, c['state']]))
    c['expire_ns'] = now_ns + cfg.timeouts_ns[c['state']]


@njit(**JIT)
def is_new_conn_expected(c):
    """IPVS conn_reuse_mode 1: a SYN on a TIME_WAIT or CLOSE connection opens a new one."""
    return (c['proto'] == C.IPPROTO_TCP and
            (c['state'] == C.IP_VS_TCP_S_TIME_WAIT or c['state'] == C.IP_VS_TCP_S_CLOSE))


@njit(**JIT)
def sweep(wk, cfg, now_ns, budget):
    """Visit up to `budget` rows from the cursor; free expired connections and templates."""
    n = len(wk.conn)
    i = wk.ctl[T.CTL_SWEEP]
    freed = 0
    for _ in range(budget):
        i += 1
        if i >= n:
            i = 1
        c = wk.conn[i]
        if c['flags'] != 0 and c['expire_ns'] <= now_ns:
            if (c['flags'] & C.IP_VS_CONN_F_TEMPLATE) and c['n_control'] > 0:
                # Still controls live connections: re-arm, as ip_vs_conn_expire does.
                svc = cfg.svc[c['svc']]
                c['expire_ns'] = now_ns + np.int64(svc['persist_timeout_s']) * C.NS
                continue
            conn_free(wk, i)
            freed += 1
    wk.ctl[T.CTL_SWEEP] = i
    wk.stats[C.STAT_CONN_EXPIRED] += freed
    return freed


@njit(**JIT)
def flush(wk):
    """Free every connection (used when the control plane removes everything)."""
    for i in range(1, len(wk.conn)):
        if wk.conn[i]['flags'] != 0:
            conn_free(wk, i)
