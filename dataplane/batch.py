"""A reusable batch of packets in one buffer, for callers that hold packets as Python bytes: the
netfilterqueue adapter, pcap replay, tests and engine benchmarks. Each packet gets a fixed slot so
the engine can grow it in place (FULLNAT options, PROXY protocol headers) up to the slot size.

The batched netlink backend does not use this: it points the engine straight at its receive
buffers (dataplane/nfq_netlink.py).
"""

import numpy as np

from dataplane import tables as T
from dataplane.pipeline import process_batch

SLOT = 0xFFFF + 1024        # a full 64 KiB datagram (GRO off on a rewriting queue) plus headroom


class Batch:
    def __init__(self, max_pkts=64, slot=SLOT, tx_slots=256):
        self.max_pkts = max_pkts
        self.slot = slot
        self.buf = np.zeros(max_pkts * slot, np.uint8)
        self.off = np.arange(max_pkts, dtype=np.int64) * slot
        self.length = np.zeros(max_pkts, np.int32)
        self.cap = np.full(max_pkts, slot, np.int32)
        self.mark = np.zeros(max_pkts, np.uint32)
        self.skbinfo = np.zeros(max_pkts, np.uint8)     # consts.NFQA_SKB_* per packet (tests)
        self.verdict = np.zeros(max_pkts, np.uint8)
        self.tx = T.new_tx(tx_slots)
        self.n = 0

    def clear(self):
        self.n = 0

    def add(self, pkt, mark=0, skbinfo=0):
        """Copy one packet in; returns its index. Oversized packets are truncated to the slot,
        which the engine then reports as malformed (total length > captured length).
        ``skbinfo``: the NFQA_SKB_INFO flags the kernel would have sent with it."""
        i = self.n
        data = np.frombuffer(pkt, np.uint8)[: self.slot]
        o = int(self.off[i])
        self.buf[o:o + len(data)] = data
        self.length[i] = len(data)
        self.mark[i] = mark
        self.skbinfo[i] = skbinfo
        self.n = i + 1
        return i

    def packet(self, i):
        o = int(self.off[i])
        return self.buf[o:o + int(self.length[i])].tobytes()

    def run(self, cfg, wk, now_ns):
        process_batch(cfg, wk, self.buf, self.off, self.length, self.cap, self.mark,
                      self.skbinfo, self.verdict, self.n, np.int64(now_ns), self.tx)
        return self.verdict[: self.n]

    def tx_packets(self):
        """Generated packets waiting to be sent; clears the queue."""
        n = int(self.tx.count[0])
        out = [self.tx.buf[int(self.tx.off[i]):int(self.tx.off[i]) + int(self.tx.length[i])].tobytes()
               for i in range(n)]
        self.tx.count[0] = 0
        return out


def run_packets(cfg, wk, packets, now_ns, marks=None, skbinfo=None):
    """Convenience for tests: run a list of packets as one batch; return [(verdict, bytes)]."""
    b = Batch(max_pkts=max(1, len(packets)))
    for i, pkt in enumerate(packets):
        b.add(pkt, 0 if marks is None else marks[i], 0 if skbinfo is None else skbinfo[i])
    v = b.run(cfg, wk, now_ns)
    return [(int(v[i]), b.packet(i)) for i in range(b.n)]
