"""Fixtures shared by the benchmarks, and what the report needs beyond pytest-benchmark's timings.

* ``lab_env`` -- one namespace lab per module (client, balancer, two single-worker nginx real
  servers without access logs, a 64 MiB /big, a UDP sink on each real server) plus the lvs-dp
  config of the benchmark service and the run's parameters (modes, rounds, seconds). Torn down
  however the module ends. Needs root: fails, as the tests' lab fixtures do, unless
  LVSDP_SKIP_NETNS=1.
* Under ``--benchmark-disable`` (``make test``, `is_quick`) every benchmark runs once, briefly, as
  a correctness test: the lab then measures one round of 1 s per mode.
* Skipped benchmarks and their reasons, the machine (CPU model, nproc, kernel, load average at
  start and end) and tool versions go into the benchmark JSON under ``"lvsdp"`` and
  ``machine_info`` for bench/report.py.

Environment: ``LVSDP_BENCH_MODES=kernel-nat,lvsdp-nfqueue`` restricts the lab modes (all that
this machine supports by default); ``LVSDP_BENCH_ROUNDS`` / ``LVSDP_BENCH_SECONDS`` override the
measured run's 3 rounds of 4 s.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest

from tests.conftest import require_netns, unique_prefix

_skipped: list[dict] = []
_started = {"loadavg": None, "time": None}


def _loadavg():
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def is_quick(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def pytest_configure(config):
    # bench/out/ is not in git: make the directory --benchmark-json writes into at session end.
    path = config.getoption("benchmark_json", None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def pytest_sessionstart(session):
    _started["loadavg"] = _loadavg()
    _started["time"] = time.time()


def pytest_runtest_logreport(report):
    if not report.skipped or not report.nodeid.startswith("bench/"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if "--benchmark-only" in reason or "benchmark-skip" in reason:
        return
    _skipped.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lvsdp"] = {
        "cpu_model": _cpu_model(), "nproc": os.cpu_count(), "kernel": platform.release(),
        "loadavg_start": _started["loadavg"],
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from bench.labkit import ipvs_status, tool_versions
    ok, why = ipvs_status()
    output_json["lvsdp"] = {
        "skipped": list(_skipped),
        "loadavg_start": _started["loadavg"], "loadavg_end": _loadavg(),
        "wall_s": round(time.time() - (_started["time"] or time.time()), 1),
        "tools": tool_versions(), "ipvs": {"available": ok, "reason": why},
    }


class LabEnv:
    """The lab plus everything a side-by-side campaign needs."""

    def __init__(self, lab, sinks, config, modes, rounds, seconds, skipped_modes):
        self.lab, self.sinks, self.config = lab, sinks, config
        self.modes, self.rounds, self.seconds = modes, rounds, seconds
        self.skipped_modes = skipped_modes


@pytest.fixture(scope="module")
def lab_env(request):
    require_netns()
    from bench import labkit as L
    from control.lab import Lab
    quick = is_quick(request.config)
    wanted = os.environ.get("LVSDP_BENCH_MODES")
    modes = [m for m in (wanted.split(",") if wanted else L.ALL_MODES) if m]
    skipped = {}
    if "kernel-ipvs" in modes:
        ok, why = L.ipvs_status()
        if not ok:
            modes.remove("kernel-ipvs")
            skipped["kernel-ipvs"] = why
    rounds = 1 if quick else int(os.environ.get("LVSDP_BENCH_ROUNDS", 3))
    seconds = 1 if quick else float(os.environ.get("LVSDP_BENCH_SECONDS", 4))
    with Lab(unique_prefix("b"), nginx_workers=1, bulk_mb=64, **L.LAB_OPTIONS) as lab:
        sinks = L.start_sinks(lab)
        yield LabEnv(lab, sinks, L.write_config(lab), modes, rounds, seconds, skipped)
