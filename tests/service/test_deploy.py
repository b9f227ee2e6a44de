"""The container setup agrees with the server: the image binds 0.0.0.0 (so auth is
on), compose hands it a keys file where the image looks for one, the metrics
port is published, the health check needs no key, and `docker compose config`
accepts the file where a docker client with compose is installed."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dockerfile_cmd() -> tuple[list[str], dict[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    cmd, env = None, {}
    for line in text.splitlines():
        if line.startswith("CMD "):
            cmd = json.loads(line[4:])
        elif line.startswith("ENV "):
            for part in line[4:].split():
                if "=" in part:
                    k, v = part.split("=", 1)
                    env[k] = v
    assert cmd is not None
    return cmd, env


def test_image_command_parses_and_asks_for_keys_where_compose_puts_them():
    yaml = pytest.importorskip("yaml")
    from memsvc.cli.serve import serve

    cmd, env = _dockerfile_cmd()
    assert cmd[:2] == ["memsvc", "serve"]
    ctx = serve.make_context("serve", cmd[2:])  # every flag the image passes exists
    assert ctx.params["host"] == "0.0.0.0" and ctx.params["auth"] == "auto"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]["memsvc"]
    (secret,) = svc["secrets"]
    assert env["MEMSVC_API_KEYS_FILE"] == f"/run/secrets/{secret}"
    assert secret in compose["secrets"]
    published = {p.rsplit(":", 1)[-1] for p in svc["ports"]}
    assert {str(ctx.params["port"]), str(ctx.params["metrics_port"])} <= published
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
    assert "grpc_health" in " ".join(svc["healthcheck"]["test"])


def test_docker_compose_config_validates(tmp_path):
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client here")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"docker has no compose plugin here: {probe.stderr.strip()[:200]}")
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / "memsvc-api-keys.txt").write_text("")
    res = subprocess.run([docker, "compose", "config", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
