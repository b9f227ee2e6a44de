"""Attention over a tiered layer: exact tiers, the cold blocks retrieval picks, one mean token per other block.

`Attend` is a mixin of `TierLayer` (memsvc.cache.tiered.layer holds the state it reads). `attend(query)`
computes one softmax over the sink, warm and hot tokens (exact or 8-bit), the cold blocks each query
retrieves by its Quest bound over the block summaries (decoded by the codec kernels; the blocks the layer's
recent reads decoded are held and reused) and, for `rest="mean"`, one pseudo-token per left-out block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memsvc.errors import FailedPrecondition

from .memo import derived
from .rows import _capped, _dq8

# cold q.k and p.v operands of few-bit codes: bf16 where oneDNN has bf16 dot products (AVX512-BF16, AMX), else
# fp32 (emulated bf16 is slower). Rounding an operand to bf16 (at most 2^-9 relative) is far below a code's step.
def _cpu_has_bf16_dot() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


_LOW_DTYPE = torch.bfloat16 if _cpu_has_bf16_dot() else torch.float32
KEY_BF16_BITS = 6  # keys of at most 6 bits (a step of 1/63 of the row's range): q.k in bf16
VALUE_BF16_BITS = 4  # values of at most 4 bits: p.v in bf16; 8-bit values and keys keep fp32
HELD_ROOM = 2  # a layer's decoded blocks of keys (or values) are held in room for this many times a read's blocks
HELD_SPARE = 4  # ... and for at most this many blocks more than the layer has (the blocks that go cold next)


class CodecMismatch(FailedPrecondition):
    """A stored cold block holds another codec's codes than the layer's policy decodes: the session was stored
    with other policy settings than it is read with (a record from before records kept them, read after a
    default changed). FAILED_PRECONDITION: the caller's request is not at fault."""


def _softmax_parts(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Softmax over the last dim of the parts laid end to end, computed in place in each part (no concatenated
    copy of the logits). parts: [..., T_i] float with the same leading dims; a row must have one finite entry."""
    m = torch.stack([x.amax(dim=-1) for x in parts]).amax(dim=0).unsqueeze(-1)  # [..., 1]
    total = None
    for x in parts:
        s = x.sub_(m).exp_().sum(dim=-1, keepdim=True)
        total = s if total is None else total.add_(s)
    inv = total.reciprocal_()
    return [x.mul_(inv) for x in parts]


class Attend:
    # ---- attention ---------------------------------------------------------------------

    def attend(self, query: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
        """query [1, Hq, n, D] (the last n tokens of hot are its own) -> output [1, n, Hq, Dv].
        softcap: every logit becomes softcap * tanh(logit / softcap) before the mask (Gemma-2)."""
        p = self.plan
        _, Hq, n, D = query.shape
        H = self.H
        if Hq % H:
            raise ValueError(f"{Hq} query heads do not group over {H} KV heads")
        G = Hq // H
        qpos = torch.arange(self.seen - n, self.seen, device=self.device)  # [n]
        self.stats["attend_calls"] += 1

        # exact tiers: sink, kept, hot (hot is causal by position)
        k_pre, v_pre = self._exact_prefix()  # [H, s + m, D]: sink and kept rows in fp32
        k_ex = torch.cat([k_pre, self.hot_k.float()], 1)  # [H, Te, D]
        v_ex = torch.cat([v_pre, self.hot_v.float()], 1)
        n_sink, n_keep = self.sink_k.shape[1], self._keep_len()
        te = k_ex.shape[1]
        # a single query is the last token: it sees every hot one (positions below seen)
        hot_ok = None if n == 1 else self.hot_pos.unsqueeze(0) <= qpos.unsqueeze(1)  # [n, h]
        hot_all = hot_ok is None or bool(hot_ok.all())
        last = self.seen - 1
        pos_ex = torch.cat([torch.arange(n_sink, device=self.device).expand(H, n_sink), self.keep_pos,
                            self.hot_pos.expand(H, -1)], 1) if self.moving else None  # [H, Te]
        far_ex = None if pos_ex is None else self.far_exact(pos_ex, last)  # [H, Te] or None
        q_far = self.far_query(query[0].float().view(H, G, n, D), qpos) \
            if self.moving and (far_ex is not None or self.far_blocks(last)) else None  # [H, G, n, D]
        if not self.n_blocks and p.keep_by != "attention" and softcap is None and far_ex is None:  # SDPA
            self._remember_queries(query)
            mask = None
            if not hot_all:
                mask = torch.ones(n, te, dtype=torch.bool, device=self.device)
                mask[:, n_sink + n_keep:] = hot_ok
            out = F.scaled_dot_product_attention(query.float(), k_ex.unsqueeze(0), v_ex.unsqueeze(0), attn_mask=mask,
                                                 scale=scaling, enable_gqa=True)  # [1, Hq, n, Dv]
            self._note_distance(last, pos_ex, None, None)
            return out.transpose(1, 2).to(query.dtype)
        q = query[0].float().reshape(H, G * n, D)  # rows (g, i)
        logits = torch.bmm(q, k_ex.transpose(1, 2)).mul_(scaling)  # [H, G*n, Te]
        if far_ex is not None:  # exact tokens beyond `near`: met at distance `far`
            far = self.far_exact_logits(q_far, k_ex, pos_ex, scaling)
            logits = torch.where(far_ex.unsqueeze(1), far, logits)
        logits = _capped(logits, softcap).view(H, G, n, te)
        if not hot_all:
            logits[..., n_sink + n_keep:].masked_fill_(~hot_ok, float("-inf"))
        parts = [logits]  # [H, G, n, *] each: exact tiers, then cold tokens, then left-out blocks

        # cold tier: the blocks retrieval picks for each query (all of them without retrieval)
        cold = None
        if self.n_blocks:
            nf = self.far_blocks(last)  # the oldest nf blocks are far: met by q_far, the others by q
            ids, k_cold, visible, chosen = self._cold_keys(q.view(H, G, n, D), q_far, nf)
            uf = int((ids < nf).sum()) * p.block  # far columns first (ids ascend)
            bias = None if visible is None else \
                torch.zeros(visible.shape, dtype=k_cold.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
            lc = [self._cold_logits(q_far.reshape(H, G * n, D), self.far_keys(k_cold[:, :uf], ids[:uf // p.block]),
                                    bias, scaling, softcap, 0)] if uf else []
            if uf < k_cold.shape[1]:
                lc.append(self._cold_logits(q, k_cold[:, uf:], bias, scaling, softcap, uf))
            lc = (lc[0] if len(lc) == 1 else torch.cat(lc, -1)).view(H, G, n, -1)  # [H, G, n, U*B]
            del k_cold, bias
            parts.append(lc)
            cold = ids
            if chosen is not None and p.rest == "mean":
                # blocks retrieval left out still count: one pseudo-token each, the block's mean key and
                # value weighted by its live tokens (exp(q·mean k) <= mean exp(q·k), so mass is never overstated)
                mean_k = derived(self, "mean_k", (self.sum_mean_k,), lambda: _dq8(self.sum_mean_k))  # [nb, H, D]
                lr = torch.bmm(q, mean_k[nf:].permute(1, 2, 0))
                if nf:
                    lr = torch.cat([torch.bmm(q_far.reshape(H, G * n, D), self.far_means(mean_k[:nf]).transpose(1, 2)),
                                    lr], -1)
                lr = _capped(lr.mul_(scaling), softcap).view(H, G, n, -1)
                log_count, empty = derived(self, "live_count", (self.live,), self._live_count)
                lr = lr + log_count
                lr.masked_fill_((chosen | empty).unsqueeze(1), float("-inf"))
                parts.append(lr)

        self._note_distance(last, pos_ex, far_ex, cold)
        probs = _softmax_parts(parts)  # in place: each part's share of one softmax over all of them
        out = torch.bmm(probs[0].view(H, G * n, te), v_ex)  # [H, G*n, Dv]
        if cold is not None:
            out = out + self._cold_values(cold, probs[1])
        if len(probs) == 3:
            mean_v = derived(self, "mean_v", (self.sum_mean_v,), lambda: _dq8(self.sum_mean_v))  # [nb, H, Dv]
            out = out + torch.bmm(probs[2].view(H, G * n, -1), mean_v.transpose(0, 1))
        probs = probs[0]

        if p.keep_by == "attention":  # H2O-style cumulative attention of exact tokens
            got = probs.sum(dim=(1, 2))  # [H, Te]
            self.keep_score = self.keep_score + got[:, n_sink:n_sink + n_keep]
            self.hot_score = self.hot_score + got[:, n_sink + n_keep:]
        self._remember_queries(query)
        out = out.view(Hq, n, -1).transpose(0, 1).unsqueeze(0)  # [1, n, Hq, Dv]
        return out.to(query.dtype)

    def _exact_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sink and kept rows' keys and values in fp32, [H, s + m, D] each (they change only when tokens
        move between tiers)."""
        def make():
            return (torch.cat([self.sink_k.float(), self._keep_float(self.keep_k)], 1),
                    torch.cat([self.sink_v.float(), self._keep_float(self.keep_v)], 1))
        return derived(self, "exact_prefix", (self.sink_k, self.keep_k, self.sink_v, self.keep_v), make)

    def _live_count(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log of each block's live tokens per head (at least 1) [H, 1, 1, nb], and the empty blocks [H, 1, nb]."""
        H = self.H
        count = self.live.sum(-1).T.float()  # [H, nb]
        return count.clamp(min=1).log().view(H, 1, 1, -1), (count == 0).unsqueeze(1)

    def _note_distance(self, last: int, pos_ex, far_ex, cold) -> None:
        """stats["max_distance"]: the farthest distance any query of this call attended at."""
        if pos_ex is None:  # every token at its own position: the oldest one attended
            far = last
        else:
            d = (last - pos_ex).masked_fill(far_ex, self.far) if far_ex is not None else last - pos_ex
            far = int(d.max())
            if cold is not None and cold.numel():
                nf = self.far_blocks(last)
                near = cold[cold >= nf]
                far = max(far, self.far if int((cold < nf).sum()) else 0,
                          last - int(self.block_start(near.min())) if near.numel() else 0)
        self.stats["max_distance"] = max(self.stats["max_distance"], far)

    def _cold_logits(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scaling: float,
                     softcap: float | None, at: int) -> torch.Tensor:
        """q [H, G*n, D] . k [H, C, D] -> logits [H, G*n, C] of cold columns at.. (bias [H, 1, U*B]: -inf for
        tokens no query sees)."""
        kt = k.transpose(1, 2)  # [H, D, C]
        if bias is not None:
            bias = bias[..., at:at + k.shape[1]]  # [H, 1, C]: the same for every query of a chunk
        # tokens a query does not see get -inf through the GEMM's bias input (one pass less than a fill)
        gemm_bias = bias if softcap is None else None  # a soft cap goes on the logits, the mask after it
        if k.dtype == torch.float32:
            lc = torch.bmm(q, kt).mul_(scaling) if gemm_bias is None else torch.baddbmm(gemm_bias, q, kt, alpha=scaling)
        else:  # bf16 operands, fp32 accumulation, the logits rounded to bf16 once (2^-9 relative)
            qs = (q * scaling).to(k.dtype)
            lc = (torch.bmm(qs, kt) if gemm_bias is None else torch.baddbmm(gemm_bias, qs, kt)).float()
        if softcap is not None:
            lc = _capped(lc, softcap) if bias is None else _capped(lc, softcap).add_(bias)
        return lc

    def _remember_queries(self, query: torch.Tensor) -> None:
        """SnapKV-style policies keep the last `window` queries [Hq, w, D] for end_prompt."""
        p = self.plan
        if p.keep_by != "window":
            return
        fresh = query[0, :, -p.window:].float()
        if self.q_window is not None and fresh.shape[1] < p.window:
            fresh = torch.cat([self.q_window, fresh], 1)[:, -p.window:]
        self.q_window = fresh

    def _decode(self, codec, packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U blocks stacked in one Packed [U, H, B, D] -> [H, U*B, D] in `dtype`, one decode call. ValueError for
        blocks another codec wrote (a stored session names its policy, not the policy's codecs: a policy changed
        since would otherwise misread them)."""
        if packed.codec != codec.name:
            raise CodecMismatch(f"cold block of layer {self.layer_idx} holds {packed.codec!r} codes; the policy "
                                f"decodes {codec.name!r} here")
        x = codec.decode(packed)  # [U, H, B, D]
        U, H, B, D = x.shape
        out = torch.empty(H, U, B, D, dtype=dtype, device=x.device)
        out.copy_(x.permute(1, 0, 2, 3))  # one pass: head-major and in the wanted dtype
        return out.view(H, U * B, D)

    def _cold_tensor(self, half: int, ids: list[int], codec, dtype: torch.dtype) -> torch.Tensor:
        """Blocks `ids` of this layer's keys (half 0) or values (half 1), decoded: [H, U*B, D] in `dtype`.

        The layer's decoded blocks of that half (the cold store's decoded cache: what its recent reads decoded,
        in room for HELD_ROOM times a read's blocks) give the blocks they hold; only the others are read and
        decoded, and join them while there is room (else the held blocks start over from this read's). So a
        decode step whose retrieval picks blocks it picked a few steps before decodes none. Callers only read
        the result."""
        H, B, U = self.H, self.plan.block, len(ids)
        slab = self.cold.last_decoded(self.layer_idx, half)  # (held blocks, [H, room, B, D])
        held, data = ((), None) if slab is None or slab[1].dtype != dtype else slab
        if list(held) == ids:  # exactly the blocks held, in order (every block, without retrieval)
            self.stats["cold_blocks_reused"] += U
            return data[:, :U].reshape(H, U * B, -1)
        at = {b: j for j, b in enumerate(held)}
        missing = [b for b in ids if b not in at]
        self.stats["cold_blocks_reused"] += U - len(missing)
        x = None
        if missing:
            packed = self.cold.get_stacked(self.layer_idx, missing, half)
            if half == 0 and self.plan.pre_rope_keys:  # rotated to their positions in fp32, then to dtype
                x = self.keys_read(self._decode(codec, packed), missing, dtype)
            else:
                x = self._decode(codec, packed, dtype)
            x = x.view(H, len(missing), B, -1)  # [H, M, B, D]
        if data is not None and len(held) + len(missing) <= data.shape[1]:  # room: the new blocks join
            if missing:
                data[:, len(held):len(held) + len(missing)] = x  # slots no earlier result reads
                at |= {b: len(held) + j for j, b in enumerate(missing)}
                self.cold.remember_decoded(self.layer_idx, half, held + tuple(missing), data)
            return data.index_select(1, torch.tensor([at[b] for b in ids], device=data.device)).view(H, U * B, -1)
        room = max(U, min(HELD_ROOM * U, self.n_blocks + HELD_SPARE))
        fresh = torch.empty(H, room, B, x.shape[-1] if x is not None else data.shape[-1], dtype=dtype,
                            device=self.device)
        out = fresh[:, :U]  # [H, U, B, D]: this read's blocks, in order
        if x is not None and len(missing) == U:
            out.copy_(x)
        else:  # some held: one gather from them, the new blocks put in place
            out.copy_(data.index_select(1, torch.tensor([at.get(b, 0) for b in ids], device=data.device)))
            if x is not None:
                out.index_copy_(1, torch.tensor([j for j, b in enumerate(ids) if b not in at], device=data.device), x)
        self.cold.remember_decoded(self.layer_idx, half, tuple(ids), fresh)
        return out.reshape(H, U * B, -1)

    def _dot_dtype(self, codec, max_bits: int) -> torch.dtype:
        """The operand dtype of the cold tier's products with `codec`'s decoded codes."""
        low = getattr(codec, "bits", 16) <= max_bits and torch.device(self.device).type == "cpu"
        return _LOW_DTYPE if low else torch.float32

    def _cold_keys(self, q: torch.Tensor, q_far: torch.Tensor | None = None, nf: int = 0):
        """q [H, G, n, D] -> (block ids [U], keys [H, U*B, D] as stored (fp32, or bf16 for few-bit codes),
        visible [H, 1, U*B] or None when all are, chosen [H, n, nb] blocks each query retrieved, or None without
        retrieval). q_far: the queries moved to `far`, which the first nf (far) blocks are scored with."""
        p, H, B = self.plan, self.H, self.plan.block
        n = q.shape[2]
        nb = self.n_blocks
        dev = self.device
        if p.retrieve and nb * B > p.retrieve:
            k_sel = p.retrieve // B
            # Quest upper bound per block: sum_d max(q_d * min_d, q_d * max_d), summed over the group's queries
            mn, mx = derived(self, "bounds", (self.sum_min, self.sum_max),
                             lambda: (_dq8(self.sum_min), _dq8(self.sum_max)))  # [nb, H, D]
            ub = torch.einsum("hgnd,bhd->hnb", q.clamp(min=0), mx[nf:]) + \
                torch.einsum("hgnd,bhd->hnb", q.clamp(max=0), mn[nf:])  # [H, n, nb - nf]: near blocks
            if nf:  # far blocks: the bound of their moved keys for the moved queries
                ub = torch.cat([self.far_bounds(q_far, mn[:nf], mx[:nf]), ub], -1)
            capped = bool(nf) and 0 < p.far_retrieve // B < nf
            if capped:  # a separate far budget: each query's other far blocks are out of reach
                fu = ub[..., :nf]
                fu = fu.masked_fill(fu < fu.topk(p.far_retrieve // B, dim=-1).values[..., -1:], float("-inf"))
                ub = torch.cat([fu, ub[..., nf:]], -1)
            cap = k_sel * max(p.union_floor, -(-n // B)) if n > 1 else k_sel
            best = ub.topk(min(cap, nb), dim=-1)
            top = best.indices  # [H, n, r], best first (r >= k_sel: nb > k_sel here)
            chosen = torch.zeros(H, n, nb, dtype=torch.bool, device=dev)
            chosen.scatter_(2, top[..., :k_sel], True)
            if capped:
                chosen &= torch.isfinite(ub)
            if n > 1:
                # a prompt chunk decodes the union of its queries' blocks anyway; every query attends all of
                # them (masking each query back to its own top-k compounds errors through the prompt's layers).
                # The union is capped at k_sel blocks per B queries, at least k_sel * union_floor (4: 8,192
                # tokens at the defaults, the model's whole context; at a floor of 1 a question lost the passkey
                # at 3k-4k), so a short chunk appended to a long session reads a bounded number of blocks, not
                # every one. Kept: every (head, query)'s best block, then every one's second best, ... (each
                # block ranked by its best rank over them), ties to the highest bound. (Ranking by the number
                # of picks instead lost the passkey where this kept it: log p -5.97 against -2.87 at 4k.)
                picked_any = chosen.any(dim=1).any(dim=0)  # [nb]
                if int(picked_any.sum()) > cap:
                    # a block's best rank over the (head, query)s, from their top `cap` (a block ranked below
                    # that everywhere gets `cap`: each row's top `cap` are distinct, so at least `cap` blocks
                    # rank better and it is never kept)
                    r = top.shape[-1]
                    at = torch.arange(r, device=dev).expand_as(top)
                    if capped:  # a block out of reach ranks last
                        at = at.masked_fill(~torch.isfinite(best.values), r)
                    rank = torch.full((nb,), r, dtype=torch.long, device=dev).scatter_reduce_(
                        0, top.flatten(), at.flatten(), "amin")  # [nb]
                    order = ub.amax(dim=(0, 1)).argsort(descending=True)  # by bound, then stably by best rank
                    order = order[rank[order].argsort(stable=True)]
                    picked_any = torch.zeros_like(picked_any).index_fill_(0, order[:cap], True)
                chosen = picked_any.view(1, 1, nb).expand(H, n, nb)
            ids = chosen.any(dim=1).any(dim=0).nonzero().flatten()  # [U]
            picked = chosen[:, :, ids] if n == 1 else None  # [H, n, U]; a chunk's queries see every block
        else:
            ids = torch.arange(nb, device=dev)
            chosen = picked = None
        self.stats["cold_blocks_read"] += ids.numel()
        k_cold = self._cold_tensor(0, ids.tolist(), self.kcodec, self._dot_dtype(self.kcodec, KEY_BF16_BITS))
        live = self.live[ids]  # [U, H, B]
        visible = None
        if chosen is not None or not bool(live.all()):
            visible = live.permute(1, 0, 2).reshape(H, 1, -1)  # the same for every query of a chunk
            if picked is not None:
                visible = visible & picked.repeat_interleave(B, dim=2)
        return ids, k_cold, visible, chosen

    def _cold_values(self, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """probs [H, G, n, U*B] -> Σ p·v over the picked cold blocks, [H, G*n, Dv].

        Sparse-V: a block whose every weight (all heads, queries) is below v_skip is never decoded."""
        H, B = self.H, self.plan.block
        G, n = probs.shape[1], probs.shape[2]
        U = ids.numel()
        pb = probs.reshape(H, G * n, U, B)
        keep = torch.arange(U, device=self.device)
        if self.plan.v_skip > 0:
            keep = (pb.amax(dim=-1).amax(dim=(0, 1)) >= self.plan.v_skip).nonzero().flatten()  # [K]
            K = keep.numel()
            if not K:
                self.stats["v_blocks_skipped"] += U
                return torch.zeros(H, G * n, self.Dv, device=self.device)
            if K < U and (U - K) * self.Dv <= G * n * K:
                # leaving blocks out saves decoding B*Dv values per head each, but copies the K kept blocks'
                # G*n*B weights per head: where the copy is the larger (a prompt chunk's many queries), every
                # block is decoded and weighted, the left-out ones exactly too
                keep = torch.arange(U, device=self.device)
            self.stats["v_blocks_skipped"] += U - keep.numel()
        # bf16 operands, fp32 accumulation where the CPU has bf16 dot products (5x faster): rounding a weight or a
        # value (at most 2^-8 relative) is far below what values of 4 bits or fewer lose; 8-bit values keep fp32
        dt = self._dot_dtype(self.vcodec, VALUE_BF16_BITS)
        v = self._cold_tensor(1, ids[keep].tolist(), self.vcodec, dt)  # [H, K*B, Dv]
        pk = pb.reshape(H, G * n, U * B) if keep.numel() == U else pb[:, :, keep].reshape(H, G * n, -1)
        return torch.bmm(pk.to(dt), v).float()

    # ---- moving tokens between tiers ---------------------------------------------------
