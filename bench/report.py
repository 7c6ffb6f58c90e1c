"""Turn pytest-benchmark's JSON into bench/RESULTS.md and PNG plots under bench/plots/.

    python -m bench.report bench/out/bench.json bench/RESULTS.md
    python -m bench.report bench/out/bench.json bench/out/synflood.json bench/RESULTS.md  # merged

Reads the measured numbers that the benchmarks store in ``extra_info`` (bench/bench_engine.py,
bench/bench_lab.py) and the run's context under ``"lvsdp"`` and ``machine_info`` (bench/
conftest.py). Targets come from the issue "Speed"; a target whose benchmark did not run or was
skipped is reported as not measured, never as met.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

ENGINE_TARGETS = {"4k": 100.0, "1M": 250.0, "fnat-4k": 100.0, "fnat-1M": 250.0}
ENGINE_LABEL = {"4k": "NAT, 4k conns", "1M": "NAT, 1M conns",
                "fnat-4k": "FULLNAT, 4k conns", "fnat-1M": "FULLNAT, 1M conns"}
MODE_LABEL = {
    "lvsdp-netlink": "lvs-dp (netlink, batched)",
    "lvsdp-nfqueue": "lvs-dp (netfilterqueue)",
    "kernel-nat": "kernel netfilter NAT",
    "kernel-ipvs": "kernel IPVS",
}
MODE_SHORT = {"lvsdp-netlink": "lvs-dp\nnetlink", "lvsdp-nfqueue": "lvs-dp\nnfqueue",
              "kernel-nat": "kernel\nNAT", "kernel-ipvs": "kernel\nIPVS"}
METRIC_SHORT = {"http_keepalive": "HTTP keep-alive", "http_keepalive_seg": "keep-alive,\n2 segments",
                "http_close": "new conns (HTTP)",
                "udp_pps": "UDP 64 B pps", "bulk_tcp": "bulk TCP"}
MODE_ORDER = ["lvsdp-netlink", "lvsdp-nfqueue", "kernel-nat", "kernel-ipvs"]
MODE_COLOR = {"lvsdp-netlink": "#1f77b4", "lvsdp-nfqueue": "#aec7e8", "kernel-nat": "#7f7f7f",
              "kernel-ipvs": "#bcbd22"}
LAB_METRICS = ["http_keepalive", "http_keepalive_seg", "http_close", "udp_pps", "bulk_tcp"]
LAB_TITLES = {
    "http_keepalive": "HTTP keep-alive requests/s",
    "http_keepalive_seg": "HTTP keep-alive requests/s, response in two segments",
    "http_close": "New connections/s (HTTP, Connection: close)",
    "udp_pps": "64-byte UDP packets/s received by the sinks",
    "bulk_tcp": "Bulk TCP throughput (Mbit/s)",
}


def _fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def load(path, *more):
    """Read one pytest-benchmark JSON; with `more`, their benchmarks are added to the first
    file's (its machine and run context stay), so that a partial run (e.g. bench_synflood.py
    alone) can be rendered together with a full one. A later file's result for the same
    benchmark replaces the earlier one."""
    data = json.loads(Path(path).read_text())
    for extra in more:
        other = json.loads(Path(extra).read_text())
        names = {b.get("fullname") for b in other.get("benchmarks", [])}
        data["benchmarks"] = [b for b in data.get("benchmarks", [])
                              if b.get("fullname") not in names] + other.get("benchmarks", [])
        ctx = data.setdefault("lvsdp", {})
        ctx["skipped"] = ctx.get("skipped", []) + (other.get("lvsdp") or {}).get("skipped", [])
        ctx.setdefault("merged", []).append(f"{extra} (run {other.get('datetime', '?')})")
    by_kind = {"engine_established": {}, "engine_new_conn": {}, "engine_syn_cookie": {},
               "engine_synproxy_syn": {}, "lab": {}, "synflood": {}}
    for b in data.get("benchmarks", []):
        ex = b.get("extra_info") or {}
        kind = ex.get("kind")
        if kind in ("engine_established", "engine_new_conn"):
            by_kind[kind][ex["case"]] = ex
        elif kind in ("engine_syn_cookie", "engine_synproxy_syn"):
            by_kind[kind]["cookie"] = ex
        elif kind == "lab":
            by_kind["lab"][ex["metric"]] = ex
        elif kind == "synflood":
            by_kind["synflood"][ex.get("level", "5k")] = ex
    return data, by_kind


def _machine(data):
    mi = data.get("machine_info", {})
    lv = mi.get("lvsdp", {})
    ctx = data.get("lvsdp", {})
    cpu = lv.get("cpu_model") or mi.get("cpu", {}).get("brand_raw") or platform.processor()
    rows = [
        ("CPU", cpu),
        ("nproc", lv.get("nproc", os.cpu_count())),
        ("kernel", lv.get("kernel", platform.release())),
        ("python", mi.get("python_version", platform.python_version())),
        ("run date", data.get("datetime", "?")),
        ("load average at start / end (1, 5, 15 min)",
         f"{ctx.get('loadavg_start')} / {ctx.get('loadavg_end')}"),
        ("benchmark wall time", f"{ctx.get('wall_s', '?')} s"),
    ]
    if ctx.get("merged"):
        rows.append(("results merged from", "; ".join(ctx["merged"])))
    ci = data.get("commit_info") or {}
    if ci.get("id"):
        rows.append(("commit", f"{ci['id'][:12]}{' (dirty tree)' if ci.get('dirty') else ''}"))
    for k, v in (ctx.get("tools") or {}).items():
        rows.append((k, v))
    return rows


def _errors_md(errors, title):
    """Markdown lines listing a benchmark's errors (first line of each), or none."""
    if not errors:
        return []
    return [title, ""] + [f"- `{e.splitlines()[0][:300]}`" for e in errors] + [""]


def _ratio(lab, metric, key):
    ex = lab.get(metric)
    if not ex:
        return None
    return (ex.get("ratios") or {}).get(key)


def targets(eng, lab, ctx):
    rows = []
    for case, tgt in ENGINE_TARGETS.items():
        ex = eng.get(case)
        if ex:
            v = ex["ns_per_pkt"]
            rows.append((f"engine, established, {ENGINE_LABEL[case]}", f"< {tgt:.0f} ns/pkt",
                         f"{v:.0f} ns/pkt", "met" if v < tgt else "**not met**"))
        else:
            rows.append((f"engine, established, {ENGINE_LABEL[case]}", f"< {tgt:.0f} ns/pkt", "–",
                         "not measured"))
    r = _ratio(lab, "udp_pps", "lvsdp-netlink/lvsdp-nfqueue")
    rows.append(("64-byte UDP pps, batched netlink / netfilterqueue", ">= 2.0x",
                 f"{r['median']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in r['rounds'])})" if r else "–",
                 ("met" if r["median"] >= 2.0 else "**not met**") if r else "not measured"))
    for metric, mode in (("http_keepalive", "lvsdp-netlink"), ("http_keepalive_seg", "lvsdp-netlink"),
                         ("http_keepalive", "lvsdp-nfqueue")):
        r = _ratio(lab, metric, f"{mode}/kernel-nat")
        what = "HTTP keep-alive" if metric == "http_keepalive" else "HTTP keep-alive, two-segment responses"
        label = f"{what}, {MODE_LABEL[mode]} / kernel NAT (median of per-round ratios)"
        status = ("met" if r["median"] >= 0.8 else "**not met**") if r else "not measured"
        if mode == "lvsdp-nfqueue" and r:
            status += " (informational: the target is for the default backend)"
        elif metric == "http_keepalive_seg" and r:
            status += (" (informational: nginx without tcp_nopush, twice the packets per request;"
                       " see below)")
        rows.append((label, ">= 0.8x",
                     f"{r['median']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in r['rounds'])})" if r else "–",
                     status))
    return rows


def _plot_engine(eng, new, plots):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not eng and not new:
        return None
    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    labels, nets, restores, tg = [], [], [], []
    for case in ENGINE_TARGETS:
        if case in eng:
            labels.append(f"established\n{ENGINE_LABEL[case]}")
            nets.append(eng[case]["ns_per_pkt"])
            restores.append(eng[case]["restore_ns_per_pkt"])
            tg.append(ENGINE_TARGETS[case])
    for case in ("4k", "1M"):
        if case in new:
            labels.append(f"new conn (SYN)\n~{case} live")
            nets.append(new[case]["ns_per_conn"])
            restores.append(new[case]["restore_ns_per_pkt"])
            tg.append(None)
    x = range(len(labels))
    ax.bar(x, nets, color="#1f77b4", label="engine (restore subtracted)")
    ax.bar(x, restores, bottom=nets, color="#c7c7c7", label="batch restore (not engine)")
    for i, t in enumerate(tg):
        if t:
            ax.plot([i - 0.4, i + 0.4], [t, t], color="#d62728", lw=2,
                    label="target" if i == 0 else None)
    for i, v in enumerate(nets):
        ax.text(i, v / 2, f"{v:.0f}", ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("ns per packet")
    ax.set_title("process_batch, 64-packet batches")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = plots / "engine.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_lab(lab, plots):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [m for m in LAB_METRICS if m in lab]
    if not metrics:
        return []
    out = []
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ex = lab[metric]
        modes = [m for m in MODE_ORDER if m in ex["modes"]]
        meds = [ex["modes"][m]["median"] for m in modes]
        ax.bar(range(len(modes)), meds, color=[MODE_COLOR[m] for m in modes])
        for i, m in enumerate(modes):
            pts = ex["modes"][m]["rounds"]
            ax.plot([i] * len(pts), pts, "k.", ms=5)
        ax.set_xticks(range(len(modes)), [MODE_SHORT[m] for m in modes], fontsize=8)
        ax.set_title(LAB_TITLES[metric], fontsize=9)
        ax.set_ylabel(ex["unit"])
    fig.suptitle("median of alternating rounds (dots: each round)", fontsize=9)
    fig.tight_layout()
    path = plots / "lab.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    # Ratios against kernel NAT.
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.38
    for j, mode in enumerate(("lvsdp-netlink", "lvsdp-nfqueue")):
        vals = []
        for metric in metrics:
            r = (lab[metric].get("ratios") or {}).get(f"{mode}/kernel-nat")
            vals.append(r["median"] if r else 0)
        ax.bar([i + (j - 0.5) * width for i in range(len(metrics))], vals, width,
               color=MODE_COLOR[mode], label=MODE_LABEL[mode])
    ax.axhline(1.0, color="#7f7f7f", lw=1)
    if "http_keepalive" in metrics:
        i = metrics.index("http_keepalive")
        ax.plot([i - 0.45, i + 0.45], [0.8, 0.8], color="#d62728", lw=2, label="target (keep-alive)")
    ax.set_xticks(range(len(metrics)), [METRIC_SHORT[m] for m in metrics], fontsize=8)
    ax.set_ylabel("lvs-dp / kernel NAT")
    ax.set_title("ratio to kernel netfilter NAT (median of per-round ratios)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = plots / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    # Latency percentiles of the keep-alive runs.
    if "http_keepalive" in lab:
        ex = lab["http_keepalive"]
        modes = [m for m in MODE_ORDER if m in ex["modes"]]
        fig, ax = plt.subplots(figsize=(7, 3.4))
        pcts = ("p50_ms", "p90_ms", "p99_ms")
        width = 0.8 / max(1, len(modes))
        for j, m in enumerate(modes):
            ax.bar([i + (j - (len(modes) - 1) / 2) * width for i in range(len(pcts))],
                   [ex["modes"][m].get(p, 0) for p in pcts], width, color=MODE_COLOR[m],
                   label=MODE_LABEL[m])
        ax.set_xticks(range(len(pcts)), ["p50", "p90", "p99"])
        ax.set_ylabel("ms")
        ax.set_title("HTTP keep-alive latency, wrk -t1 -c32 --latency (median over rounds)",
                     fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plots / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def _ipvs_vm_section(vm, path, md_path):
    """Kernel IPVS against netfilter NAT from bench/ipvs_vm.sh (an emulated guest)."""
    mtime = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    L = ["## Kernel IPVS (emulated guest, ratios only)", "",
         f"From `{os.path.relpath(path, md_path.parent)}` ({mtime}), made by `bench/ipvs_vm.sh`: "
         f"the same lab modes (`IpvsMode`: ipvsadm NAT rr; `KernelNatMode`) in alternating rounds "
         f"inside one QEMU software-emulated guest (kernel {vm.get('guest_kernel')}, "
         f"{vm.get('guest_nproc')} vCPUs). Emulation is many times slower than this machine: only "
         f"the ratios mean anything, and lvs-dp was not run there.", ""]
    rows = []
    for s in vm.get("summaries", []):
        r = (s.get("ratios") or {}).get("kernel-ipvs/kernel-nat")
        if not r:
            continue
        rows.append((LAB_TITLES.get(s["metric"], s["metric"]), f"{r['median']:.2f}x",
                     ", ".join(f"{x:.2f}" for x in r["rounds"])))
    L.append(_table(("metric", "IPVS / netfilter NAT (median)", "per round"), rows))
    L.append("")
    return L


SYNFLOOD_ORDER = ["lvsdp-synproxy", "lvsdp-nat", "kernel-synproxy", "kernel-forward"]
SYNFLOOD_LABEL = {
    "lvsdp-synproxy": "lvs-dp, NAT + `syn_proxy`",
    "lvsdp-nat": "lvs-dp, NAT, no protection",
    "kernel-synproxy": "kernel SYNPROXY (nft, routed)",
    "kernel-forward": "kernel, routed, no protection",
}


def _synflood_notes(mode, rounds):
    """What the protection (or its absence) did: counters, median over rounds."""
    med = lambda xs: int(sorted(xs)[len(xs) // 2]) if xs else 0
    keys = {k for r in rounds for k in r.get("counters", {})}
    c = {k: med([r.get("counters", {}).get(k, 0) for r in rounds]) for k in keys}
    r = {"rs_tsecr_rejected": med([x.get("rs_tsecr_rejected", 0) for x in rounds]),
         "syn_recv_after": med([x.get("syn_recv_after", 0) for x in rounds]),
         "protected": rounds[-1].get("protected")}
    out = []
    if mode == "lvsdp-synproxy":
        out.append(f"cookies sent {c.get('synproxy_cookie_sent', 0):,}, cookie ACKs ok "
                   f"{c.get('synproxy_ack_ok', 0):,}, RS handshakes {c.get('synproxy_rs_synack', 0):,}")
        bad = {k[5:]: v for k, v in c.items() if k.startswith("drop_")}
        if bad:
            out.append("drops " + ", ".join(f"{k} {v:,}" for k, v in bad.items()))
    elif mode == "lvsdp-nat":
        out.append(f"connections made {c.get('conn_new', 0):,} (flood included)")
    elif mode == "kernel-synproxy":
        out.append(f"SYNs answered {c.get('synproxy_syn_received', 0):,}, cookies valid "
                   f"{c.get('synproxy_cookie_valid', 0):,}, invalid {c.get('synproxy_cookie_invalid', 0):,}")
    if r.get("rs_tsecr_rejected"):
        out.append(f"RS TSEcrRejected {r['rs_tsecr_rejected']:,}")
    if not r.get("protected"):
        out.append(f"RS SYN_RECV after the flood {r.get('syn_recv_after', 0)}")
    return "; ".join(out)


def _synflood_section(levels):
    """bench_synflood.py: legitimate connections through a spoofed-source SYN flood, one table
    per flood level."""
    L = ["## SYN flood", ""]
    if not levels:
        L += ["Not measured (`bench_synflood.py` did not run).", ""]
        return L
    first = True
    for level in sorted(levels, key=lambda x: levels[x].get("flood_pps", 0)):
        L += _synflood_level(levels[level], first)
        first = False
    return L


def _synflood_level(ex, first):
    L = []
    la = ex.get("loadavg_1min")
    if ex.get("flood_tool") == "trafgen":
        pace = ("an even stream, `-t` gap" if ex.get("flood_pps", 0) <= 20_000
                else "`-b`, paced in bursts")
        flood = (f"`trafgen` asked for {ex.get('flood_pps'):,} SYN/s ({pace}; random source "
                 f"addresses and ports, bounded in count and time)")
    else:
        flood = (f"`hping3 -S --rand-source` (interval {1e6 / ex.get('flood_pps', 1):.0f} µs, "
                 f"bounded in count and time)")
    if ex.get("strict", True):
        L += [f"### {ex.get('flood_pps'):,} spoofed SYN/s asked", "",
              "Checked: with a SYN proxy more than 90 % of legitimate connections succeed, no "
              "spoofed SYN reaches the real servers and none of them holds a half-open entry "
              "from one; without a proxy their SYN queues fill.", ""]
    else:
        L += [f"### Capacity: {ex.get('flood_pps'):,} spoofed SYN/s asked", "",
              "Where the SYN proxies saturate. Checked: no spoofed SYN and no half-open entry "
              "from one at the real servers; the legitimate rate is measured, not required.", ""]
    sysctls = ", ".join(f"`{k}={v}`" for k, v in (ex.get("rs_sysctls") or {}).items())
    L.append(
        f"`bench_synflood.py` (`synflood_kit.py`): legitimate clients (one process, "
        f"{ex.get('concurrency')} connections in flight from {ex.get('legit_addrs', 64):,} "
        f"source addresses, each a new "
        f"connection with `GET /` and `Connection: close`; an attempt succeeds when the 200 "
        f"response is in within {ex.get('attempt_timeout_s')} s) for {ex.get('seconds')} s while "
        f"{flood} floods port 80 from the same namespace; before it the same "
        f"clients alone for {ex.get('baseline_seconds')} s (*no flood*). "
        f"{len((next(iter(ex['modes'].values())) or {}).get('rounds', []))} round(s), each mode "
        f"on a topology of its own built for the round, the order rotating; medians over rounds "
        f"(SYN_RECV: the maximum)"
        + (f"; 1-min load average {la[0]} before, {la[1]} after." if la else "."))
    L.append("")
    if first:
        L.append(
            f"The real servers are left open to the flood on purpose, inside their namespaces only: "
            f"{sysctls}, set before nginx starts (its listen backlog, the SYN queue's limit, becomes "
            f"{ex.get('rs_backlog')}), and a default route through the balancer/router so that a "
            "spoofed SYN does make a half-open entry. lvs-dp runs on the seed lab with "
            "`examples/seed-nat.conf` (two real servers; `syn_proxy` added for the protected mode). "
            "The kernel's SYNPROXY only proxies untracked SYNs, which never reach the nat table, so "
            "it cannot front a DNAT balancer: it is measured on the routed topology of its selftest "
            "(`nft_synproxy.sh`: client, router with the `synproxy` statement, one nginx server), "
            "and that topology without rules is its baseline.")
        L.append("")
    rows = []
    for m in SYNFLOOD_ORDER:
        mm = ex["modes"].get(m)
        if not mm:
            continue
        rows.append((SYNFLOOD_LABEL[m], _fmt(mm["conn_per_s"]), f"{mm['success_rate']:.3f}",
                     _fmt(mm["baseline_conn_per_s"]), mm["syn_recv_max"],
                     f"{_fmt(mm['flood_sent'])} ({_fmt(mm['flood_pps_sent'])}/s)",
                     f"{_fmt(mm['rs_syns_client'])} / {_fmt(mm['rs_syns'] - mm['rs_syns_client'])}",
                     _synflood_notes(m, mm["rounds"])))
    L.append(_table(("mode", "legit conn/s under flood", "success rate", "legit conn/s, no flood",
                     "SYN_RECV max on RS", "SYNs sent (rate)", "SYNs at RS: legit / other",
                     "notes"), rows))
    L.append("")
    if first:
        L.append("*SYN_RECV max on RS*: the largest sum over the real servers of `ss -tanH state "
                 "syn-recv sport = :80`, sampled every 0.2 s; a full queue shows as backlog + 1 per "
                 "server. *SYNs at RS*: iptables counters on the real servers' INPUT, from the "
                 "legitimate clients' addresses and from anywhere else (the flood; lvs-dp's health "
                 "checks). *TSEcrRejected*: handshake ACKs the real server refused because their "
                 "timestamp echo is not one it sent (`nstat`); the kernel SYNPROXY's ACK to the "
                 "server carries such an echo on this kernel, and the handshake then completes with "
                 "the client's next segment, or stalls until the server retransmits its SYN-ACK "
                 "(kernel-notes/fullnat-synproxy.md).")
        L.append("")
    L += _errors_md(ex.get("errors"), "Errors:")
    return L


def render(data, kinds, plots_dir, md_path):
    eng, new, lab = kinds["engine_established"], kinds["engine_new_conn"], kinds["lab"]
    ctx = data.get("lvsdp", {})
    plots_dir.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, md_path.parent)
    L = []
    L.append("# lvs-dp benchmark results")
    L.append("")
    L.append(f"Generated by `python -m bench.report` on "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from pytest-benchmark "
             "output (`make bench`). How to run and what each benchmark measures: "
             "[README.md](README.md).")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append(_table(("", ""), _machine(data)))
    L.append("")
    loads = [x[0] for x in (ctx.get("loadavg_start"), ctx.get("loadavg_end")) if x]
    loads += [ex["loadavg_1min"][i] for ex in lab.values() if ex.get("loadavg_1min") for i in (0, 1)]
    nproc = data.get("machine_info", {}).get("lvsdp", {}).get("nproc") or 1
    if loads and max(loads) > 0.5 * nproc:
        L.append(f"**Note:** the machine was not idle (1-minute load average up to {max(loads)} "
                 f"during the run on "
                 f"{nproc} CPUs; per lab metric below): other work "
                 "competed for the CPUs. Absolute numbers are then low and noisy, and lvs-dp, a "
                 "userspace process that needs a CPU of its own next to the kernel's softirq "
                 "work, loses more than the kernel does; the alternating rounds keep the ratios "
                 "fairer but not immune.")
        L.append("")
    L.append("## Targets (issue \"Speed\")")
    L.append("")
    L.append(_table(("target", "wanted", "measured", "status"), targets(eng, lab, ctx)))
    L.append("")

    L.append("## Engine (`process_batch` on prebuilt batches)")
    L.append("")
    if eng:
        rows = []
        for case in ENGINE_TARGETS:
            if case in eng:
                e = eng[case]
                rows.append((e.get("method", "Masq"), f"{e['conns']:,}", _fmt(e["ns_per_pkt"]), _fmt(e.get("ns_per_pkt_best")),
                             _fmt(e["mpps"], 2),
                             _fmt(e["ns_per_pkt_gross"]), _fmt(e["restore_ns_per_pkt"]),
                             _fmt(e["python_call_ns_per_pkt"]), _fmt(e.get("dispatch_us_per_call"), 2),
                             f"< {e['target_ns']}"))
        L.append("Established NAT (Masq) and FULLNAT packets (client -> VIP, 64 bytes, PSH|ACK; "
                 "FULLNAT over 20 local addresses, no TOA or PROXY header), batches of 64 in "
                 "random connection order, table of 2^20 slots. *engine* = median round minus the "
                 "batch restore (copying each batch back from its pristine copy, timed alone); "
                 "*via Python* = one `process_batch` call per batch from Python with `np.copyto`, "
                 "as a backend calls it; *dispatch* = the Python -> numba call alone (one-packet batch); "
                 "*best round* = the fastest round minus the restore (what a quiet core gives; "
                 "targets are judged on the median).")
        L.append("")
        L.append(_table(("method", "live conns", "engine ns/pkt (median)", "best round", "Mpps/core",
                         "measured ns/pkt",
                         "restore ns/pkt", "via Python ns/pkt", "dispatch µs/call",
                         "target ns/pkt"), rows))
        L.append("")
    else:
        L.append("Not measured (the engine benchmarks did not run).")
        L.append("")
    if new:
        rows = []
        for case in ("4k", "1M"):
            if case in new:
                e = new[case]
                rows.append((f"~{e['live_conns_target']:,}", f"{e['table_slots']:,}",
                             _fmt(e["ns_per_conn"]), _fmt(e.get("ns_per_conn_best")),
                             _fmt(e["conns_per_s_per_core"]),
                             _fmt(e["ns_per_conn_gross"]), _fmt(e["restore_ns_per_pkt"]),
                             _fmt(e["expired_during_bench"])))
        L.append("New connections: a SYN for a never-seen 4-tuple per packet, 64 per batch, while "
                 "the clock advances so that older connections expire and the per-batch sweep "
                 "frees them (steady state reached before timing).")
        L.append("")
        L.append(_table(("live conns", "table slots", "engine ns/SYN (median)", "best round",
                         "SYN/s per core",
                         "measured ns/SYN", "restore ns/pkt", "expired while timed"), rows))
        L.append("")
    sc = kinds.get("engine_syn_cookie", {}).get("cookie")
    if sc:
        L.append("SYN cookies (dataplane/synproxy.py, SipHash-2-4, as the kernel's syncookies): "
                 "the cookie arithmetic alone, looped in numba over 65,536 tuples.")
        L.append("")
        L.append(_table(("make (per SYN) ns", "check (per returning ACK) ns", "make + check ns"),
                        [(_fmt(sc["make_ns"]), _fmt(sc["check_ns"]), _fmt(sc["make_and_check_ns"]))]))
        L.append("")
    sp = kinds.get("engine_synproxy_syn", {}).get("cookie")
    if sp:
        L.append("A SYN to a SYN-proxy service through `process_batch` (answered in place with a "
                 "cookie SYN-ACK, no state kept: the SYN-flood path), fresh 4-tuples, 64 per "
                 "batch, template restore subtracted:")
        L.append("")
        L.append(_table(("engine ns/SYN", "SYN/s per core", "measured ns/SYN", "restore ns/pkt"),
                        [(_fmt(sp["ns_per_syn"]), _fmt(sp["syn_per_s_per_core"]),
                          _fmt(sp["ns_per_syn_gross"]), _fmt(sp["restore_ns_per_pkt"]))]))
        L.append("")
        if not sc.get("pipeline_has_synproxy") and not kinds.get("engine_synproxy_syn"):
            L.append("The SYN-proxy path is not wired into `process_batch` yet, so the cost of a "
                     "proxied SYN through the engine (SYN -> SYN-ACK in place) is not measured.")
            L.append("")
    big = eng.get("1M")
    if big and "conn_entry_bytes" in big:
        L.append("Memory with 1 million connections (table of 2^20 slots, the daemon's default):")
        L.append("")
        L.append(_table(("", "bytes"), [
            ("connection entry (`tables.CONN_DTYPE.itemsize`)", big["conn_entry_bytes"]),
            ("index per slot (4 index entries of 16 B per slot, load <= 1/2)", big["index_bytes_per_slot"]),
            ("index actually used per live connection (in + out key)", big["index_bytes_per_live_conn"]),
            ("free-id stack per slot", big["free_stack_bytes_per_slot"]),
            ("**allocated per connection slot**", big["table_bytes_per_slot"]),
            ("connection tables allocated", f"{big['table_mib']} MiB"),
            ("process RSS (VmRSS) with 1M connections", f"{big['rss_mib']} MiB"),
            ("RSS growth from building the 1M table", f"{big['rss_delta_mib']} MiB "
                                                       f"({big['rss_delta_bytes_per_conn']} B/conn)"),
        ]))
        L.append("")
    p = _plot_engine(eng, new, plots_dir)
    if p:
        L.append(f"![engine]({rel(p)})")
        L.append("")

    L.append("## Through the lab, side by side")
    L.append("")
    if lab:
        any_ex = next(iter(lab.values()))
        L.append(f"One namespace lab (client, balancer, two single-worker nginx real servers, UDP "
                 f"sinks); {any_ex.get('rounds')} alternating round(s) of {any_ex.get('seconds')} s "
                 f"per mode, the order rotating each round. Ratios are lvs-dp / kernel netfilter "
                 f"NAT within the same round, median over rounds.")
        L.append("")
        for metric in LAB_METRICS:
            ex = lab.get(metric)
            L.append(f"### {LAB_TITLES[metric]}")
            L.append("")
            if not ex:
                L.append("Not measured (the benchmark did not run or failed before any round).")
                L.append("")
                continue
            la = ex.get("loadavg_1min")
            L.append(ex.get("description", "") +
                     (f" (1-min load average {la[0]} before, {la[1]} after)" if la else ""))
            L.append("")
            rows = []
            for m in MODE_ORDER:
                if m not in ex["modes"]:
                    continue
                mm = ex["modes"][m]
                r = (ex.get("ratios") or {}).get(f"{m}/kernel-nat")
                row = [MODE_LABEL[m], _fmt(mm["median"]), ", ".join(_fmt(v) for v in mm["rounds"]),
                       f"{r['median']:.2f}x" if r else ("1.00x" if m == "kernel-nat" else "–")]
                if metric.startswith("http"):
                    row += [_fmt(mm.get("p50_ms"), 3), _fmt(mm.get("p90_ms"), 3), _fmt(mm.get("p99_ms"), 3),
                            _fmt(mm.get("pkts_per_request"), 2) if mm.get("pkts_per_request") else "–"]
                if metric == "udp_pps":
                    off = mm.get("offered_pps_median")
                    bound = " (sender-bound)" if off and mm["median"] >= 0.95 * off else ""
                    row += [_fmt(off) + bound]
                rows.append(row)
            head = ["mode", f"median {ex['unit']}", "rounds", "/ kernel NAT"]
            if metric.startswith("http"):
                head += ["p50 ms", "p90 ms", "p99 ms", "packets / request"]
            if metric == "udp_pps":
                head += ["offered pkt/s (trafgen)"]
            L.append(_table(head, rows))
            L.append("")
            if metric == "http_keepalive":
                L.append("*packets / request*: what lvs-dp handled per request, both directions "
                         "(its service counters); the kernel modes carry the same packets. nginx "
                         "runs with Debian's stock `sendfile on; tcp_nopush on;`, so headers and "
                         "body leave in one segment and the client's next request carries its "
                         "ACK: 2 packets per request.")
                L.append("")
            if metric == "http_keepalive_seg":
                L.append("The same page from a location with `tcp_nopush off`: nginx writes the "
                         "headers, then sendfile()s the body, two segments, and the client ACKs "
                         "them before its next request: 4 packets per request. Both balancers do "
                         "more work per request; lvs-dp's share of it grows, because its cost is "
                         "per packet (each one crosses the queue twice: to user space and back "
                         "with its verdict), while kernel NAT's per-packet work is small next to "
                         "the TCP work of wrk and nginx.")
                L.append("")
            if metric == "udp_pps":
                L.append("*sender-bound*: the sinks received about what trafgen managed to send "
                         "(trafgen, the balancer and the sinks share the machine's CPUs), so that "
                         "mode's number is a lower bound of its capacity. lvs-dp fails closed: "
                         "what its queue cannot take is dropped and counted (`overload`).")
                L.append("")
            nn = (ex.get("ratios") or {}).get("lvsdp-netlink/lvsdp-nfqueue")
            if nn:
                L.append(f"netlink / netfilterqueue backend: {nn['median']:.2f}x "
                         f"(rounds {', '.join(f'{x:.2f}' for x in nn['rounds'])}).")
                L.append("")
            drops = {m: ex["modes"][m].get("drops") for m in ex["modes"] if ex["modes"][m].get("drops")}
            if drops:
                L.append("lvs-dp drop counters during the runs (per round): " +
                         "; ".join(f"{m}: {d}" for m, d in drops.items()))
                L.append("")
            L += _errors_md(ex.get("errors"),
                            "Errors (modes whose rounds failed are left out above):")
        for p in _plot_lab(lab, plots_dir):
            L.append(f"![{p.stem}]({rel(p)})")
            L.append("")
    else:
        L.append("Not measured (the lab benchmarks did not run).")
        L.append("")

    L.extend(_synflood_section(kinds.get("synflood") or {}))
    vm = md_path.parent / "ipvs-vm.json"
    if vm.exists():
        L.extend(_ipvs_vm_section(json.loads(vm.read_text()), vm, md_path))
    L.append("## Not measured")
    L.append("")
    notes = []
    for s in ctx.get("skipped", []):
        notes.append(f"- `{s['test']}`: {s['reason']}")
    ipvs = ctx.get("ipvs") or {}
    if ipvs and not ipvs.get("available"):
        if not any("ipvs" in n.lower() for n in notes):
            notes.append(f"- kernel IPVS: {ipvs.get('reason')}")
        notes.append("  The IPVS code path (`bench/labkit.py: IpvsMode`, ipvsadm NAT rr in the "
                     "balancer namespace) runs as a fourth mode on a kernel with IPVS.")
    sc = kinds.get("engine_syn_cookie", {}).get("cookie")
    if sc and not sc.get("pipeline_has_synproxy") and not kinds.get("engine_synproxy_syn"):
        notes.append("- a proxied SYN through `process_batch` (SYN -> SYN-ACK in place): the "
                     "SYN-proxy stage is not in the pipeline yet; only the cookie cost is measured")
    if (md_path.parent / "ipvs-vm.json").exists() and ipvs and not ipvs.get("available"):
        notes.append("  It was run against kernel IPVS in an emulated guest: see \"Kernel IPVS "
                     "(emulated guest, ratios only)\" above.")
    if not kinds.get("synflood"):
        notes.append("- SYN flood (`bench_synflood.py`): did not run")
    missing_lab = [m for m in LAB_METRICS if m not in lab]
    if missing_lab:
        notes.append(f"- lab metrics without results: {', '.join(missing_lab)}")
    L.extend(notes or ["Everything planned was measured."])
    L.append("")
    md_path.write_text("\n".join(L) + "\n")
    return md_path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m bench.report BENCH_JSON [MORE_JSON ...] RESULTS_MD",
              file=sys.stderr)
        return 2
    srcs, dst = [Path(a) for a in argv[:-1]], Path(argv[-1])
    data, kinds = load(*srcs)
    plots = dst.parent / "plots"
    render(data, kinds, plots, dst)
    print(f"wrote {dst} and plots in {plots}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
