"""`FullCache`: every token's keys and values at the model's dtype (policy `full`), a transformers DynamicCache.

Stored form: blocks of `block_tokens` tokens per layer; a block's payload is its keys then its values,
each `[H_kv, n, D]` in the model's dtype, row-major. Only blocks touched since the last commit are
serialized again, so an Append writes its new tokens' blocks and rewrites at most one partially filled
block per layer. Loading reads every block.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from transformers import DynamicCache

from .base import Backing, Changes, KVShape
from .growing import GrowingLayer

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class FullCache(DynamicCache):
    def __init__(self, policy, shape: KVShape, backing: Backing | None = None):
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer  # layers grow in place (memsvc.cache.growing)
        self.policy = policy
        self.shape = shape
        self.block_tokens = policy.block_tokens
        self._clean = 0  # tokens already stored

    @property
    def length(self) -> int:
        return self.get_seq_length() if self.layers else 0

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: [1, H_kv, T, D]."""
        lay = self.layers[layer]
        return lay.keys, lay.values

    # ---- SessionCache ---------------------------------------------------------------------

    def attending(self):
        return contextlib.nullcontext()  # attention is SDPA over the DynamicCache's tensors

    def end_prompt(self) -> None:
        pass

    def checkpoint(self) -> int:
        return self.length

    def restore(self, n: int) -> None:
        if self.layers and self.length > n:
            self.crop(n - self.length)  # transformers 5 takes minus the tokens to drop
        self._clean = min(self._clean, n)

    def changes(self) -> Changes:
        """Blocks holding tokens added since the last commit (nothing to drop)."""
        payloads, counts = self.blocks_since(self._clean)
        return Changes(payloads, counts, [])

    def committed(self) -> None:
        self._clean = self.length

    def final_entries(self) -> Changes:
        return Changes()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def resident_bytes(self) -> int:
        return sum(lay.held_bytes() for lay in self.layers)  # the rows held and the room to grow

    def stored_bytes(self) -> int:
        return self.resident_bytes()

    def tier_tokens(self) -> dict[str, float]:
        return {"hot": float(self.length)}

    def tier_bytes(self) -> dict[str, int]:
        return {"hot": self.resident_bytes()}

    def stats(self) -> dict[str, int]:
        return {}

    def max_tokens(self) -> int | None:
        return self.shape.window or None  # it attends every token it holds, at its own position

    def layout(self) -> dict:
        s = self.shape
        return {"layers": s.layers, "kv_heads": s.kv_heads, "head_dim": s.head_dim, "dtype": dtype_name(s.dtype),
                "block_tokens": self.block_tokens}

    # ---- stored form -----------------------------------------------------------------------

    def blocks_since(self, first_token: int) -> tuple[dict[tuple[int, int], bytes], dict[tuple[int, int], int]]:
        """Payloads of every block holding a token at position >= first_token:
        ({(layer, block): payload}, {(layer, block): n_tokens})."""
        n = self.length
        payloads: dict[tuple[int, int], bytes] = {}
        counts: dict[tuple[int, int], int] = {}
        if n <= first_token:
            return payloads, counts
        b = self.block_tokens
        for layer in range(self.shape.layers):
            k, v = self.layer_kv(layer)  # [1, H, T, D]
            for idx in range(first_token // b, (n - 1) // b + 1):
                lo, hi = idx * b, min((idx + 1) * b, n)
                payloads[(layer, idx)] = _to_bytes(k[0, :, lo:hi, :]) + _to_bytes(v[0, :, lo:hi, :])
                counts[(layer, idx)] = hi - lo
        return payloads, counts

    @classmethod
    def load(cls, policy, shape: KVShape, layout: dict, n_tokens: int, backing: Backing) -> "FullCache":
        """The cache of n_tokens tokens from every stored block (layout as `layout()` wrote it)."""
        dtype = _DTYPES[layout["dtype"]]
        shape = KVShape(layout["layers"], layout["kv_heads"], layout["head_dim"], dtype, shape.device, shape.window,
                        shape.rope)
        kv = cls(_with_blocks(policy, layout["block_tokens"]), shape)
        if n_tokens == 0:
            return kv
        blocks = backing.source.read_all()
        b, h, d = kv.block_tokens, shape.kv_heads, shape.head_dim
        elem = torch.empty((), dtype=dtype).element_size()
        for layer in range(shape.layers):
            keys = torch.empty(1, h, n_tokens, d, dtype=dtype)
            values = torch.empty(1, h, n_tokens, d, dtype=dtype)
            for idx in range((n_tokens + b - 1) // b):
                lo, hi = idx * b, min((idx + 1) * b, n_tokens)
                payload = blocks.get((layer, idx))
                expected = 2 * h * (hi - lo) * d * elem
                if payload is None or len(payload) != expected:
                    raise ValueError(f"KV block (layer {layer}, block {idx}) is missing or has "
                                     f"{0 if payload is None else len(payload)} bytes, expected {expected}")
                flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype)
                half = flat.numel() // 2
                keys[0, :, lo:hi, :] = flat[:half].view(h, hi - lo, d)
                values[0, :, lo:hi, :] = flat[half:].view(h, hi - lo, d)
            kv.update(keys.to(shape.device), values.to(shape.device), layer)
        kv._clean = kv.length
        return kv

    @staticmethod
    def expected_entries(source, layout: dict, n_cached: int, damaged: dict) -> tuple[set | None, str | None]:
        """Every block of every layer up to the cached tokens."""
        b = layout.get("block_tokens") or 1
        return {(layer, i) for layer in range(layout.get("layers", 0)) for i in range((n_cached + b - 1) // b)}, None

    @staticmethod
    def same_entry(key, stored: bytes | None, rebuilt: bytes | None) -> bool:
        return stored == rebuilt

    @staticmethod
    def is_final(key) -> bool:
        return False


def _with_blocks(policy, block_tokens: int):
    """The policy with the block size its stored session was written with."""
    return policy if policy.block_tokens == block_tokens else dataclasses.replace(policy, block_tokens=block_tokens)


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
