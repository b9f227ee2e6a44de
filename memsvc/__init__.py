"""memsvc: a long-term memory service for LLM agents (KV caches compressed in tiers, persisted, served over gRPC).

One import namespace: `memsvc.store` (from the checkout's store/), `memsvc.kernels` (kernels/),
`memsvc.proto` (proto/) and `memsvc.clients` (clients/). Those folders have no `__init__.py` on purpose:
a folder without one is only a namespace portion, and Python prefers an installed regular package of the
same name to it, so none of them can shadow an installed package (Hugging Face's `kernels`, which
transformers imports; proto-plus's `proto`) when the repository root is on sys.path (`python -c`,
`python -m ...`, pytest from the root).

An installed wheel has them inside memsvc/ already. In a checkout (an editable install, or running from
the root) they sit beside memsvc/, so this package's __path__ also covers the root: `memsvc.kernels` is
then found in <root>/kernels. setuptools' editable finder does not resolve folders without `__init__.py`
nested under a mapped package, which is why this is done here.
"""
from __future__ import annotations

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
    __path__.append(_root)  # noqa: F821 (a package's __path__)
