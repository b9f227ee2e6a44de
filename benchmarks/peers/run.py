"""memsvc side by side with its peers on identical token ids (issue 7).

    .venv/bin/python benchmarks/peers/run.py                 # passkey + essay needle, 1k-4k x 5 depths, ppl @4k
    .venv/bin/python benchmarks/peers/run.py --quick         # 2 NIAH cells at 1k, ppl @1k: a smoke run
    .venv/bin/python benchmarks/peers/run.py --report benchmarks/peers/out/rows.json   # table + plots again

One driver, in memsvc's venv: it builds every prompt with memsvc's tokenizer and
prompt builders (memsvc.eval.niah.cell_prompt, the classic passkey needle with the
answer prefixed, and memsvc.eval.niah.needle_prompt, the original test's essay
needle "The best thing to do in San Francisco is ..." with the question and its
answer prefixed; memsvc.eval.ppl.windows for perplexity), runs memsvc's policies
through memsvc.eval.runner.PolicyRun, and hands the same token ids to
benchmarks/peers/worker.py inside benchmarks/peers/.venv-kvpress (kvpress 0.5.5,
transformers 5.2, optimum-quanto; made by setup.sh on first use) for the peers:
kvpress presses (SnapKV, StreamingLLM, ExpectedAttention, Knorm) at the
compression ratios that hold `tiered`'s and `tiered-h64`'s resident bytes per
token at each length (--ratios; numbers give fixed ratios), and transformers'
QuantizedCache (quanto 2/4-bit and hqq 2/3/4-bit, residual 128) read through a
plain forward, plus quanto 4-bit read the way kvpress's pipeline reads it
(context quantized before the question).

memsvc's rows: --policies plus the tiered budget sweep, --tiered-settings
(default `tiered-h64` = hot 64 + warm 64, `tiered-h128` = hot 128 + warm 128,
`tiered-h16` = hot 16 + warm 16: at 1k-4k tiered's bytes are mostly its fixed
exact windows; hot always holds up to one block more than `hot`; and
`tiered-h128r3kv8` = hot/warm 128, 8-bit cold values, retrieve 3,072, the
service's policy `tiered-v8`). Each row is one
point on the recall-vs-bytes and ppl-vs-bytes plots.

Resuming: every memsvc row goes to --out's memsvc_results.jsonl and every peer
cell to peer_results.jsonl as it ends, keyed by a digest of what it ran; the
same command again skips what is there (failed peer cells run again).
--fresh-memsvc forgets the memsvc rows (after memsvc's code changed).

Resident bytes are counted as an fp16 model would hold them (float tensors at 2
bytes; memsvc's compressed tiers are fp16 already), so `full` is 23,040 B/token
for SmolLM2-135M. Retention: of the cells memsvc `full` answers, the share a
method still answers. Progress goes to stderr; stdout gets the table and ends
with one JSON line.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PEER_VENV = HERE / ".venv-kvpress"
PEER_PY = PEER_VENV / "bin" / "python"

MEMSVC_POLICIES = "full,tiered,turbo3,kivi2"
# name -> (worker method, params, protocol); kvpress ones also take a compression ratio per setting
PEERS = {
    "hf-full": ("full", {}, "prompt"),
    "snapkv": ("kvpress", {"press": "SnapKVPress"}, "prompt"),
    "streamingllm": ("kvpress", {"press": "StreamingLLMPress"}, "prompt"),
    "expected-attn": ("kvpress", {"press": "ExpectedAttentionPress"}, "prompt"),
    "knorm": ("kvpress", {"press": "KnormPress"}, "prompt"),
    "quanto4": ("quanto", {"nbits": 4, "residual_length": 128, "q_group_size": 64}, "prompt"),
    "quanto2": ("quanto", {"nbits": 2, "residual_length": 128, "q_group_size": 64}, "prompt"),
    "quanto4-pipeline": ("quanto", {"nbits": 4, "residual_length": 128, "q_group_size": 64}, "pipeline"),
    # QuantizedCache backend "hqq", axis 0 (axis 1 fails in hqq's bit packing on most lengths; see worker.py)
    "hqq4": ("hqq", {"nbits": 4, "residual_length": 128, "q_group_size": 64, "axis_key": 0, "axis_value": 0}, "prompt"),
    "hqq3": ("hqq", {"nbits": 3, "residual_length": 128, "q_group_size": 64, "axis_key": 0, "axis_value": 0}, "prompt"),
    "hqq2": ("hqq", {"nbits": 2, "residual_length": 128, "q_group_size": 64, "axis_key": 0, "axis_value": 0}, "prompt"),
    # kvpress's own protocol (context compressed before the question is read); not in the default run
    "snapkv-pipeline": ("kvpress", {"press": "SnapKVPress"}, "pipeline"),
}
DEFAULT_PEERS = ",".join(p for p in PEERS if p != "snapkv-pipeline")
# extra memsvc rows: tiered with smaller exact windows (its bytes at 1k-4k are mostly the hot and warm windows),
# and h128r3kv8: 8-bit cold values (not resident: they cost stored bytes) with a 3,072-token retrieve budget
DEFAULT_TIERED_SETTINGS = ("h64:hot=64,warm=64;h128:hot=128,warm=128;h16:hot=16,warm=16;"
                           "h128r3kv8:hot=128,warm=128,retrieve=3072,value_codec=k8v8_v")
QUESTION = "What is the pass key?"
TASKS = ("passkey", "needle")  # the NIAH tasks: the passkey prompt and the essay needle


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _list(s: str, cast=str) -> list:
    return [cast(x) for x in s.replace(" ", ",").split(",") if x]


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_tiered_settings(spec: str, base: str = "tiered") -> dict:
    """'h64:hot=64,warm=64;h128:hot=128' -> {'tiered-h64': ('tiered', {'hot': 64, 'warm': 64}), ...}.

    Each setting is one more memsvc row (and one point on the plots): `base` built with those
    TieredPolicy fields (PolicyRun(loaded, base, **overrides)); the fields are checked here."""
    from memsvc.cache.policies import get_policy
    out: dict = {}
    for part in (x.strip() for x in spec.split(";")):
        if not part:
            continue
        name, _, body = part.partition(":")
        name = name.strip()
        if not name or not body.strip():
            raise ValueError(f"tiered setting {part!r}: want NAME:field=value,...")
        over = {}
        for kv in (x.strip() for x in body.split(",")):
            k, eq, v = kv.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"tiered setting {part!r}: {kv!r} is not field=value")
            over[k.strip()] = _value(v.strip())
        get_policy(base, **over)  # ValueError on an unknown field or a bad value
        label = f"{base}-{name}"
        if label in out:
            raise ValueError(f"tiered setting {label!r} given twice")
        out[label] = (base, over)
    return out


# ---------------------------------------------------------------- cells

def question_start(tok, ids: list[int], question: str = QUESTION) -> int:
    """Index of the first token of the last `question` in ids (what kvpress's pipeline reads after compressing)."""
    for i in range(len(ids) - 1, -1, -1):
        if question in tok.decode(ids[i:]):
            return i
    raise ValueError("the question is not in the prompt")


def build_niah_cells(tok, lengths: list[int], depths: list[float], seed: int = 0,
                     tasks: tuple = ("passkey",)) -> list[dict]:
    """One cell per (task, length, depth), kind "niah". Passkey cells ("niah-N-D"): keys drawn as
    `memsvc eval niah` draws them (Random(seed + length)). Essay-needle cells ("needle-N-D"): the same needle
    everywhere; a reply holding "sandwich" found it."""
    from memsvc.eval.niah import NEEDLE_QUESTION, task_prompt
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; known: {', '.join(TASKS)}")
    cells = []
    for n in lengths:
        rng = random.Random(seed + n)
        keys = [str(rng.randint(10000, 99999)) for _ in depths]
        for d, key in zip(depths, keys):
            for t in (t for t in TASKS if t in tasks):  # passkey first, as before the needle
                prompt, answer, holds = task_prompt(tok, t, n, d, key)
                question = QUESTION if t == "passkey" else NEEDLE_QUESTION
                cells.append({"cell": f"{'niah' if t == 'passkey' else t}-{n}-{d:g}", "kind": "niah", "task": t,
                              "length": n, "depth": d, "key": holds, "prompt_ids": prompt, "answer_ids": answer,
                              "context_len": question_start(tok, prompt, question)})
    return cells


def group(x: dict) -> str:
    """A cell's or row's budget group: its kind, with the essay needle apart from the passkey ("needle")."""
    return "needle" if x.get("task") == "needle" else x["kind"]


def task_of(r: dict) -> str:
    return r.get("task", "passkey")  # rows of runs before the essay needle are all passkey rows


def build_ppl_cells(tok, prefixes: list[int], target: int) -> list[dict]:
    from memsvc.eval.ppl import windows
    cells = []
    for p in prefixes:
        (ids,) = windows(tok, p, target, 1)
        cells.append({"cell": f"ppl-{p}", "kind": "ppl", "length": p, "prompt_ids": ids[:p], "answer_ids": ids[p:]})
    return cells


# ---------------------------------------------------------------- budgets

def ratio_for_bytes(bytes_per_token: float, fp16_per_token: int) -> float:
    """kvpress compression ratio whose kept tokens (fp16) hold bytes_per_token per prompt token."""
    return round(min(0.99, max(0.0, 1.0 - bytes_per_token / fp16_per_token)), 4)


def matched_ratios(rows: list[dict], fp16_per_token: int, policies=("tiered",)) -> dict:
    """(policy, group, length) -> compression ratio matching `policy`'s mean resident bytes per token there
    (group: niah = the passkey cells, needle, ppl)."""
    acc: dict = {}
    for r in rows:
        if r["method"] in policies and r.get("ok", True):
            acc.setdefault((r["method"], group(r), r["length"]), []).append(r["resident_bpt"])
    return {k: ratio_for_bytes(sum(v) / len(v), fp16_per_token) for k, v in acc.items()}


def ratio_key(k: tuple) -> str:
    """(policy, kind, length) as written in the JSON and --matched: 'niah@1024' for tiered, else 'tiered-h64/niah@1024'."""
    pol, kind, n = k
    return f"{kind}@{n}" if pol == "tiered" else f"{pol}/{kind}@{n}"


def parse_ratio_key(s: str) -> tuple:
    pol, _, rest = s.rpartition("/")
    kind, _, n = rest.partition("@")
    return (pol or "tiered", kind, int(n))


def is_matched(ratio: str) -> bool:
    """A --ratios entry that names a memsvc row (matched to its bytes) rather than a number."""
    try:
        float(ratio)
        return False
    except ValueError:
        return True


def peer_settings(peers: list[str], ratios: list[str]) -> list[tuple[str, str, object]]:
    """(label, peer, ratio or None): kvpress presses once per ratio (a memsvc row's name = matched to it), others once."""
    out = []
    for p in peers:
        if p not in PEERS:
            raise ValueError(f"unknown peer {p!r}; known: {', '.join(PEERS)}")
        if PEERS[p][0] == "kvpress":
            out += [(f"{p}@{r}", p, r) for r in ratios]
        else:
            out.append((p, p, None))
    return out


def peer_cells(cells: list[dict], settings, ratios_at: dict, n_new: int = 8) -> list[dict]:
    """The worker's input: every cell x setting, the very token ids of the memsvc side."""
    out = []
    for label, peer, ratio in settings:
        method, params, protocol = PEERS[peer]
        for c in cells:
            if protocol == "pipeline" and c["kind"] == "ppl":
                continue  # a ppl prefix has no question: the pipeline reads it as the plain protocol does
            par = dict(params)
            proto = protocol if c["kind"] == "niah" else "prompt"  # a ppl prefix is all context
            if method == "kvpress":
                par["compression_ratio"] = ratios_at[(ratio, group(c), c["length"])] if is_matched(ratio) \
                    else float(ratio)
            w = {"id": f"{label}|{c['cell']}", "kind": c["kind"], "method": method, "params": par,
                 "protocol": proto, "prompt_ids": c["prompt_ids"], "answer_ids": c["answer_ids"], "n_new": n_new}
            if proto == "pipeline":
                w["context_len"] = c["context_len"]
            out.append(w)
    return out


# ---------------------------------------------------------------- memsvc side

def memsvc_key(name: str, base: str, overrides: dict, c: dict, n_new: int) -> str:
    """A memsvc row's identity: setting, cell and a digest of what it ran (policy, overrides, ids, n_new)."""
    import hashlib
    what = {"policy": base, "overrides": overrides, "prompt_ids": c["prompt_ids"], "answer_ids": c["answer_ids"],
            "n_new": n_new}
    return f"{name}|{c['cell']}#" + hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def load_jsonl(path: Path, field: str = "key") -> dict:
    """{record[field]: record without it} of a JSONL store (a line cut by an interrupted write is skipped)."""
    done: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted write
                    continue
                done[r.pop(field)] = r
    return done


def run_memsvc(m, policies: list[str], cells: list[dict], n_new: int = 8, variants: dict | None = None,
               store: Path | None = None, legacy: list[dict] | None = None) -> list[dict]:
    """memsvc's rows, policy x cell, shortest cells first. `variants` maps extra names to (policy, overrides)
    (the tiered settings). With `store` (a JSONL file) every row is appended as it ends and rows already
    there (same setting, cell and digest) are read back instead of run: an interrupted run resumes.
    `legacy`: rows of an older rows_memsvc.json, reused by (method, cell) (--reuse-memsvc)."""
    variants = variants or {}
    done = load_jsonl(store, "store_key") if store else {}  # ("key" is a NIAH row's passkey)
    old = {(r["method"], r["cell"]): r for r in legacy or []}
    spec = {p: variants.get(p, (p, {})) for p in policies}
    jobs = [(c, p) for c in sorted(cells, key=lambda c: len(c["prompt_ids"])) for p in policies]
    rows_at: dict = {}
    todo = []
    for c, p in jobs:
        k = memsvc_key(p, *spec[p], c, n_new)
        if k in done:
            rows_at[k] = done[k]
        elif (p, c["cell"]) in old:
            rows_at[k] = old[(p, c["cell"])]
        else:
            todo.append((c, p, k))
    if len(todo) < len(jobs):
        log(f"[memsvc] {len(jobs) - len(todo)}/{len(jobs)} rows from earlier runs, {len(todo)} to run")
    t_start = time.time()
    for i, (c, p, k) in enumerate(todo):
        row = _memsvc_row(m, p, spec[p], c, n_new)
        rows_at[k] = row
        if store:
            with store.open("a") as f:
                f.write(json.dumps(dict(row, store_key=k)) + "\n")
        eta = (time.time() - t_start) / (i + 1) * (len(todo) - i - 1)
        log(f"[memsvc {i + 1}/{len(todo)}] {p} {c['cell']}: {row['seconds']:.1f} s (eta {eta / 60:.1f} min)")
    # in --policies order, cells in the order given
    return [dict(rows_at[memsvc_key(p, *spec[p], c, n_new)], **({"task": c["task"]} if "task" in c else {}))
            for p in policies for c in cells]


def _memsvc_row(m, p: str, spec: tuple, c: dict, n_new: int) -> dict:
    """One policy x cell, on a fresh PolicyRun (its own block cache), as the harness runs it."""
    import torch

    from memsvc.eval.runner import PolicyRun, restore, snapshot
    base, overrides = spec
    run = PolicyRun(m, base, **overrides)
    t0 = time.time()
    cache = run.new_cache()
    row = {"side": "memsvc", "method": p, "setting": p, "cell": c["cell"], "kind": c["kind"],
           "length": c["length"], "prompt_tokens": len(c["prompt_ids"]), "ok": True}
    if overrides:
        row.update(policy=base, overrides=overrides)
    if c["kind"] == "ppl":
        run.forward(cache, c["prompt_ids"])
        run.end_prompt(cache)
        row["resident_bpt"] = _resident_fp16(run, cache) / len(c["prompt_ids"])
        logits = run.forward(cache, c["answer_ids"], all_logits=True)
        tgt = torch.tensor(c["answer_ids"][1:])
        lp = torch.log_softmax(logits[:-1], -1).gather(1, tgt.unsqueeze(1))
        row.update(nll=-float(lp.sum()) / tgt.numel(), count=tgt.numel())
    else:
        logits = run.forward(cache, c["prompt_ids"])
        run.end_prompt(cache)
        row["resident_bpt"] = _resident_fp16(run, cache) / len(c["prompt_ids"])
        snap = snapshot(cache)
        row["logprob"] = run.teacher_logprob(cache, logits, c["answer_ids"])
        restore(cache, snap)
        row["tokens"], row["decode_tok_s"] = run.decode_greedy(cache, logits, n_new)
        run.flush(cache)
        row.update(depth=c["depth"], key=c["key"])
    row["seconds"] = time.time() - t0
    del cache
    return row




def _resident_fp16(run, cache) -> float:
    from memsvc.cache import TierCache
    if isinstance(cache, TierCache):
        return run.measure(cache).resident_bytes  # exact tiers already fp16
    return sum((l.keys.numel() + l.values.numel()) * 2 for l in cache.layers)


# ---------------------------------------------------------------- peers side

def ensure_peer_venv() -> None:
    if not PEER_PY.exists() or not (PEER_VENV / ".peers-ok").exists():
        log("[peers] building benchmarks/peers/.venv-kvpress (setup.sh)")
        subprocess.run(["bash", str(HERE / "setup.sh")], check=True)


def cell_key(w: dict) -> str:
    """A worker cell's identity: its id and a digest of everything it sends (ids, method, params)."""
    import hashlib
    return w["id"] + "#" + hashlib.sha1(json.dumps(w, sort_keys=True).encode()).hexdigest()[:16]


def run_worker(wcells: list[dict], model_dir: str, threads: int, out_dir: Path, python: str | None = None,
               workers: int = 1) -> list[dict]:
    """Run the cells through worker.py in the peers' venv; one result per cell, in order.

    Results are appended to out_dir/peer_results.jsonl as they come; a later run with the same
    cells reads them back instead of running them again (so an interrupted run resumes).
    workers > 1 splits the cells that remain over that many worker processes."""
    import threading
    store = out_dir / "peer_results.jsonl"
    done = {k: r for k, r in load_jsonl(store).items() if r.get("ok")}  # a failed cell runs again
    # shortest prompts first: an interrupted run holds every setting at the short lengths
    todo = sorted((w for w in wcells if cell_key(w) not in done), key=lambda w: len(w["prompt_ids"]) + len(w["answer_ids"]))
    log(f"[peers] {len(wcells) - len(todo)} cells from {store.name}, {len(todo)} to run in {workers} process(es)")
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    lock = threading.Lock()
    t_start = time.time()
    counter = {"n": 0}
    failures = []

    def one(i: int, part: list[dict]) -> None:
        try:
            _one(i, part)
        except Exception as e:  # raised below, in the caller's thread
            failures.append(f"worker {i}: {type(e).__name__}: {e}")

    def _one(i: int, part: list[dict]) -> None:
        path = out_dir / f"peer_cells.{i}.json"
        path.write_text(json.dumps({"cells": part}))
        keys = {w["id"]: cell_key(w) for w in part}
        cmd = [python or str(PEER_PY), str(HERE / "worker.py"), "--model", model_dir, "--threads", str(threads),
               "--cells", str(path)]
        got = 0
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
            for line in proc.stdout:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                r = json.loads(line)
                got += 1
                with lock:
                    done[keys[r["id"]]] = r
                    with store.open("a") as f:
                        f.write(json.dumps(dict(r, key=keys[r["id"]])) + "\n")
                    counter["n"] += 1
                    n = counter["n"]
                    eta = (time.time() - t_start) / n * (len(todo) - n)
                    what = r.get("error", "")[:80] if not r["ok"] else f"{r['seconds']:.1f} s"
                    log(f"[peers {n}/{len(todo)}] {r['id']}: {what} (eta {eta / 60:.1f} min)")
        if proc.returncode != 0 or got != len(part):
            failures.append(f"worker {i} exited {proc.returncode} after {got}/{len(part)} cells")

    parts = [todo[i::workers] for i in range(workers)]  # interleaved: each gets short and long prompts
    threads_ = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(parts) if p]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    if failures:
        raise RuntimeError("; ".join(failures))
    return [done[cell_key(w)] for w in wcells]


def reuse_memsvc(path: Path, policies: list[str], cells: list[dict]) -> list[dict] | None:
    """The memsvc rows of an earlier run when they cover every policy x cell; else None."""
    if not path.exists():
        return None
    rows = json.loads(path.read_text())
    have = {(r["method"], r["cell"]) for r in rows}
    if not all((p, c["cell"]) in have for p in policies for c in cells):
        return None
    keep = {c["cell"] for c in cells}
    return [r for r in rows if r["method"] in policies and r["cell"] in keep]


def peer_rows(wcells: list[dict], results: list[dict], cells: list[dict]) -> list[dict]:
    """Worker results as rows shaped like the memsvc side's."""
    by_cell = {c["cell"]: c for c in cells}
    rows = []
    for w, r in zip(wcells, results):
        if w["id"] != r["id"]:
            raise ValueError(f"worker results out of order: {w['id']} vs {r['id']}")
        label, cid = w["id"].split("|", 1)
        c = by_cell[cid]
        row = {"side": "peer", "method": label.split("@")[0], "setting": label, "cell": cid, "kind": c["kind"],
               "length": c["length"], "prompt_tokens": len(c["prompt_ids"]), "ok": r["ok"],
               "params": w["params"], "protocol": w["protocol"], **({"task": c["task"]} if "task" in c else {})}
        if not r["ok"]:
            row["error"] = r.get("error")
        else:
            row["resident_bpt"] = r["resident_bytes_per_token_fp16"]
            row["seconds"] = r["seconds"]
            if c["kind"] == "ppl":
                row.update(nll=r["nll"], count=r["count"])
            else:
                row.update(tokens=r["tokens"], logprob=r["logprob"], decode_tok_s=r["decode_tok_s"],
                           depth=c["depth"], key=c["key"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------- report

def mark_correct(rows: list[dict], decode) -> None:
    for r in rows:
        if r["kind"] == "niah" and r.get("ok") and "tokens" in r:
            r["answer"] = decode(r["tokens"])
            r["correct"] = r["key"] in r["answer"]


def summarize(rows: list[dict], fp16_per_token: int, base: str = "full") -> list[dict]:
    """One line per setting: bytes, recall, retention and Δ log p against memsvc `full`, Δppl, decode tok/s."""
    import math
    full = {r["cell"]: r for r in rows if r["side"] == "memsvc" and r["method"] == base and r.get("ok")}
    out = []
    for s in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == s]
        ok = [r for r in mine if r.get("ok")]
        niah = [r for r in ok if r["kind"] == "niah"]
        ppl = [r for r in ok if r["kind"] == "ppl"]
        base_cells = [r for r in niah if r["cell"] in full and full[r["cell"]].get("correct")]
        dlp = [r["logprob"] - full[r["cell"]]["logprob"] for r in niah if r["cell"] in full]
        res = [r["resident_bpt"] for r in niah] or [r["resident_bpt"] for r in ppl]
        res_mean = sum(res) / len(res) if res else None
        longest = max((r["length"] for r in niah), default=None)
        tps = [r["decode_tok_s"] for r in niah if r["length"] == longest and r.get("decode_tok_s")]
        dppl = [math.exp(r["nll"]) / math.exp(full[r["cell"]]["nll"]) - 1 for r in ppl if r["cell"] in full]
        per_task = {}
        for t in dict.fromkeys(task_of(r) for r in niah):
            of = [r for r in base_cells if task_of(r) == t]
            per_task[t] = {"retention": sum(r["correct"] for r in of) / len(of) if of else None,
                           "full_correct": len(of)}
        out.append({
            "setting": s, "side": mine[0]["side"], "method": mine[0]["method"], "cells": len(niah),
            "failed": len(mine) - len(ok), "error": next((r.get("error") for r in mine if not r.get("ok")), None),
            "recall": sum(r["correct"] for r in niah) / len(niah) if niah else None,
            "retention": sum(r["correct"] for r in base_cells) / len(base_cells) if base_cells else None,
            "full_correct": len(base_cells), "tasks": per_task,
            "mean_dlogprob": sum(dlp) / len(dlp) if dlp else None,
            "resident_bytes_per_token": res_mean,
            "x_vs_fp16": fp16_per_token / res_mean if res_mean else None,
            "ppl": math.exp(ppl[0]["nll"]) if ppl else None,
            "dppl": dppl[0] if dppl else None,
            "ppl_resident_bytes_per_token": ppl[0]["resident_bpt"] if ppl else None,
            "decode_tok_s": sum(tps) / len(tps) if tps else None, "decode_at": longest,
        })
    return out


def by_length(rows: list[dict], base: str = "full", task: str | None = None) -> dict[str, dict[int, dict]]:
    """setting -> length -> {bytes (mean resident B/token of its NIAH cells), correct, of (cells `base` answers)};
    the cells of one task, or of every task (None)."""
    full = {r["cell"]: r for r in rows if r["side"] == "memsvc" and r["method"] == base and r.get("ok")}
    out: dict = {}
    for r in rows:
        if r["kind"] != "niah" or not r.get("ok") or task not in (None, task_of(r)):
            continue
        at = out.setdefault(r["setting"], {}).setdefault(r["length"], {"bytes": [], "correct": 0, "of": 0})
        at["bytes"].append(r["resident_bpt"])
        if r["cell"] in full and full[r["cell"]].get("correct"):
            at["of"] += 1
            at["correct"] += bool(r.get("correct"))
    for lengths in out.values():
        for at in lengths.values():
            at["bytes"] = sum(at["bytes"]) / len(at["bytes"])
    return out


def target_check(rows: list[dict], fp16: int, keep: float = 0.9, best: float = 0.99, smaller: float = 10.0) -> dict:
    """Issue 7's target, per length: (a) wherever a peer keeps >= `keep` retention, some tiered setting keeps at
    least as much with fewer resident bytes; (b) some tiered setting keeps >= `best` retention at >= `smaller`x
    fewer bytes than fp16. Lengths where `full` answers no cell are left out (no retention to compare)."""
    at = by_length(rows)
    side = {r["setting"]: r["side"] for r in rows}
    tiered = [s for s in at if side[s] == "memsvc" and s.startswith("tiered")]

    def ret(x):
        return x["correct"] / x["of"]
    a = []
    for p in (s for s in at if side[s] == "peer"):
        for n, x in sorted(at[p].items()):
            if not x["of"] or ret(x) < keep:
                continue
            wins = [t for t in tiered if n in at[t] and ret(at[t][n]) >= ret(x) and at[t][n]["bytes"] < x["bytes"]]
            a.append({"peer": p, "length": n, "retention": ret(x), "bytes": x["bytes"], "held": bool(wins),
                      "by": min(wins, key=lambda t: at[t][n]["bytes"]) if wins else None})
    b = [{"setting": t, "length": n, "retention": ret(x), "x_vs_fp16": fp16 / x["bytes"]}
         for t in tiered for n, x in sorted(at[t].items()) if x["of"] and ret(x) >= best and fp16 / x["bytes"] >= smaller]
    lengths = sorted({n for s in at for n, x in at[s].items() if x["of"]})
    return {"a": a, "a_held": all(x["held"] for x in a), "b": b,
            "b_lengths": sorted({x["length"] for x in b}), "lengths": lengths}


def length_table(rows: list[dict], fp16: int, task: str | None = None) -> str:
    at = by_length(rows, task=task)
    lengths = sorted({n for s in at for n in at[s]})
    lines = ["| method | " + " | ".join(f"{n:,}: retention, B/tok (×)" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for s, per in at.items():
        cells = []
        for n in lengths:
            x = per.get(n)
            cells.append("—" if x is None else
                         f"{x['correct']}/{x['of']}, {x['bytes']:,.0f} ({fp16 / x['bytes']:.1f}×)")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(summary: list[dict]) -> str:
    def f(v, fmt, none="—"):
        return none if v is None else format(v, fmt)
    tasks = list(dict.fromkeys(t for s in summary for t in s.get("tasks", {})))
    lines = ["| method | side | resident B/tok | × vs fp16 | recall | retention vs full | "
             + "".join(f"{t} | " for t in tasks) + "mean Δ log p | Δppl | decode tok/s |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---:|---:|"]
    for s in summary:
        if s["cells"] == 0 and s["ppl"] is None:
            lines.append(f"| {s['setting']} | {s['side']} | failed: {s['error']} |" + " |" * (6 + len(tasks)))
            continue

        def share(x):
            return "—" if x is None or x["retention"] is None else \
                f"{x['retention']:.0%} ({round(x['retention'] * x['full_correct'])}/{x['full_correct']})"
        ret = share(s)
        per = "".join(f"{share(s.get('tasks', {}).get(t))} | " for t in tasks)
        tps = "—" if s["decode_tok_s"] is None else f"{s['decode_tok_s']:.2f} @{s['decode_at']}"
        dppl = "—" if s["dppl"] is None else f"{100 * s['dppl']:+.2f}%"
        lines.append(f"| {s['setting']} | {s['side']} | {f(s['resident_bytes_per_token'], ',.0f')} | "
                     f"{f(s['x_vs_fp16'], '.1f')}× | {f(s['recall'], '.0%')} | {ret} | {per}{f(s['mean_dlogprob'], '+.2f')} | "
                     f"{dppl} | {tps} |")
    return "\n".join(lines)


def json_line(summary: list[dict], rows: list[dict], ratios_at: dict, check: dict | None = None) -> str:
    keep = ("setting", "side", "resident_bytes_per_token", "x_vs_fp16", "recall", "retention", "tasks",
            "mean_dlogprob", "dppl", "decode_tok_s", "failed")
    return json.dumps({"peers": [{k: s[k] for k in keep} for s in summary], "rows": len(rows),
                       "matched_ratios": {ratio_key(k): v for k, v in sorted(ratios_at.items())},
                       "target": check})


def scatter(summary: list[dict], y: str, path: str, ylabel: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import math
    fig, ax = plt.subplots(figsize=(9, 5.5))
    seen: dict = {}  # points that (nearly) coincide get their labels stacked
    for s in summary:
        x = s["resident_bytes_per_token"] if y != "dppl" else s["ppl_resident_bytes_per_token"]
        v = s[y]
        if x is None or v is None:
            continue
        v = 100 * v
        mem = s["side"] == "memsvc"
        ax.scatter([x], [v], marker="o" if mem else "s", color="tab:blue" if mem else "tab:orange", s=40)
        spot = (round(math.log10(x), 1), round(v / 4))
        k = seen[spot] = seen.get(spot, -1) + 1
        ax.annotate(s["setting"], (x, v), fontsize=7, xytext=(4, 3 - 9 * k), textcoords="offset points")
    ax.set_xscale("log")
    if y == "dppl":
        ax.set_yscale("symlog", linthresh=1.0)  # a few percent and a few hundred percent on one axis
    ax.set_xlabel("resident bytes per token (fp16 = 23,040; log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title + "  (blue: memsvc, orange: peers)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(rows: list[dict], fp16: int, ratios_at: dict, figures: str | None, decode) -> None:
    mark_correct(rows, decode)
    summary = summarize(rows, fp16)
    print(table(summary))
    tasks = list(dict.fromkeys(task_of(r) for r in rows if r["kind"] == "niah"))
    for t in tasks:
        print(f"\nBy length, {t} (retention: of the cells full answers, those the method answers; "
              "resident bytes per token):")
        print(length_table(rows, fp16, t))
    check = target_check(rows, fp16)
    print(f"\nTarget, on the cells of every task ({', '.join(tasks)}) at each length.")
    print("Target (a): wherever a peer keeps >= 90% retention, a tiered setting keeps as much with fewer bytes:")
    for x in check["a"]:
        print(f"  {x['peer']} @{x['length']}: {x['retention']:.0%} at {x['bytes']:,.0f} B/tok -> "
              + (f"held by {x['by']}" if x["held"] else "MISSED"))
    print(f"Target (b): tiered >= 99% retention at >= 10x fewer bytes than fp16: at lengths {check['b_lengths']} "
          f"of {check['lengths']}" + "".join(f"\n  {x['setting']} @{x['length']}: {x['retention']:.0%}, "
                                              f"{x['x_vs_fp16']:.1f}x" for x in check["b"]))
    if figures:
        from memsvc.eval.niah import heatmap
        os.makedirs(figures, exist_ok=True)
        scatter(summary, "retention", os.path.join(figures, "peers_recall_vs_bytes.png"),
                "NIAH retention vs full (%), " + " + ".join(tasks), "Recall vs resident bytes")
        scatter(summary, "dppl", os.path.join(figures, "peers_ppl_vs_bytes.png"),
                "perplexity change vs full (%)", "Perplexity vs resident bytes")
        peers = [s for s in summary if s["side"] == "peer" and s["retention"] is not None and s["method"] != "hf-full"]
        best = max(peers, key=lambda s: (s["retention"], -(s["resident_bytes_per_token"] or 0)), default=None)
        tiered_rows = [s["setting"] for s in summary if s["side"] == "memsvc" and s["setting"].startswith("tiered")]
        for t in tasks:  # passkey maps keep their old names (peers_niah_*.png)
            hm = [dict(r, policy=r["setting"]) for r in rows if r["kind"] == "niah" and r.get("ok") and task_of(r) == t]
            stem = "peers_niah" if t == "passkey" else f"peers_{t}"
            for s in ["full"] + tiered_rows + ([best["setting"]] if best else []):
                if any(r["policy"] == s for r in hm):
                    heatmap(hm, s, os.path.join(figures, f"{stem}_{s.replace('@', '_')}.png"),
                            what="passkey" if t == "passkey" else "essay needle")
        log(f"[report] figures in {figures}")
    print(json_line(summary, rows, ratios_at, check))


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="memsvc vs kvpress and QuantizedCache on identical token ids (issue 7)")
    ap.add_argument("--quick", action="store_true", help="2 NIAH cells at 1k and ppl @1k: a smoke run")
    ap.add_argument("--lengths", default="1024,2048,3072,4096")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--tasks", default=",".join(TASKS), help="NIAH tasks: passkey, needle (the essay needle)")
    ap.add_argument("--ppl-prefix", default="4096", help="ppl prefix lengths ('' for none)")
    ap.add_argument("--ppl-target", type=int, default=512)
    ap.add_argument("--policies", default=MEMSVC_POLICIES, help="memsvc policies (tiered is needed for matching)")
    ap.add_argument("--peers", default=DEFAULT_PEERS)
    ap.add_argument("--ratios", default="tiered,tiered-h64,tiered-h128r3kv8",
                    help="kvpress compression ratios: numbers, or a memsvc row's name (tiered, tiered-h64, ...) = "
                         "the ratio holding that row's bytes per token at each length")
    ap.add_argument("--tiered-settings", default=DEFAULT_TIERED_SETTINGS,
                    help="extra memsvc rows: tiered with other TieredPolicy fields, NAME:field=value,...;... "
                         "(row 'tiered-NAME'); '' for none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new", dest="n_new", type=int, default=8, help="greedy tokens per NIAH cell")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "out"), help="where rows.json and the worker's input go")
    ap.add_argument("--figures", default=None, help="directory for the scatter PNGs and heatmaps")
    ap.add_argument("--report", default=None, help="re-render a rows.json of an earlier run; runs nothing")
    ap.add_argument("--parallel", action="store_true",
                    help="run the peers' processes beside memsvc's side from the start (QuantizedCache first, "
                         "the matched presses once their ratios are known); 1 torch thread per process")
    ap.add_argument("--workers", type=int, default=1, help="peer worker processes (1 torch thread each)")
    ap.add_argument("--reuse-memsvc", action="store_true",
                    help="also take memsvc rows (by setting and cell) from --out's rows_memsvc.json of an older run; "
                         "rows in memsvc_results.jsonl (same ids and settings) are always reused")
    ap.add_argument("--fresh-memsvc", action="store_true",
                    help="forget memsvc_results.jsonl (memsvc's code changed): rerun every memsvc row")
    ap.add_argument("--matched", default="",
                    help="kvpress ratios, e.g. niah@1024=0.54,ppl@4096=0.85,tiered-h64/niah@1024=0.8 "
                         "(peers-only runs: those rows need not run)")
    ap.add_argument("--no-setup", action="store_true", help="do not build the peers' venv")
    args = ap.parse_args(argv)

    import torch
    from memsvc.cache import fp16_bytes_per_token
    from memsvc.model import load_model, pull_default
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.depths, args.ppl_prefix, args.ppl_target = "1024", "0,1", "1024", 256
    m = load_model(pull_default())
    fp16 = fp16_bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim)
    decode = lambda ids: m.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        ratios = {parse_ratio_key(k): v for k, v in saved["matched_ratios"].items()}
        report(saved["rows"], fp16, ratios, args.figures, decode)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_setup:
        ensure_peer_venv()
    tok = m.tokenizer
    cells = build_niah_cells(tok, _list(args.lengths, int), _list(args.depths, float), args.seed,
                             tuple(_list(args.tasks)))
    cells += build_ppl_cells(tok, _list(args.ppl_prefix, int), args.ppl_target)
    log(f"[cells] {len(cells)} cells ({sum(c['kind'] == 'niah' for c in cells)} NIAH), memsvc first")
    variants = parse_tiered_settings(args.tiered_settings)
    policies = _list(args.policies)
    if "tiered" in policies:  # the tiered settings go right after tiered
        at = policies.index("tiered") + 1
        policies[at:at] = [v for v in variants if v not in policies]
    ratios = _list(args.ratios)
    matched_to = [r for r in ratios if is_matched(r)]
    for r in matched_to:
        if r not in policies and not args.matched:
            raise SystemExit(f"--ratios {r} needs {r} among the memsvc rows ({', '.join(policies)})")
    if args.fresh_memsvc and (out / "memsvc_results.jsonl").exists():
        (out / "memsvc_results.jsonl").unlink()
    store = out / "memsvc_results.jsonl"
    legacy = json.loads((out / "rows_memsvc.json").read_text()) \
        if args.reuse_memsvc and (out / "rows_memsvc.json").exists() else None
    settings = peer_settings(_list(args.peers), ratios)
    # the rows the kvpress ratios are matched to run first (unless --matched gives the ratios)
    first = [] if args.matched else [p for p in policies if p in matched_to]
    rest = [p for p in policies if p not in first]
    given = {parse_ratio_key(k): float(v) for k, v in (x.split("=") for x in _list(args.matched))}
    unmatched = [x for x in settings if not (PEERS[x[1]][0] == "kvpress" and is_matched(x[2]))]
    matched = [x for x in settings if x not in unmatched]
    wkw = dict(model_dir=str(m.path), threads=args.threads, out_dir=out, workers=args.workers)
    box: dict = {}
    ready = __import__("threading").Event()

    def _peers():  # the peers' processes; the matched presses wait for their ratios
        try:
            box["unmatched"] = run_worker(peer_cells(cells, unmatched, {}, args.n_new), **wkw)
            ready.wait()
            box["matched"] = run_worker(peer_cells(cells, matched, box["ratios"], args.n_new), **wkw) \
                if "ratios" in box else []
        except Exception as e:  # re-raised in the main thread
            box["error"] = e
            ready.set()
    t = __import__("threading").Thread(target=_peers)
    if args.parallel:  # the peers run beside memsvc from the start (1 torch thread per process)
        t.start()
    try:
        rows = run_memsvc(m, first, cells, args.n_new, variants, store, legacy)
        ratios_at = {**matched_ratios(rows, fp16, matched_to), **given}
        missing = {(r, group(c), c["length"]) for r in matched_to for c in cells} - set(ratios_at)
        if matched and missing:
            raise SystemExit(f"no matched ratio for {sorted(missing)}: run {', '.join(matched_to)} or give --matched")
        log("[budget] kvpress ratios matching " + ", ".join(f"{ratio_key(k)}: {v}" for k, v in sorted(ratios_at.items())))
        box["ratios"] = ratios_at
    finally:
        ready.set()
    rows += run_memsvc(m, rest, cells, args.n_new, variants, store, legacy)
    (out / "rows_memsvc.json").write_text(json.dumps(rows))
    if not args.parallel:
        t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    wcells = peer_cells(cells, unmatched, {}, args.n_new) + peer_cells(cells, matched, ratios_at, args.n_new)
    results = box["unmatched"] + box["matched"]
    rows.sort(key=lambda r: policies.index(r["method"]))  # memsvc rows in --policies order
    rows += peer_rows(wcells, results, cells)
    (out / "rows.json").write_text(json.dumps({"rows": rows, "matched_ratios": {
        ratio_key(k): v for k, v in sorted(ratios_at.items())}, "args": vars(args)}))
    log(f"[out] {out / 'rows.json'}")
    report(rows, fp16, ratios_at, args.figures, decode)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
