"""Repair from token ids (issue 5, acceptance 3): how long rebuilding damaged blocks takes.

Builds a `tiered` session of --tokens tokens on the real model the way clients do (appends in pieces,
committed replies), keeps an exported copy, then for each damage pattern flips one bit in --blocks stored
entries, repairs the session (memsvc.repair.repair_session, as the server and `sessions verify --repair`
do, with its progress on stderr: a bar on a terminal, lines otherwise) and checks that the next greedy reply
equals the copy's:
    any    random entries (cold blocks and layer states: the whole log is replayed)
    cold   random cold blocks only (the replay stops once the last damaged block is made)
    early  the first cold block of --blocks layers (the replay stops early)
Prints a table and one JSON line.

    .venv/bin/python benchmarks/repair.py --tokens 1024 --blocks 100
"""
from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memsvc.cache.tiered.cache import STATE_INDEX  # noqa: E402
from memsvc.model import load_model  # noqa: E402
from memsvc.progress import Progress  # noqa: E402
from memsvc.repair import check_session, repair_session  # noqa: E402
from memsvc.sessions import GenerateParams, SessionManager  # noqa: E402
from memsvc.store.open import open_store  # noqa: E402

WORDS = "the river runs past old stone walls where merchants once traded salt copper grain and wool".split()


def flip(data: Path, sid: str, keys, rng: random.Random) -> None:
    # room for the copy-on-write pages of the flips: the default map (10 MiB) is smaller than a large store
    env = lmdb.open(str(data), max_dbs=8, map_size=2 * (data / "data.mdb").stat().st_size + (64 << 20))
    kv, blobs = env.open_db(b"kv"), env.open_db(b"blobs")
    with env.begin(write=True) as txn:
        for layer, index in keys:
            bid = txn.get(sid.encode() + b"\0" + struct.pack(">HI", layer, index), db=kv)
            v = bytearray(txn.get(bid, db=blobs))
            v[rng.randrange(len(v))] ^= 1 << rng.randrange(8)
            txn.put(bid, bytes(v), db=blobs)
    env.close()


def greedy(mgr: SessionManager, sid: str, n: int = 12) -> list[int]:
    return [t for ch in mgr.generate(sid, GenerateParams(max_new_tokens=n)) for t in ch.token_ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=100)
    ap.add_argument("--patterns", default="any,cold,early")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="build in this (new) data dir and keep it, e.g. to try "
                                                  "`memsvc sessions verify --repair` on a copy of session base")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    rng = random.Random(args.seed)
    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        ap.error(f"--keep {args.keep}: the directory is not empty; name a new one")
    data = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="memsvc-repair-"))
    store = open_store(data)
    mgr = SessionManager(store, model, sweep_every=0)
    ids = model.tokenizer(" ".join(rng.choice(WORDS) for _ in range(args.tokens * 2)),
                          add_special_tokens=False)["input_ids"][:args.tokens - 16]
    started, cpu = time.perf_counter(), time.process_time()
    mgr.create("base", policy="tiered")
    mgr.append("base", tokens=ids[:len(ids) * 2 // 3])
    list(mgr.generate("base", GenerateParams(max_new_tokens=8, commit=True)))
    mgr.append("base", tokens=ids[len(ids) * 2 // 3:])
    list(mgr.generate("base", GenerateParams(max_new_tokens=8, commit=True)))
    build_s, build_cpu = time.perf_counter() - started, time.process_time() - cpu
    n_tokens = store.get("base").n_tokens
    want = greedy(mgr, "base")
    export = store.export("base")
    keys = store.kv_keys("base")
    cold = [k for k in keys if k[1] != STATE_INDEX]
    print(f"session: {n_tokens} tokens, {len(keys)} stored KV entries ({len(cold)} cold blocks, "
          f"{len(keys) - len(cold)} layer states), built in {build_s:.1f} s ({build_cpu:.1f} s CPU)", flush=True)
    rows = []
    for pattern in args.patterns.split(","):
        sid = f"s-{pattern}"
        store.import_session(export, sid)
        if pattern == "any":
            pick = rng.sample(keys, min(args.blocks, len(keys)))
        elif pattern == "cold":
            pick = rng.sample(cold, min(args.blocks, len(cold)))
        else:
            pick = [(layer, 0) for layer in range(min(args.blocks, model.num_layers)) if (layer, 0) in cold]
        store.close()
        flip(data, sid, pick, rng)
        store = open_store(data)
        detected = len(check_session(store, sid).kv)
        cpu = time.process_time()
        done = repair_session(store, model, sid, progress=lambda n: Progress(f"repair {sid}", n, "tokens"))
        cpu = time.process_time() - cpu
        mgr = SessionManager(store, model, sweep_every=0)
        same = greedy(mgr, sid) == want
        clean = not check_session(store, sid).damaged
        rows.append({"pattern": pattern, "damaged": len(pick), "detected": detected, "rewritten": done.rewritten,
                     "exact": done.exact, "repair_s": round(done.seconds, 2),
                     "rebuild_s": round(done.rebuild_seconds, 2), "repair_cpu_s": round(cpu, 2), "same_reply": same, "clean_after": clean})
        print(f"  {pattern}: {rows[-1]}", flush=True)
    print(f"\n{'pattern':8} {'damaged':>8} {'detected':>9} {'rewritten':>10} {'repair s':>9} {'rebuild s':>10} "
          f"{'CPU s':>7}  exact  same reply")
    for r in rows:
        print(f"{r['pattern']:8} {r['damaged']:>8} {r['detected']:>9} {r['rewritten']:>10} {r['repair_s']:>9.2f} "
              f"{r['rebuild_s']:>10.2f} {r['repair_cpu_s']:>7.1f}  {str(r['exact']):5}  {r['same_reply']}")
    print(json.dumps({"bench": "repair", "model": model.name, "tokens": n_tokens, "entries": len(keys),
                      "cold_blocks": len(cold), "build_s": round(build_s, 2), "build_cpu_s": round(build_cpu, 2), "threads": torch.get_num_threads(),
                      "rows": rows}))
    store.close()


if __name__ == "__main__":
    main()
