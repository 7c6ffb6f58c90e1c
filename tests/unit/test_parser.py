"""The keepalived.conf parser (control/parser.py), its model and ``lvs-dp check``.

Three kinds of tests, as for any reader of foreign input:
* every sample keepalived ships parses with zero errors, and the ones with interesting shapes give
  exact counts and values;
* broken files give the exact diagnostic, at the exact FILE:LINE, every one of them;
* arbitrary or mutilated input never raises, and the same file read whole, with CRLF line ends or
  through an include gives the same services.
The samples come from Debian's keepalived package (CI installs it); without them the sample tests
fail rather than skip, so a bare CI image cannot pass vacuously.
"""

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from control import check
from control.model import Config, Diagnostic, Url, expand_range
from control.parser import parse_file, parse_text

SAMPLES = Path("/usr/share/doc/keepalived/samples")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MISSING = "keepalived samples missing: install keepalived (apt-get install keepalived); CI does"


def _sample_names():
    if not SAMPLES.is_dir():
        return ["<missing>"]
    # keepalived.conf.* only: the directory also holds shell scripts (sample.misccheck.smbcheck.sh,
    # sample_notify_fifo.sh.gz) that are not configurations.
    return sorted(p.name for p in SAMPLES.iterdir() if p.name.startswith("keepalived.conf"))


def _sample(name):
    if not SAMPLES.is_dir():
        pytest.fail(MISSING)
    return parse_file(str(SAMPLES / name))


def _strs(diags):
    return [str(d) for d in diags]


# --- samples -------------------------------------------------------------------------------------------


def test_samples_present():
    if not SAMPLES.is_dir():
        pytest.fail(MISSING)
    assert len(_sample_names()) >= 20, _sample_names()


@pytest.mark.parametrize("name", _sample_names())
def test_sample_parses_without_errors(name):
    if name == "<missing>":
        pytest.fail(MISSING)
    r = _sample(name)
    assert r.errors == [], _strs(r.errors)


# name: (virtual servers, real servers, concrete services, vrrp_instances)
SAMPLE_COUNTS = {
    "keepalived.conf.sample": (1, 1, 1, 1),
    "keepalived.conf.SSL_GET": (2, 2, 2, 1),
    "keepalived.conf.SMTP_CHECK": (1, 3, 1, 0),
    "keepalived.conf.quorum": (1, 10, 1, 0),
    "keepalived.conf.virtual_server_group": (1, 2, 13, 0),
    "keepalived.conf.fwmark": (1, 2, 1, 0),
    "keepalived.conf.IPv6": (1, 1, 1, 0),
    "keepalived.conf.vrrp": (0, 0, 0, 4),
    "keepalived.conf.vrrp.localcheck": (0, 0, 0, 9),
    "keepalived.conf.vrrp.lvs_syncd": (1, 1, 1, 3),
    "keepalived.conf.conditional_conf": (0, 0, 0, 1),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_COUNTS))
def test_sample_counts(name):
    c = _sample(name).config
    got = (len(c.services), c.real_server_count, len(list(c.concrete_services())),
           len(c.vrrp_instances))
    assert got == SAMPLE_COUNTS[name]


def test_sample_values():
    c = _sample("keepalived.conf.sample").config
    vs = c.services[0]
    assert (vs.addr, vs.port, vs.protocol, vs.lb_algo, vs.lb_kind) == ("10.10.10.2", 1358, "TCP", "rr", "NAT")
    assert (vs.delay_loop, vs.persistence_timeout, vs.sorry_server) == (6, 50, ("192.168.200.200", 1358))
    ck = vs.real_servers[0].checkers[0]
    assert (ck.kind, ck.connect_timeout, ck.retry, ck.delay_before_retry, ck.delay_loop) == \
        ("HTTP_GET", 3, 3, 3, 6)
    assert ck.urls[0].path == "/testurl3/test.jsp"
    assert ck.urls[0].digest == "640205b7b0fc66c1ea91c463fac6334d"
    assert c.global_defs["router_id"] == "LVS_DEVEL"
    assert c.global_defs["notification_email"] == ("acassen",)
    assert c.vrrp_instances["VI_1"].virtual_ipaddresses == ("192.168.200.11", "192.168.200.12",
                                                            "192.168.200.13")


def test_sample_status_codes():
    urls = _sample("keepalived.conf.status_code").config.services[0].real_servers[0].checkers[0].urls
    assert urls[0].status_code == ((200, 299), (400, 499), (503, 503), (505, 505))
    assert urls[1].status_code == ((200, 200),)
    assert urls[0].accepts(404) and not urls[0].accepts(500) and urls[0].accepts(505)


def test_sample_quorum():
    vs = _sample("keepalived.conf.quorum").config.services[0]
    assert (vs.lb_algo, vs.quorum, vs.hysteresis, vs.alpha, vs.omega) == ("wrr", 7, 2, True, True)
    assert vs.quorum_up == "/usr/local/sbin/quorum-up.sh"
    assert [rs.port for rs in vs.real_servers] == [8080] * 10
    assert {ck.connect_port for rs in vs.real_servers for ck in rs.checkers} == {80}
    assert all(rs.alpha for rs in vs.real_servers)        # inherited from the virtual server


def test_sample_fwmark_and_group():
    c = _sample("keepalived.conf.fwmark").config
    vs = c.services[0]
    assert (vs.fwmark, vs.addr, vs.name) == (1, None, "FWM 1")
    assert [(rs.addr, rs.port) for rs in vs.real_servers] == [("192.168.201.100", None),
                                                               ("192.168.201.101", None)]
    c = _sample("keepalived.conf.virtual_server_group").config
    grp = c.groups["VSG_1"]
    assert [(m.addr, m.port, m.fwmark) for m in grp.members] == [
        ("10.0.0.1", 8080, None), ("10.0.0.2", 80, None), ("192.168.200.1", 1358, None),
        ("192.168.200.3-10", 80, None), (None, None, 1), (None, None, 2)]
    names = [s.name for s in c.concrete_services()]
    assert names[3:5] == ["TCP 192.168.200.3:80", "TCP 192.168.200.4:80"]
    assert names[-2:] == ["FWM 1", "FWM 2"]
    assert {s.group for s in c.concrete_services()} == {"VSG_1"}


def test_sample_ipv6_smtp_misc():
    c = _sample("keepalived.conf.IPv6").config
    assert c.groups["IPv6_group"].members[0].addresses == tuple(f"ae00::{i}" for i in range(2, 10))
    assert c.services[0].name == "TCP [ae00::1]:80"
    rs = _sample("keepalived.conf.SMTP_CHECK").config.services[0].real_servers
    assert [len(r.checkers[0].hosts) for r in rs] == [0, 3, 3]
    h = rs[2].checkers[0].hosts[2]
    assert (h.connect_ip, h.connect_port, h.bindto) == ("64.233.167.100", 587, None)
    assert rs[0].checkers[0].helo_name == "foo.bar.com"
    ck = _sample("keepalived.conf.misc_check_arg").config.services[0].real_servers[0].checkers[0]
    assert (ck.misc_path, ck.retry) == ("/usr/local/bin/script.sh arg1 arg2", 0)   # MISC default 0


def test_sample_vrrp_kept():
    c = _sample("keepalived.conf.vrrp.sync").config
    assert c.vrrp_sync_groups["G1"].group == ("VI_1", "VI_2", "VI_5", "VI_6", "VI_7", "VI_8", "VI_9")
    assert c.vrrp_sync_groups["G2"].group == ("VI_3", "VI_4")
    c = _sample("keepalived.conf.vrrp.lvs_syncd").config        # pre-1.3 sync group syntax
    assert c.vrrp_sync_groups["VG1"].group == ("VI_2", "VI_3")
    c = _sample("keepalived.conf.vrrp.localcheck").config
    assert len(c.vrrp_scripts) == 5
    assert c.vrrp_scripts["chk_sshd"].script == "killall -0 sshd"
    assert c.vrrp_instances["VI_1"].tree.find("track_script") is not None
    c = _sample("keepalived.conf.vrrp.rules").config               # invalid rule kept, not judged
    assert "to 192.168.100./24 table 1" in c.static_rules
    assert len(_sample("keepalived.conf.track_interface").config.static_routes) == 4


def test_sample_conditional_config():
    path = str(SAMPLES / "keepalived.conf.conditional_conf")
    if not SAMPLES.is_dir():
        pytest.fail(MISSING)
    high = parse_file(path, config_id="high").config
    low = parse_file(path, config_id="low").config
    assert (high.vrrp_instances["VI_0"].priority, low.vrrp_instances["VI_0"].priority) == ("170", "85")
    assert high.vrrp_scripts["check_VI_0"].script == "/etc/keepalived/scripts/check_high_VI_0.sh"
    assert [n.text for n in high.other] == ["net_namespace high"]
    assert parse_file(path, config_id="neither").config.vrrp_instances["VI_0"].priority is None


@pytest.mark.parametrize("name", ["keepalived.conf.sample", "keepalived.conf.SMTP_CHECK",
                                  "keepalived.conf.virtual_server_group", "keepalived.conf.quorum"])
def test_sample_same_through_include_and_crlf(name, tmp_path):
    """The same configuration read three ways gives the same services (file names aside)."""
    direct = _sample(name).config
    (tmp_path / "main.conf").write_text(f"include {SAMPLES / name}\n")
    via_include = parse_file(str(tmp_path / "main.conf"))
    crlf = parse_text((SAMPLES / name).read_text().replace("\n", "\r\n"), str(SAMPLES / name))
    assert via_include.errors == [] and crlf.errors == []
    assert via_include.config.services == direct.services
    assert crlf.config == direct


# --- broken configurations: exact diagnostics -------------------------------------------------------------

NAT = """\
virtual_server 10.0.0.1 80 {
    protocol TCP
    lb_algo rr
    real_server 10.0.0.2 80 {
        weight 1
    }
}
"""


def test_valid_minimal():
    r = parse_text(NAT, "t.conf")
    assert (r.errors, r.warnings) == ([], [])
    vs = r.config.services[0]
    assert (vs.name, vs.file, vs.line, vs.real_servers[0].line) == ("TCP 10.0.0.1:80", "t.conf", 1, 4)


def test_unclosed_block_names_opening_line():
    r = parse_text(NAT.rsplit("}", 1)[0], "t.conf")     # drop the last '}'
    assert _strs(r.errors) == ["t.conf:6: missing '}': block 'virtual_server' opened at line 1 "
                               "is not closed"]
    r = parse_text("global_defs {\n}\n" + NAT.replace("        weight 1\n    }\n", "        weight 1\n"),
                   "t.conf")
    assert _strs(r.errors) == ["t.conf:8: missing '}': block 'virtual_server' opened at line 3 "
                               "is not closed"]


def test_stray_closing_brace():
    r = parse_text(NAT + "}\n", "t.conf")
    assert _strs(r.errors) == ["t.conf:8: unbalanced '}': no block is open here"]
    assert len(r.config.services) == 1          # what came before is intact


def test_stray_opening_brace():
    r = parse_text("{\n  foo\n}\n" + NAT, "t.conf")
    assert _strs(r.errors) == ["t.conf:1: unexpected '{' (no keyword before it)"]
    assert len(r.config.services) == 1


def test_bad_port():
    r = parse_text(NAT.replace("10.0.0.1 80", "10.0.0.1 80x"), "t.conf")
    assert _strs(r.errors) == ["t.conf:1: virtual_server: invalid port '80x' (expected 1-65535)"]
    assert r.config.services == ()
    r = parse_text(NAT.replace("10.0.0.2 80", "10.0.0.2 65536"), "t.conf")
    assert _strs(r.errors) == ["t.conf:4: real_server: invalid port '65536' (expected 1-65535)"]


def test_bad_ip():
    r = parse_text(NAT.replace("10.0.0.2 80", "10.0.0.300 80"), "t.conf")
    assert _strs(r.errors) == ["t.conf:4: real_server: invalid IP address '10.0.0.300'"]
    r = parse_text(NAT.replace("10.0.0.1 80", "10.0.1 80"), "t.conf")
    assert _strs(r.errors) == ["t.conf:1: virtual_server: invalid IP address '10.0.1'"]


def test_unknown_lb_algo_and_lb_kind():
    r = parse_text(NAT.replace("lb_algo rr", "lvs_sched fastest\n    lb_kind MASQ"), "t.conf")
    assert _strs(r.errors) == [
        "t.conf:3: lvs_sched: unknown scheduler 'fastest' (expected rr, wrr, lc, wlc, lblc, lblcr, "
        "dh, sh, sed, nq, mh, fo, ovf, twos)",
        "t.conf:4: lb_kind: unknown forwarding method 'MASQ' (expected NAT, DR, TUN or FNAT)"]


def test_weight_out_of_range():
    r = parse_text(NAT.replace("weight 1", "weight -1"), "t.conf")
    assert _strs(r.errors) == ["t.conf:5: weight: -1 is out of range (0-2147483647)"]


FNAT = """\
local_address_group laddr_g1 { 192.168.100.1  192.168.100.2-4 }
virtual_server 172.16.1.100 80 {
    protocol TCP
    lb_algo wrr
    lb_kind FNAT
    laddr_group_name laddr_g1
    syn_proxy
    real_server 172.16.2.13 80 {
        weight 3
    }
}
"""


def test_fnat_with_local_address_group():
    r = parse_text(FNAT, "t.conf")
    assert (r.errors, r.warnings) == ([], [])
    c = r.config
    assert c.local_address_groups == {"laddr_g1": ("192.168.100.1", "192.168.100.2", "192.168.100.3",
                                                   "192.168.100.4")}
    vs = c.services[0]
    assert (vs.lb_kind, vs.laddr_group_name, vs.syn_proxy) == ("FNAT", "laddr_g1", True)
    assert vs.real_servers[0].lb_kind == "FNAT"
    assert parse_text(FNAT.replace("FNAT", "FULLNAT"), "t.conf").config == c   # alias


def test_fnat_without_laddr_group():
    r = parse_text(FNAT.replace("    laddr_group_name laddr_g1\n", ""), "t.conf")
    assert _strs(r.errors) == ["t.conf:2: virtual_server 172.16.1.100:80: lb_kind FNAT needs "
                               "laddr_group_name"]


def test_fnat_with_undefined_laddr_group():
    r = parse_text(FNAT.replace("laddr_group_name laddr_g1", "laddr_group_name nope"), "t.conf")
    assert _strs(r.errors) == ["t.conf:6: laddr_group_name nope: no local_address_group 'nope' "
                               "is defined"]


def test_laddr_group_defined_after_its_user():
    text = FNAT.split("\n", 1)[1] + FNAT.split("\n", 1)[0] + "\n"
    assert parse_text(text, "t.conf").errors == []


def test_every_error_reported():
    text = """\
virtual_server 10.0.0.1 80 {
    protocol TCP
    lb_algo nope
    delay_loop soon
    real_server 10.0.0.2 http {
        weight 1
    }
    real_server 10.0.0.3 80 {
        weight heavy
        TCP_CHECK {
            connect_port 0
            bindto 10.0.0
        }
    }
}
virtual_server_group G {
    10.0.1.1-300 80
}
virtual_server 10.0.0.9 80 {
    protocol ICMP
    real_server 10.0.0.2 80 {
"""
    r = parse_text(text, "t.conf")
    assert _strs(r.errors) == [
        "t.conf:3: lb_algo: unknown scheduler 'nope' (expected rr, wrr, lc, wlc, lblc, lblcr, dh, sh, "
        "sed, nq, mh, fo, ovf, twos)",
        "t.conf:4: delay_loop: invalid time 'soon' (seconds, more than 0)",
        "t.conf:5: real_server: invalid port 'http' (expected 1-65535)",
        "t.conf:9: weight: invalid number 'heavy'",
        "t.conf:11: connect_port: invalid port '0' (expected 1-65535)",
        "t.conf:12: bindto: invalid IP address '10.0.0'",
        "t.conf:17: virtual_server_group G: invalid address range '10.0.1.1-300'",
        "t.conf:20: protocol: unknown protocol 'ICMP' (expected TCP, UDP, SCTP)",
        "t.conf:21: missing '}': block 'real_server' opened at line 21 is not closed",
        "t.conf:21: missing '}': block 'virtual_server' opened at line 19 is not closed",
    ]
    assert all(d.severity == "error" for d in r.errors)


def test_include_error_names_included_file(tmp_path):
    (tmp_path / "rs").mkdir()
    (tmp_path / "rs" / "a.conf").write_text("real_server 10.0.0.2 80 {\n    weight 2\n}\n")
    (tmp_path / "rs" / "b.conf").write_text("real_server 10.0.0.3 80 {\n    weight abc\n}\n")
    (tmp_path / "main.conf").write_text(
        "virtual_server 10.0.0.1 80 {\n    protocol TCP\n    include rs/*.conf\n}\n")
    r = parse_file(str(tmp_path / "main.conf"))
    assert _strs(r.errors) == [f"{tmp_path}/rs/b.conf:2: weight: invalid number 'abc'"]
    rs = r.config.services[0].real_servers
    assert [(x.addr, x.weight, x.file, x.line) for x in rs] == [
        ("10.0.0.2", 2, f"{tmp_path}/rs/a.conf", 1), ("10.0.0.3", 1, f"{tmp_path}/rs/b.conf", 1)]


def test_include_unclosed_block_stays_in_its_file(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text("virtual_server 10.0.0.5 80 {\n  protocol UDP\n")
    (tmp_path / "main.conf").write_text("include conf.d/{a,b}.conf\n" + NAT)
    r = parse_file(str(tmp_path / "main.conf"))
    assert _strs(r.errors) == [f"{tmp_path}/conf.d/a.conf:2: missing '}}': block 'virtual_server' "
                               f"opened at line 1 is not closed"]
    assert [s.name for s in r.config.services] == ["TCP 10.0.0.1:80"]   # main.conf read on


def test_include_missing_and_loop(tmp_path):
    (tmp_path / "main.conf").write_text("include nothere.conf\ninclude conf.d/*.conf\ninclude main.conf\n")
    r = parse_file(str(tmp_path / "main.conf"))
    assert _strs(r.errors) == [
        f"{tmp_path}/main.conf:1: include 'nothere.conf': cannot read '{tmp_path}/nothere.conf': "
        f"No such file or directory",
        f"{tmp_path}/main.conf:3: include 'main.conf': '{tmp_path}/main.conf' includes itself"]
    assert _strs(r.warnings) == [f"{tmp_path}/main.conf:2: include 'conf.d/*.conf': no file matches"]


def test_several_keywords_on_one_line_warns():
    r = parse_text(NAT.replace("lb_algo rr", "delay_loop 6 lb_algo wrr")
                   .replace("weight 1", "weight 3 inhibit_on_failure"), "t.conf")
    assert r.errors == []
    assert _strs(r.warnings) == [
        "t.conf:3: 'lb_algo wrr' follows 'delay_loop 6' on the same line: keepalived ignores it, "
        "lvs-dp reads it",
        "t.conf:5: 'inhibit_on_failure' follows 'weight 3' on the same line: keepalived ignores it, "
        "lvs-dp reads it"]
    vs = r.config.services[0]
    assert (vs.delay_loop, vs.lb_algo) == (6, "wrr")
    assert (vs.real_servers[0].weight, vs.real_servers[0].inhibit_on_failure) == (3, True)


def test_block_on_one_line_is_not_a_warning():
    """keepalived splits a line at braces, so `{ weight 3 }` is one keyword per line for it too."""
    r = parse_text("virtual_server 10.0.0.1 80 { protocol UDP\n"
                   "  real_server 10.0.0.2 53 { weight 3 }\n}\n", "t.conf")
    assert (r.errors, r.warnings) == ([], [])
    assert r.config.services[0].real_servers[0].weight == 3
    assert r.config.services[0].protocol == "UDP"


def test_unknown_keyword_warns_and_skips_its_block():
    r = parse_text(NAT.replace("lb_algo rr", "lb_algo rr\n    bogus 1\n    FOO_CHECK {\n"
                                             "      weight 99\n    }"), "t.conf")
    assert r.errors == []
    assert _strs(r.warnings) == ["t.conf:4: unknown keyword 'bogus'",
                                 "t.conf:5: unknown keyword 'FOO_CHECK'"]
    assert r.config.services[0].real_servers[0].weight == 1


def test_keepalived_like_warnings():
    r = parse_text(NAT.replace("    protocol TCP\n", "") + FNAT.split("\n", 1)[0] + "\n"
                   "virtual_server fwmark 7 {\n  protocol TCP\n  laddr_group_name laddr_g1\n"
                   "  real_server 10.0.0.2 {\n  }\n}\n", "t.conf")
    assert r.errors == []
    assert _strs(r.warnings) == [
        "t.conf:1: virtual_server 10.0.0.1:80: no protocol; lvs-dp uses TCP (keepalived would use "
        "UDP), write 'protocol TCP'",
        "t.conf:8: virtual_server fwmark 7: protocol is ignored for a fwmark service",
        "t.conf:10: laddr_group_name: only used with lb_kind FNAT - ignored"]


def test_diagnostic_str():
    d = Diagnostic("a.conf", 12, "boom", "warning")
    assert str(d) == "a.conf:12: boom"


# --- syntax details -------------------------------------------------------------------------------------


def test_comments_quotes_and_brace_placement():
    text = """\
# hash comment
! bang comment
virtual_server 10.0.0.1 80        # trailing
{
    protocol tcp                  ! lower case is fine for the protocol, as in keepalived
    real_server 10.0.0.2 80
    {
        notify_up "/bin/notify 'up' # not a comment ! nor this"
        notify_down /bin/notify down now
        MISC_CHECK {
            misc_path "/bin/check \\"quoted\\"\\tx"
            user nobody nogroup
        }
    }
}
"""
    r = parse_text(text, "t.conf")
    assert (r.errors, r.warnings) == ([], [])
    rs = r.config.services[0].real_servers[0]
    assert r.config.services[0].protocol == "TCP"
    assert rs.notify_up == "/bin/notify 'up' # not a comment ! nor this"
    assert rs.notify_down == "/bin/notify down now"
    assert rs.checkers[0].misc_path == '/bin/check "quoted"\tx'
    assert rs.checkers[0].user == "nobody nogroup"


def test_parameters():
    text = "$VIP=10.9.9.9\n$RS= \\\nreal_server 10.0.0.${N} 80 { \\\n  weight ${N} \\\n}\n" \
           "virtual_server $VIP 80 {\n  protocol TCP\n  $N=2\n  $RS\n  $N=3\n  $RS\n}\n"
    r = parse_text(text, "t.conf")
    assert (r.errors, r.warnings) == ([], [])
    vs = r.config.services[0]
    assert vs.addr == "10.9.9.9"
    assert [(x.addr, x.weight) for x in vs.real_servers] == [("10.0.0.2", 2), ("10.0.0.3", 3)]


def test_inheritance_and_checker_defaults():
    text = """\
virtual_server 10.0.0.1 80 {
    protocol TCP
    real_server 10.0.0.2 80 {
        connect_timeout 7
        HTTP_GET {
            url { path / }
            nb_get_retry 4
        }
        DNS_CHECK {
            type A
        }
        TCP_CHECK {
            delay_loop 2
        }
    }
    retry 5
    weight 4
    delay_loop 10
    inhibit_on_failure
}
"""
    r = parse_text(text, "t.conf")
    assert (r.errors, r.warnings) == ([], [])
    rs = r.config.services[0].real_servers[0]
    assert (rs.weight, rs.inhibit_on_failure) == (4, True)
    http, dns, tcp = rs.checkers
    assert (http.retry, http.connect_timeout, http.delay_before_retry, http.delay_loop) == (4, 7, 3, 10)
    assert http.urls == (Url("t.conf", 6, "/"),)
    assert (dns.retry, dns.delay_before_retry, dns.extra) == (5, 10, {"type": ("A",)})
    assert (tcp.retry, tcp.delay_before_retry, tcp.delay_loop, tcp.connect_timeout) == (5, 1, 2, 7)


def test_scheduler_flags_and_ops():
    udp = NAT.replace("protocol TCP", "protocol UDP")
    vs = parse_text(udp.replace("lb_algo rr", "lb_algo sh\n    sh-port\n    ops"), "t.conf")\
        .config.services[0]
    assert (vs.lb_flags, vs.ops) == (("sh-port",), True)
    r = parse_text(udp.replace("lb_algo rr", "lb_algo sh\n    lb_flags sh-port one-packet"), "t.conf")
    assert _strs(r.warnings) == ["t.conf:4: lb_flags: keepalived 2.x has no 'lb_flags': write each flag "
                                 "as its own keyword (hashed, flag-1, flag-2, flag-3, sh-port, "
                                 "sh-fallback, mh-port, mh-fallback, ops)"]
    assert (r.config.services[0].lb_flags, r.config.services[0].ops) == (("sh-port",), True)
    r = parse_text(NAT.replace("lb_algo rr", "lb_algo rr\n    mh-port\n    ops"), "t.conf")
    assert _strs(r.warnings) == ["t.conf:4: mh-port: only applies to the mh scheduler, not rr - ignored",
                                 "t.conf:5: ops: one-packet scheduling needs protocol UDP - ignored"]
    assert (r.config.services[0].lb_flags, r.config.services[0].ops) == ((), False)


def test_expand_range():
    assert expand_range("10.0.0.254-255") == ("10.0.0.254", "10.0.0.255")
    assert expand_range("10.0.0.255-10.0.1.1") == ("10.0.0.255", "10.0.1.0", "10.0.1.1")
    assert len(expand_range("10.0.0.8/29")) == 8
    assert expand_range("ae00::fe-100") == ("ae00::fe", "ae00::ff", "ae00::100")
    for bad in ("10.0.0.5-3", "10.0.0.1-256", "10.0.0.1-x", "10.0.0.0/8", "nope"):
        with pytest.raises(ValueError):
            expand_range(bad)


def test_model_is_frozen_and_hashable():
    c = parse_text(FNAT, "t.conf").config
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.services[0].lb_algo = "rr"
    assert hash(c.services[0]) == hash(parse_text(FNAT, "t.conf").config.services[0])
    assert isinstance(c, Config)


def test_parses_are_independent():
    """No parse state outlives a parse: results do not depend on what was parsed before."""
    first = parse_text(FNAT, "t.conf")
    parse_text(NAT.replace("rr", "bogus") + "}\n", "other.conf")
    again = parse_text(FNAT, "t.conf")
    assert (first.config, first.errors, first.warnings) == (again.config, again.errors, again.warnings)


# --- robustness: nothing makes the parser raise ---------------------------------------------------

_WORDS = ["{", "}", "virtual_server", "real_server", "10.0.0.1", "80", "weight", "TCP_CHECK", "url",
          "path", "include", "\"q s\"", "'x", "#", "!", "@id", "$P=1", "$P", "fwmark", "group",
          "local_address_group", "lb_kind", "FNAT", "\n", "\n", "\n"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_WORDS), max_size=60))
def test_never_raises_on_keyword_soup(words):
    r = parse_text(" ".join(words), "t.conf")
    assert all(isinstance(d, Diagnostic) and d.file == "t.conf" for d in r.errors + r.warnings)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_any_text(text):
    parse_text(text, "t.conf")


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_dropping_a_brace_line_is_an_error(data):
    lines = NAT.splitlines()
    brace_lines = [i for i, l in enumerate(lines) if "{" in l or "}" in l]
    i = data.draw(st.sampled_from(brace_lines))
    r = parse_text("\n".join(lines[:i] + lines[i + 1:]) + "\n", "t.conf")
    assert r.errors, f"line {i + 1} removed"


# --- lvs-dp check -------------------------------------------------------------------------------


def test_check_valid_seed(capsys):
    assert check.run(str(EXAMPLES / "seed-nat.conf")) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0].endswith("seed-nat.conf: OK: 1 virtual server (1 service), 2 real servers, "
                             "0 warnings")
    assert any(l.startswith("TCP  172.16.1.100:80 rr  [") for l in lines)
    assert sum(l.startswith("  -> 172.16.2.1") and " Masq    10 " in l and "TCP_CHECK" in l
               for l in lines) == 2
    assert "parsed, not acted on by lvs-dp: vrrp_instance VI_1 (interface lb-c, 172.16.1.100)" in out


def test_check_lists_what_is_not_acted_on(capsys, tmp_path):
    if not SAMPLES.is_dir():
        pytest.fail(MISSING)
    assert check.run(str(SAMPLES / "keepalived.conf.SSL_GET")) == 0
    out = capsys.readouterr().out
    assert "parsed, not acted on by lvs-dp: SSL_GET checker (" in out
    (tmp_path / "dr.conf").write_text(NAT.replace("lb_algo rr", "lb_algo lblc\n    lb_kind DR"))
    assert check.run(str(tmp_path / "dr.conf")) == 0
    out = capsys.readouterr().out
    assert f"parsed, not acted on by lvs-dp: lb_kind DR (Route forwarding) ({tmp_path}/dr.conf:1)" in out
    assert "parsed, not acted on by lvs-dp: lb_algo lblc (scheduler not in the data plane)" in out
    assert " Route   1 " in out


def test_check_fnat_summary(capsys, tmp_path):
    (tmp_path / "f.conf").write_text(FNAT)
    assert check.run(str(tmp_path / "f.conf")) == 0
    out = capsys.readouterr().out
    assert "TCP  172.16.1.100:80 wrr syn_proxy laddr_group laddr_g1 (4 addresses)" in out
    assert "local_address_group laddr_g1: 4 addresses (192.168.100.1-192.168.100.4)" in out
    assert " FullNat 3 " in out


def test_check_errors_exit_1(capsys, tmp_path):
    p = tmp_path / "bad.conf"
    p.write_text(NAT.replace("lb_algo rr", "lb_algo rr\n    bogus").replace("80 {\n    protocol",
                                                                           "80x {\n    protocol"))
    assert check.run(str(p)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{p}:4: warning: unknown keyword 'bogus'",
        f"{p}:1: virtual_server: invalid port '80x' (expected 1-65535)",
        f"{p}: 1 error, 1 warning: not valid"]


def test_check_missing_file(capsys, tmp_path):
    assert check.run(str(tmp_path / "none.conf")) == 1
    assert "cannot read configuration: No such file or directory" in capsys.readouterr().err


# --- the examples other tests use ---------------------------------------------------------------


def test_example_seed_nat():
    r = parse_file(str(EXAMPLES / "seed-nat.conf"))
    assert (r.errors, r.warnings) == ([], [])
    c = r.config
    (vs,) = c.services
    assert (vs.addr, vs.port, vs.protocol, vs.lb_algo, vs.lb_kind, vs.delay_loop) == \
        ("172.16.1.100", 80, "TCP", "rr", "NAT", 6)
    assert vs.persistence_timeout is None
    assert [(rs.addr, rs.port, rs.weight) for rs in vs.real_servers] == [("172.16.2.13", 80, 10),
                                                                          ("172.16.2.14", 80, 10)]
    for rs in vs.real_servers:
        (ck,) = rs.checkers
        assert (ck.kind, ck.connect_timeout, ck.retry, ck.delay_before_retry, ck.connect_port,
                ck.delay_loop) == ("TCP_CHECK", 3, 3, 3, 80, 6)
    vi1, vi2 = c.vrrp_instances["VI_1"], c.vrrp_instances["VI_2"]
    assert (vi1.interface, vi1.virtual_ipaddresses, vi1.virtual_router_id) == \
        ("lb-c", ("172.16.1.100",), "51")
    assert (vi2.interface, vi2.virtual_ipaddresses, vi2.virtual_router_id) == \
        ("br0", ("172.16.2.100",), "52")


def test_example_seed_nat_wrr():
    r = parse_file(str(EXAMPLES / "seed-nat-wrr.conf"))
    assert (r.errors, r.warnings) == ([], [])
    (vs,) = r.config.services
    assert (vs.lb_algo, [rs.weight for rs in vs.real_servers]) == ("wrr", [3, 1])


def test_example_seed_udp():
    r = parse_file(str(EXAMPLES / "seed-udp.conf"))
    assert (r.errors, r.warnings) == ([], [])
    (vs,) = r.config.services
    assert (vs.protocol, vs.addr, vs.port, vs.lb_algo, vs.lb_kind) == ("UDP", "172.16.1.100", 53, "rr", "NAT")
    assert [(rs.addr, rs.port, rs.checkers) for rs in vs.real_servers] == [("172.16.2.13", 5353, ()),
                                                                           ("172.16.2.14", 5353, ())]


# --- synproxy { }: the patched kernel's SYN-proxy sysctls in the file ----------------------------------

SP_BLOCK = """synproxy {
    init_mss 1200
    sack off
    synproxy_wscale 7
    timestamp
    synack_ttl 60
    synproxy_defer on
    conn_reuse_fin_wait yes
    ack_store_max 5
    ack_storm_thresh 0
    rs_syn_max_retry 2
}
"""


def test_synproxy_block_every_spelling():
    r = parse_text(SP_BLOCK + FNAT, "k.conf")
    assert r.errors == [] and r.warnings == [], _strs(r.errors + r.warnings)
    assert r.config.synproxy == {"init_mss": 1200, "sack": 0, "wscale": 7, "timestamp": 1,
                                 "synack_ttl": 60, "defer": 1, "conn_reuse_fin_wait": 1,
                                 "ack_store_max": 5, "ack_storm_thresh": 0, "syn_retry": 2}
    # The full sysctl name works too, and no block means no values (the defaults apply).
    r = parse_text("synproxy {\n net.ipv4.vs.synproxy_init_mss 1400\n}\n", "k.conf")
    assert r.config.synproxy == {"init_mss": 1400} and r.errors == []
    assert parse_text(FNAT).config.synproxy == {}


def test_synproxy_block_bad_values_at_their_lines():
    text = ("synproxy {\n"              # 1
            "    init_mss 70000\n"      # 2  out of range (SynproxySettings' ranges)
            "    sack maybe\n"          # 3  not a boolean
            "    syn_retry\n"           # 4  missing value
            "    wscale 15\n"           # 5  above TCP_MAX_WSCALE
            "    ack_store_max six\n"   # 6  not a number
            "    synack_ttl 0\n"        # 7
            "    bogus 1\n"             # 8  unknown: a warning, as keepalived's
            "    defer { }\n"           # 9  no block allowed
            "    init_mss 1300 1400\n"  # 10 extra value: a warning; 1300 is used
            "}\n")
    r = parse_text(text, "k.conf")
    assert _strs(r.errors) == [
        "k.conf:2: synproxy init_mss: 70000 is outside 0..65535",
        "k.conf:3: synproxy sack: invalid value 'maybe' (expected on|off)",
        "k.conf:4: synproxy syn_retry: missing value",
        "k.conf:5: synproxy wscale: 15 is outside 0..14",
        "k.conf:6: synproxy ack_store_max: invalid number 'six'",
        "k.conf:7: synproxy synack_ttl: 0 is outside 1..255",
        "k.conf:9: synproxy defer: takes no { } block",
    ]
    assert [(d.line, d.message) for d in r.warnings] == [
        (8, "synproxy: unknown keyword 'bogus'"),
        (10, "synproxy init_mss: extra '1400' ignored")]
    assert r.config.synproxy == {"init_mss": 1300}
    assert _strs(parse_text("synproxy\n", "k.conf").errors) == ["k.conf:1: synproxy: needs a { } block"]


def test_check_reports_synproxy_settings_and_errors(capsys, tmp_path):
    (tmp_path / "s.conf").write_text("synproxy {\n  init_mss 1200\n  sack off\n}\n" + FNAT)
    assert check.run(str(tmp_path / "s.conf")) == 0
    assert "synproxy: init_mss 1200, sack off\n" in capsys.readouterr().out
    (tmp_path / "u.conf").write_text("synproxy {\n  syn_retry 1\n}\n" + NAT)
    assert check.run(str(tmp_path / "u.conf")) == 0
    assert "synproxy: syn_retry 1 (no virtual_server has syn_proxy)" in capsys.readouterr().out
    (tmp_path / "b.conf").write_text("synproxy {\n  syn_retry 9\n}\n" + FNAT)
    assert check.run(str(tmp_path / "b.conf")) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/b.conf:2: synproxy syn_retry: 9 is outside 0..6" in err


def test_synproxy_block_dpvs_sub_blocks():
    text = ("synproxy {\n"
            "    synack_options {\n"
            "        mss 1400\n"
            "        ttl 60\n"
            "        sack off\n"
            "        timestamp\n"
            "        window 9\n"             # 7: not one of DPVS's synack options here
            "    }\n"
            "    max_ack_saved 2\n"
            "    conn_reuse_state {\n"
            "        close\n"
            "        fin_wait last_ack\n"
            "        syn_sent\n"             # 13: not a reuse state
            "    }\n"
            "}\n")
    r = parse_text(text, "k.conf")
    assert _strs(r.errors) == ["k.conf:13: synproxy conn_reuse_state: unknown state 'syn_sent' "
                               "(expected close, time_wait, fin_wait, close_wait, last_ack)"]
    assert [(d.line, d.message) for d in r.warnings] == [
        (7, "synproxy synack_options: unknown keyword 'window'")]
    assert r.config.synproxy == {"init_mss": 1400, "synack_ttl": 60, "sack": 0, "timestamp": 1,
                                 "ack_store_max": 2, "conn_reuse": 1, "conn_reuse_close": 1,
                                 "conn_reuse_time_wait": 0, "conn_reuse_fin_wait": 1,
                                 "conn_reuse_close_wait": 0, "conn_reuse_last_ack": 1}
