"""Shared pytest fixtures: the namespace lab and the root requirement.

* ``lab`` -- a fresh `control.lab.Lab` per test (options from ``@pytest.mark.lab(udp_echo=True,
  ...)``), ``module_lab`` -- one per test module, ``lab_factory`` -- ``make(**options)`` for tests
  that need several labs. Each gets a unique prefix (pid + counter), so concurrent pytest runs do
  not collide, and is torn down however the test ends.
* Namespace tests need root. A namespace test that cannot run is a FAILURE, not a skip (CI runs as
  root: a skipped namespace test would hide a broken setup), unless ``LVSDP_SKIP_NETNS=1`` is set
  explicitly. Tests under tests/netns/ are marked ``netns`` automatically; the fixtures apply the
  same rule to any test that uses them.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

SKIP_ENV = "LVSDP_SKIP_NETNS"
_counter = itertools.count(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "netns: needs root and network namespaces (the lab)")
    config.addinivalue_line("markers", "lab(**options): options for the `lab` fixture "
                                       "(nginx_workers, udp_echo, bulk_mb, access_log, ...)")


def pytest_collection_modifyitems(config, items):
    netns_dir = Path(__file__).parent / "netns"
    for item in items:
        if netns_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.netns)


def require_netns() -> None:
    """Fail (or skip, only with LVSDP_SKIP_NETNS=1) when namespace tests cannot run here."""
    if os.geteuid() == 0:
        return
    msg = "namespace tests need root"
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{msg} ({SKIP_ENV}=1)")
    pytest.fail(f"{msg}; run as root, or set {SKIP_ENV}=1 to skip them explicitly", pytrace=False)


def pytest_runtest_setup(item):
    if item.get_closest_marker("netns") is not None:
        require_netns()


def unique_prefix(tag: str = "t") -> str:
    """Short, unique across processes: namespace names are ``<prefix>-client`` etc."""
    return f"{tag}{os.getpid()}x{next(_counter)}"


def _lab_options(request) -> dict:
    marker = request.node.get_closest_marker("lab")
    return dict(marker.kwargs) if marker else {}


@pytest.fixture
def lab_factory():
    """``make(**options) -> Lab`` (already up); every lab made is torn down after the test."""
    require_netns()
    from control.lab import Lab
    made = []

    def make(**options):
        lab = Lab(unique_prefix(), **options)
        made.append(lab)
        return lab.setup()

    try:
        yield make
    finally:
        for lab in reversed(made):
            lab.teardown()


@pytest.fixture
def lab(request):
    """A fresh lab for one test; options from ``@pytest.mark.lab(...)``."""
    require_netns()
    from control.lab import Lab
    with Lab(unique_prefix(), **_lab_options(request)) as lab:
        yield lab


@pytest.fixture(scope="module")
def module_lab(request):
    """One lab shared by a module's tests (options from a module-level ``pytestmark`` lab
    marker). Tests must leave it as they found it."""
    require_netns()
    from control.lab import Lab
    marker = request.node.get_closest_marker("lab")
    with Lab(unique_prefix("m"), **(dict(marker.kwargs) if marker else {})) as lab:
        yield lab


@pytest.fixture
def lab_prefix():
    """A fresh unique prefix for tests that build (or crash) labs by hand; whatever is left
    under it is removed afterwards."""
    require_netns()
    from control.lab import cleanup_prefix
    prefix = unique_prefix("p")
    try:
        yield prefix
    finally:
        cleanup_prefix(prefix)
