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
    r.add_argument("-v", "--verbose", action="store_true")

    ls = sub.add_parser("list", help="list services like ipvsadm -L -n")
    ls.add_argument("-n", "--numeric", action="store_true", help="accepted; output is always numeric")
    g = ls.add_mutually_exclusive_group()
    g.add_argument("--stats", action="store_true")
    g.add_argument("--rate", action="store_true")
    g.add_argument("-c", "--connection", action="store_true")
    g.add_argument("--timeout", action="store_true")
    ls.add_argument("--exact", action="store_true")
    ls.add_argument("--json", action="store_true", help="the raw snapshot, dataplane counters included")
    ls.add_argument("--socket", default=_socket_default())

    args = p.parse_args(argv)
    if args.cmd == "check":
        from control import check
        return check.run(args.config)
    if args.cmd == "run":
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s lvs-dp %(levelname)s %(message)s")
        from control import daemon
        return daemon.run(args.config, args.socket, args.backend, args.queues, args.queue_base,
                          args.instance, args.max_conns)
    if args.cmd == "list":
        return _list(args)
    return 2


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
                 f"{dp.get('conns', 0)} connections, {dp.get('templates', 0)} templates"]
    lines.append("  Drops:")
    for name, v in dp.get("drops", {}).items():
        lines.append(f"    {name:<24}{v:>12}")
    lines.append("  Counters:")
    for name, v in dp.get("counters", {}).items():
        lines.append(f"    {name:<24}{v:>12}")
    for q, qs in dp.get("queues", {}).items():
        lines.append(f"  Queue {q}: waiting {qs.get('queue_total', 0)}, dropped by the kernel "
                     f"{qs.get('queue_dropped', 0)}, lost to the socket {qs.get('user_dropped', 0)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
