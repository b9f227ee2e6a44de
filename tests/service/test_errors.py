"""Bad input: the right status code, a message a person can act on, and the
store byte-for-byte unchanged by every failed call."""
from __future__ import annotations

import grpc
import pytest

from tests.conftest import running_server


def _fails(call, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)  # streaming calls fail while iterating
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    for w in words:
        assert w in details, details
    return details


@pytest.fixture
def seeded(tiny_server):
    client, server = tiny_server
    client.create_session("s1", labels={"team": "a"})
    client.append("s1", messages=[{"role": "user", "content": "Hello there, how are you?"}])
    client.create_session("s2")
    client.create_session("f1", policy="full")
    return client, server


def test_bad_calls_answer_with_codes_and_change_nothing(seeded):
    client, server = seeded
    store = server.store
    before = store.dump()
    vocab = server.manager.model.vocab_size
    NF, AE, IA = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT

    # unknown session, on every RPC that names one
    _fails(lambda: client.get_session("nope"), NF, "nope")
    _fails(lambda: client.resume("nope"), NF, "nope")
    _fails(lambda: client.append("nope", text="hi"), NF, "nope")
    _fails(lambda: client.generate("nope", max_new_tokens=3), NF, "nope")
    _fails(lambda: client.fork_session("nope", "copy"), NF, "nope")
    _fails(lambda: client.delete_session("nope"), NF, "nope")
    # duplicate ids
    _fails(lambda: client.create_session("s1"), AE, "s1")
    _fails(lambda: client.fork_session("s1", "s2"), AE, "s2")
    # empty appends, in each form
    _fails(lambda: client.append("s1", messages=[]), IA, "empty")
    _fails(lambda: client.append("s1", text=""), IA, "empty")
    _fails(lambda: client.append("s1", tokens=[]), IA, "empty")
    # token ids outside the vocabulary
    _fails(lambda: client.append("s1", tokens=[5, vocab]), IA, str(vocab), "vocabulary")
    _fails(lambda: client.append("s1", tokens=[-1]), IA, "-1", "vocabulary")
    # negative or huge max_new_tokens, and other generation parameters
    _fails(lambda: client.generate("s1", max_new_tokens=-5), IA, "max_new_tokens")
    _fails(lambda: client.generate("s1", max_new_tokens=10**9), IA, "max_new_tokens")
    _fails(lambda: client.generate("s1", top_p=1.5), IA, "top_p")
    _fails(lambda: client.generate("s1", temperature=-1.0), IA, "temperature")
    _fails(lambda: client.generate("s1", stop=[""]), IA, "stop")
    # unknown policy, bad id, bad page size
    _fails(lambda: client.create_session("s3", policy="zip"), IA, "zip", "valid policies", "full", "tiered", "k6v4",
           "snapkv")
    _fails(lambda: client.create_session("has space"), IA)
    _fails(lambda: list(client.list_sessions(page_size=5000)), IA, "page_size")
    # generating from an empty session
    _fails(lambda: client.generate("s2", max_new_tokens=2), grpc.StatusCode.FAILED_PRECONDITION, "empty")
    # past the model's context (the tiny model has 512 positions), for a policy bounded by it
    _fails(lambda: client.append("f1", tokens=[5] * 600), IA, "context")

    assert store.dump() == before
    s1 = client.get_session("s1")
    assert s1.tokens > 0 and s1.labels == {"team": "a"}


def test_generate_without_commit_leaves_session_as_it_was(seeded):
    client, server = seeded
    before = server.store.dump()
    a = client.generate_text("s1", max_new_tokens=6)
    b = client.generate_text("s1", max_new_tokens=6)
    assert a.token_ids == b.token_ids and len(a.token_ids) >= 1
    assert server.store.dump() == before
    assert client.get_session("s1").tokens == a.session.tokens


def test_session_built_for_another_model_is_refused(tmp_path, tiny_model_dirs):
    from memsvc.model import load_model

    data = tmp_path / "data"
    with running_server(data, load_model(str(tiny_model_dirs[0]))) as (client, _):
        client.create_session("mine")
        client.append("mine", text="some history for model a")
    with running_server(data, load_model(str(tiny_model_dirs[1]))) as (client, server):
        before = server.store.dump()
        FP = grpc.StatusCode.FAILED_PRECONDITION
        _fails(lambda: client.resume("mine"), FP, "tiny-a", "tiny-b")
        _fails(lambda: client.append("mine", text="more"), FP, "fingerprint")
        _fails(lambda: client.generate("mine", max_new_tokens=2), FP, "--model")
        # inspection still works, and nothing changed
        assert client.get_session("mine").model == "tiny-a"
        assert server.store.dump() == before


def test_a_failed_store_write_rolls_the_session_back(seeded, monkeypatch):
    client, server = seeded
    before_tokens = client.get_session("s1").tokens
    expected = client.generate_text("s1", max_new_tokens=6).token_ids
    before = server.store.dump()

    def broken_commit(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(server.store, "commit", broken_commit)
    _fails(lambda: client.append("s1", text=" and a turn the disk never sees"), grpc.StatusCode.INTERNAL, "disk full")
    _fails(lambda: client.generate("s1", max_new_tokens=3, commit=True), grpc.StatusCode.INTERNAL, "disk full")
    monkeypatch.undo()

    assert server.store.dump() == before
    assert client.get_session("s1").tokens == before_tokens
    # the in-memory cache was cropped back: the session answers exactly as before
    assert client.generate_text("s1", max_new_tokens=6).token_ids == expected


def test_chat_roles_and_empty_content_are_checked_against_the_template(seeded):
    from types import SimpleNamespace

    from memsvc.chat import template_roles

    client, server = seeded
    before = server.store.dump()
    IA = grpc.StatusCode.INVALID_ARGUMENT
    roles = "'system', 'user', 'assistant'"
    _fails(lambda: client.append("s1", messages=[{"role": "wizard", "content": "Abracadabra."}]), IA,
           "chat message 0 has role 'wizard'", f"this model's chat template takes the roles {roles}")
    _fails(lambda: client.append("s1", messages=[{"role": "user", "content": "fine"}, {"role": "", "content": "x"}]),
           IA, "chat message 1 has role ''")
    _fails(lambda: client.append("s1", messages=[{"role": "tool", "content": "42"}]), IA, "role 'tool'")  # SmolLM2's
    for empty in ("", "  \n"):
        _fails(lambda: client.append("s1", messages=[{"role": "user", "content": empty}]), IA,
               "chat message 0 (role 'user') is empty: a message needs some content")
    assert server.store.dump() == before  # refused: nothing stored
    got = client.append("s1", messages=[{"role": "system", "content": "Be brief."},
                                        {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Hi"}])
    assert len(got.token_ids) > 0
    tools = SimpleNamespace(chat_template="{% if message['role'] == 'tool' %}<tool_response>{% endif %}")
    assert template_roles(tools) == ("system", "user", "assistant", "tool")
    assert template_roles(SimpleNamespace(chat_template=None)) == ("system", "user", "assistant")
