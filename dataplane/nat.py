"""Address and port rewriting for NAT (IPVS's masquerading, ip_vs_nat_xmit / handle_response) and
for ICMP errors that belong to a connection (ip_vs_nat_icmp).

All checksum work is incremental (RFC 1624) except for ICMP errors, whose short message is summed
again after the quoted header changes. The functions rewrite in place and return nothing; the
caller has already validated the headers with dataplane/parse.py.
"""

from numba import njit

from dataplane import consts as C
from dataplane import parse as P
from dataplane.csum import JIT, csum_replace2, csum_replace4, icmp_checksum, rd16, rd32, wr16, wr32


@njit(**JIT)
def _l4_check_at(proto, l4):
    if proto == C.IPPROTO_TCP:
        return l4 + P.TCP_CHECK
    return l4 + P.UDP_CHECK


@njit(**JIT)
def set_addr(buf, o, proto, l4, l4_complete, which, new_addr):
    """Rewrite the source (which=0) or destination (which=1) address, fixing the IP checksum
    and the TCP/UDP pseudo-header checksum. l4_complete is False for a later fragment (no L4
    header) and for a quoted datagram (its L4 checksum is not ours to fix, as in IPVS)."""
    at = o + (P.IP_SADDR if which == 0 else P.IP_DADDR)
    old = rd32(buf, at)
    if old == new_addr:
        return
    wr32(buf, at, new_addr)
    wr16(buf, o + P.IP_CHECK, csum_replace4(rd16(buf, o + P.IP_CHECK), old, new_addr))
    if l4_complete and (proto == C.IPPROTO_TCP or proto == C.IPPROTO_UDP):
        ck = _l4_check_at(proto, l4)
        old_ck = rd16(buf, ck)
        if proto == C.IPPROTO_UDP and old_ck == 0:
            return      # UDP without checksum stays without one
        new_ck = csum_replace4(old_ck, old, new_addr)
        if proto == C.IPPROTO_UDP and new_ck == 0:
            new_ck = 0xFFFF
        wr16(buf, ck, new_ck)


@njit(**JIT)
def set_port(buf, proto, l4, l4_complete, which, new_port):
    at = l4 + (0 if which == 0 else 2)
    old = rd16(buf, at)
    if old == new_port:
        return
    wr16(buf, at, new_port)
    if l4_complete:
        ck = _l4_check_at(proto, l4)
        old_ck = rd16(buf, ck)
        if proto == C.IPPROTO_UDP and old_ck == 0:
            return
        new_ck = csum_replace2(old_ck, old, new_port)
        if proto == C.IPPROTO_UDP and new_ck == 0:
            new_ck = 0xFFFF
        wr16(buf, ck, new_ck)


@njit(**JIT)
def nat_rewrite(buf, o, proto, l4, l4_complete, direction, c):
    """Masquerading: in = destination VIP:vport -> real server; out = source real server -> VIP."""
    if direction == C.DIR_IN:
        set_addr(buf, o, proto, l4, l4_complete, 1, c['daddr'])
        if l4_complete:
            set_port(buf, proto, l4, True, 1, c['dport'])
    else:
        set_addr(buf, o, proto, l4, l4_complete, 0, c['vaddr'])
        if l4_complete:
            set_port(buf, proto, l4, True, 0, c['vport'])


@njit(**JIT)
def nat_icmp(buf, o, l4, l4len, q, direction, c):
    """Translate an ICMP error about a connection.

    direction is that of the ICMP message itself. An error travelling out (from the real-server
    side to the client) quotes a datagram that went in, already rewritten to the real server:
    its destination goes back to VIP:vport, and the outer source becomes the VIP so the client
    sees the error come from where it sent. An error travelling in (from the client side) quotes
    a reply that came from the VIP: its source becomes the real server and so does the outer
    destination. Quoted L4 checksums are left alone (the quote is usually truncated; IPVS does
    the same); the ICMP checksum is summed again over the whole message.
    """
    io = l4 + 8
    iproto = q[P.P_PROTO]
    il4 = q[P.P_L4OFF]
    fnat = (c['flags'] & C.CONN_F_FULLNAT) != 0
    if direction == C.DIR_OUT:
        set_addr(buf, o, C.IPPROTO_ICMP, l4, False, 0, c['vaddr'])
        set_addr(buf, io, iproto, il4, False, 1, c['vaddr'])
        wr16(buf, il4 + 2, c['vport'])
        if fnat:
            # The quote went laddr:lport -> RS; the client must read client -> VIP.
            set_addr(buf, o, C.IPPROTO_ICMP, l4, False, 1, c['caddr'])
            set_addr(buf, io, iproto, il4, False, 0, c['caddr'])
            wr16(buf, il4, c['cport'])
    else:
        set_addr(buf, o, C.IPPROTO_ICMP, l4, False, 1, c['daddr'])
        set_addr(buf, io, iproto, il4, False, 0, c['daddr'])
        wr16(buf, il4, c['dport'])
        if fnat:
            # The quote went VIP -> client; the real server must read RS -> laddr:lport.
            set_addr(buf, o, C.IPPROTO_ICMP, l4, False, 0, c['laddr'])
            set_addr(buf, io, iproto, il4, False, 1, c['laddr'])
            wr16(buf, il4 + 2, c['lport'])
    wr16(buf, l4 + P.ICMP_CHECK, icmp_checksum(buf, l4, l4len))
