"""Health checks: keepalived's checker state machine on fake clocks, the probes against servers
on loopback, the manager's aggregation (alive, weights, quorum, sorry server, scripts, reload,
stop) with fake probes, and the metrics text."""

import asyncio
import hashlib
import http.server
import json
import os
import random
import socket
import threading
import time

import pytest

from control import parser as P
from control.apply import specs_from_config
from control.health import checkers as K
from control.health.manager import HealthManager, quorum_update
from control import metrics as M
from control.model import Url


# --- the state machine ------------------------------------------------------------------------------


def feed(m, results):
    return [(s.event, s.delay) for s in (m.on_result(ok) for ok in results)]


def test_first_failure_decides_at_once():
    # keepalived starts retry_it at retry: one failure is enough initially.
    m = K.CheckerMachine(retry=3, delay_loop=6, delay_before_retry=2)
    assert feed(m, [False]) == [(K.EV_DOWN, 6)]
    assert not m.is_up


def test_first_success_of_a_started_up_checker_is_no_event():
    m = K.CheckerMachine(retry=3, delay_loop=6, delay_before_retry=2)
    assert feed(m, [True, True]) == [(None, 6), (None, 6)]


def test_down_after_retry_plus_one_failures_spaced_by_delay_before_retry():
    m = K.CheckerMachine(retry=3, delay_loop=6, delay_before_retry=2)
    m.on_result(True)
    assert feed(m, [False, False, False, False]) == [
        (K.EV_RETRY, 2), (K.EV_RETRY, 2), (K.EV_RETRY, 2), (K.EV_DOWN, 6)]
    # While down failures are not retried, and one success is enough.
    assert feed(m, [False, False, True]) == [(None, 6), (None, 6), (K.EV_UP, 6)]


def test_a_success_between_retries_resets_the_count():
    m = K.CheckerMachine(retry=2, delay_loop=5, delay_before_retry=1)
    m.on_result(True)
    assert feed(m, [False, False, True, False, False, False]) == [
        (K.EV_RETRY, 1), (K.EV_RETRY, 1), (None, 5), (K.EV_RETRY, 1), (K.EV_RETRY, 1),
        (K.EV_DOWN, 5)]
    assert m.retry_it == 0


def test_retry_0_fails_on_the_first_failure():
    m = K.CheckerMachine(retry=0, delay_loop=3, delay_before_retry=1)
    m.on_result(True)
    assert feed(m, [False]) == [(K.EV_DOWN, 3)]


def test_alpha_starts_down_until_the_first_success():
    m = K.CheckerMachine(retry=3, delay_loop=6, delay_before_retry=2, alpha=True)
    assert not m.is_up
    assert feed(m, [True]) == [(K.EV_UP, 6)]
    m = K.CheckerMachine(retry=3, delay_loop=6, delay_before_retry=2, alpha=True)
    # The first failure confirms the down state (keepalived runs notify_down for it) ...
    assert feed(m, [False]) == [(K.EV_STILL_DOWN, 6)]
    # ... later ones are silent.
    assert feed(m, [False, False, True]) == [(None, 6), (None, 6), (K.EV_UP, 6)]


def test_reload_machine_needs_all_retries():
    m = K.CheckerMachine(retry=2, delay_loop=6, delay_before_retry=1, reload=True)
    assert feed(m, [False, False, False]) == [(K.EV_RETRY, 1), (K.EV_RETRY, 1), (K.EV_DOWN, 6)]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    async def sleep(self, d):
        self.t += max(0.0, d)
        await asyncio.sleep(0)


def simulate(machine, fail_from, until, attempt_s=0.0, fail_attempt_s=None, first=0.0,
             from_start=False):
    """Run `run_checker` on a fake clock with a probe that succeeds before `fail_from` and fails
    from then on, each attempt taking attempt_s (failing ones fail_attempt_s). Returns
    [(time, event)] and the attempt start times."""
    clock = FakeClock()
    events, starts = [], []

    async def probe():
        starts.append(clock.t)
        ok = clock.t < fail_from
        await clock.sleep(attempt_s if ok or fail_attempt_s is None else fail_attempt_s)
        return K.Outcome(ok, "fake")

    def report(outcome):
        step = machine.on_result(outcome.ok)
        if step.event in (K.EV_UP, K.EV_DOWN):
            events.append((clock.t, step.event))
        return step

    async def main():
        task = asyncio.ensure_future(K.run_checker(probe, report, first=first, sleep=clock.sleep,
                                                   now=clock.now, from_start=from_start))
        while clock.t < until:
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    return events, starts


def test_seed_timing_refused_connections():
    # The seed: delay_loop 6, retry 3, delay_before_retry 3. nginx dies at t=10 (between checks at
    # 6 and 12); refused connections fail at once: down at 12 + 3 * 3 = 21.
    m = K.CheckerMachine(retry=3, delay_loop=6, delay_before_retry=3)
    events, starts = simulate(m, fail_from=10, until=40)
    assert starts[:6] == [0, 6, 12, 15, 18, 21]
    assert events == [(21, K.EV_DOWN)]
    assert 21 - 10 <= 6 + 3 * (3 + 3)       # within delay_loop + retry x (ct + dbr)


def test_seed_timing_with_connect_timeouts():
    # Failing attempts time out after connect_timeout 3: each retry costs 3 + 3 s, and the last
    # attempt's timeout comes on top: down by delay_loop + retry x (ct + dbr) + ct after the failure.
    m = K.CheckerMachine(retry=3, delay_loop=6, delay_before_retry=3)
    events, starts = simulate(m, fail_from=6.5, until=60, fail_attempt_s=3)
    assert starts[:6] == [0, 6, 12, 18, 24, 30]
    [(t, ev)] = events
    assert ev == K.EV_DOWN and t == 33
    assert t - 6.5 <= 6 + 3 * (3 + 3) + 3


def test_warmup_delays_the_first_attempt():
    rng = random.Random(1)
    ds = [K.first_delay(4.0, 60.0, rng, bootstrap=1.0) for _ in range(200)]
    assert all(1.0 <= d <= 5.0 for d in ds) and max(ds) - min(ds) > 3
    assert K.first_delay(0, 60.0, rng, bootstrap=1.0) == 1.0
    # No warmup written: keepalived uses delay_loop.
    assert max(K.first_delay(None, 2.0, rng, bootstrap=0) for _ in range(200)) > 1.5
    m = K.CheckerMachine(retry=1, delay_loop=5, delay_before_retry=1)
    _, starts = simulate(m, fail_from=1e9, until=20, first=3.0)
    assert starts[:3] == [3, 8, 13]


def test_misc_runs_are_scheduled_from_their_start():
    m = K.CheckerMachine(retry=0, delay_loop=5, delay_before_retry=1)
    _, starts = simulate(m, fail_from=1e9, until=20, attempt_s=2, from_start=True)
    assert starts[:3] == [0, 5, 10]
    m = K.CheckerMachine(retry=0, delay_loop=5, delay_before_retry=1)
    _, starts = simulate(m, fail_from=1e9, until=20, attempt_s=2, from_start=False)
    assert starts[:3] == [0, 7, 14]


def test_a_probe_that_raises_is_a_failed_attempt():
    m = K.CheckerMachine(retry=0, delay_loop=5, delay_before_retry=1)
    clock, seen = FakeClock(), []

    async def probe():
        raise RuntimeError("boom")

    def report(outcome):
        seen.append(outcome)
        return m.on_result(outcome.ok)

    async def main():
        t = asyncio.ensure_future(K.run_checker(probe, report, first=0, sleep=clock.sleep,
                                                now=clock.now))
        while not seen:
            await asyncio.sleep(0)
        t.cancel()

    asyncio.run(main())
    assert not seen[0].ok and "RuntimeError: boom" in seen[0].reason


# --- judging answers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code,dynamic,ok,sets,weight", [
    (0, False, True, False, None),
    (1, False, False, False, None),
    (2, False, False, False, None),
    (0, True, True, True, None),       # 0 restores the configured weight
    (1, True, False, False, None),
    (2, True, True, True, 0),
    (7, True, True, True, 5),
    (255, True, True, True, 253),
])
def test_misc_exit_statuses(code, dynamic, ok, sets, weight):
    o = K.misc_result(code, dynamic)
    assert (o.ok, o.sets_weight, o.weight) == (ok, sets, weight)


def url(path="/", **kw):
    return Url(file="t", line=1, path=path, **kw)


BODY = b"<h1>Hello Server3</h1>\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 23\r\n\r\n" + BODY


@pytest.mark.parametrize("raw,u,ok,why", [
    (OK, url(), True, "HTTP status 200 ok"),
    (OK, url(status_code=((404, 404),)), False, "HTTP status 200 not in 404"),
    (OK, url(status_code=((200, 204), (300, 399))), True, ""),
    (b"HTTP/1.0 302 Found\r\n\r\n", url(status_code=((200, 204), (300, 399))), True, ""),
    (OK, url(digest=hashlib.md5(BODY).hexdigest()), True, "MD5 digest ok"),
    (OK, url(digest=hashlib.md5(BODY).hexdigest().upper()), True, ""),
    (OK, url(digest="0" * 32), False, "MD5 digest"),
    (OK, url(regex="Server[0-9]"), True, "regex ok"),
    (OK, url(regex="Server9"), False, "did not match"),
    (OK, url(regex="Server9", regex_no_match=True), True, ""),
    (b"", url(), False, "no data received"),
    (b"SSH-2.0-OpenSSH\r\n", url(), False, "not an HTTP answer"),
    (b"HTTP/1.0 200 OK\n\nbody", url(digest=hashlib.md5(b"body").hexdigest()), True, ""),
])
def test_judge_http(raw, u, ok, why):
    o = K.judge_http(raw, u)
    assert o.ok == ok and why in o.reason, o


# --- probes against loopback servers ----------------------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    seen = []

    def do_GET(self):
        Handler.seen.append((self.path, self.headers.get("Host"), self.headers.get("User-Agent"),
                             self.request_version))
        if self.path == "/slow":
            time.sleep(2)
        code, body = (200, BODY) if self.path in ("/", "/slow") else (404, b"nope\n")
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def web():
    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass        # /slow writes after the checker gave up: expected

    srv = Server(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run(coro):
    return asyncio.run(coro)


def test_tcp_check_connects_refuses_and_binds(web):
    assert run(K.tcp_check(K.Target("127.0.0.1", web, 1.0))).ok
    o = run(K.tcp_check(K.Target("127.0.0.1", free_port(), 1.0)))
    assert not o.ok and "connection refused" in o.reason
    # bindto/bind_port: the same source port every time (closed with RST, no TIME_WAIT).
    sport = free_port()
    for _ in range(3):
        assert run(K.tcp_check(K.Target("127.0.0.1", web, 1.0, bindto="127.0.0.2",
                                        bind_port=sport))).ok


def test_tcp_check_times_out():
    # A listener whose backlog is full never completes the handshake.
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    port = ls.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        time.sleep(0.1)
        t0 = time.monotonic()
        o = run(K.tcp_check(K.Target("127.0.0.1", port, 0.3)))
        assert not o.ok and "timeout after 0.3s" in o.reason
        assert time.monotonic() - t0 < 1.0
    finally:
        for s in fillers:
            s.close()
        ls.close()


def config_of(text):
    res = P.parse_text(text)
    assert not res.errors, res.errors
    return res.config


HTTP_CONF = """
virtual_server 10.9.9.9 80 {{
    protocol TCP
    {vs_vhost}
    real_server 127.0.0.1 {port} {{
        {rs_vhost}
        HTTP_GET {{
            {ck_vhost}
            url {{
                path {path}
                {url_extra}
            }}
            connect_timeout 0.5
        }}
    }}
}}
"""


def http_probe(port, path="/", url_extra="", vs_vhost="", rs_vhost="", ck_vhost=""):
    cfg = config_of(HTTP_CONF.format(port=port, path=path, url_extra=url_extra, vs_vhost=vs_vhost,
                                     rs_vhost=rs_vhost, ck_vhost=ck_vhost))
    vs = cfg.services[0]
    rs = vs.real_servers[0]
    return K.make_probe(rs.checkers[0], rs, vs, rs.addr, rs.port)


def test_http_get_status_digest_and_request(web):
    Handler.seen.clear()
    assert run(http_probe(web)()).ok
    assert Handler.seen[-1] == ("/", f"127.0.0.1:{web}", "KeepAliveClient", "HTTP/1.0")
    o = run(http_probe(web, "/missing")())
    assert not o.ok and "HTTP status 404 not in 200-299" in o.reason
    assert run(http_probe(web, "/missing", "status_code 404")()).ok
    assert run(http_probe(web, "/", f"digest {hashlib.md5(BODY).hexdigest()}")()).ok
    o = run(http_probe(web, "/", f"digest {'ab' * 16}")())
    assert not o.ok and "MD5 digest" in o.reason
    o = run(http_probe(free_port())())
    assert not o.ok and "connection refused" in o.reason


def test_http_get_host_header_precedence(web):
    Handler.seen.clear()
    run(http_probe(web, vs_vhost="virtualhost vs.test", rs_vhost="virtualhost rs.test")())
    run(http_probe(web, vs_vhost="virtualhost vs.test", ck_vhost="virtualhost ck.test")())
    run(http_probe(web, url_extra="virtualhost url.test", ck_vhost="virtualhost ck.test")())
    run(http_probe(web, vs_vhost="virtualhost vs.test")())
    assert [h for _, h, _, _ in Handler.seen] == ["rs.test", "ck.test", "url.test", "vs.test"]


def test_http_get_read_timeout(web):
    t0 = time.monotonic()
    o = run(http_probe(web, "/slow")())
    assert not o.ok and "timeout after 0.5s" in o.reason
    assert time.monotonic() - t0 < 1.5


def test_ssl_get(tmp_path, web):
    import shutil
    import ssl
    import subprocess
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make the test certificate")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=lvsdp.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)

    class TLSServer(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self):
            conn, addr = super().get_request()
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            return ctx.wrap_socket(conn, server_side=True), addr

        def handle_error(self, request, client_address):
            pass

    srv = TLSServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        cfg = config_of(HTTP_CONF.format(port=port, path="/", vs_vhost="", rs_vhost="",
                                         ck_vhost="", url_extra=f"digest {hashlib.md5(BODY).hexdigest()}")
                        .replace("HTTP_GET", "SSL_GET"))
        vs = cfg.services[0]
        rs = vs.real_servers[0]
        assert run(K.make_probe(rs.checkers[0], rs, vs, rs.addr, rs.port)()).ok
        # The plain HTTP server does not speak TLS: a failed attempt, not an exception.
        o = run(K.make_probe(rs.checkers[0], rs, vs, rs.addr, web)())
        assert not o.ok
    finally:
        srv.shutdown()
        srv.server_close()


def test_misc_check_statuses_weights_and_timeout(tmp_path):
    assert run(K.misc_check("exit 0", 2, False)).ok
    o = run(K.misc_check("exit 1", 2, False))
    assert not o.ok and o.exit_code == 1
    o = run(K.misc_check("exit 7", 2, True))
    assert o.ok and o.sets_weight and o.weight == 5
    # sh -c: pipes, quotes and variables work as keepalived runs them.
    assert run(K.misc_check("test \"$(echo a | tr a b)\" = b", 2, False)).ok
    # Timeout: SIGTERM to the script's whole group, counted as a failure.
    pidfile = tmp_path / "child"
    t0 = time.monotonic()
    o = run(K.misc_check(f"sleep 30 & echo $! > {pidfile}; wait", 0.3, False))
    assert not o.ok and "timed out after 0.3s" in o.reason
    assert time.monotonic() - t0 < 1.5
    time.sleep(0.1)
    child = int(pidfile.read_text())
    assert not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]


def test_misc_check_cancel_kills_the_script(tmp_path):
    pidfile = tmp_path / "pid"

    async def main():
        t = asyncio.ensure_future(K.misc_check(f"echo $$ > {pidfile}; sleep 30", 60, False))
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    run(main())
    pid = int(pidfile.read_text())
    time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or " Z " in open(f"/proc/{pid}/stat").read()


# --- quorum ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("up,ws,q,h,expect", [
    (True, 3, 3, 0, (True, None)),
    (True, 2, 3, 0, (False, "lost")),
    (False, 3, 3, 0, (True, "gained")),
    (True, 2, 3, 1, (True, None)),          # keeps it down to quorum - hysteresis
    (True, 1, 3, 1, (False, "lost")),
    (False, 3, 3, 1, (False, None)),        # needs quorum + hysteresis to come back
    (False, 4, 3, 1, (True, "gained")),
    (True, 0, 1, 0, (False, "lost")),
])
def test_quorum_hysteresis(up, ws, q, h, expect):
    assert quorum_update(up, ws, q, h)[:2] == expect


def test_quorum_at_start_with_a_sorry_server():
    assert quorum_update(False, 0, 1, 0, has_sorry=True, init=True)[:2] == (False, "lost")
    assert quorum_update(False, 0, 1, 0, has_sorry=True, sorry_active=True, init=True)[:2] == \
        (False, None)
    assert quorum_update(False, 0, 1, 0, has_sorry=False, init=True)[:2] == (False, None)


# --- the manager, with fake probes ----------------------------------------------------------------------


class Fake:
    """Probe factory: every real server's checkers answer `self.ok[addr]` (True / False / an int
    exit status for MISC_CHECK)."""

    def __init__(self, **ok):
        self.ok = {k.replace("_", "."): v for k, v in ok.items()}
        self.calls = {}

    def __call__(self, checker, rs, vs, addr, port):
        async def probe():
            self.calls[addr] = self.calls.get(addr, 0) + 1
            v = self.ok.get(addr, True)
            if checker.kind == "MISC_CHECK":
                out = K.misc_result(int(v), checker.misc_dynamic)
                return K.Outcome(out.ok, out.reason, int(v), out.sets_weight, out.weight)
            return K.Outcome(bool(v), "fake up" if v else "fake down")
        return probe


def rs_block(addr, weight=1, extra="", kind="TCP_CHECK", checker_extra=""):
    return f"""
    real_server {addr} 80 {{
        weight {weight}
        {extra}
        {kind} {{
            {checker_extra}
            retry 1
            delay_before_retry 0.02
            warmup 0
        }}
    }}"""


def conf(reals, vs_extra=""):
    return f"""
virtual_server 10.9.9.9 80 {{
    delay_loop 0.05
    lb_algo wrr
    protocol TCP
    {vs_extra}
    {reals}
}}
"""


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.changes = []
        self.state = {}

    def __call__(self, skey, dkey, up, weight):
        with self.lock:
            self.changes.append((dkey[0], up, weight))
            prev = self.state.get(dkey[0], (True, None))
            self.state[dkey[0]] = (up, weight if weight is not None else prev[1])


def manager(text, fake, **kw):
    cfg = config_of(text)
    specs, _ = specs_from_config(cfg)
    rec = Recorder()
    m = HealthManager(cfg, specs, rec, probe_factory=fake, bootstrap=0, **kw)
    return m, rec, cfg, specs


def wait(pred, timeout=3.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        time.sleep(0.01)


def test_alpha_real_servers_start_down_and_come_up():
    fake = Fake(**{"10_0_0_1": True, "10_0_0_2": False})
    m, rec, *_ = manager(conf(rs_block("10.0.0.1") + rs_block("10.0.0.2"), "alpha"), fake)
    assert sorted(m.initial_changes()) == [
        (("TCP", "10.9.9.9", 80), ("10.0.0.1", 80), False, None),
        (("TCP", "10.9.9.9", 80), ("10.0.0.2", 80), False, None)]
    m.start()
    try:
        wait(lambda: rec.state.get("10.0.0.1") == (True, None))
        time.sleep(0.2)
        assert "10.0.0.2" not in rec.state      # never came up: no change needed
    finally:
        m.stop()


def test_failure_and_recovery_reach_on_change_and_scripts(tmp_path):
    log = tmp_path / "notify"
    fake = Fake(**{"10_0_0_1": True, "10_0_0_2": True})
    extra = f'notify_up "echo up $# >> {log}"\n        notify_down "echo down $# >> {log}"'
    m, rec, *_ = manager(conf(rs_block("10.0.0.1", extra=extra) + rs_block("10.0.0.2")), fake)
    assert m.initial_changes() == []
    m.start()
    try:
        time.sleep(0.15)
        fake.ok["10.0.0.1"] = False
        wait(lambda: rec.state.get("10.0.0.1") == (False, None))
        wait(lambda: log.exists() and log.read_text() == "down 0\n")   # no arguments
        fake.ok["10.0.0.1"] = True
        wait(lambda: rec.state.get("10.0.0.1") == (True, None))
        wait(lambda: log.read_text() == "down 0\nup 0\n")
        st = {r["addr"]: r for r in m.status()[0]["reals"]}
        assert st["10.0.0.1"]["alive"] and st["10.0.0.1"]["checkers"][0]["last"] == "fake up"
    finally:
        m.stop()


def test_misc_dynamic_sets_the_weight():
    fake = Fake(**{"10_0_0_1": 7})
    m, rec, *_ = manager(conf(rs_block("10.0.0.1", weight=3, kind="MISC_CHECK",
                                       checker_extra='misc_path "x"\n misc_dynamic')), fake)
    m.start()
    try:
        wait(lambda: rec.state.get("10.0.0.1") == (True, 5))
        fake.ok["10.0.0.1"] = 0         # back to the configured weight
        wait(lambda: rec.state.get("10.0.0.1") == (True, 3))
        fake.ok["10.0.0.1"] = 1         # failure: down
        wait(lambda: rec.state.get("10.0.0.1", (None,))[0] is False)
        fake.ok["10.0.0.1"] = 12
        wait(lambda: rec.state.get("10.0.0.1") == (True, 10))
    finally:
        m.stop()


def test_quorum_loss_switches_to_the_sorry_server_and_back(tmp_path):
    log = tmp_path / "quorum"
    fake = Fake()
    reals = "".join(rs_block(f"10.0.0.{i}") for i in (1, 2, 3, 4))
    m, rec, *_ = manager(conf(reals, f"""quorum 3
    hysteresis 1
    sorry_server 10.0.0.9 80
    quorum_up "echo up >> {log}"
    quorum_down "echo down >> {log}" """), fake)
    assert m.initial_changes() == []        # 4 >= quorum + hysteresis: starts up
    m.start()
    try:
        time.sleep(0.15)
        fake.ok["10.0.0.1"] = False
        fake.ok["10.0.0.2"] = False
        # 2 >= quorum - hysteresis: still up, only .1 and .2 leave.
        wait(lambda: rec.state.get("10.0.0.2") == (False, None)
             and rec.state.get("10.0.0.1") == (False, None))
        time.sleep(0.2)
        assert m.status()[0]["quorum_up"] and "10.0.0.3" not in rec.state
        fake.ok["10.0.0.3"] = False
        # 1 < 2: quorum lost; the alive .4 leaves too, for the sorry server.
        wait(lambda: rec.state.get("10.0.0.4") == (False, None))
        assert m.status()[0]["sorry_active"]
        wait(lambda: log.exists() and log.read_text() == "down\n")
        fake.ok["10.0.0.1"] = True
        fake.ok["10.0.0.2"] = True
        time.sleep(0.3)
        # 3 alive is below quorum + hysteresis = 4: still lost, the sorry server stays.
        st = m.status()[0]
        assert not st["quorum_up"] and st["weight_sum"] == 3
        assert all(rec.state[a] == (False, None) for a in ("10.0.0.1", "10.0.0.2", "10.0.0.4"))
        fake.ok["10.0.0.3"] = True
        wait(lambda: all(rec.state.get(f"10.0.0.{i}") == (True, None) for i in (1, 2, 3, 4)))
        assert m.status()[0]["quorum_up"] and not m.status()[0]["sorry_active"]
        wait(lambda: log.read_text() == "down\nup\n")
    finally:
        m.stop()


def test_a_pool_that_starts_below_quorum_uses_its_sorry_server(tmp_path):
    log = tmp_path / "quorum"
    reals = rs_block("10.0.0.1", weight=3) + rs_block("10.0.0.2", weight=1, extra="alpha")
    # keepalived: quorum_up at start needs quorum + hysteresis (3 + 1); .2 (alpha) is down.
    m, rec, *_ = manager(conf(reals, f"quorum 3\n    hysteresis 1\n    sorry_server 10.0.0.9 80"
                                     f'\n    quorum_down "echo down >> {log}"'), Fake())
    assert sorted(m.initial_changes()) == [
        (("TCP", "10.9.9.9", 80), ("10.0.0.1", 80), False, None),
        (("TCP", "10.9.9.9", 80), ("10.0.0.2", 80), False, None)]
    m.start()
    try:
        wait(lambda: log.exists() and log.read_text() == "down\n")   # "starting with quorum down"
        wait(lambda: rec.state.get("10.0.0.1") == (True, None))      # .2 came up: 4 >= 4
        assert rec.state["10.0.0.2"] == (True, None)
    finally:
        m.stop()


def test_stop_is_prompt_kills_checks_and_runs_omega(tmp_path):
    log = tmp_path / "omega"
    pidfile = tmp_path / "pid"
    text = conf(rs_block("10.0.0.1", extra=f'notify_down "echo rs >> {log}"', kind="MISC_CHECK",
                         checker_extra=f'misc_path "echo $$ > {pidfile}; sleep 30"\n'
                                       f'misc_timeout 60'),
                f'omega\n    quorum_down "echo quorum >> {log}"')
    cfg = config_of(text)
    specs, _ = specs_from_config(cfg)
    m = HealthManager(cfg, specs, lambda *a: None, bootstrap=0)
    m.start()
    wait(lambda: pidfile.exists() and pidfile.read_text().strip())
    t0 = time.monotonic()
    m.stop()
    assert time.monotonic() - t0 < 1.5
    pid = int(pidfile.read_text())
    time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or " Z " in open(f"/proc/{pid}/stat").read()
    assert sorted(log.read_text().split()) == ["quorum", "rs"]


def test_reload_keeps_unchanged_checkers_and_migrates_state(tmp_path):
    log = tmp_path / "notify"
    fake = Fake(**{"10_0_0_1": True, "10_0_0_2": False, "10_0_0_3": True, "10_0_0_4": False})
    nd = f'notify_down "echo down $# >> {log}"'
    text1 = conf(rs_block("10.0.0.1") + rs_block("10.0.0.2") + rs_block("10.0.0.3", extra=nd))
    m, rec, cfg, specs = manager(text1, fake)
    m.start()
    try:
        wait(lambda: rec.state.get("10.0.0.2") == (False, None))
        ids = {r["addr"]: r["checkers"][0]["id"] for r in m.status()[0]["reals"]}
        # Reload: .1 unchanged (weight edits do not restart it), .2's checker changes (retry),
        # .3 removed (it was alive: notify_down runs), .4 new with alpha (starts down).
        text2 = conf(rs_block("10.0.0.1", weight=5)
                     + rs_block("10.0.0.2").replace("retry 1", "retry 2")
                     + rs_block("10.0.0.4", extra="alpha"))
        cfg2 = config_of(text2)
        specs2, _ = specs_from_config(cfg2)
        n = len(rec.changes)
        changes = m.update(cfg2, specs2)
        assert (("TCP", "10.9.9.9", 80), ("10.0.0.4", 80), False, None) in changes
        st = {r["addr"]: r for r in m.status()[0]["reals"]}
        assert st["10.0.0.1"]["checkers"][0]["id"] == ids["10.0.0.1"]
        assert st["10.0.0.1"]["weight"] == 5
        assert st["10.0.0.2"]["checkers"][0]["id"] != ids["10.0.0.2"]
        # keepalived's migrate_checkers: a down real server whose only checker changed has no
        # failed checker left, so it is put back up; one failure is then enough again.
        assert st["10.0.0.2"]["alive"] is True
        assert (("TCP", "10.9.9.9", 80), ("10.0.0.2", 80), True, None) in changes
        assert "10.0.0.3" not in st
        wait(lambda: log.exists() and log.read_text() == "down 0\n")
        wait(lambda: ("10.0.0.2", False, None) in rec.changes[n:])
        fake.ok["10.0.0.4"] = True
        wait(lambda: any(c[0] == "10.0.0.4" and c[1] for c in rec.changes))
        # Same configuration again: nothing to change, nothing restarted.
        ids2 = {r["addr"]: r["checkers"][0]["id"] for r in m.status()[0]["reals"]}
        assert m.update(cfg2, specs2) == []
        assert {r["addr"]: r["checkers"][0]["id"] for r in m.status()[0]["reals"]} == ids2
    finally:
        m.stop()


def test_unsupported_checkers_are_noted_and_do_not_count():
    text = conf(rs_block("10.0.0.1", kind="PING_CHECK", checker_extra=""))
    cfg = config_of(text)
    specs, _ = specs_from_config(cfg)
    m = HealthManager(cfg, specs, lambda *a: None, bootstrap=0)
    assert any("PING_CHECK not acted on" in n for n in m.notes)
    assert m.initial_changes() == []
    assert m.status()[0]["reals"][0]["alive"] is True


def test_edited_weight_counts_for_quorum_and_dynamic_weight_wins():
    fake = Fake(**{"10_0_0_1": 7})
    m, rec, cfg, specs = manager(conf(rs_block("10.0.0.1", weight=3, kind="MISC_CHECK",
                                               checker_extra='misc_path "x"\n misc_dynamic')),
                                 fake)
    m.start()
    try:
        wait(lambda: rec.state.get("10.0.0.1") == (True, 5))
        # The daemon wrote weight 9 itself; misc_dynamic's 5 is put back.
        assert m.edited(("TCP", "10.9.9.9", 80), ("10.0.0.1", 80), 9) == [
            (("TCP", "10.9.9.9", 80), ("10.0.0.1", 80), True, 5)]
    finally:
        m.stop()


# --- metrics text and CLI parsing --------------------------------------------------------------------------


SNAP = {
    "services": [{"proto": "TCP", "addr": "10.9.9.9", "port": 80, "fwmark": 0,
                  "stats": {"conns": 6, "inpkts": 40, "outpkts": 30, "inbytes": 4000,
                            "outbytes": 9000},
                  "reals": [{"addr": "10.0.0.1", "port": 80, "weight": 0, "active": 1,
                             "inactive": 2, "persist": 0, "available": False,
                             "stats": {"conns": 6, "inpkts": 40, "outpkts": 30, "inbytes": 4000,
                                       "outbytes": 9000}}]}],
    "dataplane": {"drops": {"malformed": 3, "no_dest": 0}, "counters": {"packets": 70},
                  "queues": {"0": {"queue_total": 2, "queue_dropped": 1, "user_dropped": 0,
                                   "batches": 9}},
                  "conns": 3, "templates": 0},
}


def test_metrics_render():
    health = [{"skeys": [["TCP", "10.9.9.9", 80]], "quorum_up": True, "sorry_active": False,
               "reals": [{"targets": [[["TCP", "10.9.9.9", 80], ["10.0.0.1", 80]]],
                          "alive": False,
                          "checkers": [{"kind": "TCP_CHECK", "where": 'a "b".conf:3',
                                        "up": False}]}]}]
    text = M.render(SNAP, health)
    s = 'service="TCP 10.9.9.9:80"'
    for line in [
        f"lvsdp_service_connections_total{{{s}}} 6",
        f'lvsdp_service_bytes_total{{{s},direction="out"}} 9000',
        f'lvsdp_real_inactive_connections{{{s},real="10.0.0.1:80"}} 2',
        f'lvsdp_real_available{{{s},real="10.0.0.1:80"}} 0',
        f'lvsdp_real_health_up{{{s},real="10.0.0.1:80"}} 0',
        f'lvsdp_checker_up{{{s},real="10.0.0.1:80",checker="TCP_CHECK",where="a \\"b\\".conf:3"}} 0',
        f"lvsdp_service_quorum_up{{{s}}} 1",
        'lvsdp_dataplane_drops_total{reason="malformed"} 3',
        'lvsdp_dataplane_events_total{counter="packets"} 70',
        'lvsdp_queue_waiting{queue="0"} 2',
        'lvsdp_queue_dropped_total{queue="0",by="kernel"} 1',
        'lvsdp_queue_counter_total{queue="0",counter="batches"} 9',
        "lvsdp_dataplane_connections 3",
    ]:
        assert line in text.splitlines(), line
    # HELP and TYPE once per family, before its samples.
    assert text.count("# TYPE lvsdp_real_bytes_total counter") == 1
    lines = text.splitlines()
    assert lines.index("# TYPE lvsdp_dataplane_drops_total counter") < \
        lines.index('lvsdp_dataplane_drops_total{reason="malformed"} 3')


def test_metrics_server_serves_and_survives_errors():
    calls = []

    def collect():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("snapshot failed")
        return "lvsdp_up 1\n"

    srv = M.MetricsServer("127.0.0.1:0", collect)
    srv.start()
    try:
        import urllib.request
        import urllib.error
        url = f"http://127.0.0.1:{srv.port}/metrics"
        assert urllib.request.urlopen(url, timeout=2).read() == b"lvsdp_up 1\n"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url, timeout=2)
        assert urllib.request.urlopen(url, timeout=2).read() == b"lvsdp_up 1\n"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/nope", timeout=2)
    finally:
        srv.stop()


@pytest.mark.parametrize("text,ok", [("127.0.0.1:9100", ("127.0.0.1", 9100)),
                                     (":9100", ("0.0.0.0", 9100)), ("[::1]:9100", ("::1", 9100)),
                                     ("9100", None), ("host:70000", None), ("h:x", None)])
def test_metrics_addr(text, ok):
    if ok is None:
        with pytest.raises(ValueError):
            M.parse_addr(text)
    else:
        assert M.parse_addr(text) == ok


def test_cli_edit_requests():
    from control import cli
    p = __import__("argparse").ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    cli._add_live_parsers(sub)
    req = cli._live_request(p.parse_args(["edit-real", "-t", "10.9.9.9:80", "-r", "10.0.0.1",
                                          "-w", "3"]))
    assert req == {"cmd": "edit-real", "service": ["TCP", "10.9.9.9", 80],
                   "real": ["10.0.0.1", None], "weight": 3}
    req = cli._live_request(p.parse_args(["add-real", "-f", "7", "-r", "[ae00::1]:8080"]))
    assert req == {"cmd": "add-real", "service": ["FWM", 7], "real": ["ae00::1", 8080],
                   "fwd": "masq"}
    req = cli._live_request(p.parse_args(["set-timeout", "900", "120", "0"]))
    assert req == {"cmd": "set-timeout", "tcp": 900, "tcpfin": 120, "udp": 0}
    with pytest.raises(SystemExit):
        cli._live_request(p.parse_args(["del-real", "-u", "10.9.9.9", "-r", "10.0.0.1"]))
    assert json.dumps(req)
