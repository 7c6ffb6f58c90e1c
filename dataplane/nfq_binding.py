"""NFQUEUE through the `netfilterqueue` package (libnetfilter_queue): the simple backend.

One Python callback per packet copies the payload into a Batch; verdicts are issued after the
batch has been processed (netfilterqueue allows a verdict after the callback returns), so the
engine still runs on batches, but every packet costs a Python call, a copy and its own verdict
system call. That caps it near 200 kpps per core; dataplane/nfq_netlink.py is the fast backend.

Queue settings that matter for a rewriting queue: copy range (a verdict carrying a shorter payload
truncates the packet; libnetfilter_queue through this package caps it at its 4 KiB receive buffer,
4016 bytes, which is why the GSO flag must stay off: packets then never exceed the MTU), no GSO flag (the library does not set it, so the kernel segments
offloaded packets and completes partial checksums before queueing), fail-open off (a fail-open
packet would reach the local stack unrewritten and reset the connection: overload drops, and
the kernel counts it in /proc/net/netfilter/nfnetlink_queue).
"""

import os
import select
import socket
import time

from netfilterqueue import NetfilterQueue

from dataplane import consts as C
from dataplane.batch import Batch


class BindingQueue:
    name = "nfqueue"

    def __init__(self, queue_num, cfg, wk, batch=64, max_len=8192):
        self.queue_num = queue_num
        self.cfg = cfg
        self.wk = wk
        self.batch = Batch(max_pkts=batch)
        self.pending = []
        self.max_len = max_len
        self.nfq = None
        self.fd = -1
        self.raw = None

    def open(self):
        self.nfq = NetfilterQueue()
        self.nfq.bind(self.queue_num, self._on_packet, max_len=self.max_len, range=0xFFFF,
                      sock_len=64 << 20)
        self.fd = self.nfq.get_fd()
        os.set_blocking(self.fd, False)

    def warm_up(self):
        self._flush()

    def _on_packet(self, pkt):
        self.batch.add(pkt.get_payload(), pkt.get_mark())
        self.pending.append(pkt)
        if self.batch.n == self.batch.max_pkts:
            self._flush()

    def _flush(self):
        b = self.batch
        verdicts = b.run(self.cfg, self.wk, time.monotonic_ns())
        for i, pkt in enumerate(self.pending):
            v = verdicts[i]
            if v == C.VERDICT_DROP:
                pkt.drop()
            else:
                if v == C.VERDICT_REWRITE:
                    pkt.set_payload(b.packet(i))
                pkt.accept()
        self.pending.clear()
        b.clear()
        if b.tx.count[0]:
            self._send_tx(b.tx_packets())

    def _send_tx(self, packets):
        """Packets the engine generated (SYN-proxy: SYN/ACK to real servers, RSTs) go out through
        an IPPROTO_RAW socket (IP_HDRINCL: sent as built), as the netlink backend does."""
        if self.raw is None:
            self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for p in packets:
            try:
                self.raw.sendto(p, (socket.inet_ntoa(p[16:20]), 0))
            except OSError:
                pass

    def run_once(self, timeout=0.1):
        """Wait up to `timeout` for packets, process everything queued, return. An empty batch
        still runs the engine so connection expiry advances while idle."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        if r:
            try:
                self.nfq.run(block=False)
            except OSError:
                # ENOBUFS: the kernel dropped packets for us; it counts them (queue_stats).
                pass
        self._flush()

    def run(self, stop):
        while not stop.is_set():
            self.run_once()

    def close(self):
        if self.nfq is not None:
            self.nfq.unbind()
            self.nfq = None
        if self.raw is not None:
            self.raw.close()
            self.raw = None

    def queue_stats(self):
        """The kernel's row for this queue; its drops (queue full, socket overrun) are mirrored
        into wk.stats[DROP_OVERLOAD] so every drop shows under one name."""
        row = read_queue_stats(self.queue_num)
        if row:
            row["overload"] = row["queue_dropped"] + row["user_dropped"]
            self.wk.stats[C.DROP_OVERLOAD] = row["overload"]
        return row


def read_queue_stats(queue_num):
    """Counters of one queue from /proc/net/netfilter/nfnetlink_queue (this namespace)."""
    cols = ("queue_number", "peer_portid", "queue_total", "copy_mode", "copy_range",
            "queue_dropped", "user_dropped", "id_sequence", "one")
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                vals = line.split()
                if vals and int(vals[0]) == queue_num:
                    return dict(zip(cols, (int(v) for v in vals)))
    except OSError:
        pass
    return {}
