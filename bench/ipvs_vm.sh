#!/usr/bin/env bash
# Kernel IPVS against netfilter NAT in an emulated guest whose kernel has IPVS (this machine's has
# none): stages control/lab.py and bench/labkit.py, runs the same lab modes (IpvsMode,
# KernelNatMode) in alternating rounds inside one guest run, and writes bench/ipvs-vm.json, which
# bench/report.py shows as "kernel IPVS (emulated guest)". Software emulation: ratios only.
#   bench/ipvs_vm.sh            (needs /work/shared/tools/ipvs-vm/run; a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${IPVS_VM_RUN:-/work/shared/tools/ipvs-vm/run}
stage=$(mktemp -d /tmp/lvsdp-ipvsvm.XXXX); trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/src/control" "$stage/src/bench"
cp control/lab.py "$stage/src/control/"; touch "$stage/src/control/__init__.py" "$stage/src/bench/__init__.py"
cp bench/labkit.py "$stage/src/bench/"
cat > "$stage/guest.sh" <<'GUEST'
set -e
cd /src
nproc; uname -r
python3 -m bench.labkit --modes kernel-nat,kernel-ipvs --metrics http_keepalive,http_keepalive_seg,http_close,bulk_tcp \
    --rounds 3 --seconds 4 --bulk-mb 8 --json /tmp/ipvs.json > /tmp/out.txt 2>&1 || { tail -50 /tmp/out.txt; exit 1; }
echo "JSON-BEGIN"; cat /tmp/ipvs.json; echo "JSON-END"
GUEST
IPVS_VM_TIMEOUT=${IPVS_VM_TIMEOUT:-1500} "$RUN" "$stage/guest.sh" "$stage/src" > "$stage/out.txt"
python3 - "$stage/out.txt" bench/ipvs-vm.json <<'PY'
import json, sys
t = open(sys.argv[1]).read()
head = t.split("JSON-BEGIN")[0].strip().splitlines()
out = {"source": "/work/shared/tools/ipvs-vm/run bench/ipvs_vm.sh (QEMU TCG guest: ratios only, absolute numbers meaningless)",
       "guest_nproc": int(head[0]), "guest_kernel": head[1],
       "summaries": json.loads(t.split("JSON-BEGIN")[1].split("JSON-END")[0])}
json.dump(out, open(sys.argv[2], "w"), indent=1)
print("wrote", sys.argv[2])
PY
