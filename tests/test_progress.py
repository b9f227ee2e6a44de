"""Progress of long operator work (issue 25): plain lines off a terminal, a bar on one; repair, verify, import
and upgrade report it; a Resume that repairs logs what it does and how long it took."""
from __future__ import annotations

import io
import logging
import random
import re

import pytest
from click.testing import CliRunner

from memsvc.cache.tiered.cache import STATE_INDEX
from memsvc.cache.tiered.pages import is_cold_block
from memsvc.cli import main
from memsvc.store.lmdb import LmdbStore
from memsvc.progress import Progress
from tests.conftest import running_server
from tests.service.test_repair import HISTORY, build, flip


def test_lines_off_a_terminal():
    lines = []
    bar = Progress("repair s", 300, "tokens", line=lines.append, every=0)
    for _ in range(3):
        bar.advance(100)
    seconds = bar.finish("2 KV entries rewritten")
    assert lines[0] == "repair s: started, 0/300 tokens (0%)"
    assert [re.sub(r"[\d.]+ s", "T s", x) for x in lines[1:]] == [
        "repair s: 100/300 tokens (33%), T s", "repair s: 200/300 tokens (67%), T s",
        "repair s: 300/300 tokens (100%), T s", "repair s: done, 300/300 tokens (100%) in T s; 2 KV entries rewritten"]
    assert seconds >= 0 and bar.finish() >= seconds and len(lines) == 5  # a second finish writes nothing
    quiet = []
    bar = Progress("verify", 1000, "sessions", line=quiet.append, every=3600)
    for _ in range(1000):
        bar.advance(1)
    bar.finish()
    assert len(quiet) == 2  # started, done: nothing in between within `every`
    stream = io.StringIO()  # not a terminal: lines on the stream
    Progress("import f", 0, stream=stream).finish()
    assert stream.getvalue().splitlines()[0] == "import f: started, 0"
    with pytest.raises(ValueError):
        Progress("x", -1)


def test_a_bar_on_a_terminal():
    stream = io.StringIO()
    bar = Progress("repair s", 4, "tokens", stream=stream, tty=True, redraw=1e9)
    bar.advance(2)
    bar.finish()
    out = stream.getvalue()
    assert out.startswith("\r\x1b[Krepair s [" + "-" * 28 + "] 0/4 tokens (0%) 0 s")  # redrawn in place
    assert "\r\x1b[Krepair s [" + "#" * 14 + "-" * 14 + "] 2/4 tokens (50%) 0 s" in out
    assert out.endswith("\r\x1b[Krepair s: done, 2/4 tokens (50%) in 0.0 s\n") and out.count("\n") == 1


@pytest.fixture
def damaged(tmp_path, long_model):
    data = tmp_path / "data"
    with running_server(data, long_model) as (c, _):
        build(c, "s", HISTORY[:700])
    flip(data, "s", [(0, 0), (1, 0)], random.Random(2))
    return data


def test_verify_repair_prints_progress_lines(damaged, long_model_dir):
    res = CliRunner().invoke(main, ["sessions", "verify", "--data-dir", str(damaged), "--repair", "--model",
                                    str(long_model_dir)])
    assert res.exit_code == 0, res.output
    err = res.stderr
    assert "verify: started, 0/1 sessions (0%)" in err and "verify: done, 1/1 sessions (100%) in " in err
    assert re.search(r"repair s: started, 0/\d+ tokens \(0%\)", err)
    assert re.search(r"repair s: done, \d+/\d+ tokens \(\d+%\) in [\d.]+ s; 2 KV entries rewritten", err)
    assert "verify after repair: done, 1/1 sessions (100%)" in err and "0 damaged" in err
    assert "repaired s" in res.stdout


def test_a_resume_that_repairs_logs_what_it_does_and_how_long(damaged, long_model, caplog):
    with LmdbStore(damaged, readonly=True) as store:
        parts = [k for k in store.kv_keys("s") if not is_cold_block(k[1]) and k[1] != STATE_INDEX]
    flip(damaged, "s", parts[:2], random.Random(3))  # layer state parts: read when the session loads
    with caplog.at_level(logging.INFO, logger="memsvc.sessions"):
        with running_server(damaged, long_model) as (c, _):
            assert c.resume("s").resident
    text = [r.getMessage() for r in caplog.records if r.name == "memsvc.sessions"]
    assert any("session s:" in t and "rebuilding its KV cache from its token ids" in t for t in text)
    assert any(re.match(r"session s: repair: started, 0/\d+ tokens", t) for t in text)
    assert any(re.match(r"session s: repair: done, \d+/\d+ tokens \(\d+%\) in [\d.]+ s; \d+ KV entries", t)
               for t in text)


def test_import_and_upgrade_show_progress(tmp_path, tiny_model, tiny_model_dirs):
    data = tmp_path / "data"
    with running_server(data, tiny_model) as (c, _):
        c.create_session("a")
        c.append("a", tokens=HISTORY[:50])
    runner = CliRunner()
    out = runner.invoke(main, ["sessions", "export", "a", str(tmp_path / "a.msx"), "--data-dir", str(data)])
    assert out.exit_code == 0, out.output
    imp = runner.invoke(main, ["sessions", "import", str(tmp_path / "a.msx"), "--as", "b", "--data-dir", str(data),
                               "--model", str(tiny_model_dirs[0])])
    assert imp.exit_code == 0, imp.output
    assert f"import {tmp_path / 'a.msx'}: started, 0/3 steps (0%)" in imp.stderr
    assert re.search(r"import .*: done, 3/3 steps \(100%\) in [\d.]+ s; stored as b", imp.stderr)
    up = runner.invoke(main, ["sessions", "upgrade", "--data-dir", str(data)])
    assert up.exit_code == 0, up.output
    assert "upgrade: started, 0/2 sessions (0%)" in up.stderr and "upgrade: done, 2/2 sessions (100%)" in up.stderr
