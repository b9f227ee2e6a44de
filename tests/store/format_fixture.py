"""A fixed sequence of store operations with fixed bytes: what the store in
tests/store/fixtures/format2-0268ddf holds.

That store was written by the LMDB store as it was at commit 0268ddf (before the Store interface),
from the repository root of that commit:
    PYTHONPATH=<checkout of 0268ddf> python tests/store/format_fixture.py tests/store/fixtures/format2-0268ddf
(only data.mdb is kept). test_lmdb_format.py reads it with today's code and runs the same sequence
again to compare. Only calls that code had are used, and the script imports nothing of tests/.
"""
from __future__ import annotations

import random
import sys

from memsvc.store.records import SessionRecord


def rec(sid: str, **kw) -> SessionRecord:
    kw.setdefault("created", 1000.0)
    kw.setdefault("updated", 1000.0)
    return SessionRecord(id=sid, model_name="m", model_fingerprint="f" * 64, policy="tiered", **kw)


def build(store_cls, path):
    """The sequence, on a new store_cls(path, token_block=16); returns the open store."""
    rnd = random.Random(7)

    def b(n: int) -> bytes:
        return bytes(rnd.getrandbits(8) for _ in range(n))

    s = store_cls(path, token_block=16)
    s.create(rec("a", labels={"team": "x"}))
    s.create(rec("b", ttl=30))
    s.create(rec("c"))
    n = 0
    for i, count in enumerate([5, 11, 1, 40, 0, 17]):
        blocks = {(0, i): b(300 + i), (1, 0): b(200), (2, 0xFFFFFFFF): b"s" * (100 + i)}
        s.commit(rec("a", labels={"team": "x"}, messages=[{"role": "user", "content": str(i)}], updated=1000.0 + i),
                 first_token=n, tokens=[(n + j) * 7919 % 49152 - 5 * (j % 3 == 0) for j in range(count)],
                 blocks=blocks, block_tokens={(0, i): 16})
        n += count
    s.commit(rec("b", ttl=30), first_token=0, tokens=list(range(33)), blocks={(0, 0): b"b" * 500, (0, 1): b(64)})
    s.fork("a", rec("a2", labels={"fork": "1"}))
    s.fork("a", rec("a3"))
    s.commit(rec("a2", labels={"fork": "1"}), first_token=n, tokens=[1, 2, 3], blocks={(1, 0): b(150), (5, 5): b(77)},
             drop=[(0, 0), (0, 1), (9, 9)])
    s.commit(rec("a"), first_token=n, tokens=[9], blocks={}, drop=[(0, 2)])
    s.rewrite_kv("a3", n_tokens=n, blocks={(0, 3): b"R" * 333}, drop=[(0, 4)], block_tokens={(0, 3): 2},
                 extra={"repair": {"count": 1}})
    s.import_session(s.export("b"), new_id="b2")
    s.fork("b", rec("b3"))
    s.delete("b")
    s.delete("c")
    s.delete("a3", expired_at=1e12)  # no ttl: not expired, stays
    s.create(rec("d", ttl=5, updated=10.0))
    s.commit(rec("d", ttl=5, updated=10.0), first_token=0, tokens=[4] * 20, blocks={(3, 3): b(999)})
    s.delete("d", expired_at=100.0)
    s.gc()
    return s


if __name__ == "__main__":
    from memsvc.store.lmdb_store import Store  # the one name both the old and today's code have

    build(Store, sys.argv[1]).close()
