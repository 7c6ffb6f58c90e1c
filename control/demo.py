"""`make demo`: the seed lab end to end. Builds the four namespaces, runs `lvs-dp run` on the
seed's keepalived.conf in the balancer, curls the VIP from the client, shows `lvs-dp list`, and
tears everything down (also on Ctrl-C or failure)."""

import argparse
import sys
import time

from control.lab import Lab, cleanup_prefix
from control.labrun import LvsDp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config", nargs="?", default="examples/seed-nat.conf")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--backend", default="netlink", choices=["netlink", "nfqueue"])
    args = ap.parse_args(argv)

    cleanup_prefix("demo")
    with Lab("demo") as lab:
        print(f"lab up: client {lab.client_ip}, VIP {lab.vip}, real servers "
              f"{', '.join(lab.rs_ips.values())} (namespaces demo-*)")
        t0 = time.monotonic()
        with LvsDp(lab, args.config, backend=args.backend) as lb:
            print(f"lvs-dp run {args.config}: answering after {time.monotonic() - t0:.1f} s\n")
            bodies = []
            for _ in range(args.requests):
                body = lab.curl(f"http://{lab.vip}/").stdout.strip()
                bodies.append(body)
                print(f"[client]$ curl http://{lab.vip}\n{body}")
            print("\n[balancer]$ lvs-dp list -n")
            print(lb.list(), end="")
            print("\n[balancer]$ lvs-dp list -n --stats")
            print(lb.list("--stats"), end="")
        servers = [b for b in bodies if "Server3" in b or "Server4" in b]
        alternates = all(servers[i] != servers[i + 1] for i in range(len(servers) - 1))
        if len(servers) != len(bodies) or not alternates:
            print("demo FAILED: responses did not alternate between Server3 and Server4",
                  file=sys.stderr)
            return 1
    print("\ndemo OK: responses alternate Server3/Server4; lab torn down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
