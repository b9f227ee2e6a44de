"""The peers' side of issue 7: run cells through kvpress presses or transformers' QuantizedCache.

Runs inside benchmarks/peers/.venv-kvpress (kvpress 0.5.5, transformers 5.2,
optimum-quanto; see setup.sh), not in memsvc's venv, and imports nothing from
memsvc. The driver (run.py) builds every cell's token ids with memsvc's own
tokenizer and prompt builder and hands them over, so both sides read
identical ids.

    python worker.py --model DIR [--threads 1] < cells.json > results.jsonl

Input: a JSON object {"cells": [cell, ...]} (or a bare list of cells), each cell:
    id            str, unique
    kind          "niah" | "ppl"
    method        "full" | "kvpress" | "quanto" | "hqq"
    params        {"press": "SnapKVPress", "compression_ratio": 0.8, ...} for kvpress;
                  {"nbits": 4, "residual_length": 128, "q_group_size": 64} for quanto;
                  the same for hqq: transformers' QuantizedCache backend "hqq" (hqq 0.2.8.post1
                  from PyPI), 1/2/3/4/8 bits, axis_key/axis_value 0 (transformers' default) as for
                  quanto. Axis 1 (grouping along head_dim, as transformers' docs show for HQQ) fails
                  on CPU here whenever the group count is not a multiple of hqq's packing (2 per
                  byte at 4 bits, 4 at 2, 10 per int32 at 3), i.e. for most prompt lengths, in
                  hqq's dequantize (hqq/core/quantize.py:198): "RuntimeError: The size of tensor a
                  (451) must match the size of tensor b (452) at non-singleton dimension 0"
    protocol      "prompt" (default): the whole prompt is one prefill, compressed
                  (or quantized) at its end, as memsvc's policies see it;
                  "pipeline": what kvpress's pipeline does: the first context_len
                  ids are prefilled and compressed, the rest (the question) is read
                  afterwards through the compressed cache
    prompt_ids    [int]  (niah: ends with the answer prefix; ppl: the prefix)
    answer_ids    [int]  niah: scored teacher-forced; ppl: the target ids
    context_len   int    (protocol "pipeline" only)
    n_new         int    niah: greedy tokens to decode (default 8)

Output: one JSON line per cell, in input order (flushed as each ends):
    id, method, ok, error (when ok is false), prompt_tokens, kept_tokens (max over layers),
    resident_bytes (as held), resident_bytes_fp16 (float tensors counted at 2 bytes, as the
    cache would be with an fp16 model), resident_bytes_per_token_fp16, seconds,
    niah: tokens (greedy continuation), logprob (sum log p(answer) teacher-forced), decode_tok_s;
    ppl:  nll (mean over target[1:]), count.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

KINDS = ("niah", "ppl")
METHODS = ("full", "kvpress", "quanto", "hqq")
PROTOCOLS = ("prompt", "pipeline")
PRESSES = ("SnapKVPress", "StreamingLLMPress", "ExpectedAttentionPress", "KnormPress")
RESULT_KEYS = ("id", "method", "ok", "prompt_tokens", "kept_tokens", "resident_bytes", "resident_bytes_fp16",
               "resident_bytes_per_token_fp16", "seconds")
NIAH_KEYS = ("tokens", "logprob", "decode_tok_s")
PPL_KEYS = ("nll", "count")


def validate_cell(cell: dict) -> dict:
    """The cell with defaults filled in; ValueError naming the first thing wrong."""
    c = dict(cell)
    for key in ("id", "kind", "method", "prompt_ids", "answer_ids"):
        if key not in c:
            raise ValueError(f"cell {c.get('id')!r}: missing {key!r}")
    if c["kind"] not in KINDS:
        raise ValueError(f"cell {c['id']!r}: kind {c['kind']!r} not in {KINDS}")
    if c["method"] not in METHODS:
        raise ValueError(f"cell {c['id']!r}: method {c['method']!r} not in {METHODS}")
    c.setdefault("params", {})
    c.setdefault("protocol", "prompt")
    c.setdefault("n_new", 8)
    if c["protocol"] not in PROTOCOLS:
        raise ValueError(f"cell {c['id']!r}: protocol {c['protocol']!r} not in {PROTOCOLS}")
    if not c["prompt_ids"] or not all(isinstance(t, int) for t in c["prompt_ids"] + c["answer_ids"]):
        raise ValueError(f"cell {c['id']!r}: prompt_ids and answer_ids must be lists of ints (prompt not empty)")
    if c["method"] == "kvpress":
        press = c["params"].get("press")
        if press not in PRESSES:
            raise ValueError(f"cell {c['id']!r}: press {press!r} not in {PRESSES}")
        r = c["params"].get("compression_ratio")
        if not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(f"cell {c['id']!r}: compression_ratio must be in [0, 1), got {r!r}")
    if c["method"] == "quanto" and c["params"].get("nbits", 4) not in (2, 4):
        raise ValueError(f"cell {c['id']!r}: quanto nbits must be 2 or 4")
    if c["method"] == "hqq" and c["params"].get("nbits", 4) not in (1, 2, 3, 4, 8):
        raise ValueError(f"cell {c['id']!r}: hqq nbits must be 1, 2, 3, 4 or 8")
    if c["protocol"] == "pipeline":
        n = c.get("context_len")
        if not isinstance(n, int) or not 0 < n < len(c["prompt_ids"]):
            raise ValueError(f"cell {c['id']!r}: protocol 'pipeline' needs 0 < context_len < len(prompt_ids)")
    if c["kind"] == "ppl" and len(c["answer_ids"]) < 2:
        raise ValueError(f"cell {c['id']!r}: a ppl cell needs at least 2 target ids")
    return c


def read_cells(text: str) -> list[dict]:
    data = json.loads(text)
    cells = data["cells"] if isinstance(data, dict) else data
    out = [validate_cell(c) for c in cells]
    ids = [c["id"] for c in out]
    if len(set(ids)) != len(ids):
        raise ValueError("cell ids must be unique")
    return out


def tensor_bytes(t, fp16: bool = False) -> int:
    """Bytes of a tensor, walking tensor subclasses (quanto's packed/quantized tensors) to their storage.
    fp16: floating-point storage counted at 2 bytes per element."""
    import torch
    if isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], dict):  # hqq: (packed tensor, meta)
        q, meta = t
        return tensor_bytes(q, fp16) + sum(tensor_bytes(meta.get(k), fp16) for k in ("scale", "zero"))
    if not isinstance(t, torch.Tensor):
        return 0
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), fp16) for n in names)
    size = 2 if fp16 and t.is_floating_point() else t.element_size()
    return t.numel() * size


def cache_bytes(cache, fp16: bool = False) -> tuple[int, int]:
    """(bytes the cache holds, tokens held in its largest layer)."""
    total, kept = 0, 0
    for layer in cache.layers:
        n = 0
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            total += tensor_bytes(t, fp16)
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            n = layer.keys.shape[-2]
        q = getattr(layer, "_quantized_keys", None)
        if isinstance(q, tuple):  # hqq: the original shape is in the meta
            n += q[1]["shape"][-2]
        elif q is not None:
            n += q.shape[-2]
        kept = max(kept, n)
    return total, kept


def snapshot(cache) -> list[dict]:
    """Each layer's attributes, shallow: DynamicLayer and QuantizedLayer replace their tensors on update
    (torch.cat, re-quantization), they never write into them, so this is a consistent copy."""
    return [dict(layer.__dict__) for layer in cache.layers]


def restore(cache, saved: list[dict]) -> None:
    for layer, attrs in zip(cache.layers, saved):
        layer.__dict__.clear()
        layer.__dict__.update(attrs)


class Worker:
    def __init__(self, model_dir: str, threads: int = 1):
        import torch
        from transformers import AutoModelForCausalLM
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        # transformers >= 5.25 names the cache argument `cache` (past_key_values is deprecated); the peers' venv
        # pins an older transformers, whose argument is past_key_values
        import inspect
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def new_cache(self, cell):
        from transformers import DynamicCache, QuantizedCache
        if cell["method"] in ("quanto", "hqq"):
            p = cell["params"]
            axis = 0  # hqq at axis 1 fails on most lengths (see the module docstring)
            return QuantizedCache(backend=cell["method"], config=self.model.config, nbits=p.get("nbits", 4),
                                  axis_key=p.get("axis_key", axis), axis_value=p.get("axis_value", axis),
                                  q_group_size=p.get("q_group_size", 64),
                                  residual_length=p.get("residual_length", 128))
        return DynamicCache()

    def press(self, cell):
        import contextlib
        if cell["method"] != "kvpress":
            return contextlib.nullcontext()
        import kvpress
        params = {k: v for k, v in cell["params"].items() if k != "press"}
        return getattr(kvpress, cell["params"]["press"])(**params)(self.model)

    def step(self, cache, ids, pos: int, all_logits: bool = False):
        """Feed ids at positions pos.. (explicit: a pruned cache is shorter than the positions)."""
        torch = self.torch
        x = torch.tensor([ids])
        position_ids = torch.arange(pos, pos + len(ids)).unsqueeze(0)
        out = self.model(input_ids=x, position_ids=position_ids, use_cache=True,
                         logits_to_keep=0 if all_logits else 1, **{self.cache_arg: cache})
        return out.logits[0].float() if all_logits else out.logits[0, -1].float()

    def prefill(self, cell, cache):
        """The prompt through the cache, compressed as the cell's protocol says; last logits [V]."""
        ids = cell["prompt_ids"]
        cut = cell["context_len"] if cell["protocol"] == "pipeline" else len(ids)
        with self.press(cell):
            logits = self.step(cache, ids[:cut], 0)
        if cut < len(ids):
            logits = self.step(cache, ids[cut:], cut)
        return logits

    def run(self, cell) -> dict:
        torch = self.torch
        t0 = time.perf_counter()
        res = {"id": cell["id"], "method": cell["method"], "ok": True, "prompt_tokens": len(cell["prompt_ids"])}
        with torch.no_grad():
            cache = self.new_cache(cell)
            if cell["kind"] == "ppl":
                with self.press(cell):
                    self.step(cache, cell["prompt_ids"], 0)
                self._measure(res, cache)
                tgt = cell["answer_ids"]
                logits = self.step(cache, tgt, len(cell["prompt_ids"]), all_logits=True)
                lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(tgt[1:]).unsqueeze(1))
                res.update(nll=-float(lp.sum()) / (len(tgt) - 1), count=len(tgt) - 1)
            else:
                logits = self.prefill(cell, cache)
                self._measure(res, cache)
                saved = snapshot(cache)  # the teacher-forced pass reads the same prompt cache
                n = len(cell["prompt_ids"])
                first = logits
                # greedy continuation, timed after the first token
                out = [int(logits.argmax())]
                t1 = time.perf_counter()
                while len(out) < cell["n_new"]:
                    out.append(int(self.step(cache, out[-1:], n + len(out) - 1).argmax()))
                dt = time.perf_counter() - t1
                res["tokens"] = out
                res["decode_tok_s"] = (len(out) - 1) / dt if len(out) > 1 and dt > 0 else 0.0
                # teacher-forced log p(answer) from the prompt's last logits, on the copy
                restore(cache, saved)
                logits = first
                total = 0.0
                for i, t in enumerate(cell["answer_ids"]):
                    total += float(torch.log_softmax(logits, -1)[t])
                    if i + 1 < len(cell["answer_ids"]):
                        logits = self.step(cache, [t], n + i)
                res["logprob"] = total
        res["seconds"] = time.perf_counter() - t0
        return res

    @staticmethod
    def _measure(res, cache):
        raw, kept = cache_bytes(cache)
        fp16, _ = cache_bytes(cache, fp16=True)
        res.update(kept_tokens=kept, resident_bytes=raw, resident_bytes_fp16=fp16,
                   resident_bytes_per_token_fp16=fp16 / res["prompt_tokens"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="converted safetensors directory (memsvc's copy)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cells", default="-", help="JSON file of cells (default: stdin)")
    args = ap.parse_args(argv)
    text = sys.stdin.read() if args.cells == "-" else open(args.cells).read()
    cells = read_cells(text)
    w = Worker(args.model, args.threads)
    for cell in cells:
        try:
            res = w.run(cell)
        except Exception as e:  # one failing cell (a press that crashes) must not lose the others
            res = {"id": cell["id"], "method": cell["method"], "ok": False, "error": f"{type(e).__name__}: {e}"}
        if res.get("nll") is not None and not math.isfinite(res["nll"]):
            res["ok"] = False
            res["error"] = "non-finite nll"
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
