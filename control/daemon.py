"""`lvs-dp run CONFIG`: the running balancer.

Owns the process's life: reads the config, writes the tables, sets the namespace's sysctls and
iptables rules (restoring and removing them on exit, and removing a crashed run's leftovers at
start), runs one data-plane worker per queue in threads (the engine releases the GIL), serves the
control socket, and estimates rates. Signals only set an event; the main thread does the tear-down,
so SIGTERM removes the rules within the workers' poll interval (100 ms) plus the iptables calls.
"""

import logging
import signal
import threading
import time

import numpy as np

from control import api
from control import parser as kparser
from control import rules as R
from control.apply import TableWriter, specs_from_config
from dataplane import consts as C
from dataplane import tables as T

log = logging.getLogger("lvs-dp")

RATE_PERIOD_S = 2.0     # IPVS's estimator period (ip_vs_est.c)


class ConfigError(Exception):
    pass


def load_specs(path):
    """Parse a keepalived.conf; raise ConfigError listing every error. Returns (specs, notes)."""
    res = kparser.parse_file(path)
    for w in res.warnings:
        log.warning("%s", w)
    if res.errors:
        raise ConfigError("\n".join(str(e) for e in res.errors))
    specs, notes = specs_from_config(res.config)
    return res.config, specs, notes


class RateEstimator:
    """IPVS's rate estimator: every 2 s, avg += (rate - avg) / 4, per counter row."""

    def __init__(self):
        self.last = {}
        self.avg = {}

    def update(self, key, counters, dt):
        cur = np.asarray(counters, np.float64)
        prev = self.last.get(key)
        self.last[key] = cur
        if prev is None or dt <= 0:
            self.avg.setdefault(key, np.zeros(5))
            return
        rate = (cur - prev) / dt
        avg = self.avg.setdefault(key, np.zeros(5))
        avg += (rate - avg) / 4.0

    def get(self, key):
        a = self.avg.get(key)
        if a is None:
            return {"cps": 0, "inpps": 0, "outpps": 0, "inbps": 0, "outbps": 0}
        return {"cps": int(round(a[0])), "inpps": int(round(a[1])), "outpps": int(round(a[2])),
                "inbps": int(round(a[3])), "outbps": int(round(a[4]))}


def _stats_dict(row):
    return {"conns": int(row[0]), "inpkts": int(row[1]), "outpkts": int(row[2]),
            "inbytes": int(row[3]), "outbytes": int(row[4])}


class Daemon:
    def __init__(self, config_path, socket_path=api.DEFAULT_SOCKET, backend="netlink", queues=1,
                 queue_base=0, instance="default", max_conns=1 << 20, allow_gid=None):
        self.config_path = config_path
        self.socket_path = socket_path
        self.backend = backend
        self.queue_nums = list(range(queue_base, queue_base + queues))
        self.instance = instance
        self.cfg = T.new_config()
        self.tw = TableWriter(self.cfg)
        self.workers = [T.new_worker(max_conns) for _ in self.queue_nums]
        self.queues = []
        self.threads = []
        self.stop_event = threading.Event()
        self.rates = RateEstimator()
        self.lock = threading.Lock()       # serialises table writes from control requests
        self.rules = None
        self.sysctls = None
        self.server = None
        self.started_ns = time.monotonic_ns()
        self.notes = []

    # -- set-up and tear-down ----------------------------------------------------------------
    def start(self):
        _model, specs, notes = load_specs(self.config_path)
        self.notes = notes
        for n in notes:
            log.warning("%s", n)
        self.tw.sync(specs)
        self._warn_missing_addresses(specs)
        R.cleanup_leftovers(self.instance)
        self.sysctls = R.Sysctls(self.instance)
        self.sysctls.apply()
        self._open_queues()
        # Compile (or load from numba's cache) before any packet is queued to us: a cold
        # compile takes tens of seconds, and queued packets wait for it.
        t0 = time.monotonic()
        for q in self.queues:
            warm_up = getattr(q, "warm_up", None)     # the netlink backend compiles in open()
            if warm_up:
                warm_up()
        log.info("engine ready in %.1f s", time.monotonic() - t0)
        self.rules = R.Rules(self.queue_nums, self.instance)
        self.rules.install(self._matches(specs))
        self.server = api.ControlServer(self.socket_path, self._handlers(), self.allow_gid)
        self.server.start()
        for q in self.queues:
            t = threading.Thread(target=q.run, args=(self.stop_event,), name=f"worker-q{q.queue_num}",
                                 daemon=True)
            t.start()
            self.threads.append(t)
        log.info("lvs-dp running: %d service(s), backend %s, queue(s) %s, socket %s",
                 len(specs), self.backend, self.queue_nums, self.socket_path)

    allow_gid = None

    def _open_queues(self):
        for num, wk in zip(self.queue_nums, self.workers):
            if self.backend == "nfqueue":
                from dataplane.nfq_binding import BindingQueue
                q = BindingQueue(num, self.cfg, wk)
            else:
                from dataplane.nfq_netlink import NetlinkQueue
                q = NetlinkQueue(num, None, self.cfg, wk)
            q.open()
            self.queues.append(q)

    def _matches(self, specs):
        out = []
        for s in specs:
            proto = "tcp" if s.proto == C.IPPROTO_TCP else "udp"
            if s.fwmark:
                out.append(R.Match("in", proto, None, 0, fwmark=s.fwmark))
            else:
                out.append(R.Match("in", proto, s.addr, s.port))
            for d in s.dests + ([s.sorry] if s.sorry else []):
                out.append(R.Match("out", proto, d.addr, d.port))
        return out

    def _warn_missing_addresses(self, specs):
        try:
            local = set(R.local_addresses())
        except Exception as e:     # only a warning: never stop on it
            log.warning("cannot list local addresses: %s", e)
            return
        for s in specs:
            if s.addr and s.addr not in local:
                log.warning("%s: VIP %s is not configured on this host (VRRP or the operator "
                            "adds it; lvs-dp does not)", s.source, s.addr)

    def stop(self):
        self.stop_event.set()
        if self.rules:
            self.rules.remove()
        for t in self.threads:
            t.join(timeout=1.0)
        for q in self.queues:
            try:
                q.close()
            except Exception as e:
                log.warning("closing queue %s: %s", q.queue_num, e)
        if self.sysctls:
            self.sysctls.restore()
        if self.server:
            self.server.stop()
        log.info("lvs-dp stopped: rules removed, sysctls restored")

    def serve(self):
        """Run until SIGINT/SIGTERM; the main thread estimates rates meanwhile."""
        def on_signal(signum, _frame):
            log.info("signal %d: stopping", signum)
            self.stop_event.set()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        last = time.monotonic()
        while not self.stop_event.wait(0.1):
            now = time.monotonic()
            if now - last >= RATE_PERIOD_S:
                self._estimate(now - last)
                last = now
            for t in self.threads:
                if not t.is_alive():
                    log.error("worker %s died; stopping", t.name)
                    self.stop_event.set()

    # -- snapshots -----------------------------------------------------------------------------
    def _svc_counters(self, sid):
        return sum(wk.svc_cnt[sid].astype(np.uint64) for wk in self.workers)

    def _dest_counters(self, did):
        return sum(wk.dest_cnt[did].astype(np.uint64) for wk in self.workers)

    def _estimate(self, dt):
        for key, sid in list(self.tw.svc_ids.items()):
            self.rates.update(("s", key), self._svc_counters(sid), dt)
        for key, did in list(self.tw.dest_ids.items()):
            self.rates.update(("d", key), self._dest_counters(did), dt)

    def snapshot(self, conns=False):
        cfg = self.cfg
        services = []
        for key, sid in sorted(self.tw.svc_ids.items(), key=lambda kv: kv[1]):
            spec = self.tw.specs[key]
            row = cfg.svc[sid]
            reals = []
            dests = [(d, False) for d in spec.dests] + ([(spec.sorry, True)] if spec.sorry else [])
            for d, sorry in dests:
                did = self.tw.dest_ids[(key, d.key, sorry)]
                drow = cfg.dest[did]
                if sorry and not (self._all_down(spec, key)):
                    continue    # keepalived adds the sorry server only while no real server is up
                if not sorry and not (drow["flags"] & C.DEST_F_AVAILABLE) and not d.inhibit:
                    continue    # a failed real server leaves the table, as keepalived removes it
                reals.append({
                    "addr": d.addr, "port": d.port, "fwd": C.FWD_NAMES[int(drow["fwd"])],
                    "weight": int(drow["weight"]) if drow["flags"] & C.DEST_F_AVAILABLE else 0,
                    "active": int(sum(wk.active[did] for wk in self.workers)),
                    "inactive": int(sum(wk.inactive[did] for wk in self.workers)),
                    "persist": int(sum(wk.persist[did] for wk in self.workers)),
                    "available": bool(drow["flags"] & C.DEST_F_AVAILABLE),
                    "stats": _stats_dict(self._dest_counters(did)),
                    "rate": self.rates.get(("d", (key, d.key, sorry))),
                })
            flags = []
            if row["flags"] & C.SVC_F_SH_PORT:
                flags.append(("mh-port" if spec.sched == C.SCHED_MH else "sh-port"))
            services.append({
                "proto": "FWM" if spec.fwmark else C.PROTO_NAMES[spec.proto],
                "addr": spec.addr, "port": spec.port, "fwmark": spec.fwmark,
                "sched": C.SCHED_NAMES[spec.sched], "flags": flags,
                "persistent": ({"timeout": spec.persist_timeout_s, "netmask": spec.persist_mask}
                               if spec.flags & C.SVC_F_PERSISTENT else None),
                "fwd": C.FWD_NAMES[spec.fwd],
                "stats": _stats_dict(self._svc_counters(sid)),
                "rate": self.rates.get(("s", key)),
                "reals": reals,
            })
        snap = {
            "size": 4096,
            "services": services,
            "timeouts": {"tcp": int(cfg.timeouts_ns[C.IP_VS_TCP_S_ESTABLISHED] // C.NS),
                         "tcpfin": int(cfg.timeouts_ns[C.IP_VS_TCP_S_FIN_WAIT] // C.NS),
                         "udp": int(cfg.timeouts_ns[C.IP_VS_UDP_S_NORMAL] // C.NS)},
            "dataplane": self._dp_stats(),
        }
        if conns:
            snap["conns"] = self._conns()
        return snap

    def _all_down(self, spec, key):
        for d in spec.dests:
            did = self.tw.dest_ids[(key, d.key, False)]
            if self.cfg.dest[did]["flags"] & C.DEST_F_AVAILABLE and self.cfg.dest[did]["weight"] > 0:
                return False
        return True

    def _dp_stats(self):
        # queue_stats() also mirrors the kernel's drop counters into wk.stats[DROP_OVERLOAD].
        qstats = {str(q.queue_num): q.queue_stats() for q in self.queues}
        total = sum(wk.stats.astype(np.uint64) for wk in self.workers)
        drops = {name: int(total[i]) for i, name in C.DROP_NAMES.items()}
        counters = {name: int(total[i]) for i, name in C.STAT_NAMES.items()}
        return {"drops": drops, "counters": counters, "queues": qstats,
                "conns": int(sum(wk.ctl[T.CTL_N_CONNS] for wk in self.workers)),
                "templates": int(sum(wk.ctl[T.CTL_N_TEMPLATES] for wk in self.workers)),
                "backend": self.backend, "workers": len(self.workers)}

    def _conns(self, limit=1_000_000):
        now = time.monotonic_ns()
        out = []
        for wk in self.workers:
            idx = np.nonzero(wk.conn["flags"])[0]
            for i in idx[: limit - len(out)]:
                c = wk.conn[i]
                tmpl = bool(c["flags"] & C.IP_VS_CONN_F_TEMPLATE)
                out.append({
                    "proto": C.PROTO_NAMES.get(int(c["proto"]), str(int(c["proto"]))),
                    "expire_s": max(0, int((int(c["expire_ns"]) - now) // C.NS)),
                    "state": "NONE" if tmpl else C.STATE_NAMES[int(c["state"])],
                    "caddr": T.int2ip(c["caddr"]), "cport": int(c["cport"]),
                    "vaddr": T.int2ip(c["vaddr"]), "vport": int(c["vport"]),
                    "daddr": T.int2ip(self.cfg.dest[c["dest"]]["addr"]) if tmpl else T.int2ip(c["daddr"]),
                    "dport": int(self.cfg.dest[c["dest"]]["port"]) if tmpl else int(c["dport"]),
                    "template": tmpl,
                })
        return out

    # -- control requests ------------------------------------------------------------------------
    def _handlers(self):
        return {
            "list": lambda req: {"snapshot": self.snapshot(conns=bool(req.get("conns")))},
            "ping": lambda req: {"uptime_s": (time.monotonic_ns() - self.started_ns) / 1e9},
        }


def run(config_path, socket_path, backend, queues, queue_base, instance, max_conns):
    d = Daemon(config_path, socket_path, backend, queues, queue_base, instance, max_conns)
    try:
        d.start()
    except ConfigError as e:
        print(e)
        d.stop()
        return 1
    except BaseException:
        d.stop()
        raise
    try:
        d.serve()
    finally:
        d.stop()
    return 0
