"""Prometheus metrics: an opt-in text endpoint (``lvs-dp run --metrics ADDR:PORT``).

`render` is pure: it turns a Daemon snapshot (the dict `lvs-dp list --json` prints) and the health
manager's status into the text exposition format (version 0.0.4). `MetricsServer` serves it on
``GET /metrics`` from an http.server thread; every scrape takes a fresh snapshot, nothing is
cached and nothing on the packet path waits for it.

Names, labels and where each value comes from::

    lvsdp_service_connections_total{service}             snapshot services[].stats.conns
    lvsdp_service_packets_total{service,direction}       .inpkts / .outpkts (direction in|out)
    lvsdp_service_bytes_total{service,direction}         .inbytes / .outbytes
    lvsdp_real_connections_total{service,real}           services[].reals[].stats (same fields)
    lvsdp_real_packets_total / lvsdp_real_bytes_total{service,real,direction}
    lvsdp_real_active_connections{service,real}          .active   (ipvsadm ActiveConn)
    lvsdp_real_inactive_connections{service,real}        .inactive (InActConn)
    lvsdp_real_persistent_connections{service,real}      .persist  (templates pointing at it)
    lvsdp_real_weight{service,real}                      .weight as listed (0 when inhibited)
    lvsdp_real_available{service,real}                   the data plane may schedule it
    lvsdp_real_health_up{service,real}                   health: all its checkers pass (also for
                                                         real servers the listing hides)
    lvsdp_checker_up{service,real,checker,where}         health: one checker's verdict
    lvsdp_service_quorum_up{service}, lvsdp_service_sorry_server_active{service}
    lvsdp_dataplane_drops_total{reason}                  every DROP_* reason (dataplane/consts.py)
    lvsdp_dataplane_events_total{counter}                the engine's other counters
    lvsdp_dataplane_connections, lvsdp_dataplane_templates
    lvsdp_worker_connections{queue}, lvsdp_worker_conn_new_total{queue},
    lvsdp_worker_fnat_reply_no_conn_total{queue}         one worker's share (--queues N)
    lvsdp_queue_waiting{queue}                           packets waiting in the kernel queue
    lvsdp_queue_dropped_total{queue,by}                  by="kernel" (queue full) | "socket"
    lvsdp_queue_counter_total{queue,counter}             the backend's own counters
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading

log = logging.getLogger("lvs-dp.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Families:
    """Collects samples per metric family, prints HELP/TYPE once per family."""

    def __init__(self):
        self.order = []
        self.meta = {}
        self.samples = {}

    def add(self, name, kind, help_, labels, value):
        if name not in self.meta:
            self.order.append(name)
            self.meta[name] = (kind, help_)
            self.samples[name] = []
        lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
        self.samples[name].append(f"{name}{{{lab}}} {int(value)}" if lab else f"{name} {int(value)}")

    def text(self) -> str:
        out = []
        for name in self.order:
            kind, help_ = self.meta[name]
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out += self.samples[name]
        return "\n".join(out) + "\n"


def service_label(svc) -> str:
    """ipvsadm's spelling: ``TCP 172.16.1.100:80``, ``FWM 1``."""
    if svc.get("fwmark"):
        return f"FWM {svc['fwmark']}"
    return f"{svc['proto']} {svc['addr']}:{svc['port']}"


def _svc_label_of_key(skey) -> str:
    if skey[0] == "FWM":
        return f"FWM {skey[1]}"
    return f"{skey[0]} {skey[1]}:{skey[2]}"


def render(snap: dict, health: list | None = None) -> str:
    f = _Families()
    f.add("lvsdp_up", "gauge", "1 while lvs-dp answers", {}, 1)
    for svc in snap.get("services", []):
        s = {"service": service_label(svc)}
        st = svc.get("stats", {})
        f.add("lvsdp_service_connections_total", "counter", "connections scheduled", s,
              st.get("conns", 0))
        for d, k in (("in", "inpkts"), ("out", "outpkts")):
            f.add("lvsdp_service_packets_total", "counter", "packets", {**s, "direction": d},
                  st.get(k, 0))
        for d, k in (("in", "inbytes"), ("out", "outbytes")):
            f.add("lvsdp_service_bytes_total", "counter", "bytes", {**s, "direction": d},
                  st.get(k, 0))
        for r in svc.get("reals", []):
            lab = {**s, "real": f"{r['addr']}:{r['port']}"}
            rst = r.get("stats", {})
            f.add("lvsdp_real_connections_total", "counter", "connections scheduled", lab,
                  rst.get("conns", 0))
            for d, k in (("in", "inpkts"), ("out", "outpkts")):
                f.add("lvsdp_real_packets_total", "counter", "packets", {**lab, "direction": d},
                      rst.get(k, 0))
            for d, k in (("in", "inbytes"), ("out", "outbytes")):
                f.add("lvsdp_real_bytes_total", "counter", "bytes", {**lab, "direction": d},
                      rst.get(k, 0))
            f.add("lvsdp_real_active_connections", "gauge", "active connections (ActiveConn)",
                  lab, r.get("active", 0))
            f.add("lvsdp_real_inactive_connections", "gauge",
                  "inactive connections (InActConn)", lab, r.get("inactive", 0))
            f.add("lvsdp_real_persistent_connections", "gauge", "persistence templates", lab,
                  r.get("persist", 0))
            f.add("lvsdp_real_weight", "gauge", "weight as listed", lab, r.get("weight", 0))
            f.add("lvsdp_real_available", "gauge", "1 while the data plane may schedule it",
                  lab, 1 if r.get("available") else 0)
    for pool in health or ():
        for sk in pool.get("skeys", []):
            s = {"service": _svc_label_of_key(sk)}
            f.add("lvsdp_service_quorum_up", "gauge", "1 while the quorum is met", s,
                  1 if pool.get("quorum_up") else 0)
            f.add("lvsdp_service_sorry_server_active", "gauge", "1 while the sorry server is in use",
                  s, 1 if pool.get("sorry_active") else 0)
        for real in pool.get("reals", []):
            for sk, dk in real.get("targets", []):
                lab = {"service": _svc_label_of_key(sk), "real": f"{dk[0]}:{dk[1]}"}
                f.add("lvsdp_real_health_up", "gauge", "1 while every checker of it passes", lab,
                      1 if real.get("alive") else 0)
                for c in real.get("checkers", []):
                    f.add("lvsdp_checker_up", "gauge", "1 while the checker passes",
                          {**lab, "checker": c["kind"], "where": c["where"]}, 1 if c["up"] else 0)
    dp = snap.get("dataplane", {})
    for reason, v in dp.get("drops", {}).items():
        f.add("lvsdp_dataplane_drops_total", "counter", "packets dropped, by reason",
              {"reason": reason}, v)
    for name, v in dp.get("counters", {}).items():
        f.add("lvsdp_dataplane_events_total", "counter", "data plane event counters",
              {"counter": name}, v)
    f.add("lvsdp_dataplane_connections", "gauge", "entries in the connection tables", {},
          dp.get("conns", 0))
    f.add("lvsdp_dataplane_templates", "gauge", "persistence templates", {}, dp.get("templates", 0))
    for w in dp.get("per_worker", ()):
        lab = {"queue": str(w["queue"])}
        f.add("lvsdp_worker_connections", "gauge", "connections held by one worker", lab, w["conns"])
        f.add("lvsdp_worker_conn_new_total", "counter", "connections one worker created", lab,
              w["conn_new"])
        f.add("lvsdp_worker_fnat_reply_no_conn_total", "counter",
              "replies to a local address that found no connection in this worker", lab,
              w["fnat_reply_no_conn"])
    for q, qs in dp.get("queues", {}).items():
        lab = {"queue": q}
        f.add("lvsdp_queue_waiting", "gauge", "packets waiting in the kernel queue", lab,
              qs.get("queue_total", 0))
        f.add("lvsdp_queue_dropped_total", "counter", "packets the kernel dropped for this queue",
              {**lab, "by": "kernel"}, qs.get("queue_dropped", 0))
        f.add("lvsdp_queue_dropped_total", "counter", "packets the kernel dropped for this queue",
              {**lab, "by": "socket"}, qs.get("user_dropped", 0))
        skip = {"queue_total", "queue_dropped", "user_dropped", "queue_number", "peer_portid",
                "copy_mode", "copy_range", "id_sequence", "one", "overload"}
        for name, v in qs.items():
            if name not in skip and isinstance(v, int):
                f.add("lvsdp_queue_counter_total", "counter", "backend counters",
                      {**lab, "counter": name}, v)
    return f.text()


def parse_addr(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[V6]:PORT`` or ``:PORT`` (all addresses); port 0 picks a free one.
    Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--metrics: expected ADDR:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class MetricsServer:
    """``GET /metrics`` -> ``collect()``; anything else 404. One thread, daemonic."""

    def __init__(self, addr: str, collect):
        self.host, self.port = parse_addr(addr)
        self.collect = collect
        self.httpd = None
        self.thread = None

    def start(self) -> None:
        collect = self.collect

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404)
                    return
                try:
                    body = collect().encode()
                except Exception as e:          # a scrape must never take the daemon down
                    log.warning("metrics: %s: %s", type(e).__name__, e)
                    self.send_error(500, f"{type(e).__name__}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("metrics: " + fmt, *args)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        self.httpd = Server((self.host, self.port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="metrics", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
