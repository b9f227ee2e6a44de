"""A session's KV cache in memory, and its fixed-size token blocks for storage.

`SessionKV` wraps a transformers `DynamicCache` (what the model reads and
extends) and cuts it into blocks of `block_tokens` tokens per layer for the
store: a block's payload is its keys then its values, each `[H_kv, n, D]` in
the model's dtype, row-major. Only blocks touched since a given token are
re-serialized, so an Append writes its new tokens' blocks and rewrites at most
one partially filled block per layer.

Knows tensors and the transformers Cache API; knows nothing about LMDB.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SessionKV:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, block_tokens: int):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.block_tokens = block_tokens
        self.cache = DynamicCache()
        self._clean = 0  # tokens already in the store

    @property
    def length(self) -> int:
        return self.cache.get_seq_length() if self.cache.layers else 0

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: [1, H_kv, T, D]."""
        lay = self.cache.layers[layer]
        return lay.keys, lay.values

    def crop(self, n: int) -> None:
        """Forget every token from position n on (used to undo an uncommitted step)."""
        if self.cache.layers and self.length > n:
            self.cache.crop(n - self.length)  # transformers 5 takes minus the tokens to drop

    # ---- the surface the session manager uses (shared with memsvc.cache.session.TierKV) ----

    def forward_context(self):
        return contextlib.nullcontext()

    def checkpoint(self) -> int:
        return self.length

    def restore(self, n: int) -> None:
        self.crop(n)
        self._clean = min(self._clean, n)

    def end_prompt(self) -> None:
        pass

    def dirty_blocks(self) -> tuple[dict[tuple[int, int], bytes], dict[tuple[int, int], int], list]:
        """Blocks holding tokens added since the last commit (and nothing to drop)."""
        return (*self.blocks_since(self._clean), [])

    def mark_clean(self) -> None:
        self._clean = self.length

    def tier_tokens(self) -> dict[str, float]:
        return {"hot": float(self.length)}

    def tier_bytes(self) -> dict[str, int]:
        return {"hot": self.resident_bytes()}

    def resident_bytes(self) -> int:
        if not self.cache.layers:
            return 0
        total = 0
        for lay in self.cache.layers:
            if getattr(lay, "keys", None) is not None and lay.keys.numel():
                total += lay.keys.numel() * lay.keys.element_size() + lay.values.numel() * lay.values.element_size()
        return total

    def blocks_since(self, first_token: int) -> tuple[dict[tuple[int, int], bytes], dict[tuple[int, int], int]]:
        """Payloads of every block holding a token at position >= first_token.

        Returns ({(layer, block): payload}, {(layer, block): n_tokens}).
        """
        n = self.length
        payloads: dict[tuple[int, int], bytes] = {}
        counts: dict[tuple[int, int], int] = {}
        if n <= first_token:
            return payloads, counts
        b = self.block_tokens
        first_block = first_token // b
        last_block = (n - 1) // b
        for layer in range(self.num_layers):
            k, v = self.layer_kv(layer)  # [1, H, T, D]
            for idx in range(first_block, last_block + 1):
                lo, hi = idx * b, min((idx + 1) * b, n)
                kb = k[0, :, lo:hi, :].contiguous()  # [H, n, D]
                vb = v[0, :, lo:hi, :].contiguous()
                payloads[(layer, idx)] = _to_bytes(kb) + _to_bytes(vb)
                counts[(layer, idx)] = hi - lo
        return payloads, counts

    @classmethod
    def from_blocks(cls, blocks: dict[tuple[int, int], bytes], n_tokens: int, layout: dict,
                    device: torch.device) -> "SessionKV":
        """Rebuild the cache from stored block payloads (layout as written by `layout()`)."""
        dtype = _DTYPES[layout["dtype"]]
        kv = cls(layout["layers"], layout["kv_heads"], layout["head_dim"], dtype, device, layout["block_tokens"])
        if n_tokens == 0:
            return kv
        b, h, d = kv.block_tokens, kv.num_kv_heads, kv.head_dim
        n_blocks = (n_tokens + b - 1) // b
        elem = torch.empty((), dtype=dtype).element_size()
        for layer in range(kv.num_layers):
            keys = torch.empty(1, h, n_tokens, d, dtype=dtype)
            values = torch.empty(1, h, n_tokens, d, dtype=dtype)
            for idx in range(n_blocks):
                lo, hi = idx * b, min((idx + 1) * b, n_tokens)
                payload = blocks.get((layer, idx))
                expected = 2 * h * (hi - lo) * d * elem
                if payload is None or len(payload) != expected:
                    raise ValueError(
                        f"KV block (layer {layer}, block {idx}) is missing or has {0 if payload is None else len(payload)} "
                        f"bytes, expected {expected}"
                    )
                flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype)
                half = flat.numel() // 2
                keys[0, :, lo:hi, :] = flat[:half].view(h, hi - lo, d)
                values[0, :, lo:hi, :] = flat[half:].view(h, hi - lo, d)
            kv.cache.update(keys.to(device), values.to(device), layer)
        kv._clean = kv.length
        return kv

    def layout(self) -> dict:
        return {
            "layers": self.num_layers,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": dtype_name(self.dtype),
            "block_tokens": self.block_tokens,
        }

    def copy(self) -> "SessionKV":
        twin = SessionKV(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device, self.block_tokens)
        for layer in range(self.num_layers if self.length else 0):
            k, v = self.layer_kv(layer)
            twin.cache.update(k.clone(), v.clone(), layer)
        return twin


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
