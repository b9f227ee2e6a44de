"""Positions inside the model's window, whatever the session's length (a mixin of `TierLayer`).

Every key is stored at its true position (the model's RoPE rotated it there), and a query at position t meets
a key at p at distance t - p. A model is trained on distances below its window, so once a session outgrows it
(`moving` layers: a model whose RoPE can be moved), every token within `near` positions of the chunk's last
query keeps its distance and every other one is attended at distance `far` (InfLLM's scheme: memory beyond
the local window sits at one distance), with the tokens of a cold block kept in their order inside it. A
layer whose session stays within `near` positions attends exactly as it did before this existed, bit for bit.

- exact tiers (sinks, warm rows): a far one is moved back to position 0 and met by the query moved to `far`
  (`far_exact_logits`);
- cold blocks: the first `far_blocks()` are far: their keys are moved (`far_keys`) and met by the query moved
  to `far`; their Quest bounds are taken on the stored boxes with that query moved forward by each block's
  start (`far_bounds`), which is the bound of the block's keys moved to 0..B-1; near blocks are untouched.
  Where the retrieved far blocks' keys go is the plan's `far_layout`: "shared" (the default) moves every
  block's keys to 0..B-1, so all far blocks share the distances far - (B-1) .. far; "point" moves every far
  key to 0 (distance `far`, InfLLM's scheme); "ordered" lays the retrieved far blocks end to end in their
  order, the newest at distances near .. near + B-1, the next one B farther, ..., so far - near positions
  hold (far - near) // B slots; blocks beyond the last slot (the oldest) share it. Retrieval scores far
  blocks as "shared" places them in every layout, and the mean pseudo-token of a block left out (`rest`)
  sits at the block's position 0.
"""
from __future__ import annotations

import torch

_BOUND_ELEMENTS = 1 << 22  # per-block moved queries in slices of at most this many elements


class Positions:
    def _rope(self):
        """The model's RoPE, which moving tokens to other positions needs."""
        if self.rope is None:
            raise ValueError("attending beyond the model's window needs its RoPE, which this model does not have "
                             "(or cannot move)")
        if self.plan.far_layout == "ordered":
            if not 0 < self.near <= self.far - self.plan.block:
                raise ValueError(f"the ordered far layout needs 0 < near ({self.near}) and a block "
                                 f"({self.plan.block}) of positions below far ({self.far})")
        elif not 0 < self.far < self.near:
            raise ValueError(f"moving positions needs 0 < far ({self.far}) < near ({self.near}) positions: give "
                             f"the model's window or the plan's near and far")
        return self.rope

    def _key_rope(self):
        if self.rope is None:
            raise ValueError("cold keys stored before RoPE (pre_rope_keys) need the model's RoPE, which this model "
                             "does not have (or cannot move): use pre_rope_keys=False")
        return self.rope

    def key_to_store(self, k: torch.Tensor, start: int) -> torch.Tensor:
        """Keys [H, B, D] of the cold block starting at position `start` -> as the block stores them: rotated
        back to position 0 with pre_rope_keys (a new tensor), else k itself."""
        if not self.plan.pre_rope_keys:
            return k
        pos = torch.arange(start, start + k.shape[1], device=k.device)
        return self._key_rope().rotate(k, -pos)  # in fp32, back in k's dtype

    def keys_read(self, k: torch.Tensor, blocks: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Decoded keys [H, U*B, D] (fp32) of cold blocks `blocks` -> at their own positions, in `dtype`."""
        if self.plan.pre_rope_keys:
            B = self.plan.block
            start = self.block_start(torch.tensor(blocks, dtype=torch.long, device=k.device))  # [U]
            pos = (start.unsqueeze(1) + torch.arange(B, device=k.device)).flatten()  # [U*B]
            k = self._key_rope().rotate(k, pos)
        return k if k.dtype == dtype else k.to(dtype)

    def far_blocks(self, last: int) -> int:
        """How many cold blocks (the oldest) are farther than `near` from position `last`: 0 without moving."""
        if not self.moving:
            return 0
        p, B = self.plan, self.plan.block
        reach = last - self.near - p.sink  # blocks starting at or before this are far
        return 0 if reach < 0 else min(self.n_blocks, reach // B + 1)

    def block_start(self, blocks: torch.Tensor) -> torch.Tensor:
        """The first position of each cold block [U]."""
        return self.plan.sink + blocks * self.plan.block

    def far_query(self, q: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        """q [H, G, n, D] of queries at qpos [n] -> the queries moved to position `far`."""
        return self._rope().rotate(q, self.far - qpos)

    def far_exact(self, positions: torch.Tensor, last: int) -> torch.Tensor | None:
        """positions [H, Te] of the exact tiers -> which are farther than `near` from `last`; None if none."""
        if not self.moving:
            return None
        far = (last - positions) >= self.near
        return far if bool(far.any()) else None

    def far_exact_logits(self, q_far: torch.Tensor, k_ex: torch.Tensor, positions: torch.Tensor,
                         scaling: float) -> torch.Tensor:
        """Logits [H, G*n, Te] of the exact tokens moved to position 0 (their distance to q_far [H, G, n, D] is
        then `far`). k_ex [H, Te, D] at positions [H, Te]."""
        H, G, n, D = q_far.shape
        k0 = self._rope().rotate(k_ex, -positions)
        return torch.bmm(q_far.reshape(H, G * n, D), k0.transpose(1, 2)).mul_(scaling)

    def far_keys(self, k: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Keys [H, U*B, D] of far blocks [U] (ascending), stored at their positions -> moved where the plan's
        far layout puts them for the query at `far` (a new tensor)."""
        if not blocks.numel():
            return k
        B = self.plan.block
        start = self.block_start(blocks)  # [U]
        layout = self.plan.far_layout
        if layout == "point":  # every key to 0
            delta = -(start.unsqueeze(1) + torch.arange(B, device=start.device)).flatten()
        elif layout == "ordered":  # slot r (0: the newest) starts at far - near - (r + 1) * B + 1
            slots = (self.far - self.near) // B
            r = (blocks.numel() - 1 - torch.arange(blocks.numel(), device=start.device)).clamp(max=slots - 1)
            delta = (self.far - self.near - (r + 1) * B + 1 - start).repeat_interleave(B)
        else:  # "shared": each block to 0..B-1
            delta = -start.repeat_interleave(B)
        return self._rope().rotate(k, delta)  # [U*B] per column

    def far_bounds(self, q_far: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        """Quest bounds [H, n, nf] of the far blocks 0..nf-1 (boxes mn, mx [nf, H, D] of their stored keys) for
        the queries q_far [H, G, n, D] moved to `far`: the block's keys moved to 0..B-1 meet q_far as its stored
        keys meet q_far moved forward by the block's start, so each block's bound is of that query.

        A chunk of n > 1 queries takes them for `reps` of its queries, evenly spaced and ending at its last (a
        chunk attends the union of its queries' blocks anyway), so the cost stays n-independent per block."""
        H, G, n, D = q_far.shape
        nf = mn.shape[0]
        reps = n if n == 1 else min(n, max(self.plan.union_floor, -(-n // self.plan.block)))
        at = torch.linspace(n - 1, 0, reps, device=q_far.device).round().long().flip(0)  # [reps], ends at n-1
        q = q_far[:, :, at]  # [H, G, reps, D]
        step = max(1, _BOUND_ELEMENTS // (H * G * reps * D))
        out = []
        for lo in range(0, nf, step):
            hi = min(nf, lo + step)
            start = self.block_start(torch.arange(lo, hi, device=q.device))
            qb = self._rope().rotate(q.unsqueeze(3).expand(H, G, reps, hi - lo, D), start)  # [H, G, reps, b, D]
            out.append(torch.einsum("hgnbd,bhd->hnb", qb.clamp(min=0), mx[lo:hi])
                       + torch.einsum("hgnbd,bhd->hnb", qb.clamp(max=0), mn[lo:hi]))
        ub = torch.cat(out, -1) if out else q.new_zeros(H, reps, 0)  # [H, reps, nf]
        if reps == n:
            return ub
        owner = (torch.arange(n, device=q.device) * reps) // n  # each query takes the bound of its representative
        return ub[:, owner]

    def far_means(self, mean_k: torch.Tensor) -> torch.Tensor:
        """Mean keys [nf, H, D] of the far blocks 0..nf-1 -> [H, nf, D], moved to the block's position 0 (the
        mean of the moved keys, rotation being linear)."""
        mk = mean_k.permute(1, 0, 2)
        if not mk.shape[1]:
            return mk
        return self._rope().rotate(mk, -self.block_start(torch.arange(mk.shape[1], device=mk.device)))
