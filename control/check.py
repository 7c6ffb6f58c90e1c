"""``lvs-dp check CONFIG``: keepalived -t, but it says what it understood.

This module owns the human report of a parsed configuration: the diagnostics (to stderr, errors as
``FILE:LINE: message``, warnings as ``FILE:LINE: warning: message``), then, when there is no error,
the services as ``ipvsadm -L -n`` would list them once lvs-dp applied the file, each real server with
its weight, forwarding method and health checker, and one line per thing lvs-dp parsed but will not
act on (DR/TUN forwarding, checkers it does not run, VRRP...), so nobody believes a keyword took
effect when it did not. Exit status: 0 valid, 1 on any error.
"""

from __future__ import annotations

import ipaddress
import sys
from collections import defaultdict

from control.model import Checker, Config, RealServer, VirtualServer, format_addr_port
from control.parser import parse_file

# ipvsadm's names for forwarding methods (FullNat is the patched ipvsadm's).
_FWD_NAMES = {"NAT": "Masq", "DR": "Route", "TUN": "Tunnel", "FNAT": "FullNat"}

# What lvs-dp acts on. Everything else that parses is listed as "parsed, not acted on".
ACTED_ON_FORWARDING = ("NAT", "FNAT")
ACTED_ON_PROTOCOLS = ("TCP", "UDP")
ACTED_ON_CHECKERS = ("TCP_CHECK", "HTTP_GET", "MISC_CHECK")


def run(path: str) -> int:
    result = parse_file(path)
    for d in result.warnings:
        print(f"{d.file}:{d.line}: warning: {d.message}", file=sys.stderr)
    for d in result.errors:
        print(str(d), file=sys.stderr)
    if result.errors:
        print(f"{path}: {_count(len(result.errors), 'error')}, "
              f"{_count(len(result.warnings), 'warning')}: not valid", file=sys.stderr)
        return 1
    print(summary(result.config, path, len(result.warnings)))
    return 0


def summary(cfg: Config, path: str, n_warnings: int = 0) -> str:
    """The report printed for a valid configuration (one string, no trailing newline)."""
    concrete = list(cfg.concrete_services())
    out = [f"{path}: OK: {_count(len(cfg.services), 'virtual server')} "
           f"({_count(len(concrete), 'service')}), {_count(cfg.real_server_count, 'real server')}, "
           f"{_count(n_warnings, 'warning')}"]
    if cfg.services:
        out.append("Prot LocalAddress:Port Scheduler Flags")
        out.append("  -> RemoteAddress:Port           Forward Weight Checker")
    for vs in cfg.services:
        out.extend(_service_lines(cfg, vs))
        details = _service_details(vs)
        if details:
            out.append(f"     {details}")
        for rs in vs.real_servers:
            out.append(_rs_line(rs, vs))
        if vs.sorry_server:
            addr, port = vs.sorry_server
            out.append(f"  -> {format_addr_port(addr, port or vs.port):<28} sorry"
                       f"{' (inhibit_on_failure)' if vs.sorry_server_inhibit else ''}")
    for name, addrs in cfg.local_address_groups.items():
        out.append(f"local_address_group {name}: {_count(len(addrs), 'address', 'addresses')} "
                   f"({_ranges(addrs)})")
    if cfg.synproxy:
        out.append(synproxy_line(cfg))
    out.extend(f"parsed, not acted on by lvs-dp: {what}" for what in not_acted_on(cfg))
    return "\n".join(out)


def synproxy_line(cfg: Config) -> str:
    """The settings the ``synproxy { }`` block changes (the rest keep the patch's defaults), and
    a reminder when no service uses them."""
    from control.synproxy_settings import BOOL_FIELDS
    vals = ", ".join(f"{k} {('on' if v else 'off') if k in BOOL_FIELDS else v}"
                     for k, v in cfg.synproxy.items())
    unused = "" if any(vs.syn_proxy for vs in cfg.services) else " (no virtual_server has syn_proxy)"
    return f"synproxy: {vals}{unused}"


def _service_lines(cfg: Config, vs: VirtualServer) -> list[str]:
    """ipvsadm's service line ("TCP  172.16.1.100:80 rr persistent 50"), plus lvs-dp's flags. A
    group service gets one line per group member, ranges kept as written."""
    flags = ""
    if vs.persistence_timeout:
        flags += f" persistent {vs.persistence_timeout}"
        if vs.persistence_granularity:
            flags += f" mask {vs.persistence_granularity}"
    if vs.ops:
        flags += " ops"
    if vs.lb_flags:
        flags += f" ({','.join(vs.lb_flags)})"
    if vs.syn_proxy:
        flags += " syn_proxy"
    if vs.lb_kind == "FNAT":
        n = len(cfg.local_address_groups.get(vs.laddr_group_name, ()))
        flags += f" laddr_group {vs.laddr_group_name} ({_count(n, 'address', 'addresses')})"
    if vs.proxy_protocol:
        flags += f" proxy_protocol {vs.proxy_protocol}"
    if vs.toa:
        flags += " toa"
    where = f"  [{vs.file}:{vs.line}]"
    if vs.group is None:
        return [f"{_service_id(vs.protocol, vs.addr, vs.port, vs.fwmark)} {vs.lb_algo}{flags}{where}"]
    grp = cfg.groups.get(vs.group)
    lines = []
    for m in grp.members if grp else ():
        ident = _service_id(vs.protocol, m.addr, m.port if m.port is not None else vs.port, m.fwmark)
        n = len(m.addresses)
        more = f" ({n} services)" if n > 1 else ""
        lines.append(f"{ident} {vs.lb_algo}{flags}  [group {vs.group}{more}]")
    return lines + [f"  (virtual_server group {vs.group}){where}"]


def _service_details(vs: VirtualServer) -> str:
    """The settings ipvsadm does not show but keepalived (and lvs-dp's health checks) use, when
    they differ from the defaults."""
    parts = []
    if vs.delay_loop != 60:
        parts.append(f"delay_loop {_secs(vs.delay_loop)}")
    if vs.quorum != 1 or vs.hysteresis:
        parts.append(f"quorum {vs.quorum}, hysteresis {vs.hysteresis}")
    parts += [word for word, on in (("alpha", vs.alpha), ("omega", vs.omega),
                                    ("ha_suspend", vs.ha_suspend)) if on]
    for key in ("quorum_up", "quorum_down"):
        if getattr(vs, key):
            parts.append(f"{key} '{getattr(vs, key)}'")
    return ", ".join(parts)


def _service_id(protocol: str, addr: str | None, port: int | None, fwmark: int | None) -> str:
    if fwmark is not None:
        return f"FWM  {fwmark}"
    return f"{protocol:<4} {format_addr_port(addr, port)}"


def _rs_line(rs: RealServer, vs: VirtualServer) -> str:
    checks = "; ".join(_checker_text(c, rs) for c in rs.checkers) or "no checker (always up)"
    extra = " inhibit_on_failure" if rs.inhibit_on_failure else ""
    return (f"  -> {format_addr_port(rs.addr, rs.port):<28} {_FWD_NAMES[rs.lb_kind]:<7} "
            f"{rs.weight:<6} {checks}{extra}")


def _checker_text(c: Checker, rs: RealServer) -> str:
    target = format_addr_port(c.connect_ip or rs.addr, c.connect_port or rs.port)
    timing = f"every {_secs(c.delay_loop)}"
    if c.kind != "MISC_CHECK":
        timing += f", timeout {_secs(c.connect_timeout)}"
    if c.retry:
        timing += f", {_count(c.retry, 'retry', 'retries')} {_secs(c.delay_before_retry)} apart"
    if c.kind in ("HTTP_GET", "SSL_GET"):
        urls = ", ".join(f"{u.path} {_codes(u.status_code)}{' +digest' if u.digest else ''}"
                         for u in c.urls)
        return f"{c.kind} {target} [{urls}] {timing}"
    if c.kind == "MISC_CHECK":
        return f"MISC_CHECK '{c.misc_path}'{' dynamic' if c.misc_dynamic else ''} {timing}"
    if c.kind == "SMTP_CHECK" and c.hosts:
        target += " +" + ",".join(format_addr_port(h.connect_ip or rs.addr, h.connect_port or 25)
                                  for h in c.hosts)
    return f"{c.kind} {target} {timing}"


def not_acted_on(cfg: Config) -> list[str]:
    """One line per kind of thing lvs-dp parses but does not act on, with how many and where the
    first one is; deterministic order."""
    from dataplane.consts import SCHED_BY_NAME   # the data plane's own list of schedulers

    found: dict[str, list[str]] = defaultdict(list)

    def add(what: str, file: str, line: int) -> None:
        found[what].append(f"{file}:{line}")

    for vs in cfg.services:
        if vs.lb_kind not in ACTED_ON_FORWARDING:
            add(f"lb_kind {vs.lb_kind} ({_FWD_NAMES[vs.lb_kind]} forwarding)", vs.file, vs.line)
        if vs.protocol not in ACTED_ON_PROTOCOLS and vs.fwmark is None:
            add(f"protocol {vs.protocol}", vs.file, vs.line)
        if vs.lb_algo not in SCHED_BY_NAME:
            add(f"lb_algo {vs.lb_algo} (scheduler not in the data plane)", vs.file, vs.line)
        if vs.virtualhost:
            add("virtualhost", vs.file, vs.line)
        for key in vs.extra:
            add(f"virtual_server keyword {key}", vs.file, vs.line)
        for rs in vs.real_servers:
            if rs.lb_kind != vs.lb_kind and rs.lb_kind not in ACTED_ON_FORWARDING:
                add(f"lvs_method {rs.lb_kind} on a real server", rs.file, rs.line)
            if rs.virtualhost:
                add("virtualhost", rs.file, rs.line)
            for key in rs.extra:
                add(f"real_server keyword {key}", rs.file, rs.line)
            for c in rs.checkers:
                if c.kind not in ACTED_ON_CHECKERS:
                    add(f"{c.kind} checker", c.file, c.line)
                if c.virtualhost or any(u.virtualhost for u in c.urls):
                    add("virtualhost", c.file, c.line)
                for key in c.extra:
                    add(f"{c.kind} keyword {key}", c.file, c.line)
    for inst in cfg.vrrp_instances.values():
        vips = ", ".join(inst.virtual_ipaddresses) or "no VIP"
        add(f"vrrp_instance {inst.name} (interface {inst.interface}, {vips})", inst.file, inst.line)
    for grp in cfg.vrrp_sync_groups.values():
        add(f"vrrp_sync_group {grp.name} ({' '.join(grp.group)})", grp.file, grp.line)
    for scr in cfg.vrrp_scripts.values():
        add(f"vrrp_script {scr.name}", scr.file, scr.line)
    for key in ("static_ipaddress", "static_routes", "static_rules"):
        if getattr(cfg, key):
            found[f"{key} ({_count(len(getattr(cfg, key)), 'line')})"].append("")
    for node in cfg.other:
        add(node.text, node.file, node.line)
    if cfg.global_defs:
        found[f"global_defs ({', '.join(cfg.global_defs)})"].append("")

    out = []
    for what, places in found.items():
        where = [p for p in places if p]
        if len(where) > 1:
            out.append(f"{what} (x{len(where)}, first at {where[0]})")
        elif where:
            out.append(f"{what} ({where[0]})")
        else:
            out.append(what)
    return out


# --- formatting helpers --------------------------------------------------------------------------------


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _secs(v: float) -> str:
    return f"{v:g}s"


def _codes(codes: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in codes)


def _ranges(addrs: tuple[str, ...]) -> str:
    """10.0.0.1, 10.0.0.2, 10.0.0.3 -> '10.0.0.1-10.0.0.3' (consecutive runs joined)."""
    runs: list[list] = []
    for a in addrs:
        ip = ipaddress.ip_address(a)
        if runs and runs[-1][1].version == ip.version and int(runs[-1][1]) + 1 == int(ip):
            runs[-1][1] = ip
        else:
            runs.append([ip, ip])
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)
