"""`memsvc sessions verify [ID...] [--repair] [--json]`: offline checks of every record, token block,
KV pointer, blob and reference count; --repair rebuilds from the token ids with the model."""
from __future__ import annotations

import json
import random
import re
import struct

import lmdb
import pytest
from click.testing import CliRunner

from memsvc.cli import main
from tests.conftest import running_server
from tests.service.test_repair import HISTORY, build, flip


def _verify(data, *args):
    res = CliRunner().invoke(main, ["sessions", "verify", "--data-dir", str(data), *args])
    return res.exit_code, res.stdout if "--json" in args else res.output  # stderr: the model's progress bars


@pytest.fixture
def store_dir(tmp_path, tiny_model):
    data = tmp_path / "data"
    with running_server(data, tiny_model) as (c, _):
        build(c, "a", HISTORY[:420])
        c.fork_session("a", "a2")  # shares a's blobs
        c.create_session("b", policy="full")
        c.append("b", tokens=HISTORY[:150])
        c.create_session("empty")
    return data


def test_verify_finds_nothing_in_a_clean_store(store_dir):
    code, out = _verify(store_dir)
    assert code == 0, out
    assert out.count("ok ") == 4 and "0 damaged" in out
    code, out = _verify(store_dir, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and all(s["ok"] for s in doc["sessions"])
    assert not any(doc["store"].values())


def test_verify_reports_damage_and_repair_rebuilds_it(store_dir, tiny_model_dirs):
    rng = random.Random(1)
    flip(store_dir, "b", [(0, 0), (1, 1)], rng)
    flip(store_dir, "a", [(0, 0), (1, 0xFFFFFFFF)], rng)  # shared with the fork a2: both see it
    env = lmdb.open(str(store_dir), max_dbs=8)  # and a wrong reference count
    refs = env.open_db(b"refs")
    with env.begin(write=True) as txn:
        key, raw = next(iter(txn.cursor(db=refs)))
        txn.put(key, struct.pack("<IQ", 7, struct.unpack("<IQ", raw)[1]), db=refs)
    env.close()

    code, out = _verify(store_dir, "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["ok"]
    bad = {s["id"]: s for s in doc["sessions"] if not s["ok"]}
    assert set(bad) == {"a", "a2", "b"} and all(s["repairable"] for s in bad.values())
    assert set(bad["b"]["kv"]) == {"0/0", "1/1"} and set(bad["a"]["kv"]) == {"0/0", "1/state"}
    assert doc["store"]["wrong_counts"] == 1
    code, out = _verify(store_dir, "b")  # one session, text
    assert code == 1 and "DAMAGED  b" in out and "KV 0/0" in out and "fails its checksum" in out

    code, out = _verify(store_dir, "--repair", "--model", str(tiny_model_dirs[0]), "--json")
    doc = json.loads(out)
    assert code == 0, out
    assert doc["ok"] and all(s["ok"] for s in doc["after_repair"])
    rebuilt = {r["id"]: r for r in doc["repairs"] if "id" in r}
    assert set(rebuilt) == {"a", "a2", "b"} and all(r["exact"] for r in rebuilt.values())
    assert rebuilt["b"]["rewritten"] == 2
    assert _verify(store_dir)[0] == 0
    show = CliRunner().invoke(main, ["sessions", "show", "b", "--data-dir", str(store_dir)])
    assert "2 KV entries rebuilt from the token ids (1 repair in all)" in show.output
    show = CliRunner().invoke(main, ["sessions", "show", "a", "--data-dir", str(store_dir), "--json"])
    assert json.loads(show.stdout)["repair"]["count"] == 1
    assert re.search(r"last repair +never", CliRunner().invoke(main, ["sessions", "show", "empty", "--data-dir",
                                                                       str(store_dir)]).output)


def test_verify_repair_with_another_model_or_damaged_tokens_leaves_damage(store_dir, tiny_model_dirs):
    rng = random.Random(2)
    flip(store_dir, "b", [(0, 0)], rng)
    code, out = _verify(store_dir, "--repair", "--model", str(tiny_model_dirs[1]))
    assert code == 1 and "not repaired" in out and "fingerprint" in out
    flip(store_dir, "a", [0], rng, db="tokens")
    code, out = _verify(store_dir, "--repair", "--model", str(tiny_model_dirs[0]), "--json")
    doc = json.loads(out)
    assert code == 1 and set(doc["failures"]) == {"a"} and "token ids" in doc["failures"]["a"]
    assert {s["id"] for s in doc["after_repair"] if not s["ok"]} == {"a"}


def test_verify_unknown_session(store_dir):
    code, out = _verify(store_dir, "nope")
    assert code == 1 and "no such session" in out
