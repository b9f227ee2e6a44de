"""Offline writers of a data dir (upgrade, import, gc, rm, verify --repair) are refused while a server holds it,
with a message saying so (issue 25); readers are not; the lock goes with its holder, however it ends."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from memsvc.cli import main
from memsvc.server import create_server
from memsvc.store.errors import StoreError
from memsvc.store.lmdb.dirlock import DataDirBusy, DirLock
from memsvc.store.open import claim
from tests.conftest import running_server

BUSY = "is in use by a memsvc server (pid {pid}, since "


def test_writers_refuse_while_a_server_holds_the_data_dir(tmp_path, tiny_model, tiny_model_dirs):
    data, runner = tmp_path / "data", CliRunner()
    with running_server(data, tiny_model) as (c, server):
        c.create_session("a")
        c.append("a", tokens=list(range(10, 60)))
    out = runner.invoke(main, ["sessions", "export", "a", str(tmp_path / "a.msx"), "--data-dir", str(data)])
    assert out.exit_code == 0, out.output
    model = str(tiny_model_dirs[0])
    with running_server(data, tiny_model) as (c, server):
        before = server.store.dump()
        for args, who in ((["upgrade"], "`memsvc sessions upgrade`"),
                          (["import", str(tmp_path / "a.msx"), "--as", "b", "--model", model],
                           "`memsvc sessions import`"),
                          (["gc"], "`memsvc sessions gc`"), (["rm", "a"], "`memsvc sessions rm`"),
                          (["verify", "--repair", "--model", model], "`memsvc sessions verify --repair`")):
            res = runner.invoke(main, ["sessions", *args, "--data-dir", str(data)])
            assert res.exit_code == 1, (args, res.output)
            assert BUSY.format(pid=os.getpid()) in res.output and f"and {who} needs it alone" in res.output
            assert "stop that one first" in res.output
        assert server.store.dump() == before  # nothing was written
        # readers go on (in another process: LMDB opens an environment once per process)
        ls = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); from memsvc.cli import main; "
                             f"main(['sessions', 'ls', '--data-dir', {str(data)!r}])"],
                            capture_output=True, text=True, timeout=120)
        assert ls.returncode == 0 and ls.stdout.splitlines()[1].startswith("a "), ls.stdout + ls.stderr
        with pytest.raises(DataDirBusy, match="a memsvc server needs it alone"):  # nor a second server
            create_server("127.0.0.1:0", data_dir=data, model=tiny_model)
        assert c.get_session("a").tokens == 50  # the first one serves on
    up = runner.invoke(main, ["sessions", "upgrade", "--data-dir", str(data)])  # stopped: free again
    assert up.exit_code == 0, up.output
    rm = runner.invoke(main, ["sessions", "rm", "a", "--data-dir", str(data)])
    assert rm.exit_code == 0 and "deleted a" in rm.output


def test_a_server_does_not_start_beside_an_offline_writer(tmp_path, tiny_model):
    data = tmp_path / "data"
    with DirLock(data, "`memsvc sessions upgrade`"):
        with pytest.raises(DataDirBusy, match=r"in use by `memsvc sessions upgrade` \(pid \d+"):
            create_server("127.0.0.1:0", data_dir=data, model=tiny_model)
    with running_server(data, tiny_model) as (c, _):  # released: it starts
        c.create_session("x")


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    data = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.');"
                               "from memsvc.store.lmdb.dirlock import DirLock;"
                               f"DirLock({str(data)!r}, 'a memsvc server'); print('held', flush=True);"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataDirBusy, match=rf"a memsvc server \(pid {holder.pid}, since"):
            claim(data, "a test")
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.05)
    lock = claim(data, "a test")  # the kernel released it with the process
    assert "a test (pid" in (data / "memsvc.lock").read_text()
    lock.release()
    lock.release()  # idempotent
    assert claim("postgresql://db/memsvc", "a test") is None  # not a data dir: leases are the database's
    assert claim(tmp_path / "none", "a test", create=False) is None and not (tmp_path / "none").exists()
    assert issubclass(DataDirBusy, StoreError)
