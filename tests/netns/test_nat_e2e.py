"""NAT end to end through `lvs-dp run`, in the seed lab (client, balancer, two nginx real servers).

Every test drives the real binary in the balancer namespace with a keepalived.conf, sends real
traffic from the client namespace, and checks what arrived where. The lab and the daemon are torn
down even when a test fails (fixtures)."""

import os
import re
import signal
import time

import pytest

from control.lab import Lab, REPO_ROOT
from control.labrun import LvsDp

pytestmark = pytest.mark.netns
EXAMPLES = REPO_ROOT / "examples"
BACKENDS = ["netlink", "nfqueue"]
DEFAULT_BACKEND = "netlink"


@pytest.fixture(scope="module")
def lab():
    prefix = f"e2e{os.getpid() % 10000}"
    with Lab(prefix, udp_echo=True, replace=True) as lab:
        yield lab


def lvsdp_rules(lab):
    out = lab.run("lb", ["iptables-save"]).stdout
    return [line for line in out.splitlines() if "LVSDP" in line.upper()]


def curl_bodies(lab, n):
    return [lab.curl(f"http://{lab.vip}/").stdout.strip() for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_curl_alternates_and_stats_count(lab, backend):
    with LvsDp(lab, EXAMPLES / "seed-nat.conf", backend=backend) as lb:
        bodies = curl_bodies(lab, 20)
        assert all(b in ("<h1>Hello Server3</h1>", "<h1>Hello Server4</h1>") for b in bodies), bodies
        assert all(bodies[i] != bodies[i + 1] for i in range(19)), bodies
        assert bodies.count("<h1>Hello Server3</h1>") == 10
        snap = lb.snapshot()
        [svc] = snap["services"]
        assert svc["stats"]["conns"] == 20
        # Every request is at least SYN, ACK, GET, FIN, ACK in and SYN-ACK, reply, FIN out.
        assert svc["stats"]["inpkts"] >= 20 * 4 and svc["stats"]["outpkts"] >= 20 * 3
        assert {r["addr"]: r["stats"]["conns"] for r in svc["reals"]} == {
            "172.16.2.13": 10, "172.16.2.14": 10}
        stats = lb.list("--stats", "--exact")
        assert re.search(r"TCP\s+172\.16\.1\.100:80\s+20\s", stats), stats
        table = lb.list()
        assert "TCP  172.16.1.100:80 rr" in table
        assert re.search(r"-> 172\.16\.2\.13:80\s+Masq\s+10\s", table), table
        # nginx saw the client's own address (NAT keeps the source).
        assert {e["remote_addr"] for e in lab.access_log("rs3")} == {lab.client_ip}
        assert snap["dataplane"]["drops"]["malformed"] == 0
    assert lvsdp_rules(lab) == []


def test_wrr_weights_show_up(lab):
    with LvsDp(lab, EXAMPLES / "seed-nat-wrr.conf", backend=DEFAULT_BACKEND):
        bodies = curl_bodies(lab, 400)
    s3 = sum("Server3" in b for b in bodies)
    s4 = sum("Server4" in b for b in bodies)
    assert s3 + s4 == 400
    assert (s3, s4) == (300, 100)


UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect(("172.16.1.100", 53))
for i in range(5):
    s.send(b"ping%d" % i)
    data, addr = s.recvfrom(2048)
    print(addr[0], addr[1], data.decode())
"""


def test_udp_answers_from_vip_and_sticks_to_one_real_server(lab):
    with LvsDp(lab, EXAMPLES / "seed-udp.conf", backend=DEFAULT_BACKEND):
        servers = []
        for _ in range(2):
            out = lab.python("client", UDP_CLIENT).stdout.split("\n")
            lines = [line.split(" ", 2) for line in out if line]
            assert len(lines) == 5
            assert {(a, p) for a, p, _ in lines} == {("172.16.1.100", "53")}
            names = {d.split(":")[0] for _, _, d in lines}
            assert len(names) == 1, lines      # one client socket, one real server
            servers.append(names.pop())
        assert sorted(servers) == ["Server3", "Server4"]   # a new socket moves on (rr)


PORT_UNREACH_CLIENT = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect(("172.16.1.100", 54))
s.send(b"x")
try:
    s.recv(100)
    print("answer")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
"""

PMTU_CLIENT = r"""
import socket, time
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
s.connect(("172.16.1.100", 53))
s.send(b"x" * 1400)
for _ in range(30):
    time.sleep(0.1)
    try:
        s.send(b"x" * 1400)
    except OSError as e:
        print("EMSGSIZE" if e.errno == 90 else e)
        break
print(s.getsockopt(socket.IPPROTO_IP, IP_MTU))
"""


def test_icmp_errors_reach_client_translated(lab, tmp_path):
    # Port unreachable from a real server (nothing on 172.16.2.13:5354) reaches the client's
    # socket, which only accepts it if the quoted datagram reads client -> VIP:54.
    conf = tmp_path / "udp54.conf"
    conf.write_text((EXAMPLES / "seed-udp.conf").read_text()
                    .replace("172.16.1.100 53", "172.16.1.100 54").replace(" 5353", " 5354"))
    with LvsDp(lab, conf, backend=DEFAULT_BACKEND) as lb:
        assert lab.python("client", PORT_UNREACH_CLIENT).stdout.strip() == "refused"
        assert lb.snapshot()["dataplane"]["counters"]["icmp_translated"] >= 1
    # Fragmentation needed: the path from the balancer to the real servers gets a 1300-byte MTU.
    # The balancer's kernel answers a 1400-byte DF datagram (already rewritten to the real
    # server) with an ICMP error; lvs-dp translates it so the client learns the PMTU for the VIP.
    lab.run("lb", "ip route add 172.16.2.13/32 dev br0 mtu lock 1300 && "
                  "ip route add 172.16.2.14/32 dev br0 mtu lock 1300")
    try:
        with LvsDp(lab, EXAMPLES / "seed-udp.conf", backend=DEFAULT_BACKEND) as lb:
            out = lab.python("client", PMTU_CLIENT).stdout.split()
            assert out == ["EMSGSIZE", "1300"], out
            assert lb.snapshot()["dataplane"]["counters"]["icmp_translated"] >= 1
    finally:
        lab.run("lb", "ip route del 172.16.2.13/32; ip route del 172.16.2.14/32", check=False)


def test_sigterm_removes_rules_fast_and_sigkill_is_cleaned_at_next_start(lab):
    lb = LvsDp(lab, EXAMPLES / "seed-nat.conf", backend=DEFAULT_BACKEND).start()
    assert lvsdp_rules(lab)
    accept_local = lab.sysctl("lb", "net.ipv4.conf.lb-c.accept_local")
    t0 = time.monotonic()
    lb.stop(signal.SIGTERM)
    # Rules go within 2 s of the signal (the process may still be finishing its exit).
    assert time.monotonic() - t0 < 2.5
    assert lvsdp_rules(lab) == []
    assert accept_local == "1" and lab.sysctl("lb", "net.ipv4.conf.lb-c.accept_local") == "0"
    for table in ("raw", "mangle", "nat", "filter"):
        assert "LVSDP" not in lab.run("lb", ["iptables-save", "-t", table]).stdout.upper()

    lb = LvsDp(lab, EXAMPLES / "seed-nat.conf", backend=DEFAULT_BACKEND).start()
    lb.stop(signal.SIGKILL)
    assert lvsdp_rules(lab)                  # a crash leaves its rules behind ...
    # ... with nobody on the queue, so balanced traffic is dropped (no fail-open) ...
    assert lab.curl(f"http://{lab.vip}/", check=False, timeout=2).returncode != 0
    with LvsDp(lab, EXAMPLES / "seed-nat.conf", backend=DEFAULT_BACKEND) as lb:   # ... and the next start cleans up
        assert len(set(curl_bodies(lab, 4))) == 2
        rules = lvsdp_rules(lab)
        assert len([r for r in rules if "NFQUEUE" in r]) == len(set(r for r in rules if "NFQUEUE" in r))
    assert lvsdp_rules(lab) == []
    assert lab.sysctl("lb", "net.ipv4.conf.lb-c.accept_local") == "0"


def test_two_workers_keep_both_directions_of_each_flow_together(lab):
    """--queues 2: one worker per queue, steered by the client address (its source inbound, its
    destination on the way back), so every connection is seen whole by one worker."""
    # A second client address whose low bit differs, so the two clients land on two queues.
    lab.run("client", "ip addr add 172.16.1.13/24 dev c-lb")
    try:
        with LvsDp(lab, EXAMPLES / "seed-nat.conf", queues=2) as lb:
            for src in ("172.16.1.12", "172.16.1.13"):
                bodies = [lab.curl(f"http://{lab.vip}/", "--interface", src).stdout.strip()
                          for _ in range(10)]
                assert all(bodies[i] != bodies[i + 1] for i in range(9)), bodies
            snap = lb.snapshot()
    finally:
        lab.run("client", "ip addr del 172.16.1.13/24 dev c-lb", check=False)
    assert snap["dataplane"]["workers"] == 2
    assert snap["services"][0]["stats"]["conns"] == 20
    # Both queues carried packets: each client had a worker of its own.
    assert all(q["id_sequence"] > 0 for q in snap["dataplane"]["queues"].values()), snap["dataplane"]["queues"]
    # No packet of these flows reached a worker without its connection.
    assert snap["dataplane"]["counters"]["no_conn_not_syn_passed"] == 0
    assert snap["dataplane"]["counters"]["not_ours"] == 0
