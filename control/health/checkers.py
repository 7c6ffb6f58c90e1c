"""Health checkers: one checker's state machine, and the probes that feed it.

Theory of operation
-------------------
A checker is split the sans-IO way:

* `CheckerMachine` is pure. It is fed the outcome of one attempt (``on_result(ok)``) and answers
  with a `Step`: how long to wait before the next attempt and which event, if any, the attempt
  caused. It never reads a clock or touches a socket, so tests drive it with plain booleans.
* The probes (`tcp_check`, `http_get`, `misc_check`) are the only I/O. They are coroutines that
  return an `Outcome` (ok, a reason fit for a log line, and for MISC_CHECK the exit status).
* `run_checker` glues the two: sleep the warmup, probe, report, sleep the step's delay, forever.
  The clock and the sleep are arguments, so a test runs it on a fake clock.

The state machine is keepalived's (check_tcp.c ``tcp_epilog``; check_http.c ``epilog`` and
check_misc.c ``misc_check_child_thread`` count the same way), with its three variables:

* ``is_up``    the checker's verdict. Starts True, or False with ``alpha`` (check_data.c: alpha
               checkers are marked failed until they have run).
* ``has_run``  False until the first attempt has been judged.
* ``retry_it`` failed attempts since the last verdict. It starts at ``retry`` (check_data.c: "for
               non alpha mode, one failure is enough initially"), so the very first failure
               decides at once; later, while the checker is up, ``retry`` more attempts spaced by
               ``delay_before_retry`` follow a failure, and the ``retry + 1``-th consecutive
               failure declares the checker down. One success declares it up again.

Transitions as a table (``ok`` = the attempt succeeded)::

    state                         ok      not ok, retry_it >= retry        not ok, retry_it < retry
    up, or not yet run            UP*     DOWN (retry_it = 0)              RETRY (retry_it += 1,
                                                                                  delay_before_retry)
    down, has run                 UP      nothing (delay_loop)             nothing (delay_loop)

    * no event when it was up already; DOWN on a checker that was down already (an alpha checker's
      first failure) is reported as STILL_DOWN: keepalived runs the notify_down script for it.

A real server is alive while none of its checkers is down (ipwrapper.c
``update_svr_checker_state``); that aggregation, quorum and the sorry server live in manager.py.

MISC_CHECK exit statuses (keepalived.conf(5), check_misc.c): 0 is success; without
``misc_dynamic`` anything else is failure; with it 1 is failure and 2..255 are success with the
real server's weight set to ``status - 2``; 0 restores the configured weight. A script still
running after ``misc_timeout`` (default: the checker's delay_loop) gets SIGTERM, then SIGKILL two
seconds later, and counts as a failure ("timed out"). Its next run is scheduled from the start
of the previous one, as keepalived does (``last_ran``); TCP and HTTP schedule from the end.

HTTP_GET / SSL_GET send keepalived's request (``GET PATH HTTP/1.0``, ``User-Agent:
KeepAliveClient``, ``Host:`` the first of the url's, the checker's, the real server's and the
virtual server's ``virtualhost``, else ``IP:PORT``), read the answer to the end, and accept it when
the status is in the url's ``status_code`` ranges, the MD5 of the body equals ``digest`` (if
given) and ``regex`` matches the body (or does not, with ``regex_no_match``). Every url of the
checker must pass for the attempt to succeed. ``connect_timeout`` bounds the connection and then
each read, as keepalived's per-operation timers do.

All probes connect from the namespace the daemon runs in (the balancer's), to ``connect_ip``:
``connect_port`` (default: the real server's address and port), optionally from ``bindto``:
``bind_port``, through ``bind_if`` and with ``fwmark`` (SO_MARK).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import ssl
import struct
from dataclasses import dataclass

# Events a `Step` can carry.
EV_UP = "up"                    # the checker went up (or came up for the first time with alpha)
EV_DOWN = "down"                # the checker went down
EV_STILL_DOWN = "still_down"    # first verdict of a checker that started down (alpha): failed
EV_RETRY = "retry"              # a failure that will be retried after delay_before_retry

# keepalived: a MISC_CHECK script gets SIGTERM at its timeout, SIGKILL 2 s later.
MISC_KILL_GRACE_S = 2.0
# keepalived's BOOTSTRAP_DELAY (lib/scheduler.h, TIMER_HZ): checkers start 1 s after the daemon.
BOOTSTRAP_DELAY_S = 1.0
# Largest HTTP answer read (headers and body); longer ones are cut and hashed as read so far.
HTTP_MAX_RESPONSE = 16 << 20
# IPVS weights lvs-dp accepts (keepalived's `weight` is 0..65535).
WEIGHT_MAX = 65535

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)

# The checker kinds lvs-dp runs; the others (SMTP, DNS, PING, UDP, BFD, FILE) are reported by
# the manager as "not acted on" and leave their real server up.
SUPPORTED_KINDS = ("TCP_CHECK", "HTTP_GET", "SSL_GET", "MISC_CHECK")


# --- the pure part ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one attempt found. ``exit_code`` is a MISC_CHECK's status; ``weight`` is set (with
    ``sets_weight``) by a misc_dynamic success: an absolute weight, or None for "the configured
    weight" (status 0)."""

    ok: bool
    reason: str
    exit_code: int | None = None
    sets_weight: bool = False
    weight: int | None = None


@dataclass(frozen=True)
class Step:
    delay: float            # seconds until the next attempt
    event: str | None       # EV_* or None
    retry_it: int           # failures counted after this attempt


class CheckerMachine:
    """keepalived's per-checker state (see the module docstring). ``reload=True`` builds the
    machine of a checker that appears on a reload next to a real server already running: it starts
    up and needs ``retry + 1`` failures, as keepalived's reload path leaves it."""

    __slots__ = ("retry", "delay_loop", "delay_before_retry", "alpha", "is_up", "has_run",
                 "retry_it")

    def __init__(self, retry: int, delay_loop: float, delay_before_retry: float,
                 alpha: bool = False, reload: bool = False):
        self.retry = int(retry)
        self.delay_loop = float(delay_loop)
        self.delay_before_retry = float(delay_before_retry)
        self.alpha = bool(alpha)
        self.is_up = not alpha
        self.has_run = False
        self.retry_it = 0 if reload else self.retry

    @classmethod
    def for_checker(cls, checker, reload: bool = False) -> "CheckerMachine":
        return cls(checker.retry, checker.delay_loop, checker.delay_before_retry, checker.alpha,
                   reload=reload)

    def on_result(self, ok: bool) -> Step:
        delay = self.delay_loop
        event = None
        if ok:
            self.retry_it = 0
            if not self.is_up:
                self.is_up = True
                event = EV_UP
        elif (self.is_up or not self.has_run) and self.retry_it >= self.retry:
            self.retry_it = 0
            if self.is_up:
                self.is_up = False
                event = EV_DOWN
            else:
                event = EV_STILL_DOWN
        elif self.is_up:
            self.retry_it += 1
            delay = self.delay_before_retry
            event = EV_RETRY
        self.has_run = True
        return Step(delay, event, self.retry_it)

    def __repr__(self) -> str:
        return (f"CheckerMachine(is_up={self.is_up}, has_run={self.has_run}, "
                f"retry_it={self.retry_it}/{self.retry})")


def misc_result(code: int, dynamic: bool) -> Outcome:
    """Judge a MISC_CHECK exit status (keepalived.conf(5), check_misc.c)."""
    if code == 0:
        return Outcome(True, "exited with status 0", 0, sets_weight=dynamic, weight=None)
    if dynamic and 2 <= code <= 255:
        return Outcome(True, f"exited with status {code}: weight {code - 2}", code,
                       sets_weight=True, weight=code - 2)
    return Outcome(False, f"exited with status {code}", code)


def first_delay(warmup: float | None, delay_loop: float, rng, bootstrap: float = BOOTSTRAP_DELAY_S) -> float:
    """When a checker first runs: keepalived's BOOTSTRAP_DELAY plus a random share of
    ``warmup`` (default: the checker's delay_loop), so checks of many real servers spread out."""
    w = delay_loop if warmup is None else warmup
    return bootstrap + (rng.uniform(0.0, w) if w > 0 else 0.0)


def host_header(url, checker, rs, vs, ip: str, port: int) -> str:
    """keepalived's Host: url > checker > real server > virtual server virtualhost, else IP:PORT."""
    for v in (url.virtualhost, checker.virtualhost, getattr(rs, "virtualhost", None),
              getattr(vs, "virtualhost", None)):
        if v:
            return v
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def http_request(path: str, host: str) -> bytes:
    return (f"GET {path} HTTP/1.0\r\nUser-Agent: KeepAliveClient\r\nHost: {host}\r\n\r\n"
            ).encode("latin-1")


def judge_http(raw: bytes, url) -> Outcome:
    """Judge one HTTP answer (headers and body as read) against a `model.Url`."""
    if not raw:
        return Outcome(False, f"{url.path}: no data received")
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition(b"\n\n")
    status_line = head.split(b"\n", 1)[0].strip()
    m = re.match(rb"HTTP/\d(?:\.\d)?\s+(\d{3})", status_line)
    if not m:
        return Outcome(False, f"{url.path}: not an HTTP answer: {status_line[:60]!r}")
    code = int(m.group(1))
    if not url.accepts(code):
        ranges = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in url.status_code)
        return Outcome(False, f"{url.path}: HTTP status {code} not in {ranges}")
    what = f"HTTP status {code}"
    if url.digest:
        got = hashlib.md5(body).hexdigest()
        if got != url.digest.lower():
            return Outcome(False, f"{url.path}: MD5 digest {got} != {url.digest.lower()}")
        what = "MD5 digest"
    if url.regex:
        try:
            matched = re.search(url.regex.encode("latin-1"), body) is not None
        except re.error as e:
            return Outcome(False, f"{url.path}: bad regex: {e}")
        if matched == url.regex_no_match:
            return Outcome(False, f"{url.path}: regex {'matched' if matched else 'did not match'}")
        what = "regex"
    return Outcome(True, f"{url.path}: {what} ok")


# --- targets and probes (the I/O) -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a checker connects: ``ip``:``port``, from ``bindto``:``bind_port`` via ``bind_if``
    with ``fwmark``, giving up after ``timeout`` seconds per operation."""

    ip: str
    port: int
    timeout: float
    bindto: str | None = None
    bind_port: int | None = None
    bind_if: str | None = None
    fwmark: int | None = None

    def __str__(self) -> str:
        a = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{a}:{self.port}"


def target_for(checker, rs_addr: str, rs_port: int) -> Target:
    return Target(ip=checker.connect_ip or rs_addr,
                  port=checker.connect_port if checker.connect_port is not None else rs_port,
                  timeout=checker.connect_timeout, bindto=checker.bindto,
                  bind_port=checker.bind_port, bind_if=checker.bind_if, fwmark=checker.fwmark)


async def connect(target: Target) -> socket.socket:
    """A connected non-blocking TCP socket (raises OSError / TimeoutError)."""
    family = socket.AF_INET6 if ":" in target.ip else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        if target.bind_if:
            s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, target.bind_if.encode())
        if target.fwmark:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, int(target.fwmark))
        if target.bind_port:
            # The same 4-tuple every time: close with RST so no TIME_WAIT blocks the next check.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if target.bindto or target.bind_port:
            any_addr = "::" if family == socket.AF_INET6 else "0.0.0.0"
            s.bind((target.bindto or any_addr, target.bind_port or 0))
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(s, (target.ip, target.port)), target.timeout)
        return s
    except BaseException:
        s.close()
        raise


def _describe(e: BaseException, target: Target) -> str:
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return f"timeout after {target.timeout:g}s"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, OSError):
        return os.strerror(e.errno) if e.errno else str(e)
    return f"{type(e).__name__}: {e}"


async def tcp_check(target: Target) -> Outcome:
    """TCP_CHECK: a connection to the target succeeds."""
    try:
        s = await connect(target)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        return Outcome(False, f"connect {target}: {_describe(e, target)}")
    s.close()
    return Outcome(True, f"connected to {target}")


def _tls_context() -> ssl.SSLContext:
    # keepalived's SSL_GET checks that TLS works, not who the server is (no CA configured).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def http_fetch(target: Target, request: bytes, use_ssl: bool = False,
                     server_hostname: str | None = None) -> bytes:
    """Send `request`, read the answer to EOF (or HTTP_MAX_RESPONSE). Raises on errors."""
    s = await connect(target)
    try:
        kw = {}
        if use_ssl:
            kw = {"ssl": _tls_context(), "server_hostname": server_hostname or "",
                  "ssl_handshake_timeout": target.timeout}
        reader, writer = await asyncio.wait_for(asyncio.open_connection(sock=s, **kw),
                                                target.timeout)
    except BaseException:
        s.close()
        raise
    try:
        writer.write(request)
        await asyncio.wait_for(writer.drain(), target.timeout)
        chunks, size = [], 0
        while size < HTTP_MAX_RESPONSE:
            data = await asyncio.wait_for(reader.read(65536), target.timeout)
            if not data:
                break
            chunks.append(data)
            size += len(data)
        return b"".join(chunks)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (Exception, asyncio.CancelledError):
            pass


async def http_get(target: Target, urls, hosts, use_ssl: bool = False) -> Outcome:
    """HTTP_GET / SSL_GET: every url answers as its block wants. `hosts` is the Host header of
    each url (see `host_header`)."""
    for url, host in zip(urls, hosts):
        try:
            raw = await http_fetch(target, http_request(url.path, host), use_ssl,
                                   host.rsplit(":", 1)[0].strip("[]") if use_ssl else None)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return Outcome(False, f"GET {target} {url.path}: {_describe(e, target)}")
        out = judge_http(raw, url)
        if not out.ok:
            return Outcome(False, f"GET {target} {out.reason}")
    return Outcome(True, f"GET {target}: {len(urls)} url(s) ok")


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def run_script(cmd: str, timeout: float, user: str | None = None,
                     grace: float = MISC_KILL_GRACE_S) -> tuple[int | None, str]:
    """Run ``sh -c cmd`` in its own session, no input or output. Returns (exit status or None,
    what happened). At `timeout` the group gets SIGTERM, SIGKILL `grace` seconds later. A
    cancelled call kills the group before re-raising."""
    kw = {}
    if user:
        parts = user.split()
        kw["user"] = parts[0]
        if len(parts) > 1:
            kw["group"] = parts[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True, **kw)
    except (OSError, KeyError, ValueError) as e:
        return None, f"cannot start: {e}"
    try:
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                _kill_group(proc.pid, signal.SIGKILL)
                await proc.wait()
            return None, f"timed out after {timeout:g}s"
    except asyncio.CancelledError:
        _kill_group(proc.pid, signal.SIGKILL)
        raise
    if code < 0:
        return None, f"killed by signal {-code}"
    return code, f"exited with status {code}"


async def misc_check(cmd: str, timeout: float, dynamic: bool, user: str | None = None) -> Outcome:
    """MISC_CHECK: run the script, judge its exit status (`misc_result`)."""
    code, what = await run_script(cmd, timeout, user)
    if code is None:
        return Outcome(False, f"{cmd!r} {what}")
    out = misc_result(code, dynamic)
    return Outcome(out.ok, f"{cmd!r} {out.reason}", code, out.sets_weight, out.weight)


def make_probe(checker, rs, vs, rs_addr: str, rs_port: int):
    """The probe coroutine function of a checker, or None for a kind lvs-dp does not run."""
    if checker.kind == "TCP_CHECK":
        target = target_for(checker, rs_addr, rs_port)
        return lambda: tcp_check(target)
    if checker.kind in ("HTTP_GET", "SSL_GET"):
        target = target_for(checker, rs_addr, rs_port)
        hosts = [host_header(u, checker, rs, vs, target.ip, target.port) for u in checker.urls]
        use_ssl = checker.kind == "SSL_GET"
        return lambda: http_get(target, checker.urls, hosts, use_ssl)
    if checker.kind == "MISC_CHECK":
        timeout = float(checker.misc_timeout) if checker.misc_timeout else checker.delay_loop
        return lambda: misc_check(checker.misc_path, timeout, checker.misc_dynamic, checker.user)
    return None


# --- the loop of one checker ----------------------------------------------------------------------------


async def run_checker(probe, report, *, first: float, sleep=asyncio.sleep, now=None,
                      from_start: bool = False) -> None:
    """Probe forever: wait `first` seconds, then probe, ``step = report(outcome)``, wait
    ``step.delay`` (counted from the attempt's start with `from_start`, else from its end).
    `sleep` and `now` are the clock (asyncio's by default); a probe that raises counts as a
    failed attempt. Ends only by cancellation."""
    if now is None:
        now = asyncio.get_running_loop().time
    await sleep(first)
    while True:
        t0 = now()
        try:
            outcome = await probe()
        except asyncio.CancelledError:
            raise
        except Exception as e:     # a probe bug is a failed check, never a dead checker
            outcome = Outcome(False, f"checker error: {type(e).__name__}: {e}")
        step = report(outcome)
        base = t0 if from_start else now()
        await sleep(max(0.0, base + step.delay - now()))
