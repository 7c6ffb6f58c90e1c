"""SYN-proxy settings: the Alibaba patch's ``net.ipv4.vs.synproxy_*`` sysctls as one frozen
dataclass, and the int64 row the data plane reads (dataplane/synproxy.py ``SPC_*`` slots).

Where each setting comes from
-----------------------------
keepalived (Alibaba's patched check_parser.c) has a single SYN-proxy keyword, ``syn_proxy`` in a
``virtual_server`` block (lvs-dp: ``VirtualServer.syn_proxy`` -> ``SVC_F_SYNPROXY``). Everything
else is global, set through ``/proc/sys/net/ipv4/vs/`` on the patched kernel; `SYSCTL_NAMES`
maps each field to its sysctl and `DPVS_NAMES` to DPVS's ``synproxy { ... }`` keyword. Defaults
are the patch's (``include/net/ip_vs_synproxy.h``, ``ip_vs_ctl.c``), with one deliberate
difference:

* ``timestamp`` is 1, not 0. lvs-dp's cookies follow the mainline kernel's: window scale and
  SACK-permitted travel in the SYN-ACK's timestamp (the patch spends cookie bits on them
  instead). Without timestamps they are lost, so the patch's default would silently turn SACK
  off for every proxied connection.
* ``wscale`` is the *shift offered* to clients, 0 meaning "no window-scale option" (the patch's
  default; the brief's "wscale 1" is not the patch's value). A non-zero shift is supported:
  lvs-dp rescales the real server's windows by the difference (dataplane/synproxy.py).

`validate` applies the sysctls' ranges (``proc_dointvec_minmax`` extra1/extra2 in ip_vs_ctl.c).

Where an operator sets them
---------------------------
lvs-dp has no /proc/sys: the values come from the config's top-level ``synproxy { }`` block
(control/parser.py ``_root_synproxy``; keepalived warns about the unknown block and skips it)
and ``lvs-dp run --synproxy NAME=VALUE``, which wins. Either accepts every spelling in `NAMES`
(field, bare or full sysctl name, DPVS's flat keyword; `field_for`) and on/off for the flags
(`read_value`). control/daemon.py ``Daemon._apply_synproxy`` merges defaults, file and command
line (`with_values`) into Config.sp_cfg at start and on every reload.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from dataplane import consts as C
from dataplane import synproxy as S


@dataclass(frozen=True)
class SynproxySettings:
    init_mss: int = 1452                # synproxy_init_mss: MSS upper bound offered to clients
    sack: bool = True                   # synproxy_sack: offer SACK-permitted
    wscale: int = 0                     # synproxy_wscale: shift offered, 0 = no window scaling
    timestamp: bool = True              # synproxy_timestamp (patch: 0; see module docstring)
    synack_ttl: int = 63                # synproxy_synack_ttl
    defer: bool = False                 # synproxy_defer: wait for an ACK that carries data
    conn_reuse: bool = True             # synproxy_conn_reuse: master switch of the five below
    conn_reuse_close: bool = True       # synproxy_conn_reuse_close
    conn_reuse_time_wait: bool = True   # synproxy_conn_reuse_time_wait
    conn_reuse_fin_wait: bool = False   # synproxy_conn_reuse_fin_wait
    conn_reuse_close_wait: bool = False  # synproxy_conn_reuse_close_wait
    conn_reuse_last_ack: bool = False   # synproxy_conn_reuse_last_ack
    ack_store_max: int = 3              # synproxy_ack_skb_store_thresh: ACKs held in SYN_SENT
    ack_storm_thresh: int = 10          # synproxy_ack_storm_thresh: 0 disables
    syn_retry: int = 3                  # synproxy_syn_retry: SYN retransmissions to the RS
    cookie_max_age: int = S.COUNTER_TRIES   # minutes a cookie stays valid (kernel constant)
    synack_window: int = -1             # SYN-ACK window, -1 = echo the client's (the patch)

    def validate(self) -> list[str]:
        """Problems with the values, one message each (empty: valid)."""
        return [f"{SYSCTL_NAMES.get(name, name)}: {msg}" for name, msg in self.field_errors()]

    def field_errors(self) -> list[tuple[str, str]]:
        """(field, "V is outside LO..HI") for each value out of its range."""
        errs = []
        for name, lo, hi in _RANGES:
            v = int(getattr(self, name))
            if not lo <= v <= hi:
                errs.append((name, f"{v} is outside {lo}..{hi}"))
        return errs

    def values(self) -> dict[str, int]:
        """Every field as an int, by field name (what `lvs-dp list --json` shows)."""
        return {f.name: int(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def reuse_states_mask(self) -> int:
        """Bit (1 << IP_VS_TCP_S_*) for each state whose entry a cookie-valid ACK may reuse
        (the patch's tcp_conn_reuse_states); 0 when conn_reuse is off."""
        if not self.conn_reuse:
            return 0
        m = 0
        for flag, state in ((self.conn_reuse_close, C.IP_VS_TCP_S_CLOSE),
                            (self.conn_reuse_time_wait, C.IP_VS_TCP_S_TIME_WAIT),
                            (self.conn_reuse_fin_wait, C.IP_VS_TCP_S_FIN_WAIT),
                            (self.conn_reuse_close_wait, C.IP_VS_TCP_S_CLOSE_WAIT),
                            (self.conn_reuse_last_ack, C.IP_VS_TCP_S_LAST_ACK)):
            if flag:
                m |= 1 << state
        return m

    def as_array(self) -> np.ndarray:
        """The int64[N_SPC] row the data plane reads (dataplane.synproxy.SPC_* slots)."""
        a = np.zeros(S.N_SPC, np.int64)
        a[S.SPC_INIT_MSS] = self.init_mss
        a[S.SPC_SACK] = int(self.sack)
        a[S.SPC_WSCALE] = self.wscale
        a[S.SPC_TIMESTAMP] = int(self.timestamp)
        a[S.SPC_SYNACK_TTL] = self.synack_ttl
        a[S.SPC_DEFER] = int(self.defer)
        a[S.SPC_REUSE_STATES] = self.reuse_states_mask()
        a[S.SPC_ACK_STORE_MAX] = self.ack_store_max
        a[S.SPC_ACK_STORM_THRESH] = self.ack_storm_thresh
        a[S.SPC_SYN_RETRY] = self.syn_retry
        a[S.SPC_MAX_AGE] = self.cookie_max_age
        a[S.SPC_SYNACK_WIN] = self.synack_window
        return a

    def to_sysctls(self) -> dict[str, int]:
        """``{"net.ipv4.vs.synproxy_init_mss": 1452, ...}`` for the fields the patch has."""
        return {SYSCTL_NAMES[f.name]: int(getattr(self, f.name))
                for f in dataclasses.fields(self) if f.name in SYSCTL_NAMES}

    @classmethod
    def from_sysctls(cls, values: dict[str, int | str]) -> SynproxySettings:
        """Settings from sysctl names (full ``net.ipv4.vs.x`` or bare ``x``; ``/`` or ``.``);
        unknown names raise ValueError, missing ones keep their default."""
        by_sysctl = {v.rsplit(".", 1)[1]: k for k, v in SYSCTL_NAMES.items()}
        kw = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in values.items():
            short = name.replace("/", ".").rsplit(".", 1)[-1]
            field = by_sysctl.get(short)
            if field is None:
                raise ValueError(f"{name}: not a SYN-proxy sysctl")
            v = int(value)
            kw[field] = bool(v) if types[field] in (bool, "bool") else v
        return cls(**kw)


SYSCTL_PREFIX = "net.ipv4.vs."
SYSCTL_NAMES = {name: SYSCTL_PREFIX + sysctl for name, sysctl in (
    ("init_mss", "synproxy_init_mss"),
    ("sack", "synproxy_sack"),
    ("wscale", "synproxy_wscale"),
    ("timestamp", "synproxy_timestamp"),
    ("synack_ttl", "synproxy_synack_ttl"),
    ("defer", "synproxy_defer"),
    ("conn_reuse", "synproxy_conn_reuse"),
    ("conn_reuse_close", "synproxy_conn_reuse_close"),
    ("conn_reuse_time_wait", "synproxy_conn_reuse_time_wait"),
    ("conn_reuse_fin_wait", "synproxy_conn_reuse_fin_wait"),
    ("conn_reuse_close_wait", "synproxy_conn_reuse_close_wait"),
    ("conn_reuse_last_ack", "synproxy_conn_reuse_last_ack"),
    ("ack_store_max", "synproxy_ack_skb_store_thresh"),
    ("ack_storm_thresh", "synproxy_ack_storm_thresh"),
    ("syn_retry", "synproxy_syn_retry"),
)}

# DPVS (src/ipvs/ip_vs_synproxy.c install_synproxy_keywords): synproxy { synack_options { ... } ...}
DPVS_NAMES = {
    "init_mss": "synack_options/mss",
    "synack_ttl": "synack_options/ttl",
    "sack": "synack_options/sack",
    "wscale": "synack_options/wscale",        # an on/off flag in DPVS
    "timestamp": "synack_options/timestamp",
    "defer": "defer_rs_syn",
    "syn_retry": "rs_syn_max_retry",
    "ack_storm_thresh": "ack_storm_thresh",
    "ack_store_max": "max_ack_saved",
    "conn_reuse": "conn_reuse_state",
    "conn_reuse_close": "conn_reuse_state/close",
    "conn_reuse_time_wait": "conn_reuse_state/time_wait",
    "conn_reuse_fin_wait": "conn_reuse_state/fin_wait",
    "conn_reuse_close_wait": "conn_reuse_state/close_wait",
    "conn_reuse_last_ack": "conn_reuse_state/last_ack",
}

# (field, min, max): the patch's sysctl bounds; the last three are lvs-dp's.
_RANGES = (
    ("init_mss", 0, 65535),
    ("sack", 0, 1),
    ("wscale", 0, S.TCP_MAX_WSCALE),
    ("timestamp", 0, 1),
    ("synack_ttl", 1, 255),
    ("defer", 0, 1),
    ("conn_reuse", 0, 1),
    ("conn_reuse_close", 0, 1),
    ("conn_reuse_time_wait", 0, 1),
    ("conn_reuse_fin_wait", 0, 1),
    ("conn_reuse_close_wait", 0, 1),
    ("conn_reuse_last_ack", 0, 1),
    ("ack_store_max", 0, 5),
    ("ack_storm_thresh", 0, 65535),
    ("syn_retry", 0, 6),
    ("cookie_max_age", 1, 255),
    ("synack_window", -1, 65535),
)


# --- names an operator may use: the config's ``synproxy { }`` block and ``lvs-dp run --synproxy`` --
BOOL_FIELDS = frozenset(f.name for f in dataclasses.fields(SynproxySettings) if f.type in (bool, "bool"))

# Every spelling of a field: its own name, the sysctl's name (bare: ``synproxy_init_mss``) and
# DPVS's flat keyword where DPVS has one (DPVS's sub-blocks, ``synack_options { }`` and
# ``conn_reuse_state { }``, are the parser's: control/parser.py _root_synproxy).
NAMES = {name: name for name in SynproxySettings.__dataclass_fields__}
NAMES.update({sysctl.rsplit(".", 1)[1]: name for name, sysctl in SYSCTL_NAMES.items()})
NAMES.update({dpvs: name for name, dpvs in DPVS_NAMES.items() if "/" not in dpvs})

_TRUE = ("on", "yes", "true", "1")
_FALSE = ("off", "no", "false", "0")


def field_for(name: str) -> str | None:
    """The field a name means: ``init_mss``, ``synproxy_init_mss``, ``net.ipv4.vs.synproxy_init_mss``,
    ``net/ipv4/vs/synproxy_init_mss`` or DPVS's ``rs_syn_max_retry``; None if none."""
    return NAMES.get(name.replace("/", ".").rsplit(".", 1)[-1])


def read_value(field: str, text: str) -> int:
    """A value as given for `field`: an integer, or for the on/off fields also on/off, yes/no,
    true/false. Raises ValueError saying what was expected (ranges are `field_errors`')."""
    t = text.strip().lower()
    if field in BOOL_FIELDS:
        if t in _TRUE:
            return 1
        if t in _FALSE:
            return 0
        raise ValueError(f"invalid value '{text}' (expected on|off)")
    if not re.fullmatch(r"[+-]?[0-9]+", t):
        raise ValueError(f"invalid number '{text}'")
    return int(t)


def parse_assignment(text: str) -> tuple[str, int]:
    """``NAME=VALUE`` (``lvs-dp run --synproxy``) -> (field, value), range-checked; ValueError
    with a message naming NAME otherwise."""
    name, sep, value = text.partition("=")
    field = field_for(name.strip()) if sep else None
    if field is None:
        raise ValueError(f"{text!r}: expected NAME=VALUE with NAME one of "
                         f"{', '.join(sorted(SYSCTL_NAMES))} (or the short names)")
    try:
        v = read_value(field, value)
    except ValueError as e:
        raise ValueError(f"{name.strip()}: {e}") from None
    errs = with_values(SynproxySettings(), {field: v}).field_errors()
    if errs:
        raise ValueError(f"{name.strip()}: {errs[0][1]}")
    return field, v


def with_values(base: SynproxySettings, values: dict[str, int]) -> SynproxySettings:
    """`base` with some fields replaced (values by field name, ints; on/off fields as 0/1)."""
    return dataclasses.replace(base, **{k: bool(v) if k in BOOL_FIELDS else int(v)
                                        for k, v in values.items()})
