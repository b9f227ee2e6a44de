"""The container setup agrees with the server: the image binds 0.0.0.0 (so auth is
on), compose hands it a keys file where the image looks for one, the metrics
port is published, the health check needs no key; the profile `replicas` runs
PostgreSQL and two replicas whose commands the server accepts; and `docker compose
config` accepts the file, with and without the profile, where a docker client with
compose is installed."""
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
    for name in ("memsvc-api-keys.txt", "memsvc-pg-password.txt", "memsvc-pgpass.txt"):
        (tmp_path / name).write_text("")
    for profile in ([], ["--profile", "replicas"]):
        res = subprocess.run([docker, "compose", *profile, "config", "--quiet"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr


def test_replicas_profile_runs_postgres_and_two_replicas_with_flags_the_server_has():
    """The profile `replicas`: PostgreSQL 15 with a volume and a pg_isready health check, and two replicas whose
    command parses as `memsvc serve` (every flag exists) with a postgresql:// store naming that service's
    database and user, a passfile among their secrets, a lease term, and their own loopback host ports; the
    LMDB service stays the only one without a profile, so `docker compose up` starts what it did."""
    yaml = pytest.importorskip("yaml")
    from psycopg.conninfo import conninfo_to_dict

    from memsvc.cli.serve import serve
    from memsvc.store.open import parse_spec

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert [name for name, svc in services.items() if not svc.get("profiles")] == ["memsvc"]
    profiled = {name for name, svc in services.items() if "replicas" in svc.get("profiles", [])}
    replicas = sorted(name for name in profiled if name != "postgres")
    assert "postgres" in profiled and len(replicas) == 2

    pg = services["postgres"]
    assert pg["image"].split(":")[0] == "postgres" and pg["image"].split(":")[1].split(".")[0] == "15"
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    (volume,) = pg["volumes"]
    assert volume.split(":")[0] in compose["volumes"] and volume.split(":")[1] == "/var/lib/postgresql/data"
    assert "ports" not in pg  # reached on the compose network only
    env = pg["environment"]
    assert env["POSTGRES_PASSWORD_FILE"] in {f"/run/secrets/{s}" for s in pg["secrets"]}
    assert set(pg["secrets"]) <= set(compose["secrets"])

    host_ports = [p.rsplit(":", 1)[0] for svc in services.values() for p in svc.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))  # every service can run beside the others
    owners = set()
    for name in replicas:
        svc = services[name]
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert svc["command"][:2] == ["memsvc", "serve"]
        ctx = serve.make_context("serve", svc["command"][2:])  # every flag the replica passes exists
        assert ctx.params["host"] == "0.0.0.0" and ctx.params["lease_seconds"] > 0
        backend, url = parse_spec(ctx.params["store_spec"])
        assert backend == "postgresql"
        conn = conninfo_to_dict(url)
        assert "password" not in conn
        assert (conn["host"], conn["port"]) == ("postgres", "5432")
        assert (conn["user"], conn["dbname"]) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
        assert conn["passfile"] in {f"/run/secrets/{s}" for s in svc["secrets"]}
        assert set(svc["secrets"]) <= set(compose["secrets"])
        assert "memsvc_api_keys" in svc["secrets"]  # it binds 0.0.0.0: auth is on
        published = {p.rsplit(":", 1)[-1] for p in svc["ports"]}
        assert {str(ctx.params["port"]), str(ctx.params["metrics_port"])} <= published
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
        grpc_port = next(p for p in svc["ports"] if p.endswith(f":{ctx.params['port']}"))
        assert ctx.params["advertise"] == grpc_port.rsplit(":", 1)[0]  # clients told of it reach it from the host
        assert "grpc_health" in " ".join(svc["healthcheck"]["test"])
        owners.add(svc["hostname"])  # the lease owner's name starts with it: each replica its own
    assert len(owners) == 2
