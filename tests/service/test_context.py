"""--context: the window one step attends, in place of the model's max_position_embeddings: a `full` session
holds at most that many tokens (a tiered one outgrows it: tests/service/test_unbounded.py)."""
from __future__ import annotations

import grpc
import pytest

from memsvc.server import create_server
from tests.service.servers import client, served


def test_context_bounds_sessions(tmp_path, tiny_model):
    assert tiny_model.max_positions > 300
    with served(tmp_path / "data", tiny_model, context=300) as (server, port), client(port) as c:
        assert server.manager.model.max_positions == 300
        c.create_session("s", policy="full")
        with pytest.raises(grpc.RpcError) as err:
            c.append("s", tokens=list(range(10, 311)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "300" in err.value.details()
        c.append("s", tokens=list(range(10, 290)))
    assert tiny_model.max_positions > 300  # the shared model object is left as it was
    with pytest.raises(ValueError):
        create_server("127.0.0.1:0", data_dir=tmp_path / "other", model=tiny_model, context=1)
