"""store_factory: the contract tests run once per backend in tests/store/backends.py."""
from __future__ import annotations

import pytest

from tests.store.backends import BACKENDS, StoreFactory


@pytest.fixture(params=BACKENDS, ids=lambda backend: backend.name)
def store_factory(request, tmp_path):
    factory = StoreFactory(request.param.ready(request), tmp_path)
    yield factory
    factory.close_all()
