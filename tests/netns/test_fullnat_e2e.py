"""FULLNAT end to end through `lvs-dp run` in the seed lab, with the real servers cut off from the
client network: they have no route to 172.16.1.0/24 at all, and answer the balancer's local
addresses (172.16.2.200/201, on its real-server side) instead."""

import os
import re
import textwrap

import pytest

from control.lab import Lab, REPO_ROOT
from control.labrun import LvsDp
from tests.netns.clients import UPLOADER, start_upload_sink

pytestmark = pytest.mark.netns
CONF = REPO_ROOT / "examples" / "seed-fnat.conf"
LADDRS = ("172.16.2.200", "172.16.2.201")


@pytest.fixture(scope="module")
def lab():
    with Lab(f"fn{os.getpid() % 10000}", udp_echo=True, bulk_mb=50, replace=True) as lab:
        for a in LADDRS:
            lab.run("lb", f"ip addr add {a}/24 dev br0")
        for rs in ("rs3", "rs4"):
            lab.run(rs, "ip route del 172.16.1.0/24")
            assert "172.16.1.0" not in lab.run(rs, "ip route").stdout
        yield lab


def test_real_servers_without_a_route_back_serve_through_the_vip(lab):
    lab.clear_access_log()
    with LvsDp(lab, CONF) as lb:
        bodies = [lab.curl(f"http://{lab.vip}/").stdout.strip() for _ in range(10)]
        assert bodies == ["<h1>Hello Server3</h1>", "<h1>Hello Server4</h1>"] * 5
        # The real servers saw local addresses, never the client.
        seen = {e["remote_addr"] for rs in ("rs3", "rs4") for e in lab.access_log(rs)}
        assert seen == set(LADDRS)
        table = lb.list()
        assert re.search(r"-> 172\.16\.2\.13:80\s+FullNat\s+1\s", table), table
        g = lb.list("-G")
        assert "172.16.1.100:80" in g and "172.16.2.200" in g and "172.16.2.201" in g


def test_proxy_protocol_v2_gives_nginx_the_client_address(lab):
    with LvsDp(lab, CONF):
        for _ in range(4):
            assert "Hello Server" in lab.curl(f"http://{lab.vip}:8080/").stdout
        entries = lab.proxy_protocol_log("rs3") + lab.proxy_protocol_log("rs4")
    assert len(entries) == 4
    assert {e[0] for e in entries} == {lab.client_ip}       # $proxy_protocol_addr
    assert {e[2] for e in entries} <= set(LADDRS)            # $remote_addr


def test_50mb_each_way_through_fullnat_and_proxy_protocol(lab, tmp_path):
    conf = tmp_path / "fnat-upload.conf"
    conf.write_text(CONF.read_text() + textwrap.dedent("""
        virtual_server 172.16.1.100 9000 {
            lb_algo rr
            lb_kind FNAT
            protocol TCP
            laddr_group_name laddr_g1
            proxy_protocol v2
            real_server 172.16.2.13 9000 {
                weight 1
            }
        }
        """))
    proc = start_upload_sink(lab)
    with LvsDp(lab, conf):
        # Download: nginx's 50 MB /big through the PROXY protocol listener.
        r = lab.run("client", f"curl -sS --max-time 60 http://{lab.vip}:8080/big | sha256sum",
                    timeout=90)
        assert r.stdout.split()[0] == lab.bulk_sha256
        out = lab.python("client", ["-c", UPLOADER, "50", "60"], timeout=120).stdout.split()
    lab.stop(proc)
    local_sha, remote_sha, n, client, peer = out
    assert remote_sha == local_sha and int(n) == 50 << 20
    assert client == lab.client_ip and peer in LADDRS


def test_udp_through_fullnat(lab):
    code = textwrap.dedent("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
        s.connect(("172.16.1.100", 53))
        for i in range(3):
            s.send(b"q%d" % i)
            data, addr = s.recvfrom(100)
            print(addr[0], addr[1], data.decode())
        """)
    with LvsDp(lab, CONF):
        lines = lab.python("client", code).stdout.split("\n")
    rows = [line.split(" ", 2) for line in lines if line]
    assert len(rows) == 3 and {(a, p) for a, p, _ in rows} == {("172.16.1.100", "53")}
    assert len({d.split(":")[0] for _, _, d in rows}) == 1


PARALLEL = textwrap.dedent("""
    import socket, sys
    socks = []
    for i in range(int(sys.argv[1])):
        s = socket.socket(); s.settimeout(float(sys.argv[2]))
        try:
            s.connect(("172.16.1.100", 80))
            socks.append(s)
        except OSError:
            pass
    print(len(socks), flush=True)
    sys.stdin.read()      # hold them until told
""")


def test_parallel_connections_spread_over_local_addresses_without_collision(lab):
    with LvsDp(lab, CONF) as lb:
        import subprocess
        p = subprocess.Popen(lab.argv("client", [os.sys.executable, "-c", PARALLEL, "300", "3"]),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "300"
            conns = [c for c in lb.snapshot()["conns"] if c["vport"] == 80 and not c["template"]]
        finally:
            p.communicate("", timeout=30)
    assert len(conns) == 300
    tuples = {(c["laddr"], c["lport"]) for c in conns}
    assert len(tuples) == 300                                  # no port used twice
    per_laddr = {a: sum(c["laddr"] == a for c in conns) for a in LADDRS}
    assert per_laddr == {LADDRS[0]: 150, LADDRS[1]: 150}       # round robin over the pool


def test_pool_exhaustion_refuses_cleanly_then_recovers(lab, tmp_path):
    conf = tmp_path / "one-laddr.conf"
    conf.write_text(CONF.read_text().replace("    172.16.2.201\n", ""))
    import subprocess
    with LvsDp(lab, conf, extra=["--lport-range", "6000-6099"]) as lb:
        p = subprocess.Popen(lab.argv("client", [os.sys.executable, "-c", PARALLEL, "200", "1"]),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            held = int(p.stdout.readline())
            snap = lb.snapshot()
            # Established connections keep working while the pool is empty.
            assert lab.curl(f"http://{lab.vip}/", check=False, timeout=2).returncode != 0
        finally:
            p.communicate("", timeout=60)
        assert held == 100
        assert snap["dataplane"]["drops"]["laddr_exhausted"] >= 100
        # The held connections closed (FIN both ways -> TIME_WAIT, 7 s for FULLNAT): ports return.
        ok = False
        for _ in range(40):
            r = lab.curl(f"http://{lab.vip}/", check=False, timeout=1)
            if r.returncode == 0:
                ok = True
                break
        assert ok, lb.list("--stats")
        assert "Hello Server" in r.stdout


def test_connection_close_load_through_one_local_address_does_not_stall(lab, tmp_path):
    conf = tmp_path / "one-laddr.conf"
    conf.write_text(CONF.read_text().replace("    172.16.2.201\n", ""))
    with LvsDp(lab, conf) as lb:
        r = lab.run("client", ["wrk", "-t1", "-c16", "-d60s", "--timeout", "2s",
                               "-H", "Connection: close", f"http://{lab.vip}/"], timeout=120)
        snap = lb.snapshot()
    out = r.stdout
    m = re.search(r"(\d+) requests in", out)
    assert m and int(m.group(1)) > 1000, out
    assert "Socket errors" not in out, out          # no connect/read/write errors, no timeouts
    assert "Non-2xx" not in out, out
    assert snap["dataplane"]["drops"]["laddr_exhausted"] == 0


def _ss_established(lab, ns, port_filter):
    return lab.run(ns, f"ss -tni state established '( {port_filter} )'").stdout


def _held_connections(lab, n, check):
    """Hold n connections from the client while check() runs; returns its result."""
    import subprocess
    p = subprocess.Popen(lab.argv("client", [os.sys.executable, "-c", PARALLEL, str(n), "3"]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == str(n)
        return check()
    finally:
        p.communicate("", timeout=30)


def _capture(lab, rs, count):
    """tcpdump on a real server: the first `count` segments from the local addresses to :80."""
    import time
    flt = "tcp dst port 80 and (src host " + " or src host ".join(LADDRS) + ")"
    proc = lab.popen(rs, f"timeout 30 tcpdump -nv -l -i any -c {count} '{flt}'",
                     name=f"tcpdump-{rs}-{len(lab.daemons())}")
    for _ in range(100):
        if "listening on" in open(proc.log_path).read():
            break
        time.sleep(0.1)
    return proc


def _capture_done(lab, proc):
    """Let tcpdump reach its count (bounded), then read what it printed."""
    import subprocess
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        lab.stop(proc)
    return open(proc.log_path).read()


def test_timestamps_translated_reach_the_real_servers(lab):
    """--fnat-timestamp translate: the real servers' segments from the local addresses carry TS
    options (tcpdump), the connections use them (ss: an MSS 12 bytes below 1460, the option's
    room; this iproute2 does not print "ts"), pages and a 50 MB download still arrive intact.
    The default strips them: no TS option, MSS 1460."""
    def seen_by_rs():
        return (_ss_established(lab, "rs3", "sport = :80") + _ss_established(lab, "rs4", "sport = :80"),
                _ss_established(lab, "client", "dport = :80"))

    with LvsDp(lab, CONF, extra=["--fnat-timestamp", "translate"]) as lb:
        cap = _capture(lab, "rs3", 4)
        bodies = {lab.curl(f"http://{lab.vip}/").stdout.strip() for _ in range(4)}
        assert bodies == {"<h1>Hello Server3</h1>", "<h1>Hello Server4</h1>"}
        dump = _capture_done(lab, cap)
        rs_ss, client_ss = _held_connections(lab, 4, seen_by_rs)
        r = lab.run("client", f"curl -sS --max-time 60 http://{lab.vip}/big | sha256sum", timeout=90)
        assert r.stdout.split()[0] == lab.bulk_sha256
        snap = lb.snapshot()
        stats = lb.list("--stats")
    # The SYN and the segments after it carry a TS value (and the SYN keeps SACK-permitted).
    assert dump.count("TS val") >= 4 and "sackOK" in dump, dump
    assert any(a in rs_ss for a in LADDRS), rs_ss
    assert "mss:1448" in rs_ss and "mss:1460" not in rs_ss, rs_ss
    assert "mss:1448" in client_ss, client_ss       # the client's side negotiated them too
    assert snap["dataplane"]["fnat_timestamp"] == "translate"
    assert "FULLNAT timestamps translate" in stats
    assert all(v == 0 for v in snap["dataplane"]["drops"].values()), snap["dataplane"]["drops"]

    with LvsDp(lab, CONF) as lb:
        cap = _capture(lab, "rs3", 4)
        for _ in range(4):
            assert "Hello Server" in lab.curl(f"http://{lab.vip}/").stdout
        dump = _capture_done(lab, cap)
        rs_ss, client_ss = _held_connections(lab, 4, seen_by_rs)
    assert "Flags [S]" in dump and "TS val" not in dump, dump      # stripped from the SYN
    assert "mss:1460" in rs_ss and "mss:1448" not in rs_ss, rs_ss


def test_timestamps_translated_behind_syn_proxy(lab, tmp_path):
    """syn_proxy on the FULLNAT service with translate: the balancer's own SYN to the real
    server carries a TS value (the client's, on the local address's clock), the RS keeps
    timestamps, and a 50 MB download is intact (both TS shifts at work: ts_off and ts_delta)."""
    conf = tmp_path / "fnat-sp.conf"
    conf.write_text(re.sub(r"(\n(\s*)lb_kind FNAT\b[^\n]*)", r"\1\n\2syn_proxy", CONF.read_text(),
                           count=1))
    with LvsDp(lab, conf, extra=["--fnat-timestamp", "translate"]) as lb:
        cap = _capture(lab, "rs3", 3)
        for _ in range(4):
            assert "Hello Server" in lab.curl(f"http://{lab.vip}/").stdout
        dump = _capture_done(lab, cap)
        r = lab.run("client", f"curl -sS --max-time 60 http://{lab.vip}/big | sha256sum", timeout=90)
        assert r.stdout.split()[0] == lab.bulk_sha256
        dp = lb.snapshot()["dataplane"]
    assert "Flags [S]" in dump and dump.count("TS val") >= 3, dump
    assert dp["counters"]["synproxy_rs_synack"] >= 5
    assert all(v == 0 for v in dp["drops"].values()), dp["drops"]


MANY = textwrap.dedent("""
    import selectors, socket, sys, time
    n = int(sys.argv[1])
    sel = selectors.DefaultSelector()
    bufs = {}
    for i in range(n):
        s = socket.create_connection(("172.16.1.100", 80), timeout=5)
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: vip\\r\\n\\r\\n")
        s.setblocking(False)
        bufs[s] = b""
        sel.register(s, selectors.EVENT_READ)
    ok = 0
    deadline = time.monotonic() + 30
    while bufs and time.monotonic() < deadline:
        for key, _ in sel.select(1):
            s = key.fileobj
            b = s.recv(65536)
            if b:
                bufs[s] += b
            else:
                ok += b"Hello Server" in bufs.pop(s)
                sel.unregister(s)
                s.close()
    print(ok, len(bufs))
""")


def test_two_workers_share_one_clients_connections(lab):
    """--queues 2: one client's connections are steered by its port to both workers; each
    worker binds local ports it owns, so the real servers' replies (steered by that port) come
    back to it: no reply reaches a worker without its connection, nothing is dropped."""
    with LvsDp(lab, CONF, queues=2) as lb:
        out = lab.python("client", ["-c", MANY, "300"], timeout=90).stdout.split()
        assert out == ["300", "0"], out         # 300 held open at once, every one answered
        r = lab.run("client", ["wrk", "-t2", "-c32", "-d10s", "--timeout", "2s",
                               "-H", "Connection: close", f"http://{lab.vip}/"], timeout=60)
        snap = lb.snapshot()
        stats = lb.list("--stats")
    m = re.search(r"(\d+) requests in", r.stdout)
    assert m and int(m.group(1)) > 500, r.stdout
    assert "Socket errors" not in r.stdout and "Non-2xx" not in r.stdout, r.stdout
    dp = snap["dataplane"]
    assert dp["workers"] == 2 and len(dp["per_worker"]) == 2
    news = [w["conn_new"] for w in dp["per_worker"]]
    total = sum(news)
    assert total >= 300 + int(m.group(1)), dp["per_worker"]
    assert all(n > total // 5 for n in news), dp["per_worker"]      # both workers took a share
    assert all(w["fnat_reply_no_conn"] == 0 for w in dp["per_worker"]), dp["per_worker"]
    assert dp["counters"]["fnat_reply_no_conn"] == 0
    assert dp["counters"]["no_conn_not_syn_passed"] == 0        # no client packet missed either
    # (the kernel's queue overflow, "overload", is a matter of CPU, not of steering)
    assert all(v == 0 for k, v in dp["drops"].items() if k != "overload"), dp["drops"]
    assert all(q["id_sequence"] > 0 for q in dp["queues"].values()), dp["queues"]
    assert "Workers:" in stats
