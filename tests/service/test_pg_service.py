"""The service over PostgreSQL gives what it gives over LMDB (issue 23, acceptance 1): the recorded golden
turns (Append, Generate, restart, Resume) give the recorded replies and bytes per token (within 1%) from a
PostgreSQL store, and one round trip (Append, Generate, restart, Resume, fork, delete) gives the same tokens and
the same logical bytes per token over both backends. The server is the session's throwaway PostgreSQL
(tests/conftest.py pg_server), each test on a fresh database."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from memsvc.corpus import haystack_tokens
from memsvc.model import load_model
from tests.conftest import make_tiny_model, running_server

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import golden  # noqa: E402

RECORDED = ROOT / "tests" / "fixtures" / "golden-0268ddf" / "golden.json"
OPTS = {"max_new_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def context_model(tmp_path_factory, real_model_dir):
    """A tiny model whose replies depend on the context (tests/service/test_golden.py's)."""
    path = make_tiny_model(tmp_path_factory.mktemp("pg-service") / "tiny", real_model_dir, seed=3,
                           max_positions=2048, initializer_range=0.3)
    return load_model(str(path))


def test_golden_turns_from_postgresql_give_the_recorded_replies_and_sizes(pg_url, context_model):
    recorded = json.loads(RECORDED.read_text())
    s = recorded["settings"]
    got = golden.run_turns(context_model, s["policies"] + list(golden.STAND_INS.values()), s["tokens"], s["chunk"],
                           s["new_tokens"], pg_url, temperature=s.get("temperature", 0.0))
    assert golden.compare(recorded, got, 0.01, golden.STAND_INS) == []  # stand-ins: test_golden.py


def _round_trip(spec, model) -> dict:
    """Append, Generate, restart, Resume, fork, delete: what the client sees at each step."""
    ids = haystack_tokens(model.tokenizer, 700)
    out = {}
    with running_server(spec, model) as (c, _):
        c.create_session("a", policy="tiered")
        for lo in range(0, len(ids), 350):
            c.append("a", tokens=ids[lo:lo + 350])
        out["first"] = list(c.generate_text("a", commit=True, **OPTS).token_ids)
    with running_server(spec, model) as (c, _):  # the restart
        c.resume("a")
        out["resumed"] = list(c.generate_text("a", commit=True, **OPTS).token_ids)
        c.fork_session("a", "b")
        c.append("b", text=" And then something else happened.")
        out["fork"] = list(c.generate_text("b", commit=True, **OPTS).token_ids)
        out["source"] = list(c.generate_text("a", **OPTS).token_ids)  # the fork changed nothing of its source
        sessions = {s.id: s for s in c.list_sessions()}
        out["tokens"] = {sid: s.tokens for sid, s in sessions.items()}
        out["bytes_per_token"] = {sid: s.stored_bytes_per_token for sid, s in sessions.items()}
        assert c.delete_session("a") and [s.id for s in c.list_sessions()] == ["b"]
        out["after_delete"] = list(c.generate_text("b", **OPTS).token_ids)  # b kept the blocks it shared
    return out


def test_one_round_trip_is_the_same_over_lmdb_and_postgresql(tmp_path, pg_url, context_model):
    lmdb = _round_trip(tmp_path / "data", context_model)
    pg = _round_trip(pg_url, context_model)
    bpt_lmdb, bpt_pg = lmdb.pop("bytes_per_token"), pg.pop("bytes_per_token")
    assert pg == lmdb
    assert len(set(lmdb["first"] + lmdb["resumed"])) > 1  # replies that depend on the context
    assert lmdb["tokens"]["b"] > lmdb["tokens"]["a"]
    for sid, want in bpt_lmdb.items():
        assert want > 0 and abs(bpt_pg[sid] - want) <= 0.01 * want, (sid, bpt_pg[sid], want)
