"""Prebuilt packets and jitted drivers for the engine benchmarks (bench/bench_engine.py).

The engine rewrites in place, so a client -> VIP packet run once becomes a client -> real-server
packet that no longer matches its connection (a second run would take the cheap "not ours" path
and flatter the numbers). Every benchmark therefore restores each 64-packet batch before running
it: established traffic is copied from a pristine buffer (``run_established``), new-connection
SYNs are written from a template with a fresh 4-tuple (``run_new_conns``). The restore step is
timed on its own by the same driver with ``process=False`` and subtracted; both numbers are
reported.

The drivers loop over batches inside numba, so the figure is the engine's own cost per packet.
What a backend pays on top for calling ``process_batch`` from Python once per batch is measured
separately (``python_call_loop``).

Packets are 64-byte IPv4 datagrams (20 IP + 20 TCP + 24 payload) in 64-byte slots.
"""

import numpy as np
from numba import njit

from control.apply import DestSpec, ServiceSpec, TableWriter
from dataplane import conntrack as CT
from dataplane import consts as C
from dataplane import tables as T
from dataplane.csum import JIT, csum_replace2, csum_replace4, ip_checksum, l4_checksum, rd16, rd32, wr16, wr32
from dataplane.pipeline import process_batch

VIP = "172.16.1.100"
VPORT = 80
RS = ("172.16.2.13", "172.16.2.14")
BATCH = 64
SLOT = 64
PKT_LEN = 64
PAYLOAD = PKT_LEN - 40
NOW_NS = 1_000 * C.NS

# Established clients: 10.0.0.0/8, new-connection clients: 11.0.0.0/8, so they never collide.
EST_NET = 10 << 24
NEW_NET = 11 << 24
PORTS_PER_ADDR = 50_000
PORT_BASE = 10_000


def est_tuple(i):
    """(caddr, cport) arrays of established client i (vectorised)."""
    i = np.asarray(i, np.int64)
    return (EST_NET + 1 + i // PORTS_PER_ADDR).astype(np.int64), (PORT_BASE + i % PORTS_PER_ADDR).astype(np.int64)


# FULLNAT local addresses: 20 x 60,536 ports (the default range) hold a million connections.
LADDRS = tuple(f"172.16.3.{i}" for i in range(1, 21))


def build_tables(max_conns, sched=C.SCHED_RR, flags=0, fwd=C.FWD_MASQ):
    """Config with one TCP service VIP:80 -> RS:80 (rr; `flags` SVC_F_*; NAT, or FULLNAT from
    the LADDRS pool) and an empty worker."""
    cfg = T.new_config()
    wk = T.new_worker(max_conns=max_conns)
    tw = TableWriter(cfg, on_new_laddr=lambda lid, _addr: T.init_laddr(wk, lid))
    tw.sync([ServiceSpec(proto=C.IPPROTO_TCP, addr=VIP, port=VPORT, sched=sched, flags=flags,
                         fwd=fwd, laddrs=list(LADDRS) if fwd == C.FWD_FULLNAT else [],
                         dests=[DestSpec(a, VPORT, 1) for a in RS])])
    return cfg, wk


class Slots:
    """Per-packet arrays of a batch of `n` packets in contiguous SLOT-byte slots."""

    def __init__(self, n):
        self.n = n
        self.buf = np.zeros(n * SLOT, np.uint8)
        self.off = np.arange(n, dtype=np.int64) * SLOT
        self.length = np.full(n, PKT_LEN, np.int32)
        self.cap = np.full(n, SLOT, np.int32)
        self.mark = np.zeros(n, np.uint32)
        self.skbinfo = np.zeros(n, np.uint8)
        self.verdict = np.zeros(n, np.uint8)

    def packet(self, i):
        o = int(self.off[i])
        return self.buf[o:o + int(self.length[i])].tobytes()


@njit(**JIT)
def _write_tcp(buf, o, saddr, daddr, sport, dport, seq, ack, flags, tot_len, ident):
    """A complete IPv4/TCP packet with valid checksums at buf[o:o+tot_len]; payload bytes are a
    pattern derived from the source port."""
    buf[o] = 0x45
    buf[o + 1] = 0
    wr16(buf, o + 2, tot_len)
    wr16(buf, o + 4, ident & 0xFFFF)
    wr16(buf, o + 6, 0x4000)
    buf[o + 8] = 64
    buf[o + 9] = C.IPPROTO_TCP
    wr16(buf, o + 10, 0)
    wr32(buf, o + 12, saddr)
    wr32(buf, o + 16, daddr)
    t = o + 20
    wr16(buf, t, sport)
    wr16(buf, t + 2, dport)
    wr32(buf, t + 4, seq)
    wr32(buf, t + 8, ack)
    buf[t + 12] = 5 << 4
    buf[t + 13] = flags
    wr16(buf, t + 14, 65535)
    wr16(buf, t + 16, 0)
    wr16(buf, t + 18, 0)
    for k in range(t + 20, o + tot_len):
        buf[k] = (sport + k - t) & 0xFF
    wr16(buf, o + 10, ip_checksum(buf, o, 20))
    wr16(buf, t + 16, l4_checksum(buf, o, t, tot_len - 20, C.IPPROTO_TCP, t + 16))


@njit(**JIT)
def fill_tcp(buf, off, saddrs, sports, daddr, dport, flags, seq0, tot_len):
    """Packet i: saddrs[i]:sports[i] -> daddr:dport with `flags` (client -> VIP)."""
    for i in range(len(saddrs)):
        s = np.int64(sports[i])
        _write_tcp(buf, off[i], np.int64(saddrs[i]), daddr, s, dport, seq0 + s, 7777 + s, flags,
                   tot_len, i)


@njit(**JIT)
def checksums_ok(buf, off, n):
    """Number of packets among the first n whose IP and TCP/UDP checksums are both valid."""
    good = 0
    for i in range(n):
        o = off[i]
        ihl = (np.int64(buf[o]) & 0xF) * 4
        tot = rd16(buf, o + 2)
        proto = np.int64(buf[o + 9])
        at = o + ihl + (16 if proto == C.IPPROTO_TCP else 6)
        if (ip_checksum(buf, o, ihl) == rd16(buf, o + 10)
                and l4_checksum(buf, o, o + ihl, tot - ihl, proto, at) == rd16(buf, at)):
            good += 1
    return good


@njit(**JIT)
def lookup_dest(wk, saddr, daddr, sport, dport):
    """(daddr, dport, laddr, lport) the connection of a client -> VIP tuple rewrites to (laddr
    and lport are 0 for NAT); all 0 if none."""
    k0, k1 = CT.make_key(saddr, daddr, sport, dport, C.IPPROTO_TCP)
    v = CT.idx_lookup(wk, k0, k1)
    if v == 0:
        return np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    c = wk.conn[v >> 1]
    if c['flags'] & C.CONN_F_FULLNAT:
        return np.int64(c['daddr']), np.int64(c['dport']), np.int64(c['laddr']), np.int64(c['lport'])
    return np.int64(c['daddr']), np.int64(c['dport']), np.int64(0), np.int64(0)


def prime(cfg, wk, n_conns, chunk=1 << 16):
    """Open `n_conns` established connections (client SYN then client ACK, as IPVS sees a
    handshake in the input direction) through process_batch. Returns (caddrs, cports)."""
    caddrs, cports = est_tuple(np.arange(n_conns))
    vaddr = T.ip2int(VIP)
    s = Slots(min(chunk, n_conns))
    tx = T.new_tx(16)
    for flags in (C.TH_SYN, C.TH_ACK):
        for a in range(0, n_conns, chunk):
            b = min(a + chunk, n_conns)
            n = b - a
            fill_tcp(s.buf, s.off, caddrs[a:b], cports[a:b], vaddr, VPORT, flags, 1000, 40)
            s.length[:n] = 40
            process_batch(cfg, wk, s.buf, s.off, s.length, s.cap, s.mark, s.skbinfo, s.verdict, n,
                          np.int64(NOW_NS), tx)
            bad = int(np.count_nonzero(s.verdict[:n] != C.VERDICT_REWRITE))
            if bad:
                raise AssertionError(f"{bad} of {n} handshake packets not rewritten; "
                                     f"stats {wk.stats[:20].tolist()}")
    return caddrs, cports


def established_pristine(n_conns, n_pkts, seed=1):
    """`n_pkts` client -> VIP PSH|ACK packets of PKT_LEN bytes, each for a random established
    connection (whole random permutations of the connections, concatenated), contiguous slots."""
    rng = np.random.default_rng(seed)
    reps = -(-n_pkts // n_conns)
    order = np.concatenate([rng.permutation(n_conns) for _ in range(reps)])[:n_pkts]
    caddrs, cports = est_tuple(order)
    buf = np.zeros(n_pkts * SLOT, np.uint8)
    off = np.arange(n_pkts, dtype=np.int64) * SLOT
    fill_tcp(buf, off, caddrs, cports, T.ip2int(VIP), VPORT, C.TH_ACK | C.TH_PSH, 1001, PKT_LEN)
    return buf, order


@njit(**JIT)
def run_established(cfg, wk, pristine, work, off, length, cap, mark, skbinfo, verdict, n_batches,
                    now_ns, tx, process):
    """For each of n_batches: copy pristine batch b into `work`, then (if process) run it.
    Returns a byte sum of the last batch so the copy cannot be optimised away."""
    bb = BATCH * SLOT
    nb_total = len(pristine) // bb
    acc = np.int64(0)
    for b in range(n_batches):
        src = (b % nb_total) * bb
        work[:] = pristine[src:src + bb]
        if process:
            process_batch(cfg, wk, work, off, length, cap, mark, skbinfo, verdict, BATCH, now_ns, tx)
        acc += np.int64(work[b & (bb - 1)])
    return acc


@njit(**JIT)
def run_new_conns(cfg, wk, template, work, off, length, cap, mark, skbinfo, verdict, n_batches,
                  state, dt_ns, tx, process):
    """New connections with expiry churn. Each batch holds BATCH SYNs for never-seen 4-tuples
    (client NEW_NET + id // PORTS_PER_ADDR, port PORT_BASE + id % PORTS_PER_ADDR, written from
    `template` with incremental checksum fixes); the clock advances dt_ns per batch, so older
    connections time out and the per-batch sweep frees them while new ones are made.
    state[0] is the next client id, state[1] the clock; both are updated."""
    t_saddr = rd32(template, 12)
    t_sport = rd16(template, 20)
    t_ipck = rd16(template, 10)
    t_tcpck = rd16(template, 36)
    nid = state[0]
    now = state[1]
    for b in range(n_batches):
        for i in range(BATCH):
            o = off[i]
            work[o:o + SLOT] = template
            saddr = NEW_NET + 1 + nid // PORTS_PER_ADDR
            sport = PORT_BASE + nid % PORTS_PER_ADDR
            nid += 1
            wr32(work, o + 12, saddr)
            wr16(work, o + 10, csum_replace4(t_ipck, t_saddr, saddr))
            wr16(work, o + 20, sport)
            wr16(work, o + 36, csum_replace2(csum_replace4(t_tcpck, t_saddr, saddr), t_sport, sport))
        now += dt_ns
        if process:
            process_batch(cfg, wk, work, off, length, cap, mark, skbinfo, verdict, BATCH, now, tx)
    state[0] = nid
    state[1] = now
    return nid


def python_call_loop(cfg, wk, pristine, s, n_batches, tx):
    """The per-batch path a Python backend takes: np.copyto + process_batch per batch."""
    bb = BATCH * SLOT
    nb_total = len(pristine) // bb
    now = np.int64(NOW_NS)
    for b in range(n_batches):
        src = (b % nb_total) * bb
        np.copyto(s.buf, pristine[src:src + bb])
        process_batch(cfg, wk, s.buf, s.off, s.length, s.cap, s.mark, s.skbinfo, s.verdict, BATCH,
                      now, tx)


def rss_bytes():
    """VmRSS of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def table_bytes(wk):
    """Bytes allocated by a worker's connection-related arrays, and their split."""
    conn = wk.conn.nbytes
    idx = wk.idx.nbytes
    free = wk.free.nbytes
    return {"conn": conn, "index": idx, "free": free, "total": conn + idx + free}
