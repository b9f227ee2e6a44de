"""Forks share KV blocks: what ten forks of a long `tiered` session cost in stored bytes (real model).

Builds one session of --tokens essay tokens, forks it --forks times, appends a
different chat turn to each fork and lets each generate a committed reply, then
deletes the original. Reports the store's physical bytes at each step (Store.stats,
every value of every database), what the new blocks of the forks' turns account
for (and, by kind of entry, what their commits wrote before compression: new cold
blocks, layer heads, hot pages, warm groups, summary pages), and checks that every fork still answers as it did before the delete and
that gc finds nothing to free.

    python benchmarks/forks.py --tokens 4096 --forks 10

Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from memsvc.cache.tiered.pages import is_cold_block, part_name
from memsvc.clients.client import MemoryClient
from memsvc.corpus import haystack_tokens
from memsvc.model import load_model
from memsvc.server import create_server


def _kind(index: int) -> str:
    """cold, state (a layer's head), hot, warm or sum (summary page)."""
    return "cold" if is_cold_block(index) else part_name(index).rstrip("0123456789")


def count_commits(store) -> collections.Counter:
    """Payload bytes (before compression) every later commit of `store` writes, by kind of entry."""
    written: collections.Counter = collections.Counter()
    commit = store.commit

    def counting(record, **kw):
        for (_, index), payload in kw["blocks"].items():
            written[_kind(index)] += len(payload)
        return commit(record, **kw)
    store.commit = counting
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--forks", type=int, default=10)
    ap.add_argument("--reply-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(None)
    with tempfile.TemporaryDirectory() as tmp:
        server, port = create_server("127.0.0.1:0", data_dir=Path(tmp), model=model)
        server.start()
        store = server.store
        written = count_commits(store)
        c = MemoryClient(f"127.0.0.1:{port}", timeout=3600)
        try:
            t0 = time.perf_counter()
            c.create_session("orig", policy="tiered")
            c.append("orig", tokens=haystack_tokens(model.tokenizer, args.tokens))
            build_s = time.perf_counter() - t0
            base = store.stats()
            orig = c.get_session("orig")
            t0 = time.perf_counter()
            for f in range(args.forks):
                c.fork_session("orig", f"f{f}")
            fork_s = (time.perf_counter() - t0) / args.forks
            forked = store.stats()
            turns = []
            for f in range(args.forks):
                before, raw0 = store.stats(), collections.Counter(written)
                c.append(f"f{f}", messages=[{"role": "user", "content": f"Question {f}: what is essay {f} about?"}])
                reply = c.generate_text(f"f{f}", max_new_tokens=args.reply_tokens, commit=True)
                after = store.stats()
                turns.append({"fork": f"f{f}", "tokens_added": c.get_session(f"f{f}").tokens - orig.tokens,
                              "reply_tokens": len(reply.token_ids),
                              "blob_bytes_added": after["blob_bytes"] - before["blob_bytes"],
                              "total_bytes_added": after["total_bytes"] - before["total_bytes"],
                              "written_raw_by_kind": dict(written - raw0)})
            turned = store.stats()
            answers = {f"f{f}": list(c.generate_text(f"f{f}", max_new_tokens=8).token_ids) for f in range(args.forks)}
            c.delete_session("orig")
            deleted = store.stats()
            intact = all(list(c.generate_text(sid, max_new_tokens=8).token_ids) == ans for sid, ans in answers.items())
            gc = store.gc()
        finally:
            c.close()
            server.stop(grace=None).wait()
            server.close()
    copy_bytes = args.forks * orig.bytes_stored  # what full copies would have added
    rows = [
        ("original session", base["total_bytes"], f"{orig.tokens} tokens, {base['blobs']} KV blobs, "
                                                  f"bytes_stored {orig.bytes_stored}"),
        (f"+ {args.forks} forks", forked["total_bytes"] - base["total_bytes"],
         f"{(forked['total_bytes'] - base['total_bytes']) / args.forks:.0f} B per fork (full copies: "
         f"{copy_bytes} B); {fork_s * 1000:.1f} ms per ForkSession"),
        ("+ one turn in each fork", turned["total_bytes"] - forked["total_bytes"],
         f"of which new KV blobs {turned['blob_bytes'] - forked['blob_bytes']} B"),
        ("- delete the original", deleted["total_bytes"] - turned["total_bytes"],
         f"forks intact: {intact}; gc then freed {gc['freed_blobs']} blobs"),
    ]
    print(f"SmolLM2-135M, tiered, {args.tokens}-token history built in {build_s:.1f} s; store bytes (Store.stats)")
    for name, delta, note in rows:
        print(f"{name:<26} {delta:>12,}  {note}")
    for t in turns:
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(t["written_raw_by_kind"].items()))
        print(f"  {t['fork']}: +{t['tokens_added']} tokens, +{t['blob_bytes_added']:,} B of KV blobs, "
              f"+{t['total_bytes_added']:,} B in all; written before compression: {kinds}")
    print(json.dumps({"bench": "forks", "machine": platform.machine(), "tokens": orig.tokens, "forks": args.forks,
                      "original_total_bytes": base["total_bytes"], "original_bytes_stored": orig.bytes_stored,
                      "forks_added_bytes": forked["total_bytes"] - base["total_bytes"],
                      "full_copies_bytes": copy_bytes, "fork_ms": round(fork_s * 1000, 2),
                      "turns_added_bytes": turned["total_bytes"] - forked["total_bytes"],
                      "turns_added_blob_bytes": turned["blob_bytes"] - forked["blob_bytes"], "turns": turns,
                      "delete_original_bytes": deleted["total_bytes"] - turned["total_bytes"],
                      "forks_intact_after_delete": intact, "gc": gc}))


if __name__ == "__main__":
    main()
