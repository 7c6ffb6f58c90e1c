"""The seed LVS lab, built in network namespaces: one client, one balancer, two real servers.

This module owns the test topology that the demo, the tests and the benchmarks share. It creates
four namespaces named after a prefix, wires them with veths and a bridge, starts nginx (and
optionally a UDP echo server) on the real servers, and removes all of it again: `teardown()` kills
every process in the namespaces and deletes them, and `cleanup_prefix()` does the same for the
leftovers of a run that crashed before it could tear down.

Topology (addresses from the seed lab, /work/shared/seed; VM1 is the balancer)::

      {prefix}-client            {prefix}-lb                               {prefix}-rs3
    +-----------------+        +--------------------------------+        +-------------------+
    | c-lb            |--veth--| lb-c  172.16.1.11/24           |        | rs3-lb            |
    | 172.16.1.12/24  |        |       172.16.1.100/32 (VIP)    |   +----| 172.16.2.13/24    |
    | default via     |        | br0   172.16.2.11/24           |   |    | 172.16.1.0/24 via |
    |   172.16.1.11   |        |       172.16.2.100/24 (secondary,   |    |   172.16.2.100    |
    +-----------------+        |        inside VIP)             |   |    +-------------------+
                               |  ports: lb-rs3 --veth----------+---+     {prefix}-rs4: same,
                               |         lb-rs4 --veth--> rs4-lb 172.16.2.14/24     "Server4"
                               |  ip_forward=1                  |
                               +--------------------------------+

The two VIPs are configured by the lab, standing in for keepalived's VRRP instances VI_1 / VI_2.
The real servers route the client network back through the inside VIP 172.16.2.100, exactly as in
the seed, so replies of NAT flows return through the balancer.

Kernel facts this relies on, and why they matter to the balancer:

* The seed's real servers share a switch; here that switch is the Linux bridge ``br0`` in the
  balancer's namespace. This kernel has ``CONFIG_BRIDGE_NETFILTER=y`` (built in, not a module),
  and ``net.bridge.bridge-nf-call-iptables`` is 1 in every new namespace. So IPv4 frames that enter
  the bridge from a real server -- both those routed by the balancer (addressed to br0's MAC, e.g.
  NAT replies) and those merely bridged between rs3 and rs4 -- traverse iptables PREROUTING (raw
  table included) of the lb namespace once, at bridge level (br_netfilter), with ``-i br0``.
  Consequences: an ``out`` rule such as ``-s 172.16.2.13 --sport 80`` also sees rs3's answers to
  rs4 (the data plane must accept what it does not know), and a packet rewritten in PREROUTING
  continues through br_netfilter's own re-routing. Pass ``bridge_nf_call_iptables=0`` to compare.
* Interfaces are created directly inside their namespaces (``ip -n NS link add ... peer ... netns
  NS2``); nothing is ever added to the root namespace.
* veth offloads (TSO/GSO/GRO/checksum) stay at their defaults, so the balancer sees what it would
  see on a real veth deployment: possibly GRO-merged packets larger than the MTU and partial
  checksums.

Usage::

    with Lab("t1", udp_echo=True) as lab:
        print(lab.curl("http://172.16.2.13/", ns="lb").stdout)   # "<h1>Hello Server3</h1>"
        lab.popen("lb", ["lvs-dp", "run", "keepalived.conf"])
        ...                                                       # torn down on exit, even on error

Set ``LVSDP_LAB_KEEP=1`` to keep the per-lab temporary directory (configs, logs) after teardown.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import weakref
from pathlib import Path

log = logging.getLogger("lvsdp.lab")

REPO_ROOT = Path(__file__).resolve().parent.parent

# --- addresses (the seed lab's) ------------------------------------------------------------------
CLIENT_IP = "172.16.1.12"       # VM2 on the outside network
LB_OUT_IP = "172.16.1.11"       # VM1 ens161
VIP = "172.16.1.100"            # outside VIP (keepalived VI_1), /32 on lb-c
LB_IN_IP = "172.16.2.11"        # VM1 ens256 (here: br0)
INSIDE_VIP = "172.16.2.100"     # inside VIP (keepalived VI_2), secondary on br0
RS_IPS = {"rs3": "172.16.2.13", "rs4": "172.16.2.14"}
OUT_NET = "172.16.1.0/24"
IN_NET = "172.16.2.0/24"

NS_KEYS = ("client", "lb", "rs3", "rs4")
RS_KEYS = ("rs3", "rs4")
RS_NAMES = {"rs3": "Server3", "rs4": "Server4"}
IFACES = {
    "client": ("c-lb",),
    "lb": ("lb-c", "br0", "lb-rs3", "lb-rs4"),
    "rs3": ("rs3-lb",),
    "rs4": ("rs4-lb",),
}
HTTP_PORT = 80
SEGMENTED_PATH = "/seg/"        # index.html again, served without tcp_nopush (see _nginx_conf)
PROXY_PROTOCOL_PORT = 8080    # nginx with `listen ... proxy_protocol` on every real server
UDP_ECHO_PORT = 5353

TMP_GLOB = "lvsdp-lab-{prefix}.*"   # prefixes cannot contain "." so globs never overlap
_LOG_FIELDS = ("remote_addr", "remote_port", "connection", "connection_requests", "method", "uri",
               "status", "body_bytes_sent", "request_time")
# One access-log line: space separated, in the order of _LOG_FIELDS.
_NGINX_LOG_FORMAT = ("$remote_addr $remote_port $connection $connection_requests $request_method "
                     "$request_uri $status $body_bytes_sent $request_time")

_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
_live_labs: "weakref.WeakSet[Lab]" = weakref.WeakSet()


class LabError(RuntimeError):
    """A lab command failed; carries the command and its output."""


def ns_name(prefix: str, key: str) -> str:
    if key not in NS_KEYS:
        raise ValueError(f"unknown namespace key {key!r}; expected one of {NS_KEYS}")
    return f"{prefix}-{key}"


def _ip(*args: str, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check, timeout=timeout)


def _run(argv, check=True, timeout=30.0, input=None, text=True, cwd=None, env=None):
    log.debug("run: %s", shlex.join(argv))
    try:
        p = subprocess.run(argv, capture_output=True, text=text, timeout=timeout, input=input,
                           cwd=cwd, env=env)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timed out after {timeout}s: {shlex.join(argv)}") from e
    if check and p.returncode != 0:
        err = p.stderr if text else p.stderr.decode(errors="replace")
        out = p.stdout if text else p.stdout.decode(errors="replace")
        raise LabError(f"rc={p.returncode}: {shlex.join(argv)}\n{err.strip()}\n{out.strip()[:2000]}")
    return p


def existing_namespaces() -> list[str]:
    """Names from ``ip netns list`` (the part before an optional ``(id: N)``)."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    """PIDs of every process whose network namespace is `name`."""
    p = _ip("netns", "pids", name, check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _kill_pids(pids, grace: float = 3.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _delete_namespace(name: str) -> None:
    _kill_pids(netns_pids(name))
    # processes that were still exiting can hold the namespace; SIGKILL whatever is left
    for _ in range(50):
        left = [p for p in netns_pids(name) if _alive(p)]
        if not left:
            break
        _kill_pids(left, grace=0.2)
    _ip("netns", "del", name, check=False)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
    """Signal the process group a daemon leads (started with ``start_new_session``), SIGKILL it
    after `timeout`; returns the exit status."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    return proc.returncode


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove what an earlier (crashed) lab with this prefix left: kill every process in its
    namespaces, delete the namespaces (veths and the bridge go with them) and its temp dirs.
    Only the exact names ``{prefix}-client|lb|rs3|rs4`` are touched. Returns the deleted names."""
    names = set(existing_namespaces())
    removed = []
    for key in NS_KEYS:
        name = ns_name(prefix, key)
        if name in names:
            _delete_namespace(name)
            removed.append(name)
    for d in glob.glob(os.path.join(tempfile.gettempdir(), TMP_GLOB.format(prefix=prefix))):
        shutil.rmtree(d, ignore_errors=True)
    if removed:
        log.warning("cleanup_prefix(%r): removed leftover namespaces %s", prefix, removed)
    return removed


_UDP_ECHO = textwrap.dedent('''\
    """UDP echo for the lab: answers b"<tag>:" + payload from the socket the request came in on."""
    import socket, sys
    addr, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((addr, port))
    while True:
        data, peer = s.recvfrom(65535)
        try:
            s.sendto(tag + b":" + data, peer)
        except OSError:
            pass
''')


class Lab:
    """The seed topology in four namespaces. Use as a context manager; see the module docstring.

    Options: ``nginx_workers`` (worker_processes of each nginx), ``udp_echo`` (start the UDP echo
    on port 5353 of each real server), ``bulk_mb`` (size of /big in MiB, may be fractional; 0 = no
    file), ``access_log`` (False for benchmarks), ``bridge_nf_call_iptables`` (None leaves the
    kernel default, 1), ``replace`` (run `cleanup_prefix` first instead of failing on leftovers).
    """

    def __init__(self, prefix: str, *, nginx_workers: int = 1, udp_echo: bool = False,
                 bulk_mb: float = 4, access_log: bool = True,
                 bridge_nf_call_iptables: int | None = None, replace: bool = False,
                 ready_timeout: float = 15.0):
        if not _PREFIX_RE.fullmatch(prefix or ""):
            raise ValueError(f"bad lab prefix {prefix!r}: 1-40 of [A-Za-z0-9_-]")
        self.prefix = prefix
        self.nginx_workers = int(nginx_workers)
        self.udp_echo = bool(udp_echo)
        self.bulk_mb = float(bulk_mb)
        self.access_log_enabled = bool(access_log)
        self.bridge_nf_call_iptables = bridge_nf_call_iptables
        self.replace = replace
        self.ready_timeout = ready_timeout
        self.dir: Path | None = None
        self.bulk_size = 0
        self.bulk_sha256: str | None = None
        self.rs_ips = dict(RS_IPS)
        self.vip = VIP
        self.client_ip = CLIENT_IP
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._up = False
        self._torn_down = False

    # --- names and plain commands ----------------------------------------------------------------
    def ns(self, key: str) -> str:
        """Full namespace name for 'client', 'lb', 'rs3' or 'rs4'."""
        return ns_name(self.prefix, key)

    def argv(self, key: str, cmd) -> list[str]:
        """The argv that runs `cmd` (list, or str for ``sh -c``) inside namespace `key`."""
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        return ["ip", "netns", "exec", self.ns(key), *map(str, cmd)]

    def run(self, key: str, cmd, check: bool = True, timeout: float = 30.0, input=None,
            text: bool = True, cwd=None, env=None) -> subprocess.CompletedProcess:
        """Run `cmd` to completion in namespace `key` (a str runs under ``sh -c``)."""
        return _run(self.argv(key, cmd), check=check, timeout=timeout, input=input, text=text,
                    cwd=cwd, env=env)

    def python(self, key: str, code_or_args, check: bool = True, timeout: float = 60.0,
               **kw) -> subprocess.CompletedProcess:
        """Run this interpreter (the venv's) in namespace `key` with the repository importable:
        a str is ``-c`` code, a list is the argument list (e.g. ``["-m", "control.rules", ...]``)."""
        args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return self.run(key, [sys.executable, *args], check=check, timeout=timeout,
                        cwd=str(REPO_ROOT), env=env, **kw)

    def popen(self, key: str, cmd, name: str | None = None, **kw) -> subprocess.Popen:
        """Start a daemon in namespace `key`; it is killed at teardown. stdout and stderr go to
        ``<lab dir>/<name>.log`` (``proc.log_path``) unless given in `kw`. A str runs under sh -c.
        The process leads its own session, so `stop` can signal its whole group."""
        if self.dir is None:
            raise LabError("lab is not up")
        argv = self.argv(key, cmd)
        if name is None:
            base = os.path.basename(str(cmd[0] if not isinstance(cmd, str) else cmd.split()[0]))
            name = f"{key}-{base}-{len(self._procs)}"
        log_path = self.dir / f"{name}.log"
        own_log = None
        if "stdout" not in kw:
            own_log = open(log_path, "ab")
            kw["stdout"] = own_log
            kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        log.debug("popen: %s", shlex.join(argv))
        try:
            proc = subprocess.Popen(argv, **kw)
        finally:
            if own_log is not None:
                own_log.close()
        proc.log_path = log_path
        proc.lab_name = name
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Stop one daemon started with `popen` (signal its process group, SIGKILL after
        `timeout`). Returns its exit status."""
        return stop_group(proc, sig, timeout)

    def daemons(self) -> list[subprocess.Popen]:
        return list(self._procs)

    def pids(self, key: str) -> list[int]:
        """Every process now in namespace `key`."""
        return netns_pids(self.ns(key))

    # --- client-side helpers -----------------------------------------------------------------------
    def curl(self, url: str, *args: str, ns: str = "client", timeout: float = 5.0,
             check: bool = True, text: bool = True) -> subprocess.CompletedProcess:
        """``curl -sS --max-time timeout [args] url`` from `ns` (default the client); the body is
        ``.stdout``. With check=False a failed transfer returns (curl's exit code in .returncode)."""
        argv = ["curl", "-sS", "--noproxy", "*", "--max-time", str(timeout), *args, url]
        return self.run(ns, argv, check=check, timeout=timeout + 10, text=text)

    def ping(self, key: str, addr: str, count: int = 1, timeout: float = 5.0) -> bool:
        """ICMP echo from namespace `key` (hping3, numeric: no reverse DNS). True if any reply."""
        r = self.run(key, ["hping3", "-n", "-q", "-1", "-c", str(int(count)), "-i", "u200000", addr],
                     check=False, timeout=timeout + count)
        return r.returncode == 0

    def set_mtu(self, key: str, ifname: str, mtu: int) -> None:
        """Set the MTU of `ifname` inside namespace `key`."""
        _ip("-n", self.ns(key), "link", "set", "dev", ifname, "mtu", str(int(mtu)))

    def mtu(self, key: str, ifname: str) -> int:
        out = _ip("-n", self.ns(key), "-j", "link", "show", "dev", ifname).stdout
        return int(json.loads(out)[0]["mtu"])

    def sysctl(self, key: str, name: str, value=None) -> str:
        """Read (or with `value`, write then read) a sysctl inside namespace `key`."""
        if value is not None:
            self.run(key, ["sysctl", "-qw", f"{name}={value}"])
        return self.run(key, ["sysctl", "-n", name]).stdout.strip()

    # --- real-server helpers ---------------------------------------------------------------------------
    def rs_dir(self, rs: str) -> Path:
        if rs not in RS_KEYS:
            raise ValueError(f"not a real server: {rs!r}")
        return self.dir / rs

    def access_log_path(self, rs: str) -> Path:
        return self.rs_dir(rs) / "access.log"

    def access_log(self, rs: str) -> list[dict]:
        """Parsed lines of `rs`'s nginx access log: dicts with the keys remote_addr, remote_port,
        connection, connection_requests, method, uri, status, body_bytes_sent, request_time (all
        strings) and ``line`` (the raw line). nginx writes each entry unbuffered. The log is
        empty when `setup` returns (the readiness probes are cleared)."""
        path = self.access_log_path(rs)
        if not path.exists():
            return []
        entries = []
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) != len(_LOG_FIELDS):
                continue
            d = dict(zip(_LOG_FIELDS, parts))
            d["line"] = line
            entries.append(d)
        return entries

    def proxy_protocol_log(self, rs: str) -> list[tuple[str, str, str]]:
        """(client address from the PROXY header, its port, the connection's source address)
        per request nginx served on PROXY_PROTOCOL_PORT."""
        path = self.rs_dir(rs) / "pp_access.log"
        if not path.exists():
            return []
        return [tuple(line.split(" ")[:3]) for line in path.read_text().splitlines() if line]

    def clear_access_log(self, rs: str | None = None) -> None:
        """Truncate the access log of `rs` (both if None); nginx appends with O_APPEND."""
        for r in ([rs] if rs else RS_KEYS):
            p = self.access_log_path(r)
            if p.exists():
                os.truncate(p, 0)

    # --- build and teardown ---------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def setup(self) -> "Lab":
        if self._up:
            return self
        if self.replace:
            cleanup_prefix(self.prefix)
        else:
            stale = [self.ns(k) for k in NS_KEYS if self.ns(k) in set(existing_namespaces())]
            if stale:
                raise LabError(f"namespaces {stale} already exist (a crashed run?); "
                               f"use control.lab.cleanup_prefix({self.prefix!r}) or replace=True")
        _live_labs.add(self)
        self._up = True
        self._torn_down = False
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=TMP_GLOB.format(prefix=self.prefix)[:-1]))
            os.chmod(self.dir, 0o755)
            t0 = time.monotonic()
            self._build_network()
            self._start_servers()
            self._wait_ready()
            self.clear_access_log()         # tests start from empty logs, without our probes
            log.info("lab %s up in %.2fs (dir %s)", self.prefix, time.monotonic() - t0, self.dir)
        except BaseException:
            self.teardown()
            raise
        return self

    def _build_network(self) -> None:
        c, lb, r3, r4 = (self.ns(k) for k in NS_KEYS)
        for name in (c, lb, r3, r4):
            _ip("netns", "add", name)
            self._created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        # veths are created inside their namespaces: nothing touches the root namespace
        _ip("-n", c, "link", "add", "c-lb", "type", "veth", "peer", "name", "lb-c", "netns", lb)
        _ip("-n", lb, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        for rs, rsns in (("rs3", r3), ("rs4", r4)):
            _ip("-n", rsns, "link", "add", f"{rs}-lb", "type", "veth", "peer", "name", f"lb-{rs}",
                "netns", lb)
            _ip("-n", lb, "link", "set", f"lb-{rs}", "master", "br0")
        # balancer first: forwarding on before any interface is up
        self.sysctl("lb", "net.ipv4.ip_forward", 1)
        if self.bridge_nf_call_iptables is not None:
            present = self.run("lb", ["test", "-e", "/proc/sys/net/bridge/bridge-nf-call-iptables"],
                               check=False).returncode == 0
            # Without br_netfilter (a module elsewhere, built in here) bridged frames never
            # reach iptables: "off" holds already, "on" cannot be had without loading it.
            if present or self.bridge_nf_call_iptables:
                self.sysctl("lb", "net.bridge.bridge-nf-call-iptables",
                            int(self.bridge_nf_call_iptables))
        _ip("-n", lb, "addr", "add", f"{LB_OUT_IP}/24", "dev", "lb-c")
        _ip("-n", lb, "addr", "add", f"{VIP}/32", "dev", "lb-c")
        _ip("-n", lb, "addr", "add", f"{LB_IN_IP}/24", "dev", "br0")
        _ip("-n", lb, "addr", "add", f"{INSIDE_VIP}/24", "dev", "br0")   # same subnet: secondary
        for ifname in IFACES["lb"]:
            _ip("-n", lb, "link", "set", ifname, "up")
        # client
        _ip("-n", c, "addr", "add", f"{CLIENT_IP}/24", "dev", "c-lb")
        _ip("-n", c, "link", "set", "c-lb", "up")
        _ip("-n", c, "route", "add", "default", "via", LB_OUT_IP)
        # real servers: the client network goes back through the inside VIP, as in the seed
        for rs, rsns in (("rs3", r3), ("rs4", r4)):
            _ip("-n", rsns, "addr", "add", f"{RS_IPS[rs]}/24", "dev", f"{rs}-lb")
            _ip("-n", rsns, "link", "set", f"{rs}-lb", "up")
            _ip("-n", rsns, "route", "add", OUT_NET, "via", INSIDE_VIP)

    def _write_bulk(self) -> Path | None:
        if self.bulk_mb <= 0:
            return None
        size = int(self.bulk_mb * (1 << 20))
        path = self.dir / "big"
        rng = random.Random(f"lvsdp-bulk-{size}")
        h = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 20)
                chunk = rng.randbytes(n)
                h.update(chunk)
                f.write(chunk)
                left -= n
        os.chmod(path, 0o644)
        self.bulk_size = size
        self.bulk_sha256 = h.hexdigest()
        return path

    def _nginx_conf(self, rs: str) -> str:
        d = self.rs_dir(rs)
        if self.access_log_enabled:
            access = f"access_log {d}/access.log lvsdp;"
        else:
            access = "access_log off;"
        return textwrap.dedent(f"""\
            # generated by control/lab.py for lab {self.prefix}, real server {rs}
            daemon off;
            master_process on;
            user root root;
            worker_processes {self.nginx_workers};
            worker_rlimit_nofile 65536;
            pid {d}/nginx.pid;
            error_log {d}/error.log warn;
            events {{ worker_connections 16384; }}
            http {{
                default_type application/octet-stream;
                log_format lvsdp '{_NGINX_LOG_FORMAT}';
                {access}
                client_body_temp_path {d}/tmp/body;
                proxy_temp_path {d}/tmp/proxy;
                fastcgi_temp_path {d}/tmp/fastcgi;
                uwsgi_temp_path {d}/tmp/uwsgi;
                scgi_temp_path {d}/tmp/scgi;
                # Debian's stock nginx.conf: with tcp_nopush (TCP_CORK around sendfile) a small
                # response leaves as one segment, headers and body together.
                sendfile on;
                tcp_nopush on;
                keepalive_requests 10000000;
                keepalive_timeout 65;
                server {{
                    listen {HTTP_PORT} backlog=4096;
                    root {d}/html;
                    location / {{ index index.html; }}
                    # The same page as two segments (headers, then the sendfile'd body) and the
                    # client's ACK: 4 packets per keep-alive request instead of 2 (benchmarks).
                    location {SEGMENTED_PATH} {{ tcp_nopush off; index index.html; }}
                }}
                # The same site behind the PROXY protocol (FULLNAT tests): the log shows the
                # client address the header carried next to the connection's source.
                log_format lvsdp_pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr $request';
                server {{
                    listen {PROXY_PROTOCOL_PORT} proxy_protocol backlog=4096;
                    access_log {d}/pp_access.log lvsdp_pp;
                    root {d}/html;
                    location / {{ index index.html; }}
                }}
            }}
            """)

    def _start_servers(self) -> None:
        bulk = self._write_bulk()
        for rs in RS_KEYS:
            d = self.rs_dir(rs)
            (d / "html").mkdir(parents=True)
            (d / "tmp").mkdir()
            (d / "html" / "index.html").write_text(f"<h1>Hello {RS_NAMES[rs]}</h1>\n")
            (d / "html" / SEGMENTED_PATH.strip("/")).mkdir()
            (d / "html" / SEGMENTED_PATH.strip("/") / "index.html").write_text(
                f"<h1>Hello {RS_NAMES[rs]}</h1>\n")
            if bulk is not None:
                os.symlink(bulk, d / "html" / "big")
            (d / "nginx.conf").write_text(self._nginx_conf(rs))
            self.popen(rs, ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e",
                            str(d / "error.log")], name=f"{rs}-nginx")
        if self.udp_echo:
            script = self.dir / "udp_echo.py"
            script.write_text(_UDP_ECHO)
            for rs in RS_KEYS:
                self.popen(rs, [sys.executable, str(script), RS_IPS[rs], str(UDP_ECHO_PORT),
                                RS_NAMES[rs]], name=f"{rs}-udp-echo")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        pending = set(RS_KEYS)
        udp_pending = set(RS_KEYS) if self.udp_echo else set()
        last = ""
        while pending or udp_pending:
            for p in self._procs:
                if p.poll() is not None:
                    out = p.log_path.read_text(errors="replace")[-2000:] if p.log_path.exists() else ""
                    raise LabError(f"{p.lab_name} exited with {p.returncode} during setup:\n{out}")
            for rs in sorted(pending):
                r = self.curl(f"http://{RS_IPS[rs]}/", ns="lb", timeout=1, check=False)
                if r.returncode == 0 and r.stdout == f"<h1>Hello {RS_NAMES[rs]}</h1>\n":
                    pending.discard(rs)
                else:
                    last = f"{rs}: curl rc={r.returncode} {r.stderr.strip()}"
            for rs in sorted(udp_pending):
                out = self.run(rs, ["ss", "-Hlun", f"sport = :{UDP_ECHO_PORT}"], check=False).stdout
                if out.strip():
                    udp_pending.discard(rs)
                else:
                    last = f"{rs}: udp echo not bound yet"
            if not (pending or udp_pending):
                break
            if time.monotonic() > deadline:
                raise LabError(f"lab {self.prefix} not ready after {self.ready_timeout}s: {last}")
            time.sleep(0.05)

    def teardown(self) -> None:
        """Kill every daemon started with `popen` and every other process left in the lab's
        namespaces, delete the namespaces and the temp dir. Idempotent; never raises for things
        already gone."""
        if self._torn_down:
            return
        self._torn_down = True
        errors = []
        for proc in reversed(self._procs):
            try:
                self.stop(proc, timeout=3.0)
            except Exception as e:  # keep tearing down
                errors.append(f"{getattr(proc, 'lab_name', proc.pid)}: {e}")
        names = list(dict.fromkeys(self._created + [self.ns(k) for k in NS_KEYS]))
        present = set(existing_namespaces())
        for name in names:
            if name in present:
                try:
                    _delete_namespace(name)
                except Exception as e:
                    errors.append(f"{name}: {e}")
        left = [n for n in names if n in set(existing_namespaces())]
        if left:
            errors.append(f"namespaces still present: {left}")
        if self.dir is not None and not os.environ.get("LVSDP_LAB_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)
        self._up = False
        _live_labs.discard(self)
        if errors:
            log.error("lab %s teardown: %s", self.prefix, "; ".join(errors))
        else:
            log.info("lab %s torn down", self.prefix)

    def __repr__(self) -> str:
        return f"Lab({self.prefix!r}, up={self._up}, dir={self.dir})"


@atexit.register
def _teardown_live_labs() -> None:
    """Last resort when an interpreter exits with a lab still up (e.g. KeyboardInterrupt outside
    the with-block). A SIGKILLed run leaves leftovers: see `cleanup_prefix`."""
    for lab in list(_live_labs):
        try:
            lab.teardown()
        except Exception:
            pass


def _main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m control.lab",
                                description="build the seed lab in namespaces, or clean up one")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="build the lab, print its namespaces, wait for Ctrl-C, tear down")
    u.add_argument("prefix")
    u.add_argument("--udp-echo", action="store_true")
    u.add_argument("--nginx-workers", type=int, default=1)
    u.add_argument("--bulk-mb", type=float, default=4)
    cl = sub.add_parser("cleanup", help="remove the leftovers of a crashed lab")
    cl.add_argument("prefix")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "cleanup":
        print("removed:", " ".join(cleanup_prefix(args.prefix)) or "nothing")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))     # tear down on SIGTERM too
    with Lab(args.prefix, udp_echo=args.udp_echo, nginx_workers=args.nginx_workers,
             bulk_mb=args.bulk_mb) as lab:
        for k in NS_KEYS:
            print(f"{k:7s} {lab.ns(k)}")
        print(f"try: ip netns exec {lab.ns('client')} curl http://{RS_IPS['rs3']}/   (Ctrl-C ends)")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_main())
