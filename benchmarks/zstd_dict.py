"""Does a trained zstd dictionary pay for cold blocks? (issue 5: "try a trained zstd dictionary per model")

Reads the cold blocks (packed codec bytes, before the store's compression) of
two stored `tiered` sessions, trains dictionaries of several sizes on a sample
of the first session's blocks, and compresses the second session's blocks
(held out) without and with each dictionary, at zstd levels 3 (the store's)
and 19. Run `benchmarks/resume_tiered.py --build-only` first for the sessions.

    python benchmarks/zstd_dict.py                     # train on tiered-8192, test on tiered-1024
    python benchmarks/zstd_dict.py --train tiered-32768 --test tiered-8192

Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import zstandard

from memsvc.cache.tiered.pages import is_cold_block
from memsvc.model import memsvc_home
from memsvc.store.base import Store
from memsvc.store.open import open_store


def cold_blocks(store: Store, sid: str) -> list[bytes]:
    return [bytes(store.kv_block(sid, *k)) for k in store.kv_keys(sid) if is_cold_block(k[1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="default: $MEMSVC_HOME/bench/resume-tiered/data")
    ap.add_argument("--train", default="tiered-8192")
    ap.add_argument("--test", default="tiered-1024")
    ap.add_argument("--sample", type=int, default=400, help="training blocks")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16 << 10, 64 << 10, 256 << 10])
    args = ap.parse_args()
    data = Path(args.data_dir) if args.data_dir else memsvc_home() / "bench" / "resume-tiered" / "data"
    with open_store(data, readonly=True) as store:
        train, test = cold_blocks(store, args.train), cold_blocks(store, args.test)
    sample = random.Random(0).sample(train, min(args.sample, len(train)))
    raw = sum(map(len, test))
    rows = []
    for level in (3, 19):
        plain = sum(len(zstandard.ZstdCompressor(level=level).compress(b)) for b in test)
        rows.append({"level": level, "dictionary_bytes": 0, "bytes": plain, "ratio_to_raw": plain / raw})
        for size in args.sizes:
            d = zstandard.train_dictionary(size, sample)
            c = zstandard.ZstdCompressor(level=level, dict_data=d)
            got = sum(len(c.compress(b)) for b in test)
            rows.append({"level": level, "dictionary_bytes": size, "bytes": got, "ratio_to_raw": got / raw,
                         "vs_no_dictionary": got / plain})
    print(f"cold blocks of {args.test} ({len(test)} blocks, {raw:,} bytes packed), dictionaries trained on "
          f"{len(sample)} blocks of {args.train}")
    print(f"{'level':>5} {'dictionary':>11} {'bytes':>12} {'/ packed':>9} {'/ no dict':>10}")
    for r in rows:
        vs = f"{r['vs_no_dictionary']:>10.3f}" if "vs_no_dictionary" in r else f"{'-':>10}"
        print(f"{r['level']:>5} {r['dictionary_bytes']:>11,} {r['bytes']:>12,} {r['ratio_to_raw']:>9.3f} {vs}")
    print(json.dumps({"benchmark": "zstd_dict", "train": args.train, "test": args.test, "packed_bytes": raw,
                      "rows": rows}))


if __name__ == "__main__":
    main()
