"""The operator CLI against a data dir a test server filled."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from memsvc.cli import main
from tests.conftest import running_server


def test_sessions_ls_show_rm(tmp_path, tiny_model):
    data = tmp_path / "data"
    with running_server(data, tiny_model) as (client, _):
        client.create_session("alpha", labels={"team": "red"})
        client.append("alpha", text="The quick brown fox jumps over the lazy dog. " * 10)
        client.create_session("beta")
        client.append("beta", messages=[{"role": "user", "content": "hi"}])
        want = {s.id: s for s in client.list_sessions()}
    runner = CliRunner()

    out = runner.invoke(main, ["sessions", "ls", "--data-dir", str(data)])
    assert out.exit_code == 0, out.output
    for sid, s in want.items():
        line = next(l for l in out.output.splitlines() if l.startswith(sid))
        assert str(s.tokens) in line.split() and s.policy in line.split()
    assert "2 sessions" in out.output

    rows = [json.loads(l) for l in runner.invoke(main, ["sessions", "ls", "--data-dir", str(data), "--json"]).output.splitlines()]
    assert {r["id"]: (r["tokens"], r["bytes_stored"]) for r in rows} == \
        {sid: (s.tokens, s.bytes_stored) for sid, s in want.items()}
    red = runner.invoke(main, ["sessions", "ls", "--data-dir", str(data), "--label", "team=red"])
    assert "alpha" in red.output and "beta" not in red.output

    show = runner.invoke(main, ["sessions", "show", "alpha", "--data-dir", str(data)])
    assert show.exit_code == 0, show.output
    assert re.search(rf"^tokens\s+{want['alpha'].tokens}$", show.output, re.M)
    assert str(want["alpha"].bytes_stored) in show.output and "team=red" in show.output

    missing = runner.invoke(main, ["sessions", "show", "nope", "--data-dir", str(data)])
    assert missing.exit_code != 0 and "no session 'nope'" in missing.output
    nodir = runner.invoke(main, ["sessions", "ls", "--data-dir", str(tmp_path / "absent")])
    assert nodir.exit_code != 0 and "does not exist" in nodir.output

    rm = runner.invoke(main, ["sessions", "rm", "beta", "--data-dir", str(data)])
    assert rm.exit_code == 0 and "deleted beta" in rm.output
    after = runner.invoke(main, ["sessions", "ls", "--data-dir", str(data), "--json"])
    assert [json.loads(l)["id"] for l in after.output.splitlines()] == ["alpha"]


def test_chat_streams_replies_and_commits_turns(tiny_server):
    client, server = tiny_server
    runner = CliRunner()
    addr = f"127.0.0.1:{server.memsvc_port}"
    out = runner.invoke(main, ["chat", "talk", "--address", addr, "--max-new-tokens", "4", "--system", "Be brief."],
                        input="Hello!\nHow are you?\n")
    assert out.exit_code == 0, out.output
    assert out.output.count("model> ") == 2
    s = client.get_session("talk")
    assert s.messages == 5  # system, then two user/assistant pairs
    again = runner.invoke(main, ["chat", "talk", "--address", addr], input="")
    assert again.exit_code == 0 and "resumed talk" in again.output


def test_show_reports_resident_and_stored_bytes_per_token_and_tiers(tmp_path, tiny_model):
    """A tiered session's accounting is visible in GetSession and in `sessions show` (offline)."""
    data = tmp_path / "data"
    with running_server(data, tiny_model) as (client, _):
        client.create_session("t", policy="tiered")
        client.append("t", tokens=list(range(10, 460)))
        s = client.get_session("t")
        assert s.policy == "tiered" and s.tokens == 450
        assert s.stored_bytes_per_token == pytest.approx(s.bytes_stored / 450)
        assert 0 < s.resident_bytes_per_token == pytest.approx(s.bytes_resident / 450)
        assert s.fp16_bytes_per_token == 2 * 2 * tiny_model.num_layers * tiny_model.num_kv_heads * tiny_model.head_dim
        tiers = dict(s.tier_tokens)
        assert tiers["sink"] == 4 and tiers["warm"] > 0 and sum(tiers.values()) == pytest.approx(449)
    out = CliRunner().invoke(main, ["sessions", "show", "t", "--data-dir", str(data)])
    assert out.exit_code == 0, out.output
    assert "resident / token" in out.output and "smaller than fp16" in out.output and "warm" in out.output
    doc = json.loads(CliRunner().invoke(main, ["sessions", "show", "t", "--data-dir", str(data), "--json"]).output)
    assert doc["tier_tokens"]["sink"] == 4 and doc["resident_bytes_per_token"] > 0
