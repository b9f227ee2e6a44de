"""Every policy through the service: create, append, generate, commit, restart, resume.

A session's cache is rebuilt on a fresh server from what the store holds (the
full cache's blocks; the tiered form's layer states, with cold blocks read on
demand) and must answer exactly as the live one would; a generation without
commit leaves it untouched; nothing is recomputed on resume.
"""
from __future__ import annotations

import pytest

from memsvc.cache import POLICIES
from tests.conftest import running_server

HISTORY = list(range(10, 460))  # past sink + hot + a block for the tiered default


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_survives_restart_and_answers_identically(tmp_path, tiny_model, policy):
    data = tmp_path / "data"
    with running_server(data, tiny_model) as (c, _):
        assert c.create_session("s", policy=policy).policy == policy
        c.append("s", tokens=HISTORY)
        first = c.generate_text("s", max_new_tokens=6).token_ids
        assert c.generate_text("s", max_new_tokens=6).token_ids == first  # no commit: nothing changed
        c.generate_text("s", max_new_tokens=6, commit=True)
        c.append("s", tokens=[11, 12, 13])
        live = c.generate_text("s", max_new_tokens=6).token_ids
        s = c.get_session("s")
        assert s.tokens == len(HISTORY) + 6 + 3 and s.bytes_stored > 0 and s.bytes_resident > 0
    with running_server(data, tiny_model) as (c, _):
        c.resume("s")
        assert c.stats().model_tokens_processed == 0
        assert c.generate_text("s", max_new_tokens=6).token_ids == live
        # pending last token + the 6 generated tokens but the last: no history token recomputed
        assert c.stats().model_tokens_processed == 1 + 5
