"""Side-by-side load tests in the namespace lab: lvs-dp (both backends) against the kernel.

Everything here runs inside one `control.lab.Lab`: load comes from the client namespace, the
balancer under test runs in the lb namespace, sinks and nginx in rs3/rs4. Nothing is sent to any
other address, every load generator is bounded in time (and trafgen also in packet count), and
each mode undoes what it set up on exit, even when a measurement fails (the lab's teardown then
removes the namespaces with whatever is left).

Modes (one balancer at a time, same lab, same service: VIP:80/tcp and VIP:9000/udp, rr over the
two real servers, NAT):

* ``lvsdp-netlink`` / ``lvsdp-nfqueue`` -- ``lvs-dp run CONFIG --backend ...`` (control/labrun.py);
  ``lvsdp-netlink-nogso`` (only when named) adds ``--no-gso``
* ``kernel-nat`` -- netfilter DNAT in nat PREROUTING, ``-m statistic --mode nth`` round robin;
  no SNAT (the real servers route the client network back through the balancer).
* ``kernel-ipvs`` -- ipvsadm, NAT (-m), rr; only where the kernel has IPVS (`ipvs_status`).

Metrics: HTTP keep-alive requests/s and latency percentiles (``wrk -t1 -c32 --latency``; nginx as
Debian ships it answers in one segment, and ``http_keepalive_seg`` asks for the page that nginx
sends as two, see `control.lab.SEGMENTED_PATH`), new connections/s (the same with
``Connection: close``), 64-byte UDP packets/s counted by the sinks
(trafgen in the client namespace), and bulk TCP throughput (curl of the lab's /big).

Runnable without pytest (e.g. in the IPVS guest, /work/shared/tools/ipvs-vm)::

    python3 -m bench.labkit --modes kernel-nat,kernel-ipvs --rounds 3 --seconds 4
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from control.lab import HTTP_PORT, RS_IPS, RS_KEYS, SEGMENTED_PATH, LabError

UDP_PORT = 9000
UDP_FLOWS = 8                   # client source ports 10000..10007: both real servers get some
UDP_FRAME = 64                  # Ethernet frame without FCS: 14 + 20 IPv4 + 8 UDP + 22 payload
WRK_CONNS = 32
LVSDP_MODES = ("lvsdp-netlink", "lvsdp-nfqueue")
KERNEL_MODES = ("kernel-nat", "kernel-ipvs")
ALL_MODES = LVSDP_MODES + KERNEL_MODES
# On request only (--modes): the netlink backend without NFQA_CFG_F_GSO (lvs-dp run --no-gso), to
# measure what queueing GSO packets whole buys under the same load.
EXTRA_MODES = ("lvsdp-netlink-nogso",)
BASELINE = "kernel-nat"
NAT_CHAIN = "BENCH-KNAT"
START_TIMEOUT_S = 300
# The benchmark lab's options. bridge-nf-call-iptables off: the bridge in the balancer namespace
# stands in for the seed lab's switch, which is outside the balancer; with it on, every frame from
# a real server would also cross the balancer's iptables at bridge level (br_netfilter), a cost no
# balancer with a plain NIC pays. Both kernel NAT and lvs-dp run without it.
LAB_OPTIONS = {"access_log": False, "bridge_nf_call_iptables": 0}

CONFIG = """\
! lvs-dp benchmark service: written by bench/labkit.py into the lab's directory.
virtual_server {vip} {http} {{
    lb_algo rr
    lb_kind NAT
    protocol TCP
    real_server {rs3} {http} {{
        weight 1
    }}
    real_server {rs4} {http} {{
        weight 1
    }}
}}
virtual_server {vip} {udp} {{
    lb_algo rr
    lb_kind NAT
    protocol UDP
    real_server {rs3} {udp} {{
        weight 1
    }}
    real_server {rs4} {udp} {{
        weight 1
    }}
}}
"""

# A UDP sink: counts datagrams read from its socket (recvmmsg through ctypes, 256 per call) and
# appends "<CLOCK_MONOTONIC seconds> <count>" to a file every 50 ms, so rates can be taken over
# any window. CLOCK_MONOTONIC is the same in every namespace.
SINK = textwrap.dedent('''\
    import ctypes, socket, struct, sys, time
    port, path = int(sys.argv[1]), sys.argv[2]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50000))
    s.bind(("0.0.0.0", port))
    out = open(path, "a", buffering=1)
    VLEN, SZ = 256, 2048
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    class msghdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                    ("iov", ctypes.POINTER(iovec)), ("iovlen", ctypes.c_size_t),
                    ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]
    class mmsghdr(ctypes.Structure):
        _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
    bufs = ctypes.create_string_buffer(VLEN * SZ)
    iovs = (iovec * VLEN)()
    msgs = (mmsghdr * VLEN)()
    base = ctypes.addressof(bufs)
    for i in range(VLEN):
        iovs[i].base, iovs[i].len = base + i * SZ, SZ
        msgs[i].hdr.iov = ctypes.pointer(iovs[i])
        msgs[i].hdr.iovlen = 1
    libc = ctypes.CDLL(None, use_errno=True)
    fd, count, last = s.fileno(), 0, 0.0
    MSG_WAITFORONE = 0x10000
    print(f"{time.monotonic():.6f} {count}", file=out)
    while True:
        n = libc.recvmmsg(fd, msgs, VLEN, MSG_WAITFORONE, None)
        if n > 0:
            count += n
        now = time.monotonic()
        if now - last >= 0.05:
            print(f"{now:.6f} {count}", file=out)
            last = now
''')


class BenchError(AssertionError):
    """A measurement did not do what it claims (failed requests, no packets, ...)."""


# --- environment ----------------------------------------------------------------------------------
def ipvs_status() -> tuple[bool, str]:
    """(available, reason). Reads /proc/config.gz first so that a kernel without IPVS is never
    asked to load it; otherwise `ipvsadm -L -n` (which loads ip_vs) must answer."""
    if shutil.which("ipvsadm") is None:
        return False, "ipvsadm is not installed"
    try:
        import gzip
        with gzip.open("/proc/config.gz", "rt") as f:
            cfg = f.read()
        m = re.search(r"^(CONFIG_IP_VS=\S+|# CONFIG_IP_VS is not set)", cfg, re.M)
        if m and m.group(1).startswith("#"):
            return False, f"this kernel ({os.uname().release}) has no IPVS: {m.group(1)}"
    except OSError:
        pass
    r = subprocess.run(["ipvsadm", "-L", "-n"], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        return False, f"ipvsadm -L -n failed: {r.stderr.strip()}"
    return True, "IPVS available"


def tool_versions() -> dict:
    out = {}
    for name, argv in (("wrk", ["wrk", "-v"]), ("nginx", ["nginx", "-v"]),
                       ("trafgen", ["trafgen", "-v"]), ("iptables", ["iptables", "-V"]),
                       ("curl", ["curl", "-V"])):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            line = (r.stdout + r.stderr).strip().splitlines()
            out[name] = line[0] if line else ""
        except (OSError, subprocess.TimeoutExpired):
            out[name] = "missing"
    return out


def write_config(lab) -> Path:
    path = Path(lab.dir) / "bench-lvsdp.conf"
    path.write_text(CONFIG.format(vip=lab.vip, http=HTTP_PORT, udp=UDP_PORT,
                                  rs3=RS_IPS["rs3"], rs4=RS_IPS["rs4"]))
    return path


def start_sinks(lab) -> dict:
    """A UDP sink on UDP_PORT in each real server; returns {rs: count file}."""
    script = Path(lab.dir) / "udp_sink.py"
    script.write_text(SINK)
    files = {}
    for rs in RS_KEYS:
        f = Path(lab.dir) / f"{rs}-sink.txt"
        lab.popen(rs, [sys.executable, str(script), str(UDP_PORT), str(f)], name=f"{rs}-udp-sink")
        files[rs] = f
    deadline = time.monotonic() + 10
    for rs in RS_KEYS:
        while not (files[rs].exists() and files[rs].read_text().strip()):
            if time.monotonic() > deadline:
                raise LabError(f"UDP sink in {rs} did not start")
            time.sleep(0.05)
    return files


def read_sink(path) -> list[tuple[float, int]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            rows.append((float(parts[0]), int(parts[1])))
    return rows


def count_at(rows, t) -> int:
    """Sink count at time t: the last sample taken at or before t (0 before the first)."""
    c = 0
    for ts, n in rows:
        if ts > t:
            break
        c = n
    return c


# --- modes ------------------------------------------------------------------------------------------
class Mode:
    name = "?"

    def __init__(self, lab, config):
        self.lab, self.config = lab, config

    def __enter__(self):
        self.start()
        try:
            self.smoke()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def smoke(self):
        """Two requests through the VIP reach both real servers (rr): the mode really balances."""
        bodies = set()
        for _ in range(4):
            r = self.lab.curl(f"http://{self.lab.vip}/", timeout=5, check=False)
            if r.returncode != 0:
                raise BenchError(f"{self.name}: curl through the VIP failed: {r.stderr.strip()}")
            bodies.add(r.stdout.strip())
        if bodies != {"<h1>Hello Server3</h1>", "<h1>Hello Server4</h1>"}:
            raise BenchError(f"{self.name}: VIP answered {bodies}, expected both real servers")

    def conns_per_rs(self, proto) -> dict:
        raise NotImplementedError

    def start(self):
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError


class LvsDpMode(Mode):
    def __init__(self, lab, config, backend, extra=(), name=None):
        super().__init__(lab, config)
        self.backend = backend
        self.extra = tuple(extra)
        self.name = name or f"lvsdp-{backend}"
        self.lb = None
        self.start_s = None

    def start(self):
        from control.labrun import LvsDp
        t0 = time.monotonic()
        # A cold numba cache (any edit of dataplane/ selects a fresh one) compiles the engine
        # before the daemon answers: minutes on a busy machine, hence the generous timeout.
        self.lb = LvsDp(self.lab, self.config, backend=self.backend,
                        extra=self.extra).start(timeout=START_TIMEOUT_S)
        self.start_s = time.monotonic() - t0

    def stop(self):
        if self.lb is not None:
            self.lb.stop()
            self.lb = None

    def snapshot(self):
        return self.lb.snapshot()

    def _service(self, proto):
        """The benchmark service of `proto` in lvs-dp's snapshot (None if it is not there)."""
        port = HTTP_PORT if proto == "tcp" else UDP_PORT
        for svc in self.snapshot()["services"]:
            if svc["proto"] == proto.upper() and svc["addr"] == self.lab.vip and svc["port"] == port:
                return svc
        return None

    def conns_per_rs(self, proto):
        svc = self._service(proto)
        return {r["addr"]: r["stats"]["conns"] for r in svc["reals"]} if svc else {}

    def drops(self):
        return self.snapshot().get("dataplane", {}).get("drops", {})

    def packets(self, proto):
        """Packets of the service in both directions (lvs-dp's InPkts + OutPkts)."""
        svc = self._service(proto)
        return svc["stats"]["inpkts"] + svc["stats"]["outpkts"] if svc else None


class KernelNatMode(Mode):
    """netfilter DNAT, round robin with the statistic match, in the balancer namespace."""
    name = "kernel-nat"

    def _ipt(self, *args, check=True):
        return self.lab.run("lb", ["iptables", "-w", "5", *args], check=check)

    def start(self):
        self._ipt("-t", "nat", "-N", NAT_CHAIN)
        for proto, port in (("tcp", HTTP_PORT), ("udp", UDP_PORT)):
            base = ["-t", "nat", "-A", NAT_CHAIN, "-d", self.lab.vip, "-p", proto, "--dport", str(port)]
            self._ipt(*base, "-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0",
                      "-j", "DNAT", "--to-destination", f"{RS_IPS['rs3']}:{port}")
            self._ipt(*base, "-j", "DNAT", "--to-destination", f"{RS_IPS['rs4']}:{port}")
        self._ipt("-t", "nat", "-A", "PREROUTING", "-j", NAT_CHAIN)

    def stop(self):
        self._ipt("-t", "nat", "-D", "PREROUTING", "-j", NAT_CHAIN, check=False)
        self._ipt("-t", "nat", "-F", NAT_CHAIN, check=False)
        self._ipt("-t", "nat", "-X", NAT_CHAIN, check=False)
        # Forget this mode's NAT bindings so the next mode starts from an empty conntrack.
        self.lab.run("lb", ["conntrack", "-F"], check=False)

    def conns_per_rs(self, proto):
        """New connections per real server: the nat table sees only a connection's first packet,
        so the DNAT rules' packet counters count connections."""
        out = self._ipt("-t", "nat", "-L", NAT_CHAIN, "-n", "-v", "-x").stdout
        got = {}
        for line in out.splitlines():
            m = re.match(r"\s*(\d+)\s+\d+\s+DNAT\s+(\w+).*to:([\d.]+):(\d+)", line)
            if m and m.group(2) in {"tcp": ("tcp", "6"), "udp": ("udp", "17")}[proto]:
                got[m.group(3)] = got.get(m.group(3), 0) + int(m.group(1))
        return got


class IpvsMode(Mode):
    """Kernel IPVS, NAT (masquerading), rr -- the same service as lvs-dp's config."""
    name = "kernel-ipvs"

    def _ipvsadm(self, *args, check=True):
        return self.lab.run("lb", ["ipvsadm", *args], check=check)

    def start(self):
        for flag, port in (("-t", HTTP_PORT), ("-u", UDP_PORT)):
            vs = f"{self.lab.vip}:{port}"
            self._ipvsadm("-A", flag, vs, "-s", "rr")
            for rs in RS_KEYS:
                self._ipvsadm("-a", flag, vs, "-r", f"{RS_IPS[rs]}:{port}", "-m", "-w", "1")

    def stop(self):
        self._ipvsadm("-C", check=False)

    def conns_per_rs(self, proto):
        # IPVS folds its per-CPU counters into what ipvsadm reads every 2 s (the estimator,
        # ip_vs_est.c): wait one period so the counts include the last measurement.
        time.sleep(3)
        out = self._ipvsadm("-L", "-n", "--stats", "--exact").stdout
        got, cur = {}, None
        for line in out.splitlines():
            m = re.match(r"(TCP|UDP)\s+\S+:(\d+)", line)
            if m:
                cur = m.group(1).lower()
                continue
            m = re.match(r"\s*->\s+([\d.]+):\d+\s+(\d+)", line)
            if m and cur == proto:
                got[m.group(1)] = int(m.group(2))
        return got


def make_mode(name, lab, config):
    if name == "lvsdp-netlink":
        return LvsDpMode(lab, config, "netlink")
    if name == "lvsdp-nfqueue":
        return LvsDpMode(lab, config, "nfqueue")
    if name == "lvsdp-netlink-nogso":       # the netlink backend as before NFQA_CFG_F_GSO
        return LvsDpMode(lab, config, "netlink", extra=["--no-gso"], name=name)
    if name == "kernel-nat":
        return KernelNatMode(lab, config)
    if name == "kernel-ipvs":
        return IpvsMode(lab, config)
    raise ValueError(f"unknown mode {name!r}; expected one of {ALL_MODES + EXTRA_MODES}")


def round_order(modes, r):
    """Round r runs the modes rotated by r, so no mode always goes first (warm caches, drift)."""
    k = r % len(modes)
    return list(modes[k:]) + list(modes[:k])


# --- load generators -----------------------------------------------------------------------------
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _dur(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", s)
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_wrk(out: str) -> dict:
    res = {"latency_s": {}}
    m = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    if not m:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    res["requests"] = int(m.group(1))
    res["duration_s"] = _dur(m.group(2))
    res["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    for pct, val in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)", out, re.M):
        res["latency_s"][pct] = _dur(val)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["errors"] = dict(zip(("connect", "read", "write", "timeout"),
                             map(int, m.groups()))) if m else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    return res


def run_wrk(lab, seconds, close=False, conns=WRK_CONNS, path="/") -> dict:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{lab.vip}{path}")
    r = lab.run("client", argv, timeout=seconds + 30, check=False)
    if r.returncode != 0:
        raise BenchError(f"wrk failed rc={r.returncode}: {r.stderr.strip()}")
    res = parse_wrk(r.stdout)
    res["raw"] = r.stdout
    return res


def check_wrk(res, mode, close):
    """Requests succeeded: some were made, all answered 2xx, no socket errors (Connection: close
    makes the server close each connection; wrk reads that as a normal end, not an error)."""
    errs = res["errors"]
    if res["requests"] <= 0:
        raise BenchError(f"{mode}: wrk made no requests:\n{res['raw']}")
    if res["non2xx"]:
        raise BenchError(f"{mode}: {res['non2xx']} non-2xx responses:\n{res['raw']}")
    if errs["connect"] or errs["write"] or errs["read"] or errs["timeout"]:
        raise BenchError(f"{mode}: socket errors {errs}:\n{res['raw']}")


def _mac(lab, key, ifname):
    out = lab.run(key, ["ip", "-j", "link", "show", "dev", ifname]).stdout
    return json.loads(out)[0]["address"]


def trafgen_config(lab) -> str:
    """64-byte frames client -> VIP:UDP_PORT, source ports 10000..10000+UDP_FLOWS-1 in turn,
    IPv4 and UDP checksums computed by trafgen per packet."""
    dmac = _mac(lab, "lb", "lb-c")
    smac = _mac(lab, "client", "c-lb")
    hx = lambda mac: ", ".join(f"0x{b}" for b in mac.split(":"))
    ip = lambda a: ", ".join(str(int(x)) for x in a.split("."))
    payload = UDP_FRAME - 14 - 20 - 8
    return textwrap.dedent(f"""\
        /* generated by bench/labkit.py: {UDP_FRAME}-byte UDP frames, client -> VIP:{UDP_PORT} */
        {{
          {hx(dmac)},
          {hx(smac)},
          c16(0x0800),
          0x45, 0x00, c16({20 + 8 + payload}), drnd(2), c16(0x4000), 64, 17, csumip(14, 33),
          {ip(lab.client_ip)},
          {ip(lab.vip)},
          0x27, dinc(0x10, {0x10 + UDP_FLOWS - 1}, 1), c16({UDP_PORT}), c16({8 + payload}), csumudp(14, 34),
          fill(0x61, {payload}),
        }}
        """)


def run_udp(lab, sinks, seconds, warm_s=0.5, max_pps=5_000_000) -> dict:
    """trafgen from the client for `seconds` (and at most seconds * max_pps packets), counting
    what the sinks read. pps is taken over [start + warm_s, end]; `received` is everything read
    by the sinks until 0.5 s after trafgen ended (queued packets drain)."""
    cfg = Path(lab.dir) / "trafgen.cfg"
    cfg.write_text(trafgen_config(lab))
    before = {rs: read_sink(f)[-1][1] for rs, f in sinks.items()}
    n_max = int(seconds * max_pps)
    argv = ["timeout", "-s", "INT", f"{seconds}", "trafgen", "-o", "c-lb", "-i", str(cfg),
            "-n", str(n_max), "-P", "1", "--no-sock-mem", "--notouch-irq", "--no-cpu-stats"]
    t0 = time.monotonic()
    r = lab.run("client", argv, timeout=seconds + 20, check=False)
    t1 = time.monotonic()
    if r.returncode not in (0, 124) and "packets outgoing" not in r.stdout + r.stderr:
        raise BenchError(f"trafgen failed rc={r.returncode}: {r.stderr.strip()} {r.stdout.strip()}")
    time.sleep(0.6)
    rows = {rs: read_sink(f) for rs, f in sinks.items()}
    m = re.search(r"(\d+) packets outgoing", r.stdout + r.stderr)
    sent = int(m.group(1)) if m else None
    a = t0 + warm_s
    window = {rs: count_at(rows[rs], t1) - count_at(rows[rs], a) for rs in rows}
    received = {rs: rows[rs][-1][1] - before[rs] for rs in rows}
    span = t1 - a
    return {
        "pps": sum(window.values()) / span if span > 0 else 0.0,
        "received": sum(received.values()), "received_per_rs": received,
        "sent": sent, "offered_pps": sent / (t1 - t0) if sent else None,
        "seconds": t1 - t0, "frame_bytes": UDP_FRAME,
    }


def check_udp(res, mode):
    if res["received"] <= 0 or res["pps"] <= 0:
        raise BenchError(f"{mode}: the UDP sinks received nothing: {res}")
    if min(res["received_per_rs"].values()) <= 0:
        raise BenchError(f"{mode}: one real server received no UDP: {res['received_per_rs']}")
    if res["sent"] is not None and res["received"] > res["sent"]:
        raise BenchError(f"{mode}: sinks counted more than trafgen sent: {res}")


def run_bulk(lab, seconds, max_transfers=32) -> dict:
    """Download /big through the VIP until `seconds` have passed (at least one transfer)."""
    url = f"http://{lab.vip}/big"
    total_b, total_t, n = 0, 0.0, 0
    t_end = time.monotonic() + seconds
    while n < max_transfers and (n == 0 or time.monotonic() < t_end):
        r = lab.curl(url, "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}",
                     timeout=60, check=False)
        parts = r.stdout.split()
        if r.returncode != 0 or len(parts) != 3 or parts[0] != "200":
            raise BenchError(f"bulk transfer failed rc={r.returncode}: {r.stdout} {r.stderr.strip()}")
        size, t = int(parts[1]), float(parts[2])
        if size != lab.bulk_size:
            raise BenchError(f"bulk transfer got {size} bytes, expected {lab.bulk_size}")
        total_b += size
        total_t += t
        n += 1
    return {"mbit_s": total_b * 8 / total_t / 1e6, "bytes": total_b, "transfers": n,
            "seconds": total_t}


def check_bulk_content(lab, mode):
    """One transfer hashed end to end: the payload survives the balancer unchanged."""
    r = lab.run("client", f"curl -sS --noproxy '*' --max-time 60 http://{lab.vip}/big | sha256sum",
                timeout=90)
    got = r.stdout.split()[0]
    if got != lab.bulk_sha256:
        raise BenchError(f"{mode}: /big arrived corrupted (sha256 {got} != {lab.bulk_sha256})")


# --- one measurement in one mode ------------------------------------------------------------------
def measure(metric, mode, lab, sinks, seconds) -> dict:
    """Run `metric` once against an already started `mode`; check it; return its numbers."""
    if metric in ("http_keepalive", "http_keepalive_seg", "http_close"):
        close = metric == "http_close"
        count_packets = getattr(mode, "packets", None)
        before = mode.conns_per_rs("tcp")
        pk0 = count_packets("tcp") if count_packets else None
        res = run_wrk(lab, seconds, close=close,
                      path=SEGMENTED_PATH if metric == "http_keepalive_seg" else "/")
        check_wrk(res, mode.name, close)
        pk1 = count_packets("tcp") if count_packets else None
        after = mode.conns_per_rs("tcp")
        per_rs = {a: after.get(a, 0) - before.get(a, 0) for a in after}
        if len([v for v in per_rs.values() if v > 0]) < 2:
            raise BenchError(f"{mode.name}: connections did not reach both real servers: {per_rs}")
        if close and sum(per_rs.values()) < res["requests"] * 0.9:
            raise BenchError(f"{mode.name}: {res['requests']} requests with Connection: close but "
                             f"only {sum(per_rs.values())} new connections counted")
        ppr = (pk1 - pk0) / res["requests"] if pk0 is not None and pk1 is not None else None
        # A request is at least its request and its response; the /seg/ page is two segments.
        least = 3 if metric == "http_keepalive_seg" else 2
        if ppr is not None and ppr < least:
            raise BenchError(f"{mode.name}: {ppr:.2f} packets per request counted, expected at "
                             f"least {least} ({metric})")
        lat = res["latency_s"]
        return {"value": res["rps"], "requests": res["requests"], "duration_s": res["duration_s"],
                "p50_ms": lat.get("50", 0) * 1e3, "p75_ms": lat.get("75", 0) * 1e3,
                "p90_ms": lat.get("90", 0) * 1e3, "p99_ms": lat.get("99", 0) * 1e3,
                "conns_per_rs": per_rs,
                # What the balancer handled per request (lvs-dp counts it; the kernel modes
                # see the same traffic): its cost is per packet.
                "pkts_per_request": round(ppr, 2) if ppr is not None else None}
    if metric == "udp_pps":
        res = run_udp(lab, sinks, max(seconds, 1.5))
        check_udp(res, mode.name)
        return {"value": res["pps"], **{k: v for k, v in res.items() if k != "pps"}}
    if metric == "bulk_tcp":
        check_bulk_content(lab, mode.name)
        res = run_bulk(lab, seconds)
        return {"value": res["mbit_s"], **{k: v for k, v in res.items() if k != "mbit_s"}}
    raise ValueError(metric)


METRICS = {
    # metric: (unit, higher is better, description)
    "http_keepalive": ("req/s", "HTTP keep-alive requests/s, wrk -t1 -c32, two 1-worker nginx "
                                "(Debian's settings: sendfile, tcp_nopush)"),
    "http_keepalive_seg": ("req/s", f"HTTP keep-alive requests/s, wrk -t1 -c32 of {SEGMENTED_PATH}: "
                                    "the same page without tcp_nopush (headers and body in two "
                                    "segments)"),
    "http_close": ("conn/s", "new connections/s: wrk -t1 -c32 -H 'Connection: close'"),
    "udp_pps": ("pkt/s", f"{UDP_FRAME}-byte UDP frames/s read by the sinks (trafgen, 1 process)"),
    "bulk_tcp": ("Mbit/s", "bulk TCP: curl of /big through the VIP, back to back"),
}


def summarize(metric, per_mode: dict) -> dict:
    """per_mode: {mode: [round results]} -> medians, per-round ratios against kernel-nat and
    their medians (the issue's target uses the median of the per-round ratios)."""
    unit, desc = METRICS[metric]
    out = {"kind": "lab", "metric": metric, "unit": unit, "description": desc, "modes": {}}
    for mode, rounds in per_mode.items():
        vals = [r["value"] for r in rounds]
        m = {"rounds": [round(v, 1) for v in vals], "median": round(statistics.median(vals), 1)}
        if metric.startswith("http"):
            for p in ("p50_ms", "p90_ms", "p99_ms"):
                m[p] = round(statistics.median(r[p] for r in rounds), 3)
            ppr = [r["pkts_per_request"] for r in rounds if r.get("pkts_per_request") is not None]
            if ppr:
                m["pkts_per_request"] = round(statistics.median(ppr), 2)
        if metric == "udp_pps":
            offered = [r["offered_pps"] for r in rounds if r.get("offered_pps")]
            m["offered_pps_median"] = round(statistics.median(offered), 1) if offered else None
        out["modes"][mode] = m
    ratios = {}
    base = per_mode.get(BASELINE)
    for mode, rounds in per_mode.items():
        if mode == BASELINE or not base:
            continue
        rr = [a["value"] / b["value"] for a, b in zip(rounds, base) if b["value"] > 0]
        if rr:
            ratios[f"{mode}/{BASELINE}"] = {"rounds": [round(x, 3) for x in rr],
                                           "median": round(statistics.median(rr), 3)}
    if "lvsdp-netlink" in per_mode and "lvsdp-nfqueue" in per_mode:
        rr = [a["value"] / b["value"] for a, b in zip(per_mode["lvsdp-netlink"],
                                                      per_mode["lvsdp-nfqueue"]) if b["value"] > 0]
        if rr:
            ratios["lvsdp-netlink/lvsdp-nfqueue"] = {"rounds": [round(x, 3) for x in rr],
                                                     "median": round(statistics.median(rr), 3)}
    out["ratios"] = ratios
    return out


class Campaign:
    """Alternating rounds of one metric over the modes, in one lab."""

    def __init__(self, lab, sinks, config, modes, seconds):
        self.lab, self.sinks, self.config = lab, sinks, config
        self.modes, self.seconds = list(modes), seconds
        self.start_s = {}

    def one_round_mode(self, metric, name, results):
        """Start mode `name`, measure `metric` once, stop it; append to results[name]."""
        mode = make_mode(name, self.lab, self.config)
        with mode:
            if getattr(mode, "start_s", None) is not None:
                self.start_s.setdefault(name, []).append(round(mode.start_s, 2))
            res = measure(metric, mode, self.lab, self.sinks, self.seconds)
            if isinstance(mode, LvsDpMode):
                res["drops"] = {k: v for k, v in mode.drops().items() if v}
            results.setdefault(name, []).append(res)

    def one_round(self, metric, r, results):
        for name in round_order(self.modes, r):
            self.one_round_mode(metric, name, results)


def _main(argv=None):
    import argparse
    from control.lab import Lab
    p = argparse.ArgumentParser(prog="python -m bench.labkit", description=__doc__.split("\n")[0])
    p.add_argument("--modes", default=",".join(ALL_MODES))
    p.add_argument("--metrics", default=",".join(METRICS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--prefix", default=f"bk{os.getpid() % 100000}")
    p.add_argument("--bulk-mb", type=float, default=32, help="size of the lab's /big")
    p.add_argument("--json", help="write the summaries here")
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    if "kernel-ipvs" in modes:
        ok, why = ipvs_status()
        if not ok:
            print(f"skipping kernel-ipvs: {why}", file=sys.stderr)
            modes.remove("kernel-ipvs")
    summaries = []
    with Lab(a.prefix, bulk_mb=a.bulk_mb, replace=True, **LAB_OPTIONS) as lab:
        sinks = start_sinks(lab)
        camp = Campaign(lab, sinks, write_config(lab), modes, a.seconds)
        for metric in a.metrics.split(","):
            results = {}
            for r in range(a.rounds):
                camp.one_round(metric, r, results)
            s = summarize(metric, results)
            summaries.append(s)
            print(json.dumps(s, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(summaries, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
