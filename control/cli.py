"""The `lvs-dp` command: run, check, list. Subcommands delegate to their modules; this file only
wires arguments."""

import argparse
import json
import logging
import os
import sys

from control import api


def _socket_default():
    return os.environ.get("LVSDP_SOCKET", api.DEFAULT_SOCKET)


def main(argv=None):
    p = argparse.ArgumentParser(prog="lvs-dp", description="userspace LVS: NAT, FULLNAT, SYN-proxy")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("check", help="parse a keepalived.conf and summarise it (like keepalived -t)")
    c.add_argument("config")

    r = sub.add_parser("run", help="run the balancer in the foreground")
    r.add_argument("config")
    r.add_argument("--socket", default=_socket_default(), help="control socket path")
    r.add_argument("--backend", choices=["netlink", "nfqueue"], default="netlink",
                   help="netlink: batched, no per-packet Python (default); nfqueue: the "
                        "netfilterqueue package")
    r.add_argument("--queues", type=int, default=1, help="workers, one NFQUEUE queue each")
    r.add_argument("--queue-base", type=int, default=0, help="first queue number")
    r.add_argument("--instance", default="default",
                   help="name for this instance's iptables chains (several may share a host)")
    r.add_argument("--max-conns", type=int, default=1 << 20, help="connections per worker")
    r.add_argument("--lport-range", default="5000-65535", metavar="LO-HI",
                   help="FULLNAT local ports per local address (default %(default)s; keep it "
                        "apart from net.ipv4.ip_local_port_range if the balancer's own sockets "
                        "use a local address)")
    r.add_argument("--expire-nodest-conn", action="store_true",
                   help="when a health check takes a real server out, expire its connections "
                        "(IPVS's expire_nodest_conn): their next packet gets a RST from the "
                        "balancer and the client reconnects to a live one; default: they "
                        "continue, as with IPVS")
    r.add_argument("--synproxy", action="append", default=[], metavar="NAME=VALUE",
                   help="a SYN-proxy setting, by the patched kernel's sysctl name "
                        "(net.ipv4.vs.synproxy_init_mss=1452, or synproxy_init_mss=1452, or "
                        "init_mss=1452); repeatable; overrides the config's synproxy { } block, "
                        "also across reloads")
    r.add_argument("--fnat-timestamp", choices=["strip", "translate"], default="strip",
                   help="FULLNAT TCP timestamps towards the real servers: strip them from the "
                        "SYN (default; the patched kernel's fullnat_timestamp_remove_entry 1) or "
                        "translate them onto one clock per local address, so the real servers "
                        "keep timestamps (RTT, PAWS) without tripping PAWS on reused tuples")
    r.add_argument("--no-gso", dest="gso", action="store_false",
                   help="netlink backend: do not set NFQA_CFG_F_GSO, so the kernel segments GSO "
                        "packets and finishes offloaded checksums before queueing (slower for "
                        "bulk TCP; kernel-notes/nfqueue-path.md §3.3)")
    r.add_argument("-v", "--verbose", action="store_true")
    r.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics (off by default)")
    r.add_argument("--socket-group", metavar="GROUP",
                   help="members of GROUP (primary group) may use the control socket too")

    ls = sub.add_parser("list", help="list services like ipvsadm -L -n")
    ls.add_argument("-n", "--numeric", action="store_true", help="accepted; output is always numeric")
    g = ls.add_mutually_exclusive_group()
    g.add_argument("--stats", action="store_true")
    g.add_argument("--rate", action="store_true")
    g.add_argument("-c", "--connection", action="store_true")
    g.add_argument("--timeout", action="store_true")
    g.add_argument("-G", "--laddr", action="store_true",
                   help="FULLNAT local addresses (DPVS's ipvsadm -G layout)")
    ls.add_argument("--exact", action="store_true")
    ls.add_argument("--json", action="store_true", help="the raw snapshot, dataplane counters included")
    ls.add_argument("--socket", default=_socket_default())

    _add_live_parsers(sub)

    args = p.parse_args(argv)
    if args.cmd == "check":
        from control import check
        return check.run(args.config)
    if args.cmd == "run":
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s lvs-dp %(levelname)s %(message)s")
        from control import daemon
        synproxy = synproxy_overrides(args.synproxy)
        return daemon.run(args.config, args.socket, args.backend, args.queues, args.queue_base,
                          args.instance, args.max_conns, metrics=args.metrics,
                          socket_group=args.socket_group, lport_range=_port_range(args.lport_range),
                          expire_nodest_conn=args.expire_nodest_conn, synproxy=synproxy,
                          fnat_timestamp=args.fnat_timestamp, gso=args.gso)
    if args.cmd == "list":
        return _list(args)
    if args.cmd in LIVE_COMMANDS:
        return _live(args)
    return 2


def _port_range(text):
    try:
        lo, hi = (int(x) for x in text.split("-"))
        if not 1 <= lo <= hi <= 65535:
            raise ValueError
    except ValueError:
        raise SystemExit(f"lvs-dp: bad --lport-range {text!r}: want LO-HI within 1-65535") from None
    return lo, hi


def synproxy_overrides(items):
    """``--synproxy NAME=VALUE`` arguments -> {field: int} (the last of a name wins);
    SystemExit naming the bad one."""
    from control.synproxy_settings import parse_assignment
    out = {}
    for text in items:
        try:
            field, value = parse_assignment(text)
        except ValueError as e:
            raise SystemExit(f"lvs-dp: bad --synproxy {e}") from None
        out[field] = value
    return out


def _list(args):
    try:
        reply = api.request(args.socket, {"cmd": "list", "conns": bool(args.connection or args.json)})
    except OSError as e:
        print(f"lvs-dp: cannot reach the daemon at {args.socket}: {e}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"lvs-dp: {reply.get('error')}", file=sys.stderr)
        return 1
    snap = reply["snapshot"]
    if args.json:
        print(json.dumps(snap, indent=2))
        return 0
    from control import render
    if args.laddr:
        sys.stdout.write(render.render_laddr(snap))
        return 0
    sys.stdout.write(render.render_list(snap, stats=args.stats, rate=args.rate, exact=args.exact,
                                        conns=args.connection, timeout=args.timeout))
    if args.stats:
        sys.stdout.write(render_dataplane(snap))
    return 0


def render_dataplane(snap):
    """The data plane's own counters after ipvsadm's --stats table (which stays byte-identical
    above it): every drop reason, the engine counters and the kernel's queue counters."""
    dp = snap.get("dataplane", {})
    lines = ["", f"Data plane ({dp.get('backend')}, {dp.get('workers')} worker(s)): "
                 f"{dp.get('conns', 0)} connections, {dp.get('templates', 0)} templates"
                 + (f", FULLNAT timestamps {dp['fnat_timestamp']}" if "fnat_timestamp" in dp else "")]
    lines.append("  Drops:")
    for name, v in dp.get("drops", {}).items():
        lines.append(f"    {name:<24}{v:>12}")
    lines.append("  Counters:")
    for name, v in dp.get("counters", {}).items():
        lines.append(f"    {name:<24}{v:>12}")
    sp = snap.get("synproxy")
    if sp:
        lines.append("  SYN-proxy settings: " + " ".join(f"{k}={v}" for k, v in sp.items()))
    if len(dp.get("per_worker", ())) > 1:
        lines.append(f"  Workers:{'queue':>8}{'conns':>12}{'conn_new':>12}{'packets':>12}{'drops':>12}"
                     f"{'fnat_reply_no_conn':>20}")
        for w in dp["per_worker"]:
            lines.append(f"{'':10}{w['queue']:>6}{w['conns']:>12}{w['conn_new']:>12}{w['packets']:>12}"
                         f"{w['drops']:>12}{w['fnat_reply_no_conn']:>20}")
    for q, qs in dp.get("queues", {}).items():
        lines.append(f"  Queue {q}: waiting {qs.get('queue_total', 0)}, dropped by the kernel "
                     f"{qs.get('queue_dropped', 0)}, lost to the socket {qs.get('user_dropped', 0)}")
    return "\n".join(lines) + "\n"


# --- live operation: reload, ipvsadm-style edits, health (issue 6) ---------------------------------
LIVE_COMMANDS = ("reload", "edit-real", "add-real", "del-real", "set-timeout", "health")


def _add_live_parsers(sub):
    rl = sub.add_parser("reload", help="re-read the configuration (like SIGHUP); refused, with "
                                       "the errors, if it has any")
    rl.add_argument("--socket", default=_socket_default())
    for name, help_ in (("add-real", "add a real server (ipvsadm -a)"),
                        ("edit-real", "change a real server's weight (ipvsadm -e)"),
                        ("del-real", "remove a real server (ipvsadm -d)")):
        e = sub.add_parser(name, help=help_ + "; until the next reload")
        svc = e.add_mutually_exclusive_group(required=True)
        svc.add_argument("-t", "--tcp-service", metavar="VIP:PORT")
        svc.add_argument("-u", "--udp-service", metavar="VIP:PORT")
        svc.add_argument("-f", "--fwmark-service", metavar="MARK", type=int)
        e.add_argument("-r", "--real-server", metavar="ADDR[:PORT]", required=True)
        if name != "del-real":
            e.add_argument("-w", "--weight", type=int, required=name == "edit-real")
        if name == "add-real":
            fwd = e.add_mutually_exclusive_group()
            fwd.add_argument("-m", "--masquerading", dest="fwd", action="store_const",
                             const="masq", default="masq")
            fwd.add_argument("-g", "--gatewaying", dest="fwd", action="store_const", const="droute")
            fwd.add_argument("-i", "--ipip", dest="fwd", action="store_const", const="tunnel")
        e.add_argument("--socket", default=_socket_default())
    st = sub.add_parser("set-timeout", help="connection timeouts in seconds, 0 = unchanged "
                                            "(ipvsadm --set)")
    st.add_argument("tcp", type=int)
    st.add_argument("tcpfin", type=int)
    st.add_argument("udp", type=int)
    st.add_argument("--socket", default=_socket_default())
    h = sub.add_parser("health", help="health-check state of every real server (JSON)")
    h.add_argument("--socket", default=_socket_default())


def split_addr_port(text, what):
    """``ADDR[:PORT]`` or ``[V6][:PORT]`` -> (addr, port or None); SystemExit on nonsense."""
    import ipaddress
    addr, port = text, None
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        if rest:
            port = rest.lstrip(":")
    elif text.count(":") == 1:
        addr, port = text.split(":")
    try:
        addr = str(ipaddress.ip_address(addr))
        port = int(port) if port not in (None, "") else None
    except ValueError:
        raise SystemExit(f"lvs-dp: bad {what} {text!r}") from None
    return addr, port


def _live_request(args):
    if args.cmd == "reload":
        return {"cmd": "reload"}
    if args.cmd == "health":
        return {"cmd": "health"}
    if args.cmd == "set-timeout":
        return {"cmd": "set-timeout", "tcp": args.tcp, "tcpfin": args.tcpfin, "udp": args.udp}
    if args.fwmark_service is not None:
        service = ["FWM", args.fwmark_service]
    else:
        proto = "TCP" if args.tcp_service else "UDP"
        addr, port = split_addr_port(args.tcp_service or args.udp_service, "service")
        if port is None:
            raise SystemExit("lvs-dp: the service needs a port (VIP:PORT)")
        service = [proto, addr, port]
    req = {"cmd": args.cmd, "service": service,
           "real": list(split_addr_port(args.real_server, "real server"))}
    if getattr(args, "weight", None) is not None:
        req["weight"] = args.weight
    if args.cmd == "add-real":
        req["fwd"] = args.fwd
    return req


def _live(args):
    req = _live_request(args)
    try:
        reply = api.request(args.socket, req, timeout=60)
    except OSError as e:
        print(f"lvs-dp: cannot reach the daemon at {args.socket}: {e}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"lvs-dp: {reply.get('error')}", file=sys.stderr)
        return 1
    if args.cmd == "health":
        print(json.dumps(reply["health"], indent=2))
        return 0
    if args.cmd == "set-timeout":
        t = reply["timeouts"]
        print(f"Timeout (tcp tcpfin udp): {t['tcp']} {t['tcpfin']} {t['udp']}")
        return 0
    for line in reply.get("changes", []):
        print(line)
    if args.cmd == "reload" and not reply.get("changes"):
        print("reloaded: no service changed")
    for line in reply.get("notes", []):
        print(f"note: {line}", file=sys.stderr)
    if reply.get("warning"):
        print(f"lvs-dp: warning: {reply['warning']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
