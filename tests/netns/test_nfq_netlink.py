"""nfq_netlink end to end, in a pair of namespaces this module creates (and always removes).

    ns A (sender)  va 10.201.0.1/24  <== veth ==>  vb 10.201.0.2/24  ns B (NFQUEUE + backend)

ns B has ``iptables -t raw -A PREROUTING -p udp --dport 9999 -j NFQUEUE --queue-num N``; the
backend binds queue N from a socket created inside ns B (``setns`` on the test thread only).
Every loop is bounded; nothing is configured in the root namespace.
"""

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager

import numpy as np
import pytest
from numba import njit

from dataplane import consts as C
from dataplane import nfq_netlink as nq
from dataplane import tables

pytestmark = pytest.mark.netns

ADDR_A, ADDR_B = "10.201.0.1", "10.201.0.2"
DPORT = 9999
REPLY_PORT = 9998
N_PKTS = 2000
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


@contextmanager
def in_netns(name):
    """Run the body with this thread in network namespace ``name``; sockets made inside stay
    there."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:        # pragma: no cover
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


class Lab:
    def __init__(self):
        tag = uuid.uuid4().hex[:8]
        self.ns_a, self.ns_b = f"lvsdp-nlq-{tag}-a", f"lvsdp-nlq-{tag}-b"
        self.queue = 1000 + int(tag[:4], 16) % 50000
        self.rule = ["-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", str(DPORT),
                     "-j", "NFQUEUE", "--queue-num", str(self.queue)]
        self.rule_added = False

    def up(self):
        _sh("ip", "netns", "add", self.ns_a)
        _sh("ip", "netns", "add", self.ns_b)
        _sh("ip", "-n", self.ns_a, "link", "add", "va", "type", "veth", "peer", "name", "vb",
            "netns", self.ns_b)
        for ns, dev, addr in ((self.ns_a, "va", ADDR_A), (self.ns_b, "vb", ADDR_B)):
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "netns", "exec", self.ns_b, "iptables", *self.rule)
        self.rule_added = True

    def down(self):
        if self.rule_added:
            rule = list(self.rule)
            rule[rule.index("-A")] = "-D"
            _sh("ip", "netns", "exec", self.ns_b, "iptables", *rule, check=False)
        for ns in (self.ns_a, self.ns_b):
            _sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    lab = Lab()
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
    left = _sh("ip", "netns", "list").stdout
    assert lab.ns_a not in left and lab.ns_b not in left


# --- stand-in engines (same signature as pipeline.process_batch) ---------------------------------
IDLE_TICKS = C.N_STATS - 1      # a spare counter: accept_engine counts its n == 0 calls there


@njit(cache=True, nogil=True)
def accept_engine(cfg, wk, buf, off, length, cap, mark, skbinfo, verdict, n, now_ns, tx):
    for i in range(n):
        verdict[i] = C.VERDICT_ACCEPT
    wk.stats[C.STAT_PKTS] += n
    if n == 0:
        wk.stats[IDLE_TICKS] += 1


@njit(cache=True, nogil=True)
def drop_engine(cfg, wk, buf, off, length, cap, mark, skbinfo, verdict, n, now_ns, tx):
    for i in range(n):
        verdict[i] = C.VERDICT_DROP
    wk.stats[C.DROP_NO_DEST] += n


@njit(cache=True, nogil=True)
def _csum_add(buf, p, end, s):
    while p + 1 < end:
        s += (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])
        p += 2
    if p < end:
        s += np.int64(buf[p]) << 8
    return s


@njit(cache=True, nogil=True)
def _csum_fold(s):
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@njit(cache=True, nogil=True)
def upper_engine(cfg, wk, buf, off, length, cap, mark, skbinfo, verdict, n, now_ns, tx):
    """Upper-cases the UDP payload (same length) and recomputes the UDP checksum."""
    for i in range(n):
        p = off[i]
        ihl = (buf[p] & 0xF) * 4
        u = p + ihl
        end = p + length[i]
        for k in range(u + 8, end):
            if 97 <= buf[k] <= 122:
                buf[k] -= 32
        buf[u + 6] = 0
        buf[u + 7] = 0
        ulen = end - u
        s = _csum_add(buf, p + 12, p + 20, np.int64(0))        # saddr, daddr
        s += 17 + ulen
        s = _csum_add(buf, u, end, s)
        c = _csum_fold(s)
        if c == 0:
            c = 0xFFFF
        buf[u + 6] = c >> 8
        buf[u + 7] = c & 0xFF
        verdict[i] = C.VERDICT_REWRITE


@njit(cache=True, nogil=True)
def reply_engine(cfg, wk, buf, off, length, cap, mark, skbinfo, verdict, n, now_ns, tx):
    """Accepts, and for each packet emits a generated 'ack' UDP packet (B -> A:9998) through tx."""
    for i in range(n):
        verdict[i] = C.VERDICT_ACCEPT
        k = tx.count[0]
        if k >= tx.off.size:
            wk.stats[C.DROP_TX_FULL] += 1
            continue
        o = k * 64
        q = off[i]
        tx.off[k] = o
        tx.length[k] = 31
        tx.buf[o:o + 31] = 0
        tx.buf[o] = 0x45
        tx.buf[o + 3] = 31
        tx.buf[o + 8] = 64
        tx.buf[o + 9] = 17
        tx.buf[o + 12:o + 16] = buf[q + 16:q + 20]               # src = the packet's dst (B)
        tx.buf[o + 16:o + 20] = buf[q + 12:q + 16]               # dst = the packet's src (A)
        tx.buf[o + 20] = DPORT >> 8
        tx.buf[o + 21] = DPORT & 0xFF
        tx.buf[o + 22] = REPLY_PORT >> 8
        tx.buf[o + 23] = REPLY_PORT & 0xFF
        tx.buf[o + 25] = 11
        tx.buf[o + 28] = 97
        tx.buf[o + 29] = 99
        tx.buf[o + 30] = 107                                     # "ack", UDP checksum 0
        tx.count[0] = k + 1


# --- helpers -------------------------------------------------------------------------------------
def _udp_socket(bind_port=None, rcvbuf=16 << 20):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, nq.SO_RCVBUFFORCE, rcvbuf)
    if bind_port is not None:
        s.bind(("0.0.0.0", bind_port))
    s.settimeout(0.2)
    return s


def _drain(sock, want, quiet_s=1.0, max_s=20.0):
    """Receive until ``want`` datagrams or ``quiet_s`` without one (bounded by max_s)."""
    got = []
    t_end = time.monotonic() + max_s
    last = time.monotonic()
    while len(got) < want and time.monotonic() < t_end and time.monotonic() - last < quiet_s:
        try:
            got.append(sock.recv(65536))
            last = time.monotonic()
        except (socket.timeout, BlockingIOError):
            pass
    return got


class ServedQueue:
    """A NetlinkQueue opened in ns B and served by a thread; always stopped and closed."""

    def __init__(self, lab, engine, **kw):
        self.wk = tables.new_worker(1024)
        self.q = nq.NetlinkQueue(lab.queue, engine, tables.new_config(), self.wk, **kw)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.q.run, args=(self.stop,), daemon=True)
        self.lab = lab

    def __enter__(self):
        with in_netns(self.lab.ns_b):
            self.q.open()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        alive = self.thread.is_alive()
        self.q.close()
        assert not alive, "worker did not stop"


def _send(lab, payloads, dst=(ADDR_B, DPORT), burst=200):
    with in_netns(lab.ns_a):
        s = _udp_socket()
    with s:
        for i, p in enumerate(payloads):
            s.sendto(p, dst)
            if i % burst == burst - 1:
                time.sleep(0.001)


def _payloads(n=N_PKTS):
    return [b"lvs-dp packet %05d" % i for i in range(n)]


# --- tests ---------------------------------------------------------------------------------------
def test_accept_engine_delivers_everything(lab):
    with in_netns(lab.ns_b):
        rx = _udp_socket(DPORT)
    with rx, ServedQueue(lab, accept_engine) as w:
        _send(lab, _payloads())
        got = _drain(rx, N_PKTS)
        st = w.q.queue_stats()
    assert sorted(got) == sorted(_payloads())
    assert st["packets"] == N_PKTS and st["accept"] == N_PKTS
    assert st["queue_dropped"] == 0 and st["user_dropped"] == 0 and st["overload"] == 0
    assert st["copy_mode"] == nq.NFQNL_COPY_PACKET and st["copy_range"] == nq.NFQA_PAYLOAD_MAX
    assert st["lost"] == st["malformed"] == st["truncated"] == st["send_errors"] == 0
    assert st["netlink_errors"] == 0
    assert w.wk.stats[C.STAT_PKTS] == N_PKTS


def test_accept_engine_per_packet_verdicts(lab):
    with in_netns(lab.ns_b):
        rx = _udp_socket(DPORT)
    with rx, ServedQueue(lab, accept_engine, batch_verdict=False, batch=16) as w:
        _send(lab, _payloads(500))
        got = _drain(rx, 500)
        st = w.q.queue_stats()
    assert len(got) == 500
    assert st["accept"] == 500 and st["netlink_errors"] == 0 and st["queue_total"] == 0


def test_drop_engine_drops_everything(lab):
    with in_netns(lab.ns_b):
        rx = _udp_socket(DPORT)
    with rx, ServedQueue(lab, drop_engine) as w:
        _send(lab, _payloads())
        got = _drain(rx, 1, quiet_s=1.5)
        deadline = time.monotonic() + 10
        while w.q.queue_stats()["drop"] < N_PKTS and time.monotonic() < deadline:
            time.sleep(0.05)
        st = w.q.queue_stats()
    assert got == []
    assert st["drop"] == N_PKTS and st["queue_total"] == 0
    assert w.wk.stats[C.DROP_NO_DEST] == N_PKTS


def test_rewrite_engine_delivers_modified_payloads(lab):
    with in_netns(lab.ns_b):
        rx = _udp_socket(DPORT)
    with rx, ServedQueue(lab, upper_engine) as w:
        _send(lab, _payloads())
        got = _drain(rx, N_PKTS)
        st = w.q.queue_stats()
    assert sorted(got) == sorted(p.upper() for p in _payloads())
    assert st["rewrite"] == N_PKTS and st["netlink_errors"] == 0


def test_generated_packets_go_out_through_raw_socket(lab):
    with in_netns(lab.ns_b):
        rx = _udp_socket(DPORT)
    with in_netns(lab.ns_a):
        acks = _udp_socket(REPLY_PORT)
    with rx, acks, ServedQueue(lab, reply_engine) as w:
        _send(lab, _payloads(300))
        got = _drain(rx, 300)
        got_acks = _drain(acks, 300)
        st = w.q.queue_stats()
    assert len(got) == 300
    assert got_acks == [b"ack"] * 300
    assert st["tx_sent"] == 300 and st["tx_errors"] == 0


def test_overload_drops_and_counts_never_fails_open(lab):
    """Nobody reads the socket: the queue fills to maxlen, the rest is dropped by the kernel
    (queue_dropped), none is accepted; once served, exactly the queued ones are delivered."""
    with in_netns(lab.ns_b):
        rx = _udp_socket(DPORT)
    w = ServedQueue(lab, accept_engine, maxlen=16)
    with rx:
        with in_netns(lab.ns_b):
            w.q.open()
        try:
            _send(lab, _payloads(100))
            assert _drain(rx, 1, quiet_s=0.5) == []
            st = w.q.queue_stats()
            assert st["queue_total"] == 16 and st["queue_dropped"] == 84
            assert w.wk.stats[C.DROP_OVERLOAD] == 84
            assert w.q.run_once(4) == 16
        finally:
            w.q.close()
        assert len(_drain(rx, 16)) == 16


def test_stop_is_prompt_without_traffic(lab):
    with ServedQueue(lab, accept_engine) as w:
        time.sleep(0.3)
        t0 = time.monotonic()
        w.stop.set()
        w.thread.join(2)
        assert not w.thread.is_alive()
        assert time.monotonic() - t0 < 0.5
        assert w.q.last_return[1] == nq.RET_TIMEOUT
        assert w.wk.stats[IDLE_TICKS] >= 1          # idle timeouts reach the engine (expiry)


def test_signal_interrupts_receive(lab):
    """A signal delivered to the worker thread returns the loop to Python (EINTR) even with a
    long receive timeout, so Python signal handlers run."""
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *a: hits.append(1))
    w = ServedQueue(lab, accept_engine, timeout_s=10, budget_s=10)
    try:
        with in_netns(lab.ns_b):
            w.q.open()
        th = threading.Thread(target=w.q.run_once, args=(1000,), daemon=True)
        th.start()
        time.sleep(0.3)
        signal.pthread_kill(th.ident, signal.SIGUSR1)
        th.join(2)
        assert not th.is_alive()
        assert w.q.last_return[1] == nq.RET_EINTR
    finally:
        w.q.close()
        signal.signal(signal.SIGUSR1, old)
    assert hits == [1]


def test_two_queues_in_one_process(lab):
    """Two workers on two queues, two threads, one engine: a second rule splits by source
    port."""
    q2 = lab.queue + 1
    rule2 = ["-t", "raw", "-I", "PREROUTING", "-p", "udp", "--dport", str(DPORT), "--sport",
             "40000:40999", "-j", "NFQUEUE", "--queue-num", str(q2)]
    _sh("ip", "netns", "exec", lab.ns_b, "iptables", *rule2)
    try:
        with in_netns(lab.ns_b):
            rx = _udp_socket(DPORT)
        lab2 = Lab.__new__(Lab)
        lab2.__dict__.update(lab.__dict__, queue=q2)
        with rx, ServedQueue(lab, accept_engine) as w1, ServedQueue(lab2, accept_engine) as w2:
            with in_netns(lab.ns_a):
                s = _udp_socket()
                s.bind(("0.0.0.0", 40001))
            with s:
                for i in range(200):
                    s.sendto(b"q2-%03d" % i, (ADDR_B, DPORT))
            _send(lab, _payloads(200))
            got = _drain(rx, 400)
            s1, s2 = w1.q.queue_stats(), w2.q.queue_stats()
        assert len(got) == 400
        assert s1["accept"] == 200 and s2["accept"] == 200
    finally:
        rule2[rule2.index("-I")] = "-D"
        _sh("ip", "netns", "exec", lab.ns_b, "iptables", *rule2, check=False)


def test_real_pipeline_with_no_services_accepts(lab):
    """engine=None is dataplane.pipeline.process_batch: with an empty config nothing is ours,
    everything is accepted unchanged and counted as not_ours."""
    with in_netns(lab.ns_b):
        rx = _udp_socket(DPORT)
    with rx, ServedQueue(lab, None) as w:
        _send(lab, _payloads(300))
        got = _drain(rx, 300)
        st = w.q.queue_stats()
    assert sorted(got) == sorted(_payloads(300))
    assert st["accept"] == 300
    assert w.wk.stats[C.STAT_PKTS] == 300 and w.wk.stats[C.STAT_NOT_OURS] == 300
