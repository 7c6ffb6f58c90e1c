"""The data plane: pure numba functions over numpy tables (see tables.py), and the thin I/O
adapters that feed them (nfq_binding.py, nfq_netlink.py).

Numba's on-disk cache is keyed per function by its own file's timestamp only, so a change in a
module a jitted function calls would leave stale machine code in use. The cache therefore lives in
a directory named after a hash of every source file of this package: any edit selects a fresh one.
An explicit NUMBA_CACHE_DIR from the environment wins.
"""

import hashlib
import os
from pathlib import Path


def _cache_dir():
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(here.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    tag = h.hexdigest()[:16]
    for base in (here.parent / ".numba-cache", Path.home() / ".cache" / "lvs-dp"):
        try:
            base.mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return base / tag
        except OSError:
            continue
    return None


if not os.environ.get("NUMBA_CACHE_DIR"):
    _dir = _cache_dir()
    if _dir is not None:
        from numba.core import config as _numba_config
        _numba_config.CACHE_DIR = str(_dir)
