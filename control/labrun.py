"""Running `lvs-dp` inside a Lab's balancer namespace: start it as an operator would
(`lvs-dp run CONFIG` in the balancer), wait until its control socket answers, query it with the
same CLI, stop it. The demo, the end-to-end tests and the benchmarks share this."""

import os
import signal
import sys
import time
from pathlib import Path

from control.lab import REPO_ROOT

CLI = [sys.executable, "-m", "control.cli"]


class LvsDp:
    def __init__(self, lab, config, backend="netlink", queues=1, extra=()):
        self.lab = lab
        self.config = str(config)
        self.backend = backend
        self.sock = str(Path(lab.dir) / "lvs-dp.sock")
        self.instance = lab.prefix.replace("-", "")[:12] or "lab"
        self.queues = queues
        self.extra = list(extra)
        self.proc = None

    def _env(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return env

    def start(self, timeout=240.0):
        cmd = [*CLI, "run", self.config, "--socket", self.sock, "--backend", self.backend,
               "--instance", self.instance, "--queues", str(self.queues), *self.extra]
        self.proc = self.lab.popen("lb", cmd, name=f"lvs-dp-{len(self.lab.daemons())}",
                                   cwd=str(REPO_ROOT), env=self._env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lvs-dp exited with {self.proc.returncode}:\n{self.log()}")
            r = self.cli("list", check=False)
            if r.returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"lvs-dp did not answer on {self.sock} within {timeout} s:\n{self.log()}")

    def cli(self, *args, check=True):
        """Run `lvs-dp ARGS --socket SOCK` in the balancer namespace."""
        return self.lab.run("lb", [*CLI, *args, "--socket", self.sock], check=check,
                            cwd=str(REPO_ROOT), env=self._env())

    def list(self, *args):
        return self.cli("list", "-n", *args).stdout

    def snapshot(self):
        import json
        return json.loads(self.cli("list", "--json").stdout)

    def log(self):
        try:
            return Path(self.proc.log_path).read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.proc is None:
            return None
        return self.lab.stop(self.proc, sig=sig, timeout=timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
