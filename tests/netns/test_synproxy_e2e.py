"""SYN-proxy end to end through `lvs-dp run` in the seed lab: keepalived's `syn_proxy` on the NAT
and FULLNAT services. The client completes its handshake with the balancer's cookie; only then
does a real server see a SYN (from the balancer, sent through its raw socket). A spoofed-source
SYN flood is answered with cookies and leaves nothing half-open on the real servers; forged ACKs
are dropped and counted. Floods are bounded in count and time, and only inside the lab."""

import hashlib
import os
import re
import sys
import time

import pytest

from control.lab import CLIENT_IP, LB_IN_IP, Lab, REPO_ROOT
from control.labrun import LvsDp
from tests.netns.clients import SLOW_DOWNLOAD

pytestmark = pytest.mark.netns
EXAMPLES = REPO_ROOT / "examples"
LADDRS = ("172.16.2.200", "172.16.2.201")
HELLO = ("<h1>Hello Server3</h1>", "<h1>Hello Server4</h1>")


def with_syn_proxy(src, dst, kind):
    """Copy a seed config, adding `syn_proxy` to its first virtual_server of lb_kind `kind`
    (port 80 in both seeds; SYN-proxy is TCP only)."""
    text = src.read_text()
    text = re.sub(rf"(\n(\s*)lb_kind {kind}\b[^\n]*)", r"\1\n\2syn_proxy", text, count=1)
    assert "syn_proxy" in text
    dst.write_text(text)
    return dst


@pytest.fixture(scope="module")
def lab():
    with Lab(f"sp{os.getpid() % 10000}", replace=True) as lab:
        yield lab


def syn_recv(lab, rs, legit=()):
    """Half-open entries on real server `rs`, but for those from a `legit` peer: the balancer's
    health checks, and its own SYNs for cookie-validated clients, are half-open for an instant
    too."""
    out = lab.run(rs, ["ss", "-tanH", "state", "syn-recv"]).stdout
    return [line for line in out.splitlines()
            if line.strip() and line.split()[-1].rsplit(":", 1)[0] not in legit]


def _syn_counters(lab, legit, on=True):
    """In each real server, a chain SPCOUNT whose last rule counts SYNs to port 80 from any
    source but `legit` (the real client or the local addresses, and the balancer's health
    checks); `on=False` removes it."""
    for rs in ("rs3", "rs4"):
        if not on:
            lab.run(rs, "iptables -D INPUT -p tcp --syn --dport 80 -j SPCOUNT", check=False)
            lab.run(rs, "iptables -F SPCOUNT", check=False)
            lab.run(rs, "iptables -X SPCOUNT", check=False)
            continue
        lab.run(rs, "iptables -N SPCOUNT")
        for a in legit:
            lab.run(rs, f"iptables -A SPCOUNT -s {a} -j RETURN")
        lab.run(rs, "iptables -A SPCOUNT -j RETURN")
        lab.run(rs, "iptables -I INPUT -p tcp --syn --dport 80 -j SPCOUNT")


def _other_syns(lab):
    n = 0
    for rs in ("rs3", "rs4"):
        rules = lab.run(rs, "iptables -nvxL SPCOUNT").stdout.strip().splitlines()
        n += int(rules[-1].split()[0])       # the catch-all rule's packet count
    return n


def flood_while_serving(lab, lb, legit):
    """A spoofed-source SYN flood at the VIP (5000 SYNs, ~5 s, from the client namespace) while
    curl keeps connecting and a rate-limited download that started before it runs through it.
    Checks: every curl answered, the download complete, no SYN from the flood at the real
    servers, nothing half-open there, cookies sent."""
    _syn_counters(lab, legit)
    try:
        out = lab.dir / f"download-{len(lab.daemons())}.out"
        download = lab.popen("client", [sys.executable, "-c", SLOW_DOWNLOAD, lab.vip, "/big",
                                        "12", str(lab.bulk_size), str(out)],     # outlasts the flood
                             name=f"download-{len(lab.daemons())}")
        time.sleep(0.5)
        flood = lab.popen("client", ["hping3", "-q", "-S", "--rand-source", "-p", "80",
                                     "-i", "u1000", "-c", "5000", lab.vip],
                          name=f"synflood-{len(lab.daemons())}")
        try:
            during = []
            half_open = []
            t_end = time.monotonic() + 4
            while time.monotonic() < t_end:
                during.append(lab.curl(f"http://{lab.vip}/", check=False, timeout=3).stdout.strip())
                half_open += syn_recv(lab, "rs3", legit) + syn_recv(lab, "rs4", legit)
            try:
                flood.wait(timeout=30)
            except Exception:
                pass
        finally:
            lab.stop(flood)
        still_running = download.poll() is None
        try:
            download.wait(timeout=30)
        finally:
            lab.stop(download)
        assert during and all(b in HELLO for b in during), during
        assert half_open == []
        assert syn_recv(lab, "rs3", legit) == [] and syn_recv(lab, "rs4", legit) == []
        # The connection established before the flood lived through it and was not reset.
        assert still_running and download.returncode == 0, download.log_path.read_text()
        assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.bulk_sha256
        assert _other_syns(lab) == 0
    finally:
        _syn_counters(lab, legit, on=False)
    dp = lb.snapshot()["dataplane"]
    assert dp["counters"]["synproxy_cookie_sent"] >= 1000


def test_nat_syn_proxy_curl_flood_and_forged_acks(lab, tmp_path):
    conf = with_syn_proxy(EXAMPLES / "seed-nat.conf", tmp_path / "nat-sp.conf", "NAT")
    with LvsDp(lab, conf) as lb:
        bodies = [lab.curl(f"http://{lab.vip}/").stdout.strip() for _ in range(6)]
        assert all(b in HELLO for b in bodies) and len(set(bodies)) == 2, bodies
        dp = lb.snapshot()["dataplane"]
        assert dp["counters"]["synproxy_cookie_sent"] >= 6
        assert dp["counters"]["synproxy_ack_ok"] >= 6
        assert dp["counters"]["synproxy_rs_synack"] >= 6
        flood_while_serving(lab, lb, (CLIENT_IP, LB_IN_IP))
        # Forged ACKs: random sequence numbers, no cookie.
        lab.run("client", ["hping3", "-q", "-A", "-p", "80", "-i", "u10000", "-c", "50", lab.vip],
                check=False, timeout=30)
        dp = lb.snapshot()["dataplane"]
        assert dp["drops"]["synproxy_bad_ack"] >= 45
        assert "synproxy_bad_ack" in lb.list("--stats")
        assert lab.curl(f"http://{lab.vip}/").stdout.strip() in HELLO


@pytest.fixture
def fnat_lab(lab):
    for a in LADDRS:
        lab.run("lb", f"ip addr add {a}/24 dev br0")
    try:
        yield lab
    finally:
        for a in LADDRS:
            lab.run("lb", f"ip addr del {a}/24 dev br0", check=False)


def test_fullnat_syn_proxy_curl_and_flood(fnat_lab, tmp_path):
    lab = fnat_lab
    conf = with_syn_proxy(EXAMPLES / "seed-fnat.conf", tmp_path / "fnat-sp.conf", "FNAT")
    lab.clear_access_log()
    with LvsDp(lab, conf) as lb:
        bodies = [lab.curl(f"http://{lab.vip}/").stdout.strip() for _ in range(6)]
        assert all(b in HELLO for b in bodies) and len(set(bodies)) == 2, bodies
        seen = {e["remote_addr"] for rs in ("rs3", "rs4") for e in lab.access_log(rs)}
        assert seen <= set(LADDRS) and seen
        dp = lb.snapshot()["dataplane"]
        assert dp["counters"]["synproxy_rs_synack"] >= 6
        flood_while_serving(lab, lb, (*LADDRS, LB_IN_IP))


def test_nat_syn_proxy_with_the_nfqueue_backend(lab, tmp_path):
    """The netfilterqueue adapter sends the engine's generated packets through its own raw
    socket, as the netlink backend does."""
    conf = with_syn_proxy(EXAMPLES / "seed-nat.conf", tmp_path / "nat-sp.conf", "NAT")
    with LvsDp(lab, conf, backend="nfqueue") as lb:
        bodies = [lab.curl(f"http://{lab.vip}/").stdout.strip() for _ in range(4)]
        assert all(b in HELLO for b in bodies) and len(set(bodies)) == 2, bodies
        assert lb.snapshot()["dataplane"]["counters"]["synproxy_rs_synack"] >= 4


@pytest.mark.parametrize("backend", ["netlink", "nfqueue"])
def test_nat_silent_real_servers_client_reset_after_timed_syn_retries(lab, tmp_path, backend):
    """Real servers that drop SYNs from clients (their health checks, from the balancer, still
    pass): the balancer retries its SYN on a timer (`--synproxy` sets 2 retries), then resets
    the client, who fails fast instead of hanging, and no entry is left. Both backends run the
    retry scan (it rides on their idle empty batches)."""
    conf = with_syn_proxy(EXAMPLES / "seed-nat.conf", tmp_path / "nat-sp.conf", "NAT")
    rule = ["INPUT", "-s", "172.16.1.0/24", "-p", "tcp", "--dport", "80", "--syn", "-j", "DROP"]
    with LvsDp(lab, conf, backend=backend,
               extra=["--synproxy", "net.ipv4.vs.synproxy_syn_retry=2"]) as lb:
        assert lb.snapshot()["synproxy"]["syn_retry"] == 2
        assert "SYN-proxy settings: " in lb.list("--stats")
        added = []
        try:
            for rs in ("rs3", "rs4"):
                lab.run(rs, ["iptables", "-w", "-I", *rule])
                added.append(rs)
            t0 = time.monotonic()
            r = lab.curl(f"http://{lab.vip}/", check=False, timeout=20)
            took = time.monotonic() - t0
        finally:
            for rs in added:
                lab.run(rs, ["iptables", "-w", "-D", *rule], check=False)
        assert r.returncode == 56 and "reset" in r.stderr.lower(), (r.returncode, r.stderr)
        assert took < 8, took                       # 1 s between SYNs: ~3 s, not curl's 20
        dp = lb.snapshot()["dataplane"]
        assert dp["counters"]["synproxy_rs_syn_retry"] == 2, dp["counters"]
        assert dp["drops"]["synproxy_rs_refused"] == 1 and dp["conns"] == 0, dp
        assert lab.curl(f"http://{lab.vip}/").stdout.strip() in HELLO     # answering again
