"""Pins benchmarks/peers/worker.py (issue 7) without the peers' venv: its input/output schema, checked on
the tiny random Llama with the one method that needs no peer package (a plain DynamicCache), and the
driver's turning of its results into rows."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PEERS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "peers"
if str(PEERS_DIR) not in sys.path:  # the driver's modules import one another by name, as when run.py runs
    sys.path.insert(0, str(PEERS_DIR))

from peer_side import peer_rows  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"peers_{name}", PEERS_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


worker = _load("worker")


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
    rows = peer_rows(wc, [dict(rn, id="hf-full|c")], cells)
    assert rows[0]["setting"] == "hf-full" and rows[0]["resident_bpt"] == per_token and rows[0]["tokens"] == rn["tokens"]
    with pytest.raises(ValueError, match="out of order"):
        peer_rows(wc, [dict(rn, id="x|c")], cells)


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
