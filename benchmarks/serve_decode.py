"""One session's decode speed through `memsvc serve`: built there, or forked there (loaded from the store).

Starts `memsvc serve` (benchmarks/served.py) on a fresh LMDB data dir and, per policy, builds one session of
`--context` essay tokens (Appends of 2,048), then either appends 20 more tokens to it ("built") or forks it and
appends them to the fork ("forked": the fork's cache is loaded from the store on a gRPC thread, as a Resume's
is). One untimed 1-token Generate loads it; then `--rounds` greedy Generates of `--new` tokens (nothing
committed), timed at the client: time to the first token and the median gap between tokens (its inverse is the
decode tok/s). `first_generate_s` is that untimed first Generate (the fork's load, when forked).

    python benchmarks/serve_decode.py --policies full,tiered --context 4096 --new 48

A table, then one JSON line. Knows the client and the command line; imports the tokenizer only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from served import ServeProcess  # noqa: E402

from memsvc.clients.client import MemoryClient  # noqa: E402
from memsvc.corpus import haystack_tokens  # noqa: E402
from memsvc.model import pull_default  # noqa: E402


def measure(client: MemoryClient, policy: str, ids: list[int], forked: bool, new: int, rounds: int) -> dict:
    base = f"{policy}-base"
    client.create_session(base, policy=policy)
    for lo in range(0, len(ids), 2048):
        client.append(base, tokens=ids[lo:lo + 2048])
    sid = base
    if forked:
        sid = f"{policy}-fork"
        client.fork_session(base, sid)
    client.append(sid, tokens=ids[:20])
    t = time.perf_counter()
    client.generate_text(sid, max_new_tokens=1)
    first = time.perf_counter() - t
    ttft, gaps = [], []
    for _ in range(rounds):
        t0, times = time.perf_counter(), []
        for chunk in client.generate(sid, max_new_tokens=new):
            if chunk.token_ids:
                times.append(time.perf_counter())
        ttft.append(times[0] - t0)
        gaps.append(statistics.median(b - a for a, b in zip(times, times[1:])))
    itl = statistics.median(gaps)
    return {"policy": policy, "session": "forked" if forked else "built", "context": len(ids) + 20,
            "first_generate_s": round(first, 3), "ttft_s": round(statistics.median(ttft), 3),
            "itl_ms": round(itl * 1000, 1), "tok_s": round(1 / itl, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", default="full,tiered")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sessions", default="built,forked", help="built, forked or both")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pull_default(quiet=True)))
    ids = haystack_tokens(tok, args.context)
    rows = []
    for policy in args.policies.split(","):
        for kind in args.sessions.split(","):
            tmp = Path(tempfile.mkdtemp(prefix="memsvc-serve-decode-"))
            server = ServeProcess(["--store", str(tmp / "data"), "--resident-budget", "0", "--no-log-rpcs"],
                                  tmp / "server.log")
            client = MemoryClient(f"127.0.0.1:{server.port}", timeout=3600)
            try:
                rows.append(measure(client, policy, ids, kind == "forked", args.new, args.rounds))
            finally:
                client.close()
                server.stop()
            r = rows[-1]
            print(f"[serve-decode] {policy} {kind}: {r['tok_s']} tok/s ({r['itl_ms']} ms a token)", file=sys.stderr,
                  flush=True)
    print("| policy | session | context | first Generate s | TTFT s | inter-token ms | tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {r['session']} | {r['context']:,} | {r['first_generate_s']} | {r['ttft_s']} | "
              f"{r['itl_ms']} | {r['tok_s']} |")
    print(json.dumps({"bench": "serve_decode", "new": args.new, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
