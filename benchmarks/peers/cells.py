"""The cells every side runs: NIAH prompts (the passkey and the essay needle) and perplexity windows.

Every prompt is built with memsvc's own tokenizer and prompt builders (memsvc.eval.niah.task_prompt,
memsvc.eval.ppl.windows), so memsvc's rows and the peers' get the very same token ids. A cell is a dict:
cell (its name), kind ("niah" or "ppl"), length, prompt_ids, answer_ids; NIAH cells also task, depth, key
(what a correct reply holds) and context_len (where the question starts: what kvpress's pipeline reads
after compressing). Knows nothing of the peers or of budgets.
"""
from __future__ import annotations

import random

QUESTION = "What is the pass key?"
TASKS = ("passkey", "needle")  # the NIAH tasks: the passkey prompt and the essay needle


def question_start(tok, ids: list[int], question: str = QUESTION) -> int:
    """Index of the first token of the last `question` in ids (what kvpress's pipeline reads after compressing)."""
    for i in range(len(ids) - 1, -1, -1):
        if question in tok.decode(ids[i:]):
            return i
    raise ValueError("the question is not in the prompt")


def build_niah_cells(tok, lengths: list[int], depths: list[float], seed: int = 0,
                     tasks: tuple = ("passkey",)) -> list[dict]:
    """One cell per (task, length, depth), kind "niah". Passkey cells ("niah-N-D"): keys drawn as
    `memsvc eval niah` draws them (Random(seed + length)). Essay-needle cells ("needle-N-D"): the same needle
    everywhere; a reply holding "sandwich" found it."""
    from memsvc.eval.niah import NEEDLE_QUESTION, task_prompt
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; known: {', '.join(TASKS)}")
    cells = []
    for n in lengths:
        rng = random.Random(seed + n)
        keys = [str(rng.randint(10000, 99999)) for _ in depths]
        for d, key in zip(depths, keys):
            for t in (t for t in TASKS if t in tasks):  # passkey first, as before the needle
                prompt, answer, holds = task_prompt(tok, t, n, d, key)
                question = QUESTION if t == "passkey" else NEEDLE_QUESTION
                cells.append({"cell": f"{'niah' if t == 'passkey' else t}-{n}-{d:g}", "kind": "niah", "task": t,
                              "length": n, "depth": d, "key": holds, "prompt_ids": prompt, "answer_ids": answer,
                              "context_len": question_start(tok, prompt, question)})
    return cells


def group(x: dict) -> str:
    """A cell's or row's budget group: its kind, with the essay needle apart from the passkey ("needle")."""
    return "needle" if x.get("task") == "needle" else x["kind"]


def task_of(r: dict) -> str:
    return r.get("task", "passkey")  # rows of runs before the essay needle are all passkey rows


def build_ppl_cells(tok, prefixes: list[int], target: int) -> list[dict]:
    from memsvc.eval.ppl import windows
    cells = []
    for p in prefixes:
        (ids,) = windows(tok, p, target, 1)
        cells.append({"cell": f"ppl-{p}", "kind": "ppl", "length": p, "prompt_ids": ids[:p], "answer_ids": ids[p:]})
    return cells
