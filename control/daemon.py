"""`lvs-dp run CONFIG`: the running balancer.

Owns the process's life: reads the config, writes the tables, sets the namespace's sysctls and
iptables rules (restoring and removing them on exit, and removing a crashed run's leftovers at
start), runs one data-plane worker per queue in threads (the engine releases the GIL), serves the
control socket, and estimates rates. Signals only set an event; the main thread does the tear-down,
so SIGTERM removes the rules within the workers' poll interval (100 ms) plus the iptables calls.
"""

import ipaddress
import logging
import signal
import threading
import time

import numpy as np

from control import api
from control import parser as kparser
from control import rules as R
from control.apply import TableWriter, expire_dest_conns, specs_from_config
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
                 queue_base=0, instance="default", max_conns=1 << 20, allow_gid=None,
                 metrics_addr=None, lport_range=(T.LPORT_LO, T.LPORT_HI),
                 expire_nodest_conn=False, synproxy_overrides=None, fnat_timestamp="strip",
                 gso=True):
        self.config_path = config_path
        self.gso = gso                  # netlink backend: NFQA_CFG_F_GSO (nfq_netlink docstring)
        self.sp_overrides = dict(synproxy_overrides or {})   # lvs-dp run --synproxy: field -> int
        self.sp_settings = None                             # the SynproxySettings in force
        self.expire_nodest_conn = expire_nodest_conn
        self.socket_path = socket_path
        self.backend = backend
        self.queue_nums = list(range(queue_base, queue_base + queues))
        self.instance = instance
        self.cfg = T.new_config()
        n = len(self.queue_nums)
        lo, hi = lport_range
        self.workers = [T.new_worker(max_conns, worker=w, n_workers=n, port_lo=lo, port_hi=hi)
                        for w in range(n)]
        self.tw = TableWriter(self.cfg, on_new_laddr=self._init_laddr,
                              fnat_timestamp=fnat_timestamp)
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
        self._live_init(allow_gid, metrics_addr)

    # -- set-up and tear-down ----------------------------------------------------------------
    def load(self):
        """Read the configuration into the tables (services, real servers, SYN-proxy settings);
        no rules, queues or threads yet. Returns (model, specs)."""
        model, specs, notes = load_specs(self.config_path)
        self.notes = notes
        for n in notes:
            log.warning("%s", n)
        self.tw.sync(specs)
        self._apply_synproxy(model)
        return model, specs

    def _apply_synproxy(self, model):
        """SYN-proxy settings: the patch's defaults, then the file's ``synproxy { }`` block, then
        ``--synproxy`` (the command line wins); written into Config.sp_cfg, which the workers read
        per packet, so a reload takes effect at once (handshakes in flight: synproxy_ack's
        docstring). Returns a line per changed setting (none at start)."""
        from control.synproxy_settings import SynproxySettings, with_values
        new = with_values(with_values(SynproxySettings(), model.synproxy), self.sp_overrides)
        errs = new.validate()
        if errs:        # the parser and the CLI check each value; this is a last guard
            raise ConfigError("synproxy: " + "; ".join(errs))
        old, self.sp_settings = self.sp_settings, new
        self.cfg.sp_cfg[:] = new.as_array()
        if old is None:
            log.info("synproxy settings: %s", new.values())
            return []
        a, b = old.values(), new.values()
        return [f"synproxy {k}: {a[k]} -> {b[k]}" for k in a if a[k] != b[k]]

    def start(self):
        model, specs = self.load()
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
        self._start_live(model, specs)
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
                q = NetlinkQueue(num, None, self.cfg, wk, gso=self.gso)
            q.open()
            self.queues.append(q)

    def _init_laddr(self, laddr_id, _addr):
        # Every worker gets the ports it owns (those its replies are steered to) for the
        # new local address, before any service's pool can name it.
        for wk in self.workers:
            T.init_laddr(wk, laddr_id)

    def _matches(self, specs):
        out = []
        # FULLNAT client packets are steered by the client's port (without its low bit: Linux
        # clients connect from even ports, rules.py), so one client's connections
        # spread over the workers (any worker may take a connection: it binds a local port it
        # owns, and the replies follow that port). One VIP is steered one way for all its
        # services (its ICMP errors are steered by the quoted packet), so a VIP that also has
        # NAT services keeps the client address. Later fragments carry no port: rules.py
        # steers them by address, and those of a FULLNAT VIP may miss (DROP_FRAGMENT).
        nat_vips = {s.addr for s in specs if s.fwd != C.FWD_FULLNAT}
        for s in specs:
            proto = "tcp" if s.proto == C.IPPROTO_TCP else "udp"
            if s.fwd == C.FWD_FULLNAT:
                # Replies come back to laddr:lport: steer them by the local port, which the
                # worker that made the connection owns.
                steer = None if s.addr in nat_vips else "sport_hi"
                if s.fwmark:
                    out.append(R.Match("in", proto, None, 0, fwmark=s.fwmark, steer=steer))
                else:
                    out.append(R.Match("in", proto, s.addr, s.port, steer=steer))
                for d in s.dests + ([s.sorry] if s.sorry else []):
                    out.append(R.Match("out", proto, d.addr, d.port, steer="dport"))
                continue
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
        self._stop_live()
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

    def install_signals(self):
        """Before start(): a SIGTERM that arrives while rules are being installed must still
        lead to stop() removing them, not to the default action killing the process."""
        def on_signal(signum, _frame):
            log.info("signal %d: stopping", signum)
            self.stop_event.set()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def serve(self):
        """Run until SIGINT/SIGTERM; the main thread estimates rates meanwhile."""
        self._install_sighup()
        last = time.monotonic()
        last_rotate = last
        while not self.stop_event.wait(0.1):
            now = time.monotonic()
            if now - last >= RATE_PERIOD_S:
                self._estimate(now - last)
                last = now
            if now - last_rotate >= self._sp_rotate_s():
                T.rotate_sp_secrets(self.cfg)       # SYN-cookie keys: row 1 <- row 0, new row 0
                last_rotate = now
            for t in self.threads:
                if not t.is_alive():
                    log.error("worker %s died; stopping", t.name)
                    self.stop_event.set()

    def _sp_rotate_s(self):
        """SYN-cookie secrets rotate once per cookie lifetime (Config.sp_cfg SPC_MAX_AGE
        minutes): the previous generation then still checks every cookie in flight."""
        from dataplane.synproxy import SPC_MAX_AGE
        return max(1, int(self.cfg.sp_cfg[SPC_MAX_AGE])) * 60

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
            laddrs = []
            for a in spec.laddrs:
                lid = self.tw.laddr_ids[a]
                laddrs.append({"addr": a, "conns": int(sum(wk.laddr_conns[lid] for wk in self.workers)),
                               "conflicts": 0})
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
                "laddrs": laddrs,
            })
        snap = {
            "size": 4096,
            "services": services,
            "timeouts": {"tcp": int(cfg.timeouts_ns[C.IP_VS_TCP_S_ESTABLISHED] // C.NS),
                         "tcpfin": int(cfg.timeouts_ns[C.IP_VS_TCP_S_FIN_WAIT] // C.NS),
                         "udp": int(cfg.timeouts_ns[C.IP_VS_UDP_S_NORMAL] // C.NS)},
            "dataplane": self._dp_stats(),
            "synproxy": self.sp_settings.values() if self.sp_settings else None,
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
                "backend": self.backend, "workers": len(self.workers),
                "fnat_timestamp": self.tw.fnat_timestamp,
                "per_worker": [self._worker_stats(q, wk) for q, wk in zip(self.queue_nums, self.workers)]}

    @staticmethod
    def _worker_stats(queue, wk):
        """One worker's share: with several queues each should carry connections, and a reply
        that reached a worker not owning its local port shows as fnat_reply_no_conn."""
        st = wk.stats
        return {"queue": queue, "conns": int(wk.ctl[T.CTL_N_CONNS]),
                "conn_new": int(st[C.STAT_CONN_NEW]), "packets": int(st[C.STAT_PKTS]),
                "rewritten": int(st[C.STAT_REWRITTEN]),
                "drops": int(sum(int(st[i]) for i in C.DROP_NAMES)),
                "fnat_reply_no_conn": int(st[C.STAT_FNAT_REPLY_NO_CONN])}

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
                    "laddr": T.int2ip(c["laddr"]), "lport": int(c["lport"]),
                    "daddr": T.int2ip(self.cfg.dest[c["dest"]]["addr"]) if tmpl else T.int2ip(c["daddr"]),
                    "dport": int(self.cfg.dest[c["dest"]]["port"]) if tmpl else int(c["dport"]),
                    "template": tmpl,
                })
        return out

    # -- control requests ------------------------------------------------------------------------
    def _list_request(self, req):
        with self.lock:     # a reload or runtime edit must not change the tables mid-snapshot
            return {"snapshot": self.snapshot(conns=bool(req.get("conns")))}

    def _handlers(self):
        return {
            "list": self._list_request,
            "ping": lambda req: {"uptime_s": (time.monotonic_ns() - self.started_ns) / 1e9},
            **self._live_handlers(),
        }

    # -- health checks, reload, runtime edits, metrics (issue 6) -----------------------------------
    # Kept in one block on purpose: the rest of the class calls only _live_init, _start_live,
    # _stop_live, _install_sighup and _live_handlers. Table writes from the health thread and
    # from these requests all hold self.lock.
    def _live_init(self, allow_gid, metrics_addr):
        self.allow_gid = allow_gid
        self.metrics_addr = metrics_addr
        self.health = None
        self.metrics = None
        self.model = None
        self._reload_lock = threading.Lock()

    def _start_live(self, model, specs):
        """Health checks (their start state is written before any worker runs) and metrics."""
        from control.health.manager import HealthManager
        self.model = model
        self.health = HealthManager(model, specs, self._on_health)
        with self.lock:
            for change in self.health.initial_changes():
                self._apply_health(*change)
        self.health.start()
        if self.metrics_addr:
            from control.metrics import MetricsServer
            self.metrics = MetricsServer(self.metrics_addr, self._metrics_text)
            self.metrics.start()

    def _stop_live(self):
        if self.metrics:
            self.metrics.stop()
            self.metrics = None
        if self.health:
            self.health.stop()

    def _apply_health(self, skey, dkey, up, weight):
        """One health change into the tables; the caller holds self.lock."""
        if weight is not None:
            self.tw.set_weight(skey, dkey, weight)
        self.tw.set_available(skey, dkey, up)
        if not up and self.expire_nodest_conn:
            did = self.tw.dest_ids.get((skey, dkey, False))
            if did is not None:
                n = expire_dest_conns(self.workers, did)
                log.info("expire_nodest_conn: %d connection(s) to %s:%s expired", n, *dkey)

    def _on_health(self, skey, dkey, up, weight):
        with self.lock:
            self._apply_health(skey, dkey, up, weight)

    def _install_sighup(self):
        """SIGHUP reloads, like keepalived; the handler only starts a thread."""
        def on_hup(_signum, _frame):
            threading.Thread(target=self._reload_logged, name="reload", daemon=True).start()
        signal.signal(signal.SIGHUP, on_hup)

    def _reload_logged(self):
        try:
            reply = self.reload()
        except Exception:
            log.exception("reload failed")
            return
        if not reply.get("ok", True):
            log.error("%s", reply["error"])

    def reload(self):
        """Re-read the configuration. With errors: refuse, change nothing, reply with them
        (FILE:LINE each). Otherwise diff the tables (ids, hence connections, survive for what did
        not change), move health checks over (checkers of unchanged real servers keep running)
        and swap the iptables rules in one transaction."""
        with self._reload_lock:
            res = kparser.parse_file(self.config_path)
            for w in res.warnings:
                log.warning("%s", w)
            if res.errors:
                errors = [str(e) for e in res.errors]
                log.error("reload refused: %d error(s) in %s; still running the previous "
                          "configuration", len(errors), self.config_path)
                return {"ok": False, "errors": errors,
                        "error": "reload refused, the configuration has errors:\n" + "\n".join(errors)}
            specs, notes = specs_from_config(res.config)
            for n in notes:
                log.warning("%s", n)
            self._replace_rules(specs, keep_current=True)   # new real servers' replies first
            with self.lock:
                old = list(self.tw.specs.values())
                try:
                    changes = self.tw.sync(specs) + _real_server_changes(old, specs)
                except ValueError as e:
                    self.tw.sync(old)
                    return {"ok": False, "error": f"reload refused: {e}"}
                changes += self._apply_synproxy(res.config)
                if self.health:
                    for change in self.health.update(res.config, specs):
                        self._apply_health(*change)
            warning = self._replace_rules(specs)
            self.model, self.notes = res.config, notes
            log.info("reload of %s: %s", self.config_path, "; ".join(changes) or "no service changed")
            reply = {"changes": changes, "notes": notes}
            if warning:
                reply["warning"] = warning
            return reply

    def _replace_rules(self, specs, keep_current=False):
        """Swap the iptables matches for `specs` (plus the current ones with keep_current)."""
        if not self.rules:
            return None
        matches = self._matches(specs)
        if keep_current:
            matches = list(self.rules.matches) + matches
        matches = list(dict.fromkeys(matches))
        if matches == list(self.rules.matches):
            return None
        try:
            self.rules.replace(matches)
        except Exception as e:     # the tables are right; say the rules are not
            log.error("iptables rules not updated: %s", e)
            return f"iptables rules not updated: {e}"
        return None

    def _live_handlers(self):
        return {
            "reload": lambda req: self.reload(),
            "edit-real": self._h_edit_real,
            "add-real": self._h_add_real,
            "del-real": self._h_del_real,
            "set-timeout": self._h_set_timeout,
            "health": lambda req: {"health": self.health.status() if self.health else []},
        }

    def _req_keys(self, req):
        """(service key, real server key) of an edit request: {"service": ["TCP", VIP, PORT] or
        ["FWM", MARK], "real": [ADDR, PORT or null]}. Raises ValueError naming what is wrong."""
        s, r = req.get("service"), req.get("real")
        if not isinstance(s, list) or not s or not isinstance(r, list) or len(r) != 2:
            raise ValueError('expected "service": [PROTO, VIP, PORT] | ["FWM", MARK] and '
                             '"real": [ADDR, PORT]')
        if str(s[0]).upper() == "FWM" and len(s) == 2:
            skey = ("FWM", int(s[1]))
        elif str(s[0]).upper() in ("TCP", "UDP") and len(s) == 3:
            skey = (str(s[0]).upper(), str(ipaddress.ip_address(s[1])), int(s[2]))
        else:
            raise ValueError(f"bad service {s!r}")
        spec = self.tw.specs.get(skey)
        if spec is None:
            raise ValueError(f"no such service {' '.join(map(str, skey))}")
        port = spec.port if r[1] is None else int(r[1])
        if not 0 <= port <= 65535:
            raise ValueError(f"bad port {port}")
        return skey, (str(ipaddress.ip_address(r[0])), port), spec

    @staticmethod
    def _req_weight(req, default=None):
        w = req.get("weight", default)
        if w is None:
            raise ValueError("missing weight")
        w = int(w)
        if not 0 <= w <= 65535:
            raise ValueError(f"weight {w} out of range 0..65535")
        return w

    def _h_edit_real(self, req):
        """ipvsadm -e: a real server's weight, at once, until the next reload."""
        with self.lock:
            skey, dkey, spec = self._req_keys(req)
            w = self._req_weight(req)
            if not any(d.key == dkey for d in spec.dests):
                raise ValueError(f"no such real server {dkey[0]}:{dkey[1]} in {spec.name()}")
            self.tw.set_weight(skey, dkey, w)
            if self.health:
                for change in self.health.edited(skey, dkey, w):
                    self._apply_health(*change)
        log.info("edit-real %s -> %s:%d weight %d", spec.name(), dkey[0], dkey[1], w)
        return {"changes": [f"weight of {dkey[0]}:{dkey[1]} in {spec.name()} set to {w}"]}

    def _h_add_real(self, req):
        """ipvsadm -a: a real server without health checks, until the next reload."""
        from control.apply import DestSpec
        fwd = req.get("fwd", "masq")
        if fwd != "masq":
            raise ValueError(f"forwarding method {fwd!r} not supported (lvs-dp forwards masq/NAT)")
        with self.lock:
            skey, dkey, spec = self._req_keys(req)
            w = self._req_weight(req, 1)
            if any(d.key == dkey for d in spec.dests):
                raise ValueError(f"real server {dkey[0]}:{dkey[1]} already exists in {spec.name()}")
            spec.dests.append(DestSpec(dkey[0], dkey[1], w, spec.fwd))
            try:
                self.tw.sync(list(self.tw.specs.values()))
            except ValueError:
                spec.dests.pop()
                self.tw.sync(list(self.tw.specs.values()))
                raise
            specs = list(self.tw.specs.values())
        warning = self._replace_rules(specs)
        log.info("add-real %s -> %s:%d weight %d", spec.name(), dkey[0], dkey[1], w)
        reply = {"changes": [f"added {dkey[0]}:{dkey[1]} weight {w} to {spec.name()}"]}
        if warning:
            reply["warning"] = warning
        return reply

    def _h_del_real(self, req):
        """ipvsadm -d: remove a real server (configured or added), until the next reload."""
        with self.lock:
            skey, dkey, spec = self._req_keys(req)
            keep = [d for d in spec.dests if d.key != dkey]
            if len(keep) == len(spec.dests):
                raise ValueError(f"no such real server {dkey[0]}:{dkey[1]} in {spec.name()}")
            spec.dests[:] = keep
            self.tw.sync(list(self.tw.specs.values()))
            specs = list(self.tw.specs.values())
        warning = self._replace_rules(specs)
        log.info("del-real %s -> %s:%d", spec.name(), dkey[0], dkey[1])
        reply = {"changes": [f"removed {dkey[0]}:{dkey[1]} from {spec.name()}"]}
        if warning:
            reply["warning"] = warning
        return reply

    def _h_set_timeout(self, req):
        """ipvsadm --set TCP TCPFIN UDP: seconds, 0 leaves a value unchanged."""
        slots = (("tcp", C.IP_VS_TCP_S_ESTABLISHED), ("tcpfin", C.IP_VS_TCP_S_FIN_WAIT),
                 ("udp", C.IP_VS_UDP_S_NORMAL))
        vals = {}
        for name, _ in slots:
            v = int(req.get(name, 0))
            if not 0 <= v <= 365 * 86400:
                raise ValueError(f"{name} timeout {v} out of range")
            vals[name] = v
        with self.lock:
            for name, state in slots:
                if vals[name]:
                    self.cfg.timeouts_ns[state] = vals[name] * C.NS
        snap_t = {name: int(self.cfg.timeouts_ns[state] // C.NS) for name, state in slots}
        log.info("set-timeout %s", snap_t)
        return {"timeouts": snap_t}

    def _metrics_text(self):
        from control import metrics
        with self.lock:
            snap = self.snapshot()
        return metrics.render(snap, self.health.status() if self.health else None)


def _real_server_changes(old, new):
    """Lines naming the real servers a reload adds, removes or re-weights in kept services."""
    lines, before = [], {s.key: s for s in old}
    for spec in new:
        prev = before.get(spec.key)
        if prev is None:
            continue
        od, nd = {d.key: d for d in prev.dests}, {d.key: d for d in spec.dests}
        for k in nd.keys() - od.keys():
            lines.append(f"added real server {k[0]}:{k[1]} to {spec.name()}")
        for k in od.keys() - nd.keys():
            lines.append(f"removed real server {k[0]}:{k[1]} from {spec.name()}")
        for k in nd.keys() & od.keys():
            if nd[k].weight != od[k].weight:
                lines.append(f"weight of {k[0]}:{k[1]} in {spec.name()}: {od[k].weight} -> "
                             f"{nd[k].weight}")
    return sorted(lines)


def resolve_group(group):
    """--socket-group: a group name or number -> gid (None stays None)."""
    if group is None:
        return None
    if str(group).isdigit():
        return int(group)
    import grp
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"--socket-group: no group named {group!r}") from None


def run(config_path, socket_path, backend, queues, queue_base, instance, max_conns,
        metrics=None, socket_group=None, lport_range=(T.LPORT_LO, T.LPORT_HI),
        expire_nodest_conn=False, synproxy=None, fnat_timestamp="strip", gso=True):
    try:
        gid = resolve_group(socket_group)
    except ValueError as e:
        print(f"lvs-dp: {e}")
        return 2
    d = Daemon(config_path, socket_path, backend, queues, queue_base, instance, max_conns,
               allow_gid=gid, metrics_addr=metrics, lport_range=lport_range,
               expire_nodest_conn=expire_nodest_conn, synproxy_overrides=synproxy,
               fnat_timestamp=fnat_timestamp, gso=gso)
    d.install_signals()
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
