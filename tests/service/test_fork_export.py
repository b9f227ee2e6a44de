"""Forks share the KV blocks of a `tiered` session and answer exactly as it does, before
and after the original is deleted and after a restart; an exported session imported into
a fresh data dir answers identically; another model refuses it."""
from __future__ import annotations

import grpc
import pytest
from click.testing import CliRunner

from memsvc.cli import main
from tests.conftest import running_server

HISTORY = [(10 + 13 * j) % 4000 for j in range(1200)]  # past sink + hot + warm: cold blocks too


def _greedy(c, sid: str) -> list[int]:
    return list(c.generate_text(sid, max_new_tokens=8).token_ids)


def test_forks_of_a_tiered_session_share_blocks_and_generate_identically(tmp_path, long_model):
    data = tmp_path / "data"
    with running_server(data, long_model) as (c, server):
        store = server.store
        c.create_session("orig", policy="tiered")
        c.append("orig", tokens=HISTORY)
        assert c.get_session("orig").tier_tokens["cold"] > 0
        before = store.stats()
        for f in ("f0", "f1", "f2"):
            c.fork_session("orig", f)
        st = store.stats()
        assert st["blobs"] == before["blobs"] and st["blob_bytes"] == before["blob_bytes"]
        assert st["shared_blobs"] == st["blobs"]
        ref = _greedy(c, "orig")
        assert all(_greedy(c, f) == ref for f in ("f0", "f1", "f2"))

        turn = [101, 102, 103, 104]
        c.append("orig", tokens=turn)
        c.append("f0", tokens=turn)
        assert c.generate_text("f0", max_new_tokens=6, commit=True).token_ids == \
            c.generate_text("orig", max_new_tokens=6, commit=True).token_ids
        c.append("f1", tokens=[7] * 50)
        c.append("f2", tokens=[9] * 70)
        after_f0 = _greedy(c, "f0")
        after_f1 = _greedy(c, "f1")
        blobs_before_delete = store.stats()["blobs"]

        c.delete_session("orig")
        assert store.stats()["blobs"] < blobs_before_delete  # the original's own blocks went
        assert _greedy(c, "f0") == after_f0 and _greedy(c, "f1") == after_f1
    with running_server(data, long_model) as (c, server):  # from the store alone: lazy cold reads of shared blobs
        assert _greedy(c, "f0") == after_f0 and _greedy(c, "f1") == after_f1
        assert server.store.gc()["freed_blobs"] == 0


def test_export_import_generates_identically_and_another_model_refuses(tmp_path, long_model, long_model_dir,
                                                                       tiny_model):
    data, fresh = tmp_path / "data", tmp_path / "fresh"
    with running_server(data, long_model) as (c, _):
        c.create_session("s", policy="tiered")
        c.append("s", tokens=HISTORY)
        c.append("s", messages=[{"role": "user", "content": "And then?"}])
        ref = _greedy(c, "s")
    file = tmp_path / "s.msx"
    runner = CliRunner()
    out = runner.invoke(main, ["sessions", "export", "s", str(file), "--data-dir", str(data)])
    assert out.exit_code == 0, out.output
    out = runner.invoke(main, ["sessions", "import", str(file), "--data-dir", str(fresh), "--model", str(long_model_dir)])
    assert out.exit_code == 0, out.output
    with running_server(fresh, long_model) as (c, _):
        assert _greedy(c, "s") == ref
        assert c.generate_text("s", max_new_tokens=5, commit=True).token_ids == ref[:5]
    with running_server(fresh, tiny_model) as (c, _):  # a server of another model refuses the imported session
        with pytest.raises(grpc.RpcError) as e:
            c.resume("s")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "fingerprint" in e.value.details()
