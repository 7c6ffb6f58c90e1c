"""Writes the data plane's Config tables (dataplane/tables.py) from the control plane's view of
services and real servers, as deltas: a service or real server keeps its id for its whole life,
so reloads and health changes touch only the rows that change and never disturb connections.

`ServiceSpec` / `DestSpec` are the flattened form the tables need (one per concrete
addr:port or fwmark service, groups already expanded); control/model.py's parsed config is turned
into them by `specs_from_config`.
"""

from dataclasses import dataclass, field

import numpy as np

from dataplane import consts as C
from dataplane import tables as T
from dataplane.pipeline import svc_slot
from control.rings import build_ring


@dataclass
class DestSpec:
    addr: str
    port: int
    weight: int = 1
    fwd: int = C.FWD_MASQ
    u_threshold: int = 0
    l_threshold: int = 0
    inhibit: bool = False       # inhibit_on_failure: stays listed at weight 0 when down

    @property
    def key(self):
        return (self.addr, self.port)


@dataclass
class ServiceSpec:
    proto: int                  # IPPROTO_TCP / IPPROTO_UDP
    addr: str | None            # VIP, None for fwmark
    port: int
    fwmark: int = 0
    sched: int = C.SCHED_WLC
    fwd: int = C.FWD_MASQ
    flags: int = 0
    persist_timeout_s: int = 0
    persist_mask: str = "255.255.255.255"
    dests: list = field(default_factory=list)
    sorry: DestSpec | None = None
    laddrs: list = field(default_factory=list)   # FULLNAT local addresses
    source: str = ""            # FILE:LINE of the virtual_server, for messages

    @property
    def key(self):
        if self.fwmark:
            return ("FWM", self.fwmark)
        return (C.PROTO_NAMES[self.proto], self.addr, self.port)

    def name(self):
        if self.fwmark:
            return f"FWM  {self.fwmark}"
        return f"{C.PROTO_NAMES[self.proto]}  {self.addr}:{self.port}"


FNAT_TIMESTAMP_MODES = ("strip", "translate")


class TableWriter:
    """Owns id allocation and writes Config rows. Not thread-safe: one control thread calls it."""

    def __init__(self, cfg, on_new_laddr=None, fnat_timestamp="strip"):
        self.cfg = cfg
        # FULLNAT timestamps towards real servers, for every FULLNAT service: "strip" (the
        # patch's fullnat_timestamp_remove_entry 1) or "translate" (SVC_F_FNAT_TS_XLATE).
        if fnat_timestamp not in FNAT_TIMESTAMP_MODES:
            raise ValueError(f"fnat_timestamp must be one of {FNAT_TIMESTAMP_MODES}")
        self.fnat_timestamp = fnat_timestamp
        # FULLNAT local addresses keep one id for their life, shared by every service whose
        # pool holds them, so each worker's port FIFO of an address survives reloads.
        self.laddr_ids = {}      # address -> laddr id
        self._free_laddr = list(range(T.MAX_LADDR - 1, 0, -1))
        self.on_new_laddr = on_new_laddr      # callback(laddr_id, addr): set up worker state
        self.svc_ids = {}        # service key -> id
        self.dest_ids = {}       # (service key, dest key, is_sorry) -> id
        self.specs = {}          # service key -> ServiceSpec
        self.available = {}      # dest id -> bool (health)
        self._free_svc = list(range(T.MAX_SVC - 1, 0, -1))
        self._free_dest = list(range(T.MAX_DEST - 1, 0, -1))

    # -- service hash ------------------------------------------------------------------------
    def _hkey(self, spec):
        if spec.fwmark:
            return T.fwmark_key(spec.fwmark)
        return T.svc_key(spec.proto, T.ip2int(spec.addr), spec.port)

    def _hash_insert(self, key, sid):
        hk, hv = self.cfg.svc_hkey, self.cfg.svc_hval
        mask = len(hk) - 1
        i = int(svc_slot(key, mask))
        while hk[i] != 0 and hk[i] != key:
            i = (i + 1) & mask
        hv[i] = sid
        hk[i] = key

    def _hash_delete(self, key):
        """Remove and re-insert the rest of the probe run (the table is small)."""
        hk, hv = self.cfg.svc_hkey, self.cfg.svc_hval
        mask = len(hk) - 1
        i = int(svc_slot(key, mask))
        while hk[i] != 0 and hk[i] != key:
            i = (i + 1) & mask
        if hk[i] == 0:
            return
        hk[i] = 0
        hv[i] = 0
        j = (i + 1) & mask
        while hk[j] != 0:
            k, v = int(hk[j]), int(hv[j])
            hk[j] = 0
            hv[j] = 0
            self._hash_insert(k, v)
            j = (j + 1) & mask

    # -- deltas ------------------------------------------------------------------------------
    def sync(self, specs):
        """Make the tables match `specs` (a list of ServiceSpec). Returns a list of change lines."""
        changes = []
        wanted = {s.key: s for s in specs}
        for key in list(self.svc_ids):
            if key not in wanted:
                self._remove_service(key)
                changes.append(f"removed service {key}")
        for key, spec in wanted.items():
            if key not in self.svc_ids:
                if not self._free_svc:
                    raise ValueError(f"{spec.source}: too many services (max {T.MAX_SVC - 1})")
                sid = self._free_svc.pop()
                self.svc_ids[key] = sid
                changes.append(f"added service {spec.name()}")
            self._write_service(spec)
        return changes

    def _remove_service(self, key):
        sid = self.svc_ids.pop(key)
        spec = self.specs.pop(key)
        self._hash_delete(self._hkey(spec))
        for dk in [k for k in self.dest_ids if k[0] == key]:
            did = self.dest_ids.pop(dk)
            self.cfg.dest[did] = np.zeros((), T.DEST_DTYPE)
            self.available.pop(did, None)
            self._free_dest.append(did)
        self.cfg.svc[sid] = np.zeros((), T.SERVICE_DTYPE)
        self.cfg.svc_dests[sid, :] = 0
        self.cfg.ring[sid, :] = 0

    def _dest_id(self, skey, dspec, sorry):
        k = (skey, dspec.key, sorry)
        if k not in self.dest_ids:
            if not self._free_dest:
                raise ValueError(f"too many real servers (max {T.MAX_DEST - 1})")
            did = self._free_dest.pop()
            self.dest_ids[k] = did
            self.available[did] = True     # a new real server is up until a checker says not
        return self.dest_ids[k]

    def _write_service(self, spec):
        cfg = self.cfg
        sid = self.svc_ids[spec.key]
        old = self.specs.get(spec.key)
        self.specs[spec.key] = spec
        if len(spec.dests) > T.MAX_DEST_PER_SVC - 1:
            raise ValueError(f"{spec.source}: too many real servers in one service")
        # Real servers that left the service.
        keep = {(spec.key, d.key, False) for d in spec.dests}
        if spec.sorry:
            keep.add((spec.key, spec.sorry.key, True))
        for dk in [k for k in self.dest_ids if k[0] == spec.key and k not in keep]:
            did = self.dest_ids.pop(dk)
            cfg.dest[did] = np.zeros((), T.DEST_DTYPE)
            self.available.pop(did, None)
            self._free_dest.append(did)
        ids = []
        for d in spec.dests:
            did = self._dest_id(spec.key, d, False)
            self._write_dest(did, sid, d, 0)
            ids.append(did)
        sorry_id = 0
        if spec.sorry:
            sorry_id = self._dest_id(spec.key, spec.sorry, True)
            self._write_dest(sorry_id, sid, spec.sorry, C.DEST_F_SORRY)
        row = cfg.svc[sid]
        cfg.svc_dests[sid, :len(ids)] = ids
        cfg.svc_dests[sid, len(ids):] = 0
        row["n_dests"] = len(ids)
        row["fwd"] = spec.fwd
        row["sched"] = spec.sched
        row["addr"] = T.ip2int(spec.addr) if spec.addr else 0
        row["fwmark"] = spec.fwmark
        row["port"] = spec.port
        row["sorry_dest"] = sorry_id
        self._write_laddrs(sid, spec)
        flags = spec.flags
        if spec.fwd == C.FWD_FULLNAT and self.fnat_timestamp == "translate":
            flags |= C.SVC_F_FNAT_TS_XLATE
        row["flags"] = flags
        row["persist_timeout_s"] = spec.persist_timeout_s
        row["persist_mask"] = T.ip2int(spec.persist_mask)
        row["gen"] += 1
        self._rebuild_ring(sid, spec)
        # The proto goes last: it marks the row in use, and the hash entry makes it reachable.
        row["proto"] = spec.proto
        if old is None:
            self._hash_insert(self._hkey(spec), sid)

    def _write_laddrs(self, sid, spec):
        if len(spec.laddrs) > T.MAX_LADDR_PER_SVC:
            raise ValueError(f"{spec.source}: more than {T.MAX_LADDR_PER_SVC} local addresses")
        ids = []
        for a in spec.laddrs:
            lid = self.laddr_ids.get(a)
            if lid is None:
                if not self._free_laddr:
                    raise ValueError(f"{spec.source}: more than {T.MAX_LADDR - 1} local addresses")
                lid = self._free_laddr.pop()
                self.laddr_ids[a] = lid
                self.cfg.laddr[lid] = T.ip2int(a)
                if self.on_new_laddr:
                    self.on_new_laddr(lid, a)      # before any service can reach it
            ids.append(lid)
        row = self.cfg.svc[sid]
        self.cfg.svc_laddrs[sid, :len(ids)] = ids
        self.cfg.svc_laddrs[sid, len(ids):] = 0
        row["n_laddrs"] = len(ids)

    def _write_dest(self, did, sid, d, extra_flags):
        row = self.cfg.dest[did]
        row["addr"] = T.ip2int(d.addr)
        row["port"] = d.port
        row["fwd"] = d.fwd
        row["weight"] = d.weight
        row["u_threshold"] = d.u_threshold
        row["l_threshold"] = d.l_threshold
        row["flags"] = extra_flags | (C.DEST_F_AVAILABLE if self.available.get(did, True) else 0)
        row["svc"] = sid

    def _rebuild_ring(self, sid, spec):
        cfg = self.cfg
        ids, weights, keys = [], [], []
        for d in spec.dests:
            did = self.dest_ids[(spec.key, d.key, False)]
            if self.available.get(did, True) and cfg.dest[did]["weight"] > 0:
                ids.append(did)
                weights.append(int(cfg.dest[did]["weight"]))
                keys.append(f"{d.addr}:{d.port}")
        ring = build_ring(spec.sched, ids, weights, keys)
        # Write only the slots that change (Katran's way: in-flight lookups see old or new).
        cur = cfg.ring[sid]
        diff = np.nonzero(cur != ring)[0]
        cur[diff] = ring[diff]

    # -- health and runtime edits ------------------------------------------------------------
    def set_available(self, skey, dkey, up):
        did = self.dest_ids.get((skey, dkey, False))
        if did is None:
            return False
        self.available[did] = up
        row = self.cfg.dest[did]
        if up:
            row["flags"] |= C.DEST_F_AVAILABLE
        else:
            row["flags"] = int(row["flags"]) & ~C.DEST_F_AVAILABLE
        self._rebuild_ring(self.svc_ids[skey], self.specs[skey])
        return True

    def set_weight(self, skey, dkey, weight):
        did = self.dest_ids.get((skey, dkey, False))
        if did is None:
            return False
        self.cfg.dest[did]["weight"] = weight
        for d in self.specs[skey].dests:
            if d.key == dkey:
                d.weight = weight
        self._rebuild_ring(self.svc_ids[skey], self.specs[skey])
        return True


_LB_KIND = {"NAT": C.FWD_MASQ, "FNAT": C.FWD_FULLNAT, "DR": C.FWD_DROUTE, "TUN": C.FWD_TUNNEL}
# What the data plane forwards today; the others are parsed and reported by `lvs-dp check`.
SUPPORTED_FWD = (C.FWD_MASQ, C.FWD_FULLNAT)


def _mask(granularity):
    if not granularity:
        return "255.255.255.255"
    if "." not in granularity:          # prefix length spelling
        bits = int(granularity)
        return T.int2ip((0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF)
    return granularity


def specs_from_config(config):
    """Flatten the parsed model into ServiceSpecs. Returns (specs, notes): notes are
    "FILE:LINE: message" lines for what lvs-dp parses but does not act on."""
    specs, notes = [], []
    for vs in config.concrete_services():
        where = f"{vs.file}:{vs.line}"
        if vs.addr and ":" in vs.addr:
            notes.append(f"{where}: IPv6 service {vs.addr} not acted on (lvs-dp is IPv4 only)")
            continue
        proto = {"TCP": C.IPPROTO_TCP, "UDP": C.IPPROTO_UDP}.get(vs.protocol)
        if proto is None:
            notes.append(f"{where}: protocol {vs.protocol} not acted on (TCP and UDP only)")
            continue
        fwd = _LB_KIND.get(vs.lb_kind, C.FWD_MASQ)
        if fwd not in SUPPORTED_FWD:
            notes.append(f"{where}: lb_kind {vs.lb_kind} not acted on yet (lvs-dp forwards NAT and FNAT)")
            continue
        sched = C.SCHED_BY_NAME.get(vs.lb_algo)
        if sched is None:
            notes.append(f"{where}: lb_algo {vs.lb_algo} not implemented, using wlc")
            sched = C.SCHED_WLC
        flags = 0
        laddrs = []
        if fwd == C.FWD_FULLNAT:
            # The parser already reported a missing or undefined group as an error.
            laddrs = [a for a in config.local_address_groups.get(vs.laddr_group_name, ())
                      if ":" not in a]
            if vs.toa:
                flags |= C.SVC_F_TOA
            if vs.proxy_protocol == "v1":
                flags |= C.SVC_F_PROXY_V1
            elif vs.proxy_protocol == "v2":
                flags |= C.SVC_F_PROXY_V2
        if vs.syn_proxy:
            flags |= C.SVC_F_SYNPROXY
        if vs.persistence_timeout:
            flags |= C.SVC_F_PERSISTENT
        if "sh-port" in vs.lb_flags or "mh-port" in vs.lb_flags:
            flags |= C.SVC_F_SH_PORT
        port = vs.port or 0
        dests = []
        for rs in vs.real_servers:
            if ":" in rs.addr:
                notes.append(f"{rs.file}:{rs.line}: IPv6 real server {rs.addr} not acted on")
                continue
            dests.append(DestSpec(rs.addr, rs.port if rs.port is not None else port, rs.weight,
                                  fwd, rs.uthreshold or 0, rs.lthreshold or 0,
                                  rs.inhibit_on_failure))
        sorry = None
        if vs.sorry_server:
            sa, sp = vs.sorry_server
            sorry = DestSpec(sa, sp if sp is not None else port, 1, fwd)
        specs.append(ServiceSpec(
            proto=proto, addr=vs.addr if not vs.fwmark else None, port=port if not vs.fwmark else 0,
            fwmark=vs.fwmark or 0, sched=sched, fwd=fwd, flags=flags,
            persist_timeout_s=vs.persistence_timeout or 0,
            persist_mask=_mask(vs.persistence_granularity), dests=dests, sorry=sorry,
            laddrs=laddrs, source=where))
    return specs, notes


def expire_dest_conns(workers, dest_id):
    """IPVS's expire_nodest_conn: make every connection to a real server that went down expire
    now. The data plane then treats its next packet as having no connection (a SYN is scheduled
    afresh; anything else reaches the local stack, whose RST tells the client to reconnect). A
    worker may re-arm a row it is handling at this very moment; that connection then simply
    lives on until its next packet after this. Returns how many were expired."""
    n = 0
    for wk in workers:
        conn = wk.conn
        rows = np.nonzero((conn["dest"] == dest_id) & (conn["flags"] != 0)
                          & ((conn["flags"] & C.IP_VS_CONN_F_TEMPLATE) == 0))[0]
        conn["expire_ns"][rows] = 0
        n += len(rows)
    return n
