"""`memsvc serve` in a subprocess on 127.0.0.1 (port 0) for the benchmarks that drive a real server.

stdout is read until the server prints the port it bound; stderr goes to a log file. Knows the command
line only; imports neither torch nor the model.

The server runs the memsvc of the checkout this file is in, whatever the current directory and whichever
checkout the environment has installed (editable): `-P` keeps the current directory off its import path and
`BOOT` puts this checkout's root first on it. (Without that, `python -m` imported memsvc from the current
directory, so a benchmark run from another checkout, to compare two commits, served the current directory's
code.)
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path


CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root that holds benchmarks/ and memsvc/

# argv: checkout, then memsvc's own arguments. The checkout's root goes first on the import path, so its
# memsvc (a regular package) wins over an editable install of another checkout; memsvc's __path__ then covers
# the root's kernels/, store/, proto/ and clients/ (memsvc/__init__.py).
BOOT = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["memsvc", *sys.argv[2:]]
runpy.run_module("memsvc", run_name="__main__", alter_sys=True)
"""


class ServeProcess:
    def __init__(self, args: list[str], log_path: Path, *, env: dict | None = None, append_log: bool = False,
                 start_timeout: float = 600, stop_timeout: float = 60):
        cmd = [sys.executable, "-P", "-c", BOOT, str(CHECKOUT), "serve", "--host", "127.0.0.1", "--port", "0", *args]
        env = dict(os.environ if env is None else env)
        self.log_path = log_path
        self.stop_timeout = stop_timeout
        self._log = open(log_path, "ab" if append_log else "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        self.port = self._wait_port(start_timeout)

    def _wait_port(self, timeout: float) -> int:
        found: list[int] = []

        def read():
            for line in self.proc.stdout:
                m = re.search(r" on 127\.0\.0\.1:(\d+)", line)
                if m:
                    found.append(int(m.group(1)))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not found:
            self.stop()
            raise SystemExit(f"the server did not start within {timeout:.0f} s; its log:\n{self.log_tail()}")
        return found[0]

    def log_tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after stop_timeout; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
