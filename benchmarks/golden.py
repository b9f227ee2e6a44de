"""Golden replies: what the service generates for fixed turns, recorded once and checked after a refactor.

For each policy: a session gets `--tokens` tokens of essay text in Appends of `--chunk` tokens, then a
greedy Generate (not committed), a committed greedy Generate, a restart of the server (a new one over the
same data directory), a Resume and a last committed Generate. `--record FILE` writes the replies' token ids
and the stored / resident bytes per token; `--check FILE` runs the same turns and compares: token ids must
be identical and bytes per token within `--bytes-tolerance` (default 1%). The export of each session as
stored before the restart can be kept with `--exports DIR`, so that a later memsvc can be checked to load
what this one stored and answer as it did (tests/service/test_golden.py does that on a tiny model).

    python benchmarks/golden.py --record benchmarks/history/golden-4k.json              # real model, 4k
    python benchmarks/golden.py --check benchmarks/history/golden-4k.json

Replies are greedy unless `--temperature` is given (then sampled with fixed seeds).
Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memsvc.clients.client import MemoryClient  # noqa: E402
from memsvc.corpus import haystack_tokens  # noqa: E402
from memsvc.model import load_model  # noqa: E402
from memsvc.server import create_server  # noqa: E402


def _serve(data_dir: Path, model):
    server, port = create_server("127.0.0.1:0", data_dir=data_dir, model=model)
    server.start()
    return server, MemoryClient(f"127.0.0.1:{port}", timeout=3600)


def _stop(server, client) -> None:
    client.close()
    server.stop(grace=None).wait()
    server.close()  # the manager (its leases given up), the metrics endpoint, the store and data dir lock


def run_turns(model, policies: list[str], n_tokens: int, chunk: int, new_tokens: int, data_dir: Path,
              exports: Path | None = None, temperature: float = 0.0) -> dict:
    """temperature > 0: the replies are sampled with fixed seeds (a random tiny model answers one token over
    and over greedily; sampled replies still differ wherever the logits do)."""
    ids = haystack_tokens(model.tokenizer, n_tokens)
    opts = {"max_new_tokens": new_tokens, "temperature": temperature, "seed": 7}
    out: dict = {}
    server, c = _serve(data_dir, model)
    try:
        for policy in policies:
            t0 = time.perf_counter()
            sid = f"golden-{policy}"
            c.create_session(sid, policy=policy)
            for lo in range(0, len(ids), chunk):
                c.append(sid, tokens=ids[lo:lo + chunk])
            peek = c.generate_text(sid, **opts).token_ids
            kept = c.generate_text(sid, commit=True, **opts).token_ids
            out[policy] = {"peek": list(peek), "committed": list(kept), "seconds": time.perf_counter() - t0}
            print(f"{policy}: {n_tokens} tokens appended, replies done in {out[policy]['seconds']:.1f} s",
                  file=sys.stderr)
    finally:
        _stop(server, c)
    if exports is not None:  # as stored before the restart: importing one and resuming it gives after_restart
        from memsvc.store.archive import write_export
        from memsvc.store.open import open_store

        exports.mkdir(parents=True, exist_ok=True)
        with open_store(data_dir, readonly=True) as store:
            for policy in policies:
                write_export(exports / f"{policy}.msx", store.export(f"golden-{policy}"))
    server, c = _serve(data_dir, model)  # the restart
    try:
        for policy in policies:
            sid = f"golden-{policy}"
            c.resume(sid)
            after = c.generate_text(sid, commit=True, **opts).token_ids
            s = c.get_session(sid)
            out[policy] |= {"after_restart": list(after), "tokens": s.tokens,
                            "stored_bytes_per_token": s.stored_bytes_per_token,
                            "resident_bytes_per_token": s.resident_bytes_per_token}
    finally:
        _stop(server, c)
    return out


# today's policy that stores what a recorded one stored, where that one's stored form changed since
STAND_INS = {"tiered": "tiered-k6"}  # tiered's cold keys: 6-bit per token until 2026-12-07


def compare(want: dict, got: dict, tolerance: float, stand_ins: dict[str, str] | None = None) -> list[str]:
    """Problems of `got` against `want`: replies must be identical, bytes per token within `tolerance`. A
    recorded policy named in `stand_ins` is compared with the run of its stand-in."""
    problems = []
    for policy, w in want["policies"].items():
        g = got[(stand_ins or {}).get(policy, policy)]
        for key in ("peek", "committed", "after_restart", "tokens"):
            if w[key] != g[key]:
                problems.append(f"{policy}: {key} differs: {w[key]} != {g[key]}")
        for key in ("stored_bytes_per_token", "resident_bytes_per_token"):
            if abs(g[key] - w[key]) > tolerance * w[key]:
                problems.append(f"{policy}: {key} {g[key]:.1f} is more than {tolerance:.0%} from {w[key]:.1f}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path)
    mode.add_argument("--check", type=Path)
    ap.add_argument("--model", default=None, help="as for `memsvc serve` (default SmolLM2-135M-Instruct)")
    ap.add_argument("--policies", default="full,tiered,tiered-v8")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per Append")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled with fixed seeds")
    ap.add_argument("--bytes-tolerance", type=float, default=0.01)
    ap.add_argument("--exports", type=Path, default=None, help="write each session's export here")
    args = ap.parse_args()
    if args.check is not None:
        want = json.loads(args.check.read_text())
        settings = want["settings"]
    else:
        settings = {"model": args.model, "policies": args.policies.split(","), "tokens": args.tokens,
                    "chunk": args.chunk, "new_tokens": args.new_tokens, "temperature": args.temperature}
    model = load_model(settings["model"])
    with tempfile.TemporaryDirectory(prefix="memsvc-golden-") as tmp:
        got = run_turns(model, settings["policies"], settings["tokens"], settings["chunk"], settings["new_tokens"],
                        Path(tmp) / "data", args.exports, settings.get("temperature", 0.0))
    print(f"{'policy':<10} {'tokens':>7} {'stored B/t':>11} {'resident B/t':>13}  first replies")
    for policy, g in got.items():
        print(f"{policy:<10} {g['tokens']:>7} {g['stored_bytes_per_token']:>11.1f} {g['resident_bytes_per_token']:>13.1f}"
              f"  {g['peek'][:6]} / {g['after_restart'][:6]}")
    if args.record is not None:
        import subprocess

        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps({"commit": commit, "settings": settings, "policies": got}, indent=1) + "\n")
        print(json.dumps({"recorded": str(args.record), "commit": commit}))
        return
    problems = compare(want, got, args.bytes_tolerance)
    for p in problems:
        print("MISMATCH", p)
    print(json.dumps({"checked": str(args.check), "against_commit": want["commit"], "ok": not problems,
                      "problems": len(problems)}))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
