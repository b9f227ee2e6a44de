"""Pins the peers run's report (benchmarks/peers/summary.py, report.py; issue 7): retention against memsvc
`full`, the summary table and its JSON line, the per-length tables, the target check, and the tasks kept
apart, on hand-made rows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

PEERS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "peers"
if str(PEERS_DIR) not in sys.path:  # the driver's modules import one another by name, as when run.py runs
    sys.path.insert(0, str(PEERS_DIR))

from budgets import matched_ratios, parse_ratio_key, ratio_for_bytes, ratio_key  # noqa: E402
from report import json_line, length_table, scatter, table  # noqa: E402
from summary import by_length, mark_correct, summarize, target_check  # noqa: E402


def _rows():
    """Two NIAH cells and one ppl cell for memsvc full, tiered, and a peer; one peer failed."""
    rows = []
    for method, side, setting, corr, lp, bpt, nll in [
            ("full", "memsvc", "full", (True, True), (-1.0, -2.0), 23040, 2.0),
            ("tiered", "memsvc", "tiered", (True, False), (-1.5, -6.0), 2304, 2.01),
            ("tiered-h64", "memsvc", "tiered-h64", (True, True), (-1.2, -2.5), 1152, 2.02),
            ("hqq4", "peer", "hqq4", (True, False), (-1.1, -2.2), 6480, 2.03),
            ("snapkv", "peer", "snapkv@tiered", (False, False), (-9.0, -8.0), 2300, 2.1)]:
        for i, d in enumerate((0.0, 1.0)):
            rows.append({"side": side, "method": method, "setting": setting, "cell": f"niah-1024-{d:g}",
                         "kind": "niah", "length": 1024, "ok": True, "resident_bpt": bpt, "key": "12345",
                         "tokens": [1, 2] if corr[i] else [3], "logprob": lp[i], "decode_tok_s": 5.0, "depth": d})
        rows.append({"side": side, "method": method, "setting": setting, "cell": "ppl-4096", "kind": "ppl",
                     "length": 4096, "ok": True, "resident_bpt": bpt, "nll": nll, "count": 511})
    rows.append({"side": "peer", "method": "pyramid", "setting": "pyramid@tiered", "cell": "niah-1024-0",
                 "kind": "niah", "length": 1024, "ok": False, "error": "RuntimeError: mask length"})
    return rows


def test_summary_table_and_json_line(capsys, tmp_path):
    rows = _rows()
    mark_correct(rows, lambda ids: "The pass key is 12345" if ids == [1, 2] else "nothing")
    s = {x["setting"]: x for x in summarize(rows, 23040)}
    assert s["full"]["retention"] == 1.0 and s["full"]["mean_dlogprob"] == 0
    assert s["tiered"]["retention"] == 0.5 and s["tiered"]["mean_dlogprob"] == pytest.approx(-2.25)
    assert s["tiered"]["x_vs_fp16"] == pytest.approx(10.0)
    assert s["tiered"]["dppl"] == pytest.approx(2.718281828 ** 0.01 - 1)
    assert s["snapkv@tiered"]["retention"] == 0.0 and s["snapkv@tiered"]["recall"] == 0.0
    assert s["pyramid@tiered"]["failed"] == 1 and "mask length" in s["pyramid@tiered"]["error"]
    text = table(list(s.values()))
    lines = text.splitlines()
    assert lines[0].startswith("| method | side | resident B/tok | × vs fp16 | recall | retention vs full | passkey |")
    assert "| tiered | memsvc | 2,304 | 10.0× | 50% | 50% (1/2) | 50% (1/2) | -2.25 | +1.01% | 5.00 @1024 |" in lines
    assert any(l.startswith("| pyramid@tiered | peer | failed: RuntimeError") for l in lines)
    assert "| tiered-h64 | memsvc | 1,152 | 20.0× | 100% | 100% (2/2) | 100% (2/2) | -0.35 | +2.02% | 5.00 @1024 |" \
        in lines
    assert any(l.startswith("| hqq4 | peer | 6,480 | 3.6× | 50% | 50% (1/2) |") for l in lines)
    assert lines[1].count("|") == lines[0].count("|") == next(l for l in lines if "pyramid" in l).count("|")
    line = json.loads(json_line(list(s.values()), rows, {("tiered", "niah", 1024): 0.9,
                                                             ("tiered-h64", "niah", 1024): 0.95}))
    assert line["matched_ratios"] == {"niah@1024": 0.9, "tiered-h64/niah@1024": 0.95} and line["rows"] == len(rows)
    assert {p["setting"] for p in line["peers"]} == set(s)
    scatter(list(s.values()), "retention", str(tmp_path / "r.png"), "retention", "t")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_target_check_per_length():
    rows = _rows()
    mark_correct(rows, lambda ids: "The pass key is 12345" if ids == [1, 2] else "nothing")
    at = by_length(rows)
    assert at["tiered-h64"][1024] == {"bytes": 1152, "correct": 2, "of": 2}
    assert at["hqq4"][1024]["correct"] == 1 and "ppl-4096" not in str(at)  # NIAH cells only
    check = target_check(rows, 23040)
    assert check["a"] == [] and check["a_held"]  # no peer keeps 90% here (hqq4 1/2)
    assert check["b"] == [{"setting": "tiered-h64", "length": 1024, "retention": 1.0, "x_vs_fp16": 20.0}]
    # a peer that keeps every cell: held by tiered-h64 (100%, fewer bytes), missed once no tiered row has fewer
    for r in rows:
        if r["setting"] == "hqq4" and r["kind"] == "niah":
            r["correct"] = True
    check = target_check(rows, 23040)
    assert check["a"] == [{"peer": "hqq4", "length": 1024, "retention": 1.0, "bytes": 6480, "held": True,
                           "by": "tiered-h64"}]
    for r in rows:
        if r["setting"] == "hqq4":
            r["resident_bpt"] = 1000
    check = target_check(rows, 23040)
    assert not check["a_held"] and check["a"][0]["by"] is None
    text = length_table(rows, 23040)
    assert "| tiered-h64 | 2/2, 1,152 (20.0×) |" in text.splitlines()


def test_tasks_are_reported_apart_and_pooled_for_the_target():
    """Essay-needle rows beside the passkey rows: per-task retention in the table and the per-length tables,
    both tasks pooled in the target check, and kvpress ratios matched per task."""
    rows = _rows()
    for method, side, setting, corr, bpt in [("full", "memsvc", "full", (True, True, False), 23040),
                                             ("tiered-h64", "memsvc", "tiered-h64", (True, False, True), 1000),
                                             ("hqq4", "peer", "hqq4", (True, True, True), 6480)]:
        for i, d in enumerate((0.0, 0.5, 1.0)):
            rows.append({"side": side, "method": method, "setting": setting, "cell": f"needle-1024-{d:g}",
                         "kind": "niah", "task": "needle", "length": 1024, "ok": True, "resident_bpt": bpt,
                         "key": "sandwich", "tokens": [5] if corr[i] else [3], "logprob": -1.0, "depth": d})
    mark_correct(rows, lambda ids: {(1, 2): "The pass key is 12345", (5,): "eat a sandwich"}.get(tuple(ids), "x"))
    s = {x["setting"]: x for x in summarize(rows, 23040)}
    assert s["tiered-h64"]["tasks"] == {"passkey": {"retention": 1.0, "full_correct": 2},
                                        "needle": {"retention": 0.5, "full_correct": 2}}
    assert s["tiered-h64"]["retention"] == 0.75 and s["full"]["tasks"]["needle"]["retention"] == 1.0
    assert s["snapkv@tiered"]["tasks"] == {"passkey": {"retention": 0.0, "full_correct": 2}}
    lines = table(list(s.values())).splitlines()
    assert "| passkey | needle |" in lines[0]
    assert any(l.startswith("| tiered-h64 | memsvc | 1,061 | 21.7× | 80% | 75% (3/4) | 100% (2/2) | 50% (1/2) |")
               for l in lines)
    assert any(l.startswith("| snapkv@tiered | peer | 2,300 | 10.0× | 0% | 0% (0/2) | 0% (0/2) | — |") for l in lines)
    assert "| tiered-h64 | 1/2, 1,000 (23.0×) |" in length_table(rows, 23040, "needle").splitlines()
    assert by_length(rows, task="passkey")["tiered-h64"][1024] == {"bytes": 1152, "correct": 2, "of": 2}
    pooled = by_length(rows)["hqq4"][1024]
    assert (pooled["correct"], pooled["of"]) == (3, 4)  # passkey 1/2, needle 2/2
    # pooled target: hqq4 keeps 75% (< 90%: nothing to hold); tiered-h64 75% is no 99% point
    check = target_check(rows, 23040)
    assert check["a"] == [] and check["b"] == []
    # kvpress's ratios are matched per task: the needle cells' bytes apart from the passkey cells'
    got = matched_ratios(rows, 23040, ("tiered-h64",))
    assert got == {("tiered-h64", "niah", 1024): ratio_for_bytes(1152, 23040),
                   ("tiered-h64", "needle", 1024): ratio_for_bytes(1000, 23040),
                   ("tiered-h64", "ppl", 4096): ratio_for_bytes(1152, 23040)}
    assert parse_ratio_key(ratio_key(("tiered-h64", "needle", 1024))) == ("tiered-h64", "needle", 1024)
