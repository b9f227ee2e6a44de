"""What each row of the peers run is: memsvc's tiered settings and the peers' table.

A memsvc row is a policy name, or a tiered setting ('tiered-NAME': `tiered` built with other TieredPolicy
fields). A peer row is a name in PEERS: the worker method it runs (benchmarks/peers/worker.py), its
parameters and its protocol ("prompt": the whole prompt through the cache; "pipeline": the context
compressed before the question is read, as kvpress's pipeline reads it). kvpress presses get one row per
compression ratio (budgets.py matches those to memsvc's bytes).
"""
from __future__ import annotations

MEMSVC_POLICIES = "full,tiered,turbo3,kivi2"
# name -> (worker method, params, protocol); kvpress ones also take a compression ratio per setting
PEERS = {
    "hf-full": ("full", {}, "prompt"),
    "snapkv": ("kvpress", {"press": "SnapKVPress"}, "prompt"),
    "streamingllm": ("kvpress", {"press": "StreamingLLMPress"}, "prompt"),
    "expected-attn": ("kvpress", {"press": "ExpectedAttentionPress"}, "prompt"),
    "knorm": ("kvpress", {"press": "KnormPress"}, "prompt"),
    "quanto4": ("quanto", {"nbits": 4, "residual_length": 128, "q_group_size": 64}, "prompt"),
    "quanto2": ("quanto", {"nbits": 2, "residual_length": 128, "q_group_size": 64}, "prompt"),
    "quanto4-pipeline": ("quanto", {"nbits": 4, "residual_length": 128, "q_group_size": 64}, "pipeline"),
    # QuantizedCache backend "hqq", axis 0 (axis 1 fails in hqq's bit packing on most lengths; see worker.py)
    "hqq4": ("hqq", {"nbits": 4, "residual_length": 128, "q_group_size": 64, "axis_key": 0, "axis_value": 0}, "prompt"),
    "hqq3": ("hqq", {"nbits": 3, "residual_length": 128, "q_group_size": 64, "axis_key": 0, "axis_value": 0}, "prompt"),
    "hqq2": ("hqq", {"nbits": 2, "residual_length": 128, "q_group_size": 64, "axis_key": 0, "axis_value": 0}, "prompt"),
    # kvpress's own protocol (context compressed before the question is read); not in the default run
    "snapkv-pipeline": ("kvpress", {"press": "SnapKVPress"}, "pipeline"),
}
DEFAULT_PEERS = ",".join(p for p in PEERS if p != "snapkv-pipeline")
# extra memsvc rows: tiered with smaller exact windows (its bytes at 1k-4k are mostly the hot and warm windows),
# and h128r3kv8: 8-bit cold values (not resident: they cost stored bytes) with a 3,072-token retrieve budget
DEFAULT_TIERED_SETTINGS = ("h64:hot=64,warm=64;h128:hot=128,warm=128;h16:hot=16,warm=16;"
                           "h128r3kv8:hot=128,warm=128,retrieve=3072,value_codec=k8v8_v")


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_tiered_settings(spec: str, base: str = "tiered") -> dict:
    """'h64:hot=64,warm=64;h128:hot=128' -> {'tiered-h64': ('tiered', {'hot': 64, 'warm': 64}), ...}.

    Each setting is one more memsvc row (and one point on the plots): `base` built with those
    TieredPolicy fields (PolicyRun(loaded, base, **overrides)); the fields are checked here."""
    from memsvc.cache.policies import get_policy
    out: dict = {}
    for part in (x.strip() for x in spec.split(";")):
        if not part:
            continue
        name, _, body = part.partition(":")
        name = name.strip()
        if not name or not body.strip():
            raise ValueError(f"tiered setting {part!r}: want NAME:field=value,...")
        over = {}
        for kv in (x.strip() for x in body.split(",")):
            k, eq, v = kv.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"tiered setting {part!r}: {kv!r} is not field=value")
            over[k.strip()] = _value(v.strip())
        get_policy(base, **over)  # ValueError on an unknown field or a bad value
        label = f"{base}-{name}"
        if label in out:
            raise ValueError(f"tiered setting {label!r} given twice")
        out[label] = (base, over)
    return out


def peer_settings(peers: list[str], ratios: list[str]) -> list[tuple[str, str, object]]:
    """(label, peer, ratio or None): kvpress presses once per ratio (a memsvc row's name = matched to it), others once."""
    out = []
    for p in peers:
        if p not in PEERS:
            raise ValueError(f"unknown peer {p!r}; known: {', '.join(PEERS)}")
        if PEERS[p][0] == "kvpress":
            out += [(f"{p}@{r}", p, r) for r in ratios]
        else:
            out.append((p, p, None))
    return out
