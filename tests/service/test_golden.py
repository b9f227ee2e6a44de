"""Behaviour kept across refactors: the replies recorded at commit 0268ddf (before the redesign) on a tiny model.

tests/fixtures/golden-0268ddf/ holds what `benchmarks/golden.py --record ... --model TINY --tokens 900
--chunk 300 --new-tokens 16 --exports DIR` wrote at that commit: the token ids of each reply and the bytes
per token of sessions of `full`, `tiered` and `tiered-v8`, and each session's export as stored before the
server restarted. Today's code must
- give the same replies and bytes per token (within 1%) for the same turns, from scratch;
- load each session the old code stored (imported from its export) and answer exactly as the old code did
  after its restart.
The tiny model is rebuilt from its seed; its fingerprint must be the one the sessions were stored with.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from memsvc.model import fingerprint, load_model
from memsvc.store.archive import read_export
from memsvc.store.open import open_store
from tests.conftest import make_tiny_model, running_server

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "golden-0268ddf"
sys.path.insert(0, str(ROOT / "benchmarks"))
import golden  # noqa: E402


@pytest.fixture(scope="module")
def recorded():
    return json.loads((FIXTURE / "golden.json").read_text())


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory, real_model_dir):
    path = make_tiny_model(tmp_path_factory.mktemp("golden") / "tiny", real_model_dir, seed=3, max_positions=2048,
                           initializer_range=0.3)
    stored = read_export(FIXTURE / "tiered.msx").header["model_fingerprint"]
    assert fingerprint(path) == stored, "the tiny model no longer rebuilds bit for bit from its seed"
    return load_model(str(path))


def test_same_turns_give_the_recorded_replies_and_sizes(recorded, golden_model, tmp_path):
    """Recorded policies whose stored form changed since are checked on their stand-ins (golden.STAND_INS:
    `tiered-k6` stores what `tiered` stored then); today's `tiered` gives the recorded replies too, and stores
    fewer bytes."""
    s = recorded["settings"]
    got = golden.run_turns(golden_model, s["policies"] + list(golden.STAND_INS.values()), s["tokens"], s["chunk"],
                           s["new_tokens"], tmp_path / "data", temperature=s.get("temperature", 0.0))
    assert golden.compare(recorded, got, 0.01, golden.STAND_INS) == []
    for policy in golden.STAND_INS:
        want, now = recorded["policies"][policy], got[policy]
        assert [now[k] for k in ("peek", "committed", "after_restart", "tokens")] == \
            [want[k] for k in ("peek", "committed", "after_restart", "tokens")]
        assert now["stored_bytes_per_token"] < want["stored_bytes_per_token"]


@pytest.mark.parametrize("policy", ["full", "tiered", "tiered-v8"])
def test_sessions_stored_by_the_old_code_load_and_answer_as_it_did(recorded, golden_model, tmp_path, policy):
    data = tmp_path / "data"
    with open_store(data) as store:
        store.import_session(read_export(FIXTURE / f"{policy}.msx"))
    want = recorded["policies"][policy]
    with running_server(data, golden_model) as (client, _):
        sid = f"golden-{policy}"
        client.resume(sid)
        out = client.generate_text(sid, max_new_tokens=recorded["settings"]["new_tokens"], commit=True,
                                   temperature=recorded["settings"].get("temperature", 0.0), seed=7)
        assert list(out.token_ids) == want["after_restart"]
        assert client.get_session(sid).tokens == want["tokens"]
