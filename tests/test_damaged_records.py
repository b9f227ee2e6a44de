"""One damaged session record among healthy ones (issue 25, acceptance 1): the CLI's listings and the server's
ListSessions go on and name it; every call that meets it answers DATA_LOSS."""
from __future__ import annotations

import json

import grpc
import pytest
from click.testing import CliRunner

from memsvc.auth import KeyRing
from memsvc.cli import main
from memsvc.limits import Limits
from memsvc.proto import memsvc_pb2 as pb
from memsvc.store.open import open_store
from tests.service.servers import client, served
from tests.store.backends import LmdbBackend

KEY = "k" * 20


def _filled(data, model, **options) -> dict:
    """Sessions a, crash and z with some tokens; the record of crash damaged while no server runs.
    Returns the healthy sessions' token counts."""
    with served(data, model, **options) as (_, port), client(port, api_key=KEY) as c:
        for sid in ("a", "crash", "z"):
            c.create_session(sid, labels={"team": "red"})
            c.append(sid, messages=[{"role": "user", "content": f"Hello from {sid}."}])
        tokens = {s.id: s.tokens for s in c.list_sessions() if s.id != "crash"}
    with open_store(data) as store:
        LmdbBackend().damage(store, "record", ("alice:" if options else "") + "crash")
    return tokens


def _cli(*args: str):
    out = CliRunner().invoke(main, list(args))
    assert out.exit_code == 0, out.output
    return out.output


def test_cli_listings_mark_a_damaged_record_and_go_on(tmp_path, tiny_model):
    data = tmp_path / "data"
    tokens = _filled(data, tiny_model)
    d = ["--data-dir", str(data)]

    table = _cli("sessions", "ls", *d)
    for sid, n in tokens.items():
        assert str(n) in next(line for line in table.splitlines() if line.startswith(sid)).split()
    assert next(line for line in table.splitlines() if line.startswith("crash")).split()[1] == "DAMAGED"
    assert "2 sessions" in table and "DAMAGED crash: session record fails its checksum" in table
    rows = [json.loads(line) for line in _cli("sessions", "ls", *d, "--json").splitlines()]
    assert {r["id"]: r["damaged"] for r in rows} == {"a": False, "crash": True, "z": False}
    assert "checksum" in next(r for r in rows if r["damaged"])["reason"]
    assert {r["id"] for r in (json.loads(x) for x in _cli("sessions", "ls", *d, "--label", "team=red",
                                                           "--sort", "tokens", "--json").splitlines())} \
        == {"a", "crash", "z"}  # its labels cannot be read: it is listed whatever the filter

    stats = _cli("sessions", "stats", *d)
    assert "1 DAMAGED" in stats and "DAMAGED crash" in stats
    doc = json.loads(_cli("sessions", "stats", *d, "--json"))
    assert doc["sessions"] == 3 and doc["tokens"] == sum(tokens.values())
    assert [x["id"] for x in doc["damaged"]] == ["crash"]

    show = _cli("sessions", "show", "crash", *d)
    assert "DAMAGED" in show and "fails its checksum" in show and "sessions rm crash" in show
    one = json.loads(_cli("sessions", "show", "crash", *d, "--json"))
    assert one["damaged"] is True and "checksum" in one["reason"] and one["kv_blocks"]["blocks"] >= 1
    assert json.loads(_cli("sessions", "show", "a", *d, "--json"))["damaged"] is False


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


@pytest.mark.parametrize("auth", [False, True])
def test_list_sessions_flags_it_and_its_calls_answer_data_loss(tmp_path, tiny_model, auth):
    data = tmp_path / "data"
    keys = {"api_keys": KeyRing.parse(f"alice={KEY}", source="test", allow_plain=True)} if auth else {}
    _filled(data, tiny_model, **keys)
    quotas = Limits(max_sessions_per_tenant=3, max_bytes_per_tenant=1 << 30) if auth else None
    with served(data, tiny_model, **keys, limits=quotas) as (server, port), \
            client(port, api_key=KEY if auth else None) as c:
        damaged: list = []
        assert [s.id for s in c.list_sessions(damaged=damaged)] == ["a", "z"]
        assert [(d.id, "checksum" in d.reason) for d in damaged] == [("crash", True)]
        if auth:  # the reason says the tenant's own id, not the store's
            assert "alice:" not in damaged[0].reason
        pages, token = [], ""
        while True:  # the damaged record counts in a page, and paging goes past it
            resp = c._stub.ListSessions(pb.ListSessionsRequest(page_size=1, page_token=token), **c._kw())
            pages.append(([s.id for s in resp.sessions], [d.id for d in resp.damaged]))
            token = resp.next_page_token
            if not token:
                break
        assert pages == [(["a"], []), ([], ["crash"]), (["z"], [])]
        for call in (lambda: c.get_session("crash"), lambda: c.resume("crash"),
                     lambda: c.append("crash", text="more"), lambda: c.generate_text("crash", max_new_tokens=2),
                     lambda: c.fork_session("crash", "copy")):
            code, details = _code(call)
            assert code == grpc.StatusCode.DATA_LOSS, details
            assert "damaged" in details
        assert c.get_session("a").tokens > 0  # the others still work
        if auth:  # the quota counts it as a session: the tenant is at its 3
            assert _code(lambda: c.create_session("b"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.delete_session("crash")
        damaged.clear()
        assert [s.id for s in c.list_sessions(damaged=damaged)] == ["a", "z"] and not damaged
        c.create_session("b")
