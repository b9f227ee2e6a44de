"""Resume-to-first-token of `tiered` sessions of 1k, 8k and 32k tokens, against re-prefilling (issue 5).

Everything goes through the real service: `memsvc serve` in a subprocess on
127.0.0.1 (port 0), the default model, gRPC on loopback.

Build (once): one session per length (policy --policy, default `tiered`; named POLICY-LENGTH) from the essays
(memsvc.corpus), appended --build-chunk tokens per Append, in a data dir that
later runs reuse (default $MEMSVC_HOME/bench/resume-tiered/data). A session
that an earlier run left part-built is continued; a complete one is reused.
Lengths are built and measured shortest first; with --build-minutes the
longest stops growing after that long and is measured at the length it
reached (the table says which). The model's own context is 8,192 tokens, so
the servers run with `--context` above the longest session: past 8k the
model runs on positions it was not trained on (timings and bytes are what
this measures, not answers).

Servers run with --threads torch threads (default 1: the machine is shared).

Resume-to-first-token, each repetition in a fresh server process (the session
is on disk only, the block cache empty; the OS page cache is not dropped):
untimed, fork the session (so the measured Append never changes it; a fork
shares every block and loads nothing) and warm the process on a 400-token
`tiered` session (cold blocks made and read, a 30-token Append, a reply);
timed, from sending Resume(fork) to receiving the first chunk of Generate:
    Resume(fork) + Append(fork, question as chat message, committed) + Generate(max_new_tokens=8) first chunk.
Median of --repeats.

Re-prefill (the same history without stored KV): a fresh server, a new `full`
session; timed from sending the first Append to the first chunk:
    Append(history token ids) + Append(question) + Generate first chunk.

Stored bytes: the store's bytes for each session (record, token ids, every
KV blob, as stored: zstd-compressed), split into cold blocks and per-layer
state parts, and the state into its tensors (uncompressed sizes).

Commit bytes: what the timed question Append wrote (the store's bytes of the
fork after it, less before it: new cold blocks and changed state parts).

    python benchmarks/resume_tiered.py                       # 1k, 8k, 32k; re-prefill at 8k
    python benchmarks/resume_tiered.py --reprefill 8192 32768

Prints progress on stderr, a table, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from memsvc.cache.tiered.pages import is_cold_block, part_name
from memsvc.clients.client import MemoryClient
from served import ServeProcess

QUESTION = "In two sentences, what was the text above about?"
FP16_BYTES_PER_TOKEN = 23_040  # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x K+V x 2 bytes


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Server(ServeProcess):
    """`memsvc serve` with the benchmark's context and block cache, and a client; stderr appended to
    server.log next to the data dir."""

    def __init__(self, data_dir: Path, *, context: int, block_cache: int, threads: int | None,
                 start_timeout: float = 600):
        args = ["--data-dir", str(data_dir), "--context", str(context), "--block-cache", str(block_cache),
                "--max-new-tokens", "64", "--no-log-rpcs"]
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        super().__init__(args, data_dir.parent / "server.log", env=env, append_log=True,
                         start_timeout=start_timeout, stop_timeout=120)
        self.client = MemoryClient(f"127.0.0.1:{self.port}", timeout=24 * 3600)

    def stop(self) -> int:
        if hasattr(self, "client"):
            self.client.close()
        return super().stop()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _first_chunk(c: MemoryClient, sid: str) -> list[int]:
    stream = c.generate(sid, max_new_tokens=8)
    first = next(iter(stream))
    stream.cancel()
    return list(first.token_ids)


def _stored_prefix(data: Path, sid: str, corpus: list[int]) -> int | None:
    """Tokens of the stored session if they are a prefix of the corpus (else -1; None when missing)."""
    from memsvc.store.open import open_store

    with open_store(data, readonly=True) as st:
        if st.get(sid) is None:
            return None
        ids = st.tokens(sid)
    return len(ids) if ids == corpus[:len(ids)] else -1


def build(args, data: Path, n: int, corpus: list[int], deadline: float | None = None) -> tuple[int, float]:
    """Session POLICY-n built from the essays, or continued from where an earlier run stopped (it is
    reused when complete). Stops appending at `deadline` (time.time()). Returns (tokens it holds,
    seconds spent building in this run)."""
    sid = f"{args.policy}-{n}"
    have = _stored_prefix(data, sid, corpus) if (data / "data.mdb").exists() else None
    if have == n:
        log(f"{sid}: reusing the stored session ({n} tokens)")
        return n, 0.0
    t0 = time.perf_counter()
    with Server(data, context=args.context, block_cache=args.block_cache, threads=args.threads) as s:
        c = s.client
        if have is not None and have < 0:
            log(f"{sid}: the stored session is not the essays' prefix; building it again")
            c.delete_session(sid)
            have = None
        if have is None:
            c.create_session(sid, policy=args.policy)
            have = 0
        else:
            log(f"{sid}: continuing from {have} stored tokens")
        while have < n:
            if deadline is not None and time.time() > deadline:
                log(f"{sid}: build deadline reached at {have}/{n} tokens")
                break
            step = min(n, have + args.build_chunk - have % args.build_chunk) - have
            c.append(sid, tokens=corpus[have:have + step])
            have += step
            log(f"{sid}: built {have}/{n} tokens ({time.perf_counter() - t0:.0f} s in this run)")
    return have, time.perf_counter() - t0


def resume_once(args, data: Path, n: int, rep: int) -> dict:
    sid, fork = f"{args.policy}-{n}", f"{args.policy}-{n}-fork{rep}"  # n: the session's name (its target length)
    with Server(data, context=args.context, block_cache=args.block_cache, threads=args.threads) as s:
        c = s.client
        try:
            c.delete_session(fork)  # left by an interrupted run
        except Exception:
            pass
        c.fork_session(sid, fork)
        # untimed: the process's first forward, and its first tiered call with cold blocks, pay for warm-up
        c.create_session("warmup", policy=args.policy)
        c.append("warmup", tokens=list(range(1000, 1400)))  # past sink + hot + a block: cold blocks
        c.append("warmup", tokens=list(range(2000, 2030)))
        _first_chunk(c, "warmup")
        c.delete_session("warmup")
        before = c.stats()
        t0 = time.perf_counter()
        c.resume(fork)
        t1 = time.perf_counter()
        c.append(fork, messages=[{"role": "user", "content": QUESTION}])
        t2 = time.perf_counter()
        tok = _first_chunk(c, fork)
        t3 = time.perf_counter()
        after = c.stats()
        c.delete_session(fork)
    return {"total_s": t3 - t0, "resume_s": t1 - t0, "append_s": t2 - t1, "first_chunk_s": t3 - t2,
            "first_token": tok, "model_tokens": after.model_tokens_processed - before.model_tokens_processed,
            "commit_entries": after.kv_entries_written - before.kv_entries_written,
            "commit_bytes": after.kv_bytes_written - before.kv_bytes_written}


def reprefill_once(args, data: Path, n: int, corpus: list[int]) -> dict:
    sid = f"reprefill-{n}"
    with Server(data, context=args.context, block_cache=args.block_cache, threads=args.threads) as s:
        c = s.client
        try:
            c.delete_session(sid)
        except Exception:
            pass
        c.create_session("warmup", policy="full")
        c.append("warmup", tokens=list(range(1000, 1064)))
        _first_chunk(c, "warmup")
        c.delete_session("warmup")
        c.create_session(sid, policy="full")
        t0 = time.perf_counter()
        c.append(sid, tokens=corpus[:n])
        t1 = time.perf_counter()
        c.append(sid, messages=[{"role": "user", "content": QUESTION}])
        tok = _first_chunk(c, sid)
        t2 = time.perf_counter()
        c.delete_session(sid)
    return {"total_s": t2 - t0, "history_append_s": t1 - t0, "first_token": tok}


def stored_bytes(data: Path, sid: str) -> dict:
    """Bytes of the session as stored, split into cold blocks and per-layer states (and the states' tensors)."""
    from memsvc.store.open import open_store

    with open_store(data, readonly=True) as st:
        n = st.get(sid).n_tokens
        total = st.session_keys(sid)[1]
        exp = st.export(sid)
        cold = sum(len(raw) for (_, index), raw in exp.kv if is_cold_block(index))
        n_cold = sum(1 for (_, index), _ in exp.kv if is_cold_block(index))
        state = sum(len(raw) for (_, index), raw in exp.kv if not is_cold_block(index))
        tensors: dict[str, int] = {}
        for (layer, index), _ in exp.kv:
            if is_cold_block(index):
                continue
            raw = st.kv_block(sid, layer, index)
            head_len = int.from_bytes(raw[:8], "little")
            kind = part_name(index).rstrip("0123456789")  # state (the head), hot, warm, sum, live
            for name, info in json.loads(raw[8:8 + head_len]).items():
                if name == "__metadata__":
                    continue
                group = _group(name) if kind == "state" else {"sum": "summaries", "live": "summaries"}.get(kind, kind)
                tensors[group] = tensors.get(group, 0) + info["data_offsets"][1] - info["data_offsets"][0]
    return {"tokens": n, "stored_bytes": total, "stored_bytes_per_token": round(total / n, 1),
            "x_smaller_than_fp16": round(FP16_BYTES_PER_TOKEN * n / total, 2),
            "cold_blocks": n_cold, "cold_bytes": cold, "state_bytes": state, "other_bytes": total - cold - state,
            "state_tensor_bytes_raw": dict(sorted(tensors.items()))}


def _group(name: str) -> str:
    base = name.split(".")[0]
    if base.startswith("sum_") or base == "live":
        return "summaries"
    if base.startswith("keep_"):
        return "warm"
    if base.startswith("hot_"):
        return "hot"
    if base.startswith("sink_"):
        return "sink"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--reprefill", type=int, nargs="*", default=[8192], help="lengths to re-prefill (full policy)")
    ap.add_argument("--policy", default="tiered", help="the stored sessions' policy (a tiered one: tiered, tiered-v8)")
    ap.add_argument("--repeats", type=int, default=5, help="resume timings per length (median reported)")
    ap.add_argument("--reprefill-repeats", type=int, default=1)
    ap.add_argument("--data-dir", default=None, help="default: $MEMSVC_HOME/bench/resume-tiered/data")
    ap.add_argument("--context", type=int, default=0, help="server --context (default: longest length + 1024)")
    ap.add_argument("--block-cache", type=int, default=256 << 20)
    ap.add_argument("--build-chunk", type=int, default=2048, help="tokens per Append while building")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the servers (0: torch's default)")
    ap.add_argument("--build-minutes", type=float, default=0,
                    help="stop building the longest session after this long and measure it at the length it "
                         "reached (a later run continues it; 0 = build it whole)")
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()
    args.context = args.context or max(args.lengths + args.reprefill) + 1024

    from memsvc.corpus import haystack_tokens
    from memsvc.model import memsvc_home, resolve_model

    from transformers import AutoTokenizer

    data = Path(args.data_dir) if args.data_dir else memsvc_home() / "bench" / "resume-tiered" / "data"
    data.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    corpus = haystack_tokens(tokenizer, max(args.lengths + args.reprefill))
    deadline = time.time() + args.build_minutes * 60 if args.build_minutes else None
    log(f"data dir {data}; context {args.context}; server threads {args.threads}; lengths {args.lengths}")
    rows = []
    for n in sorted(args.lengths):  # each length measured as soon as it is built: short ones first
        have, build_s = build(args, data, n, corpus, deadline if n == max(args.lengths) else None)
        if args.build_only:
            continue
        runs = []
        for rep in range(args.repeats):
            r = resume_once(args, data, n, rep)
            runs.append(r)
            log(f"{have} tokens, resume rep {rep + 1}/{args.repeats}: {r['total_s'] * 1000:.0f} ms "
                f"(resume {r['resume_s'] * 1000:.0f}, append {r['append_s'] * 1000:.0f}, "
                f"first chunk {r['first_chunk_s'] * 1000:.0f}; model tokens {r['model_tokens']})")
        med = {k: statistics.median(r[k] for r in runs) for k in ("total_s", "resume_s", "append_s", "first_chunk_s")}
        row = {"tokens": have, "target_tokens": n, "build_s_this_run": round(build_s, 1),
               "resume_to_first_token_s": round(med["total_s"], 4),
               "runs_s": [round(r["total_s"], 4) for r in runs],
               "median_parts_s": {k: round(v, 4) for k, v in med.items() if k != "total_s"},
               "model_tokens_per_run": runs[0]["model_tokens"], "first_token": runs[0]["first_token"],
               "commit_entries": runs[0]["commit_entries"], "commit_bytes": runs[0]["commit_bytes"]}
        if n in args.reprefill and have == n:
            pre = []
            for rep in range(args.reprefill_repeats):
                p = reprefill_once(args, data, n, corpus)
                pre.append(p)
                log(f"{n} tokens, re-prefill (full) rep {rep + 1}: {p['total_s']:.1f} s "
                    f"(history append {p['history_append_s']:.1f} s)")
            row["reprefill_to_first_token_s"] = round(statistics.median(p["total_s"] for p in pre), 3)
            row["reprefill_runs_s"] = [round(p["total_s"], 3) for p in pre]
            row["speedup"] = round(row["reprefill_to_first_token_s"] / row["resume_to_first_token_s"], 1)
        row["stored"] = stored_bytes(data, f"{args.policy}-{n}")
        rows.append(row)
        log(f"{have} tokens: resume-to-first-token median {row['resume_to_first_token_s'] * 1000:.0f} ms; "
            f"stored {row['stored']['stored_bytes_per_token']:,.0f} B/token")
    if args.build_only:
        return

    times = [r["resume_to_first_token_s"] for r in rows]
    spread = max(times) / statistics.mean(times) - 1, 1 - min(times) / statistics.mean(times)
    print(f"\nResume-to-first-token of {args.policy} sessions (Resume + Append question + Generate first chunk, "
          f"fresh server each run, median of {args.repeats}); {platform.machine()}, {os.cpu_count()} cores")
    head = (f"{'tokens':>7} {'resume→1st':>11} {'resume':>8} {'append':>8} {'1st chunk':>10} {'re-prefill':>11} "
            f"{'speedup':>8} {'stored B/tok':>13} {'vs fp16':>8} {'cold B/tok':>11} {'state B/tok':>12} "
            f"{'commit':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        st, p = r["stored"], r["median_parts_s"]
        pre = f"{r['reprefill_to_first_token_s']:>10.1f}s" if "speedup" in r else f"{'-':>11}"
        sp = f"{r['speedup']:>7.1f}x" if "speedup" in r else f"{'-':>8}"
        print(f"{r['tokens']:>7} {r['resume_to_first_token_s'] * 1000:>9.0f}ms {p['resume_s'] * 1000:>6.0f}ms "
              f"{p['append_s'] * 1000:>6.0f}ms {p['first_chunk_s'] * 1000:>8.0f}ms {pre} {sp} "
              f"{st['stored_bytes_per_token']:>13,.0f} {st['x_smaller_than_fp16']:>7.2f}x "
              f"{st['cold_bytes'] / r['tokens']:>11,.0f} {st['state_bytes'] / r['tokens']:>12,.0f} "
              f"{r['commit_bytes'] / 1e6:>7.2f}MB")
    print("commit: payload bytes the question's Append wrote (new cold blocks and changed state parts)")
    print(f"spread: slowest {spread[0] * 100:+.0f}% / fastest {-spread[1] * 100:+.0f}% of the mean (target ±25%)")
    print(json.dumps({"benchmark": "resume_tiered", "policy": args.policy, "question": QUESTION, "context": args.context,
                      "block_cache": args.block_cache, "rows": rows}))


if __name__ == "__main__":
    main()
