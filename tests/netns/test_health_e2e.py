"""Health checks and live operation end to end, through `lvs-dp run` in the seed lab.

The configurations are the seed's (examples/seed-nat.conf) with short timers, written to
tmp_path. Real servers fail for real: nginx is stopped inside rs3's namespace and started again
the way control/lab.py starts it. Everything runs in the lab's namespaces and is torn down by the
fixtures, also on failure."""

import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from control.lab import REPO_ROOT, RS_IPS
from control.labrun import LvsDp
from tests.netns.clients import SLOW_DOWNLOAD

pytestmark = pytest.mark.netns
SEED = REPO_ROOT / "examples" / "seed-nat.conf"
HEAD = SEED.read_text().split("virtual_server 172.16.1.100 80 {")[0]
S3, S4 = "<h1>Hello Server3</h1>", "<h1>Hello Server4</h1>"
RS3, RS4 = RS_IPS["rs3"], RS_IPS["rs4"]


@pytest.fixture(scope="module")
def lab(module_lab):
    """One lab for the module (conftest's: unique prefix, always torn down). Tests leave nginx
    running on both real servers, as they found it."""
    return module_lab


# --- helpers ----------------------------------------------------------------------------------------


def fast_seed(inhibit=False):
    """The seed's keepalived.conf with short timers (delay_loop 1, connect_timeout 1,
    delay_before_retry 0.5, warmup 0); retry stays 3."""
    text = SEED.read_text()
    text = re.sub(r"delay_loop 6\b", "delay_loop 1", text)
    text = re.sub(r"connect_timeout 3\b", "connect_timeout 1", text)
    text = re.sub(r"delay_before_retry 3\b", "delay_before_retry 0.5", text)
    text = text.replace("connect_port 80\n", "connect_port 80\n            warmup 0\n")
    if inhibit:
        text = text.replace("real_server 172.16.2.13 80 {\n",
                            "real_server 172.16.2.13 80 {\n        inhibit_on_failure\n")
    return text


def write(tmp_path, text, name="keepalived.conf"):
    p = tmp_path / name
    p.write_text(text)
    return p


def tcp_rs(addr, weight=1, port=80, extra="", check_port=None):
    return f"""
    real_server {addr} {port} {{
        weight {weight}
{extra}
        TCP_CHECK {{
            connect_timeout 1
            retry 1
            delay_before_retry 0.3
            warmup 0
{f"            connect_port {check_port}" if check_port else ""}
        }}
    }}"""


def vs(port, body, algo="rr", extra=""):
    return f"""
virtual_server 172.16.1.100 {port} {{
    delay_loop 1
    lb_algo {algo}
    lb_kind NAT
    protocol TCP
{extra}
{body}
}}
"""


def nginx_proc(lab, rs):
    for p in lab.daemons():
        if getattr(p, "lab_name", "") == f"{rs}-nginx" and p.poll() is None:
            return p
    return None


def stop_nginx(lab, rs):
    p = nginx_proc(lab, rs)
    assert p is not None, f"nginx of {rs} is not running"
    lab.stop(p)
    assert lab.curl(f"http://{RS_IPS[rs]}/", ns="lb", timeout=1, check=False).returncode != 0


def start_nginx(lab, rs):
    """As control/lab.py starts it (Lab._start_servers), then wait until it answers."""
    if nginx_proc(lab, rs) is None:
        d = lab.rs_dir(rs)
        lab.popen(rs, ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e",
                       str(d / "error.log")], name=f"{rs}-nginx")
    deadline = time.monotonic() + 10
    while lab.curl(f"http://{RS_IPS[rs]}/", ns="lb", timeout=1, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"nginx of {rs} does not come back"
        time.sleep(0.1)


@pytest.fixture
def nginx_restored(lab):
    yield
    for rs in ("rs3", "rs4"):
        start_nginx(lab, rs)


def wait_for(pred, timeout, what, interval=0.2):
    t0 = time.monotonic()
    while True:
        v = pred()
        if v:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def bodies(lab, n, port=80, check=True):
    url = f"http://{lab.vip}/" if port == 80 else f"http://{lab.vip}:{port}/"
    return [lab.curl(url, check=check).stdout.strip() for _ in range(n)]


def real_lines(table, service_port=80):
    """{real server: (fwd, weight)} of one service in `lvs-dp list -n`."""
    out, cur = {}, None
    for line in table.splitlines():
        m = re.match(r"(TCP|UDP)\s+(\S+)\s", line)
        if m:
            cur = m.group(2)
            continue
        m = re.match(r"\s+->\s+(\S+)\s+(\S+)\s+(\d+)", line)
        if m and cur == f"172.16.1.100:{service_port}":
            out[m.group(1)] = (m.group(2), int(m.group(3)))
    return out


def health(lb):
    return json.loads(lb.cli("health").stdout)


# --- tests ------------------------------------------------------------------------------------------


def test_tcp_check_removes_a_dead_real_server_and_adds_it_back(lab, tmp_path, nginx_restored):
    """The seed's experiment: stop nginx on rs3, it leaves the table within delay_loop + retry x
    (connect_timeout + delay_before_retry); all traffic goes to Server4; start it, it returns."""
    with LvsDp(lab, write(tmp_path, fast_seed())) as lb:
        wait_for(lambda: all(c["has_run"] for p in health(lb) for r in p["reals"]
                             for c in r["checkers"]), 5, "first checks")
        assert sorted(real_lines(lb.list())) == [f"{RS3}:80", f"{RS4}:80"]
        assert set(bodies(lab, 4)) == {S3, S4}
        stop_nginx(lab, "rs3")
        bound = 1 + 3 * (1 + 0.5)
        took = wait_for(lambda: f"{RS3}:80" not in real_lines(lb.list()), bound + 1.5,
                        "rs3 removed")
        assert took <= bound + 1.0, took
        assert bodies(lab, 6) == [S4] * 6
        start_nginx(lab, "rs3")
        wait_for(lambda: f"{RS3}:80" in real_lines(lb.list()), 1 + 2.0, "rs3 back")
        assert set(bodies(lab, 4)) == {S3, S4}
        log = lb.log()
    # One structured line per transition, naming service, real server, checker and reason.
    down = [line for line in log.splitlines() if "event=real_down" in line]
    assert len(down) == 1, log
    assert f'service="TCP 172.16.1.100:80" real={RS3}:80 checker=TCP_CHECK(' in down[0]
    assert 'reason="connect 172.16.2.13:80: connection refused"' in down[0]
    assert len([line for line in log.splitlines() if "event=real_up" in line]) == 1


def test_inhibit_on_failure_keeps_it_listed_at_weight_0(lab, tmp_path, nginx_restored):
    with LvsDp(lab, write(tmp_path, fast_seed(inhibit=True))) as lb:
        assert real_lines(lb.list())[f"{RS3}:80"] == ("Masq", 10)
        stop_nginx(lab, "rs3")
        wait_for(lambda: real_lines(lb.list()).get(f"{RS3}:80") == ("Masq", 0), 7, "weight 0")
        assert sorted(real_lines(lb.list())) == [f"{RS3}:80", f"{RS4}:80"]
        assert bodies(lab, 4) == [S4] * 4
        start_nginx(lab, "rs3")
        wait_for(lambda: real_lines(lb.list()).get(f"{RS3}:80") == ("Masq", 10), 3, "weight 10")
        assert set(bodies(lab, 4)) == {S3, S4}


def http_rs(addr, url_block, extra=""):
    return f"""
    real_server {addr} 80 {{
        weight 1
{extra}
        HTTP_GET {{
            url {{
{url_block}
            }}
            connect_timeout 1
            retry 1
            delay_before_retry 0.3
            warmup 0
        }}
    }}"""


def misc_rs(addr, script, extra="", checker_extra=""):
    return f"""
    real_server {addr} 80 {{
        weight 1
{extra}
        MISC_CHECK {{
            misc_path "{script}"
            misc_timeout 2
            warmup 0
{checker_extra}
        }}
    }}"""


def test_http_get_status_and_digest_and_misc_check(lab, tmp_path):
    md5_s3 = hashlib.md5(b"<h1>Hello Server3</h1>\n").hexdigest()
    flag = tmp_path / "rs3-ok"
    flag.touch()
    notes = tmp_path / "notify.log"
    text = HEAD
    # :80  rs3 right digest -> up;  rs4 expects 404 but gets 200 -> down
    text += vs(80, http_rs(RS3, f"path /\n                digest {md5_s3}")
               + http_rs(RS4, "path /\n                status_code 404"))
    # :81  rs3 wrong digest -> down;  rs4 asks for a missing page and expects 404 -> up
    text += vs(81, http_rs(RS3, f"path /\n                digest {'0' * 32}")
               + http_rs(RS4, "path /nope\n                status_code 404\n"
                              "                virtualhost www.example.test"))
    # :82  MISC_CHECK: rs3 while a file exists (notify scripts), rs4 misc_dynamic exit 7 -> weight 5
    text += vs(82, misc_rs(RS3, f"test -e {flag}",
                           extra=f'        notify_up "echo up >> {notes}"\n'
                                 f'        notify_down "echo down >> {notes}"')
               + misc_rs(RS4, "exit 7", checker_extra="            misc_dynamic"))
    with LvsDp(lab, write(tmp_path, text)) as lb:
        wait_for(lambda: sorted(real_lines(lb.list(), 80)) == [f"{RS3}:80"]
                 and sorted(real_lines(lb.list(), 81)) == [f"{RS4}:80"]
                 and real_lines(lb.list(), 82).get(f"{RS4}:80") == ("Masq", 5), 6,
                 "first verdicts")
        assert real_lines(lb.list(), 82) == {f"{RS3}:80": ("Masq", 1), f"{RS4}:80": ("Masq", 5)}
        assert bodies(lab, 3, 80) == [S3] * 3
        assert bodies(lab, 3, 81) == [S4] * 3
        reasons = {(p["service"], r["addr"]): r["checkers"][0]["last"] for p in health(lb)
                   for r in p["reals"]}
        assert "HTTP status 200 not in 404" in reasons[("TCP 172.16.1.100:80", RS4)]
        assert f"MD5 digest {md5_s3} != {'0' * 32}" in reasons[("TCP 172.16.1.100:81", RS3)]
        flag.unlink()
        wait_for(lambda: f"{RS3}:80" not in real_lines(lb.list(), 82), 4, "misc rs3 down")
        wait_for(lambda: notes.exists() and notes.read_text() == "down\n", 3, "notify_down ran")
        flag.touch()
        wait_for(lambda: f"{RS3}:80" in real_lines(lb.list(), 82), 3, "misc rs3 up")
        wait_for(lambda: notes.read_text() == "down\nup\n", 3, "notify_up ran")


SORRY_SERVER = r"""
import http.server, os, sys
os.chdir(sys.argv[1])
http.server.ThreadingHTTPServer(("172.16.2.14", 8090), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def test_sorry_server_answers_when_every_real_server_is_down(lab, tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("sorry\n")
    os.chmod(tmp_path, 0o755)
    script = tmp_path / "sorry.py"
    script.write_text(SORRY_SERVER)
    quorum_log = tmp_path / "quorum.log"
    srv = lab.popen("rs4", [sys.executable, str(script), str(tmp_path / "www")], name="rs4-sorry")
    try:
        wait_for(lambda: lab.curl(f"http://{RS4}:8090/", ns="lb", timeout=1,
                                  check=False).stdout == "sorry\n", 10, "sorry server up")
        # Both real servers are checked on port 81, where nothing listens.
        text = HEAD + vs(80, tcp_rs(RS3, check_port=81) + tcp_rs(RS4, check_port=81), extra=f"""
    sorry_server 172.16.2.14 8090
    omega
    quorum_up "echo up >> {quorum_log}"
    quorum_down "echo down >> {quorum_log}"
""")
        with LvsDp(lab, write(tmp_path, text)) as lb:
            wait_for(lambda: list(real_lines(lb.list())) == [f"{RS4}:8090"], 5, "sorry listed")
            assert bodies(lab, 3) == ["sorry"] * 3
            wait_for(lambda: quorum_log.exists() and quorum_log.read_text() == "down\n", 3,
                     "quorum_down ran")
            [pool] = health(lb)
            assert pool["quorum_up"] is False and pool["sorry_active"] is True
            assert lb.snapshot()["dataplane"]["counters"]["sorry_server"] >= 3
        # omega: quorum_down runs once more at exit.
        assert quorum_log.read_text() == "down\ndown\n"
    finally:
        lab.stop(srv)


def test_transfer_survives_reloads_and_runtime_edits(lab, tmp_path):
    """A rate-limited download of /big through rs3 keeps going through reloads that add,
    re-weight and remove another real server (rs4), and through a refused broken reload."""
    conf = tmp_path / "keepalived.conf"

    def config(rs4=None):
        body = tcp_rs(RS3, 3) + (tcp_rs(RS4, rs4) if rs4 is not None else "")
        return HEAD + vs(80, body, algo="wrr") + vs(81, tcp_rs(RS3, 1))

    conf.write_text(config())
    out = tmp_path / "big.out"
    with LvsDp(lab, conf) as lb:
        wait_for(lambda: all(c["has_run"] for p in health(lb) for r in p["reals"]
                             for c in r["checkers"]), 5, "first checks")
        ids = {(p["service"], r["addr"]): r["checkers"][0]["id"] for p in health(lb)
               for r in p["reals"]}
        # About 30 s: long enough to outlast the reloads below even on a loaded machine (each
        # lvs-dp call there starts a Python interpreter).
        download = lab.popen("client", [sys.executable, "-c", SLOW_DOWNLOAD, lab.vip, "/big",
                                        "30", str(lab.bulk_size), str(out)], name="client-big")
        wait_for(lambda: out.exists() and out.stat().st_size > 0, 5, "transfer started")
        # 1: add rs4 (SIGHUP, as keepalived reloads)
        conf.write_text(config(rs4=1))
        os.kill(lb.proc.pid, signal.SIGHUP)      # lab.popen's process leads its own group:
        wait_for(lambda: f"{RS4}:80" in real_lines(lb.list()), 5, "rs4 added")   # ip netns exec
        time.sleep(1.0)                                                          # execs lvs-dp
        # 2: re-weight rs4 (lvs-dp reload)
        conf.write_text(config(rs4=7))
        r = lb.cli("reload")
        assert f"weight of {RS4}:80 in TCP  172.16.1.100:80: 1 -> 7" in r.stdout, r.stdout
        assert real_lines(lb.list())[f"{RS4}:80"] == ("Masq", 7), r.stdout
        time.sleep(1.0)
        # a broken configuration is refused with FILE:LINE, the old one keeps running
        conf.write_text(config(rs4=7).replace("lb_algo wrr", "lb_algo wrr\n    weight_bogus {"))
        r = lb.cli("reload", check=False)
        assert r.returncode != 0
        assert re.search(rf"{re.escape(str(conf))}:\d+: ", r.stderr), r.stderr
        assert real_lines(lb.list())[f"{RS4}:80"] == ("Masq", 7)
        assert download.poll() is None, "the transfer ended early"
        # 3: remove rs4
        conf.write_text(config())
        assert f"removed real server {RS4}:80" in lb.cli("reload").stdout
        assert sorted(real_lines(lb.list())) == [f"{RS3}:80"]
        assert download.poll() is None, "the transfer should still be running"
        assert download.wait(90) == 0, Path(download.log_path).read_text()
        assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.bulk_sha256
        # rs3's checkers were never restarted by the reloads (same objects, still running).
        ids2 = {(p["service"], r["addr"]): r["checkers"][0]["id"] for p in health(lb)
                for r in p["reals"]}
        assert ids2 == ids
        assert lb.snapshot()["services"][0]["stats"]["conns"] >= 1

        # ipvsadm-style runtime edits show in `lvs-dp list` at once.
        lb.cli("edit-real", "-t", "172.16.1.100:80", "-r", f"{RS3}:80", "-w", "4")
        assert real_lines(lb.list()) == {f"{RS3}:80": ("Masq", 4)}
        lb.cli("add-real", "-t", "172.16.1.100:80", "-r", f"{RS4}:80", "-w", "4", "-m")
        assert real_lines(lb.list()) == {f"{RS3}:80": ("Masq", 4), f"{RS4}:80": ("Masq", 4)}
        assert set(bodies(lab, 4)) == {S3, S4}
        r = lb.cli("add-real", "-t", "172.16.1.100:80", "-r", f"{RS4}:80", "-w", "1", check=False)
        assert r.returncode == 1 and "already exists" in r.stderr
        lb.cli("del-real", "-t", "172.16.1.100:80", "-r", f"{RS4}:80")
        assert real_lines(lb.list()) == {f"{RS3}:80": ("Masq", 4)}
        assert bodies(lab, 3) == [S3] * 3
        r = lb.cli("edit-real", "-t", "172.16.1.100:99", "-r", f"{RS3}:80", "-w", "1", check=False)
        assert r.returncode == 1 and "no such service" in r.stderr
        lb.cli("set-timeout", "100", "20", "0")
        assert "Timeout (tcp tcpfin udp): 100 20 300" in lb.list("--timeout")
        log = lb.log()
    assert log.count("reload refused") == 1


CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect_error": e.errno}))
    sys.exit(0)
try:
    s.sendall(b'{"cmd": "ping"}\n')
except OSError:
    pass            # a refused peer is answered and closed at once, before it sends
print(s.makefile("rb").readline().decode().strip())
"""

MALFORMED = r"""
import json, socket, sys
MAX = 1 << 20
def ask(payload, shut=False):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.sendall(payload)
    if shut:
        s.shutdown(socket.SHUT_WR)
    line = s.makefile("rb").readline()
    s.close()
    return json.loads(line)
out = [ask(b"this is not json\n"), ask(b'{"cmd": "no-such-command"}\n'), ask(b"[1, 2, 3]\n"),
       ask(b'"cmd"\n'), ask(b'{"cmd": 5}\n'), ask(b"\xff\xfe\n"),
       ask(b"x" * (MAX + 1), shut=True), ask(b'{"cmd": "edit-real", "service": 1}\n'),
       ask(b'{"cmd": "ping"}\n')]
print(json.dumps(out))
"""


def test_control_socket_refuses_strangers_survives_garbage_and_metrics(lab, tmp_path):
    gid = 4242
    with LvsDp(lab, write(tmp_path, fast_seed()),
               extra=["--socket-group", str(gid), "--metrics", "127.0.0.1:9910"]) as lb:
        def as_nobody(*setpriv):
            r = lab.run("lb", ["setpriv", "--reuid=65534", *setpriv, "/usr/bin/python3", "-c",
                               CLIENT, lb.sock])
            return json.loads(r.stdout)
        # Not in the group at all: the socket's mode (0660 root:4242) keeps it out.
        assert as_nobody("--regid=65534", "--clear-groups") == {"connect_error": 13}
        # In the group only as a supplementary group: the file lets it connect, SO_PEERCRED
        # (primary gid 65534) does not.
        reply = as_nobody("--regid=65534", f"--groups={gid}")
        assert reply["ok"] is False and "permission denied" in reply["error"]
        # Primary group 4242: allowed.
        assert as_nobody(f"--regid={gid}", "--clear-groups")["ok"] is True

        out = json.loads(lab.python("lb", [ "-c", MALFORMED, lb.sock]).stdout)
        *bad, last = out
        assert [b["ok"] for b in bad] == [False] * len(bad), bad
        assert "malformed request" in bad[0]["error"]
        assert "unknown command 'no-such-command'" in bad[1]["error"]
        assert "larger than" in bad[6]["error"]
        assert last["ok"] is True
        assert lb.cli("list").returncode == 0

        assert len(bodies(lab, 6)) == 6
        metrics = lab.curl("http://127.0.0.1:9910/metrics", ns="lb").stdout
        svc = 'service="TCP 172.16.1.100:80"'
        assert f"lvsdp_service_connections_total{{{svc}}} 6" in metrics, metrics
        assert re.search(rf'lvsdp_service_packets_total\{{{svc},direction="in"\}} [1-9]', metrics)
        assert re.search(rf'lvsdp_real_bytes_total\{{{svc},real="{RS3}:80",direction="out"\}} '
                         r'[1-9]', metrics)
        assert f'lvsdp_real_health_up{{{svc},real="{RS3}:80"}} 1' in metrics
        assert f'lvsdp_real_weight{{{svc},real="{RS4}:80"}} 10' in metrics
        assert 'lvsdp_dataplane_drops_total{reason="malformed"} 0' in metrics
        assert re.search(r'lvsdp_queue_dropped_total\{queue="0",by="kernel"\} \d+', metrics)
        assert "# TYPE lvsdp_real_active_connections gauge" in metrics
        assert lab.curl("http://127.0.0.1:9910/other", ns="lb", check=False).returncode == 0
