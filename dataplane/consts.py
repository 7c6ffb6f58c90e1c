"""Every constant the packet path and the control plane share: verdicts, drop reasons, forwarding
methods, schedulers, connection states and their default timeouts.

Names follow the kernel (IPVS's ``IP_VS_TCP_S_*``, ``IP_VS_CONN_F_*``) where the kernel has the
concept, and ``FWD_FULLNAT``-style names where it does not. Values are plain ints so numba sees them
as compile-time constants.
"""

import numpy as np

# --- verdicts (one per packet of a batch) -------------------------------------------------------
VERDICT_DROP = 0        # drop the packet (its reason is counted in the worker's stats)
VERDICT_ACCEPT = 1      # accept unchanged (not ours, or ours and nothing to rewrite)
VERDICT_REWRITE = 2     # accept with the rewritten payload (buffer slice, new length)

# --- per-packet input flags: process_batch's ``skbinfo`` array (uint8, one per packet) ------------
# The kernel's NFQA_SKB_INFO bits (include/uapi/linux/netfilter/nfnetlink_queue.h), same values, so
# the batched netlink backend copies the attribute as it is; 0 (every other caller) is "a finished
# packet", today's behaviour. See dataplane/csum.py l4_settle for what the engine does with them.
NFQA_SKB_CSUMNOTREADY = 1 << 0      # CHECKSUM_PARTIAL: the L4 check field holds the pseudo-header
#                                     sum only; the payload was never summed
NFQA_SKB_GSO = 1 << 1               # a GSO packet: larger than the MTU, segmented after us
NFQA_SKB_CSUM_NOTVERIFIED = 1 << 2  # the checksum was not verified (informational)

# --- worker counters: index into Worker.stats (uint64) -------------------------------------------
# Drop reasons first; each one is a label in `lvs-dp list --stats` and in metrics.
DROP_NONE = 0
DROP_MALFORMED = 1          # truncated or inconsistent IPv4/TCP/UDP/ICMP header
DROP_FRAGMENT = 2           # later fragment whose first fragment was not seen (or forgotten)
DROP_NO_DEST = 3            # service has no available real server (and no sorry server)
DROP_CONN_FULL = 4          # connection table full: new connection refused
DROP_NO_SERVICE_PORT = 5    # reserved
DROP_ICMP_NO_CONN = 6       # ICMP error that names a balanced address but no connection
DROP_LADDR_EXHAUSTED = 7    # FULLNAT: no free local port
DROP_SYNPROXY_BAD_ACK = 8   # SYN-proxy: ACK whose cookie does not check
DROP_SYNPROXY_ACK_STORM = 9
DROP_OVERLOAD = 10          # queue overflow seen by the backend (drop-and-count, never fail open)
DROP_TX_FULL = 11           # no room to emit a generated packet
DROP_TOO_BIG = 12           # rewrite would exceed the packet's buffer capacity
DROP_SYNPROXY_SYN_SENT = 13     # SYN-proxy: client segment while the real server's handshake is
#                                 pending (SYN_SENT); the client retransmits it
DROP_SYNPROXY_RS_RST = 14       # SYN-proxy: the real server refused (RST to our SYN) or never
#                                 answered; the client got a RST, the connection was freed
DROP_SYNPROXY_DEFER = 15        # SYN-proxy with synproxy_defer: cookie ACK without data (the
#                                 connection is made on the client's first data segment)
N_DROP = 16
# Drop reasons past N_DROP (the first 16 slots are full); their ids sit among the counters'.
DROP_SYNPROXY_SYNSEND_QLEN = 36     # SYN-proxy: client segment while SYN_SENT beyond
#                                     synproxy_ack_skb_store_thresh (the patch's SYNPROXY_SYNSEND_QLEN)
DROP_CSUM_PARTIAL = 40      # rewritten packet whose partial checksum cannot be finished here (a
#                             fragment, or not TCP/UDP, marked NFQA_SKB_CSUMNOTREADY/GSO)

DROP_NAMES = {
    DROP_MALFORMED: "malformed",
    DROP_FRAGMENT: "fragment",
    DROP_NO_DEST: "no_dest",
    DROP_CONN_FULL: "conn_table_full",
    DROP_ICMP_NO_CONN: "icmp_no_conn",
    DROP_LADDR_EXHAUSTED: "laddr_exhausted",
    DROP_SYNPROXY_BAD_ACK: "synproxy_bad_ack",
    DROP_SYNPROXY_ACK_STORM: "synproxy_ack_storm",
    DROP_OVERLOAD: "overload",
    DROP_TX_FULL: "tx_full",
    DROP_TOO_BIG: "too_big",
    DROP_SYNPROXY_SYN_SENT: "synproxy_syn_sent",
    DROP_SYNPROXY_RS_RST: "synproxy_rs_refused",
    DROP_SYNPROXY_DEFER: "synproxy_defer",
    DROP_SYNPROXY_SYNSEND_QLEN: "synproxy_synsend_qlen",
    DROP_CSUM_PARTIAL: "csum_partial",
}

# Other counters follow the drop reasons in the same array.
STAT_PKTS = 16              # packets seen by the engine
STAT_NOT_OURS = 17          # accepted unchanged: no service, no connection
STAT_REWRITTEN = 18
STAT_CONN_NEW = 19
STAT_CONN_EXPIRED = 20
STAT_ICMP_XLATE = 21        # ICMP errors translated for a connection
STAT_TEMPLATE_NEW = 22      # persistence templates created
STAT_TEMPLATE_HIT = 23      # new connections placed by a template
STAT_IP_OPTIONS = 24        # packets with IP options handled
STAT_SYNPROXY_COOKIE_SENT = 25
STAT_SYNPROXY_ACK_STORED = 26
STAT_SYNPROXY_RS_SYN_RETRY = 27
STAT_TOA_NO_ROOM = 28
STAT_CONN_REUSED = 29       # a new SYN on a closed/time_wait connection re-scheduled it
# A TCP packet to a service with no connection that is not a SYN goes to the local stack, which
# answers with a RST, as IPVS does (ip_vs_in: no sloppy_tcp): the client learns at once that its
# connection is gone (after a restart, say) instead of retrying into silence.
STAT_NOT_SYN = 30
STAT_SORRY = 31             # new connections sent to the sorry server
STAT_FRAG_XLATE = 32        # later fragments rewritten by their first fragment's connection
STAT_SYNPROXY_OK_ACK = 33   # SYN-proxy: valid cookie ACKs (connection created, SYN sent to the RS)
STAT_SYNPROXY_RS_SYNACK = 34    # SYN-proxy: RS SYN-ACKs consumed (ACK sent to the RS: ESTABLISHED)
STAT_SYNPROXY_ACK_DATA = 35     # SYN-proxy: cookie ACKs that carried data (dropped; retransmitted)
STAT_SYNPROXY_CONN_REUSED = 37  # SYN-proxy: a cookie-valid ACK or a SYN freed an entry in a
#                                 synproxy_conn_reuse_* state and started a new connection
STAT_SYNPROXY_NO_WAIT_SLOT = 38     # SYN-proxy: no wait slot free (no held segments, no timed
#                                     SYN retries for that connection; Worker.sp_wait_cid)
STAT_FNAT_REPLY_NO_CONN = 39    # FULLNAT: a packet to a local address matched no connection (late
                                # after expiry, or steered to a worker that does not own its port)
STAT_GSO_PACKETS = 41       # packets the engine saw marked NFQA_SKB_GSO (queued whole, > MTU)
STAT_CSUM_SETTLED = 42      # rewritten packets whose L4 checksum l4_settle set from scratch
N_STATS = 64

STAT_NAMES = {
    STAT_PKTS: "packets",
    STAT_NOT_OURS: "not_ours",
    STAT_REWRITTEN: "rewritten",
    STAT_CONN_NEW: "conn_new",
    STAT_CONN_EXPIRED: "conn_expired",
    STAT_ICMP_XLATE: "icmp_translated",
    STAT_TEMPLATE_NEW: "template_new",
    STAT_TEMPLATE_HIT: "template_hit",
    STAT_IP_OPTIONS: "ip_options",
    STAT_SYNPROXY_COOKIE_SENT: "synproxy_cookie_sent",
    STAT_SYNPROXY_ACK_STORED: "synproxy_ack_stored",
    STAT_SYNPROXY_RS_SYN_RETRY: "synproxy_rs_syn_retry",
    STAT_TOA_NO_ROOM: "toa_no_room",
    STAT_CONN_REUSED: "conn_reused",
    STAT_NOT_SYN: "no_conn_not_syn_passed",
    STAT_SORRY: "sorry_server",
    STAT_FRAG_XLATE: "fragments_translated",
    STAT_SYNPROXY_OK_ACK: "synproxy_ack_ok",
    STAT_SYNPROXY_RS_SYNACK: "synproxy_rs_synack",
    STAT_SYNPROXY_ACK_DATA: "synproxy_ack_with_data",
    STAT_SYNPROXY_CONN_REUSED: "synproxy_conn_reused",
    STAT_SYNPROXY_NO_WAIT_SLOT: "synproxy_no_wait_slot",
    STAT_FNAT_REPLY_NO_CONN: "fnat_reply_no_conn",
    STAT_GSO_PACKETS: "gso_packets",
    STAT_CSUM_SETTLED: "csum_settled",
}

# --- protocols ------------------------------------------------------------------------------------
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
PROTO_NAMES = {IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_ICMP: "ICMP"}

# --- forwarding methods (ipvsadm's names in FWD_NAMES) --------------------------------------------
FWD_MASQ = 1        # NAT (lb_kind NAT, ipvsadm -m)
FWD_DROUTE = 2      # DR (lb_kind DR, -g): parsed, not forwarded by lvs-dp
FWD_TUNNEL = 3      # TUN (lb_kind TUN, -i): parsed, not forwarded by lvs-dp
FWD_FULLNAT = 4     # FNAT (patched kernel's lb_kind FNAT)
FWD_NAMES = {FWD_MASQ: "Masq", FWD_DROUTE: "Route", FWD_TUNNEL: "Tunnel", FWD_FULLNAT: "FullNat"}

# --- schedulers (IPVS names) -----------------------------------------------------------------------
SCHED_RR = 1
SCHED_WRR = 2
SCHED_LC = 3
SCHED_WLC = 4
SCHED_SH = 5
SCHED_DH = 6
SCHED_SED = 7
SCHED_NQ = 8
SCHED_MH = 9
SCHED_NAMES = {SCHED_RR: "rr", SCHED_WRR: "wrr", SCHED_LC: "lc", SCHED_WLC: "wlc", SCHED_SH: "sh",
               SCHED_DH: "dh", SCHED_SED: "sed", SCHED_NQ: "nq", SCHED_MH: "mh"}
SCHED_BY_NAME = {v: k for k, v in SCHED_NAMES.items()}
# Size of the per-service lookup ring used by sh, dh and mh. Prime, as Maglev needs (IPVS's mh
# default, CONFIG_IP_VS_MH_TAB_INDEX=12, is 4093 too).
RING_SIZE = 4093

# --- service flags (Service.flags) -----------------------------------------------------------------
SVC_F_PERSISTENT = 0x1      # persistence_timeout set: templates place new connections
SVC_F_SYNPROXY = 0x2        # syn_proxy
SVC_F_TOA = 0x4             # FULLNAT: insert the TOA option
SVC_F_PROXY_V1 = 0x8        # FULLNAT: PROXY protocol v1 header
SVC_F_PROXY_V2 = 0x10       # FULLNAT: PROXY protocol v2 header
SVC_F_SH_PORT = 0x20        # sh/mh: hash source port too (ipvsadm sh-port / mh-port)
SVC_F_ONEPACKET = 0x40      # UDP one-packet scheduling (ipvsadm -o)
SVC_F_SORRY = 0x80          # the sorry server is in use (set by control when no real server is alive)
SVC_F_FNAT_TS_XLATE = 0x100 # FULLNAT: translate TCP timestamps instead of stripping them from the
                            # SYN (lvs-dp run --fnat-timestamp translate; dataplane/fullnat.py)

# --- real-server (destination) flags (Dest.flags) --------------------------------------------------
DEST_F_AVAILABLE = 0x1      # schedulable: control clears it when a health check fails
DEST_F_SORRY = 0x2          # this destination is the service's sorry server

# --- connection flags (Conn.flags) -----------------------------------------------------------------
# Kernel values (include/uapi/linux/ip_vs.h) where the kernel has the flag; ours use bits IPVS
# leaves free.
IP_VS_CONN_F_NOOUTPUT = 0x0080
IP_VS_CONN_F_INACTIVE = 0x0100   # counted in the destination's inactconns, not activeconns
IP_VS_CONN_F_TEMPLATE = 0x1000
CONN_F_FULLNAT = 0x0008
CONN_F_SYNPROXY = 0x0010
CONN_F_ISN_SET = 0x0020    # FULLNAT: the RS-side ISN and seq deltas are fixed (first SYN seen)
CONN_F_TS_XLATE = 0x0040   # FULLNAT: timestamps translated (Conn.ts_off), decided at the first SYN
CONN_F_PP_ACKED = 0x4000   # FULLNAT: the real server acknowledged the PROXY protocol header
CONN_F_IN_USE = 0x8000

# --- TCP states, as IPVS numbers them (ip_vs_proto_tcp.c) -----------------------------------------
IP_VS_TCP_S_NONE = 0
IP_VS_TCP_S_ESTABLISHED = 1
IP_VS_TCP_S_SYN_SENT = 2
IP_VS_TCP_S_SYN_RECV = 3
IP_VS_TCP_S_FIN_WAIT = 4
IP_VS_TCP_S_TIME_WAIT = 5
IP_VS_TCP_S_CLOSE = 6
IP_VS_TCP_S_CLOSE_WAIT = 7
IP_VS_TCP_S_LAST_ACK = 8
IP_VS_TCP_S_LISTEN = 9
IP_VS_TCP_S_SYNACK = 10
IP_VS_TCP_S_LAST = 11
# UDP and ICMP connections have one state each; they share the numbering space so one `state`
# column and one timeout array serve all protocols (ipvsadm -lc prints "UDP" / "ICMP").
IP_VS_UDP_S_NORMAL = 11
IP_VS_ICMP_S_NORMAL = 12
N_STATES = 13

STATE_NAMES = ["NONE", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT", "TIME_WAIT", "CLOSE",
               "CLOSE_WAIT", "LAST_ACK", "LISTEN", "SYNACK", "UDP", "ICMP"]

# Default timeouts in seconds (ip_vs_proto_tcp.c tcp_timeouts[], ip_vs_proto_udp.c udp_timeouts[]).
# `ipvsadm --set tcp tcpfin udp` sets ESTABLISHED, FIN_WAIT and UDP.
DEFAULT_TIMEOUTS_S = np.array([
    2,          # NONE
    15 * 60,    # ESTABLISHED
    2 * 60,     # SYN_SENT
    1 * 60,     # SYN_RECV
    2 * 60,     # FIN_WAIT
    2 * 60,     # TIME_WAIT
    10,         # CLOSE
    60,         # CLOSE_WAIT
    30,         # LAST_ACK
    2 * 60,     # LISTEN
    120,        # SYNACK
    5 * 60,     # UDP
    60,         # ICMP
    7,          # FULLNAT TIME_WAIT (DPVS's default)
    3,          # FULLNAT CLOSE (DPVS's default)
], dtype=np.int64)
# A FULLNAT connection's local port is only free again when its entry expires, so its finished
# states are held briefly, as DPVS and the patched kernel do: the real server keeps its own
# TIME_WAIT, and a reused laddr:lport gets a larger ISN (pipeline.fnat_isn) that it accepts.
TIMEOUT_FNAT_TIME_WAIT = 13
TIMEOUT_FNAT_CLOSE = 14

# TCP state transition table, IPVS's tcp_states[] verbatim: rows are (direction offset + event),
# columns the current state. Direction offsets: INPUT (client -> real server) 0, OUTPUT (real
# server -> client) 4, INPUT_ONLY 8 (no reply seen yet by a one-way method). Events: syn, fin,
# ack, rst, in this order (rst wins, then syn, fin, ack: see tcp_event in conntrack).
TCP_DIR_INPUT = 0
TCP_DIR_OUTPUT = 4
TCP_DIR_INPUT_ONLY = 8
_sNO, _sES, _sSS, _sSR, _sFW, _sTW, _sCL, _sCW, _sLA, _sLI, _sSA = range(11)
TCP_STATES = np.array([
    # INPUT      sNO  sES  sSS  sSR  sFW  sTW  sCL  sCW  sLA  sLI  sSA
    [_sSR, _sES, _sES, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR],   # syn
    [_sCL, _sCW, _sSS, _sTW, _sTW, _sTW, _sCL, _sCW, _sLA, _sLI, _sTW],   # fin
    [_sCL, _sES, _sSS, _sES, _sFW, _sTW, _sCL, _sCW, _sCL, _sLI, _sES],   # ack
    [_sCL, _sCL, _sCL, _sSR, _sCL, _sCL, _sCL, _sCL, _sLA, _sLI, _sSR],   # rst
    # OUTPUT
    [_sSS, _sES, _sSS, _sSR, _sSS, _sSS, _sSS, _sSS, _sSS, _sLI, _sSR],   # syn
    [_sTW, _sFW, _sSS, _sTW, _sFW, _sTW, _sCL, _sTW, _sLA, _sLI, _sTW],   # fin
    [_sES, _sES, _sSS, _sES, _sFW, _sTW, _sCL, _sCW, _sLA, _sES, _sES],   # ack
    [_sCL, _sCL, _sSS, _sCL, _sCL, _sTW, _sCL, _sCL, _sCL, _sCL, _sCL],   # rst
    # INPUT-ONLY
    [_sSR, _sES, _sES, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR],   # syn
    [_sCL, _sFW, _sSS, _sTW, _sFW, _sTW, _sCL, _sCW, _sLA, _sLI, _sTW],   # fin
    [_sCL, _sES, _sSS, _sES, _sFW, _sTW, _sCL, _sCW, _sCL, _sLI, _sES],   # ack
    [_sCL, _sCL, _sCL, _sSR, _sCL, _sCL, _sCL, _sCL, _sLA, _sLI, _sCL],   # rst
], dtype=np.uint8)
TCP_EV_SYN = 0
TCP_EV_FIN = 1
TCP_EV_ACK = 2
TCP_EV_RST = 3
TCP_EV_NONE = -1

# TCP flag bits
TH_FIN = 0x01
TH_SYN = 0x02
TH_RST = 0x04
TH_PSH = 0x08
TH_ACK = 0x10
TH_URG = 0x20

# Connection direction of a packet (index-table entries carry it in their low bit).
DIR_IN = 0      # client -> service (or to the real server, after rewrite)
DIR_OUT = 1     # real server -> client

NS = 1_000_000_000
