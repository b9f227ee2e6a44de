"""The peers' rows: cells run by benchmarks/peers/worker.py in the peers' own venv, results back as rows.

The worker runs in benchmarks/peers/.venv-kvpress (kvpress, transformers, optimum-quanto, hqq; made by
setup.sh), reads its cells from a JSON file and prints one JSON result a line. Results are appended to
peer_results.jsonl as they come, keyed by a digest of what each cell sends, so an interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from results import load_jsonl, log

HERE = Path(__file__).resolve().parent
PEER_VENV = HERE / ".venv-kvpress"
PEER_PY = PEER_VENV / "bin" / "python"


def ensure_peer_venv() -> None:
    if not PEER_PY.exists() or not (PEER_VENV / ".peers-ok").exists():
        log("[peers] building benchmarks/peers/.venv-kvpress (setup.sh)")
        subprocess.run(["bash", str(HERE / "setup.sh")], check=True)


def cell_key(w: dict) -> str:
    """A worker cell's identity: its id and a digest of everything it sends (ids, method, params)."""
    return w["id"] + "#" + hashlib.sha1(json.dumps(w, sort_keys=True).encode()).hexdigest()[:16]


def run_worker(wcells: list[dict], model_dir: str, threads: int, out_dir: Path, python: str | None = None,
               workers: int = 1) -> list[dict]:
    """Run the cells through worker.py in the peers' venv; one result per cell, in order.

    Results are appended to out_dir/peer_results.jsonl as they come; a later run with the same
    cells reads them back instead of running them again (so an interrupted run resumes).
    workers > 1 splits the cells that remain over that many worker processes."""
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
