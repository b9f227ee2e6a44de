"""Session behaviour on a tiny random model: chat continuation, commit, fork,
delete, paging, restart persistence, concurrency."""
from __future__ import annotations

import threading

import grpc
import pytest

from memsvc.chat import generation_prompt_ids
from tests.conftest import running_server


def _render_ids(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_turns_continue_exactly_as_one_rendering(tiny_server, tiny_model):
    client, _ = tiny_server
    tok = tiny_model.tokenizer
    client.create_session("c")
    turns = [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
        [{"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Another one, with ünïcode and  spaces\n\nplease."}],
        [{"role": "assistant", "content": "Green."}, {"role": "user", "content": "Thanks!"}],
    ]
    ids, so_far = [], []
    for turn in turns:
        ids += list(client.append("c", messages=turn).token_ids)
        so_far += turn
        assert ids == _render_ids(tok, so_far)
    assert client.get_session("c").tokens == len(ids)
    assert client.get_session("c").messages == 6


def test_commit_appends_reply_with_end_of_turn(tiny_server, tiny_model):
    client, server = tiny_server
    tok = tiny_model.tokenizer
    client.create_session("g")
    msgs = [{"role": "user", "content": "Say something."}]
    first = list(client.append("g", messages=msgs).token_ids)
    prompt = generation_prompt_ids(tok, msgs)
    out = client.generate_text("g", max_new_tokens=5, commit=True)
    sess = client.get_session("g")
    eot = list(server.manager.chat_format.end_of_turn)
    reply = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
    assert sess.tokens == len(first) + len(prompt) + len(reply) + len(eot)
    assert sess.messages == 2 and out.session.tokens == sess.tokens
    # the next user turn still renders as a continuation
    nxt = list(client.append("g", messages=[{"role": "user", "content": "More."}]).token_ids)
    assert nxt[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_raw_text_and_tokens_and_stats(tiny_server, tiny_model):
    client, _ = tiny_server
    client.create_session("r", labels={"kind": "raw"})
    a = list(client.append("r", text="Once upon a time").token_ids)
    b = list(client.append("r", tokens=[100, 200, 300]).token_ids)
    assert a == tiny_model.tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    assert b == [100, 200, 300]
    before = client.stats().model_tokens_processed
    out = client.generate_text("r", max_new_tokens=4, stop=["\u2603"])
    # raw sessions get no generation prompt: the pending token plus each fed back token
    assert client.stats().model_tokens_processed - before == len(out.token_ids)
    assert out.finish_reason in ("length", "stop")


def test_sampling_is_seeded(tiny_server):
    client, _ = tiny_server
    client.create_session("t")
    client.append("t", text="The weather today is")
    a = client.generate_text("t", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = client.generate_text("t", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    c = client.generate_text("t", max_new_tokens=8, temperature=1.0, seed=8)
    assert a.token_ids == b.token_ids
    assert len(c.token_ids) == 8


def test_fork_delete_list(tiny_server):
    client, _ = tiny_server
    client.create_session("base", labels={"team": "x"})
    client.append("base", text="shared history " * 20)
    fork = client.fork_session("base", "branch", labels={"team": "y"})
    assert fork.tokens == client.get_session("base").tokens
    client.append("branch", text=" only in the branch")
    assert client.get_session("branch").tokens > client.get_session("base").tokens
    for i in range(7):
        client.create_session(f"p{i}", labels={"team": "x"})
    assert [s.id for s in client.list_sessions(page_size=3, labels={"team": "x"})] == \
        ["base"] + [f"p{i}" for i in range(7)]
    assert client.delete_session("base")
    with pytest.raises(grpc.RpcError) as info:
        client.get_session("base")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.generate_text("branch", max_new_tokens=2).token_ids


def test_restart_resumes_identically(tmp_path, tiny_model):
    data = tmp_path / "data"
    with running_server(data, tiny_model) as (client, _):
        client.create_session("k")
        client.append("k", messages=[{"role": "user", "content": "Count to five."}])
        client.generate_text("k", max_new_tokens=6, commit=True)
        client.append("k", messages=[{"role": "user", "content": "Again."}])
        ref = client.generate_text("k", max_new_tokens=10)
        tokens = client.get_session("k").tokens
    with running_server(data, tiny_model) as (client, _):
        assert not client.get_session("k").resident
        s = client.resume("k")
        assert s.resident and s.tokens == tokens and s.bytes_resident > 0
        assert client.stats().model_tokens_processed == 0
        again = client.generate_text("k", max_new_tokens=10)
    assert again.token_ids == ref.token_ids


def test_concurrent_calls_on_one_and_many_sessions(tiny_server):
    client, server = tiny_server
    for i in range(4):
        client.create_session(f"c{i}")
    errors = []
    appended = {f"c{i}": 0 for i in range(4)}
    count_lock = threading.Lock()

    def worker(sid: str, n: int):
        try:
            for j in range(n):
                got = client.append(sid, text=f" turn {j} of {sid}.")
                with count_lock:
                    appended[sid] += len(got.token_ids)
                client.generate_text(sid, max_new_tokens=2)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"c{i % 4}", 4)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        s = client.get_session(f"c{i}")
        # two writers per session, 4 appends each: every acknowledged append is there
        assert s.tokens == appended[f"c{i}"] == len(server.store.tokens(f"c{i}")) > 0
