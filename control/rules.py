"""iptables rules and sysctls that steer balanced packets to lvs-dp, in the CURRENT namespace.

This module owns everything lvs-dp changes in the kernel outside its own sockets: the raw-table
chains that hand packets of balanced flows to NFQUEUE, and the sysctls that let rewritten packets
through. ``lvs-dp run`` runs inside the balancer's namespace (``ip netns exec``), so nothing here
takes a namespace argument.

Kernel facts (this kernel: 6.18, iptables 1.8.9 nf_tables backend) and the choices they force:

* nft's native ``queue`` statement does not exist (``CONFIG_NFT_QUEUE`` is not set), but the
  iptables ``NFQUEUE`` target works through nft compat (``CONFIG_NFT_COMPAT``), so the rules are
  iptables rules, written with ``iptables-nft`` (same tables that ``nft list ruleset`` shows).
* Packets are queued in the **raw** table's PREROUTING: before conntrack (priority -200) and
  NAT, so the kernel keeps no state for balanced flows. A queue verdict of ACCEPT ends the raw
  table for that packet, so the ``-j CT --notrack`` rule must come *before* the NFQUEUE rule.
  ``--notrack`` does not register conntrack in the namespace, so IPv4 defragmentation (priority
  -400, a conntrack dependency) stays off: the data plane sees fragments as they arrive. The first
  fragment matches the port rules; later ones carry no ports, so with ``fragments=True`` (default)
  one more rule per balanced (address, protocol) queues them (``-f``), for the data plane to drop
  and count (DROP_FRAGMENT) instead of having them reach the local stack or leak forwarded. Those
  rules cannot tell balanced from unbalanced traffic of that protocol to/from that address (e.g.
  rs3's own large UDP datagrams); ``fragments=False`` turns them off.
* ``--queue-bypass`` is never used: with no program bound to the queue the kernel drops, and a
  full queue drops too. lvs-dp fails closed and counts; it never fails open.
* ``xt_u32`` is built in (``CONFIG_NETFILTER_XT_MATCH_U32=y``) and works through nft compat; it is
  how several queues are used (below) and how ICMP errors are matched by the packet they quote.
* The lab's real servers sit behind a bridge, and br_netfilter is built in: bridged frames also
  traverse raw PREROUTING. An ``out`` rule therefore also sees real-server traffic that is merely
  bridged (rs3 answering rs4); the data plane must accept what it does not know.

Chains (instance names keep two balancers in one or two namespaces apart)::

    raw PREROUTING -> LVSDP-PRE-<instance>   balanced flows and ICMP errors about them
    raw OUTPUT     -> LVSDP-OUT-<instance>   ICMP errors this host generates about them

Each jump is inserted first in its base chain (appended instead when a fwmark service needs the
marking rules of raw PREROUTING to run first: raw comes before mangle, so a keepalived-style
``virtual_server fwmark N`` needs its MARK rules in the raw table), with the comment
``lvs-dp:<instance>``. Rules are installed in one ``iptables-restore --noflush`` transaction (all
or nothing), then read back with ``iptables-save``. ``LVSDP-PRE`` starts with ``-i lo -j RETURN``: a locally generated packet was
already seen in OUTPUT.

Matches. ``Match('in', 'tcp', VIP, 80)`` queues ``-d VIP -p tcp --dport 80`` (client to service);
``Match('out', 'tcp', RS, 80)`` queues ``-s RS -p tcp --sport 80`` (real server back). Port 0 means
any port. For every distinct address one more rule queues the ICMP errors (types 3, 4, 11, 12)
that travel with the flow: to the VIP for ``in`` addresses, from the real server for ``out``
addresses. In raw OUTPUT, an error this host generates is queued when the packet it quotes was
sent *from* an ``in`` address (a reply leaving as VIP) or *to* an ``out`` address (a packet
forwarded to a real server), e.g. "fragmentation needed" when the inside link has a smaller MTU.

Several queues. NAT must see both directions of a connection on the same queue (one worker owns
a connection). With ``Rules((first, count))`` every rule is split into `count` NFQUEUE rules, each
with a ``-m u32`` test of low bits of a *steering key*: by default the client address, which is
the source of ``in`` packets (``steer='saddr'``) and the destination of ``out`` packets
(``steer='daddr'``). The queue is ``first + steer_index(key, count)`` with
``steer_index(k, n) = (k & (2**ceil(log2 n) - 1)) % n`` (uneven when n is not a power of two).
FULLNAT replies are addressed to a local address, not to the client, so their ``out`` matches use
``steer='dport'`` and the data plane picks local ports with ``steer_index(lport) ==
steer_index(client address)`` (today: ports the worker owns; client packets of a FULLNAT-only VIP
are steered by ``steer='sport_hi'``, the client port >> 1, so one client uses every worker).
ICMP errors are steered by the same key read from the quoted
packet, mirrored (the quoted packet travelled the other way): source address <-> destination
address, source port <-> destination port.

Sysctls (`Sysctls`): ip_forward=1; for all, default and every interface accept_local=1 (a rewritten
packet whose source is now a local address -- a NAT reply leaving as the VIP -- is otherwise
dropped as a martian; what counts is the interface it arrived on, e.g. br0, or "all"),
rp_filter=0 (strict mode 1 drops it too, loose mode 2 does not; the kernel uses the max of "all"
and the interface; tests/netns/test_lab.py proves both with a toy NAT), send_redirects=0 (client and real servers must not be told to
bypass the balancer; the kernel ORs "all" and the interface). Each change is logged; originals are
written to a state file before anything changes, restored on exit, and a crashed run's file is
restored at the next start (`Sysctls.restore_from`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lvsdp.rules")

PRE_CHAIN_PREFIX = "LVSDP-PRE-"
OUT_CHAIN_PREFIX = "LVSDP-OUT-"
COMMENT_PREFIX = "lvs-dp:"
ICMP_ERROR_TYPES = (3, 4, 11, 12)   # dest-unreachable, source-quench, time-exceeded, param-problem
_INSTANCE_RE = re.compile(r"[A-Za-z0-9_-]{1,18}")   # LVSDP-PRE- + 18 = 28, iptables' limit

DIRECTIONS = ("in", "out")
PROTOS = ("tcp", "udp")
# "sport_hi"/"dport_hi": the port without its lowest bit (port >> 1). Linux's connect() picks
# even ephemeral ports first (odd ones are left to bind(), since 4.2), so the low bit of a client
# port says nothing; FULLNAT client packets are steered by sport_hi.
STEER_KEYS = ("saddr", "daddr", "sport", "dport", "sport_hi", "dport_hi")
DEFAULT_STEER = {"in": "saddr", "out": "daddr"}
# The quoted packet in an ICMP error travelled the other way: its fields are mirrored.
MIRROR = {"saddr": "daddr", "daddr": "saddr", "sport": "dport", "dport": "sport",
          "sport_hi": "dport_hi", "dport_hi": "sport_hi"}

# u32 locations (xt_u32 syntax). "0>>22&0x3C@" moves to the transport header (IHL*4); inside an
# ICMP error the quoted IPv4 header starts 8 bytes further, its transport header after another
# "8>>22&0x3C@" hop.
U32_LOC = {
    "saddr": "12",
    "daddr": "16",
    "sport": "0>>22&0x3C@0>>16",
    "dport": "0>>22&0x3C@0&0xFFFF",
    "sport_hi": "0>>22&0x3C@0>>17",
    "dport_hi": "0>>22&0x3C@0&0xFFFF>>1",
    "icmp.type": "0>>22&0x3C@0>>24",
    "quoted.saddr": "0>>22&0x3C@20",
    "quoted.daddr": "0>>22&0x3C@24",
    "quoted.sport": "0>>22&0x3C@8>>22&0x3C@8>>16",
    "quoted.dport": "0>>22&0x3C@8>>22&0x3C@8&0xFFFF",
    "quoted.sport_hi": "0>>22&0x3C@8>>22&0x3C@8>>17",
    "quoted.dport_hi": "0>>22&0x3C@8>>22&0x3C@8&0xFFFF>>1",
}
U32_ICMP_ERROR = f"{U32_LOC['icmp.type']}=0x3:0x4,0xb:0xc"   # ICMP_ERROR_TYPES as ranges


class RulesError(RuntimeError):
    """An iptables command failed, or the installed rules do not read back as expected."""


# --- binaries ------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    nft = shutil.which(f"{name.replace('iptables', 'iptables-nft')}")
    return nft or name


IPTABLES = _tool("iptables")
IPTABLES_SAVE = _tool("iptables-save")
IPTABLES_RESTORE = _tool("iptables-restore")


def _run(argv, input=None, check=True, timeout=30.0) -> subprocess.CompletedProcess:
    log.debug("run: %s", shlex.join(argv))
    p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RulesError(f"rc={p.returncode}: {shlex.join(argv)}: {p.stderr.strip()}"
                         + (f"\ninput:\n{input}" if input else ""))
    return p


def iptables_save(counters: bool = False) -> str:
    """``iptables-save -t raw`` of the current namespace ("" when the raw table does not exist)."""
    argv = [IPTABLES_SAVE, "-t", "raw"] + (["-c"] if counters else [])
    return _run(argv).stdout


def _restore(text: str) -> None:
    _run([IPTABLES_RESTORE, "-w", "--noflush"], input=text)


# --- queues and steering ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueSpec:
    first: int
    count: int = 1

    def __post_init__(self):
        if not (0 <= self.first <= 65535 and 1 <= self.count and self.first + self.count <= 65536):
            raise ValueError(f"bad queue range: first={self.first} count={self.count}")
        if self.count > 256:
            raise ValueError("more than 256 queues")

    @classmethod
    def parse(cls, spec) -> "QueueSpec":
        """An int (one queue); a ``(first, count)`` tuple; a ``range`` or a list of consecutive
        queue numbers (``[4, 5, 6]``); "N" or "FIRST:LAST" text; or a QueueSpec."""
        if isinstance(spec, QueueSpec):
            return spec
        if isinstance(spec, int):
            return cls(spec, 1)
        if isinstance(spec, (range, list)):
            nums = [int(q) for q in spec]
            if not nums or nums != list(range(nums[0], nums[0] + len(nums))):
                raise ValueError(f"queue numbers must be consecutive and ascending: {nums}")
            return cls(nums[0], len(nums))
        if isinstance(spec, str):
            if ":" in spec:
                a, b = (int(x) for x in spec.split(":"))
                return cls(a, b - a + 1)
            return cls(int(spec), 1)
        first, count = spec
        return cls(int(first), int(count))

    @property
    def mask(self) -> int:
        return (1 << max(1, (self.count - 1).bit_length())) - 1 if self.count > 1 else 0

    @property
    def queues(self) -> range:
        return range(self.first, self.first + self.count)

    def index(self, key: int) -> int:
        return steer_index(key, self.count)

    def queue_for(self, key: int) -> int:
        """Queue number that packets with steering key `key` (an int: address or port) go to."""
        return self.first + steer_index(key, self.count)

    def values(self, i: int) -> list[int]:
        """Values of ``key & mask`` that select queue index `i`."""
        return [v for v in range(self.mask + 1) if v % self.count == i]


def steer_index(key: int, count: int) -> int:
    """Index (0..count-1) of the queue for steering key `key`; the rules implement exactly this."""
    if count <= 1:
        return 0
    mask = (1 << (count - 1).bit_length()) - 1
    return (int(key) & mask) % count


# --- matches -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Match:
    """One balanced direction: 'in' = to ``addr:port`` (a VIP or a FULLNAT local address),
    'out' = from ``addr:port`` (a real server). `port` 0 = every port. `steer` (which field holds
    the steering key, only used with several queues): default 'saddr' for in, 'daddr' for out.
    `fwmark` (in only; `addr` may then be None): packets carrying that firewall mark, for
    keepalived's ``virtual_server fwmark N``. raw PREROUTING runs before mangle, so the mark must
    be set in raw PREROUTING; with fwmark matches our jump is appended (after the marking rules)
    instead of inserted first. No ICMP rule is derived from an address-less fwmark match."""
    direction: str
    proto: str
    addr: str | None
    port: int = 0
    steer: str | None = None
    fwmark: int = 0

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'in' or 'out', not {self.direction!r}")
        if self.proto not in PROTOS:
            raise ValueError(f"proto must be 'tcp' or 'udp', not {self.proto!r}")
        fwmark = int(self.fwmark or 0)
        if not 0 <= fwmark <= 0xFFFFFFFF:
            raise ValueError(f"bad fwmark {self.fwmark}")
        object.__setattr__(self, "fwmark", fwmark)
        if fwmark and self.direction != "in":
            raise ValueError("fwmark matches are 'in' only (replies come from real servers)")
        if self.addr is None:
            if not fwmark:
                raise ValueError("a match needs an address or a fwmark")
        else:
            a = ipaddress.ip_address(self.addr)
            if a.version != 4:
                raise ValueError(f"IPv4 only: {self.addr}")
            object.__setattr__(self, "addr", str(a))
        if not 0 <= int(self.port) <= 65535:
            raise ValueError(f"bad port {self.port}")
        object.__setattr__(self, "port", int(self.port))
        if self.steer is not None and self.steer not in STEER_KEYS:
            raise ValueError(f"steer must be one of {STEER_KEYS}, not {self.steer!r}")

    @property
    def steer_key(self) -> str:
        return self.steer or DEFAULT_STEER[self.direction]

    @classmethod
    def parse(cls, direction: str, text: str) -> "Match":
        """``PROTO:ADDR[:PORT[:STEER]]``, e.g. ``tcp:172.16.1.100:80``."""
        parts = text.split(":")
        if not 2 <= len(parts) <= 4:
            raise ValueError(f"expected PROTO:ADDR[:PORT[:STEER]], got {text!r}")
        port = int(parts[2]) if len(parts) > 2 and parts[2] else 0
        steer = parts[3] if len(parts) > 3 else None
        return cls(direction, parts[0], parts[1], port, steer)


def _addr_hex(addr: str) -> str:
    return f"0x{int(ipaddress.IPv4Address(addr)):08X}"


def _u32_steer(loc_key: str, qs: QueueSpec, i: int) -> str:
    vals = ",".join(f"0x{v:x}" for v in qs.values(i))
    return f"{U32_LOC[loc_key]}&0x{qs.mask:x}={vals}"


def _queue_rules(chain: str, base: str, u32_tests: list[str], steer_loc: str | None,
                 qs: QueueSpec) -> list[str]:
    """``-j CT --notrack`` then the NFQUEUE rule(s) for one match."""
    def u32(tests):
        return f' -m u32 --u32 "{"&&".join(tests)}"' if tests else ""
    lines = [f"-A {chain} {base}{u32(u32_tests)} -j CT --notrack"]
    if qs.count == 1:
        lines.append(f"-A {chain} {base}{u32(u32_tests)} -j NFQUEUE --queue-num {qs.first}")
    else:
        for i, q in enumerate(qs.queues):
            tests = u32_tests + [_u32_steer(steer_loc, qs, i)]
            lines.append(f"-A {chain} {base}{u32(tests)} -j NFQUEUE --queue-num {q}")
    return lines


def _icmp_groups(matches) -> dict[tuple[str, str], str]:
    """(direction, addr) -> steering key, checking that one address is steered one way."""
    groups: dict[tuple[str, str], str] = {}
    for m in matches:
        if m.addr is None:
            continue
        k = (m.direction, m.addr)
        if groups.setdefault(k, m.steer_key) != m.steer_key:
            raise ValueError(f"{m.direction} {m.addr}: matches disagree on the steering key "
                             f"({groups[k]} vs {m.steer_key}); ICMP errors could not be steered")
    return groups


def render_chains(matches, queue_spec, instance: str = "default",
                  fragments: bool = True) -> dict[str, list[str]]:
    """The ``-A`` lines of our two chains, as iptables-restore input. Pure: no kernel access."""
    qs = QueueSpec.parse(queue_spec)
    pre, out = chain_names(instance)
    matches = list(dict.fromkeys(matches))
    groups = _icmp_groups(matches)
    pre_lines = [f"-A {pre} -i lo -j RETURN"]
    for m in matches:
        base = f"{'-d' if m.direction == 'in' else '-s'} {m.addr}/32 " if m.addr else ""
        base += f"-p {m.proto}"
        if m.port:
            base += f" -m {m.proto} --{'d' if m.direction == 'in' else 's'}port {m.port}"
        if m.fwmark:
            base += f" -m mark --mark 0x{m.fwmark:x}"
        pre_lines += _queue_rules(pre, base, [], m.steer_key, qs)
    if fragments:
        # non-first fragments carry no ports: steer by the address half of the key
        keys = dict.fromkeys((m.direction, m.addr, m.proto) for m in matches if m.addr)
        for direction, addr, proto in keys:
            steer = groups[(direction, addr)]
            if steer not in ("saddr", "daddr"):
                steer = DEFAULT_STEER[direction]
            base = f"{'-d' if direction == 'in' else '-s'} {addr}/32 -p {proto} -f"
            pre_lines += _queue_rules(pre, base, [], steer, qs)
    out_lines = []
    for (direction, addr), steer in groups.items():
        quoted_steer = "quoted." + MIRROR[steer]
        # ICMP errors arriving with the flow
        base = f"{'-d' if direction == 'in' else '-s'} {addr}/32 -p icmp ! -f"
        pre_lines += _queue_rules(pre, base, [U32_ICMP_ERROR], quoted_steer, qs)
        # ICMP errors this host generates about a packet it sent as the VIP or forwarded to an RS
        which = "quoted.saddr" if direction == "in" else "quoted.daddr"
        tests = [U32_ICMP_ERROR, f"{U32_LOC[which]}={_addr_hex(addr)}"]
        out_lines += _queue_rules(out, "-p icmp ! -f", tests, quoted_steer, qs)
    return {pre: pre_lines, out: out_lines}


def chain_names(instance: str) -> tuple[str, str]:
    if not _INSTANCE_RE.fullmatch(instance or ""):
        raise ValueError(f"bad instance name {instance!r}: 1-18 of [A-Za-z0-9_-]")
    return PRE_CHAIN_PREFIX + instance, OUT_CHAIN_PREFIX + instance


def _jump_line(base_chain: str, chain: str, instance: str, first: bool = True) -> str:
    where = f"-I {base_chain} 1" if first else f"-A {base_chain}"
    return f'{where} -m comment --comment "{COMMENT_PREFIX}{instance}" -j {chain}'


def _parse_save(text: str):
    """(declared chains, [(chain, line, target)]) of an iptables-save -t raw text."""
    chains, rules = [], []
    for line in text.splitlines():
        if line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A ") or (line.startswith("[") and " -A " in line):
            rule = line[line.index("-A "):]
            words = shlex.split(rule)
            target = None
            for flag in ("-j", "-g"):
                if flag in words and words.index(flag) + 1 < len(words):
                    target = words[words.index(flag) + 1]
            rules.append((words[1], rule, target, line))
    return chains, rules


def _our_chains(chains, instance: str | None) -> list[str]:
    if instance is None:
        return [c for c in chains if c.startswith((PRE_CHAIN_PREFIX, OUT_CHAIN_PREFIX))]
    return [c for c in chain_names(instance) if c in chains]


def cleanup_leftovers(instance: str | None = "default") -> list[str]:
    """Remove our chains and the jumps to them (of `instance`, or of every instance if None),
    e.g. left by a crashed run, in one transaction. Returns the chains removed ([] = clean)."""
    if instance is not None:
        chain_names(instance)   # validate
    chains, rules = _parse_save(iptables_save())
    ours = set(_our_chains(chains, instance))
    if instance is None:
        jump_targets = {t for _, _, t, _ in rules if t and t.startswith((PRE_CHAIN_PREFIX, OUT_CHAIN_PREFIX))}
        ours |= jump_targets & set(chains)
    jumps = [rule for chain, rule, target, _ in rules if target in ours and chain not in ours]
    if not ours and not jumps:
        return []
    text = ["*raw"]
    text += ["-D" + rule[2:] for rule in jumps]
    text += [f"-F {c}" for c in sorted(ours)] + [f"-X {c}" for c in sorted(ours)]
    _restore("\n".join(text + ["COMMIT", ""]))
    log.info("removed iptables chains %s and %d jump(s)", sorted(ours), len(jumps))
    return sorted(ours)


class Rules:
    """The raw-table rules of one lvs-dp instance in the current namespace.

    ``Rules(0)`` uses queue 0; ``Rules((4, 2))`` or ``Rules([4, 5])`` queues 4 and 5, steered by
    the client address (see the module docstring); ``fragments=False`` leaves non-first fragments unqueued.
    Context manager: `remove` on exit."""

    def __init__(self, queue_spec=0, instance: str = "default", *, fragments: bool = True,
                 position: str | None = None):
        if position not in (None, "first", "last"):
            raise ValueError("position is 'first', 'last' or None (automatic)")
        self.queue_spec = QueueSpec.parse(queue_spec)
        self.fragments = fragments
        self.position = position
        self.instance = instance
        self.pre_chain, self.out_chain = chain_names(instance)
        self.matches: list[Match] = []
        self._installed = False

    def queue_for(self, key: int) -> int:
        return self.queue_spec.queue_for(key)

    def jump_first(self, matches) -> bool:
        """Our jumps go first in the base chains, unless told otherwise (``position``) or a
        fwmark match needs the marking rules of raw PREROUTING to run before ours."""
        if self.position is not None:
            return self.position == "first"
        return not any(m.fwmark for m in matches)

    def render(self, matches, with_jumps: bool = True) -> str:
        """The iptables-restore (--noflush) text that installs `matches`. Declaring a chain
        flushes it, so the same text also replaces the rules of an installed instance."""
        chains = render_chains(matches, self.queue_spec, self.instance, self.fragments)
        lines = ["*raw"] + [f":{c} - [0:0]" for c in chains]
        for c in chains:
            lines += chains[c]
        if with_jumps:
            first = self.jump_first(matches)
            lines.append(_jump_line("PREROUTING", self.pre_chain, self.instance, first))
            lines.append(_jump_line("OUTPUT", self.out_chain, self.instance, first))
        return "\n".join(lines + ["COMMIT", ""])

    def install(self, matches, queues=None) -> None:
        """Install our chains and jumps for `matches` (a list of `Match`) atomically, after
        removing leftovers of the same instance; then check them with iptables-save. `queues`
        overrides the queue spec given to the constructor."""
        if queues is not None:
            self.queue_spec = QueueSpec.parse(queues)
        matches = list(dict.fromkeys(matches))
        text = self.render(matches)
        left = cleanup_leftovers(self.instance)
        if left:
            log.warning("instance %s: removed leftover chains %s (a crashed run?)", self.instance, left)
        _restore(text)
        self.matches = matches
        self._installed = True
        self.verify()
        log.info("installed %d match(es) on queue(s) %d..%d as %s/%s", len(matches),
                 self.queue_spec.first, self.queue_spec.queues[-1], self.pre_chain, self.out_chain)

    def replace(self, matches) -> None:
        """Swap the rules of an installed instance for `matches` in one transaction (reload)."""
        matches = list(dict.fromkeys(matches))
        chains, rules = _parse_save(iptables_save())
        if self.pre_chain not in chains:
            return self.install(matches)
        _restore(self.render(matches, with_jumps=False))
        self.matches = matches
        self.verify()

    def verify(self) -> None:
        """Read the rules back with iptables-save: each chain holds as many rules as rendered and
        each base chain jumps to ours exactly once."""
        expect = render_chains(self.matches, self.queue_spec, self.instance, self.fragments)
        chains, rules = _parse_save(iptables_save())
        for c, lines in expect.items():
            if c not in chains:
                raise RulesError(f"chain {c} missing after install")
            got = sum(1 for chain, *_ in rules if chain == c)
            if got != len(lines):
                raise RulesError(f"chain {c}: {got} rules installed, {len(lines)} expected")
        for base, c in (("PREROUTING", self.pre_chain), ("OUTPUT", self.out_chain)):
            n = sum(1 for chain, _, target, _ in rules if chain == base and target == c)
            if n != 1:
                raise RulesError(f"{base} jumps to {c} {n} times, expected once")

    def installed(self) -> list[str]:
        """Our lines of ``iptables-save -t raw``: rules in our chains and the jumps to them."""
        ours = {self.pre_chain, self.out_chain}
        _, rules = _parse_save(iptables_save())
        return [rule for chain, rule, target, _ in rules if chain in ours or target in ours]

    def counters(self) -> list[tuple[int, int, str]]:
        """(packets, bytes, rule) for every rule of our chains, from ``iptables-save -c``."""
        ours = {self.pre_chain, self.out_chain}
        _, rules = _parse_save(iptables_save(counters=True))
        res = []
        for chain, rule, _, line in rules:
            if chain in ours:
                m = re.match(r"\[(\d+):(\d+)\]", line)
                res.append((int(m.group(1)), int(m.group(2)), rule) if m else (0, 0, rule))
        return res

    def remove(self) -> list[str]:
        """Delete our chains and jumps. Idempotent; returns the chains removed."""
        self._installed = False
        return cleanup_leftovers(self.instance)

    def __enter__(self) -> "Rules":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# --- local addresses ---------------------------------------------------------------------------------
def local_addresses() -> dict[str, str]:
    """Every address configured in this namespace (``ip -j addr``): address -> interface."""
    out = _run(["ip", "-j", "addr", "show"]).stdout
    addrs = {}
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            if "local" in a:
                addrs[a["local"]] = link.get("ifname", "?")
    return addrs


def warn_not_local(addrs) -> list[str]:
    """Log a warning for each of `addrs` (VIPs, local addresses) not configured here; returns
    them. Not an error: keepalived's VRRP may add a VIP later."""
    local = local_addresses()
    missing = [a for a in dict.fromkeys(addrs) if a not in local]
    for a in missing:
        log.warning("address %s is not configured in this namespace: packets to it are not "
                    "delivered here until it is (VRRP backup?)", a)
    return missing


# --- sysctls -----------------------------------------------------------------------------------------
PROC_SYS = Path("/proc/sys")
CONF_SETTINGS = {"accept_local": "1", "rp_filter": "0", "send_redirects": "0"}
GLOBAL_SETTINGS = {"net/ipv4/ip_forward": "1"}


def _dotted(key: str) -> str:
    # interface names may contain dots; show them the way sysctl(8) does, with a slash
    parts = key.split("/")
    return ".".join(p.replace(".", "/") for p in parts)


def netns_identity() -> str:
    """Name of the current network namespace (as ``ip netns identify``), "root" for init's, or
    "ino<N>" for an unnamed one."""
    me = os.stat("/proc/self/ns/net")
    try:
        if os.stat("/proc/1/ns/net").st_ino == me.st_ino:
            return "root"
    except OSError:
        pass
    try:
        for name in sorted(os.listdir("/run/netns")):
            try:
                st = os.stat(os.path.join("/run/netns", name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
                return name
    except FileNotFoundError:
        pass
    return f"ino{me.st_ino}"


def default_state_path(instance: str = "default") -> Path:
    """Where a run of `instance` in this namespace keeps the sysctls it changed."""
    chain_names(instance)
    return Path("/run/lvs-dp") / f"sysctl-{netns_identity()}-{instance}.json"


class Sysctls:
    """Set the sysctls the balancer needs in this namespace; restore the originals on exit.

    ``with Sysctls("default"):`` writes the originals to a state file before changing anything
    (`state_path`, default `default_state_path(instance)`; False = none); if that file already
    exists a crashed run left it, and it is restored first. `extra` adds settings
    ({"net/ipv4/...": "value"}); `ifaces` limits the per-interface settings (default: every
    interface in /proc/sys/net/ipv4/conf). Interfaces created later inherit "default".
    (A path given as first argument is taken as `state_path`.)"""

    def __init__(self, instance: str = "default", state_path: str | os.PathLike | bool | None = None,
                 *, extra: dict | None = None, ifaces=None):
        if isinstance(instance, os.PathLike) or "/" in str(instance):
            instance, state_path = "default", instance
        self.instance = instance
        if state_path is None:
            state_path = default_state_path(instance)
        self.state_path = Path(state_path) if state_path else None
        self.extra = dict(extra or {})
        self.ifaces = list(ifaces) if ifaces is not None else None
        self.original: dict[str, str] = {}
        self.applied = False

    def wanted(self) -> dict[str, str]:
        want = dict(GLOBAL_SETTINGS)
        conf = PROC_SYS / "net/ipv4/conf"
        ifaces = self.ifaces if self.ifaces is not None else sorted(
            p.name for p in conf.iterdir() if p.name not in ("all", "default"))
        for scope in ["all", "default", *ifaces]:
            for k, v in CONF_SETTINGS.items():
                want[f"net/ipv4/conf/{scope}/{k}"] = v
        want.update(self.extra)
        return want

    @staticmethod
    def read(key: str) -> str:
        return (PROC_SYS / key).read_text().strip()

    @staticmethod
    def write(key: str, value: str) -> None:
        (PROC_SYS / key).write_text(f"{value}\n")

    def apply(self) -> dict[str, tuple[str, str]]:
        """Set every wanted value; returns {key: (old, new)} of what changed."""
        if self.state_path and self.state_path.exists():
            log.warning("restoring sysctls left by an earlier run (%s)", self.state_path)
            self.restore_from(self.state_path)
        want = self.wanted()
        self.original = {k: self.read(k) for k in want}
        if self.state_path:
            self.save_state(self.state_path)
        changed = {}
        self.applied = True
        for k, v in want.items():
            old = self.original[k]
            if old != v:
                self.write(k, v)
                changed[k] = (old, v)
                log.info("sysctl %s: %s -> %s", _dotted(k), old, v)
        return changed

    def save_state(self, path) -> None:
        """Write the original values (atomically) so another run can restore them."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": 1, "netns": netns_identity(), "pid": os.getpid(),
               "original": self.original}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def restore_from(cls, path) -> int:
        """Restore the originals recorded in `path` (keys that vanished, e.g. deleted interfaces,
        are skipped) and delete the file. Returns the number of values written."""
        path = Path(path)
        doc = json.loads(path.read_text())
        if doc.get("netns") not in (None, netns_identity()):
            log.warning("%s was written in namespace %s, restoring in %s", path, doc.get("netns"),
                        netns_identity())
        n = cls._write_back(doc.get("original", {}))
        path.unlink(missing_ok=True)
        return n

    @classmethod
    def _write_back(cls, original: dict) -> int:
        n = 0
        for k, v in reversed(list(original.items())):
            try:
                cur = cls.read(k)
            except FileNotFoundError:
                log.debug("sysctl %s gone, not restored", _dotted(k))
                continue
            if cur != v:
                cls.write(k, v)
                log.info("sysctl %s: %s -> %s (restored)", _dotted(k), cur, v)
                n += 1
        return n

    def restore(self) -> int:
        """Put the original values back and delete the state file."""
        if not self.applied:
            return 0
        n = self._write_back(self.original)
        self.applied = False
        if self.state_path:
            self.state_path.unlink(missing_ok=True)
        return n

    def __enter__(self) -> "Sysctls":
        self.apply()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


# --- command line (for tests and for poking at a namespace by hand) ------------------------------
def _main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m control.rules",
                                description="lvs-dp iptables rules and sysctls, current namespace")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("install", "render"):
        s = sub.add_parser(name, help=f"{name} rules (install leaves them in place)")
        s.add_argument("--instance", default="default")
        s.add_argument("--queues", default="0", help="N or FIRST:LAST")
        s.add_argument("--in", dest="ins", action="append", default=[],
                       metavar="PROTO:ADDR[:PORT[:STEER]]")
        s.add_argument("--out", dest="outs", action="append", default=[],
                       metavar="PROTO:ADDR[:PORT[:STEER]]")
        s.add_argument("--fwmark", dest="marks", action="append", default=[], metavar="PROTO:MARK")
    for name in ("remove", "show", "counters"):
        s = sub.add_parser(name)
        s.add_argument("--instance", default="default")
    s = sub.add_parser("cleanup", help="remove leftovers of an instance (or --all)")
    s.add_argument("--instance", default="default")
    s.add_argument("--all", action="store_true")
    for name in ("sysctl-apply", "sysctl-restore"):
        s = sub.add_parser(name)
        s.add_argument("--state", required=True)
    sub.add_parser("addrs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    if args.cmd in ("install", "render"):
        matches = [Match.parse("in", t) for t in args.ins] + [Match.parse("out", t) for t in args.outs]
        matches += [Match("in", t.split(":")[0], None, fwmark=int(t.split(":")[1], 0))
                    for t in args.marks]
        r = Rules(args.queues, args.instance)
        if args.cmd == "render":
            sys.stdout.write(r.render(matches))
        else:
            r.install(matches)
            print("\n".join(r.installed()))
    elif args.cmd == "remove":
        print(" ".join(Rules(0, args.instance).remove()))
    elif args.cmd == "show":
        print("\n".join(Rules(0, args.instance).installed()))
    elif args.cmd == "counters":
        for pk, by, rule in Rules(0, args.instance).counters():
            print(pk, by, rule)
    elif args.cmd == "cleanup":
        print(" ".join(cleanup_leftovers(None if args.all else args.instance)))
    elif args.cmd == "sysctl-apply":
        s = Sysctls(state_path=args.state)
        changed = s.apply()
        print(json.dumps({_dotted(k): v for k, v in changed.items()}))
    elif args.cmd == "sysctl-restore":
        print(Sysctls.restore_from(args.state))
    elif args.cmd == "addrs":
        for a, dev in local_addresses().items():
            print(a, dev)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
