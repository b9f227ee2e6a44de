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
    addr = f"127.0.0.1:{server.port}"
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
    line = next(x for x in out.output.splitlines() if x.startswith("resident / token"))
    assert re.fullmatch(r"resident / token +\d+ B \(1\.2x the size of an fp16 cache\)", line), line  # fp32 hot tokens
    assert "warm" in out.output
    doc = json.loads(CliRunner().invoke(main, ["sessions", "show", "t", "--data-dir", str(data), "--json"]).output)
    assert doc["tier_tokens"]["sink"] == 4 and doc["resident_bytes_per_token"] > 0


def _cli(*args: str, ok: bool = True):
    out = CliRunner().invoke(main, list(args))
    assert (out.exit_code == 0) == ok, out.output
    return out


def test_sessions_ls_sort_filter_stats_and_gc(tmp_path, tiny_model):
    data = tmp_path / "data"
    with running_server(data, tiny_model) as (client, server):
        client.create_session("a", policy="full")
        client.append("a", tokens=list(range(10, 110)))
        client.create_session("b", policy="tiered", labels={"team": "red"})
        client.append("b", tokens=list(range(10, 410)))
        client.fork_session("b", "b2")
        client.append("b2", tokens=[5, 6, 7])
        client.create_session("c", policy="full", labels={"team": "red"})
        client.append("c", tokens=[1, 2, 3])
        want = {s.id: s for s in client.list_sessions()}
    d = ["--data-dir", str(data)]

    def ids(*args: str) -> list[str]:
        return [json.loads(line)["id"] for line in _cli("sessions", "ls", *d, "--json", *args).output.splitlines()]

    assert ids() == ["a", "b", "b2", "c"]
    assert ids("--sort", "tokens") == ["b2", "b", "a", "c"]
    assert ids("--sort", "size") == sorted(want, key=lambda s: want[s].bytes_stored, reverse=True)
    assert ids("--sort", "updated") == ["c", "b2", "b", "a"]  # newest first
    assert ids("--sort", "created") == ["c", "b2", "b", "a"]
    assert ids("--label", "team=red", "--sort", "tokens") == ["b2", "b", "c"]  # a fork keeps its source's labels
    assert ids("--older-than", "1h") == [] and ids("--older-than", "0") == ["a", "b", "b2", "c"]
    bad = _cli("sessions", "ls", *d, "--older-than", "soon", ok=False)
    assert bad.exit_code == 2 and "not a duration" in bad.output
    table = _cli("sessions", "ls", *d, "--sort", "tokens").output.splitlines()
    assert [line.split()[0] for line in table[1:5]] == ["b2", "b", "a", "c"]

    doc = json.loads(_cli("sessions", "show", "b2", *d, "--json").output)
    assert doc["kv_blocks"]["shared"] > 0 and doc["ttl"] == 0 and doc["expires"] is None
    assert "shared with other sessions" in _cli("sessions", "show", "b2", *d).output

    from memsvc.store.lmdb import LmdbStore
    with LmdbStore(data, readonly=True) as store:
        st = store.stats()
    stats = json.loads(_cli("sessions", "stats", *d, "--json").output)
    assert stats["sessions"] == 4 and stats["tokens"] == sum(s.tokens for s in want.values())
    assert stats["bytes_referenced"] == sum(s.bytes_stored for s in want.values())
    assert stats["bytes_stored"] == st["total_bytes"] < stats["bytes_referenced"]
    assert stats["shared_blobs"] == st["shared_blobs"] > 0 and stats["bytes_saved_by_sharing"] > 0
    assert stats["block_cache"] is None and stats["policies"] == {"full": 2, "tiered": 2}
    text = _cli("sessions", "stats", *d).output
    assert re.search(r"^sessions\s+4 \(full 2, tiered 2\)$", text, re.M) and "saved by sharing" in text

    assert json.loads(_cli("sessions", "gc", *d, "--json").output)["freed_blobs"] == 0
    with LmdbStore(data) as store:
        with store.env.begin(write=True) as txn:  # a blob nothing points to, as a crash of old code might leave
            txn.put((10 ** 9).to_bytes(8, "big"), b"leaked" * 100, db=store._db["blobs"])
    out = _cli("sessions", "gc", *d).output
    assert "freed 1 unreferenced blobs (600 B)" in out
    _cli("sessions", "rm", "b", *d)
    assert json.loads(_cli("sessions", "gc", *d, "--json").output)["freed_blobs"] == 0  # rm freed its own
    assert json.loads(_cli("sessions", "show", "b2", *d, "--json").output)["kv_blocks"]["shared"] == 0


def test_export_import_round_trip_and_refusals(tmp_path, tiny_model, tiny_model_dirs):
    from memsvc.store.lmdb import LmdbStore
    from tests.store.lmdb_raw import session_values

    data, fresh = tmp_path / "data", tmp_path / "fresh"
    with running_server(data, tiny_model) as (client, _):
        client.create_session("t", policy="tiered", labels={"k": "v"})
        client.append("t", tokens=list(range(10, 420)))
    d, f = ["--data-dir", str(data)], ["--data-dir", str(fresh)]
    model_a, model_b = ["--model", str(tiny_model_dirs[0])], ["--model", str(tiny_model_dirs[1])]
    file = tmp_path / "t.msx"
    out = _cli("sessions", "export", "t", str(file), *d)
    assert f"to {file}" in out.output

    _cli("sessions", "import", str(file), *f, *model_a)
    _cli("sessions", "import", str(file), "--as", "copy", *f, *model_a)
    with LmdbStore(data, readonly=True) as src, LmdbStore(fresh, readonly=True) as dst:
        original = session_values(src, "t")
        assert session_values(dst, "t") == original  # same record, token blocks and KV bytes
        assert dst.get("copy").stored_bytes - len(dst.get("copy").to_bytes()) == \
            src.get("t").stored_bytes - len(src.get("t").to_bytes())
        assert dst.tokens("copy") == src.tokens("t") and dst.kv_blocks("copy") == src.kv_blocks("t")
    again = _cli("sessions", "import", str(file), *f, *model_a, ok=False)
    assert "already exists" in again.output

    other = _cli("sessions", "import", str(file), "--data-dir", str(tmp_path / "other"), *model_b, ok=False)
    assert "fingerprint" in other.output and "a KV cache only works with the model that made it" in other.output
    assert not (tmp_path / "other").exists()  # refused before a store was made

    raw = file.read_bytes()
    for name, damaged in (("flipped", raw[:500] + bytes([raw[500] ^ 1]) + raw[501:]),
                          ("truncated", raw[:-100]), ("other", b"hello" * 20)):
        path = tmp_path / name
        path.write_bytes(damaged)
        bad = _cli("sessions", "import", str(path), "--as", name, *f, *model_a, ok=False)
        assert ("corrupted" if name != "other" else "not a memsvc session export") in bad.output
    missing = _cli("sessions", "export", "nope", str(tmp_path / "x"), *d, ok=False)
    assert "no session 'nope'" in missing.output and not (tmp_path / "x").exists()


def test_upgrade_command(tmp_path):
    from memsvc.store.lmdb import LmdbStore

    with LmdbStore(tmp_path / "d"):
        pass
    out = _cli("sessions", "upgrade", "--data-dir", str(tmp_path / "d"))
    assert "0 tiered session(s)" in out.output  # format 1: tests/store/test_sharing.py; states: test_paged_state


def test_show_says_plainly_when_a_session_is_not_compressed(tmp_path, tiny_model):
    from memsvc.cli.sessions import _versus_fp16

    data = tmp_path / "data"
    with running_server(data, tiny_model) as (client, _):
        client.create_session("f", policy="full")
        client.append("f", tokens=list(range(10, 410)))
    out = _cli("sessions", "show", "f", "--data-dir", str(data)).output
    line = next(x for x in out.splitlines() if x.startswith("resident / token"))
    # the tiny model keeps fp32 (2x), and the full cache 8 rows of room to grow after its 400 (2% more: 2.04x)
    assert line.endswith(" B (2.0x the size of an fp16 cache)")
    assert _versus_fp16(4.26) == "4.3x smaller than fp16"
    assert _versus_fp16(1.0) == _versus_fp16(1.04) == "about the size of an fp16 cache"  # never "1.0x smaller"


def test_version():
    from importlib.metadata import version

    out = _cli("--version")
    assert out.output == f"memsvc {version('memsvc')}\n"


def test_serve_refuses_an_advertised_address_without_a_port(tmp_path):
    res = CliRunner().invoke(main, ["serve", "--port", "0", "--data-dir", str(tmp_path), "--advertise", "replica-a"])
    assert res.exit_code != 0
    assert "--advertise must be HOST:PORT" in res.output and "'replica-a'" in res.output
    assert not (tmp_path / "data.mdb").exists()  # refused before touching anything
