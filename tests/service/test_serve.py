"""`memsvc serve` as a process: keys file and environment keys, metrics port,
JSON RPC log on stderr, graceful stop on SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from memsvc.clients.client import MemoryClient

ROOT = Path(__file__).resolve().parents[2]


def test_serve_process_with_keys_metrics_and_rpc_log(tmp_path, tiny_model_dirs):
    from memsvc.cli import main

    keys = tmp_path / "keys.txt"
    res = CliRunner().invoke(main, ["keys", "new", "alice", "--keys-file", str(keys)])
    alice_key = res.stdout.strip().splitlines()[-1]
    bob_key = "bob-plain-key-0123456789"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMSVC_API_KEYS": f"bob={bob_key}"}
    err = open(tmp_path / "stderr.txt", "wb")
    p = subprocess.Popen([sys.executable, "-m", "memsvc", "serve", "--port", "0", "--data-dir", str(tmp_path / "d"),
                          "--model", str(tiny_model_dirs[0]), "--api-keys-file", str(keys), "--metrics-port", "0"],
                         stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
    try:
        banner = p.stdout.readline().decode()
        m = re.search(r"on 127\.0\.0\.1:(\d+).*auth on, plaintext, metrics on :(\d+)/metrics", banner)
        assert m, banner
        port, mport = int(m.group(1)), int(m.group(2))
        with MemoryClient(f"127.0.0.1:{port}", timeout=60, api_key=alice_key) as alice, \
                MemoryClient(f"127.0.0.1:{port}", timeout=60, api_key=bob_key) as bob:
            alice.create_session("s")
            alice.append("s", text="hello there")
            with pytest.raises(grpc.RpcError) as info:
                bob.get_session("s")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert 'memsvc_rpc_total{code="OK",method="Append"} 1.0' in text
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
        assert "memsvc: stopped" in p.stdout.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        err.close()
    logged = [json.loads(line) for line in (tmp_path / "stderr.txt").read_text().splitlines()
              if line.startswith("{")]
    assert [(d["method"], d["code"], d.get("tenant")) for d in logged] == [
        ("CreateSession", "OK", "alice"), ("Append", "OK", "alice"), ("GetSession", "NOT_FOUND", "bob")]
