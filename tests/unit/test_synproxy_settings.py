"""SYN-proxy settings from the outside in: the names an operator uses (`lvs-dp run --synproxy`,
the config's ``synproxy { }`` block), their precedence, and proof that they reach the data
plane: a changed setting changes the packets the engine emits, at start and on reload.
(The parser's diagnostics are in test_parser.py.)"""

import pytest
from scapy.all import IP, TCP

from control import cli
from control import synproxy_settings as SPS
from control.daemon import Daemon
from control.synproxy_settings import SynproxySettings
from dataplane import consts as C
from dataplane import synproxy as SP
from dataplane.batch import Batch
from tests.unit.test_pipeline import CLIENT, NOW, VIP

CONF = """{block}
virtual_server 172.16.1.100 80 {{
    protocol TCP
    lb_algo rr
    lb_kind NAT
    syn_proxy
    real_server 172.16.2.13 80 {{
        weight 1
    }}
}}
"""


def conf(path, block=""):
    path.write_text(CONF.format(block=block))
    return str(path)


# --- names --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expect", [
    ("net.ipv4.vs.synproxy_init_mss=1200", ("init_mss", 1200)),
    ("net/ipv4/vs/synproxy_sack=0", ("sack", 0)),
    ("synproxy_ack_skb_store_thresh=5", ("ack_store_max", 5)),
    ("syn_retry=1", ("syn_retry", 1)),
    ("rs_syn_max_retry=2", ("syn_retry", 2)),          # DPVS's keyword
    ("timestamp=off", ("timestamp", 0)),
    ("synproxy_conn_reuse_last_ack=on", ("conn_reuse_last_ack", 1)),
])
def test_assignment_names(text, expect):
    assert SPS.parse_assignment(text) == expect


@pytest.mark.parametrize("text, msg", [
    ("synproxy_bogus=1", "expected NAME=VALUE"),
    ("init_mss", "expected NAME=VALUE"),
    ("init_mss=big", "init_mss: invalid number 'big'"),
    ("synproxy_syn_retry=7", "synproxy_syn_retry: 7 is outside 0..6"),
    ("sack=2", "sack: invalid value '2' (expected on|off)"),
])
def test_assignment_errors(text, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        SPS.parse_assignment(text)


def test_cli_run_collects_synproxy_overrides(monkeypatch, tmp_path):
    got = {}

    def fake_run(*args, **kw):
        got.update(kw)
        return 0
    monkeypatch.setattr("control.daemon.run", fake_run)
    path = conf(tmp_path / "k.conf")
    assert cli.main(["run", path, "--synproxy", "net.ipv4.vs.synproxy_init_mss=1200",
                     "--synproxy", "sack=off", "--synproxy", "init_mss=1100"]) == 0
    assert got["synproxy"] == {"init_mss": 1100, "sack": 0}        # the last one wins
    assert cli.main(["run", path]) == 0 and got["synproxy"] == {}
    with pytest.raises(SystemExit, match="bad --synproxy synproxy_syn_retry: 9 is outside 0..6"):
        cli.main(["run", path, "--synproxy", "synproxy_syn_retry=9"])


# --- into the data plane ------------------------------------------------------------------------

def synack_mss(d):
    """Send a SYN (MSS 1460, timestamps) through the daemon's tables; the cookie SYN-ACK's MSS."""
    b = Batch(max_pkts=1)
    b.add(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S", seq=1000,
                                             options=[("MSS", 1460), ("SAckOK", b""),
                                                      ("Timestamp", (100, 0))])))
    v = b.run(d.cfg, d.workers[0], NOW)
    assert v[0] == C.VERDICT_REWRITE
    out = IP(b.packet(0))
    assert out[TCP].flags == "SA"
    return dict(out[TCP].options)


def test_file_then_command_line_then_reload_reach_the_packets(tmp_path):
    path = conf(tmp_path / "k.conf", "synproxy {\n    init_mss 1200\n    sack off\n}")
    d = Daemon(path, socket_path=str(tmp_path / "s"), max_conns=64)
    d.load()
    o = synack_mss(d)
    assert o["MSS"] == 1200 and "SAckOK" not in o
    assert d.snapshot()["synproxy"]["init_mss"] == 1200
    assert d.snapshot()["synproxy"]["syn_retry"] == 3               # untouched: the default
    # The command line overrides the file.
    d2 = Daemon(path, socket_path=str(tmp_path / "s2"), max_conns=64,
                synproxy_overrides={"init_mss": 1100})
    d2.load()
    assert synack_mss(d2)["MSS"] == 1100 and "SAckOK" not in synack_mss(d2)
    # A reload applies the file's new values and says what changed.
    conf(tmp_path / "k.conf", "synproxy {\n    init_mss 1300\n}")
    reply = d.reload()
    assert "synproxy init_mss: 1200 -> 1300" in reply["changes"]
    assert "synproxy sack: 0 -> 1" in reply["changes"]
    o = synack_mss(d)
    assert o["MSS"] == 1300 and "SAckOK" in o
    # ... but not over the command line's.
    assert d2.reload()["changes"] == ["synproxy sack: 0 -> 1"]
    assert synack_mss(d2)["MSS"] == 1100
    # A bad value refuses the reload and keeps the settings in force.
    conf(tmp_path / "k.conf", "synproxy {\n    init_mss -1\n}")
    reply = d.reload()
    assert reply["ok"] is False and "k.conf:2: synproxy init_mss: -1 is outside 0..65535" in reply["error"]
    assert synack_mss(d)["MSS"] == 1300 and d.cfg.sp_cfg[SP.SPC_INIT_MSS] == 1300


def test_no_block_means_the_patchs_defaults(tmp_path):
    d = Daemon(conf(tmp_path / "k.conf"), socket_path=str(tmp_path / "s"), max_conns=64)
    d.load()
    assert list(d.cfg.sp_cfg) == list(SynproxySettings().as_array())
    assert synack_mss(d)["MSS"] == 1452
    assert "SYN-proxy settings: init_mss=1452 " in cli.render_dataplane(d.snapshot())
