"""SYN flood, side by side (issue "SYN-proxy"; issue "Speed", item 3): legitimate new
connections/s and their success rate while a spoofed-source SYN flood runs, for lvs-dp with
`syn_proxy` on the seed NAT service, lvs-dp without it, the kernel's own SYNPROXY (nftables
`synproxy` on the forwarding topology of its selftest) and that topology without protection.
bench/synflood_kit.py has the topologies, the load and what is counted; bench/report.py renders
the "SYN flood" section of RESULTS.md from this test's extra_info.

Each round builds every mode's topology afresh (the half-open entries an unprotected real server
is left with would otherwise meet the next mode), measures, and removes it; the order rotates per
round. pytest-benchmark's timing of the test is the wall time of a round, not a result.

What every round asserts (`synflood_kit.check`): the flood ran (trafgen's own count, at least
MIN_FLOOD_PPS), legitimate clients succeed without it; with a SYN proxy (lvs-dp or kernel) more
than 90 % of legitimate connections succeed under the flood, the real servers never hold more
SYN_RECV entry from anyone but the legitimate clients (and the balancer's health checks), no
spoofed SYN reaches them and the proxy answered at least half the flood; without one, the real
servers' SYN queues fill (so the flood was strong enough to matter). That is `test_syn_flood`, at
5,000 spoofed SYN/s (trafgen). `test_syn_flood_capacity` floods at 100,000 SYN/s
to find where the proxies saturate: there the protection is still checked, the legitimate
success rate is only measured. Under --benchmark-disable (`make test`) one round runs with a 2 s
flood window (the capacity test: lvs-dp's SYN-proxy only, 1 s); the measured run (`make bench`)
3 rounds of 5 s.

Environment: LVSDP_FLOOD_MODES (comma list, default all four), LVSDP_FLOOD_ROUNDS,
LVSDP_FLOOD_SECONDS.
"""

import os

import pytest

from bench import synflood_kit as K
from bench.conftest import is_quick
from tests.conftest import require_netns, unique_prefix

pytestmark = [pytest.mark.netns]


def _campaign(benchmark, request, level, quick_modes):
    require_netns()
    quick = is_quick(request.config)
    wanted = os.environ.get("LVSDP_FLOOD_MODES")
    modes = [m for m in (wanted.split(",") if wanted else K.MODES) if m]
    if quick:
        modes = [m for m in modes if m in quick_modes]
    rounds = 1 if quick else int(os.environ.get("LVSDP_FLOOD_ROUNDS", 3))
    seconds = (2.0 if level == "5k" else 1.0) if quick else \
        float(os.environ.get("LVSDP_FLOOD_SECONDS", 5))
    base_seconds = 1.0 if quick else 3.0
    benchmark.group = f"synflood-{level}"
    results, errors, r = {}, [], [0]

    def one_round():
        K.one_round(modes, r[0], lambda name: unique_prefix("fl"), seconds, base_seconds,
                    results, errors, level)
        r[0] += 1

    load0 = os.getloadavg()
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    load1 = os.getloadavg()
    if results:
        summary = K.summarize(results, seconds, base_seconds, level)
        summary.update({"rounds_run": r[0], "errors": errors,
                        "loadavg_1min": [round(load0[0], 2), round(load1[0], 2)],
                        "order": [K.round_order(modes, i) for i in range(r[0])]})
        benchmark.extra_info.update(summary)
    assert not errors, "\n".join(errors)
    assert set(results) == set(modes)
    return results


def test_syn_flood(benchmark, request):
    """5,000 spoofed SYN/s: every protection must hold, strictly."""
    _campaign(benchmark, request, "5k", quick_modes=K.MODES)


def test_syn_flood_capacity(benchmark, request):
    """100,000 spoofed SYN/s: where the SYN proxies saturate. The protection (no spoofed SYN
    and no half-open entry beyond legitimate ones at the real servers) is still checked; the
    legitimate rate is measured, not required. Under --benchmark-disable only lvs-dp's SYN-proxy
    runs, for 1 s."""
    _campaign(benchmark, request, "100k", quick_modes=("lvsdp-synproxy",))
