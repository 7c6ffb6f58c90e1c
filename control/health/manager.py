"""The health manager: runs every checker of a configuration, aggregates their verdicts into real
server, quorum and sorry-server state the way keepalived's ipwrapper.c does, and tells the daemon
which real servers the data plane may schedule.

Theory of operation
-------------------
One asyncio loop in one thread ("health") runs a task per checker (checkers.run_checker). The
packet path never waits for it: all the manager produces are calls of
``on_change(skey, dkey, up, weight_or_None)``, which the daemon turns into TableWriter writes.

State, per ``virtual_server`` block (a *pool*; a ``virtual_server group`` stands for every
concrete service of the group, ``skeys``) and per real server of it:

* A real server is **alive** while none of its checkers is down (ipwrapper.c
  ``update_svr_checker_state``; a real server without checkers is always alive). Its **weight** is
  the configured one, changed by a misc_dynamic checker's last verdict (keepalived's
  ``effective_weight``). Alive changes run ``notify_up`` / ``notify_down`` (no arguments).
* The pool's **quorum** is up while the sum of the weights of its alive real servers stays at or
  above ``quorum - hysteresis``; once down it comes back at ``quorum + hysteresis``; a sum of 0 is
  always down (``update_quorum_state``). Changes run ``quorum_up`` / ``quorum_down``.
* When the quorum is down and a ``sorry_server`` is configured, keepalived removes the alive real
  servers from the pool and adds the sorry server; without a sorry server the alive ones stay. So
  the data plane may schedule a real server when ``alive and (quorum_up or no sorry_server)``; the
  data plane itself falls back to the sorry server once nothing is schedulable.

What the daemon is told: for every (service, real server) the manager keeps the (up, weight) it
last gave the table and reports only differences. ``inhibit_on_failure`` needs nothing here: the
daemon lists an unavailable inhibited real server at weight 0 instead of hiding it.

Start, as keepalived starts: checkers begin after BOOTSTRAP_DELAY_S plus a random share of their
``warmup``; real servers of ``alpha`` checkers start down (``initial_changes()`` says so before
any packet is scheduled), the others up; the first failure of a checker decides at once. A pool
that starts below quorum with a sorry server runs ``quorum_down`` (keepalived: "Starting with
quorum down").

Reload (``update``): a checker whose configuration is unchanged (same kind, options and target;
file and line do not count) keeps running with its state; others are started, the removed ones
stopped. A real server kept by the reload keeps its alive state, one that disappears runs
``notify_down`` if it was alive (keepalived's ``clear_service_rs``). Real servers new in the
configuration start as at start (alpha: down). ``update`` returns the changes instead of calling
``on_change`` so the daemon applies them in the same critical section as its table sync.

Stop: every task is cancelled, running scripts and MISC_CHECK children are killed, and pools with
``omega`` run ``notify_down`` of their alive real servers and ``quorum_down`` (bounded by
OMEGA_TIMEOUT_S, keepalived's TIMER_HZ).

Threads: ``_lock`` guards the state. The loop thread computes changes under it and calls
``on_change`` after releasing it; ``update``/``edited`` (daemon threads) compute under it and
return. The daemon takes its own lock around ``on_change``'s writes and around
``update``/``edited`` + their writes; since the manager never holds ``_lock`` while calling out,
the two locks never nest the other way.

Logs: one line per transition, ``health event=... service="..." real=... checker=... reason="..."``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading

from control.health import checkers as K

log = logging.getLogger("lvs-dp.health")

NOTIFY_TIMEOUT_S = 30.0     # notify and quorum scripts are killed after this
OMEGA_TIMEOUT_S = 1.0       # scripts run at exit (omega): keepalived allows them TIMER_HZ
STOP_TIMEOUT_S = 5.0


# --- keys and identities ------------------------------------------------------------------------------


def service_key(vs) -> tuple:
    """The ServiceSpec key (control/apply.py) of a concrete VirtualServer."""
    if vs.fwmark:
        return ("FWM", vs.fwmark)
    return (vs.protocol, vs.addr, vs.port or 0)


def real_key(vs, rs) -> tuple:
    """The DestSpec key of a real server of a concrete VirtualServer."""
    return (rs.addr, rs.port if rs.port is not None else (vs.port or 0))


def checker_ident(checker, rs, vs, target: tuple) -> tuple:
    """What makes two checkers "the same" across a reload: everything but where they are written."""
    urls = tuple(dataclasses.replace(u, file="", line=0) for u in checker.urls)
    hosts = tuple(dataclasses.replace(h, file="", line=0) for h in checker.hosts)
    c = dataclasses.replace(checker, file="", line=0, urls=urls, hosts=hosts)
    return (c, tuple(sorted(c.extra.items())), rs.virtualhost, vs.virtualhost, target)


def quorum_update(up: bool, weight_sum: int, quorum: int, hysteresis: int, has_sorry: bool = False,
                  sorry_active: bool = False, init: bool = False):
    """keepalived's update_quorum_state as a pure function: returns (up, event, threshold), event
    'gained', 'lost' or None. With `init` a pool already below quorum that has a sorry server not
    yet in use also 'loses' it (so the sorry server goes in and quorum_down runs)."""
    threshold = quorum + (-hysteresis if up else hysteresis)
    if not up and weight_sum >= threshold:
        return True, "gained", threshold
    if (up and (weight_sum == 0 or weight_sum < threshold)) or \
            (init and not up and has_sorry and not sorry_active):
        return False, "lost", threshold
    return up, None, threshold


# --- state ---------------------------------------------------------------------------------------------


class _Run:
    """One checker of one real server of one pool."""

    def __init__(self, checker, ident, probe, machine):
        self.checker = checker
        self.ident = ident
        self.probe = probe
        self.machine = machine
        self.dyn_weight = None      # misc_dynamic: absolute weight, None = the configured one
        self.task = None
        self.last = None            # last Outcome
        self.attempts = 0
        self.retired = False
        self.pool = None
        self.real = None

    @property
    def name(self) -> str:
        return f"{self.checker.kind}({self.checker.file}:{self.checker.line})"


class _Real:
    def __init__(self, rs, targets, iweight):
        self.rs = rs
        self.targets = targets      # skey -> dkey (a group's services may differ in port)
        self.iweight = iweight
        self.runs: list[_Run] = []
        self.alive = True
        self.applied = {sk: (True, iweight) for sk in targets}   # what the table holds

    @property
    def name(self) -> str:
        dk = next(iter(self.targets.values()))
        return f"[{dk[0]}]:{dk[1]}" if ":" in dk[0] else f"{dk[0]}:{dk[1]}"

    def failed(self) -> int:
        return sum(1 for r in self.runs if not r.machine.is_up)

    def weight(self) -> int:
        w = self.iweight + sum(r.dyn_weight - self.iweight for r in self.runs
                               if r.dyn_weight is not None)
        return max(0, min(K.WEIGHT_MAX, w))


class _Pool:
    def __init__(self, vs, skeys, has_sorry):
        self.vs = vs
        self.skeys = skeys
        self.has_sorry = has_sorry
        self.reals: dict[tuple, _Real] = {}
        self.quorum_up = True

    @property
    def name(self) -> str:
        return self.vs.name

    @property
    def sorry_active(self) -> bool:
        return self.has_sorry and not self.quorum_up

    def weight_sum(self) -> int:
        return sum(r.weight() for r in self.reals.values() if r.alive)

    def wants(self, real: _Real) -> bool:
        return real.alive and (self.quorum_up or not self.has_sorry)


class _Effects:
    """What a state change asks for, carried out once the lock is released."""

    def __init__(self):
        self.changes = []           # (skey, dkey, up, weight_or_None)
        self.scripts = []           # (cmd, label, timeout)
        self.start = []             # _Run to start
        self.cancel = []            # _Run to stop


def _kv(v) -> str:
    s = str(v)
    return f'"{s}"' if (not s or any(ch in s for ch in ' ="')) else s


def _log_event(event, pool=None, real=None, run=None, level=logging.INFO, **kv):
    parts = [f"event={event}"]
    if pool is not None:
        parts.append(f"service={_kv(pool.name)}")
    if real is not None:
        parts.append(f"real={real.name}")
    if run is not None:
        parts.append(f"checker={run.name}")
    parts += [f"{k}={_kv(v)}" for k, v in kv.items()]
    log.log(level, "health %s", " ".join(parts))


# --- the manager -----------------------------------------------------------------------------------------


class HealthManager:
    """See the module docstring. ``probe_factory(checker, rs, vs, addr, port)`` returns the probe
    coroutine function of a checker or None (checkers.make_probe; tests pass fakes)."""

    def __init__(self, config, specs, on_change, *, probe_factory=K.make_probe,
                 bootstrap: float = K.BOOTSTRAP_DELAY_S, rng=None,
                 notify_timeout: float = NOTIFY_TIMEOUT_S, omega_timeout: float = OMEGA_TIMEOUT_S):
        self.on_change = on_change
        self.probe_factory = probe_factory
        self.bootstrap = bootstrap
        self.rng = rng or random.Random()
        self.notify_timeout = notify_timeout
        self.omega_timeout = omega_timeout
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._scripts: set = set()
        self._pending = _Effects()      # scripts and runs waiting for start()
        self.notes: list[str] = []
        fx = _Effects()
        with self._lock:
            self.pools = self._build(config, specs, reload=False)
            for pool in self.pools.values():
                for real in pool.reals.values():
                    real.alive = real.failed() == 0
                    fx.start += real.runs
                self._init_pool(pool, None, fx)
        self._initial = fx.changes
        self._pending.scripts += fx.scripts
        self._pending.start += fx.start

    # -- building state from the model -------------------------------------------------------------
    def _build(self, config, specs, reload: bool) -> dict:
        spec_by_key = {s.key: s for s in specs}
        concrete: dict[tuple, list] = {}
        for c in config.concrete_services():
            concrete.setdefault((c.file, c.line), []).append(c)
        pools = {}
        for vs in config.services:
            members = [c for c in concrete.get((vs.file, vs.line), [])
                       if service_key(c) in spec_by_key]
            if not members:
                continue
            skeys = tuple(dict.fromkeys(service_key(c) for c in members))
            pid = (vs.name, vs.protocol, vs.port)
            pool = _Pool(vs, skeys, any(spec_by_key[k].sorry is not None for k in skeys))
            for rs in vs.real_servers:
                targets = {}
                for c in members:
                    sk, dk = service_key(c), real_key(c, rs)
                    if any(d.key == dk for d in spec_by_key[sk].dests):
                        targets.setdefault(sk, dk)
                if not targets:
                    continue
                real = _Real(rs, targets, rs.weight)
                addr, port = next(iter(targets.values()))
                for ck in rs.checkers:
                    probe = self.probe_factory(ck, rs, vs, addr, port)
                    if probe is None:
                        note = (f"{ck.file}:{ck.line}: {ck.kind} not acted on (lvs-dp runs "
                                f"{', '.join(K.SUPPORTED_KINDS)}); it does not count against "
                                f"real server {addr}:{port}")
                        self.notes.append(note)
                        log.warning("%s", note)
                        continue
                    t = K.target_for(ck, addr, port)
                    run = _Run(ck, checker_ident(ck, rs, vs, (t.ip, t.port)), probe,
                               K.CheckerMachine.for_checker(ck, reload=reload))
                    run.pool, run.real = pool, real
                    real.runs.append(run)
                pool.reals[(rs.addr, rs.port)] = real
            pools[pid] = pool
        return pools

    def _init_pool(self, pool: _Pool, old: _Pool | None, fx: _Effects) -> None:
        vs = pool.vs
        if old is None:
            pool.quorum_up = pool.weight_sum() >= vs.quorum + vs.hysteresis
            sorry_before = False
        else:
            pool.quorum_up = old.quorum_up
            sorry_before = old.sorry_active
        ws = pool.weight_sum()
        up, ev, thr = quorum_update(pool.quorum_up, ws, vs.quorum, vs.hysteresis, pool.has_sorry,
                                    sorry_before, init=True)
        self._quorum_event(pool, up, ev, thr, ws, fx, init=True)
        self._sync(pool, fx)

    # -- transitions (called with _lock held) ------------------------------------------------------
    def _script(self, fx, cmd, word, pool, real=None):
        if cmd:
            fields = {"script": word, "service": pool.name}
            if real is not None:
                fields["real"] = real.name
            fx.scripts.append((cmd, fields, self.notify_timeout))

    def _set_alive(self, pool, real, alive, run, reason, fx):
        real.alive = alive
        _log_event("real_up" if alive else "real_down", pool, real, run, reason=reason,
                   inhibit=real.rs.inhibit_on_failure)
        self._script(fx, real.rs.notify_up if alive else real.rs.notify_down,
                     "notify_up" if alive else "notify_down", pool, real)

    def _quorum_event(self, pool, up, ev, threshold, ws, fx, init=False):
        pool.quorum_up = up
        if ev is None:
            return
        vs = pool.vs
        word = {"gained": "quorum_up", "lost": "quorum_down"}[ev]
        _log_event(word, pool, quorum=vs.quorum, hysteresis=vs.hysteresis, threshold=threshold,
                   weight_sum=ws, sorry_server="in use" if pool.sorry_active else "unused",
                   start=init)
        self._script(fx, vs.quorum_up if up else vs.quorum_down, word, pool)

    def _update_quorum(self, pool, fx):
        ws = pool.weight_sum()
        up, ev, thr = quorum_update(pool.quorum_up, ws, pool.vs.quorum, pool.vs.hysteresis)
        self._quorum_event(pool, up, ev, thr, ws, fx)

    def _sync(self, pool, fx):
        for real in pool.reals.values():
            want_up, want_w = pool.wants(real), real.weight()
            for sk, dk in real.targets.items():
                up, w = real.applied.get(sk, (True, real.iweight))
                if (up, w) != (want_up, want_w):
                    fx.changes.append((sk, dk, want_up, want_w if w != want_w else None))
                    real.applied[sk] = (want_up, want_w)

    def _report(self, run: _Run, outcome: K.Outcome) -> K.Step:
        """A checker's attempt finished (loop thread)."""
        fx = _Effects()
        with self._lock:
            if run.retired:
                return K.Step(run.machine.delay_loop, None, 0)
            pool, real = run.pool, run.real
            before_w = real.weight()
            step = run.machine.on_result(outcome.ok)
            run.last, run.attempts = outcome, run.attempts + 1
            if outcome.ok and outcome.sets_weight:
                run.dyn_weight = outcome.weight
            ev = step.event
            if ev == K.EV_RETRY:
                _log_event("check_failed", pool, real, run, logging.DEBUG, reason=outcome.reason,
                           retry=f"{step.retry_it}/{run.machine.retry}")
            elif ev == K.EV_UP:
                _log_event("checker_up", pool, real, run, reason=outcome.reason)
                if real.failed() == 0 and not real.alive:
                    self._set_alive(pool, real, True, run, outcome.reason, fx)
            elif ev == K.EV_DOWN:
                run.dyn_weight = None       # keepalived drops a failed checker's weight change
                _log_event("checker_down", pool, real, run, reason=outcome.reason,
                           retries=run.machine.retry)
                if real.alive:
                    self._set_alive(pool, real, False, run, outcome.reason, fx)
            elif ev == K.EV_STILL_DOWN:
                _log_event("checker_down", pool, real, run, reason=outcome.reason, start=True)
                if not real.alive:
                    self._script(fx, real.rs.notify_down, "notify_down", pool, real)
            after_w = real.weight()
            if after_w != before_w:
                _log_event("weight", pool, real, run, reason=outcome.reason, old=before_w,
                           new=after_w)
            self._update_quorum(pool, fx)
            self._sync(pool, fx)
        self._carry_out(fx)
        return step

    # -- carrying out effects ------------------------------------------------------------------------
    def _carry_out(self, fx: _Effects, changes: bool = True) -> None:
        if changes:
            for c in fx.changes:
                try:
                    self.on_change(*c)
                except Exception:
                    log.exception("health: on_change%r failed", c)
        loop = self._loop
        if loop is None or not loop.is_running():
            self._pending.scripts += fx.scripts
            self._pending.start += fx.start
            for run in fx.cancel:
                if run in self._pending.start:
                    self._pending.start.remove(run)
            return
        if fx.scripts or fx.start or fx.cancel:
            if _in_loop(loop):
                self._on_loop(fx)
            else:
                loop.call_soon_threadsafe(self._on_loop, fx)

    def _on_loop(self, fx: _Effects) -> None:
        for run in fx.cancel:
            if run.task is not None:
                run.task.cancel()
        for run in fx.start:
            if not run.retired and run.task is None:
                self._start_run(run)
        for cmd, fields, timeout in fx.scripts:
            t = self._loop.create_task(self._run_script(cmd, fields, timeout))
            self._scripts.add(t)
            t.add_done_callback(self._scripts.discard)

    def _start_run(self, run: _Run) -> None:
        c = run.checker
        first = K.first_delay(c.warmup, c.delay_loop, self.rng, self.bootstrap)
        run.task = self._loop.create_task(
            K.run_checker(run.probe, lambda o, run=run: self._report(run, o), first=first,
                          from_start=c.kind == "MISC_CHECK"),
            name=f"check {run.name}")

    async def _run_script(self, cmd, fields, timeout, grace=K.MISC_KILL_GRACE_S):
        code, what = await K.run_script(cmd, timeout, grace=grace)
        parts = " ".join(f"{k}={_kv(v)}" for k, v in fields.items())
        log.log(logging.INFO if code == 0 else logging.WARNING,
                "health event=script %s cmd=%s result=%s", parts, _kv(cmd), _kv(what))

    # -- public API ------------------------------------------------------------------------------------
    def initial_changes(self) -> list:
        """The changes the start state needs (alpha real servers down, sorry server in use...),
        for the daemon to apply before traffic flows. Taken once."""
        out, self._initial = self._initial, []
        return out

    def start(self) -> None:
        """Start the loop thread and every checker."""
        if self._thread is not None:
            return
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main():
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="health", daemon=True)
        self._thread.start()
        ready.wait(5)
        with self._lock:
            fx, self._pending = self._pending, _Effects()
        self._loop.call_soon_threadsafe(self._on_loop, fx)
        n = sum(len(r.runs) for p in self.pools.values() for r in p.reals.values())
        log.info("health: %d checker(s) for %d service(s)", n, len(self.pools))

    def update(self, config, specs) -> list:
        """Reload (see the module docstring). Returns the table changes for the caller to apply;
        scripts, new checkers and stopped checkers are handed to the loop."""
        fx = _Effects()
        with self._lock:
            new = self._build(config, specs, reload=True)
            for pid, pool in new.items():
                old = self.pools.get(pid)
                for rkey, real in pool.reals.items():
                    orl = old.reals.get(rkey) if old else None
                    if orl is None:
                        for run in real.runs:   # a new real server starts as at start
                            run.machine = K.CheckerMachine.for_checker(run.checker, reload=False)
                        real.alive = real.failed() == 0
                        fx.start += real.runs
                        continue
                    self._migrate(pool, real, orl, fx)
                if old is not None:
                    for rkey, orl in old.reals.items():
                        if rkey not in pool.reals:
                            self._retire_real(old, orl, fx)
                self._init_pool(pool, old, fx)
            for pid, old in self.pools.items():
                if pid not in new:
                    for orl in old.reals.values():
                        self._retire_real(old, orl, fx)
                    if old.quorum_up:
                        self._script(fx, old.vs.quorum_down, "quorum_down", old)
            self.pools = new
        self._carry_out(fx, changes=False)
        return fx.changes

    def _migrate(self, pool, real, orl, fx):
        """Carry a kept real server's state over (keepalived's migrate_checkers)."""
        real.applied = {sk: (orl.applied.get(sk, (True, None))[0], real.iweight)
                        for sk in real.targets}
        avail = list(orl.runs)
        failed_before = orl.failed() > 0
        ran_before = any(r.machine.has_run for r in orl.runs)
        for i, run in enumerate(real.runs):
            match = next((o for o in avail if o.ident == run.ident), None)
            if match is not None:
                avail.remove(match)
                match.checker, match.pool, match.real = run.checker, pool, real
                real.runs[i] = match
                continue
            if failed_before or (not orl.alive and not ran_before):
                run.machine.is_up = not run.checker.alpha
                run.machine.retry_it = run.machine.retry   # one failure is enough
            fx.start.append(run)
        for o in avail:
            o.retired = True
            fx.cancel.append(o)
        real.alive = orl.alive
        if (real.failed() == 0) != real.alive:
            self._set_alive(pool, real, real.failed() == 0, None, "reload", fx)

    def _retire_real(self, pool, real, fx):
        for run in real.runs:
            run.retired = True
            fx.cancel.append(run)
        if real.alive:
            _log_event("real_removed", pool, real, reason="reload")
            self._script(fx, real.rs.notify_down, "notify_down", pool, real)

    def edited(self, skey, dkey, weight: int) -> list:
        """A runtime edit (lvs-dp edit-real) set this real server's weight in the table: take it
        as its configured weight. Returns further changes (misc_dynamic still wins)."""
        fx = _Effects()
        with self._lock:
            for pool in self.pools.values():
                if skey not in pool.skeys:
                    continue
                for real in pool.reals.values():
                    if real.targets.get(skey) == dkey:
                        real.iweight = weight
                        real.applied[skey] = (real.applied.get(skey, (True, weight))[0], weight)
                        self._update_quorum(pool, fx)
                        self._sync(pool, fx)
        self._carry_out(fx, changes=False)
        return fx.changes

    def status(self) -> list:
        """Every pool, real server and checker, JSON-ready (for `lvs-dp health` and metrics)."""
        out = []
        with self._lock:
            for pool in self.pools.values():
                reals = []
                for real in pool.reals.values():
                    reals.append({
                        "addr": real.rs.addr,
                        "targets": [[list(sk), list(dk)] for sk, dk in real.targets.items()],
                        "alive": real.alive, "in_pool": pool.wants(real),
                        "weight": real.weight(), "config_weight": real.iweight,
                        "inhibit": real.rs.inhibit_on_failure,
                        "checkers": [{
                            "kind": r.checker.kind, "where": f"{r.checker.file}:{r.checker.line}",
                            "up": r.machine.is_up, "has_run": r.machine.has_run,
                            "retry_it": r.machine.retry_it, "retry": r.machine.retry,
                            "attempts": r.attempts, "id": id(r),
                            "last_ok": r.last.ok if r.last else None,
                            "last": r.last.reason if r.last else None} for r in real.runs],
                    })
                out.append({"service": pool.name, "skeys": [list(k) for k in pool.skeys],
                            "quorum": pool.vs.quorum, "hysteresis": pool.vs.hysteresis,
                            "quorum_up": pool.quorum_up, "weight_sum": pool.weight_sum(),
                            "sorry_server": pool.has_sorry, "sorry_active": pool.sorry_active,
                            "reals": reals})
        return out

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Cancel every checker, kill running scripts, run the omega scripts; returns within
        about OMEGA_TIMEOUT_S (at most `timeout`)."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(loop), loop).result(timeout)
        except Exception as e:
            log.warning("health: stop: %s", e or type(e).__name__)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            loop.close()
        self._thread = None

    async def _shutdown(self, loop):
        with self._lock:
            runs = [r for p in self.pools.values() for rl in p.reals.values() for r in rl.runs]
            for r in runs:
                r.retired = True
            omega = []
            for pool in self.pools.values():
                if not pool.vs.omega:
                    continue
                for real in pool.reals.values():
                    if real.alive and real.rs.notify_down:
                        omega.append((real.rs.notify_down, {"script": "notify_down", "service":
                                      pool.name, "real": real.name, "omega": 1}))
                if pool.vs.quorum_down:
                    omega.append((pool.vs.quorum_down, {"script": "quorum_down", "service":
                                  pool.name, "omega": 1}))
        tasks = [r.task for r in runs if r.task is not None] + list(self._scripts)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if omega:
            await asyncio.gather(*(self._run_script(cmd, fields, self.omega_timeout, grace=0.2)
                                   for cmd, fields in omega), return_exceptions=True)


def _in_loop(loop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
