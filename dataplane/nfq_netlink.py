"""Batched NFQUEUE backend: one raw nfnetlink socket, the whole receive/verdict loop in numba.

Theory of operation
-------------------
The kernel's nfnetlink_queue hands each queued packet to user space as one netlink message
(``NFQNL_MSG_PACKET``: ``nlmsghdr``, ``nfgenmsg``, then attributes, ``NFQA_PAYLOAD`` last) and waits
for one ``NFQNL_MSG_VERDICT`` per packet id. libnetfilter_queue and the ``netfilterqueue`` package
do that one packet, one ``recv``, one callback, one ``sendmsg`` at a time. This module does it a
batch at a time and never returns to Python per packet:

1. ``recvmmsg(fd, rx_mm, n_slots, MSG_WAITFORONE)`` blocks (at most ``SO_RCVTIMEO``) for the first
   message, then takes whatever else is already queued: up to ``n_slots`` messages, one per slot of
   the receive buffer ``rx`` (a netlink datagram is one kernel skb, one packet message).
2. ``_parse_msgs`` walks each slot's netlink messages and fills the engine's packet arrays:
   ``off``/``length`` point at the IPv4 header inside ``rx`` (zero copy), ``cap`` is the room the
   engine may grow into, ``mark`` is ``NFQA_MARK``, ``skbinfo`` the ``NFQA_SKB_INFO`` flags
   (consts.NFQA_SKB_*: checksum not ready, GSO) and ``pkt_id`` the id from ``NFQA_PACKET_HDR``.
   A message whose payload cannot be trusted (truncated by the slot, cut by copy_range, no payload,
   not AF_INET) but whose id is known goes to the ``bad_id`` list instead: it is dropped and
   counted, never shown to the engine and never accepted.
3. ``process_batch(cfg, wk, rx, off, length, cap, mark, skbinfo, verdict, n, now_ns, tx)`` (the
   engine,
   passed in: ``make_loop(process_batch)``) fills ``verdict``. It is also called with ``n = 0``
   when the receive times out, so an idle worker still expires connections.
4. ``_build_verdicts`` writes every verdict of the batch into one buffer, sent with one ``send``:
   ``NF_DROP`` messages for the bad ids, then one ``NFQNL_MSG_VERDICT`` per DROP and REWRITE (the
   latter carrying ``NFQA_PAYLOAD``, the rewritten bytes), and, for the ACCEPTs, either one message
   each or (``batch_verdict``) a single closing ``NFQNL_MSG_VERDICT_BATCH`` "accept every id up to
   the batch's last one". The batch form is only used when every message of the batch had a known
   id (otherwise it would accept a packet nobody looked at: the backend never fails open). The
   kernel processes the messages of one ``send`` in order, so the individual verdicts dequeue
   their packets before the closing batch verdict sweeps up the rest. If a batch's verdicts do not
   fit in the buffer (rewrites of large packets) it is sent in several pieces.
5. Packets the engine generated (``tx``, SYN-proxy) go out through an ``IPPROTO_RAW`` socket with
   one ``sendmmsg`` per 64 packets.
6. The loop returns to Python on a receive timeout (no traffic for ``timeout_s``), on ``EINTR``,
   after ``max_batches`` batches and after ``budget_s``, so Python signal handlers, the control
   plane's threads and a ``stop_event`` get a turn at least every ~``timeout_s + budget_s``.
   The loop runs with the GIL released, so one process can run one worker thread per queue.

Payload buffers: zero copy with growth room. Each receive slot is ``slot_size`` bytes (default
68 KiB: a 64 KiB payload plus the netlink headers), and a packet's ``cap`` is the room from its
IPv4 header to the end of its slot (or to the next message, if a slot ever held two), capped at
``NFQA_PAYLOAD_MAX``. The engine rewrites and grows packets in place in the receive buffer; only
REWRITE verdicts copy bytes (into the verdict buffer, since the kernel wants them inside the verdict
message). The slots cost virtual memory, not resident memory: pages past a packet's end are never
touched. A slot too small for a message (``slot_size`` lowered by the caller) gives ``MSG_TRUNC``;
its packet is dropped and counted (``DROP_TOO_BIG``).

Queue configuration (``NetlinkQueue.open``): ``NFQNL_COPY_PACKET`` with copy range 0xffff (the
kernel clamps it to ``NFQA_PAYLOAD_MAX``), ``NFQA_CFG_QUEUE_MAXLEN`` 8192, ``NFQA_CFG_MASK`` =
``NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO`` with ``NFQA_CFG_FLAGS`` = ``NFQA_CFG_F_GSO``: no
fail-open, so an overloaded queue drops; GSO, so a GSO packet (a sender's TSO burst crossing a
veth, a NIC's GRO aggregate: up to 64 KiB) is queued whole, one message and one verdict instead
of ~45, and a packet whose checksum is offloaded (CHECKSUM_PARTIAL) arrives unfinished instead of
being summed by the kernel first (``skb_checksum_help`` in ``nfqnl_build_packet_message``).

Why that is correct. Each such packet carries ``NFQA_SKB_INFO`` (``NFQA_SKB_CSUMNOTREADY``: its
L4 check field holds only the pseudo-header sum; ``NFQA_SKB_GSO``); the flags go to the engine in
``skbinfo``. A packet the engine accepts unchanged keeps its skb state and the kernel finishes it
as it would have. A packet given back with a payload is marked ``CHECKSUM_NONE`` by
``nfqnl_mangle()``, so the engine settles the check field of every rewritten flagged packet from
scratch (``csum.l4_settle``): the full checksum for a packet that leaves as it is, the
pseudo-header sum for a GSO packet, which the output path segments in software (a GSO skb that is
not CHECKSUM_PARTIAL always is: ``netif_needs_gso``) starting from that field (UDP) or after
rewriting it (TCP). Packets the engine sends itself (SYN-proxy's held segments) are finished
before they are kept, and GSO packets are never held. kernel-notes/nfqueue-path.md §3.3. The
cost of the flag: the engine sums the payload of small offloaded packets the kernel used to sum,
and a GSO packet rewritten is copied back whole (up to 64 KiB in the verdict). A GSO packet
larger than ``NFQA_PAYLOAD_MAX`` cannot be copied whole (``NFQA_CAP_LEN``): it is dropped and
counted (``DROP_TOO_BIG``), never truncated; TCP's own GSO packets stay below that size (the
stack keeps header room under its 64 KiB GSO limit). ``gso=False``
restores the old configuration. ``nlq_stats`` counts ``gso_packets`` and ``csum_partial``.

Those drops are the kernel's ``queue_dropped`` (queue full) and ``user_dropped``
(socket buffer full) columns of /proc/net/netfilter/nfnetlink_queue; ``queue_stats`` reads them
and mirrors their sum into ``wk.stats[DROP_OVERLOAD]``. ``NETLINK_NO_ENOBUFS`` keeps the socket
from reporting those overruns as receive errors, and ``SO_RCVBUFFORCE`` gives it a large buffer.

Caching: the loop is compiled once per engine with numba's on-disk cache. The cache key of the
loop includes a fingerprint of the engine (its name and the source of every module in its
package), because numba's own key would neither tell two engines apart nor notice an engine change.

x86-64 / aarch64 Linux (LP64) only: the ``msghdr`` layouts below are the LP64 ones.
"""

import errno as _errno
import hashlib
import os
import socket
import struct
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import numba
import numpy as np
from numba import njit, types
from numba.core.caching import FunctionCache

from dataplane import consts as C
from dataplane import tables as T
from dataplane.borrow import borrow
from dataplane.csum import JIT

# Numba options: the project's one constant (cache=True, nogil=True).
JIT_OPTIONS = JIT

# --- netlink (include/uapi/linux/netlink.h) ------------------------------------------------------
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLMSG_ALIGNTO = 4
NLA_ALIGNTO = 4
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0xFFFF & ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

# --- nfnetlink (include/uapi/linux/netfilter/nfnetlink.h) ----------------------------------------
NFNETLINK_V0 = 0
NFNL_SUBSYS_QUEUE = 3

# --- nfnetlink_queue (include/uapi/linux/netfilter/nfnetlink_queue.h) ----------------------------
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

NFQA_UNSPEC = 0
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_TIMESTAMP = 4
NFQA_IFINDEX_INDEV = 5
NFQA_IFINDEX_OUTDEV = 6
NFQA_IFINDEX_PHYSINDEV = 7
NFQA_IFINDEX_PHYSOUTDEV = 8
NFQA_HWADDR = 9
NFQA_PAYLOAD = 10
NFQA_CT = 11
NFQA_CT_INFO = 12
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14
# NFQA_SKB_INFO bits: consts.NFQA_SKB_CSUMNOTREADY, NFQA_SKB_GSO, NFQA_SKB_CSUM_NOTVERIFIED (the
# engine's skbinfo array takes them as they are); unknown bits are masked off.
SKB_INFO_KNOWN = C.NFQA_SKB_CSUMNOTREADY | C.NFQA_SKB_GSO | C.NFQA_SKB_CSUM_NOTVERIFIED

NFQNL_CFG_CMD_NONE = 0
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_CFG_CMD_PF_BIND = 3
NFQNL_CFG_CMD_PF_UNBIND = 4

NFQNL_COPY_NONE = 0
NFQNL_COPY_META = 1
NFQNL_COPY_PACKET = 2

NFQA_CFG_UNSPEC = 0
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5

NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_CONNTRACK = 1 << 1
NFQA_CFG_F_GSO = 1 << 2
NFQA_CFG_F_UID_GID = 1 << 3
NFQA_CFG_F_SECCTX = 1 << 4

# --- netfilter verdicts (include/uapi/linux/netfilter.h) -----------------------------------------
NF_DROP = 0
NF_ACCEPT = 1

# --- sockets (asm-generic/socket.h, bits/socket.h) -----------------------------------------------
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
MSG_TRUNC = 0x20
MSG_DONTWAIT = 0x40
MSG_WAITFORONE = 0x10000
CLOCK_MONOTONIC = 1

# --- layouts, declared once; offsets below are derived from them --------------------------------
NLMSGHDR_DTYPE = np.dtype([("nlmsg_len", "=u4"), ("nlmsg_type", "=u2"), ("nlmsg_flags", "=u2"),
                           ("nlmsg_seq", "=u4"), ("nlmsg_pid", "=u4")])
NFGENMSG_DTYPE = np.dtype([("nfgen_family", "u1"), ("version", "u1"), ("res_id", ">u2")])
NLATTR_DTYPE = np.dtype([("nla_len", "=u2"), ("nla_type", "=u2")])
NLMSGERR_DTYPE = np.dtype([("error", "=i4")])       # followed by the offending nlmsghdr
NFQNL_MSG_PACKET_HDR_DTYPE = np.dtype([("packet_id", ">u4"), ("hw_protocol", ">u2"),
                                       ("hook", "u1")])                   # packed: 7 bytes
NFQNL_MSG_VERDICT_HDR_DTYPE = np.dtype([("verdict", ">u4"), ("id", ">u4")])
NFQNL_MSG_CONFIG_CMD_DTYPE = np.dtype([("command", "u1"), ("_pad", "u1"), ("pf", ">u2")])
NFQNL_MSG_CONFIG_PARAMS_DTYPE = np.dtype([("copy_range", ">u4"), ("copy_mode", "u1")])  # packed

# struct mmsghdr with its struct msghdr inlined (LP64); struct iovec; struct sockaddr_in.
MMSGHDR_DTYPE = np.dtype([("msg_name", "=u8"), ("msg_namelen", "=u4"), ("_pad0", "=u4"),
                          ("msg_iov", "=u8"), ("msg_iovlen", "=u8"),
                          ("msg_control", "=u8"), ("msg_controllen", "=u8"),
                          ("msg_flags", "=i4"), ("_pad1", "=u4"),
                          ("msg_len", "=u4"), ("_pad2", "=u4")])
IOVEC_DTYPE = np.dtype([("iov_base", "=u8"), ("iov_len", "=u8")])
# numba records take native byte order only: sin_port and sin_addr hold network-order bytes.
SOCKADDR_IN_DTYPE = np.dtype([("sin_family", "=u2"), ("sin_port", "=u2"), ("sin_addr", "=u4"),
                              ("sin_zero", "=u8")])

assert NLMSGHDR_DTYPE.itemsize == 16 and NFGENMSG_DTYPE.itemsize == 4
assert NFQNL_MSG_PACKET_HDR_DTYPE.itemsize == 7 and NFQNL_MSG_CONFIG_PARAMS_DTYPE.itemsize == 5
assert MMSGHDR_DTYPE.itemsize == 64 and IOVEC_DTYPE.itemsize == 16
assert SOCKADDR_IN_DTYPE.itemsize == 16


def _fo(dtype, name):
    return dtype.fields[name][1]


NLMSG_HDRLEN = NLMSGHDR_DTYPE.itemsize
NFGENMSG_LEN = NFGENMSG_DTYPE.itemsize
NLA_HDRLEN = NLATTR_DTYPE.itemsize
NFQ_MSG_HDRLEN = NLMSG_HDRLEN + NFGENMSG_LEN            # first attribute of an nfqueue message
_NLMSG_LEN = _fo(NLMSGHDR_DTYPE, "nlmsg_len")
_NLMSG_TYPE = _fo(NLMSGHDR_DTYPE, "nlmsg_type")
_NLMSG_FLAGS = _fo(NLMSGHDR_DTYPE, "nlmsg_flags")
_NFGEN_FAMILY = NLMSG_HDRLEN + _fo(NFGENMSG_DTYPE, "nfgen_family")
_NFGEN_VERSION = NLMSG_HDRLEN + _fo(NFGENMSG_DTYPE, "version")
_NFGEN_RES_ID = NLMSG_HDRLEN + _fo(NFGENMSG_DTYPE, "res_id")
_NLA_LEN = _fo(NLATTR_DTYPE, "nla_len")
_NLA_TYPE = _fo(NLATTR_DTYPE, "nla_type")
_PKT_HDR_ID = _fo(NFQNL_MSG_PACKET_HDR_DTYPE, "packet_id")
_VERDICT_HDR_VERDICT = _fo(NFQNL_MSG_VERDICT_HDR_DTYPE, "verdict")
_VERDICT_HDR_ID = _fo(NFQNL_MSG_VERDICT_HDR_DTYPE, "id")

# nlmsg_type of each nfqueue message: subsystem in the high byte.
NFQ_TYPE_PACKET = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
NFQ_TYPE_VERDICT = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
NFQ_TYPE_CONFIG = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
NFQ_TYPE_VERDICT_BATCH = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH

# The kernel clamps copy_range to NFQNL_MAX_COPY_RANGE: nla_len is a u16.
NFQA_PAYLOAD_MAX = 0xFFFF - NLA_HDRLEN
# A verdict message: nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR (+ NFQA_PAYLOAD header and bytes).
VERDICT_MSG_LEN = NFQ_MSG_HDRLEN + NLA_HDRLEN + NFQNL_MSG_VERDICT_HDR_DTYPE.itemsize     # 32
VERDICT_MSG_MAX = VERDICT_MSG_LEN + NLA_HDRLEN + ((NFQA_PAYLOAD_MAX + 3) & ~3)
DEFAULT_SLOT_SIZE = 0x10000 + 4096      # a full-size payload plus every attribute before it
DEFAULT_VBUF_SIZE = 256 * 1024          # verdict buffer; a batch that does not fit is split

# --- backend counters: index into NetlinkQueue.nlq_stats (uint64) ---------------------------------
NLQ_S_BATCHES = 0           # recvmmsg calls that returned messages
NLQ_S_MSGS = 1              # netlink messages received (all types)
NLQ_S_PACKETS = 2           # packets handed to the engine
NLQ_S_ACCEPT = 3            # NF_ACCEPT verdicts without payload
NLQ_S_REWRITE = 4           # NF_ACCEPT verdicts with payload
NLQ_S_DROP = 5              # NF_DROP verdicts from the engine
NLQ_S_BAD_VERDICT = 6       # engine verdict unknown, or REWRITE with length outside 1..cap: dropped
NLQ_S_TRUNCATED = 7         # message cut by the slot or NFQA_CAP_LEN: dropped (DROP_TOO_BIG)
NLQ_S_MALFORMED = 8         # packet message with an id but no usable payload: dropped
NLQ_S_LOST = 9              # packet message without a readable id: no verdict possible
NLQ_S_NL_ERROR = 10         # NLMSG_ERROR from the kernel (e.g. a verdict for an unknown id)
NLQ_S_SEND_ERR = 11         # verdict send() failed (its packets stay queued until close)
NLQ_S_SENDS = 12            # verdict send() calls
NLQ_S_ENOBUFS = 13          # recvmmsg ENOBUFS (socket overrun; NETLINK_NO_ENOBUFS should hide it)
NLQ_S_TX_SENT = 14          # generated packets sent through the raw socket
NLQ_S_TX_ERR = 15           # generated packets not sent (bad bounds or sendmmsg failure)
NLQ_S_LAST_ERRNO = 16       # errno of the last failed send/recv/sendmmsg
NLQ_S_NL_LAST_ERROR = 17    # -error of the last NLMSG_ERROR
NLQ_S_GSO = 18              # packets handed to the engine marked NFQA_SKB_GSO (queued whole)
NLQ_S_CSUM_PARTIAL = 19     # packets handed to the engine marked NFQA_SKB_CSUMNOTREADY
N_NLQ = 24

NLQ_NAMES = {
    NLQ_S_BATCHES: "batches", NLQ_S_MSGS: "messages", NLQ_S_PACKETS: "packets",
    NLQ_S_ACCEPT: "accept", NLQ_S_REWRITE: "rewrite", NLQ_S_DROP: "drop",
    NLQ_S_BAD_VERDICT: "bad_verdict", NLQ_S_TRUNCATED: "truncated", NLQ_S_MALFORMED: "malformed",
    NLQ_S_LOST: "lost", NLQ_S_NL_ERROR: "netlink_errors", NLQ_S_SEND_ERR: "send_errors",
    NLQ_S_SENDS: "sends", NLQ_S_ENOBUFS: "enobufs", NLQ_S_TX_SENT: "tx_sent",
    NLQ_S_TX_ERR: "tx_errors", NLQ_S_LAST_ERRNO: "last_errno",
    NLQ_S_NL_LAST_ERROR: "last_netlink_error", NLQ_S_GSO: "gso_packets",
    NLQ_S_CSUM_PARTIAL: "csum_partial",
}

# Per-batch parse counters (``cnt`` argument of _parse_msgs).
PC_N = 0        # packets for the engine
PC_BAD = 1      # ids to drop without asking the engine
PC_LOST = 2     # packet messages with no readable id
N_PC = 3

# Why the loop returned to Python.
RET_TIMEOUT = 0         # no message within SO_RCVTIMEO
RET_EINTR = 1           # a signal interrupted recvmmsg
RET_MAX_BATCHES = 2
RET_BUDGET = 3          # budget_ns elapsed
RET_ERROR = 4           # recvmmsg failed (errno returned)
RET_NAMES = {RET_TIMEOUT: "timeout", RET_EINTR: "eintr", RET_MAX_BATCHES: "max_batches",
             RET_BUDGET: "budget", RET_ERROR: "error"}

TX_CHUNK = 64           # sendmmsg vector length for generated packets (tables.Tx)


# --- libc, called from nopython code -------------------------------------------------------------
# Pointers are passed as intp (same register class on LP64): numba code gets them from
# ``array.ctypes.data``. ExternalFunction binds by symbol name, so the compiled loop is cacheable.
_recvmmsg = types.ExternalFunction(
    "recvmmsg", types.int32(types.int32, types.intp, types.uint32, types.int32, types.intp))
_sendmmsg = types.ExternalFunction(
    "sendmmsg", types.int32(types.int32, types.intp, types.uint32, types.int32))
_send = types.ExternalFunction("send", types.intp(types.int32, types.intp, types.uintp, types.int32))
_clock_gettime = types.ExternalFunction("clock_gettime", types.int32(types.int32, types.intp))
_errno_location = types.ExternalFunction("__errno_location", types.CPointer(types.int32)())

_EAGAIN = _errno.EAGAIN
_EINTR = _errno.EINTR
_ENOBUFS = _errno.ENOBUFS


@njit(**JIT_OPTIONS)
def _errno_now():
    return numba.carray(_errno_location(), 1)[0]


@njit(**JIT_OPTIONS)
def _now_ns(ts):
    _clock_gettime(CLOCK_MONOTONIC, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


# --- byte access (host order = little endian for netlink's own fields) ---------------------------
@njit(**JIT_OPTIONS)
def _rd_u16(b, p):
    return np.int64(b[p]) | (np.int64(b[p + 1]) << 8)


@njit(**JIT_OPTIONS)
def _rd_u32(b, p):
    return (np.int64(b[p]) | (np.int64(b[p + 1]) << 8) | (np.int64(b[p + 2]) << 16)
            | (np.int64(b[p + 3]) << 24))


@njit(**JIT_OPTIONS)
def _rd_be32(b, p):
    return ((np.int64(b[p]) << 24) | (np.int64(b[p + 1]) << 16) | (np.int64(b[p + 2]) << 8)
            | np.int64(b[p + 3]))


@njit(**JIT_OPTIONS)
def _wr_u16(b, p, v):
    b[p] = v & 0xFF
    b[p + 1] = (v >> 8) & 0xFF


@njit(**JIT_OPTIONS)
def _wr_u32(b, p, v):
    b[p] = v & 0xFF
    b[p + 1] = (v >> 8) & 0xFF
    b[p + 2] = (v >> 16) & 0xFF
    b[p + 3] = (v >> 24) & 0xFF


@njit(**JIT_OPTIONS)
def _wr_be16(b, p, v):
    b[p] = (v >> 8) & 0xFF
    b[p + 1] = v & 0xFF


@njit(**JIT_OPTIONS)
def _wr_be32(b, p, v):
    b[p] = (v >> 24) & 0xFF
    b[p + 1] = (v >> 16) & 0xFF
    b[p + 2] = (v >> 8) & 0xFF
    b[p + 3] = v & 0xFF


# --- parse: netlink messages -> packet arrays ----------------------------------------------------
@njit(**JIT_OPTIONS)
def _parse_msgs(buf, start, end, limit, truncated, pkt_id, off, length, cap, mark, skbinfo,
                bad_id, cnt, nlq, stats):
    """Walk the netlink messages in ``buf[start:end]`` (one received datagram; ``limit`` is the
    end of its slot, ``truncated`` its MSG_TRUNC flag) and append every NFQNL_MSG_PACKET to the
    packet arrays at ``cnt[PC_N]``, or its id to ``bad_id`` at ``cnt[PC_BAD]``. Never raises."""
    pos = start
    while pos + NLMSG_HDRLEN <= end:
        mlen = _rd_u32(buf, pos + _NLMSG_LEN)
        mtype = _rd_u16(buf, pos + _NLMSG_TYPE)
        if mlen < NLMSG_HDRLEN:
            if mtype == NFQ_TYPE_PACKET:
                cnt[PC_LOST] += 1
                nlq[NLQ_S_LOST] += 1
            break
        nlq[NLQ_S_MSGS] += 1
        mend = pos + mlen
        cut = mend > end                    # the datagram ended inside this message
        if cut:
            mend = end
        nxt = pos + ((mlen + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1))
        if mtype == NLMSG_ERROR:
            if pos + NLMSG_HDRLEN + 4 <= mend:
                err = _rd_u32(buf, pos + NLMSG_HDRLEN)
                if err != 0:                # 0 is an ACK
                    nlq[NLQ_S_NL_ERROR] += 1
                    nlq[NLQ_S_NL_LAST_ERROR] = (1 << 32) - err
        elif mtype == NFQ_TYPE_PACKET:
            have_id = False
            pid = np.int64(0)
            pmark = np.int64(0)
            pinfo = np.int64(0)
            poff = np.int64(-1)
            plen = np.int64(0)
            cap_len = np.int64(0)
            family = np.int64(buf[pos + _NFGEN_FAMILY]) if pos + NFQ_MSG_HDRLEN <= mend else 0
            a = pos + NFQ_MSG_HDRLEN
            while a + NLA_HDRLEN <= mend:
                alen = _rd_u16(buf, a + _NLA_LEN)
                atype = _rd_u16(buf, a + _NLA_TYPE) & NLA_TYPE_MASK
                if alen < NLA_HDRLEN:
                    break
                body = a + NLA_HDRLEN
                if a + alen > mend:         # attribute cut by the end of the data
                    if atype == NFQA_PAYLOAD:
                        cut = True
                    break
                if atype == NFQA_PACKET_HDR and alen >= NLA_HDRLEN + 4:
                    pid = _rd_be32(buf, body + _PKT_HDR_ID)
                    have_id = True
                elif atype == NFQA_MARK and alen >= NLA_HDRLEN + 4:
                    pmark = _rd_be32(buf, body)
                elif atype == NFQA_CAP_LEN and alen >= NLA_HDRLEN + 4:
                    cap_len = _rd_be32(buf, body)
                elif atype == NFQA_SKB_INFO and alen >= NLA_HDRLEN + 4:
                    pinfo = _rd_be32(buf, body) & SKB_INFO_KNOWN
                elif atype == NFQA_PAYLOAD:
                    poff = body
                    plen = alen - NLA_HDRLEN
                a += (alen + NLA_ALIGNTO - 1) & ~(NLA_ALIGNTO - 1)
            if not have_id:
                cnt[PC_LOST] += 1
                nlq[NLQ_S_LOST] += 1
            else:
                room = (nxt if nxt < end else limit) - poff
                if room > NFQA_PAYLOAD_MAX:
                    room = NFQA_PAYLOAD_MAX
                good = True
                if cut or truncated or cap_len > plen:
                    nlq[NLQ_S_TRUNCATED] += 1
                    stats[C.DROP_TOO_BIG] += 1
                    good = False
                elif poff < 0 or plen < 20 or family != socket.AF_INET:
                    nlq[NLQ_S_MALFORMED] += 1
                    stats[C.DROP_MALFORMED] += 1
                    good = False
                if good and cnt[PC_N] < off.size:
                    i = cnt[PC_N]
                    pkt_id[i] = pid
                    off[i] = poff
                    length[i] = plen
                    cap[i] = room
                    mark[i] = pmark
                    skbinfo[i] = pinfo
                    if pinfo & C.NFQA_SKB_GSO:
                        nlq[NLQ_S_GSO] += 1
                    if pinfo & C.NFQA_SKB_CSUMNOTREADY:
                        nlq[NLQ_S_CSUM_PARTIAL] += 1
                    cnt[PC_N] = i + 1
                elif cnt[PC_BAD] < bad_id.size:
                    if good:                # no room in the packet arrays: cannot happen with
                        nlq[NLQ_S_MALFORMED] += 1   # one packet per datagram; drop, counted
                        stats[C.DROP_MALFORMED] += 1
                    bad_id[cnt[PC_BAD]] = pid
                    cnt[PC_BAD] += 1
                else:
                    cnt[PC_LOST] += 1
                    nlq[NLQ_S_LOST] += 1
        if cut:
            break
        pos = nxt


# --- build: verdicts -> netlink messages ---------------------------------------------------------
@njit(**JIT_OPTIONS)
def _put_msg_hdr(vbuf, pos, mlen, mtype, res_id):
    _wr_u32(vbuf, pos + _NLMSG_LEN, mlen)
    _wr_u16(vbuf, pos + _NLMSG_TYPE, mtype)
    _wr_u16(vbuf, pos + _NLMSG_FLAGS, NLM_F_REQUEST)
    for k in range(8, NLMSG_HDRLEN):            # nlmsg_seq, nlmsg_pid
        vbuf[pos + k] = 0
    vbuf[pos + _NFGEN_FAMILY] = 0               # AF_UNSPEC
    vbuf[pos + _NFGEN_VERSION] = NFNETLINK_V0
    _wr_be16(vbuf, pos + _NFGEN_RES_ID, res_id)


@njit(**JIT_OPTIONS)
def _put_verdict_hdr(vbuf, a, nf_verdict, pid):
    _wr_u16(vbuf, a + _NLA_LEN, NLA_HDRLEN + 8)
    _wr_u16(vbuf, a + _NLA_TYPE, NFQA_VERDICT_HDR)
    _wr_be32(vbuf, a + NLA_HDRLEN + _VERDICT_HDR_VERDICT, nf_verdict)
    _wr_be32(vbuf, a + NLA_HDRLEN + _VERDICT_HDR_ID, pid)


@njit(**JIT_OPTIONS)
def _put_verdict(vbuf, pos, res_id, pid, nf_verdict):
    """One NFQNL_MSG_VERDICT without payload at ``pos``; returns the position after it."""
    _put_msg_hdr(vbuf, pos, VERDICT_MSG_LEN, NFQ_TYPE_VERDICT, res_id)
    _put_verdict_hdr(vbuf, pos + NFQ_MSG_HDRLEN, nf_verdict, pid)
    return pos + VERDICT_MSG_LEN


@njit(**JIT_OPTIONS)
def _put_verdict_payload(vbuf, pos, res_id, pid, buf, poff, plen):
    """NFQNL_MSG_VERDICT NF_ACCEPT with NFQA_PAYLOAD = buf[poff:poff+plen]."""
    padded = (plen + NLA_ALIGNTO - 1) & ~(NLA_ALIGNTO - 1)
    mlen = VERDICT_MSG_LEN + NLA_HDRLEN + padded
    _put_msg_hdr(vbuf, pos, mlen, NFQ_TYPE_VERDICT, res_id)
    _put_verdict_hdr(vbuf, pos + NFQ_MSG_HDRLEN, NF_ACCEPT, pid)
    a = pos + VERDICT_MSG_LEN
    _wr_u16(vbuf, a + _NLA_LEN, NLA_HDRLEN + plen)
    _wr_u16(vbuf, a + _NLA_TYPE, NFQA_PAYLOAD)
    d = a + NLA_HDRLEN
    vbuf[d:d + plen] = buf[poff:poff + plen]
    for k in range(plen, padded):
        vbuf[d + k] = 0
    return pos + mlen


@njit(**JIT_OPTIONS)
def _put_verdict_batch(vbuf, pos, res_id, pid, nf_verdict):
    """NFQNL_MSG_VERDICT_BATCH: ``nf_verdict`` for every queued id up to ``pid`` (same layout as
    a verdict without payload)."""
    pos2 = _put_verdict(vbuf, pos, res_id, pid, nf_verdict)
    _wr_u16(vbuf, pos + _NLMSG_TYPE, NFQ_TYPE_VERDICT_BATCH)
    return pos2


@njit(**JIT_OPTIONS)
def _use_batch_verdict(verdict, n, lost, batch_verdict):
    """Close the batch with one NFQNL_MSG_VERDICT_BATCH accept? Only if some packet is accepted
    (the kernel answers ENOENT to a batch verdict that matches nothing) and every packet message
    of the batch had a readable id (else the batch verdict would accept an unseen packet)."""
    if not batch_verdict or lost != 0:
        return False
    for i in range(n):
        if verdict[i] == C.VERDICT_ACCEPT:
            return True
    return False


@njit(**JIT_OPTIONS)
def _build_drops(vbuf, pos, res_id, bad_id, nb):
    """NF_DROP messages for the ids the engine never saw. vbuf always has room for them
    (bad_id.size * VERDICT_MSG_LEN <= vbuf.size, checked by the caller)."""
    for j in range(nb):
        pos = _put_verdict(vbuf, pos, res_id, bad_id[j], NF_DROP)
    return pos


@njit(**JIT_OPTIONS)
def _build_verdicts(vbuf, pos, res_id, buf, pkt_id, off, length, cap, verdict, i, n, batch_ok,
                    nlq):
    """Append the verdicts of packets ``i..n-1`` to ``vbuf`` from ``pos`` and, when ``batch_ok``,
    a closing NFQNL_MSG_VERDICT_BATCH accepting every id up to ``pkt_id[n-1]`` (ACCEPT verdicts
    are then not written one by one). Stops when the next message does not fit. Returns
    ``(pos, i)``; everything is written when ``i == n + batch_ok``."""
    while i < n:
        v = verdict[i]
        if v == C.VERDICT_ACCEPT:
            if not batch_ok:
                if pos + VERDICT_MSG_LEN > vbuf.size:
                    return pos, i
                pos = _put_verdict(vbuf, pos, res_id, pkt_id[i], NF_ACCEPT)
            nlq[NLQ_S_ACCEPT] += 1
        elif v == C.VERDICT_REWRITE and 0 < length[i] <= cap[i]:
            plen = np.int64(length[i])
            need = VERDICT_MSG_LEN + NLA_HDRLEN + ((plen + NLA_ALIGNTO - 1) & ~(NLA_ALIGNTO - 1))
            if pos + need > vbuf.size:
                return pos, i
            pos = _put_verdict_payload(vbuf, pos, res_id, pkt_id[i], buf, off[i], plen)
            nlq[NLQ_S_REWRITE] += 1
        else:
            if pos + VERDICT_MSG_LEN > vbuf.size:
                return pos, i
            pos = _put_verdict(vbuf, pos, res_id, pkt_id[i], NF_DROP)
            if v == C.VERDICT_DROP:
                nlq[NLQ_S_DROP] += 1
            else:
                nlq[NLQ_S_BAD_VERDICT] += 1
        i += 1
    if batch_ok and i == n:
        if pos + VERDICT_MSG_LEN > vbuf.size:
            return pos, i
        pos = _put_verdict_batch(vbuf, pos, res_id, pkt_id[n - 1], NF_ACCEPT)
        i = n + 1
    return pos, i


# --- send: generated packets through the raw socket ----------------------------------------------
@njit(**JIT_OPTIONS)
def _send_tx(raw_fd, tx, tx_mm, tx_iov, tx_sin, nlq):
    """sendmmsg every packet of ``tx`` (IPv4, IP_HDRINCL: destination from the header), in
    chunks of tx_mm.size; resets tx.count[0]."""
    total = tx.count[0]
    if total > tx.off.size:
        nlq[NLQ_S_TX_ERR] += total - tx.off.size
        total = tx.off.size
    base = tx.buf.ctypes.data
    i = 0
    while i < total:
        k = 0
        while k < tx_mm.size and i < total:
            o = tx.off[i]
            ln = tx.length[i]
            i += 1
            if o < 0 or ln < 20 or o + ln > tx.buf.size:
                nlq[NLQ_S_TX_ERR] += 1
                continue
            tx_sin[k].sin_family = socket.AF_INET
            tx_sin[k].sin_port = 0
            tx_sin[k].sin_addr = _rd_u32(tx.buf, o + 16)      # daddr, bytes as they are
            tx_iov[k].iov_base = base + o
            tx_iov[k].iov_len = ln
            k += 1
        if k == 0:
            continue
        r = _sendmmsg(raw_fd, tx_mm.ctypes.data, k, 0)
        if r < 0:
            nlq[NLQ_S_LAST_ERRNO] = _errno_now()
            r = 0
        nlq[NLQ_S_TX_SENT] += r
        nlq[NLQ_S_TX_ERR] += k - r
    tx.count[0] = 0


# --- the loop ------------------------------------------------------------------------------------
def make_loop(process_batch):
    """Build the receive/engine/verdict loop around ``process_batch`` (any @njit function with the
    pipeline's signature). The result is a nogil dispatcher, cached on disk per engine."""

    def _nfq_loop(fd, raw_fd, res_id, cfg, wk, tx, rx, rx_mm, slot_size, pkt_id, off, length,
                  cap, mark, skbinfo, verdict, bad_id, cnt, vbuf, tx_mm, tx_iov, tx_sin, ts, nlq,
                  max_batches, budget_ns, batch_verdict):
        """Returns (packets, RET_*, errno)."""
        # Borrowed for the loop's life (dataplane/borrow.py): the caller holds the arrays, and
        # each per-batch call would otherwise pay two atomics per array passed.
        cfg = borrow(cfg)
        wk = borrow(wk)
        tx = borrow(tx)
        rx, pkt_id, off, length, cap, mark, skbinfo, verdict, bad_id, cnt, vbuf, nlq = borrow(
            (rx, pkt_id, off, length, cap, mark, skbinfo, verdict, bad_id, cnt, vbuf, nlq))
        total = 0
        t0 = _now_ns(ts)
        n_slots = rx_mm.size
        for _ in range(max_batches):
            r = _recvmmsg(fd, rx_mm.ctypes.data, n_slots, MSG_WAITFORONE, 0)
            if r < 0:
                err = _errno_now()
                if err == _EAGAIN:
                    # Idle: an empty batch lets the engine expire connections.
                    process_batch(cfg, wk, rx, off, length, cap, mark, skbinfo, verdict, 0,
                                  _now_ns(ts), tx)
                    if tx.count[0] > 0:
                        _send_tx(raw_fd, tx, tx_mm, tx_iov, tx_sin, nlq)
                    return total, RET_TIMEOUT, 0
                if err == _EINTR:
                    return total, RET_EINTR, err
                if err == _ENOBUFS:
                    nlq[NLQ_S_ENOBUFS] += 1
                    continue
                nlq[NLQ_S_LAST_ERRNO] = err
                return total, RET_ERROR, err
            nlq[NLQ_S_BATCHES] += 1
            cnt[PC_N] = 0
            cnt[PC_BAD] = 0
            cnt[PC_LOST] = 0
            for s in range(r):
                base = s * slot_size
                got = np.int64(rx_mm[s].msg_len)
                truncated = (rx_mm[s].msg_flags & MSG_TRUNC) != 0
                _parse_msgs(rx, base, base + min(got, slot_size), base + slot_size, truncated,
                            pkt_id, off, length, cap, mark, skbinfo, bad_id, cnt, nlq, wk.stats)
            n = cnt[PC_N]
            verdict[:n] = C.VERDICT_DROP
            process_batch(cfg, wk, rx, off, length, cap, mark, skbinfo, verdict, n, _now_ns(ts),
                          tx)
            nlq[NLQ_S_PACKETS] += n
            total += n
            batch_ok = _use_batch_verdict(verdict, n, cnt[PC_LOST], batch_verdict)
            pos = _build_drops(vbuf, 0, res_id, bad_id, cnt[PC_BAD])
            i = 0
            end_i = n + 1 if batch_ok else n
            while True:
                pos, i = _build_verdicts(vbuf, pos, res_id, rx, pkt_id, off, length, cap,
                                         verdict, i, n, batch_ok, nlq)
                if pos > 0:
                    nlq[NLQ_S_SENDS] += 1
                    if _send(fd, vbuf.ctypes.data, pos, 0) < 0:
                        nlq[NLQ_S_SEND_ERR] += 1
                        nlq[NLQ_S_LAST_ERRNO] = _errno_now()
                    pos = 0
                if i >= end_i:
                    break
            if tx.count[0] > 0:
                _send_tx(raw_fd, tx, tx_mm, tx_iov, tx_sin, nlq)
            if _now_ns(ts) - t0 >= budget_ns:
                return total, RET_BUDGET, 0
        return total, RET_MAX_BATCHES, 0

    disp = njit(nogil=True)(_nfq_loop)
    disp._cache = _EngineLoopCache(_nfq_loop, engine_fingerprint(process_batch))
    return disp


class _EngineLoopCache(FunctionCache):
    """numba's on-disk cache, keyed by the engine too. numba keys a closure by pickling its cells,
    and a dispatcher pickles to a random uuid: the default key would miss on every start. It would
    also never notice an edit to the engine's modules; the fingerprint does."""

    def __init__(self, py_func, fingerprint):
        super().__init__(py_func)
        self._fingerprint = fingerprint

    def _index_key(self, sig, codegen):
        code = hashlib.sha256(self._py_func.__code__.co_code).hexdigest()
        return (sig, codegen.magic_tuple(), (code, self._fingerprint))

    def load_overload(self, sig, target_context):
        # The index pickles the argument types; one that no longer imports (a renamed
        # namedtuple) makes numba raise instead of missing. Start a fresh index instead.
        try:
            return super().load_overload(sig, target_context)
        except Exception:
            self.flush()
            return None


def engine_fingerprint(process_batch):
    """Name of the engine plus a hash of every module of its package (the engine's helpers live
    next to it: dataplane/*.py for pipeline.process_batch, the test file for a stand-in)."""
    py_func = getattr(process_batch, "py_func", process_batch)
    h = hashlib.sha256(f"{py_func.__module__}.{py_func.__qualname__}".encode())
    src = getattr(py_func.__code__, "co_filename", "")
    folder = Path(src).parent if src else None
    if folder is not None and folder.is_dir():
        for p in sorted(folder.glob("*.py")):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


_LOOPS = {}
_LOOPS_LOCK = threading.Lock()


def get_loop(process_batch):
    """make_loop, memoised per engine for the process (workers of one engine share it)."""
    with _LOOPS_LOCK:
        loop = _LOOPS.get(process_batch)
        if loop is None:
            loop = _LOOPS[process_batch] = make_loop(process_batch)
        return loop


# --- Python-side message encoding (configuration path; tests) ------------------------------------
def _pack(dtype, **fields):
    rec = np.zeros(1, dtype)
    for k, v in fields.items():
        rec[k] = v
    return rec.tobytes()


def nla(nla_type, data):
    """One attribute, padded to NLA_ALIGNTO."""
    data = bytes(data)
    raw = _pack(NLATTR_DTYPE, nla_len=NLA_HDRLEN + len(data), nla_type=nla_type) + data
    return raw + b"\0" * (-len(raw) % NLA_ALIGNTO)


def nlmsg(nlmsg_type, payload, flags=NLM_F_REQUEST, seq=0, pid=0):
    payload = bytes(payload) + b"\0" * (-len(payload) % NLMSG_ALIGNTO)
    return _pack(NLMSGHDR_DTYPE, nlmsg_len=NLMSG_HDRLEN + len(payload), nlmsg_type=nlmsg_type,
                 nlmsg_flags=flags, nlmsg_seq=seq, nlmsg_pid=pid) + payload


def nfgenmsg(family, res_id):
    return _pack(NFGENMSG_DTYPE, nfgen_family=family, version=NFNETLINK_V0, res_id=res_id)


def config_msg(queue_num, seq, cmd=None, pf=socket.AF_INET, copy_mode=None, copy_range=0xFFFF,
               maxlen=None, flags=None, mask=None, ack=True):
    """NFQNL_MSG_CONFIG with the given attributes (the kernel applies the command first)."""
    attrs = b""
    if cmd is not None:
        attrs += nla(NFQA_CFG_CMD, _pack(NFQNL_MSG_CONFIG_CMD_DTYPE, command=cmd, pf=pf))
    if copy_mode is not None:
        attrs += nla(NFQA_CFG_PARAMS, _pack(NFQNL_MSG_CONFIG_PARAMS_DTYPE, copy_range=copy_range,
                                            copy_mode=copy_mode))
    if maxlen is not None:
        attrs += nla(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", maxlen))
    if mask is not None:
        attrs += nla(NFQA_CFG_MASK, struct.pack(">I", mask))
    if flags is not None:
        attrs += nla(NFQA_CFG_FLAGS, struct.pack(">I", flags))
    family = socket.AF_UNSPEC if cmd in (NFQNL_CFG_CMD_PF_BIND, NFQNL_CFG_CMD_PF_UNBIND) else \
        socket.AF_INET
    return nlmsg(NFQ_TYPE_CONFIG, nfgenmsg(family, queue_num) + attrs,
                 NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq)


def iter_nlmsgs(data):
    """(nlmsg_type, nlmsg_seq, message bytes) of each netlink message in ``data``."""
    pos = 0
    while pos + NLMSG_HDRLEN <= len(data):
        hdr = np.frombuffer(data, NLMSGHDR_DTYPE, 1, pos)[0]
        mlen = int(hdr["nlmsg_len"])
        if mlen < NLMSG_HDRLEN or pos + mlen > len(data):
            return
        yield int(hdr["nlmsg_type"]), int(hdr["nlmsg_seq"]), bytes(data[pos:pos + mlen])
        pos += (mlen + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)


# --- wrappers of the kernels (tests, tools) ------------------------------------------------------
Parsed = namedtuple("Parsed", ["pkt_id", "mark", "off", "length", "cap", "bad_id", "lost",
                               "nlq", "skbinfo"])


def parse_msgs(data, limit=None, truncated=False, max_packets=64):
    """Parse one received datagram (bytes) as the loop does. Returns Parsed; ``off`` is relative
    to the start of ``data`` and ``cap`` counts up to ``limit`` (default: len(data))."""
    data = bytes(data)
    limit = len(data) if limit is None else int(limit)
    if limit < len(data):
        raise ValueError("limit must be >= len(data)")
    buf = np.zeros(max(limit, 1), np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    pkt_id = np.zeros(max_packets, np.uint32)
    off = np.zeros(max_packets, np.int64)
    length = np.zeros(max_packets, np.int32)
    cap = np.zeros(max_packets, np.int32)
    mark = np.zeros(max_packets, np.uint32)
    skbinfo = np.zeros(max_packets, np.uint8)
    bad_id = np.zeros(max_packets, np.uint32)
    cnt = np.zeros(N_PC, np.int64)
    nlq = np.zeros(N_NLQ, np.uint64)
    stats = np.zeros(C.N_STATS, np.uint64)
    _parse_msgs(buf, 0, len(data), limit, truncated, pkt_id, off, length, cap, mark, skbinfo,
                bad_id, cnt, nlq, stats)
    n, nb = int(cnt[PC_N]), int(cnt[PC_BAD])
    return Parsed(pkt_id[:n].tolist(), mark[:n].tolist(), off[:n].tolist(), length[:n].tolist(),
                  cap[:n].tolist(), bad_id[:nb].tolist(), int(cnt[PC_LOST]), nlq,
                  skbinfo[:n].tolist())


def build_verdicts(res_id, ids, verdicts, payloads=None, batch_verdict=False, bad_ids=(),
                   vbuf_size=DEFAULT_VBUF_SIZE):
    """Encode verdicts as the loop does. ``verdicts`` are consts.VERDICT_*; ``payloads[i]`` is the
    rewritten packet of a REWRITE. Returns the list of send buffers (bytes), one per send()."""
    n = len(ids)
    if len(verdicts) != n or (payloads is not None and len(payloads) != n):
        raise ValueError("ids, verdicts and payloads must have the same length")
    if vbuf_size < VERDICT_MSG_MAX or vbuf_size < len(bad_ids) * VERDICT_MSG_LEN:
        raise ValueError(f"vbuf_size must be at least {VERDICT_MSG_MAX}")
    payloads = payloads or [b""] * n
    buf = np.frombuffer(b"".join(payloads) or b"\0", np.uint8).copy()
    off = np.zeros(n, np.int64)
    length = np.array([len(p) for p in payloads], np.int32)
    if n:
        off[1:] = np.cumsum(length[:-1])
    cap = length.copy()
    vbuf = np.zeros(vbuf_size, np.uint8)
    nlq = np.zeros(N_NLQ, np.uint64)
    pkt_id = np.array(ids, np.uint32)
    verdict = np.array(verdicts, np.uint8)
    batch_ok = bool(_use_batch_verdict(verdict, n, 0, batch_verdict))
    pos = _build_drops(vbuf, 0, res_id, np.array(bad_ids, np.uint32), len(bad_ids))
    out, i = [], 0
    while True:
        pos, i = _build_verdicts(vbuf, pos, res_id, buf, pkt_id, off, length, cap, verdict, i,
                                 n, batch_ok, nlq)
        if pos:
            out.append(vbuf[:pos].tobytes())
            pos = 0
        if i >= n + batch_ok:
            return out


# --- /proc/net/netfilter/nfnetlink_queue -----------------------------------------------------------
PROC_NFQ = "net/netfilter/nfnetlink_queue"
PROC_NFQ_COLUMNS = ("queue_num", "portid", "queue_total", "copy_mode", "copy_range",
                    "queue_dropped", "user_dropped", "id_sequence")


def parse_proc_nfq(text):
    """{queue_num: {column: int}} from the text of /proc/net/netfilter/nfnetlink_queue."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= len(PROC_NFQ_COLUMNS):
            row = dict(zip(PROC_NFQ_COLUMNS, (int(x) for x in parts)))
            rows[row["queue_num"]] = row
    return rows


# --- the backend -----------------------------------------------------------------------------------
class NetlinkQueue:
    """One NFQUEUE queue served by the batched numba loop. One instance per worker thread.

    ``engine`` is a numba process_batch (None: dataplane.pipeline.process_batch); ``cfg``/``wk``
    its tables; ``tx`` a tables.Tx for generated packets (default: tables.new_tx()). ``batch`` is
    the recvmmsg vector length (packets per engine call, at most). ``open()`` must be called in the
    network namespace of the NFQUEUE rule (the sockets stay bound to it). Call ``close()`` after
    the thread running ``run``/``run_once`` has returned.
    """

    def __init__(self, queue_num, engine, cfg, wk, batch=64, *, tx=None, maxlen=8192,
                 rcvbuf=32 << 20, slot_size=DEFAULT_SLOT_SIZE, vbuf_size=DEFAULT_VBUF_SIZE,
                 timeout_s=0.1, budget_s=0.1, batch_verdict=True, gso=True):
        if not 0 <= queue_num <= 0xFFFF:
            raise ValueError("queue_num must be 0..65535")
        if not 1 <= batch <= 1024:
            raise ValueError("batch must be 1..1024 (recvmmsg vector)")
        if slot_size < 256:
            raise ValueError("slot_size must be >= 256")
        if vbuf_size < max(VERDICT_MSG_MAX, 2 * batch * VERDICT_MSG_LEN):
            raise ValueError("vbuf_size too small for one full-size verdict")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if engine is None:
            from dataplane.pipeline import process_batch as engine
        self.queue_num = queue_num
        self.engine, self.cfg, self.wk = engine, cfg, wk
        self.tx = tx if tx is not None else T.new_tx()
        self.batch, self.maxlen, self.rcvbuf = batch, maxlen, rcvbuf
        self.slot_size, self.timeout_s = slot_size, timeout_s
        self.budget_ns = int(budget_s * C.NS)
        self.batch_verdict = bool(batch_verdict)
        self.gso = bool(gso)
        self.nlq_stats = np.zeros(N_NLQ, np.uint64)
        self.last_return = None         # (packets, RET_*, errno) of the last run_once
        self.open_seconds = None        # wall time of open(), compile or cache load included
        self._sock = self._raw = None
        self._proc_fd = None
        self._seq = 0
        self._overload_base = 0
        # Buffers (allocated once; the kernel writes into rx through rx_mm/rx_iov).
        max_pkts = 2 * batch
        self._rx = np.zeros(batch * slot_size, np.uint8)
        self._rx_iov = np.zeros(batch, IOVEC_DTYPE)
        self._rx_mm = np.zeros(batch, MMSGHDR_DTYPE)
        base = self._rx.ctypes.data
        self._rx_iov["iov_base"] = base + np.arange(batch, dtype=np.uint64) * slot_size
        self._rx_iov["iov_len"] = slot_size
        self._rx_mm["msg_iov"] = self._rx_iov.ctypes.data + np.arange(batch, dtype=np.uint64) * 16
        self._rx_mm["msg_iovlen"] = 1
        self._pkt_id = np.zeros(max_pkts, np.uint32)
        self._off = np.zeros(max_pkts, np.int64)
        self._length = np.zeros(max_pkts, np.int32)
        self._cap = np.zeros(max_pkts, np.int32)
        self._mark = np.zeros(max_pkts, np.uint32)
        self._skbinfo = np.zeros(max_pkts, np.uint8)
        self._verdict = np.zeros(max_pkts, np.uint8)
        self._bad_id = np.zeros(max_pkts, np.uint32)
        self._cnt = np.zeros(N_PC, np.int64)
        self._vbuf = np.zeros(vbuf_size, np.uint8)
        self._tx_sin = np.zeros(TX_CHUNK, SOCKADDR_IN_DTYPE)
        self._tx_iov = np.zeros(TX_CHUNK, IOVEC_DTYPE)
        self._tx_mm = np.zeros(TX_CHUNK, MMSGHDR_DTYPE)
        idx = np.arange(TX_CHUNK, dtype=np.uint64)
        self._tx_mm["msg_name"] = self._tx_sin.ctypes.data + idx * SOCKADDR_IN_DTYPE.itemsize
        self._tx_mm["msg_namelen"] = SOCKADDR_IN_DTYPE.itemsize
        self._tx_mm["msg_iov"] = self._tx_iov.ctypes.data + idx * IOVEC_DTYPE.itemsize
        self._tx_mm["msg_iovlen"] = 1
        self._ts = np.zeros(2, np.int64)
        self._loop = None

    # -- lifecycle --
    def open(self):
        """Compile (or load) the loop, then create, configure and bind the socket."""
        t0 = time.perf_counter()
        self._loop = get_loop(self.engine)
        self._call(-1, -1, 0)                   # compile/load now, before packets queue up
        try:
            self._open_sockets()
        except BaseException:
            self.close()
            raise
        self._overload_base = int(self.wk.stats[C.DROP_OVERLOAD])
        self.open_seconds = time.perf_counter() - t0
        return self

    def _open_sockets(self):
        s = self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        need_snd = 2 * self._vbuf.size + 4096
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, need_snd)
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, need_snd)
        s.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        tv = struct.pack("@ll", int(self.timeout_s), int(self.timeout_s % 1 * 1e6))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        s.bind((0, 0))
        # PF_(UN)BIND are no-ops since Linux 3.8 but still answered; as libnetfilter_queue does.
        self._config(cmd=NFQNL_CFG_CMD_PF_UNBIND, check=False)
        self._config(cmd=NFQNL_CFG_CMD_PF_BIND, check=False)
        # One message: bind, copy mode, queue length, flags, so no packet arrives in the
        # instance's default META mode.
        self._config(cmd=NFQNL_CFG_CMD_BIND, copy_mode=NFQNL_COPY_PACKET, copy_range=0xFFFF,
                     maxlen=self.maxlen, mask=NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO,
                     flags=NFQA_CFG_F_GSO if self.gso else 0)
        self._raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self._proc_fd = os.open(f"/proc/thread-self/{PROC_NFQ}", os.O_RDONLY)

    def _config(self, check=True, **kw):
        self._seq += 1
        seq = self._seq
        self._sock.send(config_msg(self.queue_num, seq, **kw))
        deadline = time.monotonic() + 2.0
        stray = []
        try:
            while time.monotonic() < deadline:
                try:
                    data = self._sock.recv(1 << 17)
                except BlockingIOError:             # SO_RCVTIMEO
                    continue
                for mtype, mseq, msg in iter_nlmsgs(data):
                    if mtype == NFQ_TYPE_PACKET:
                        p = parse_msgs(msg)
                        stray += p.pkt_id + p.bad_id
                    elif mtype == NLMSG_ERROR and mseq == seq:
                        err = -int(np.frombuffer(msg, NLMSGERR_DTYPE, 1, NLMSG_HDRLEN)["error"][0])
                        if err and check:
                            raise OSError(err, f"NFQNL_MSG_CONFIG {kw} on queue "
                                          f"{self.queue_num}: {os.strerror(err)}")
                        return
            raise TimeoutError(f"no answer to NFQNL_MSG_CONFIG on queue {self.queue_num}")
        finally:
            if stray:       # packets queued while configuring: drop them, never fail open
                self.nlq_stats[NLQ_S_MALFORMED] += len(stray)
                self.wk.stats[C.DROP_MALFORMED] += len(stray)
                for out in build_verdicts(self.queue_num, stray, [C.VERDICT_DROP] * len(stray)):
                    try:
                        self._sock.send(out)
                    except OSError:
                        self.nlq_stats[NLQ_S_SEND_ERR] += 1

    def close(self):
        """Unbind the queue and close the sockets (idempotent). Packets still queued are dropped
        by the kernel when the instance goes away."""
        if self._sock is not None:
            try:
                self._config(cmd=NFQNL_CFG_CMD_UNBIND, check=False)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self._proc_fd is not None:
            os.close(self._proc_fd)
            self._proc_fd = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    # -- running --
    def _call(self, fd, raw_fd, max_batches):
        return self._loop(fd, raw_fd, self.queue_num, self.cfg, self.wk, self.tx, self._rx,
                          self._rx_mm, self.slot_size, self._pkt_id, self._off, self._length,
                          self._cap, self._mark, self._skbinfo, self._verdict, self._bad_id,
                          self._cnt, self._vbuf, self._tx_mm, self._tx_iov, self._tx_sin, self._ts,
                          self.nlq_stats, max_batches, self.budget_ns, self.batch_verdict)

    def run_once(self, max_batches=1024):
        """Serve the queue until a receive timeout, a signal, ``max_batches`` batches or the
        time budget; the GIL is released meanwhile. Returns the number of packets processed."""
        if self._sock is None:
            raise RuntimeError("NetlinkQueue is not open")
        n, why, err = self._loop_call(max_batches)
        self.last_return = (n, why, err)
        if why == RET_ERROR:
            raise OSError(err, f"recvmmsg on queue {self.queue_num}: {os.strerror(err)}")
        return n

    def _loop_call(self, max_batches):
        return self._call(self._sock.fileno(), self._raw.fileno(), max_batches)

    def run(self, stop_event, max_batches=1024, stats_interval_s=1.0):
        """run_once until ``stop_event`` is set; refreshes queue_stats every stats_interval_s."""
        next_stats = time.monotonic() + stats_interval_s
        while not stop_event.is_set():
            self.run_once(max_batches)
            if time.monotonic() >= next_stats:
                self.queue_stats()
                next_stats = time.monotonic() + stats_interval_s

    # -- counters --
    def kernel_queue_stats(self):
        """This queue's row of /proc/net/netfilter/nfnetlink_queue (of the namespace open() ran
        in), or None if the queue is not bound."""
        if self._proc_fd is None:
            return None
        os.lseek(self._proc_fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            b = os.read(self._proc_fd, 65536)
            if not b:
                break
            chunks.append(b)
        return parse_proc_nfq(b"".join(chunks).decode()).get(self.queue_num)

    def queue_stats(self):
        """Kernel columns (queue_total, queue_dropped, user_dropped, ...), their sum ``overload``
        (mirrored into wk.stats[DROP_OVERLOAD]) and the backend counters (NLQ_NAMES)."""
        out = {name: int(self.nlq_stats[i]) for i, name in NLQ_NAMES.items()}
        row = self.kernel_queue_stats()
        if row is not None:
            out.update(row)
            overload = row["queue_dropped"] + row["user_dropped"]
            out["overload"] = overload
            self.wk.stats[C.DROP_OVERLOAD] = self._overload_base + overload
        return out


if sys.byteorder != "little" or np.dtype(np.intp).itemsize != 8:   # pragma: no cover
    raise ImportError("dataplane.nfq_netlink supports little-endian LP64 Linux only")
