"""`GrowingLayer`: a DynamicCache layer whose keys and values grow in place, in buffers with room.

transformers' DynamicLayer concatenates the whole layer with each call's new rows, so a decode step copies
every token the session holds (at 8k on SmolLM2, 6 MiB per layer per step). Here keys and values are views
[B, H, T, D] of buffers [B, H, capacity, D]: new rows are written after the last, and a buffer is replaced by
a larger one (every row copied) only when full, with room for 1/`ROOM` more rows than it then holds (at
least `MIN_ROOM`): a step copies 1/ROOM of what concatenating would, and the room stays under 1% of the rows. A crop keeps the buffer
(the view gets shorter; the next rows overwrite the cropped ones). The values seen are the same as
DynamicLayer's, bit for bit.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

ROOM = 128  # a buffer that grows gets room for 1/ROOM more rows than it then holds ...
MIN_ROOM = 8  # ... and at least this many


class GrowingLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf = self._vbuf = None

    def _grown(self, buf: torch.Tensor | None, held: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """held [B, H, n, D] (a view of buf, or a tensor set from outside) plus new [B, H, a, D] -> the view of a
        buffer holding both."""
        n, a = held.shape[-2] if held.numel() else 0, new.shape[-2]
        if buf is None or held.numel() and held.data_ptr() != buf.data_ptr() or buf.shape[-2] < n + a \
                or buf.shape[:2] != new.shape[:2] or buf.dtype != new.dtype:
            rows = n + a + max(MIN_ROOM, (n + a) // ROOM)
            grown = torch.empty(*new.shape[:2], rows, new.shape[-1], dtype=new.dtype, device=new.device)
            if n:
                grown[..., :n, :] = held
            buf = grown
        buf[..., n:n + a, :] = new
        return buf

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.get_seq_length() + key_states.shape[-2]
        self._kbuf = self._grown(self._kbuf, self.keys, key_states)
        self._vbuf = self._grown(self._vbuf, self.values, value_states)
        self.keys, self.values = self._kbuf[..., :n, :], self._vbuf[..., :n, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()

    def held_bytes(self) -> int:
        """What the buffers take (the rows held and the room after them)."""
        return sum(b.numel() * b.element_size() for b in (getattr(self, "_kbuf", None), getattr(self, "_vbuf", None))
                   if b is not None)
