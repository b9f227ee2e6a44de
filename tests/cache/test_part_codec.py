"""Layer state parts as stored (safetensors): round trips, a shared header parsed once, bad bytes refused."""
import json

import pytest
import torch

from memsvc.cache.tiered.partcodec import decode, encode


def _part(seed: int):
    g = torch.Generator().manual_seed(seed)
    tensors = {"k": torch.randn(3, 16, 64, generator=g).half(), "pos": torch.arange(16) + seed,
               "q": torch.randint(0, 255, (16, 3, 64), generator=g, dtype=torch.uint8)}
    return tensors, {"first": "16"}, 16  # one metadata key: safetensors writes several in no fixed order


def test_parts_round_trip_and_parts_sharing_a_header_keep_their_own_data():
    a, b = _part(1), _part(2)
    ra, rb = encode(a), encode(b)
    head = lambda raw: raw[:8 + int.from_bytes(raw[:8], "little")]  # noqa: E731
    assert head(ra) == head(rb) and ra != rb  # one header (parsed once), other data
    for part, raw in ((a, ra), (b, rb), (a, ra)):  # the second decode of a's header comes from the memo
        tensors, meta, _ = decode(raw)
        assert meta == part[1]
        assert tensors.keys() == part[0].keys()
        for name, t in part[0].items():
            assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t)
    tensors, meta, _ = decode(ra)
    meta["first"] = "changed"
    tensors["pos"].add_(100)  # the caller's copies: the next decode is unaffected
    again, meta2, _ = decode(ra)
    assert meta2 == a[1] and torch.equal(again["pos"], a[0]["pos"])


def test_bad_parts_are_refused_with_value_error():
    raw = encode(_part(3))
    n = int.from_bytes(raw[:8], "little")
    with pytest.raises(ValueError, match="does not parse"):
        decode(raw[:-1])  # data one byte short
    with pytest.raises(ValueError, match="does not parse"):
        decode(raw[:8 + n - 1])  # header cut
    doc = json.loads(raw[8:8 + n])
    doc["k"]["data_offsets"][1] += 2  # offsets that do not match the shape
    head = json.dumps(doc).encode()
    with pytest.raises(ValueError, match="does not parse"):
        decode(len(head).to_bytes(8, "little") + head + raw[8 + n:])


def test_encode_writes_what_safetensors_reads_and_digests_stay_what_heads_stored():
    """Parts stored before (safetensors.torch.save) and now (memsvc's encoder) read back alike, by safetensors and
    by `decode`; and `digest` gives the bytes it gave when heads listed them (the same fields, hashed alike)."""
    import hashlib

    import safetensors.torch as st

    from memsvc.cache.tiered.partcodec import digest

    g = torch.Generator().manual_seed(4)
    tensors = {"b": torch.randn(2, 5, generator=g).bfloat16(), "live": torch.rand(3, 2, 8, generator=g) > 0.5,
               "a.0": torch.randint(0, 255, (3, 2, 7), generator=g, dtype=torch.uint8),
               "pos": torch.arange(5, dtype=torch.int32), "s": torch.randn(3, 1, generator=g).half(),
               "e": torch.empty(0, 3), "t": torch.randn(4, 6, generator=g)[:, ::2]}  # not contiguous
    for meta in ({"first_block": "32"}, {}):
        part = (tensors, meta, 5)
        raw = encode(part)
        assert int.from_bytes(raw[:8], "little") % 8 == 0
        for got in (st.load(raw), decode(raw)[0], decode(st.save({k: v.contiguous() for k, v in tensors.items()},
                                                                  metadata=meta or None))[0]):
            assert got.keys() == tensors.keys()
            for name, t in tensors.items():
                assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
        assert decode(raw)[1] == meta
        old = hashlib.blake2b(digest_size=16)  # the digest as heads written before this encoder computed it
        old.update(json.dumps(meta, sort_keys=True).encode())
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            old.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            old.update(t.reshape(-1).view(torch.uint8).cpu().numpy())
        assert digest(part) == old.digest()
    with pytest.raises(ValueError, match="dtype"):
        encode(({"c": torch.zeros(2, dtype=torch.complex64)}, {}, 0))
    with pytest.raises(ValueError, match="metadata"):
        encode(({"c": torch.zeros(2)}, {"first": 3}, 0))
