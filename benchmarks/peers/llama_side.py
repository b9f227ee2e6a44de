"""llama.cpp's side of benchmarks/llamacpp.py; runs in benchmarks/peers/.venv-llama (setup_llama.sh).

Reads a JSON job from stdin: the GGUF path, threads, new tokens, and per length the prompt's token ids (the
same ids memsvc runs). Per length: a fresh context of the length + new tokens + 16, the prompt evaluated in
batches of 512, then `new` greedy tokens one at a time (decode tok/s: the tokens after the first over the
time since the first), then the slot's state saved and loaded back (llama.cpp's save/restore, beside memsvc's
Resume): seconds and bytes. Writes one JSON object to stdout.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def last_logits(llm: Llama) -> np.ndarray:
    """The logits [V] of the last token evaluated (this version keeps them only in the context)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def main() -> None:
    job = json.load(sys.stdin)
    rows = []
    for case in job["cases"]:
        ids = case["ids"]
        llm = Llama(model_path=job["gguf"], n_ctx=len(ids) + job["new"] + 16, n_threads=job["threads"],
                    n_threads_batch=job["threads"], n_batch=512, logits_all=False, verbose=False)
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill_s = time.perf_counter() - t0
        out, times = [], []
        for _ in range(job["new"]):
            nxt = int(np.argmax(last_logits(llm)))
            out.append(nxt)
            llm.eval([nxt])
            times.append(time.perf_counter())
        decode = (len(times) - 1) / (times[-1] - times[0])
        t = time.perf_counter()
        state = llm.save_state()
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        llm.load_state(state)
        load_s = time.perf_counter() - t
        rows.append({"context": len(ids), "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": decode,
                     "state_bytes": int(state.llama_state_size), "save_s": save_s, "load_s": load_s,
                     "ids": out})
        del llm
    json.dump({"rows": rows}, sys.stdout)


if __name__ == "__main__":
    main()
