"""ipvsadm's listings, byte for byte, rendered from a `list` snapshot.

`lvs-dp list` must print what `ipvsadm` 1.31 prints so that operators' scripts (awk on columns,
`ipvsadm -S` diffs, monitoring that greps `-L -n --stats --exact`) keep working. Everything here is
a pure function from a snapshot, the plain JSON-able dict the control socket's `list` command
replies with, to text; nothing reads the tables, the clock or the network.

Snapshot (every key below is read; keys marked optional may be absent)::

    {"version": "1.2.1",                      # optional, the IPVS version in the header line
     "size": 4096,                            # connection hash table size, header line
     "services": [{
         "proto": "TCP" | "UDP" | "SCTP" | "FWM",
         "addr": "172.16.1.100",              # FWM: "0.0.0.0" (IPv4) or "::" (IPv6 fwmark service)
         "port": 80,                          # FWM: 0
         "fwmark": 0,                         # FWM: the mark (an unsigned 32-bit value)
         "sched": "rr",
         "flags": ["sh-port", ...],           # scheduler flags by ipvsadm name, plus "ops"
         "persistent": None | {"timeout": 300, "netmask": "255.255.255.0"},   # IPv6: prefix length
         "pe": "sip",                         # optional persistence engine
         "fwd": "Masq" | "FullNat" | ...,     # service-level method (lvs-dp); not shown by ipvsadm
         "stats": {"conns", "inpkts", "outpkts", "inbytes", "outbytes"},
         "rate": {"cps", "inpps", "outpps", "inbps", "outbps"},
         "laddrs": [{"addr", "conns", "conflicts"}],                # optional, FULLNAT only
         "reals": [{
             "addr": "172.16.2.13", "port": 80,
             "fwd": "Masq" | "Route" | "Tunnel" | "Local" | "FullNat",
             "weight": 10, "active": 0, "inactive": 0,
             "tun": {"type": "ipip" | "gue" | "gre", "port": 6080,          # optional, Tunnel
                     "flags": "nocsum" | "csum" | "remcsum"},
             "stats": {...}, "rate": {...}}]}],
     "conns": [{"proto": "TCP", "expire_s": 897, "state": "ESTABLISHED",
                "caddr", "cport", "vaddr", "vport", "daddr", "dport",
                "pe_name", "pe_data"}],      # pe_* optional; only --persistent-conn shows them
     "timeouts": {"tcp": 900, "tcpfin": 120, "udp": 300}}

An address is IPv6 when it contains ':'; IPv6 addresses print as "[addr]:port".

What is reproduced, all from ipvsadm.c (1.31) and libipvs:

- Always numeric (`-n`). ipvsadm without -n resolves hosts and ports through the resolver and
  /etc/services; lvs-dp never does, so `lvs-dp list` is `ipvsadm -L -n`, whatever the flags.
- Sorting: ipvsadm qsort()s services by (fwmark, address family, protocol, address, port) and real
  servers by (address, port), with comparators that subtract unsigned 32-bit values into an int
  (`r = ntohl(a) - ntohl(b)`). Addresses or marks 2^31 or more apart therefore compare the "wrong"
  way (10.0.0.1 sorts after 172.16.1.100, fwmark 4294967295 before every service) and the order is
  not even transitive, so the result depends on the sort algorithm: glibc's qsort() is a merge sort
  (stdlib/msort.c, whenever its scratch array can be allocated), emulated here step for step.
  The captured goldens show both effects (tests/golden/ipvsadm/list.txt).
- Column layouts (`print_title`, `print_service_entry`): the service name is "%-4s %s" (protocol,
  address:port) cut at 33 characters for IPv4; "FWM  %d" prints the mark as a signed int, as
  ipvsadm 1.31 does (4294967295 prints as -1). --stats/--rate numbers go through
  `print_largenum`: 9 wide, or with K/M/G/T scaling (integer division by 10^3/6/9/12) from 10^8
  up, unless --exact, which widens the column to the number plus one space. In --rate, a real
  server's CPS, InPPS and OutPPS are always printed " %8llu", never scaled.
- Forwarding names are ipvsadm's fwd_name(): Masq, Local, Tunnel, Route (plus DPVS's FullNat).
  "Local" is what older kernels reported for a real server on one of the director's own
  addresses; kernel 6.1 reports it as given (the goldens show such a server as Masq).
- Scheduler flags print by the scheduler's names (sh-fallback/sh-port, mh-fallback/mh-port, else
  flag-1..3) from the bits; the names in the snapshot are aliases of those bits.
- `-L -n -c` prints connections in the snapshot's order (ipvsadm prints /proc/net/ip_vs_conn's hash
  order), expiry as "%02d:%02d" minutes:seconds.
- Option combinations ipvsadm refuses (-c or --timeout with --stats or --rate) raise ValueError.
"""

import ipaddress
import socket

IPVS_VERSION = "1.2.1"

# --- protocol and forwarding names (ipvsadm.c: protocol_name, option_from_protocol, fwd_switch) ---
IPPROTO = {"TCP": 6, "UDP": 17, "SCTP": 132, "FWM": 6}      # ipvsadm -f sets protocol TCP, unused
PROTO_OPTION = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}
# FullNat is not in ipvsadm; its name and switch are DPVS's (whose ipvsadm reads -b as --fullnat,
# where ipvsadm 1.31 reads -b as --sched-flags: a FULLNAT rule never restores into kernel IPVS).
FWD_SWITCH = {"Masq": "-m", "Tunnel": "-i", "Local": "-g", "Route": "-g", "FullNat": "-b"}
TUN_TYPES = ("ipip", "gue", "gre")
TUN_FLAG_OPTION = {"nocsum": "--tun-nocsum", "csum": "--tun-csum", "remcsum": "--tun-remcsum"}

# --- service flags (include/uapi/linux/ip_vs.h) -------------------------------------------------
IP_VS_SVC_F_ONEPACKET = 0x0004
IP_VS_SVC_F_SCHED1 = 0x0008
IP_VS_SVC_F_SCHED2 = 0x0010
IP_VS_SVC_F_SCHED3 = 0x0020
SCHED_FLAGS = {"flag-1": IP_VS_SVC_F_SCHED1, "flag-2": IP_VS_SVC_F_SCHED2, "flag-3": IP_VS_SVC_F_SCHED3,
               "sh-fallback": IP_VS_SVC_F_SCHED1, "sh-port": IP_VS_SVC_F_SCHED2,
               "mh-fallback": IP_VS_SVC_F_SCHED1, "mh-port": IP_VS_SVC_F_SCHED2,
               "ops": IP_VS_SVC_F_ONEPACKET}
IP_VS_SVC_F_SCHED_ANY = IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2 | IP_VS_SVC_F_SCHED3

STATS_KEYS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")
RATE_KEYS = ("cps", "inpps", "outpps", "inbps", "outbps")

_NETMASK_ALL = "255.255.255.255"


# --- helpers -------------------------------------------------------------------------------------

def _is6(addr):
    return ":" in addr


def _addrport(addr, port):
    """addrport_to_anyname(..., FMT_NUMERIC): "a.b.c.d:port" or "[v6]:port"."""
    if _is6(addr):
        return "[%s]:%u" % (socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, addr)), port)
    return "%s:%u" % (addr, port)


def _int32(x):
    """C's conversion of an unsigned 32-bit value to int (two's complement wrap)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def _addr_words(addr):
    if _is6(addr):
        n = int(ipaddress.IPv6Address(addr))
        return [(n >> s) & 0xFFFFFFFF for s in (96, 64, 32, 0)]
    return [int(ipaddress.IPv4Address(addr))]


def _cmp_addr(a1, a2):
    """The address part of ipvs_cmp_services/ipvs_cmp_dests: word by word (the first entry's family
    decides how many words), each difference wrapped to int."""
    r = 0
    w1, w2 = _addr_words(a1), _addr_words(a2)
    for i in range(len(w1)):
        r = _int32(w1[i] - (w2[i] if i < len(w2) else 0))
        if r:
            break
    return r


def _cmp_services(s1, s2):
    """libipvs ipvs_cmp_services."""
    r = _int32(s1.get("fwmark", 0) - s2.get("fwmark", 0))
    if r:
        return r
    r = (10 if _is6(s1["addr"]) else 2) - (10 if _is6(s2["addr"]) else 2)     # AF_INET6 - AF_INET
    if r:
        return r
    r = IPPROTO.get(s1["proto"], 0) - IPPROTO.get(s2["proto"], 0)
    if r:
        return r
    r = _cmp_addr(s1["addr"], s2["addr"])
    if r:
        return r
    return s1["port"] - s2["port"]


def _cmp_dests(d1, d2):
    """libipvs ipvs_cmp_dests."""
    r = _cmp_addr(d1["addr"], d2["addr"])
    if r:
        return r
    return d1["port"] - d2["port"]


def glibc_qsort(items, cmp):
    """glibc's qsort(): a top-down merge sort (msort.c: n1 = n / 2, then merge taking the left
    element while cmp <= 0). With a consistent comparator this is just a stable sort; with
    ipvsadm's wrapping ones it gives the order ipvsadm prints."""
    items = list(items)
    n = len(items)
    if n <= 1:
        return items
    n1 = n // 2
    b1, b2 = glibc_qsort(items[:n1], cmp), glibc_qsort(items[n1:], cmp)
    out, i, j = [], 0, 0
    while i < len(b1) and j < len(b2):
        if cmp(b1[i], b2[j]) <= 0:
            out.append(b1[i])
            i += 1
        else:
            out.append(b2[j])
            j += 1
    return out + b1[i:] + b2[j:]


def _flag_bits(svc):
    bits = 0
    for name in svc.get("flags") or ():
        if name not in SCHED_FLAGS:
            raise ValueError("unknown service flag %r" % (name,))
        bits |= SCHED_FLAGS[name]
    return bits


def _sched_flags(sched, bits):
    """print_sched_flags: the names the scheduler knows the bits by, comma separated."""
    if sched == "sh":
        names = ((IP_VS_SVC_F_SCHED1, "sh-fallback"), (IP_VS_SVC_F_SCHED2, "sh-port"))
    elif sched == "mh":
        names = ((IP_VS_SVC_F_SCHED1, "mh-fallback"), (IP_VS_SVC_F_SCHED2, "mh-port"))
    else:
        names = ((IP_VS_SVC_F_SCHED1, "flag-1"), (IP_VS_SVC_F_SCHED2, "flag-2"), (IP_VS_SVC_F_SCHED3, "flag-3"))
    return ",".join(name for bit, name in names if bits & bit)


def largenum(i, exact=False):
    """print_largenum: one --stats/--rate column, its leading separator included."""
    if exact:
        s = "%d" % i
        return s.rjust(9 if len(s) <= 8 else len(s) + 1)
    if i < 100000000:                       # less than 100 million
        return "%9d" % i
    if i < 1000000000:                      # less than 1 billion
        return "%8dK" % (i // 1000)
    if i < 100000000000:                    # less than 100 billion
        return "%8dM" % (i // 1000000)
    if i < 100000000000000:                 # less than 100 trillion
        return "%8dG" % (i // 1000000000)
    return "%8dT" % (i // 1000000000000)


def _svc_name(svc, rule):
    """The service column: "TCP  a:p" / "FWM  n" in listings, "-t a:p" / "-f n" in rules."""
    six = _is6(svc["addr"])
    if svc.get("fwmark"):
        mark = _int32(svc["fwmark"])                            # printed with %d
        if rule:
            return "-f %d -6" % mark if six else "-f %d" % mark
        return "FWM  %d IPv6" % mark if six else "FWM  %d" % mark
    vname = _addrport(svc["addr"], svc["port"])
    if rule:
        return "%s %s" % (PROTO_OPTION.get(svc["proto"], "--xxx-service"), vname)
    name = "%-4s %s" % (svc["proto"] if svc["proto"] in PROTO_OPTION else "?", vname)
    return name if six else name[:33]


def _dest_name(real, rule):
    dname = _addrport(real["addr"], real["port"])
    return dname if rule or _is6(real["addr"]) else dname[:28]


def _persistence(svc, rule):
    pers = svc.get("persistent")
    if not pers:
        return ""
    out = (" -p %u" if rule else " persistent %u") % pers["timeout"]
    mask = pers.get("netmask")
    if _is6(svc["addr"]):
        if mask is not None and int(mask) != 128:
            out += (" -M %d" if rule else " mask %d") % int(mask)
    elif mask is not None and mask != _NETMASK_ALL:
        out += (" -M %s" if rule else " mask %s") % mask
    return out


def _tunnel_rule(real):
    tun = real.get("tun") or {}
    ttype = tun.get("type", "ipip")
    if ttype == "gre":
        return " --tun-type gre %s" % TUN_FLAG_OPTION[tun.get("flags", "nocsum")]
    if ttype == "gue":
        return " --tun-type gue --tun-port %d %s" % (tun["port"], TUN_FLAG_OPTION[tun.get("flags", "nocsum")])
    if ttype == "ipip":
        return " --tun-type ipip"
    raise ValueError("unknown tunnel type %r" % (ttype,))


# --- ipvsadm -L -n [...] ---------------------------------------------------------------------------

def _title(stats, rate):
    if stats:
        cols = ("Conns", "InPkts", "OutPkts", "InBytes", "OutBytes")
    elif rate:
        cols = ("CPS", "InPPS", "OutPPS", "InBPS", "OutBPS")
    else:
        return ("Prot LocalAddress:Port Scheduler Flags\n"
                "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")
    return "%-33s %8s %8s %8s %8s %8s\n  -> RemoteAddress:Port\n" % (("Prot LocalAddress:Port",) + cols)


def _service_lines(svc, stats, rate, exact):
    name = _svc_name(svc, rule=False)
    bits = _flag_bits(svc)
    if stats:
        st = svc.get("stats") or {}
        line = "%-33s" % name + "".join(largenum(st.get(k, 0), exact) for k in STATS_KEYS)
    elif rate:
        rt = svc.get("rate") or {}
        line = "%-33s" % name + "".join(largenum(rt.get(k, 0), exact) for k in RATE_KEYS)
    else:
        line = "%s %s" % (name, svc["sched"])
        if bits & IP_VS_SVC_F_SCHED_ANY:
            line += " (%s)" % _sched_flags(svc["sched"], bits)
        line += _persistence(svc, rule=False)
        if svc.get("persistent") and svc.get("pe"):
            line += " pe %s" % svc["pe"]
        if bits & IP_VS_SVC_F_ONEPACKET:
            line += " ops"
    lines = [line + "\n"]
    for real in glibc_qsort(svc.get("reals") or (), _cmp_dests):
        dname = _dest_name(real, rule=False)
        if stats:
            st = real.get("stats") or {}
            lines.append("  -> %-28s" % dname + "".join(largenum(st.get(k, 0), exact) for k in STATS_KEYS) + "\n")
        elif rate:
            rt = real.get("rate") or {}
            lines.append("  -> %-28s %8d %8d %8d" % (dname, rt.get("cps", 0), rt.get("inpps", 0), rt.get("outpps", 0))
                         + largenum(rt.get("inbps", 0), exact) + largenum(rt.get("outbps", 0), exact) + "\n")
        else:
            lines.append("  -> %-28s %-7s %-6d %-10u %-10u\n"
                         % (dname, real["fwd"], real["weight"], real.get("active", 0), real.get("inactive", 0)))
    return lines


def _conn_line(c):
    expire = c["expire_s"]
    return "%-3s %-6s %-11s %-18s %-18s %s\n" % (
        c["proto"], "%02d:%02d" % (expire // 60, expire % 60), c["state"],
        _addrport(c["caddr"], c["cport"]), _addrport(c["vaddr"], c["vport"]),
        _addrport(c["daddr"], c["dport"]))


def render_list(snapshot, stats=False, rate=False, exact=False, conns=False, timeout=False):
    """`ipvsadm -L -n` with --stats, --rate, --exact, -c (--connection), --timeout."""
    if (conns or timeout) and (stats or rate):
        raise ValueError("options conflicts in the list command")
    if conns:
        out = ["IPVS connection entries\n",
               "pro expire %-11s %-18s %-18s %s\n" % ("state", "source", "virtual", "destination")]
        out += [_conn_line(c) for c in snapshot.get("conns") or ()]
        return "".join(out)
    if timeout:
        t = snapshot["timeouts"]
        return "Timeout (tcp tcpfin udp): %d %d %d\n" % (t["tcp"], t["tcpfin"], t["udp"])
    out = ["IP Virtual Server version %s (size=%d)\n" % (snapshot.get("version", IPVS_VERSION), snapshot["size"]),
           _title(stats, rate)]
    for svc in glibc_qsort(snapshot.get("services") or (), _cmp_services):
        out += _service_lines(svc, stats, rate, exact)
    return "".join(out)


# --- ipvsadm -S -n ---------------------------------------------------------------------------------

def render_save(snapshot):
    """`ipvsadm -S -n` (ipvsadm-save): the rules that rebuild the table, no header."""
    out = []
    for svc in glibc_qsort(snapshot.get("services") or (), _cmp_services):
        name = _svc_name(svc, rule=True)
        bits = _flag_bits(svc)
        line = "-A %s -s %s" % (name, svc["sched"]) + _persistence(svc, rule=True)
        if svc.get("pe"):
            line += " --pe %s" % svc["pe"]
        if bits & IP_VS_SVC_F_ONEPACKET:
            line += " -o"
        if bits & IP_VS_SVC_F_SCHED_ANY:
            line += " -b " + _sched_flags(svc["sched"], bits)
        out.append(line + "\n")
        for real in glibc_qsort(svc.get("reals") or (), _cmp_dests):
            line = "-a %s -r %s %s -w %d" % (name, _dest_name(real, rule=True), FWD_SWITCH[real["fwd"]], real["weight"])
            if real["fwd"] == "Tunnel":
                line += _tunnel_rule(real)
            out.append(line + "\n")
    return "".join(out)


# --- DPVS ipvsadm -G (--get-laddr) -----------------------------------------------------------------

def render_laddr(snapshot):
    """FULLNAT local addresses in DPVS's `ipvsadm -G` layout (tools/ipvsadm/ipvsadm.c:
    list_laddrs_print_title/_service/_laddr): a title before the first service, then per service
    its VIP:VPORT and number of local addresses (with DPVS's trailing space), then one row per
    local address with its port conflicts and connections. Services come in the snapshot's order
    (DPVS prints its data plane's order, unsorted); a service without "laddrs" lists none."""
    out = []
    for i, svc in enumerate(snapshot.get("services") or ()):
        if i == 0:
            out.append("%-20s %-8s %-20s %-10s %-10s\n" % ("VIP:VPORT", "TOTAL", "SNAT_IP", "CONFLICTS", "CONNS"))
        laddrs = svc.get("laddrs") or ()
        out.append("%-20s %-8u \n" % (_addrport(svc["addr"], svc["port"]), len(laddrs)))
        for la in laddrs:
            out.append("%-20s %-8s %-20s %-10u %-10u\n" % ("", "", la["addr"], la["conflicts"], la["conns"]))
    return "".join(out)
