"""Sessions that outgrow the model's context: a tiered session of 10x the window through the API.

The server attends a window of 256 positions (`context=256`); a tiered session grows past 2,560 tokens turn by
turn (chat Appends and committed replies), keeps answering, resumes after a restart as it would have gone on,
and no query ever attends a key 256 or more positions away. A `full` session, which attends everything it
holds at its own position, is refused at the window with a message that says so.
"""
from __future__ import annotations

import grpc
import pytest

from memsvc.corpus import essay_text
from tests.conftest import make_tiny_model, running_server

WINDOW = 256


@pytest.fixture(scope="module")
def model(tmp_path_factory, real_model_dir):
    from memsvc.model import load_model

    path = make_tiny_model(tmp_path_factory.mktemp("unbounded") / "m", real_model_dir, seed=5, max_positions=512,
                           initializer_range=0.3)
    return load_model(str(path))


def _turns(client, sid: str, words: list[str], until: int) -> list[list[int]]:
    replies, at = [], 0
    while client.get_session(sid).tokens < until:
        text = " ".join(words[at:at + 90])
        at += 90
        client.append(sid, messages=[{"role": "user", "content": text}])
        out = client.generate_text(sid, max_new_tokens=12, commit=True)
        assert out.token_ids and out.finish_reason in ("length", "stop", "stop_string")
        replies.append(list(out.token_ids))
    return replies


def test_a_tiered_session_grows_to_ten_windows_and_keeps_answering(tmp_path, model):
    words = essay_text(60_000).split()
    with running_server(tmp_path / "data", model, context=WINDOW) as (client, server):
        client.create_session("long", policy="tiered")
        replies = _turns(client, "long", words, 10 * WINDOW)
        s = client.get_session("long")
        assert s.tokens >= 10 * WINDOW and s.tier_tokens["cold"] > 5 * WINDOW
        assert len({tuple(r) for r in replies}) > 1  # replies that follow the turns, not one answer over and over
        stats = server.manager._live["long"].kv.stats()
        assert 0 < stats["max_distance"] < WINDOW, stats  # every step attended inside the window
        client.append("long", messages=[{"role": "user", "content": "One more question."}])
        client.fork_session("long", "twin")
        want = list(client.generate_text("twin", max_new_tokens=10).token_ids)
    with running_server(tmp_path / "data", model, context=WINDOW) as (client, server):
        client.resume("long")
        assert list(client.generate_text("long", max_new_tokens=10).token_ids) == want
        assert server.manager._live["long"].kv.stats()["max_distance"] < WINDOW


def test_a_full_session_stops_at_the_window_with_a_message_that_says_why(tmp_path, model):
    words = essay_text(20_000).split()
    with running_server(tmp_path / "data", model, context=WINDOW) as (client, _):
        client.create_session("f", policy="full")
        client.append("f", text=" ".join(words[:120]))
        with pytest.raises(grpc.RpcError) as err:
            client.append("f", text=" ".join(words[120:600]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context of 256" in err.value.details() and "tiered" in err.value.details()
        out = client.generate_text("f", max_new_tokens=400)  # more than the window has room for
        assert out.finish_reason == "context" and len(out.token_ids) < 256
