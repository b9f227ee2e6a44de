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
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(HERE) not in sys.path:  # the driver's own modules, also when this file is loaded by path (tests)
    sys.path.insert(0, str(HERE))

from budgets import is_matched, matched_ratios, parse_ratio_key, peer_cells, ratio_key  # noqa: E402
from cells import TASKS, build_niah_cells, build_ppl_cells, group  # noqa: E402
from memsvc_side import run_memsvc  # noqa: E402
from peer_side import ensure_peer_venv, peer_rows, run_worker  # noqa: E402
from report import report  # noqa: E402
from results import log  # noqa: E402
from settings import (DEFAULT_PEERS, DEFAULT_TIERED_SETTINGS, MEMSVC_POLICIES, PEERS,  # noqa: E402
                      parse_tiered_settings, peer_settings)


def _list(s: str, cast=str) -> list:
    return [cast(x) for x in s.replace(" ", ",").split(",") if x]


def parser():
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
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)

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
    ready = threading.Event()

    def _peers():  # the peers' processes; the matched presses wait for their ratios
        try:
            box["unmatched"] = run_worker(peer_cells(cells, unmatched, {}, args.n_new), **wkw)
            ready.wait()
            box["matched"] = run_worker(peer_cells(cells, matched, box["ratios"], args.n_new), **wkw) \
                if "ratios" in box else []
        except Exception as e:  # re-raised in the main thread
            box["error"] = e
            ready.set()
    t = threading.Thread(target=_peers)
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
