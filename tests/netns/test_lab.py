"""Tests of the lab (control/lab.py) and of the kernel side of the balancer (control/rules.py).

They check the facts the data plane builds on, on this kernel, in namespaces: the seed topology
answers; teardown and crash cleanup leave nothing; our raw-table rules install, read back and go
away without touching anyone else's; packets really are queued (fail closed, bridged frames too);
several queues are steered by the client address, ICMP errors by the packet they quote; and a toy
NAT through NFQUEUE needs exactly the sysctls that `Sysctls` sets.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from control import lab as labmod
from control.lab import CLIENT_IP, INSIDE_VIP, LB_IN_IP, LB_OUT_IP, RS_IPS, VIP, Lab, LabError
from control.rules import QueueSpec, steer_index

CLIENT2_IP = "172.16.1.13"          # a second client address with the other low bit


def ip_int(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


# --- helpers ---------------------------------------------------------------------------------------
def rules_cli(lab, *args, check=True):
    return lab.python("lb", ["-m", "control.rules", *args], check=check)


def save_raw(lab) -> list[str]:
    """iptables-save of every table in the lb namespace, minus comments and counters."""
    out = lab.run("lb", ["iptables-nft-save"]).stdout
    return [line for line in out.splitlines() if not line.startswith("#")]


def counters(lab, instance="default") -> list[tuple[int, str]]:
    out = rules_cli(lab, "counters", "--instance", instance).stdout
    res = []
    for line in out.splitlines():
        pk, _, rule = line.split(" ", 2)
        res.append((int(pk), rule))
    return res


def count(lab, *needles, exclude=(), instance="default") -> int:
    """Packets counted by the rules of `instance` whose text contains every needle."""
    return sum(pk for pk, rule in counters(lab, instance)
               if all(n in rule for n in needles) and not any(x in rule for x in exclude))


def send_udp(lab, ns, dst, dport, payload=b"x", src=None, sport=0, df=False, recv=False):
    """One UDP datagram from namespace `ns`; with recv, the answer (or None) and its source."""
    code = f"""
import socket, json
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(({src or ''!r}, {sport}))
if {df}:
    s.setsockopt(socket.IPPROTO_IP, 10, 2)   # IP_MTU_DISCOVER = IP_PMTUDISC_DO
s.settimeout(2)
try:
    s.sendto({payload!r}, ({dst!r}, {dport}))
except OSError as e:
    print(json.dumps({{"error": str(e)}})); raise SystemExit
if {recv}:
    try:
        data, peer = s.recvfrom(65535)
        print(json.dumps({{"data": data.decode(), "peer": list(peer)}}))
    except socket.timeout:
        print(json.dumps({{"data": None}}))
else:
    print("{{}}")
"""
    return json.loads(lab.python(ns, code).stdout)


NFQ_ACCEPT = """
import sys
from netfilterqueue import NetfilterQueue
queues = [int(q) for q in sys.argv[1:]]
nfqs = []
for q in queues:
    n = NetfilterQueue()
    n.bind(q, lambda pkt: pkt.accept())
    nfqs.append(n)
print("bound", flush=True)
import select
socks = {n.get_fd(): n for n in nfqs}
while True:
    for fd in select.select(list(socks), [], [], 1.0)[0]:
        socks[fd].run(block=False)
"""

# A toy NAT: VIP:80 -> rs3:80 and back. Enough to prove which sysctls rewritten packets need.
NFQ_TOY_NAT = """
from netfilterqueue import NetfilterQueue
from scapy.layers.inet import IP, TCP
VIP, RS = %r, %r
def cb(pkt):
    ip = IP(pkt.get_payload())
    if ip.dst == VIP:
        ip.dst = RS
    elif ip.src == RS:
        ip.src = VIP
    del ip.chksum
    del ip[TCP].chksum
    pkt.set_payload(bytes(ip))
    pkt.accept()
n = NetfilterQueue()
n.bind(0, cb)
print("bound", flush=True)
n.run()
""" % (VIP, RS_IPS["rs3"])


def start_nfq(lab, source: str, *args, name="nfq", timeout=20.0):
    script = lab.dir / f"{name}.py"
    script.write_text(source)
    proc = lab.popen("lb", [sys.executable, str(script), *map(str, args)], name=name)
    deadline = time.monotonic() + timeout
    while "bound" not in proc.log_path.read_text():
        assert proc.poll() is None, proc.log_path.read_text()
        assert time.monotonic() < deadline, "NFQUEUE listener did not bind"
        time.sleep(0.05)
    return proc


# --- the topology ------------------------------------------------------------------------------------
pytestmark = pytest.mark.lab(udp_echo=True, bulk_mb=2)


def test_lb_reaches_both_nginx(module_lab):
    for rs, name in (("rs3", "Server3"), ("rs4", "Server4")):
        r = module_lab.curl(f"http://{RS_IPS[rs]}/", ns="lb")
        assert r.stdout == f"<h1>Hello {name}</h1>\n"


def test_client_reaches_balancer(module_lab):
    assert module_lab.ping("client", LB_OUT_IP)
    assert module_lab.ping("client", VIP)
    # routed through the balancer (ip_forward=1), not balanced: no rules installed
    assert module_lab.curl(f"http://{RS_IPS['rs4']}/").stdout == "<h1>Hello Server4</h1>\n"


def test_real_servers_route_back_via_inside_vip(module_lab):
    for rs in ("rs3", "rs4"):
        routes = json.loads(module_lab.run(rs, ["ip", "-j", "route", "show", "172.16.1.0/24"]).stdout)
        assert [(r["dst"], r["gateway"]) for r in routes] == [("172.16.1.0/24", INSIDE_VIP)]
        assert module_lab.ping(rs, CLIENT_IP)        # there and back through the balancer


def test_balancer_addresses_and_bridge(module_lab):
    links = {l["ifname"]: l for l in json.loads(module_lab.run("lb", ["ip", "-j", "addr"]).stdout)}
    addrs = lambda dev: {(a["local"], a["prefixlen"]) for a in links[dev]["addr_info"]
                         if a["family"] == "inet"}
    assert addrs("lb-c") == {(LB_OUT_IP, 24), (VIP, 32)}
    assert addrs("br0") == {(LB_IN_IP, 24), (INSIDE_VIP, 24)}
    inside_vip = [a for a in links["br0"]["addr_info"] if a.get("local") == INSIDE_VIP][0]
    assert inside_vip.get("secondary") is True
    for port in ("lb-rs3", "lb-rs4"):
        assert links[port]["master"] == "br0"
    assert module_lab.sysctl("lb", "net.ipv4.ip_forward") == "1"
    assert module_lab.sysctl("lb", "net.bridge.bridge-nf-call-iptables") == "1"
    for key, names in labmod.IFACES.items():
        assert all(len(n) <= 15 for n in names)


def test_access_log_records_client_address(module_lab):
    module_lab.clear_access_log()
    module_lab.curl(f"http://{RS_IPS['rs3']}/")
    entries = module_lab.access_log("rs3")
    assert len(entries) == 1
    e = entries[0]
    assert (e["remote_addr"], e["method"], e["uri"], e["status"]) == (CLIENT_IP, "GET", "/", "200")
    assert module_lab.access_log("rs4") == []


def test_udp_echo_answers_from_the_request_socket(module_lab):
    for rs, name in (("rs3", "Server3"), ("rs4", "Server4")):
        r = send_udp(module_lab, "client", RS_IPS[rs], 5353, b"ping", recv=True)
        assert r["data"] == f"{name}:ping"
        assert r["peer"] == [RS_IPS[rs], 5353]


def test_big_file_download(module_lab):
    out = module_lab.dir / "big.download"
    module_lab.curl(f"http://{RS_IPS['rs4']}/big", "-o", str(out), timeout=20)
    data = out.read_bytes()
    out.unlink()
    assert len(data) == module_lab.bulk_size == 2 << 20
    assert hashlib.sha256(data).hexdigest() == module_lab.bulk_sha256


def test_set_mtu(module_lab):
    module_lab.set_mtu("rs3", "rs3-lb", 1300)
    try:
        assert module_lab.mtu("rs3", "rs3-lb") == 1300
    finally:
        module_lab.set_mtu("rs3", "rs3-lb", 1500)
    assert module_lab.mtu("rs3", "rs3-lb") == 1500


def test_popen_and_stop(module_lab):
    p = module_lab.popen("client", ["sleep", "30"], name="sleeper")
    deadline = time.monotonic() + 5                 # `ip netns exec` needs a moment to setns
    while p.pid not in module_lab.pids("client"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert module_lab.stop(p) == -signal.SIGTERM
    assert p.pid not in module_lab.pids("client")


# --- teardown and crash cleanup ----------------------------------------------------------------------
def _gone(pids):
    return [p for p in pids if labmod._alive(p)] == []


def test_teardown_leaves_nothing(lab_prefix):
    lab = Lab(lab_prefix, udp_echo=True).setup()
    pids = [p for k in labmod.NS_KEYS for p in lab.pids(k)]
    nginx = [p for p in pids if "nginx" in open(f"/proc/{p}/cmdline").read()]
    assert len(nginx) == 4                      # master + worker on each real server
    lab_dir = lab.dir
    lab.teardown()
    assert not [n for n in labmod.existing_namespaces() if n.startswith(lab_prefix + "-")]
    assert _gone(pids)
    assert not lab_dir.exists()
    lab.teardown()                              # idempotent


def test_failed_setup_tears_down(lab_prefix, monkeypatch):
    def boom(self):
        raise LabError("injected")
    monkeypatch.setattr(Lab, "_wait_ready", boom)
    with pytest.raises(LabError, match="injected"):
        with Lab(lab_prefix):
            pass
    assert not [n for n in labmod.existing_namespaces() if n.startswith(lab_prefix + "-")]


def test_cleanup_prefix_after_crash(lab_prefix):
    code = (f"import sys, time; sys.path.insert(0, {str(labmod.REPO_ROOT)!r})\n"
            f"from control.lab import Lab\n"
            f"lab = Lab({lab_prefix!r}).setup()\n"
            f"print('READY', flush=True)\n"
            f"time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "READY"
    finally:
        p.kill()                                # SIGKILL: no teardown, no atexit
        p.wait(10)
    names = [labmod.ns_name(lab_prefix, k) for k in labmod.NS_KEYS]
    assert set(names) <= set(labmod.existing_namespaces())
    pids = [pid for n in names for pid in labmod.netns_pids(n)]
    assert len(pids) >= 4                       # the orphaned nginx processes
    with pytest.raises(LabError, match="already exist"):
        Lab(lab_prefix).setup()
    tmp_glob = os.path.join(labmod.tempfile.gettempdir(), labmod.TMP_GLOB.format(prefix=lab_prefix))
    assert len(labmod.glob.glob(tmp_glob)) == 1
    assert sorted(labmod.cleanup_prefix(lab_prefix)) == sorted(names)
    assert not set(names) & set(labmod.existing_namespaces())
    assert _gone(pids)
    assert labmod.glob.glob(tmp_glob) == []
    assert labmod.cleanup_prefix(lab_prefix) == []


# --- rules -----------------------------------------------------------------------------------------------
def test_rules_install_remove_leaves_iptables_clean(lab):
    # someone else's rules, which must survive untouched
    lab.run("lb", "iptables-nft -w -t raw -A PREROUTING -d 10.9.9.9/32 -j ACCEPT && "
                  "iptables-nft -w -t filter -A INPUT -p tcp --dport 22 -j ACCEPT")
    before = save_raw(lab)
    out = rules_cli(lab, "install", "--queues", "0:3", "--in", f"tcp:{VIP}:80",
                    "--in", f"udp:{VIP}:5353", "--out", f"tcp:{RS_IPS['rs3']}:80",
                    "--out", f"udp:{RS_IPS['rs4']}:5353").stdout
    raw = lab.run("lb", ["iptables-nft-save", "-t", "raw"]).stdout
    assert ":LVSDP-PRE-default" in raw and ":LVSDP-OUT-default" in raw
    pre = [l for l in raw.splitlines() if l.startswith("-A PREROUTING")]
    assert pre[0] == '-A PREROUTING -m comment --comment "lvs-dp:default" -j LVSDP-PRE-default'
    assert "--queue-bypass" not in raw
    for q in range(4):
        assert f"--queue-num {q}" in raw
    # notrack precedes the queue rules of each match
    chain = [l for l in raw.splitlines() if l.startswith("-A LVSDP-PRE-default")]
    first_tcp = [i for i, l in enumerate(chain) if "--dport 80" in l]
    assert "CT --notrack" in chain[first_tcp[0]] and "NFQUEUE" in chain[first_tcp[1]]
    assert out.strip().splitlines()[0].startswith("-A PREROUTING")
    # nft sees the same table
    nft = lab.run("lb", ["nft", "list", "table", "ip", "raw"]).stdout
    assert "chain LVSDP-PRE-default" in nft and "queue num" in nft
    assert rules_cli(lab, "remove").stdout.split() == ["LVSDP-OUT-default", "LVSDP-PRE-default"]
    assert save_raw(lab) == before
    assert rules_cli(lab, "remove").stdout.strip() == ""      # idempotent


def test_instances_and_leftovers(lab):
    rules_cli(lab, "install", "--instance", "a", "--queues", "0", "--in", f"tcp:{VIP}:80")
    rules_cli(lab, "install", "--instance", "b", "--queues", "1", "--in", f"udp:{VIP}:5353")
    # the process that installed 'a' is gone: a crashed run. A new install of 'a' replaces it.
    rules_cli(lab, "install", "--instance", "a", "--queues", "2", "--in", f"tcp:{VIP}:8080")
    raw = lab.run("lb", ["iptables-nft-save", "-t", "raw"]).stdout
    assert raw.count("-j LVSDP-PRE-a") == 1 and raw.count("-j LVSDP-OUT-a") == 1
    assert "--dport 8080" in raw and "--dport 80 " not in raw
    assert "LVSDP-PRE-b" in raw
    assert rules_cli(lab, "cleanup", "--instance", "a").stdout.split() == ["LVSDP-OUT-a", "LVSDP-PRE-a"]
    raw = lab.run("lb", ["iptables-nft-save", "-t", "raw"]).stdout
    assert "LVSDP-PRE-a" not in raw and "LVSDP-OUT-a" not in raw and "LVSDP-PRE-b" in raw
    assert rules_cli(lab, "cleanup", "--all").stdout.split() == ["LVSDP-OUT-b", "LVSDP-PRE-b"]
    assert "LVSDP" not in lab.run("lb", ["iptables-nft-save"]).stdout


def test_rules_python_api_and_replace(lab):
    code = f"""
from control.rules import Rules, Match
r = Rules((0, 2), instance="api")
r.install([Match("in", "tcp", "{VIP}", 80)])
n1 = len(r.installed())
r.replace([Match("in", "tcp", "{VIP}", 80), Match("out", "tcp", "{RS_IPS['rs3']}", 80)])
n2 = len(r.installed())
r.verify()
print(n1, n2, len(r.remove()), len(r.installed()))
"""
    n1, n2, removed, left = map(int, lab.python("lb", code).stdout.split())
    assert n2 > n1 > 2 and removed == 2 and left == 0


def test_fwmark_match_and_queue_lists(lab):
    assert QueueSpec.parse([4, 5, 6]) == QueueSpec(4, 3) == QueueSpec.parse(range(4, 7))
    assert QueueSpec.parse((4, 3)) == QueueSpec.parse("4:6")
    with pytest.raises(ValueError):
        QueueSpec.parse([4, 6])
    # the operator marks in raw PREROUTING (mangle would come after our queue rule)
    lab.run("lb", f"iptables-nft -w -t raw -A PREROUTING -d {VIP}/32 -p tcp --dport 8080 "
                  f"-j MARK --set-mark 5")
    rules_cli(lab, "install", "--queues", "0", "--fwmark", "tcp:5")
    pre = [l for l in lab.run("lb", ["iptables-nft-save", "-t", "raw"]).stdout.splitlines()
           if l.startswith("-A PREROUTING")]
    assert "MARK" in pre[0] and "LVSDP-PRE-default" in pre[1]      # our jump comes after
    r = lab.curl(f"http://{VIP}:8080/", timeout=1.5, check=False)
    assert r.returncode == 28                                        # queued, nobody listening
    assert count(lab, "-m mark --mark 0x5", "NFQUEUE") >= 1
    r = lab.curl(f"http://{VIP}:8081/", timeout=1.5, check=False)
    assert r.returncode == 7                                         # unmarked: not ours
    rules_cli(lab, "remove")


def test_queued_packets_fail_closed_and_bridged_frames_are_seen(lab):
    rules_cli(lab, "install", "--queues", "0", "--in", f"tcp:{VIP}:80",
              "--out", f"tcp:{RS_IPS['rs3']}:80")
    # nobody on queue 0: no bypass, the SYN to the VIP is dropped
    r = lab.curl(f"http://{VIP}/", timeout=1.5, check=False)
    assert r.returncode == 28, r.stderr
    # rs3's answers to the balancer cross the bridge: raw PREROUTING of the lb sees them
    r = lab.curl(f"http://{RS_IPS['rs3']}/", ns="lb", timeout=1.5, check=False)
    assert r.returncode == 28, r.stderr
    assert lab.curl(f"http://{RS_IPS['rs4']}/", ns="lb").stdout == "<h1>Hello Server4</h1>\n"
    assert count(lab, f"-d {VIP}/32", "--dport 80", "NFQUEUE") >= 1
    assert count(lab, f"-s {RS_IPS['rs3']}/32", "--sport 80", "NFQUEUE") >= 1
    # with a listener that accepts everything, the same packets pass unchanged
    start_nfq(lab, NFQ_ACCEPT, 0)
    r = lab.curl(f"http://{VIP}/", timeout=3, check=False)
    assert r.returncode == 7, r.stderr          # refused: the VIP is local, nothing listens on :80
    assert lab.curl(f"http://{RS_IPS['rs3']}/", ns="lb").stdout == "<h1>Hello Server3</h1>\n"
    rules_cli(lab, "remove")


def test_queues_steered_by_client_address(lab):
    qs = QueueSpec(0, 2)
    assert (qs.queue_for(ip_int(CLIENT_IP)), qs.queue_for(ip_int(CLIENT2_IP))) == (0, 1)
    lab.run("client", ["ip", "addr", "add", f"{CLIENT2_IP}/24", "dev", "c-lb"])
    rules_cli(lab, "install", "--queues", "0:1", "--in", f"udp:{VIP}:5353",
              "--out", f"udp:{RS_IPS['rs3']}:5400",
              "--out", f"udp:{RS_IPS['rs4']}:5400:dport")       # FULLNAT-style: by local port
    # in: by source address
    send_udp(lab, "client", VIP, 5353, src=CLIENT_IP)
    send_udp(lab, "client", VIP, 5353, src=CLIENT2_IP)
    send_udp(lab, "client", VIP, 5353, src=CLIENT2_IP)
    assert count(lab, "--dport 5353", "--queue-num 0") == 1
    assert count(lab, "--dport 5353", "--queue-num 1") == 2
    # out: by destination address
    send_udp(lab, "rs3", CLIENT2_IP, 40000, sport=5400)
    assert count(lab, f"-s {RS_IPS['rs3']}/32", "--sport 5400", "--queue-num 1") == 1
    assert count(lab, f"-s {RS_IPS['rs3']}/32", "--sport 5400", "--queue-num 0") == 0
    # out with steer=dport: by destination port (to a local address, as FULLNAT replies are)
    send_udp(lab, "rs4", LB_IN_IP, 40001, sport=5400)
    send_udp(lab, "rs4", LB_IN_IP, 40002, sport=5400)
    send_udp(lab, "rs4", LB_IN_IP, 40004, sport=5400)
    assert count(lab, f"-s {RS_IPS['rs4']}/32", "--sport 5400", "--queue-num 1") == 1
    assert count(lab, f"-s {RS_IPS['rs4']}/32", "--sport 5400", "--queue-num 0") == 2
    assert steer_index(40001, 2) == 1 and steer_index(40002, 2) == 0


def test_icmp_errors_steered_by_the_quoted_packet(lab):
    lab.run("client", ["ip", "addr", "add", f"{CLIENT2_IP}/24", "dev", "c-lb"])
    rs3 = RS_IPS["rs3"]
    rules_cli(lab, "install", "--queues", "0:1", "--in", f"udp:{VIP}:5353", "--out", f"udp:{rs3}:5353")
    icmp_pre = lambda addr, q: count(lab, "LVSDP-PRE", addr, "-p icmp", f"--queue-num {q}")
    icmp_out = lambda addr, q: count(lab, "LVSDP-OUT", addr.lower(), f"--queue-num {q}")
    rs3_hex = f"0x{ip_int(rs3):08x}"
    vip_hex = f"0x{ip_int(VIP):08x}"

    # 1. rs3 answers "port unreachable" to the client (routed, not balanced): an 'out' error,
    #    steered by the quoted packet's source = the client
    send_udp(lab, "client", rs3, 9, src=CLIENT2_IP)
    time.sleep(0.2)
    assert (icmp_pre(f"-s {rs3}/32", 0), icmp_pre(f"-s {rs3}/32", 1)) == (0, 1)

    # 2. the balancer itself cannot forward a DF datagram into the smaller inside MTU: the
    #    "fragmentation needed" it generates quotes (client -> rs3) and is seen in raw OUTPUT
    for port in ("lb-rs3", "lb-rs4"):
        lab.set_mtu("lb", port, 1300)
    assert lab.mtu("lb", "br0") == 1300
    send_udp(lab, "client", rs3, 9, payload=b"y" * 1400, src=CLIENT2_IP, df=True)
    time.sleep(0.2)
    assert (icmp_out(rs3_hex, 0), icmp_out(rs3_hex, 1)) == (0, 1)

    # 3. an error to the VIP about a reply the balancer sent as the VIP, from the client side
    # a raw IP socket, so that a packet sent on the balancer traverses raw OUTPUT (scapy's
    # default PF_PACKET socket would bypass netfilter)
    scapy = ("from scapy.all import IP, ICMP, UDP, send, conf, L3RawSocket\n"
             "conf.L3socket = L3RawSocket\n"
             "send(IP(src={src!r}, dst={dst!r})/ICMP(type=3, code=4, nexthopmtu=1200)/"
             "IP(src={qsrc!r}, dst={qdst!r})/UDP(sport=5353, dport=40000), verbose=0)\n")
    lab.python("client", scapy.format(src=CLIENT_IP, dst=VIP, qsrc=VIP, qdst=CLIENT_IP))
    lab.python("client", scapy.format(src=CLIENT_IP, dst=VIP, qsrc=VIP, qdst=CLIENT2_IP))
    assert (icmp_pre(f"-d {VIP}/32", 0), icmp_pre(f"-d {VIP}/32", 1)) == (1, 1)

    # 4. an error generated on the balancer about a packet it sent as the VIP (raw OUTPUT)
    lab.python("lb", scapy.format(src=LB_OUT_IP, dst=CLIENT2_IP, qsrc=VIP, qdst=CLIENT2_IP))
    assert (icmp_out(vip_hex, 0), icmp_out(vip_hex, 1)) == (0, 1)


def test_non_first_fragments_are_queued(lab):
    rules_cli(lab, "install", "--queues", "0", "--in", f"udp:{VIP}:5353")
    send_udp(lab, "client", VIP, 5353, payload=b"z" * 4000)      # 3 fragments at MTU 1500
    time.sleep(0.2)
    assert count(lab, "--dport 5353", "NFQUEUE") == 1             # the first: it has the ports
    assert count(lab, "-p udp -f", "NFQUEUE") == 2                # not reassembled (no conntrack)


# --- sysctls and local addresses --------------------------------------------------------------------------
SYSCTL_KEYS = ["net.ipv4.ip_forward", "net.ipv4.conf.all.accept_local",
               "net.ipv4.conf.lb-c.accept_local", "net.ipv4.conf.br0.accept_local",
               "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.br0.rp_filter",
               "net.ipv4.conf.default.send_redirects", "net.ipv4.conf.br0.send_redirects"]


def read_sysctls(lab):
    return {k: lab.sysctl("lb", k) for k in SYSCTL_KEYS}


def test_sysctls_apply_restore_and_crash_recovery(lab):
    lab.sysctl("lb", "net.ipv4.conf.br0.rp_filter", 2)   # a strict original to restore
    lab.sysctl("lb", "net.ipv4.ip_forward", 0)
    original = read_sysctls(lab)
    state = lab.dir / "sysctl-state.json"
    changed = json.loads(rules_cli(lab, "sysctl-apply", "--state", str(state)).stdout)
    assert changed["net.ipv4.conf.br0.rp_filter"] == ["2", "0"]
    applied = read_sysctls(lab)
    assert applied["net.ipv4.ip_forward"] == "1"
    assert applied["net.ipv4.conf.br0.accept_local"] == "1"
    assert applied["net.ipv4.conf.br0.rp_filter"] == "0"
    assert applied["net.ipv4.conf.br0.send_redirects"] == "0"
    assert json.loads(state.read_text())["netns"] == lab.ns("lb")
    # the process that applied them is gone (a crash); the next run restores first, then applies
    code = f"""
from control.rules import Sysctls
s = Sysctls("lab", state_path={str(state)!r})
s.apply()
assert Sysctls.read("net/ipv4/conf/br0/rp_filter") == "0"
s.restore()
"""
    lab.python("lb", code)
    assert read_sysctls(lab) == original
    assert not state.exists()
    # restore_from a crashed run's file
    rules_cli(lab, "sysctl-apply", "--state", str(state))
    assert read_sysctls(lab) == applied
    rules_cli(lab, "sysctl-restore", "--state", str(state))
    assert read_sysctls(lab) == original and not state.exists()
    # the daemon's form: Sysctls(instance) with the default state file under /run/lvs-dp
    code = """
from control.rules import Sysctls, default_state_path
s = Sysctls("labtest")
assert s.state_path == default_state_path("labtest"), s.state_path
with s:
    assert s.state_path.exists() and Sysctls.read("net/ipv4/conf/all/accept_local") == "1"
print(s.state_path, s.state_path.exists())
"""
    path, exists = lab.python("lb", code).stdout.split()
    assert path.endswith(f"sysctl-{lab.ns('lb')}-labtest.json") and exists == "False"
    assert read_sysctls(lab) == original


def test_toy_nat_needs_the_sysctls(lab):
    rules_cli(lab, "install", "--queues", "0", "--in", f"tcp:{VIP}:80",
              "--out", f"tcp:{RS_IPS['rs3']}:80")
    start_nfq(lab, NFQ_TOY_NAT, name="toynat")
    # the rewritten SYN-ACK leaves with the VIP, a local address, as source: a martian
    r = lab.curl(f"http://{VIP}/", timeout=1.5, check=False)
    assert r.returncode == 28, r.stderr
    state = lab.dir / "sysctl-state.json"
    rules_cli(lab, "sysctl-apply", "--state", str(state))
    assert lab.access_log("rs3") == []          # setup cleared its own readiness probes
    for _ in range(3):
        assert lab.curl(f"http://{VIP}/", timeout=3).stdout == "<h1>Hello Server3</h1>\n"
    assert {e["remote_addr"] for e in lab.access_log("rs3")} == {CLIENT_IP}
    rules_cli(lab, "sysctl-restore", "--state", str(state))


def test_local_addresses(lab):
    code = f"""
import json
from control.rules import local_addresses, warn_not_local
print(json.dumps([local_addresses(), warn_not_local(["{VIP}", "172.16.1.200"])]))
"""
    addrs, missing = json.loads(lab.python("lb", code).stdout)
    assert addrs[VIP] == "lb-c" and addrs[INSIDE_VIP] == "br0" and addrs[LB_IN_IP] == "br0"
    assert missing == ["172.16.1.200"]
