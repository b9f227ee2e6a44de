"""Where one decode step's time goes, `full` against `tiered`, on the real model (SmolLM2-135M).

    python benchmarks/decode_profile.py --lengths 1024,4096 --threads 1,2 --steps 8

For each context length and policy: a prompt of essay tokens through the service's forward path (as `memsvc
eval speed`, with its block and decoded caches), then `--steps` greedy decode steps per thread count, each
timed whole and by section. Sections are exclusive wall times (a section's children are not in it), summed
over the model's layers and given per step (median over the steps):

- proj: the q/k/v/o linear layers; mlp: the MLP; lm_head: the output projection; norms: the RMS norms;
- update: the cache's append of the step's keys and values;
- attn glue: the attention module's own work (RoPE, reshapes) and memsvc's attention function's;
- full: sdpa: the `full` cache's attention;
- tiered: exact (sink, warm, hot tiers, the softmax over every part and the value sums), retrieval (Quest
  bounds over the block summaries, top-k, the visibility mask), cold keys / cold values (reuse of the last
  decode, gathers), read blocks (the packed blocks from the block cache or the store, parsed), dequant (the
  codec's decode), settle (tiers after attention);
- other: the rest of the step (embedding, the rotary table, the model's glue, the argmax).

`ops/step` counts the aten operators one step dispatches (a measure of Python-level calls), in a second table
by section. `decoded_cache_bytes` (JSON) is what the session holds in the decoded cache after the steps. The
last line is one JSON object with every row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memsvc import corpus  # noqa: E402
from memsvc.cache import attention as memsvc_attention_module  # noqa: E402
from memsvc.cache.tiered import cold as cold_module  # noqa: E402
from memsvc.cache.tiered.layer import TierLayer  # noqa: E402
from memsvc.eval.runner import PolicyRun  # noqa: E402
from memsvc.model import load_model, pull_default  # noqa: E402

SECTIONS = ("proj", "mlp", "norms", "lm_head", "update", "attn glue", "sdpa", "exact", "retrieval", "cold keys",
            "cold values", "read blocks", "dequant", "settle", "other")


class Sections:
    """Exclusive wall time per label: a stack of open sections, each charged its time less its children's."""

    def __init__(self):
        self.stack: list[list] = []  # [label, start, children's seconds]
        self.total: dict[str, float] = {}
        self.on = False

    def enter(self, label: str) -> None:
        if self.on:
            self.stack.append([label, time.perf_counter(), 0.0])

    def leave(self) -> None:
        if not self.on or not self.stack:
            return
        label, t0, inner = self.stack.pop()
        dt = time.perf_counter() - t0
        self.total[label] = self.total.get(label, 0.0) + dt - inner
        if self.stack:
            self.stack[-1][2] += dt

    def wrap(self, owner, name: str, label) -> None:
        """label: a string, or a function of the call's arguments that gives one."""
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            self.enter(label if isinstance(label, str) else label(*args, **kwargs))
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
        setattr(owner, name, timed)

    def hook(self, module: torch.nn.Module, label: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.enter(label))
        module.register_forward_hook(lambda *_: self.leave())


class OpCount(TorchDispatchMode):
    """aten operators dispatched, by the section open when each ran."""

    def __init__(self, s: Sections):
        super().__init__()
        self.s = s
        self.by: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        label = self.s.stack[-1][0] if self.s.stack else "other"
        self.by[label] = self.by.get(label, 0) + 1
        return func(*args, **(kwargs or {}))


def instrument(model) -> Sections:
    s = Sections()
    for layer in model.model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            s.hook(getattr(layer.self_attn, name), "proj")
        s.hook(layer.self_attn, "attn glue")
        s.hook(layer.mlp, "mlp")
        s.hook(layer.input_layernorm, "norms")
        s.hook(layer.post_attention_layernorm, "norms")
    s.hook(model.model.model.norm, "norms")
    s.hook(model.model.lm_head, "lm_head")
    # the attention function: the model looks it up by name at each call
    sdpa = memsvc_attention_module.sdpa_attention_forward
    memsvc_attention_module.sdpa_attention_forward = lambda *a, **k: _timed(s, "sdpa", sdpa, *a, **k)
    from transformers.cache_utils import DynamicLayer
    for cls in (DynamicLayer, TierLayer):
        s.wrap(cls, "update", "update")
    s.wrap(TierLayer, "attend", "exact")
    s.wrap(TierLayer, "_cold_keys", "retrieval")
    s.wrap(TierLayer, "_cold_tensor", lambda layer, half, *a: "cold values" if half else "cold keys")
    s.wrap(TierLayer, "_cold_values", "cold values")
    s.wrap(TierLayer, "_decode", "dequant")
    s.wrap(cold_module.ColdStore, "get_stacked", "read blocks")
    s.wrap(TierLayer, "settle", "settle")
    return s


def _timed(s: Sections, label: str, fn, *args, **kwargs):
    s.enter(label)
    try:
        return fn(*args, **kwargs)
    finally:
        s.leave()


def profile_steps(run: PolicyRun, cache, logits: torch.Tensor, steps: int, s: Sections) -> dict:
    """`steps` decode steps, each timed whole and by section; returns medians per step (ms) and ops/step."""
    tok = int(logits.argmax())
    walls, per = [], {k: [] for k in SECTIONS}
    for i in range(steps + 1):
        s.total, s.on = {}, i > 0  # the first step warms up
        t0 = time.perf_counter()
        tok = int(run.forward(cache, [tok]).argmax())
        wall = time.perf_counter() - t0
        s.on = False
        if i == 0:
            continue
        walls.append(wall)
        named = sum(s.total.values())
        for k in SECTIONS:
            per[k].append(s.total.get(k, 0.0) if k != "other" else wall - named)
    counter = OpCount(s)
    s.on = True
    with counter:
        tok = int(run.forward(cache, [tok]).argmax())
    s.on = False
    ms = {k: 1e3 * statistics.median(v) for k, v in per.items()}
    wall = 1e3 * statistics.median(walls)
    return {"step_ms": wall, "tok_s": 1e3 / wall, "sections_ms": ms, "ops_per_step": sum(counter.by.values()),
            "ops_by_section": counter.by}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--policies", default="full,tiered")
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per (length, policy, threads)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    threads = [int(x) for x in args.threads.split(",")]
    m = load_model(pull_default())
    s = instrument(m)
    rows = []
    for n in lengths:
        ids = corpus.haystack_tokens(m.tokenizer, n)
        for p in args.policies.split(","):
            torch.set_num_threads(max(threads))
            run = PolicyRun(m, p)
            cache = run.new_cache()
            logits = run.forward(cache, ids)
            run.end_prompt(cache)
            for t in threads:
                torch.set_num_threads(t)
                r = profile_steps(run, cache, logits, args.steps, s)
                held = run.decoded_cache.owner_bytes(cache.cold.owner) if hasattr(cache, "cold") else 0
                rows.append({"policy": p, "context": n, "threads": t, **r, "decoded_cache_bytes": held})
                print(f"[profile] {n} {p} {t}t: {r['tok_s']:.2f} tok/s, {r['ops_per_step']} ops/step",
                      file=sys.stderr, flush=True)
            cache.close()
    print(table(rows))
    print()
    print(op_table(rows))
    print(json.dumps({"decode_profile": rows}))


def table(rows: list[dict]) -> str:
    used = [k for k in SECTIONS if any(r["sections_ms"][k] >= 0.05 for r in rows)]
    head = "| context | policy | threads | tok/s | step ms | " + " | ".join(used) + " | ops/step |"
    out = [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        cells = " | ".join(f"{r['sections_ms'][k]:.1f}" for k in used)
        out.append(f"| {r['context']} | {r['policy']} | {r['threads']} | {r['tok_s']:.2f} | {r['step_ms']:.1f} | "
                   f"{cells} | {r['ops_per_step']:,} |")
    return "\n".join(out)


def op_table(rows: list[dict]) -> str:
    used = [k for k in SECTIONS if any(r["ops_by_section"].get(k, 0) for r in rows)]
    head = "| context | policy | threads | ops/step | " + " | ".join(used) + " |"
    out = [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        cells = " | ".join(f"{r['ops_by_section'].get(k, 0):,}" for k in used)
        out.append(f"| {r['context']} | {r['policy']} | {r['threads']} | {r['ops_per_step']:,} | {cells} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
