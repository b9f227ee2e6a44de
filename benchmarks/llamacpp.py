"""memsvc beside llama.cpp on the same GGUF and token ids, in one run (issue 24, acceptances 5 and 6).

    bash benchmarks/peers/setup_llama.sh        # once: llama-cpp-python built from source (15-30 min)
    python benchmarks/llamacpp.py --lengths 1024,4096,8192 --new 32 --threads 2 --together 4096

1. llama.cpp (benchmarks/peers/llama_side.py in benchmarks/peers/.venv-llama): the default model's GGUF
   (SmolLM2-135M-Instruct Q4_1, the file memsvc converts), f16 KV cache, `--threads`; per length, the prompt
   then `--new` greedy tokens: decode tok/s, and its state save / load (seconds, bytes).
2. memsvc, in this process, the same token ids: each policy's decode tok/s (as `memsvc eval speed`: the service's
   forward path and caches), `--threads` torch threads.
3. With `--together N`: `--sessions` sessions of N tokens streaming at once through `memsvc serve`
   (benchmarks/batching.py), aggregate tok/s against llama.cpp's single stream at N.
A table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from memsvc import corpus  # noqa: E402
from memsvc.eval.runner import PolicyRun  # noqa: E402
from memsvc.model import load_model, memsvc_home, pull_default  # noqa: E402

LLAMA_PY = HERE / "peers" / ".venv-llama" / "bin" / "python"


def llama_rows(gguf: Path, cases: list[list[int]], new: int, threads: int) -> list[dict]:
    if not LLAMA_PY.exists():
        raise SystemExit("llama.cpp is not built: run bash benchmarks/peers/setup_llama.sh")
    job = {"gguf": str(gguf), "threads": threads, "new": new, "cases": [{"ids": ids} for ids in cases]}
    done = subprocess.run([str(LLAMA_PY), str(HERE / "peers" / "llama_side.py")], input=json.dumps(job),
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"llama_side.py failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)["rows"]


def memsvc_rows(m, cases: list[list[int]], policies: list[str], new: int) -> list[dict]:
    rows = []
    for ids in cases:
        for p in policies:
            run = PolicyRun(m, p)
            cache = run.new_cache()
            logits = run.forward(cache, ids)
            run.end_prompt(cache)
            out, tps = run.decode_greedy(cache, logits, new)
            rows.append({"policy": p, "context": len(ids), "decode_tok_s": tps, "ids": out})
            print(f"  memsvc {p} at {len(ids)}: {tps:.2f} tok/s", flush=True)
    return rows


def together(n_tokens: int, sessions: int, new: int, policies: list[str]) -> list[dict]:
    import batching
    from served import ServeProcess
    from memsvc.clients.client import MemoryClient
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pull_default(quiet=True)))
    base = corpus.haystack_tokens(tok, n_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="memsvc-llamacpp-"))
    server = ServeProcess(["--store", str(tmp / "data"), "--resident-budget", "0", "--no-log-rpcs",
                           "--decoded-cache", str(4 << 30), "--block-cache", str(1 << 30)], tmp / "server.log")
    addr = f"127.0.0.1:{server.port}"
    client = MemoryClient(addr, timeout=3600)
    rows = []
    try:
        for p in policies:
            sids = batching.build(client, p, base, sessions)
            rows.append(batching.measure_policy(client, addr, p, sids, new))
            print(f"  memsvc {sessions} {p} sessions together at {n_tokens}: {rows[-1]['together_tok_s']} tok/s",
                  flush=True)
    finally:
        client.close()
        server.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", default="full,tiered")
    ap.add_argument("--together", type=int, default=0, help="context of the sessions streaming at once (0: skip)")
    ap.add_argument("--sessions", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf = memsvc_home() / "downloads" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    m = load_model(str(pull_default(quiet=True)))
    lengths = [int(x) for x in args.lengths.split(",")]
    cases = [corpus.haystack_tokens(m.tokenizer, n) for n in lengths]
    policies = args.policies.split(",")
    t = time.perf_counter()
    peer = llama_rows(gguf, cases, args.new, args.threads)
    for r in peer:
        print(f"  llama.cpp at {r['context']}: {r['decode_tok_s']:.2f} tok/s; state {r['state_bytes'] / 2**20:.1f} MiB, "
              f"save {r['save_s']:.3f} s, load {r['load_s']:.3f} s", flush=True)
    ours = memsvc_rows(m, cases, policies, args.new)
    both = together(args.together, args.sessions, 64, policies) if args.together else []
    print(f"\nall in {time.perf_counter() - t:.0f} s; {args.threads} threads\n")
    print(f"{'context':>8} {'llama.cpp tok/s':>15} " + " ".join(f"{p + ' tok/s':>14} {'/llama':>7}" for p in policies))
    for r in peer:
        mine = {x["policy"]: x["decode_tok_s"] for x in ours if x["context"] == r["context"]}
        print(f"{r['context']:>8} {r['decode_tok_s']:>15.2f} " + " ".join(
            f"{mine[p]:>14.2f} {mine[p] / r['decode_tok_s']:>7.2f}" for p in policies))
    ref = next((r for r in peer if r["context"] == args.together), None)
    for row in both:
        ratio = row["together_tok_s"] / ref["decode_tok_s"] if ref else float("nan")
        print(f"{args.sessions} {row['policy']} sessions at {args.together} together: {row['together_tok_s']} tok/s "
              f"= {ratio:.2f}x llama.cpp's single stream")
    for r in peer:  # how many greedy tokens each policy shares with llama.cpp's (Q4_1 weights there, fp32 here)
        for x in ours:
            if x["context"] == r["context"]:
                x["same_prefix_as_llama"] = next((i for i, (a, b) in enumerate(zip(x["ids"], r["ids"])) if a != b),
                                                 min(len(x["ids"]), len(r["ids"])))
                print(f"{x['policy']} at {x['context']}: first {x['same_prefix_as_llama']} greedy tokens as llama.cpp's")
    for r in peer + ours:
        r.pop("ids")
    print(json.dumps({"bench": "llamacpp", "threads": args.threads, "new": args.new, "llama": peer, "memsvc": ours,
                      "together": both}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
