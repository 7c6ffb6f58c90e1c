"""Side-by-side benchmarks through the namespace lab: lvs-dp (batched netlink backend, and the
netfilterqueue backend) against kernel netfilter NAT -- and kernel IPVS where the kernel has it --
balancing the same two single-worker nginx real servers (and two UDP sinks) in one lab.

Each test is one metric measured in alternating rounds: every round starts each balancer in turn
(the order rotates per round), measures, and stops it, so slow drift on a shared machine hits all
modes alike. The medians and the per-round ratios against kernel NAT go into the benchmark's
extra_info; bench/report.py turns them into bench/RESULTS.md. pytest-benchmark's own timing of a
test is the wall time of one round (start, measure, stop for every mode) and is not a result.

Every measurement is also checked: wrk requests all answered 2xx with no socket errors and
connections on both real servers, UDP packets counted at both sinks, /big arrives whole (size on
every transfer, sha256 on one). Under --benchmark-disable one round of 1 s per mode runs.

See bench/labkit.py for the modes, the load generators and the network rules they keep.
"""

import os

import pytest

from bench import labkit as L

pytestmark = [pytest.mark.netns]


def _campaign(benchmark, env, metric):
    benchmark.group = f"lab-{metric}"
    camp = L.Campaign(env.lab, env.sinks, env.config, env.modes, env.seconds)
    results, errors, r = {}, [], [0]

    def one_round():
        for name in L.round_order(env.modes, r[0]):
            try:
                camp.one_round_mode(metric, name, results)
            except Exception as e:     # keep the other modes' numbers; fail at the end
                errors.append(f"round {r[0] + 1} {name}: {type(e).__name__}: {e}")
        r[0] += 1

    load0 = os.getloadavg()
    benchmark.pedantic(one_round, rounds=env.rounds, iterations=1, warmup_rounds=0)
    load1 = os.getloadavg()
    measured = {m: v for m, v in results.items() if len(v) == r[0]}
    if measured:
        summary = L.summarize(metric, measured)
        summary.update({"rounds": r[0], "seconds": env.seconds, "skipped_modes": env.skipped_modes,
                        "errors": errors, "lvsdp_start_s": camp.start_s,
                        "loadavg_1min": [round(load0[0], 2), round(load1[0], 2)],
                        "order": [L.round_order(env.modes, i) for i in range(r[0])]})
        for mode, rs in measured.items():
            drops = [x.get("drops") for x in rs if x.get("drops")]
            if drops:
                summary["modes"][mode]["drops"] = drops
            if metric == "udp_pps":
                summary["modes"][mode]["received"] = [x["received"] for x in rs]
                summary["modes"][mode]["sent"] = [x["sent"] for x in rs]
            if metric == "bulk_tcp":
                summary["modes"][mode]["transfers"] = [x["transfers"] for x in rs]
        benchmark.extra_info.update(summary)
    assert not errors, "\n".join(errors)
    return measured


@pytest.mark.parametrize("metric", list(L.METRICS))
def test_side_by_side(benchmark, lab_env, metric):
    measured = _campaign(benchmark, lab_env, metric)
    assert set(measured) == set(lab_env.modes)


def test_kernel_ipvs(benchmark, lab_env):
    """IPVS is in the side-by-side runs when the kernel has it; this test makes its absence
    visible (a skip with the reason) and otherwise checks the ipvsadm set-up on its own."""
    ok, why = L.ipvs_status()
    if not ok:
        pytest.skip(f"kernel IPVS not measured: {why}")
    benchmark.group = "lab-ipvs"
    mode = L.IpvsMode(lab_env.lab, lab_env.config)

    def run():
        with mode:
            return L.measure("http_keepalive", mode, lab_env.lab, lab_env.sinks, 1)

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    assert res["value"] > 0
