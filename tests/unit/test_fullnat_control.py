"""FULLNAT in the control plane: the timestamp mode reaches every FULLNAT service's flags, and
with several queues a FULLNAT-only VIP is steered by client port (replies by local port)."""

import pytest

from control import rules as R
from control.apply import DestSpec, ServiceSpec, TableWriter
from control.daemon import Daemon
from dataplane import consts as C
from dataplane import tables as T


def _specs():
    fnat = ServiceSpec(proto=C.IPPROTO_TCP, addr="172.16.1.100", port=80, fwd=C.FWD_FULLNAT,
                       dests=[DestSpec("172.16.2.13", 80, 1, C.FWD_FULLNAT)],
                       laddrs=["172.16.2.200"])
    fnat_udp = ServiceSpec(proto=C.IPPROTO_UDP, addr="172.16.1.100", port=53, fwd=C.FWD_FULLNAT,
                           dests=[DestSpec("172.16.2.13", 5353, 1, C.FWD_FULLNAT)],
                           laddrs=["172.16.2.200"])
    nat = ServiceSpec(proto=C.IPPROTO_TCP, addr="172.16.1.101", port=80,
                      dests=[DestSpec("172.16.2.14", 80, 1)])
    return [fnat, fnat_udp, nat]


@pytest.mark.parametrize("mode", ["strip", "translate"])
def test_timestamp_mode_sets_the_flag_on_fullnat_services_only(mode):
    cfg = T.new_config()
    tw = TableWriter(cfg, fnat_timestamp=mode)
    tw.sync(_specs())
    flags = {key: int(cfg.svc[sid]["flags"]) for key, sid in tw.svc_ids.items()}
    want = C.SVC_F_FNAT_TS_XLATE if mode == "translate" else 0
    assert flags[("TCP", "172.16.1.100", 80)] & C.SVC_F_FNAT_TS_XLATE == want
    assert flags[("UDP", "172.16.1.100", 53)] & C.SVC_F_FNAT_TS_XLATE == want
    assert flags[("TCP", "172.16.1.101", 80)] & C.SVC_F_FNAT_TS_XLATE == 0


def test_timestamp_mode_is_checked():
    with pytest.raises(ValueError):
        TableWriter(T.new_config(), fnat_timestamp="keep")


def test_fullnat_vip_steered_by_client_port_replies_by_local_port():
    matches = Daemon._matches(None, _specs())
    steer = {(m.direction, m.proto, m.addr, m.port): m.steer_key for m in matches}
    assert steer[("in", "tcp", "172.16.1.100", 80)] == "sport_hi"
    assert steer[("in", "udp", "172.16.1.100", 53)] == "sport_hi"
    assert steer[("out", "tcp", "172.16.2.13", 80)] == "dport"
    assert steer[("in", "tcp", "172.16.1.101", 80)] == "saddr"      # NAT: the client address
    chains = R.render_chains(matches, (0, 2), "t")
    pre = "\n".join(chains["LVSDP-PRE-t"])
    # client port bit 1 (Linux connects from even ports); ICMP errors by the quoted destination port
    assert '-d 172.16.1.100/32 -p tcp -m tcp --dport 80 -m u32 --u32 "0>>22&0x3C@0>>17&0x1=0x0"' in pre
    assert "0>>22&0x3C@8>>22&0x3C@8&0xFFFF>>1&0x1=0x1" in pre


def test_a_vip_shared_with_nat_keeps_client_address_steering():
    specs = _specs()
    specs[2].addr = "172.16.1.100"
    specs[2].port = 8080
    matches = Daemon._matches(None, specs)
    assert {m.steer_key for m in matches if m.direction == "in"} == {"saddr"}
    R.render_chains(matches, (0, 2), "t")       # one steering key per address: no conflict


def test_per_worker_counters_in_metrics_and_list_stats():
    from control import metrics as M
    from control.cli import render_dataplane
    workers = [{"queue": q, "conns": 2 + q, "conn_new": 10 * (q + 1), "packets": 99, "drops": 0,
                "fnat_reply_no_conn": q} for q in (0, 1)]
    snap = {"services": [], "dataplane": {"backend": "netlink", "workers": 2, "drops": {},
                                          "counters": {}, "conns": 5, "templates": 0,
                                          "queues": {}, "fnat_timestamp": "translate",
                                          "per_worker": workers}}
    text = M.render(snap, None)
    assert 'lvsdp_worker_conn_new_total{queue="1"} 20' in text
    assert 'lvsdp_worker_fnat_reply_no_conn_total{queue="1"} 1' in text
    out = render_dataplane(snap)
    assert "FULLNAT timestamps translate" in out
    assert out.splitlines()[-1].split() == ["1", "3", "20", "99", "0", "1"]
