#!/bin/bash
# Capture golden `ipvsadm` outputs, and the kernel data each one was printed from, for
# tests/unit/test_render.py (control/render.py must reproduce them byte for byte).
#
#   tests/golden/ipvsadm/capture.sh          on the host: boots the ipvs-vm guest with this very
#                                            script, then unpacks *.txt + captures.json next to it
#
# In the guest (the runner starts it as /vm-script; LVSDP_CAPTURE_IN_GUEST=1 forces guest mode in
# another throwaway VM) it builds a small lab, all inside the guest:
#
#   ns lvsc (client 172.16.1.2) --veth-- director (root ns: VIPs 172.16.1.100-.106, 172.16.1.1)
#                                        --bridge lvsbr 172.16.2.1-- ns lvsr13 (172.16.2.13)
#                                                                    ns lvsr14 (172.16.2.14)
#
# defines services that exercise every branch of ipvsadm's listing code (rr/wrr/wlc/sh/mh, flags,
# persistence with netmask and pe, one-packet, fwmark v4 and v6 and 2^32-1, IPv6, NAT/DR/TUN/GUE
# real servers and one on a director address (older kernels called it Local; 6.1 keeps Masq),
# weights 0 and 65535, addresses whose order trips ipvsadm's wrapping comparators), sends real
# traffic (HTTP downloads big enough for --stats K and M scaling, UDP exchanges, a persistence
# template, idle established connections, traffic kept running while --rate is captured), and
# captures:
#
#   ipvsadm -L -n | --stats | --stats --exact | --rate | --rate --exact | -c | --timeout ; ipvsadm -S -n
#
# both on the empty table (empty_*.txt) and on the full one. For each golden, the kernel's own
# numbers are read through IPVS generic netlink (the same source ipvsadm reads: services, dests,
# stats64, rates, info, timeouts) plus /proc/net/ip_vs{,_stats,_conn} right before the ipvsadm
# call, and read again right after; a capture is kept only when the fields that golden displays
# are unchanged between the two reads, so captures.json holds exactly the data each golden was
# rendered from. Connections come from /proc/net/ip_vs_conn, the only input of `ipvsadm -c`; as
# some connection's expiry ticks nearly every instant, the -c goldens are ipvsadm reading one saved
# copy of that file (see conns_via_snapshot; the log shows it agreeing with a plain ipvsadm -c).
# The raw texts (/proc files, `ipvsadm -L -n --stats --exact`, `--rate --exact`) are kept beside
# the parsed data for reference.
#
# Output travels back over the guest console as a base64 tar (lines "B64 ..."), checked by sha256.
# Env (host): IPVS_VM_RUN (runner path), BULK_MB (size of the downloaded file, default 64),
# BULK_ROUNDS (downloads through 172.16.1.100, default 20: 1.3 GB, so the service's OutBytes pass
# 10^9 (--stats "M") and each real server's pass 10^8 ("K")).
set -u

if [ "${0##*/}" != vm-script ] && [ -z "${LVSDP_CAPTURE_IN_GUEST:-}" ]; then
  # ----------------------------------------------------------------------------------- host side
  here=$(cd "$(dirname "$0")" && pwd)
  run=${IPVS_VM_RUN:-/work/shared/tools/ipvs-vm/run}
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  # the guest script gets its parameters through a copy of this file with them prepended
  { echo "BULK_MB=${BULK_MB:-64}; BULK_ROUNDS=${BULK_ROUNDS:-20}"; cat "$here/capture.sh"; } > "$tmp/vm.sh"
  t0=$(date +%s)
  IPVS_VM_TIMEOUT=${IPVS_VM_TIMEOUT:-2400} "$run" "$tmp/vm.sh" > "$tmp/out"; rc=$?
  grep -v '^B64 ' "$tmp/out"
  echo "capture: guest run took $(( $(date +%s) - t0 ))s, rc=$rc" >&2
  [ "$rc" = 0 ] || exit "$rc"
  sed -n 's/^B64 //p' "$tmp/out" | base64 -d > "$tmp/golden.tgz" || exit 1
  want=$(sed -n 's/^SHA256 //p' "$tmp/out")
  got=$(sha256sum < "$tmp/golden.tgz" | cut -d' ' -f1)
  [ -n "$want" ] && [ "$want" = "$got" ] || { echo "capture: archive checksum mismatch" >&2; exit 1; }
  rm -f "$here"/*.txt "$here/captures.json"
  tar xzf "$tmp/golden.tgz" -C "$here"
  echo "capture: wrote $(tar tzf "$tmp/golden.tgz" | tr '\n' ' ')" >&2
  exit 0
fi

# --------------------------------------------------------------------------------------- guest side
BULK_MB=${BULK_MB:-64}; BULK_ROUNDS=${BULK_ROUNDS:-20}
OUT=/tmp/golden; RAW=/tmp/golden-raw
mkdir -p "$OUT" "$RAW" /tmp/www
echo 1 > /proc/sys/kernel/printk            # keep kernel messages off the console we report on
modprobe -q ip_vs_pe_sip 2>/dev/null || true
log() { echo "[$(date +%T)] $*"; }

cat > /tmp/ipvsdump.py <<'PY'
"""IPVS state straight from the kernel: generic netlink family "IPVS" (include/uapi/linux/ip_vs.h)
and /proc/net/ip_vs*. `dump` prints JSON; `same KIND A B` exits 0 when the fields golden KIND shows
are equal in dumps A and B."""
import ipaddress, json, os, socket, struct, subprocess, sys

NETLINK_GENERIC, GENL_ID_CTRL, CTRL_CMD_GETFAMILY = 16, 0x10, 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 1, 4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IPVS_GENL_VERSION = 1
IPVS_CMD_GET_SERVICE, IPVS_CMD_GET_DEST, IPVS_CMD_GET_TIMEOUT, IPVS_CMD_GET_INFO = 4, 8, 13, 15
IPVS_CMD_ATTR_SERVICE, IPVS_CMD_ATTR_DEST = 1, 2
IPVS_CMD_ATTR_TIMEOUT_TCP, IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, IPVS_CMD_ATTR_TIMEOUT_UDP = 4, 5, 6
(IPVS_SVC_ATTR_AF, IPVS_SVC_ATTR_PROTOCOL, IPVS_SVC_ATTR_ADDR, IPVS_SVC_ATTR_PORT,
 IPVS_SVC_ATTR_FWMARK, IPVS_SVC_ATTR_SCHED_NAME, IPVS_SVC_ATTR_FLAGS, IPVS_SVC_ATTR_TIMEOUT,
 IPVS_SVC_ATTR_NETMASK, IPVS_SVC_ATTR_STATS, IPVS_SVC_ATTR_PE_NAME, IPVS_SVC_ATTR_STATS64) = range(1, 13)
(IPVS_DEST_ATTR_ADDR, IPVS_DEST_ATTR_PORT, IPVS_DEST_ATTR_FWD_METHOD, IPVS_DEST_ATTR_WEIGHT,
 IPVS_DEST_ATTR_U_THRESH, IPVS_DEST_ATTR_L_THRESH, IPVS_DEST_ATTR_ACTIVE_CONNS,
 IPVS_DEST_ATTR_INACT_CONNS, IPVS_DEST_ATTR_PERSIST_CONNS, IPVS_DEST_ATTR_STATS,
 IPVS_DEST_ATTR_ADDR_FAMILY, IPVS_DEST_ATTR_STATS64, IPVS_DEST_ATTR_TUN_TYPE,
 IPVS_DEST_ATTR_TUN_PORT, IPVS_DEST_ATTR_TUN_FLAGS) = range(1, 16)
STATS_NAMES = ["conns", "inpkts", "outpkts", "inbytes", "outbytes", "cps", "inpps", "outpps", "inbps", "outbps"]
IPVS_INFO_ATTR_VERSION, IPVS_INFO_ATTR_CONN_TAB_SIZE = 1, 2


def nla(typ, data):
    return struct.pack("=HH", 4 + len(data), typ) + data + b"\0" * (-len(data) % 4)


def attrs(buf):
    out, off = {}, 0
    while off + 4 <= len(buf):
        ln, typ = struct.unpack_from("=HH", buf, off)
        if ln < 4:
            break
        out[typ & 0x3FFF] = buf[off + 4:off + ln]
        off += (ln + 3) & ~3
    return out


class Genl:
    def __init__(self):
        self.s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.s.bind((0, 0))
        self.seq = 0
        fam = self.call(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, nla(CTRL_ATTR_FAMILY_NAME, b"IPVS\0"))
        self.ipvs = struct.unpack("=H", fam[0][CTRL_ATTR_FAMILY_ID])[0]

    def call(self, family, cmd, version, payload=b"", dump=False):
        self.seq += 1
        body = struct.pack("=BBH", cmd, version, 0) + payload
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        self.s.send(struct.pack("=IHHII", 16 + len(body), family, flags, self.seq, 0) + body)
        replies = []
        while True:
            data, off = self.s.recv(1 << 20), 0
            while off + 16 <= len(data):
                ln, typ, _, seq, _ = struct.unpack_from("=IHHII", data, off)
                msg, off = data[off + 16:off + ln], off + ((ln + 3) & ~3)
                if typ == NLMSG_DONE:
                    return replies
                if typ == NLMSG_ERROR:
                    err = struct.unpack_from("=i", msg)[0]
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return replies
                replies.append(attrs(msg[4:]))


def u(b):
    return int.from_bytes(b, sys.byteorder)


def addr(af, b):
    return socket.inet_ntop(socket.AF_INET6, b[:16]) if af == socket.AF_INET6 else socket.inet_ntoa(b[:4])


def stats(nested):
    a = attrs(nested)
    return {name: u(a[i + 1]) for i, name in enumerate(STATS_NAMES) if i + 1 in a}


def dump_kernel():
    g = Genl()
    info = g.call(g.ipvs, IPVS_CMD_GET_INFO, IPVS_GENL_VERSION)[0]
    v = u(info[IPVS_INFO_ATTR_VERSION])
    t = g.call(g.ipvs, IPVS_CMD_GET_TIMEOUT, IPVS_GENL_VERSION)[0]
    out = {
        "info": {"version": "%d.%d.%d" % (v >> 16, (v >> 8) & 0xFF, v & 0xFF),
                 "size": u(info[IPVS_INFO_ATTR_CONN_TAB_SIZE])},
        "timeouts": {"tcp": u(t[IPVS_CMD_ATTR_TIMEOUT_TCP]), "tcpfin": u(t[IPVS_CMD_ATTR_TIMEOUT_TCP_FIN]),
                     "udp": u(t[IPVS_CMD_ATTR_TIMEOUT_UDP])},
        "services": [],
    }
    for rep in g.call(g.ipvs, IPVS_CMD_GET_SERVICE, IPVS_GENL_VERSION, dump=True):
        raw = rep[IPVS_CMD_ATTR_SERVICE]
        a = attrs(raw)
        af = u(a[IPVS_SVC_ATTR_AF])
        flags = struct.unpack("=II", a[IPVS_SVC_ATTR_FLAGS])[0]
        nm = a[IPVS_SVC_ATTR_NETMASK]
        svc = {
            "af": af, "protocol": u(a.get(IPVS_SVC_ATTR_PROTOCOL, b"\0\0")),
            "addr": addr(af, a[IPVS_SVC_ATTR_ADDR]) if IPVS_SVC_ATTR_ADDR in a else None,
            "port": struct.unpack(">H", a[IPVS_SVC_ATTR_PORT])[0] if IPVS_SVC_ATTR_PORT in a else 0,
            "fwmark": u(a.get(IPVS_SVC_ATTR_FWMARK, b"\0\0\0\0")),
            "sched_name": a[IPVS_SVC_ATTR_SCHED_NAME].rstrip(b"\0").decode(),
            "flags": flags, "timeout": u(a[IPVS_SVC_ATTR_TIMEOUT]),
            # IPv4: a network-order mask; IPv6: a prefix length (both as the kernel sends them)
            "netmask": socket.inet_ntoa(nm) if af == socket.AF_INET else u(nm),
            "pe_name": a[IPVS_SVC_ATTR_PE_NAME].rstrip(b"\0").decode() if IPVS_SVC_ATTR_PE_NAME in a else "",
            "stats": stats(a[IPVS_SVC_ATTR_STATS64]),
            "dests": [],
        }
        # ask for this service's dests by the service's own identifying attributes
        ident = nla(IPVS_SVC_ATTR_AF, a[IPVS_SVC_ATTR_AF])
        if svc["fwmark"]:
            ident += nla(IPVS_SVC_ATTR_FWMARK, a[IPVS_SVC_ATTR_FWMARK])
        else:
            ident += b"".join(nla(k, a[k]) for k in (IPVS_SVC_ATTR_PROTOCOL, IPVS_SVC_ATTR_ADDR, IPVS_SVC_ATTR_PORT))
        req = nla(IPVS_CMD_ATTR_SERVICE | 0x8000, ident)
        for drep in g.call(g.ipvs, IPVS_CMD_GET_DEST, IPVS_GENL_VERSION, req, dump=True):
            d = attrs(drep[IPVS_CMD_ATTR_DEST])
            daf = u(d.get(IPVS_DEST_ATTR_ADDR_FAMILY, a[IPVS_SVC_ATTR_AF]))
            svc["dests"].append({
                "af": daf, "addr": addr(daf, d[IPVS_DEST_ATTR_ADDR]),
                "port": struct.unpack(">H", d[IPVS_DEST_ATTR_PORT])[0],
                "fwd_method": u(d[IPVS_DEST_ATTR_FWD_METHOD]), "weight": u(d[IPVS_DEST_ATTR_WEIGHT]),
                "u_threshold": u(d[IPVS_DEST_ATTR_U_THRESH]), "l_threshold": u(d[IPVS_DEST_ATTR_L_THRESH]),
                "activeconns": u(d[IPVS_DEST_ATTR_ACTIVE_CONNS]), "inactconns": u(d[IPVS_DEST_ATTR_INACT_CONNS]),
                "persistconns": u(d[IPVS_DEST_ATTR_PERSIST_CONNS]),
                "tun_type": u(d.get(IPVS_DEST_ATTR_TUN_TYPE, b"\0")),
                "tun_port": struct.unpack(">H", d[IPVS_DEST_ATTR_TUN_PORT])[0] if IPVS_DEST_ATTR_TUN_PORT in d else 0,
                "tun_flags": u(d.get(IPVS_DEST_ATTR_TUN_FLAGS, b"\0\0")),
                "stats": stats(d[IPVS_DEST_ATTR_STATS64]),
            })
        out["services"].append(svc)
    return out


def proc_addr(s):
    # /proc/net/ip_vs_conn: IPv4 as 8 hex digits, IPv6 in full colon form
    return str(ipaddress.ip_address(s)) if ":" in s else socket.inet_ntoa(bytes.fromhex(s))


def parse_conns(text):
    conns = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 9:
            continue
        c = {"proto": f[0], "caddr": proc_addr(f[1]), "cport": int(f[2], 16),
             "vaddr": proc_addr(f[3]), "vport": int(f[4], 16),
             "daddr": proc_addr(f[5]), "dport": int(f[6], 16), "state": f[7], "expire_s": int(f[8])}
        if len(f) >= 11:
            c["pe_name"], c["pe_data"] = f[9], f[10]
        conns.append(c)
    return conns


def read(path):
    with open(path) as f:
        return f.read()


def dump(quick=False, conn_file=None):
    # the reference texts first, the data the golden is checked against last: closest to the capture
    text = {}
    if not quick:
        for argv in (["ipvsadm", "-L", "-n", "--stats", "--exact"], ["ipvsadm", "-L", "-n", "--rate", "--exact"]):
            text[" ".join(argv)] = subprocess.run(argv, capture_output=True, text=True).stdout
        for path in ("/proc/net/ip_vs", "/proc/net/ip_vs_stats"):
            text[path] = read(path)
    conn_text = read(conn_file or "/proc/net/ip_vs_conn")
    out = dump_kernel()
    out["conns"] = parse_conns(conn_text)
    if not quick:
        text["/proc/net/ip_vs_conn"] = conn_text
        out["text"] = text
    return out


# which parts of a dump each kind of golden displays (compared before/after its capture)
SHOWN = {
    "list": ("info", "config", "conncounts"),
    "stats": ("info", "config", "stats"),
    "rate": ("info", "config", "rate"),
    "conns": ("conns",),
    "timeout": ("timeouts",),
    "save": ("config",),
}


def project(d, kind):
    parts = SHOWN[kind]
    out = {}
    if "info" in parts:
        out["info"] = d["info"]
    if "timeouts" in parts:
        out["timeouts"] = d["timeouts"]
    if "conns" in parts:
        out["conns"] = d["conns"]
    svcs = []
    for s in d["services"]:
        p = {k: v for k, v in s.items() if k not in ("stats", "dests")}
        dests = []
        for e in s["dests"]:
            q = {k: v for k, v in e.items() if k not in ("stats", "activeconns", "inactconns", "persistconns")}
            if "conncounts" in parts:
                q.update(activeconns=e["activeconns"], inactconns=e["inactconns"])
            for key, names in (("stats", STATS_NAMES[:5]), ("rate", STATS_NAMES[5:])):
                if key in parts:
                    q[key] = [e["stats"][n] for n in names]
            dests.append(q)
        for key, names in (("stats", STATS_NAMES[:5]), ("rate", STATS_NAMES[5:])):
            if key in parts:
                p[key] = [s["stats"][n] for n in names]
        p["dests"] = dests
        svcs.append(p)
    if {"config", "stats", "rate", "conncounts"} & set(parts):
        out["services"] = svcs
    return out


if __name__ == "__main__":
    if sys.argv[1] in ("dump", "quick"):      # [CONN_FILE]: connections read earlier, not now
        conn_file = sys.argv[2] if len(sys.argv) > 2 else None
        json.dump(dump(quick=sys.argv[1] == "quick", conn_file=conn_file), sys.stdout, indent=1, sort_keys=True)
    elif sys.argv[1] == "same":
        kind, a, b = sys.argv[2:5]
        da, db = (json.load(open(p)) for p in (a, b))
        sys.exit(0 if project(da, kind) == project(db, kind) else 1)
    elif sys.argv[1] == "merge":          # merge RAW/*.json (+ .argv) into one captures.json
        raw_dir, meta = sys.argv[2], {}
        for name in sorted(os.listdir(raw_dir)):
            if name.endswith(".json"):
                golden = name[:-5] + ".txt"
                m = json.load(open(os.path.join(raw_dir, name[:-5] + ".meta")))
                raw = json.load(open(os.path.join(raw_dir, name)))
                if m["kind"] != "conns":     # connections only where shown: they are most of the bulk
                    del raw["conns"]
                    raw["text"].pop("/proc/net/ip_vs_conn", None)
                m["raw"] = raw
                meta[golden] = m
        json.dump({"ipvsadm": sys.argv[3], "kernel": sys.argv[4], "goldens": meta},
                  sys.stdout, indent=1, sort_keys=True)
PY

# conns_via_snapshot FILE ARGS...: `ipvsadm ARGS` reading FILE as its /proc/net/ip_vs_conn: in a
# private mount namespace a tmpfs hides /proc (a bind mount over a /proc/PID/net file does not
# stick: those dentries are never cached); ipvsadm talks netlink for everything else.
conns_via_snapshot() {
  local file=$1; shift
  unshare -m --propagation private sh -c \
    'f=$1; shift; mount -t tmpfs lvsdp-conn /proc && mkdir /proc/net && cp "$f" /proc/net/ip_vs_conn &&
     exec ipvsadm "$@"' sh "$file" "$@"
}

# check_conns_via_snapshot: a plain `ipvsadm -L -n -c` whose proc file did not change around it
# must equal conns_via_snapshot's rendering of that same file (few connections: try a while)
check_conns_via_snapshot() {
  local try
  for try in $(seq 1 60); do
    cat /proc/net/ip_vs_conn > /tmp/cc.before
    ipvsadm -L -n -c > /tmp/cc.direct
    cat /proc/net/ip_vs_conn > /tmp/cc.after
    if cmp -s /tmp/cc.before /tmp/cc.after; then
      conns_via_snapshot /tmp/cc.before -L -n -c > /tmp/cc.snap
      if cmp -s /tmp/cc.direct /tmp/cc.snap; then
        log "conns check: plain ipvsadm -c equals its rendering of the saved proc file ($(wc -l < /tmp/cc.direct) lines)"
        return 0
      fi
      log "conns check: MISMATCH between plain and saved-file ipvsadm -c"; diff /tmp/cc.direct /tmp/cc.snap; exit 1
    fi
  done
  log "conns check: no quiet window in 60 tries (not checked)"
}

# golden NAME KIND ARGS...: capture `ipvsadm ARGS` into NAME.txt, with the dump it came from
golden() {
  local name=$1 kind=$2; shift 2
  local try
  for try in $(seq 1 40); do
    if [ "$kind" = conns ]; then
      # Every connection's expiry ticks at its own phase of the second, so with a few hundred of
      # them no read-ipvsadm-read window is quiet. `ipvsadm -c` only prints /proc/net/ip_vs_conn
      # (list_conn), so it is shown one kernel snapshot of that file in place of the live one
      # (conns_via_snapshot, checked against a plain capture by check_conns_via_snapshot).
      cat /proc/net/ip_vs_conn > "$RAW/$name.conn"
      conns_via_snapshot "$RAW/$name.conn" "$@" > "$OUT/$name.txt" || { log "ipvsadm $* failed"; exit 1; }
      python3 /tmp/ipvsdump.py dump "$RAW/$name.conn" > "$RAW/$name.json" || { log "dump failed"; exit 1; }
      cp "$RAW/$name.json" "$RAW/$name.after"
    else
      python3 /tmp/ipvsdump.py dump > "$RAW/$name.json" || { log "dump failed"; exit 1; }
      ipvsadm "$@" > "$OUT/$name.txt" || { log "ipvsadm $* failed"; exit 1; }
      python3 /tmp/ipvsdump.py quick > "$RAW/$name.after"
    fi
    if python3 /tmp/ipvsdump.py same "$kind" "$RAW/$name.json" "$RAW/$name.after"; then
      rm -f "$RAW/$name.after" "$RAW/$name.conn" "$RAW/$name.conn2"
      python3 -c 'import json,sys; print(json.dumps({"argv": sys.argv[2:], "kind": sys.argv[1]}))' \
        "$kind" ipvsadm "$@" > "$RAW/$name.meta"
      log "golden $name.txt (ipvsadm $*) after $try attempt(s)"
      return 0
    fi
    sleep 0.3
  done
  log "golden $name.txt: data kept changing, giving up"; exit 1
}

all_goldens() {   # PREFIX: the whole set of listings
  local p=$1
  golden "${p}list" list -L -n
  golden "${p}list_stats" stats -L -n --stats
  golden "${p}list_stats_exact" stats -L -n --stats --exact
  golden "${p}list_conns" conns -L -n -c
  golden "${p}list_timeout" timeout -L -n --timeout
  golden "${p}save" save -S -n
}

log "$(ipvsadm --version)"
ipvsadm -C
golden empty_list list -L -n
golden empty_list_stats stats -L -n --stats
golden empty_list_stats_exact stats -L -n --stats --exact
golden empty_list_rate rate -L -n --rate
golden empty_list_rate_exact rate -L -n --rate --exact
golden empty_list_conns conns -L -n -c
golden empty_list_timeout timeout -L -n --timeout
golden empty_save save -S -n

# ------------------------------------------------------------------------------------------- lab
sysctl -qw net.ipv4.ip_forward=1 net.ipv4.vs.conntrack=0
ip link set lo up
ip netns add lvsc; ip netns add lvsr13; ip netns add lvsr14
ip link add lvsc-d type veth peer name lvsc-c
ip link set lvsc-c netns lvsc
ip addr add 172.16.1.1/24 dev lvsc-d
for v in 100 101 102 103 104 105 106; do ip addr add 172.16.1.$v/32 dev lvsc-d; done
ip link set lvsc-d up
ip -n lvsc link set lo up; ip -n lvsc link set lvsc-c up
ip -n lvsc addr add 172.16.1.2/24 dev lvsc-c; ip -n lvsc route add default via 172.16.1.1
ip link add lvsbr type bridge; ip addr add 172.16.2.1/24 dev lvsbr; ip link set lvsbr up
for r in 13 14; do
  ip link add lvsr$r-d type veth peer name lvsr$r-r
  ip link set lvsr$r-r netns lvsr$r; ip link set lvsr$r-d master lvsbr up
  ip -n lvsr$r link set lo up; ip -n lvsr$r link set lvsr$r-r up
  ip -n lvsr$r addr add 172.16.2.$r/24 dev lvsr$r-r; ip -n lvsr$r route add default via 172.16.2.1
done
iptables -t mangle -A PREROUTING -d 172.16.1.102 -p tcp --dport 80 -j MARK --set-mark 1

echo hello > /tmp/www/index.html
dd if=/dev/urandom of=/tmp/www/big bs=1M count="$BULK_MB" status=none
for r in 13 14 root; do
  cat > /tmp/nginx-$r.conf <<EOF
daemon on; worker_processes 1; pid /tmp/nginx-$r.pid; error_log /tmp/nginx-$r.err;
user root;
events { worker_connections 256; }
http { access_log off; sendfile on; keepalive_timeout 0; client_header_timeout 3600s;
       client_body_temp_path /tmp/nginx-$r-body; proxy_temp_path /tmp/nginx-$r-proxy;
       fastcgi_temp_path /tmp/nginx-$r-fcgi; uwsgi_temp_path /tmp/nginx-$r-uwsgi; scgi_temp_path /tmp/nginx-$r-scgi;
       server { listen 80; root /tmp/www; } }
EOF
  if [ $r = root ]; then nginx -c /tmp/nginx-$r.conf; else ip netns exec lvsr$r nginx -c /tmp/nginx-$r.conf; fi \
    || { log "nginx $r failed"; cat /tmp/nginx-$r.err; exit 1; }
done
cat > /tmp/udpecho.py <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5353))
while True:
    data, peer = s.recvfrom(2048); s.sendto(data, peer)
PY
for r in 13 14; do ip netns exec lvsr$r python3 /tmp/udpecho.py & done
cat > /tmp/udpsend.py <<'PY'
import socket, sys
n = int(sys.argv[1])
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    s.sendto(b"query %d" % i, ("172.16.1.100", 53))
    try:
        s.recvfrom(2048)
    except OSError as e:
        print("udp:", e)
PY
cat > /tmp/hold.py <<'PY'
import socket, time, sys
s = socket.create_connection((sys.argv[1], 80)); time.sleep(100000)
PY

# ------------------------------------------------------------------------------------- services
# added in an order unlike ipvsadm's sorted one; real servers likewise
ipvsadm -A -t 192.168.100.1:8080 -s wrr
ipvsadm -a -t 192.168.100.1:8080 -r 172.16.2.14:8080 -m -w 65535
ipvsadm -a -t 192.168.100.1:8080 -r 172.16.2.13:8080 -m -w 0
ipvsadm -A -f 1 -s wlc
ipvsadm -a -f 1 -r 172.16.2.14:80 -m -w 1
ipvsadm -a -f 1 -r 172.16.2.13:80 -m -w 1
ipvsadm -A -t 172.16.1.100:80 -s rr
ipvsadm -a -t 172.16.1.100:80 -r 172.16.2.14:80 -m -w 10
ipvsadm -a -t 172.16.1.100:80 -r 172.16.2.13:80 -m -w 10
ipvsadm -A -u 172.16.1.100:53 -s rr
ipvsadm -a -u 172.16.1.100:53 -r 172.16.2.13:5353 -m -w 1
ipvsadm -a -u 172.16.1.100:53 -r 172.16.2.14:5353 -m -w 1
ipvsadm -A -t 10.0.0.1:80 -s rr
ipvsadm -a -t 10.0.0.1:80 -r 172.16.2.16 -i -w 1
ipvsadm -a -t 10.0.0.1:80 -r 172.16.2.15 -g -w 1
ipvsadm -a -t 10.0.0.1:80 -r 10.0.0.2 -g -w 2
ipvsadm -a -t 10.0.0.1:80 -r 172.16.2.17 -i --tun-type gue --tun-port 6080 --tun-nocsum -w 1 \
  || log "no GUE tunnel real server (kernel/ipvsadm refused)"
ipvsadm -A -t 172.16.1.101:80 -s wrr -p 300 -M 255.255.255.0
ipvsadm -a -t 172.16.1.101:80 -r 172.16.2.13:80 -m -w 3
ipvsadm -a -t 172.16.1.101:80 -r 172.16.2.14:80 -m -w 1
ipvsadm -A -t 172.16.1.103:80 -s sh -b sh-port
ipvsadm -a -t 172.16.1.103:80 -r 172.16.2.13:80 -m
ipvsadm -a -t 172.16.1.103:80 -r 172.16.2.14:80 -m
ipvsadm -A -t 172.16.1.104:80 -s mh -b mh-port,mh-fallback
ipvsadm -a -t 172.16.1.104:80 -r 172.16.2.13:80 -m
ipvsadm -a -t 172.16.1.104:80 -r 172.16.1.1:80 -m          # an address of the director: Local
ipvsadm -A -u 172.16.1.105:514 -s lc -o
ipvsadm -a -u 172.16.1.105:514 -r 172.16.2.13:514 -m
ipvsadm -A -u 172.16.1.106:5060 -s rr -p 60 --pe sip || log "no sip persistence engine"
ipvsadm -a -u 172.16.1.106:5060 -r 172.16.2.14:5060 -m 2>/dev/null || true
ipvsadm -A -t 172.16.1.107:80 -s rr -b flag-1,flag-3 -p
ipvsadm -A -t [2001:db8::1]:443 -s wlc -p 120 -M 64
ipvsadm -a -t [2001:db8::1]:443 -r [2001:db8::20]:8443 -m -w 5
ipvsadm -a -t [2001:db8::1]:443 -r [2001:db8::10]:8443 -m -w 5
ipvsadm -A -f 2 -6 -s sed
ipvsadm -a -f 2 -6 -r [2001:db8::10]:80 -g -w 1
ipvsadm -A -f 4294967295 -s rr
log "services defined: $(ipvsadm -S -n | grep -c '^-A') services"

# --------------------------------------------------------------------------------------- traffic
C="ip netns exec lvsc"
# two idle established connections (held to the end), checked while they are the only ones
$C python3 /tmp/hold.py 172.16.1.100 & hold1=$!
$C python3 /tmp/hold.py 172.16.1.101 & hold2=$!
sleep 2
check_conns_via_snapshot
for i in 1 2 3 4 5 6; do $C curl -s -o /dev/null --max-time 30 http://172.16.1.100/ || log "curl .100 failed"; done
t0=$(date +%s%N)
for i in $(seq 1 "$BULK_ROUNDS"); do
  $C curl -s -o /dev/null --max-time 600 http://172.16.1.100/big || log "bulk curl failed"
done
log "bulk: $BULK_ROUNDS x ${BULK_MB} MB in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
for i in 1 2 3; do $C curl -s -o /dev/null --max-time 30 http://172.16.1.101/ || log "curl .101 failed"; done
for i in 1 2; do $C curl -s -o /dev/null --max-time 30 http://172.16.1.102/ || log "curl fwmark failed"; done
for i in 1 2; do $C curl -s -o /dev/null --max-time 30 http://172.16.1.103/ || log "curl sh failed"; done
for i in 1 2 3; do $C curl -s -o /dev/null --max-time 30 http://172.16.1.104/ || log "curl mh failed"; done
$C python3 /tmp/udpsend.py 5
sleep 1

# traffic kept flowing while the rate estimator (2 s period) settles, then --rate is captured
# (each loop in its own process group, so that stopping it stops the curl it is running too)
setsid bash -c "while :; do $C curl -s -o /dev/null --limit-rate 400k --max-time 60 http://172.16.1.100/big; done" & bg1=$!
setsid bash -c "while :; do $C curl -s -o /dev/null --max-time 10 http://172.16.1.100/; sleep 1; done" & bg2=$!
setsid bash -c "while :; do $C python3 /tmp/udpsend.py 1; sleep 1; done" & bg3=$!
sleep 12
golden list_rate rate -L -n --rate
golden list_rate_exact rate -L -n --rate --exact
for p in $bg1 $bg2 $bg3; do kill -- -$p; done
wait $bg1 $bg2 $bg3 2>/dev/null
sleep 3
all_goldens ""
ipvsadm --set 1800 60 240
golden list_timeout_set timeout -L -n --timeout
kill $hold1 $hold2 2>/dev/null

# ---------------------------------------------------------------------------------------- report
python3 /tmp/ipvsdump.py merge "$RAW" "$(ipvsadm --version)" "$(uname -r)" > "$OUT/captures.json"
tar czf /tmp/golden.tgz -C "$OUT" .
echo "SHA256 $(sha256sum < /tmp/golden.tgz | cut -d' ' -f1)"
base64 -w 76 /tmp/golden.tgz | sed 's/^/B64 /'
