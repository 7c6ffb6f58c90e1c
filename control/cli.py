"""The `lvs-dp` command: run, check, list (and later reload, edit). Subcommands delegate to their
modules; this file only wires arguments."""

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="lvs-dp", description="userspace LVS: NAT, FULLNAT, SYN-proxy")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("check", help="parse a keepalived.conf and summarise it (like keepalived -t)")
    c.add_argument("config")

    args = p.parse_args(argv)
    if args.cmd == "check":
        from control import check
        return check.run(args.config)
    return 2


if __name__ == "__main__":
    sys.exit(main())
