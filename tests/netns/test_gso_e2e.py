"""GSO packets through the batched netlink backend, end to end in the seed lab (namespaces this
module creates and always removes): the lab's 50 MB /big downloaded and 50 MB uploaded through
NAT, then through FULLNAT with the PROXY protocol v2, sha256 compared at both ends, and proof
from the daemon's counters that packets larger than the MTU were queued whole (``gso_packets``)
and that their checksums were settled by the engine (``csum_settled``), none refused.

Over veth the senders' TSO bursts reach the balancer unsegmented, and their checksums offloaded
(CHECKSUM_PARTIAL): with NFQA_CFG_F_GSO the queue sees both (kernel-notes/nfqueue-path.md §3.3).
A wrong checksum anywhere would stall the transfers (the receivers drop the segments), a wrong
byte would change the digests."""

import os
import sys
import textwrap

import pytest

from control.lab import Lab, REPO_ROOT
from control.labrun import LvsDp
from tests.netns.clients import UPLOADER, start_upload_sink

pytestmark = pytest.mark.netns
EXAMPLES = REPO_ROOT / "examples"
LADDRS = ("172.16.2.200", "172.16.2.201")
SINK_PORT = 9000
MB50 = 50 << 20

def sink_service(kind, extra=""):
    return textwrap.dedent(f"""
        virtual_server 172.16.1.100 {SINK_PORT} {{
            lb_algo rr
            lb_kind {kind}
            protocol TCP
            {extra}
            real_server 172.16.2.13 {SINK_PORT} {{
                weight 1
            }}
        }}
        """)


@pytest.fixture(scope="module")
def lab():
    with Lab(f"gso{os.getpid() % 10000}", bulk_mb=50, replace=True) as lab:
        for a in LADDRS:
            lab.run("lb", f"ip addr add {a}/24 dev br0")
        start_upload_sink(lab)
        yield lab


def download(lab, port):
    r = lab.run("client", f"curl -sS --noproxy '*' --max-time 60 http://{lab.vip}:{port}/big"
                          f" | sha256sum", timeout=90)
    return r.stdout.split()[0]


def upload(lab):
    local_sha, remote_sha, n, client, peer = lab.run(
        "client", [sys.executable, "-c", UPLOADER, str(MB50 >> 20), "60"], timeout=120).stdout.split()
    return local_sha, remote_sha, int(n), client, peer


def gso_evidence(lb):
    dp = lb.snapshot()["dataplane"]
    queued = sum(q.get("gso_packets", 0) for q in dp["queues"].values())
    return queued, dp["counters"], dp["drops"]


def test_nat_bulk_both_ways_with_gso(lab, tmp_path):
    conf = tmp_path / "nat-gso.conf"
    conf.write_text((EXAMPLES / "seed-nat.conf").read_text() + sink_service("NAT"))
    with LvsDp(lab, conf) as lb:
        assert download(lab, 80) == lab.bulk_sha256
        local_sha, remote_sha, n, client, peer = upload(lab)
        queued, counters, drops = gso_evidence(lb)
        stats = lb.list("--stats")
    assert remote_sha == local_sha and n == MB50
    assert client == "-" and peer == lab.client_ip         # NAT: no header, the client's own address
    assert queued > 0 and counters["gso_packets"] == queued, (queued, counters)
    assert counters["csum_settled"] >= queued
    assert drops["csum_partial"] == 0 and drops["too_big"] == 0, drops
    assert "172.16.1.100:80" in stats


def test_fullnat_bulk_both_ways_with_gso_and_proxy_v2(lab, tmp_path):
    conf = tmp_path / "fnat-gso.conf"
    conf.write_text((EXAMPLES / "seed-fnat.conf").read_text()
                    + sink_service("FNAT", "laddr_group_name laddr_g1\n    proxy_protocol v2"))
    with LvsDp(lab, conf) as lb:
        assert download(lab, 8080) == lab.bulk_sha256      # nginx's PROXY v2 listener
        local_sha, remote_sha, n, client, peer = upload(lab)
        queued, counters, drops = gso_evidence(lb)
    assert remote_sha == local_sha and n == MB50
    assert client == lab.client_ip and peer in LADDRS      # the header names the client
    assert queued > 0 and counters["gso_packets"] == queued, (queued, counters)
    assert counters["csum_settled"] >= queued
    assert drops["csum_partial"] == 0 and drops["too_big"] == 0, drops
