"""The eval harness's bookkeeping: retention against full, budget matching, heatmaps, merged reports."""
from __future__ import annotations

import json

from click.testing import CliRunner

from memsvc.cli import main
from memsvc.eval import niah
from memsvc.eval.cli import _budget


def _rows():
    rows = []
    for (n, d), full_ok, tiered_ok, stream_ok in [((1024, 0.0), True, True, True), ((1024, 1.0), True, True, False),
                                                   ((2048, 0.0), False, True, False), ((2048, 1.0), True, False, True)]:
        for p, ok, lp in (("full", full_ok, -1.0), ("tiered", tiered_ok, -1.5), ("streaming", stream_ok, -9.0)):
            rows.append({"policy": p, "length": n, "depth": d, "correct": ok, "logprob": lp,
                         "resident_bytes_per_token": {"full": 4000, "tiered": 400, "streaming": 410}[p]})
    return rows


def test_retention_counts_only_cells_full_answers():
    s = {x["policy"]: x for x in niah.summarize(_rows(), fp16_per_token=2000)}
    assert s["full"]["retention"] == 1.0 and s["full"]["full_correct"] == 3
    assert s["tiered"]["retention"] == 2 / 3 and s["tiered"]["recall"] == 3 / 4
    assert s["streaming"]["retention"] == 2 / 3 and s["streaming"]["mean_dlogprob"] == -8.0
    assert s["tiered"]["x_vs_fp16"] == 5.0 and s["streaming"]["eviction"]
    assert "| tiered | 75% | 67% (2/3) |" in niah.table(list(s.values()))


def test_eviction_budget_matches_tiered_resident_bytes():
    # tiered held 500 B/token over 8,000 tokens = 4,000,000 B = 2,000 tokens of 2,000 B at fp16
    assert _budget(500.0, 8000, 2000) == 2000
    assert _budget(1.0, 100, 2000) == 64  # never below one block


def test_niah_report_merges_runs_and_draws_heatmaps(tmp_path):
    rows = _rows()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([r for r in rows if r["length"] == 1024]))
    b.write_text(json.dumps([r for r in rows if r["length"] == 2048]))
    out = CliRunner().invoke(main, ["eval", "niah-report", str(a), str(b), "--heatmaps", str(tmp_path / "png")])
    assert out.exit_code == 0, out.output
    last = json.loads(out.output.strip().splitlines()[-1])
    assert last["cells"] == 12 and {x["policy"] for x in last["niah"]} == {"full", "tiered", "streaming"}
    for p in ("full", "tiered", "streaming"):
        assert (tmp_path / "png" / f"niah_{p}.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_policy_lists_match_the_registry():
    """The eval CLI names policies without importing torch; its lists must follow the registry."""
    from memsvc.cache import EVICTION, POLICIES
    from memsvc.eval import cli
    assert set(cli.ALL.split(",")) == set(POLICIES) and tuple(cli.EVICTION) == tuple(EVICTION)


def test_run_grid_runs_the_essay_needle(tiny_model, monkeypatch, tmp_path):
    """--task needle: the cells are the essay needle's prompts (the same sentence at each depth), scored by
    whether the greedy reply holds "sandwich"; the passkey stays the default; an unknown task is refused."""
    import io
    import random

    import pytest

    import memsvc.corpus as corpus
    rng = random.Random(5)
    words = "the of startup founders users idea money work good make people time think want".split()
    (tmp_path / "a.txt").write_text(". ".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    monkeypatch.setattr(corpus, "essays_dir", lambda home=None: tmp_path)
    tok = tiny_model.tokenizer
    rows = niah.run_grid(tiny_model, ["full", "tiered"], [200], [0.0, 1.0], n_new=2, task="needle",
                         progress=io.StringIO())
    assert [(r["policy"], r["depth"]) for r in rows] == [("full", 0.0), ("tiered", 0.0), ("full", 1.0), ("tiered", 1.0)]
    for r in rows:
        prompt, answer = niah.needle_prompt(tok, 200, r["depth"])
        assert r["task"] == "needle" and r["key"] == niah.NEEDLE_KEY == "sandwich"
        assert r["prompt_tokens"] == len(prompt) and r["correct"] == ("sandwich" in r["answer"])
        assert niah.NEEDLE in tok.decode(prompt) and niah.NEEDLE_PREFIX + tok.decode(answer) == niah.NEEDLE
    passkey = niah.run_grid(tiny_model, ["full"], [200], [0.5], n_new=2, progress=io.StringIO())
    assert passkey[0]["task"] == "passkey" and passkey[0]["key"].isdigit()
    with pytest.raises(ValueError, match="unknown task"):
        niah.run_grid(tiny_model, ["full"], [200], [0.5], task="haystack")
