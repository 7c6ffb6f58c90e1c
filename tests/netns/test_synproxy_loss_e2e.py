"""50 MB each way through a SYN-proxied service with 1 % packet loss on the client's link, SACK
on: the SYN-proxy's sequence translation (and FULLNAT's, and the PROXY header's shift) under
retransmission, fast recovery and SACK, checked end to end by sha256.

This kernel has no netem, so the loss is iptables ``statistic --mode random`` DROP rules, one
per direction of the client's link (c-lb <-> lb-c), each where the packet has already left its
sender's TCP:

* balancer -> client: the client's INPUT (``-i c-lb``);
* client -> balancer: the far end of the link, the balancer's raw PREROUTING (``-i lb-c``),
  inserted before lvs-dp's jump, so a dropped segment never reaches the data plane. Not the
  client's OUTPUT: a netfilter drop on the local output path is reported to the sending TCP
  (-EPERM from ip_local_out), which sends the same segment again a moment later -- a delay,
  not a loss (measured: ~450 such drops in a 50 MB upload, 10-60 retransmissions).

Both ends of the client's link send one segment per skb (``gso_max_segs 1`` on c-lb and lb-c):
otherwise the client's TCP, and the balancer forwarding the GSO packets it now queues whole
(NFQA_CFG_F_GSO), send 64 KB bursts and one rule hit would drop ~45 segments at once.

What the loss does on each transfer:

* download (nginx -> client): data segments are lost, the real server retransmits, SACK blocks
  travel client -> RS (translated by -seq_delta_out) and the retransmissions travel back
  (+seq_delta_out); some of the client's ACKs are lost.
* upload (client -> sink): the client's data segments are lost before the balancer; the sink's
  duplicate ACKs with SACK blocks (translated RS -> client, and FULLNAT's PROXY-header shift)
  are what the client recovers with; some of them are lost too.

Asserted: both sha256 match, the DROP rules hit, the senders really retransmitted and ran SACK
recovery, no SACK block was discarded as invalid (a mistranslated block would be), and lvs-dp
counted no drop beyond the handshake's expected ones. Every load is bounded (curl --max-time,
socket timeouts); the lab, its rules and daemons go at the end, also on failure."""

import os
import re
import textwrap

import pytest

from control.lab import Lab, REPO_ROOT
from control.labrun import LvsDp
from tests.netns.clients import UPLOADER, start_upload_sink

pytestmark = pytest.mark.netns
EXAMPLES = REPO_ROOT / "examples"
LADDRS = ("172.16.2.200", "172.16.2.201")
LOSS = "0.01"
UPLOAD_PORT = 9000
UPLOAD_MB = 50
# Drops lvs-dp may count on a lossy link: client segments that arrive while the real server's
# handshake is in progress (ack_store_max of them are held; further data beyond that count as
# synproxy_synsend_qlen, retransmissions and pure ACKs as synproxy_syn_sent; the client
# retransmits them).
EXPECTED_DROPS = {"synproxy_syn_sent", "synproxy_synsend_qlen"}


def _upload_service(kind):
    extra = "laddr_group_name laddr_g1\n    proxy_protocol v2\n    " if kind == "FNAT" else ""
    return textwrap.dedent(f"""
        virtual_server 172.16.1.100 {UPLOAD_PORT} {{
            lb_algo rr
            lb_kind {kind}
            protocol TCP
            syn_proxy
            {extra}real_server 172.16.2.13 {UPLOAD_PORT} {{
                weight 1
            }}
        }}
        """)


def synproxy_config(kind, dst):
    """The seed config of lb_kind `kind` with `syn_proxy` on every TCP service (FNAT: 80 and the
    PROXY v2 service 8080), plus a SYN-proxied upload service on port 9000 (FNAT: PROXY v2)."""
    src = EXAMPLES / ("seed-fnat.conf" if kind == "FNAT" else "seed-nat.conf")
    blocks = re.split(r"(?m)^(?=virtual_server )", src.read_text())
    out = []
    for b in blocks:
        if b.startswith("virtual_server") and re.search(r"\n\s*protocol TCP\b", b):
            b = re.sub(rf"(\n(\s*)lb_kind {kind}\b[^\n]*)", r"\1\n\2syn_proxy", b, count=1)
            assert "syn_proxy" in b
        out.append(b)
    dst.write_text("".join(out) + _upload_service(kind))
    return dst


def tcp_counters(lab, key):
    """{'TcpRetransSegs': n, 'TcpExtTCPSackRecovery': n, ...} of namespace `key` (its own
    /proc/net/snmp and /proc/net/netstat, read from inside it)."""
    text = lab.run(key, "cat /proc/net/snmp /proc/net/netstat").stdout.splitlines()
    out = {}
    for names, values in zip(text[0::2], text[1::2]):
        pfx, names = names.split(":", 1)
        _, values = values.split(":", 1)
        for k, v in zip(names.split(), values.split()):
            if v.lstrip("-").isdigit():
                out[pfx + k] = int(v)
    return out


def delta(after, before):
    return {k: after[k] - before.get(k, 0) for k in after}


# where -> (namespace, table, chain, match): balancer -> client, client -> balancer.
LOSS_RULES = {
    "to_client": ("client", "filter", "INPUT", "-i c-lb -s 172.16.1.100"),
    "to_balancer": ("lb", "raw", "PREROUTING", "-i lb-c -d 172.16.1.100"),
}


def _loss_rule(where):
    ns, table, chain, match = LOSS_RULES[where]
    rule = f"-p tcp {match} -m statistic --mode random --probability {LOSS} -j DROP"
    return ns, table, chain, rule


def add_loss_rules(lab):
    for where in LOSS_RULES:
        ns, table, chain, rule = _loss_rule(where)
        lab.run(ns, f"iptables -w -t {table} -I {chain} 1 {rule}")


def remove_loss_rules(lab):
    for where in LOSS_RULES:
        ns, table, chain, rule = _loss_rule(where)
        lab.run(ns, f"iptables -w -t {table} -D {chain} {rule}", check=False)


def loss_rule_hits(lab):
    """Packets each loss rule dropped so far: {'to_client': n, 'to_balancer': n}."""
    hits = {}
    for where in LOSS_RULES:
        ns, table, chain, _ = _loss_rule(where)
        out = lab.run(ns, f"iptables -w -t {table} -L {chain} -v -x -n").stdout
        m = re.search(r"^\s*(\d+)\s+\d+\s+DROP\s.*statistic", out, re.M)
        hits[where] = int(m.group(1)) if m else -1
    return hits


@pytest.fixture(scope="module")
def lossy_lab():
    with Lab(f"spl{os.getpid() % 10000}", bulk_mb=50, replace=True) as lab:
        for a in LADDRS:
            lab.run("lb", f"ip addr add {a}/24 dev br0")
        for key in ("client", "rs3", "rs4"):
            assert lab.sysctl(key, "net.ipv4.tcp_sack", 1) == "1"
        lab.run("client", "ip link set dev c-lb gso_max_segs 1")
        lab.run("lb", "ip link set dev lb-c gso_max_segs 1")
        yield lab


@pytest.mark.parametrize("kind", ["FNAT", "NAT"])
def test_50mb_each_way_with_1pct_loss_and_sack(lossy_lab, kind, tmp_path):
    lab = lossy_lab
    conf = synproxy_config(kind, tmp_path / f"{kind.lower()}-sp-loss.conf")
    sink = start_upload_sink(lab, name=f"upload-sink-{kind}")
    try:
        with LvsDp(lab, conf) as lb:
            add_loss_rules(lab)         # after lvs-dp's jump: the balancer's goes before it
            hits0 = loss_rule_hits(lab)
            before = {k: tcp_counters(lab, k) for k in ("client", "rs3", "rs4")}
            # Download: FNAT through the PROXY v2 listener (8080), NAT through port 80.
            port = 8080 if kind == "FNAT" else 80
            r = lab.run("client", f"curl -sS --noproxy '*' --max-time 60 "
                                  f"http://{lab.vip}:{port}/big | sha256sum", timeout=90)
            assert r.stdout.split()[0] == lab.bulk_sha256, r.stderr
            mid = {k: tcp_counters(lab, k) for k in ("client", "rs3", "rs4")}
            out = lab.python("client", ["-c", UPLOADER, str(UPLOAD_MB), "60"], timeout=90).stdout
            after = {k: tcp_counters(lab, k) for k in ("client", "rs3", "rs4")}
            hits = {k: v - hits0[k] for k, v in loss_rule_hits(lab).items()}
            snap = lb.snapshot()["dataplane"]
    finally:
        remove_loss_rules(lab)
        lab.stop(sink)
    local_sha, remote_sha, n, client, peer = out.split()
    assert remote_sha == local_sha and int(n) == UPLOAD_MB << 20
    if kind == "FNAT":
        assert client == lab.client_ip and peer in LADDRS
    else:
        assert client == "-" and peer == lab.client_ip
    # The loss happened, both ways, and the senders recovered from it with SACK.
    assert hits["to_client"] > 100 and hits["to_balancer"] > 100, hits
    down = delta(mid["rs3"], before["rs3"])
    d4 = delta(mid["rs4"], before["rs4"])
    down = {k: down[k] + d4.get(k, 0) for k in down}
    up = delta(after["client"], mid["client"])
    print(f"{kind}: loss rule hits {hits}")
    shown = ("TcpOutSegs", "TcpRetransSegs", "TcpExtTCPSackRecovery", "TcpExtTCPSACKDiscard",
             "TcpExtTCPSACKReneging", "TcpExtTCPTimeouts", "TcpExtTCPLossProbes",
             "TcpExtTCPDSACKRecv")
    for name, d in (("download (real server)", down), ("upload (client)", up)):
        print(name, {k: d[k] for k in shown})
    assert down["TcpRetransSegs"] > 0 and down["TcpExtTCPSackRecovery"] > 0, down
    assert up["TcpRetransSegs"] > 0 and up["TcpExtTCPSackRecovery"] > 0, up
    for d in (down, up):
        assert d["TcpExtTCPSACKDiscard"] == 0 and d["TcpExtTCPSACKReneging"] == 0, d
    # lvs-dp dropped nothing it should not have.
    unexpected = {k: v for k, v in snap["drops"].items() if v and k not in EXPECTED_DROPS}
    print(f"{kind}: lvs-dp drops {snap['drops']}")
    assert unexpected == {}, snap["drops"]
    # At most an initial window per connection (two transfers).
    assert snap["drops"]["synproxy_syn_sent"] + snap["drops"]["synproxy_synsend_qlen"] <= 2 * 20
    assert snap["counters"]["synproxy_rs_synack"] >= 2
