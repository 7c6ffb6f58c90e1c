"""Every table the data plane reads or writes, declared once.

Two groups, as in Katran's split of maps:

* ``Config`` — owned by the control plane (control/apply.py writes it, in place, slot by slot);
  the data plane only reads it. Services, real servers (``dest``, IPVS's name), the per-service
  list of real servers, the lookup rings of sh/dh/mh, the service hash and the timeouts.
* ``Worker`` — owned by one data-plane worker (one NFQUEUE queue, one thread): the connection
  table and its two-way index, scheduler cursors, active/inactive connection counts, and counters.
  The control plane only reads it (``lvs-dp list``) and sums the counters over workers.

All ids are dense and 0 means "unset": service 0 and dest 0 are never used, connection 0 is never
handed out. Addresses are IPv4 in host byte order (uint32), ports in host order (uint16).

The connection index is open addressing with linear probing over ``idx``, uint64[size, 2]: one
16-byte entry per slot, so a probe costs one cache line (three parallel arrays cost three, which
dominated a lookup in a table of a million connections). Every connection has two entries, one per
direction, so a packet from either side finds it with one lookup:

* in  (client side):      key(caddr, vaddr, cport, vport, proto)
* out (real-server side): key(daddr, caddr, dport, cport, proto)     NAT
                          key(daddr, laddr, dport, lport, proto)     FULLNAT
* persistence template:   key(caddr & mask, vaddr, 0, vport, proto | TEMPLATE_KEY_BIT)

An entry is ``(k0, k1 | val << IDX_VAL_SHIFT)``: k0 is the first word of the key, k1 (41 bits:
proto and the template bit, ports) the second, and ``val = conn_id * 2 + direction`` fills the
top 23 bits (0 marks an empty slot, since conn ids start at 1); hence MAX_CONNS.
Deletion shifts later entries back (no tombstones), so lookups never slow down with churn.
"""

import mmap
from collections import namedtuple

import numpy as np

from dataplane import consts as C

MAX_SVC = 256           # service ids 1..255
MAX_DEST = 4096         # real-server ids 1..4095 (over all services, sorry servers included)
MAX_DEST_PER_SVC = 256
SVC_HASH_SIZE = 1024    # power of two, >= 2 * MAX_SVC
MAX_LADDR = 256         # FULLNAT local addresses over all pools (ids 1..255, shared by services)
MAX_LADDR_PER_SVC = 64
TEMPLATE_KEY_BIT = 0x100
IDX_VAL_SHIFT = 41                          # k1 = (proto | TEMPLATE_KEY_BIT) << 32 | ports: 41 bits
IDX_KEY_MASK = np.uint64((1 << IDX_VAL_SHIFT) - 1)
MAX_CONNS = (1 << (64 - IDX_VAL_SHIFT - 1)) - 1     # conn_id * 2 + 1 must fit the 23 value bits

SERVICE_DTYPE = np.dtype([
    ("proto", np.uint8),        # IPPROTO_TCP / IPPROTO_UDP; 0 = slot unused
    ("fwd", np.uint8),          # FWD_* of the service (each real server has its own too)
    ("sched", np.uint8),        # SCHED_*
    ("n_dests", np.uint8),      # entries used in Config.svc_dests[svc] (<= 255)
    ("addr", np.uint32),        # VIP (0 for a fwmark service)
    ("fwmark", np.uint32),      # firewall mark (0 for an addr:port service)
    ("port", np.uint16),        # virtual port (0 = any port, persistent port-0 service)
    ("sorry_dest", np.uint16),  # dest id of the sorry server, 0 = none
    ("flags", np.uint32),       # SVC_F_*
    ("persist_timeout_s", np.uint32),
    ("persist_mask", np.uint32),    # persistence_granularity as a mask, host order
    ("n_laddrs", np.uint16),        # FULLNAT: entries used in Config.svc_laddrs[svc]
    ("laddr_rr", np.uint16),        # reserved (the round-robin cursor is per worker)
    ("gen", np.uint32),             # bumped by control on every change (diagnostics)
])

DEST_DTYPE = np.dtype([
    ("svc", np.uint16),         # owning service id; 0 = slot unused
    ("fwd", np.uint8),          # FWD_*
    ("_pad", np.uint8),
    ("addr", np.uint32),
    ("port", np.uint16),
    ("_pad2", np.uint16),
    ("weight", np.int32),       # 0 = quiesced: no new connections, established ones continue
    ("flags", np.uint32),       # DEST_F_*
    ("u_threshold", np.uint32), # ipvsadm -x: no new connections above this many (0 = no limit)
    ("l_threshold", np.uint32),
])

CONN_DTYPE = np.dtype([
    ("caddr", np.uint32), ("vaddr", np.uint32), ("daddr", np.uint32), ("laddr", np.uint32),
    ("cport", np.uint16), ("vport", np.uint16), ("dport", np.uint16), ("lport", np.uint16),
    ("proto", np.uint8),
    ("state", np.uint8),        # IP_VS_TCP_S_* / IP_VS_UDP_S_NORMAL
    ("flags", np.uint16),       # IP_VS_CONN_F_* / CONN_F_*; 0 = slot free
    ("svc", np.uint16),
    ("dest", np.uint16),
    ("n_control", np.int32),    # templates: connections placed by this template still alive
    ("template", np.uint32),    # the template that placed this connection, 0 = none
    ("expire_ns", np.int64),
    # Sequence translation (FULLNAT insertion, SYN-proxy): deltas added to seq in the `in`
    # direction and subtracted from ack in the `out` direction, and the reverse.
    ("seq_delta_in", np.uint32),
    ("seq_delta_out", np.uint32),
    ("aux", np.uint32),         # FULLNAT: the client's ISN (PROXY/TOA stream start)
    ("laddr_id", np.uint16),    # FULLNAT: row of Config.laddr, to give the port back
    ("pp_len", np.uint8),       # FULLNAT: length of the PROXY protocol header (0 = none)
    ("_pad3", np.uint8),
    # SYN-proxy (CONN_F_SYNPROXY; dataplane/synproxy.py). ESTABLISHED: the RS's TS values are
    # shifted by ts_delta towards the client, windows by the shifts; sp_* is the ACK-storm
    # detector. SYN_SENT borrows them: ts_delta = our SYN-ACK's TS value (tb), sp_last_seq =
    # the client's TS value, sp_last_ack = synproxy.hs_pack(...), seq_delta_out = the cookie.
    ("ts_delta", np.uint32),
    ("sp_last_seq", np.uint32),
    ("sp_last_ack", np.uint32),
    ("sp_dup_acks", np.uint8),
    ("win_shift_out", np.int8),     # RS -> client window rescale (ws_rs - ws offered)
    ("win_shift_in", np.int8),      # client -> RS (the client's shift when the RS declined)
    ("_pad4", np.uint8),
    ("sp_syn_ns", np.int64),        # SYN_SENT: when the last SYN went to the RS (retries)
    # FULLNAT timestamp translation (CONN_F_TS_XLATE): client -> RS TS value += ts_off, RS ->
    # client TS echo -= ts_off; chosen at the SYN so the RS sees its local address's clock.
    ("ts_off", np.uint32),
])

# Columns of the [n, 5] counter arrays of services and real servers, ipvsadm's --stats order.
CNT_CONNS, CNT_INPKTS, CNT_OUTPKTS, CNT_INBYTES, CNT_OUTBYTES = range(5)
N_CNT = 5

# Worker.ctl slots
CTL_FREE_TOP = 0        # number of ids on the free stack
CTL_SWEEP = 1           # expiry sweep cursor into conn[]
CTL_N_CONNS = 2         # live connections (templates included)
CTL_N_TEMPLATES = 3
CTL_WORKER = 4          # this worker's index and the worker count: which local ports it owns
CTL_N_WORKERS = 5
CTL_LPORT_LO = 6
CTL_LPORT_HI = 7
CTL_SP_SCAN_NS = 8      # SYN-proxy: when the next RS SYN retry scan is due (pipeline.sp_retry_scan)
N_CTL = 9

# Per-service scheduler state columns in Worker.sched (int64)
SS_RR_POS = 0           # rr/wrr: position in svc_dests
SS_WRR_CW = 1           # wrr: current weight
N_SS = 4

Config = namedtuple("Config", [
    "svc",          # SERVICE_DTYPE[MAX_SVC]
    "dest",         # DEST_DTYPE[MAX_DEST]
    "svc_dests",    # uint16[MAX_SVC, MAX_DEST_PER_SVC]: dest ids of each service, in config order
    "ring",         # uint16[MAX_SVC, RING_SIZE]: sh/dh/mh lookup (dest ids), built by control
    "svc_hkey",     # uint64[SVC_HASH_SIZE]: service key (see svc_key), 0 = empty
    "svc_hval",     # uint16[SVC_HASH_SIZE]: service id
    "timeouts_ns",  # int64[N_STATES]
    "laddr",        # uint32[MAX_LADDR]: FULLNAT local addresses by laddr id (0 unused)
    "svc_laddrs",   # uint16[MAX_SVC, MAX_LADDR_PER_SVC]: laddr ids of each FULLNAT service's pool
    # SYN-proxy (dataplane/synproxy.py): cookie secrets, two generations (current first; control
    # rotates row 1 <- row 0, then a new row 0, at most once per cookie lifetime), and the
    # settings row from control/synproxy_settings.py (SynproxySettings().as_array()).
    "sp_secrets",   # uint64[2, 4]
    "sp_cfg",       # int64[N_SPC]
])

Worker = namedtuple("Worker", [
    "conn",         # CONN_DTYPE[max_conns + 1]
    "free",         # int32[max_conns]: stack of free conn ids
    "idx",          # uint64[idx_size, 2]: (saddr << 32 | daddr,
                    #   conn_id * 2 + direction << 41 | proto << 32 | sport << 16 | dport), 0 = empty
    "ctl",          # int64[N_CTL]
    "sched",        # int64[MAX_SVC, N_SS]
    "active",       # int32[MAX_DEST]: activeconns (ESTABLISHED)
    "inactive",     # int32[MAX_DEST]: inactconns
    "persist",      # int32[MAX_DEST]: templates pointing at the dest (ipvsadm's PersistConn)
    "svc_cnt",      # uint64[MAX_SVC, N_CNT]
    "dest_cnt",     # uint64[MAX_DEST, N_CNT]
    "stats",        # uint64[N_STATS]: drop reasons and global counters (consts.DROP_* / STAT_*)
    # Later fragments carry no ports: the first fragment's connection is remembered here by
    # (saddr, daddr, IP id, proto), direct-mapped (make_key(saddr, daddr, id, 0, proto)).
    "frag_k0",      # uint64[FRAG_SLOTS]
    "frag_k1",      # uint64[FRAG_SLOTS]
    "frag_val",     # uint32[FRAG_SLOTS]: conn_id * 2 + direction
    "frag_exp",     # int64[FRAG_SLOTS]: expiry, ns
    # FULLNAT local ports (dataplane/fullnat.py): per laddr id a ring of the free ports this
    # worker owns (replies are steered to the worker by their destination port = lport).
    "lport_fifo",   # uint16[MAX_LADDR, ports owned]
    "lport_head",   # int32[MAX_LADDR]
    "lport_count",  # int32[MAX_LADDR]: free ports
    "laddr_rr",     # int32[MAX_SVC]: round-robin cursor into Config.svc_laddrs
    "laddr_conns",  # int32[MAX_LADDR]: live connections per local address
    "scratch",      # uint8[256]: PROXY headers are built here before insertion
    # SYN-proxy wait slots: a connection waiting for its real server's SYN-ACK (SYN_SENT) takes
    # one, found by linear probing from cid & (SP_WAIT_SLOTS - 1) over at most SP_WAIT_PROBE
    # slots. It lists the connection for the periodic SYN retry scan and holds up to
    # SPC_ACK_STORE_MAX (<= SP_HOLD_SEGS) client segments with data or FIN, sent on (translated,
    # through Tx, in arrival order) right after the ACK that completes the real server's
    # handshake (the patch's cp->ack_skb queue). A connection that finds no slot still works,
    # without held segments or timed retries (STAT_SYNPROXY_NO_WAIT_SLOT). Freed on the SYN-ACK,
    # on abort, or found stale (its connection no longer SYN_SENT) by the next claim or scan.
    "sp_wait_cid",  # int64[SP_WAIT_SLOTS]: owning connection, 0 = free
    "sp_hold_n",    # int32[SP_WAIT_SLOTS]: segments held
    "sp_hold_len",  # int32[SP_WAIT_SLOTS, SP_HOLD_SEGS]
    "sp_hold",      # uint8[SP_WAIT_SLOTS, SP_HOLD_SEGS, SP_HOLD_BYTES] (pages touched on use)
])
SP_WAIT_SLOTS = 1024
SP_WAIT_PROBE = 8
SP_HOLD_SEGS = 5        # the patch's synproxy_ack_skb_store_thresh maximum
SP_HOLD_BYTES = 2048
FRAG_SLOTS = 4096
FRAG_TIMEOUT_NS = 30 * C.NS     # the kernel's ipfrag_time default


Tx = namedtuple("Tx", [
    "buf",          # uint8[slots * TX_SLOT]: packets the engine generates (SYN-proxy, RSTs)
    "off",          # int64[slots]
    "length",       # int32[slots]
    "count",        # int64[1]: packets waiting; the backend sends them and resets it to 0
])
TX_SLOT = 2048


def new_tx(slots=256):
    return Tx(buf=np.zeros(slots * TX_SLOT, np.uint8),
              off=np.arange(slots, dtype=np.int64) * TX_SLOT,
              length=np.zeros(slots, np.int32), count=np.zeros(1, np.int64))


def svc_key(proto, addr, port):
    """Key of an addr:port service in the service hash (fwmark services use fwmark_key)."""
    return (int(proto) << 48) | (int(port) << 32) | int(addr)


def fwmark_key(fwmark):
    return (1 << 56) | int(fwmark)


def new_config():
    return Config(
        svc=np.zeros(MAX_SVC, SERVICE_DTYPE),
        dest=np.zeros(MAX_DEST, DEST_DTYPE),
        svc_dests=np.zeros((MAX_SVC, MAX_DEST_PER_SVC), np.uint16),
        ring=np.zeros((MAX_SVC, C.RING_SIZE), np.uint16),
        svc_hkey=np.zeros(SVC_HASH_SIZE, np.uint64),
        svc_hval=np.zeros(SVC_HASH_SIZE, np.uint16),
        timeouts_ns=C.DEFAULT_TIMEOUTS_S * C.NS,
        laddr=np.zeros(MAX_LADDR, np.uint32),
        svc_laddrs=np.zeros((MAX_SVC, MAX_LADDR_PER_SVC), np.uint16),
        sp_secrets=new_sp_secrets(),
        sp_cfg=_default_sp_cfg(),
    )


def new_sp_secrets():
    """Two random generations of SYN-cookie keys (uint64[2, 4])."""
    import secrets
    return np.array([[secrets.randbits(64) for _ in range(4)] for _ in range(2)], np.uint64)


def rotate_sp_secrets(cfg):
    """Row 1 <- row 0, then a new random row 0, in place (workers read it as they run: a cookie
    checked during the copy fails at worst, and the client retransmits its ACK)."""
    import secrets
    cfg.sp_secrets[1, :] = cfg.sp_secrets[0, :]
    cfg.sp_secrets[0, :] = np.array([secrets.randbits(64) for _ in range(4)], np.uint64)


def _default_sp_cfg():
    from control.synproxy_settings import SynproxySettings
    return SynproxySettings().as_array()


HUGE_MIN_BYTES = 4 << 20


def table_zeros(shape, dtype):
    """np.zeros, but a large table gets transparent huge pages (2 MiB) where the kernel offers
    them on request (``transparent_hugepage/enabled = madvise``, Debian's default): lookups land
    on random rows of a table far larger than the TLB covers with 4 KiB pages, and a page walk
    per packet was a third of the established-packet cost with a million connections."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes < HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(shape, dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass        # THP disabled ("never"): the mapping still works with small pages
    return np.frombuffer(m, dtype, count=int(np.prod(shape))).reshape(shape)   # zero-filled


def idx_vals(wk):
    """The value (conn_id * 2 + direction, 0 = empty) of every index slot, for tests and tools."""
    return (wk.idx[:, 1] >> np.uint64(IDX_VAL_SHIFT)).astype(np.int64)


def index_size_for(max_conns):
    """Two index entries per connection at a load factor of at most 1/2."""
    size = 16
    while size < 4 * max_conns:
        size <<= 1
    return size


LPORT_LO = 5000     # default FULLNAT local port range (the patched kernel's fullnat_lport_min/max)
LPORT_HI = 65535


def new_worker(max_conns=1 << 20, worker=0, n_workers=1, port_lo=LPORT_LO, port_hi=LPORT_HI):
    from dataplane.fullnat import lport_capacity
    if not 1 <= max_conns <= MAX_CONNS:
        raise ValueError(f"max_conns {max_conns}: must be 1..{MAX_CONNS} (index value bits)")
    idx_size = index_size_for(max_conns)
    free = np.arange(max_conns, 0, -1, dtype=np.int32)    # pop from the end: ids 1, 2, 3 ...
    ctl = np.zeros(N_CTL, np.int64)
    ctl[CTL_FREE_TOP] = max_conns
    ctl[CTL_WORKER] = worker
    ctl[CTL_N_WORKERS] = n_workers
    ctl[CTL_LPORT_LO] = port_lo
    ctl[CTL_LPORT_HI] = port_hi
    return Worker(
        conn=table_zeros(max_conns + 1, CONN_DTYPE),
        free=free,
        idx=table_zeros((idx_size, 2), np.uint64),
        ctl=ctl,
        sched=np.zeros((MAX_SVC, N_SS), np.int64),
        active=np.zeros(MAX_DEST, np.int32),
        inactive=np.zeros(MAX_DEST, np.int32),
        persist=np.zeros(MAX_DEST, np.int32),
        svc_cnt=np.zeros((MAX_SVC, N_CNT), np.uint64),
        dest_cnt=np.zeros((MAX_DEST, N_CNT), np.uint64),
        stats=np.zeros(C.N_STATS, np.uint64),
        frag_k0=np.zeros(FRAG_SLOTS, np.uint64),
        frag_k1=np.zeros(FRAG_SLOTS, np.uint64),
        frag_val=np.zeros(FRAG_SLOTS, np.uint32),
        frag_exp=np.zeros(FRAG_SLOTS, np.int64),
        lport_fifo=np.zeros((MAX_LADDR, lport_capacity(port_lo, port_hi, worker, n_workers)),
                            np.uint16),
        lport_head=np.zeros(MAX_LADDR, np.int32),
        lport_count=np.zeros(MAX_LADDR, np.int32),
        laddr_rr=np.zeros(MAX_SVC, np.int32),
        laddr_conns=np.zeros(MAX_LADDR, np.int32),
        scratch=np.zeros(256, np.uint8),
        sp_wait_cid=np.zeros(SP_WAIT_SLOTS, np.int64),
        sp_hold_n=np.zeros(SP_WAIT_SLOTS, np.int32),
        sp_hold_len=np.zeros((SP_WAIT_SLOTS, SP_HOLD_SEGS), np.int32),
        sp_hold=np.zeros((SP_WAIT_SLOTS, SP_HOLD_SEGS, SP_HOLD_BYTES), np.uint8),
    )


def ip2int(s):
    a, b, c, d = (int(x) for x in s.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def int2ip(n):
    n = int(n)
    return f"{n >> 24 & 255}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def init_laddr(wk, laddr_id):
    """Give a new local address its ring of free ports in this worker (called by the control
    plane before any service's pool refers to the address)."""
    from dataplane.fullnat import lport_init
    lport_init(wk.lport_fifo, wk.lport_head, wk.lport_count, laddr_id,
               int(wk.ctl[CTL_LPORT_LO]), int(wk.ctl[CTL_LPORT_HI]),
               int(wk.ctl[CTL_WORKER]), int(wk.ctl[CTL_N_WORKERS]))
