"""The typed model of a keepalived.conf: what control/parser.py produces and everything else in
control/ reads.

This module owns the *shape* of a configuration, not its grammar: frozen dataclasses for virtual
servers, real servers, checkers, groups, the VRRP blocks lvs-dp keeps without acting on them, and
the diagnostics the parser reports. Nothing here reads files or knows keywords.

Conventions
-----------
* Every object that comes from the file carries ``file`` and ``line`` (1-based) of the keyword that
  created it, so any later complaint (apply, health checks, ``lvs-dp check``) can say FILE:LINE.
* Values are *resolved* the way keepalived resolves them: a checker's ``retry`` is the value written
  in the checker, else in its real server, else in its virtual server, else keepalived's default for
  that checker kind. Consumers never re-implement inheritance.
* Timers (``delay_loop``, ``connect_timeout``, ``delay_before_retry``, ``warmup``) are float seconds,
  because keepalived's <TIMER> accepts fractions (``delay_loop 0.5``); ``6.0 == 6`` in comparisons.
* Addresses are strings as Python's ``ipaddress`` prints them (``ae00::1``, ``10.0.0.1``); ports are
  ints, ``None`` when the file gives none.
* Keywords keepalived knows but lvs-dp does not model go into an ``extra`` mapping of
  ``keyword -> tuple of its arguments`` (``()`` for a bare flag), so nothing written is lost and
  ``lvs-dp check`` can list it as "parsed, not acted on".
* Mappings (``extra``, ``global_defs``, ``groups``...) are excluded from hashing so the frozen
  objects stay hashable; do not mutate them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Iterator

# IPVS's default persistence timeout when `persistence_timeout` has no value (ipvsadm -p): 6 minutes.
IPVS_SVC_PERSISTENT_TIMEOUT = 360

# HTTP status codes a url accepts when its block has no `status_code` (keepalived: 200-299).
DEFAULT_STATUS_CODES = ((200, 299),)

# Largest address range lvs-dp will expand (a virtual_server_group or local_address_group entry).
# A /16 is already 65536 services or local addresses; anything larger is almost surely a typo.
MAX_RANGE_ADDRESSES = 65536


def _nohash(default_factory=dict):
    """A mapping field that takes part in == but not in hash()."""
    return field(default_factory=default_factory, hash=False)


# --- diagnostics --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Diagnostic:
    """One complaint about the configuration. ``str()`` is exactly ``FILE:LINE: message`` (the form
    compilers use, so editors jump to it); ``severity`` is 'error' or 'warning'."""

    file: str
    line: int
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


# --- generic keyword trees (blocks kept but not interpreted) ------------------------------------------


@dataclass(frozen=True)
class Node:
    """A statement as written: ``keyword args... [{ children }]``. Used for the blocks lvs-dp keeps
    without interpreting (VRRP, static routes, SSL, ...). ``children`` is None when the statement
    has no block, a (possibly empty) tuple when it has one."""

    keyword: str
    args: tuple[str, ...]
    file: str
    line: int
    children: tuple["Node", ...] | None = None

    def find(self, keyword: str) -> "Node | None":
        """The first direct child named ``keyword``, or None."""
        for c in self.children or ():
            if c.keyword == keyword:
                return c
        return None

    def value(self, keyword: str, default: str | None = None) -> str | None:
        """The first argument of the first child named ``keyword`` (``default`` if absent)."""
        c = self.find(keyword)
        if c is None or not c.args:
            return default
        return c.args[0]

    @property
    def text(self) -> str:
        """The statement on one line, without its block."""
        return " ".join((self.keyword,) + self.args)


# --- LVS: checkers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Url:
    """One ``url { }`` of an HTTP_GET / SSL_GET checker. ``status_code`` is a tuple of inclusive
    ``(low, high)`` ranges, ``200`` being ``(200, 200)``; keepalived's default 200-299 is filled in
    when the block names none."""

    file: str
    line: int
    path: str
    digest: str | None = None
    status_code: tuple[tuple[int, int], ...] = DEFAULT_STATUS_CODES
    virtualhost: str | None = None
    regex: str | None = None
    regex_no_match: bool = False
    extra: dict = _nohash()

    def accepts(self, code: int) -> bool:
        """Whether an HTTP status code passes this url's check."""
        return any(lo <= code <= hi for lo, hi in self.status_code)


@dataclass(frozen=True)
class CheckerHost:
    """One ``host { }`` of an SMTP_CHECK: another address the checker must reach."""

    file: str
    line: int
    connect_ip: str | None = None
    connect_port: int | None = None
    bindto: str | None = None
    bind_port: int | None = None
    bind_if: str | None = None
    connect_timeout: float | None = None
    fwmark: int | None = None


CHECKER_KINDS = ("TCP_CHECK", "HTTP_GET", "SSL_GET", "MISC_CHECK", "SMTP_CHECK", "DNS_CHECK",
                 "PING_CHECK", "UDP_CHECK", "BFD_CHECK", "FILE_CHECK")


@dataclass(frozen=True)
class Checker:
    """A health checker of a real server. ``connect_ip``/``connect_port`` None mean "the real
    server's own address/port". Resolved defaults (keepalived.conf(5)): connect_timeout 5 s;
    retry 1 (DNS_CHECK 3, MISC_CHECK 0); delay_before_retry 1 s (HTTP_GET/SSL_GET 3 s, DNS_CHECK
    its delay_loop); delay_loop 60 s; warmup None = a random start delay up to delay_loop."""

    kind: str
    file: str
    line: int
    connect_ip: str | None = None
    connect_port: int | None = None
    bindto: str | None = None
    bind_port: int | None = None
    bind_if: str | None = None
    fwmark: int | None = None
    connect_timeout: float = 5.0
    retry: int = 1
    delay_before_retry: float = 1.0
    delay_loop: float = 60.0
    warmup: float | None = None
    alpha: bool = False
    # HTTP_GET / SSL_GET
    urls: tuple[Url, ...] = ()
    virtualhost: str | None = None
    # MISC_CHECK
    misc_path: str | None = None
    misc_timeout: int | None = None
    misc_dynamic: bool = False
    user: str | None = None
    # SMTP_CHECK
    helo_name: str | None = None
    hosts: tuple[CheckerHost, ...] = ()
    # DNS_CHECK (type/name), UDP_CHECK (payload, require_reply...), BFD_CHECK, FILE_CHECK and the
    # rarer options of the others.
    extra: dict = _nohash()


# --- LVS: real servers, virtual servers, groups -------------------------------------------------------


@dataclass(frozen=True)
class RealServer:
    """A ``real_server IP [PORT] { }``. ``port`` is the virtual server's port when the line gives
    none (ipvsadm's rule), None for fwmark services. ``weight`` defaults to the virtual server's
    ``weight`` (1). ``lb_kind`` is the forwarding method, inherited from the virtual server unless
    the real server has its own ``lvs_method``."""

    file: str
    line: int
    addr: str
    port: int | None
    weight: int = 1
    lb_kind: str = "NAT"
    inhibit_on_failure: bool = False
    notify_up: str | None = None
    notify_down: str | None = None
    uthreshold: int | None = None
    lthreshold: int | None = None
    alpha: bool = False
    virtualhost: str | None = None
    checkers: tuple[Checker, ...] = ()
    extra: dict = _nohash()


@dataclass(frozen=True)
class VirtualServer:
    """A ``virtual_server`` block: exactly one of (``addr``[, ``port``]), ``fwmark`` or ``group``
    is set. For ``group`` services use ``Config.concrete_services()`` to get one VirtualServer per
    address and fwmark of the group.

    ``lb_kind`` is one of NAT, DR, TUN, FNAT (FULLNAT; patched keepalived). ``syn_proxy``,
    ``laddr_group_name`` come from the Alibaba FULLNAT/SYNPROXY keepalived patch,
    ``proxy_protocol`` from DPVS's keepalived, ``toa`` is an lvs-dp extension (insert the client
    address as a TCP option on FULLNAT services)."""

    file: str
    line: int
    addr: str | None = None
    port: int | None = None
    fwmark: int | None = None
    group: str | None = None
    protocol: str = "TCP"
    lb_algo: str = "wlc"
    lb_kind: str = "NAT"
    persistence_timeout: int | None = None
    persistence_granularity: str | None = None
    delay_loop: float = 60.0
    sorry_server: tuple[str, int | None] | None = None
    sorry_server_inhibit: bool = False
    quorum: int = 1
    hysteresis: int = 0
    alpha: bool = False
    omega: bool = False
    quorum_up: str | None = None
    quorum_down: str | None = None
    ha_suspend: bool = False
    virtualhost: str | None = None
    ops: bool = False
    lb_flags: tuple[str, ...] = ()      # hashed, flag-1..3, sh-port, sh-fallback, mh-port, mh-fallback
    syn_proxy: bool = False
    laddr_group_name: str | None = None
    proxy_protocol: str | None = None   # None, 'v1' or 'v2'
    toa: bool = False
    real_servers: tuple[RealServer, ...] = ()
    extra: dict = _nohash()

    @property
    def name(self) -> str:
        """How ipvsadm names the service: ``TCP 172.16.1.100:80``, ``FWM 1``; ``group NAME`` for a
        service that stands for a virtual_server_group."""
        if self.group is not None and self.addr is None and self.fwmark is None:
            return f"group {self.group}"
        if self.fwmark is not None:
            return f"FWM {self.fwmark}"
        return f"{self.protocol} {format_addr_port(self.addr, self.port)}"


@dataclass(frozen=True)
class GroupMember:
    """One line of a virtual_server_group: an address or range (``addr`` as written, e.g.
    ``192.168.200.3-10``) with an optional port, or a ``fwmark``."""

    file: str
    line: int
    addr: str | None = None
    port: int | None = None
    fwmark: int | None = None
    addresses: tuple[str, ...] = ()     # ``addr`` expanded: every address of the range


@dataclass(frozen=True)
class VirtualServerGroup:
    name: str
    file: str
    line: int
    members: tuple[GroupMember, ...] = ()


# --- VRRP and static settings (kept, never acted on) ---------------------------------------------------


@dataclass(frozen=True)
class VrrpInstance:
    """The parts of a vrrp_instance the summary and the lab show; the whole block is in ``tree``.
    Never validated: lvs-dp does not run VRRP."""

    name: str
    file: str
    line: int
    state: str | None = None
    interface: str | None = None
    virtual_router_id: str | None = None
    priority: str | None = None
    virtual_ipaddresses: tuple[str, ...] = ()
    tree: Node | None = None


@dataclass(frozen=True)
class VrrpSyncGroup:
    name: str
    file: str
    line: int
    group: tuple[str, ...] = ()
    tree: Node | None = None


@dataclass(frozen=True)
class VrrpScript:
    name: str
    file: str
    line: int
    script: str | None = None
    interval: str | None = None
    weight: str | None = None
    tree: Node | None = None


# --- the whole configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """A parsed keepalived.conf (with its includes).

    ``global_defs`` maps each keyword of the global_defs block to its arguments joined by one space
    ('' for a flag), or to the tuple of its lines for a sub-block (``notification_email``).
    ``local_address_groups`` maps a group name to its local addresses, ranges expanded, in order.
    ``static_ipaddress``/``static_routes``/``static_rules`` are the lines of those blocks as
    written. ``other`` holds the remaining root blocks keepalived knows (SSL, track_file, ...).
    ``synproxy`` holds the values of lvs-dp's ``synproxy { }`` block by
    control/synproxy_settings.py field name (on/off as 1/0), only those given."""

    global_defs: dict = _nohash()
    services: tuple[VirtualServer, ...] = ()
    groups: dict = _nohash()                   # name -> VirtualServerGroup
    local_address_groups: dict = _nohash()     # name -> tuple[str, ...]
    vrrp_instances: dict = _nohash()           # name -> VrrpInstance
    vrrp_sync_groups: dict = _nohash()         # name -> VrrpSyncGroup
    vrrp_scripts: dict = _nohash()             # name -> VrrpScript
    static_ipaddress: tuple[str, ...] = ()
    static_routes: tuple[str, ...] = ()
    static_rules: tuple[str, ...] = ()
    other: tuple[Node, ...] = ()
    synproxy: dict = _nohash()                 # synproxy { }: SynproxySettings field -> int

    def concrete_services(self) -> Iterator[VirtualServer]:
        """Every service IPVS would hold: services given by address or fwmark as they are, and a
        ``virtual_server group NAME`` expanded into one copy per address of each member range and
        per fwmark (``group`` stays set on the copies so their origin is known). A member without
        a port takes the service's port, if any."""
        for vs in self.services:
            if vs.group is None:
                yield vs
                continue
            grp = self.groups.get(vs.group)
            if grp is None:     # the parser reports this; a partial config just skips it
                continue
            for m in grp.members:
                if m.fwmark is not None:
                    yield dataclasses.replace(vs, addr=None, port=None, fwmark=m.fwmark)
                    continue
                for a in m.addresses:
                    yield dataclasses.replace(vs, addr=a, port=m.port if m.port is not None else vs.port,
                                              fwmark=None)

    @property
    def real_server_count(self) -> int:
        return sum(len(vs.real_servers) for vs in self.services)


# --- address helpers shared by the parser and the summary ----------------------------------------------


def format_addr_port(addr: str | None, port: int | None) -> str:
    """ipvsadm's spelling: ``10.0.0.1:80``, ``[ae00::1]:80``; port 0 when there is none."""
    a = addr or "0.0.0.0"
    if ":" in a:
        a = f"[{a}]"
    return f"{a}:{port or 0}"


def expand_range(text: str) -> tuple[str, ...]:
    """Expand keepalived's address-range spellings into every address, in order:

    * ``192.168.200.3-10`` last IPv4 octet (or last IPv6 group, hex: ``ae00::2-9``) from..to
    * ``192.168.200.250-192.168.201.10`` two full addresses
    * ``192.168.202.8/29`` every address of the prefix
    * a plain address

    Raises ValueError with a message fit for a diagnostic.
    """
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"invalid address range '{text}'") from None
        if net.num_addresses > MAX_RANGE_ADDRESSES:
            raise ValueError(f"address range '{text}' has {net.num_addresses} addresses "
                             f"(lvs-dp expands at most {MAX_RANGE_ADDRESSES})")
        return tuple(str(a) for a in net)
    if "-" not in text:
        try:
            return (str(ipaddress.ip_address(text)),)
        except ValueError:
            raise ValueError(f"invalid IP address '{text}'") from None
    first_s, _, last_s = text.partition("-")
    try:
        first = ipaddress.ip_address(first_s)
    except ValueError:
        raise ValueError(f"invalid address range '{text}'") from None
    try:
        if "." in last_s or ":" in last_s:
            last = ipaddress.ip_address(last_s)
        elif first.version == 4:
            n = int(last_s, 10)
            if not 0 <= n <= 255:
                raise ValueError
            last = ipaddress.ip_address((int(first) & ~0xFF) | n)
        else:
            n = int(last_s, 16)
            if not 0 <= n <= 0xFFFF:
                raise ValueError
            last = ipaddress.ip_address((int(first) & ~0xFFFF) | n)
    except ValueError:
        raise ValueError(f"invalid address range '{text}'") from None
    if last.version != first.version or int(last) < int(first):
        raise ValueError(f"address range '{text}': end is before start")
    count = int(last) - int(first) + 1
    if count > MAX_RANGE_ADDRESSES:
        raise ValueError(f"address range '{text}' has {count} addresses "
                         f"(lvs-dp expands at most {MAX_RANGE_ADDRESSES})")
    return tuple(str(ipaddress.ip_address(int(first) + i)) for i in range(count))
