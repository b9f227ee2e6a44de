"""`TierLayer`: one layer's tiered KV cache, a transformers cache layer.

State (H = KV heads, D = head dim; batch 1):
    sink_k/v  [H, s, D]   first tokens, exact
    hot_k/v   [H, h, D]   recent tokens, exact; hot_pos [h]; hot_score [H, h]
    keep      [H, m, D]   per-head kept tokens (exact, or 8-bit codes + fp16 scale/min);
                          keep_pos [H, m]; keep_score [H, m]
    cold      blocks of B tokens in a `ColdStore`, packed by the plan's codecs;
              sum_min/sum_max [nb, H, D] key summaries (Quest), sum_mean_k/v the block means, each
              8-bit per row (codes uint8 [nb, H, D], scale and base fp16 [nb, H, 1]); live [nb, H, B]
              (False where the token's head holds it in `keep`: each token is
              attended exactly once per head)

`update()` (called by the model before attention) appends the new tokens to
the hot window. The registered attention function then calls `attend()`,
which reads every tier — cold blocks dequantized by the codec kernels, only the
blocks retrieval picks — and afterwards `settle()` moves tokens between tiers:
sink fill, hot overflow a block at a time into cold (or eviction), the kept set
competing by score. State tensors are replaced, never written in place, so a
snapshot is a shallow copy of the attributes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from memsvc.kernels.registry import get_codec

from .cold import ColdStore
from .policies.plan import LayerPlan

_STATE = ("sink_k", "sink_v", "hot_k", "hot_v", "hot_pos", "hot_score", "keep_k", "keep_v", "keep_pos",
          "keep_score", "sum_min", "sum_max", "sum_mean_k", "sum_mean_v", "live", "n_blocks", "seen", "evicted", "q_window")


def _codec(name: str, layer: int):
    try:
        return get_codec(name, layer=layer)
    except TypeError:
        return get_codec(name)


def _q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric 8-bit: x [H, m, D] -> codes uint8, scale fp16 [H, m, 1], min fp16 [H, m, 1]."""
    x = x.float()
    mn = x.amin(-1, keepdim=True)
    scale = ((x.amax(-1, keepdim=True) - mn) / 255.0).to(torch.float16)
    mn16 = mn.to(torch.float16)
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = ((x - mn16.float()) * inv).round_().clamp_(0, 255).to(torch.uint8)
    return codes, scale, mn16


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


class CodecMismatch(ValueError):
    """A stored cold block holds another codec's codes than the layer's policy decodes: the session was stored
    with other policy settings than it is read with (a record from before records kept them, read after a
    default changed). The service answers FAILED_PRECONDITION: the caller's request is not at fault."""


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


def _dq8(q: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    codes, scale, mn = q
    return codes.float() * scale.float() + mn.float()


_ROUND = {"down": torch.floor, "up": torch.ceil, "near": torch.round}


def _q8_rows(x: torch.Tensor, rounding: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block summaries x [nb, H, D] -> 8-bit codes [nb, H, D], scale and base fp16 [nb, H, 1].

    rounding "down" never dequantizes above x and "up" never below it (up to fp32 rounding), so a
    Quest bound built from a min rounded down and a max rounded up stays an upper bound."""
    x = x.float()
    lo = x.amin(-1, keepdim=True)
    base = lo.to(torch.float16)
    base = torch.where(base.float() > lo, torch.nextafter(base, torch.full_like(base, -float("inf"))), base)
    step = (x.amax(-1, keepdim=True) - base.float()) / 255.0
    scale = step.to(torch.float16)
    scale = torch.where(scale.float() < step, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = _ROUND[rounding]((x - base.float()) * inv).clamp_(0, 255).to(torch.uint8)
    return codes, scale, base


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2's soft cap, in place: softcap * tanh(logits / softcap); the logits unchanged without one."""
    return logits if softcap is None else logits.div_(softcap).tanh_().mul_(softcap)


def _cat3(a: tuple, b: tuple) -> tuple:
    return tuple(torch.cat([x, y]) for x, y in zip(a, b))


class TierLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False

    def __init__(self, plan: LayerPlan, layer_idx: int, cold: ColdStore, dtype: torch.dtype):
        super().__init__()
        self.plan = plan
        self.layer_idx = layer_idx
        self.cold = cold
        self.exact_dtype = plan.dtype(dtype)
        self.kcodec = _codec(plan.cold_k, layer_idx) if plan.cold_k else None
        self.vcodec = _codec(plan.cold_v, layer_idx) if plan.cold_v else None
        self.is_initialized = False
        self.seen = 0  # tokens this layer has been given (the logical length)
        self.evicted = 0  # token-heads dropped by an eviction policy
        self.n_blocks = 0
        self.q_window = None  # [Hq, w, D] last prompt queries (SnapKV)
        self.stats = {"cold_blocks_read": 0, "cold_blocks_reused": 0, "v_blocks_skipped": 0, "attend_calls": 0}

    # ---- transformers Cache API --------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise ValueError(f"the tiered cache holds one sequence, got batch {key_states.shape[0]}")
        _, H, _, D = key_states.shape
        self.H, self.D, self.Dv = H, D, value_states.shape[-1]
        self.device = key_states.device
        self.model_dtype = key_states.dtype
        e, dev = self.exact_dtype, self.device
        self.sink_k = torch.empty(H, 0, D, dtype=e, device=dev)
        self.sink_v = torch.empty(H, 0, self.Dv, dtype=e, device=dev)
        self.hot_k, self.hot_v = self.sink_k, self.sink_v
        self.hot_pos = torch.empty(0, dtype=torch.long, device=dev)
        self.hot_score = torch.empty(H, 0, device=dev)
        self.keep_k = self._keep_store(torch.empty(H, 0, D, device=dev))
        self.keep_v = self._keep_store(torch.empty(H, 0, self.Dv, device=dev))
        self.keep_pos = torch.empty(H, 0, dtype=torch.long, device=dev)
        self.keep_score = torch.empty(H, 0, device=dev)
        self.sum_min = _q8_rows(torch.empty(0, H, D, device=dev), "down")  # 8-bit rows: codes, scale, base
        self.sum_max = self.sum_mean_k = self.sum_min
        self.sum_mean_v = _q8_rows(torch.empty(0, H, self.Dv, device=dev), "near")
        self.live = torch.empty(0, H, self.plan.block, dtype=torch.bool, device=dev)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new tokens to the hot window; returns the hot window as [1, H, h, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise ValueError(f"the tiered cache holds one sequence, got batch {key_states.shape[0]}")
        n = key_states.shape[2]
        e = self.exact_dtype
        self.hot_k = torch.cat([self.hot_k, key_states[0].to(e)], dim=1)
        self.hot_v = torch.cat([self.hot_v, value_states[0].to(e)], dim=1)
        self.hot_pos = torch.cat([self.hot_pos, torch.arange(self.seen, self.seen + n, device=self.device)])
        self.hot_score = torch.cat([self.hot_score, torch.zeros(self.H, n, device=self.device)], dim=1)
        self.seen += n
        return self.hot_k.unsqueeze(0), self.hot_v.unsqueeze(0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    # ---- snapshot ----------------------------------------------------------------------

    def snapshot(self) -> dict:
        return {name: getattr(self, name) for name in _STATE if hasattr(self, name)} | {"init": self.is_initialized}

    def restore(self, snap: dict) -> None:
        for name, value in snap.items():
            if name != "init":
                setattr(self, name, value)
        self.is_initialized = snap["init"]
        self.cold.discard_from(self.layer_idx, self.n_blocks)

    # ---- kept set ----------------------------------------------------------------------

    def _keep_store(self, x: torch.Tensor):
        """x [H, m, D] float -> the kept-set representation (exact tensor or 8-bit triple)."""
        return _q8(x) if self.plan.keep_bits == 8 else x.to(self.exact_dtype)

    def _keep_float(self, store) -> torch.Tensor:
        return _dq8(store) if self.plan.keep_bits == 8 else store.float()

    def _keep_len(self) -> int:
        return self.keep_pos.shape[1]

    def _keep_gather(self, store, idx: torch.Tensor):
        """Rows idx [H, m'] of a kept store."""
        def g(t):
            return torch.gather(t, 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        return tuple(g(t) for t in store) if self.plan.keep_bits == 8 else g(store)

    # ---- accounting --------------------------------------------------------------------

    def tier_bytes(self) -> dict[str, int]:
        """Resident bytes by tier: sink, hot (with positions and scores), warm (kept rows, their scales,
        positions, scores), summaries (the cold blocks' resident part: 8-bit summaries and live masks),
        window (SnapKV's remembered queries)."""
        if not self.is_initialized:
            return {}
        scored = self.plan.keep_by == "attention"
        tiers = {
            "sink": [self.sink_k, self.sink_v],
            "hot": [self.hot_k, self.hot_v, self.hot_pos] + ([self.hot_score] if scored else []),
            "warm": [self.keep_pos] + ([self.keep_score] if scored else []),
            "summaries": [self.live],
            "window": [self.q_window] if self.q_window is not None else [],
        }
        for store in (self.keep_k, self.keep_v):
            tiers["warm"] += list(store) if isinstance(store, tuple) else [store]
        for summary in (self.sum_min, self.sum_max, self.sum_mean_k, self.sum_mean_v):
            tiers["summaries"] += list(summary)
        return {name: sum(t.numel() * t.element_size() for t in ts) for name, ts in tiers.items()}

    def resident_bytes(self) -> int:
        return sum(self.tier_bytes().values())

    def tier_tokens(self) -> dict[str, int]:
        """Token-heads per tier, divided by H (so a full head set counts one token)."""
        if not self.is_initialized:
            return {"sink": 0, "hot": 0, "warm": 0, "cold": 0, "evicted": 0}
        H = self.H
        return {"sink": self.sink_k.shape[1], "hot": self.hot_k.shape[1], "warm": self._keep_len(),
                "cold": int(self.live.sum()) / H if self.n_blocks else 0, "evicted": self.evicted / H}

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
        k_ex = torch.cat([self.sink_k.float(), self._keep_float(self.keep_k), self.hot_k.float()], 1)  # [H, Te, D]
        v_ex = torch.cat([self.sink_v.float(), self._keep_float(self.keep_v), self.hot_v.float()], 1)
        n_sink, n_keep = self.sink_k.shape[1], self._keep_len()
        te = k_ex.shape[1]
        hot_ok = self.hot_pos.unsqueeze(0) <= qpos.unsqueeze(1)  # [n, h]
        if not self.n_blocks and p.keep_by != "attention" and softcap is None:  # exact tiers, no scores: SDPA
            self._remember_queries(query)
            mask = None
            if not bool(hot_ok.all()):
                mask = torch.ones(n, te, dtype=torch.bool, device=self.device)
                mask[:, n_sink + n_keep:] = hot_ok
            out = F.scaled_dot_product_attention(query.float(), k_ex.unsqueeze(0), v_ex.unsqueeze(0), attn_mask=mask,
                                                 scale=scaling, enable_gqa=True)  # [1, Hq, n, Dv]
            return out.transpose(1, 2).to(query.dtype)
        q = query[0].float().reshape(H, G * n, D)  # rows (g, i)
        logits = _capped(torch.bmm(q, k_ex.transpose(1, 2)).mul_(scaling), softcap).view(H, G, n, te)
        if not bool(hot_ok.all()):
            logits[..., n_sink + n_keep:].masked_fill_(~hot_ok, float("-inf"))
        parts = [logits]  # [H, G, n, *] each: exact tiers, then cold tokens, then left-out blocks

        # cold tier: the blocks retrieval picks for each query (all of them without retrieval)
        cold = None
        if self.n_blocks:
            ids, k_cold, visible, chosen = self._cold_keys(q.view(H, G, n, D))
            kt = k_cold.transpose(1, 2)  # [H, D, U*B]
            # tokens a query does not see get -inf through the GEMM's bias input (one pass less than a fill)
            bias = None if visible is None else \
                torch.zeros(visible.shape, dtype=k_cold.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
            gemm_bias = bias if softcap is None else None  # a soft cap goes on the logits, the mask after it
            if k_cold.dtype == torch.float32:
                lc = torch.bmm(q, kt).mul_(scaling) if gemm_bias is None else \
                    torch.baddbmm(gemm_bias, q, kt, alpha=scaling)
            else:  # bf16 operands, fp32 accumulation, the logits rounded to bf16 once (2^-9 relative)
                qs = (q * scaling).to(k_cold.dtype)
                lc = (torch.bmm(qs, kt) if gemm_bias is None else torch.baddbmm(gemm_bias, qs, kt)).float()
            if softcap is not None:
                lc = _capped(lc, softcap) if bias is None else _capped(lc, softcap).add_(bias)
            lc = lc.view(H, G, n, -1)  # [H, G, n, U*B]
            del k_cold, kt, bias, gemm_bias
            parts.append(lc)
            cold = ids
            if chosen is not None and p.rest == "mean":
                # blocks retrieval left out still count: one pseudo-token each, the block's mean key and
                # value weighted by its live tokens (exp(q·mean k) <= mean exp(q·k), so mass is never overstated)
                lr = _capped(torch.bmm(q, _dq8(self.sum_mean_k).permute(1, 2, 0)).mul_(scaling), softcap)
                lr = lr.view(H, G, n, -1)
                count = self.live.sum(-1).T.float()  # [H, nb]
                lr = lr + count.clamp(min=1).log().view(H, 1, 1, -1)
                lr.masked_fill_((chosen | (count == 0).unsqueeze(1)).unsqueeze(1), float("-inf"))
                parts.append(lr)

        probs = _softmax_parts(parts)  # in place: each part's share of one softmax over all of them
        out = torch.bmm(probs[0].view(H, G * n, te), v_ex)  # [H, G*n, Dv]
        if cold is not None:
            out = out + self._cold_values(cold, probs[1])
        if len(probs) == 3:
            out = out + torch.bmm(probs[2].view(H, G * n, -1), _dq8(self.sum_mean_v).transpose(0, 1))
        probs = probs[0]

        if p.keep_by == "attention":  # H2O-style cumulative attention of exact tokens
            got = probs.sum(dim=(1, 2))  # [H, Te]
            self.keep_score = self.keep_score + got[:, n_sink:n_sink + n_keep]
            self.hot_score = self.hot_score + got[:, n_sink + n_keep:]
        self._remember_queries(query)
        out = out.view(Hq, n, -1).transpose(0, 1).unsqueeze(0)  # [1, n, Hq, Dv]
        return out.to(query.dtype)

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
        """Blocks `ids` of this layer's keys (half 0) or values (half 1), decoded: [H, U*B, D] in `dtype`. Blocks
        the layer's last decode of that half holds (the cold store's decoded cache) are copied from it; only
        the others are read and decoded. The result becomes the layer's last decode. Callers only read it."""
        H, B = self.H, self.plan.block
        last = self.cold.last_decoded(self.layer_idx, half)
        if last is not None and last[1].dtype != dtype:
            last = None
        if last is not None and list(last[0]) == ids:  # the same blocks again (a decode step's usual case)
            self.stats["cold_blocks_reused"] += len(ids)
            return last[1].view(H, len(ids) * B, -1)
        at = {} if last is None else {b: j for j, b in enumerate(last[0])}
        missing = [b for b in ids if b not in at]
        self.stats["cold_blocks_reused"] += len(ids) - len(missing)
        x = None
        if missing:
            x = self._decode(codec, self.cold.get_stacked(self.layer_idx, missing, half), dtype)
            x = x.view(H, len(missing), B, -1)  # [H, M, B, D]
        if len(missing) < len(ids):  # some from the last decode: one gather over it and the new blocks
            fresh = iter(range(len(last[0]), len(last[0]) + len(missing)))
            src = last[1] if x is None else torch.cat([last[1], x], 1)
            order = torch.tensor([at[b] if b in at else next(fresh) for b in ids], device=src.device)
            x = src.index_select(1, order)
        self.cold.remember_decoded(self.layer_idx, half, tuple(ids), x)
        return x.view(H, len(ids) * B, -1)

    def _dot_dtype(self, codec, max_bits: int) -> torch.dtype:
        """The operand dtype of the cold tier's products with `codec`'s decoded codes."""
        low = getattr(codec, "bits", 16) <= max_bits and torch.device(self.device).type == "cpu"
        return _LOW_DTYPE if low else torch.float32

    def _cold_keys(self, q: torch.Tensor):
        """q [H, G, n, D] -> (block ids [U], keys [H, U*B, D] (fp32, or bf16 for few-bit codes), visible
        [H, n or 1, U*B] or None when all are, chosen [H, n, nb] blocks each query retrieved, or None without
        retrieval)."""
        p, H, B = self.plan, self.H, self.plan.block
        n = q.shape[2]
        nb = self.n_blocks
        dev = self.device
        if p.retrieve and nb * B > p.retrieve:
            k_sel = p.retrieve // B
            # Quest upper bound per block: sum_d max(q_d * min_d, q_d * max_d), summed over the group's queries
            mn, mx = _dq8(self.sum_min), _dq8(self.sum_max)  # [nb, H, D]
            ub = torch.einsum("hgnd,bhd->hnb", q.clamp(min=0), mx) + torch.einsum("hgnd,bhd->hnb", q.clamp(max=0), mn)
            cap = k_sel * max(p.union_floor, -(-n // B)) if n > 1 else k_sel
            top = ub.topk(min(cap, nb), dim=-1).indices  # [H, n, r], best first (r >= k_sel: nb > k_sel here)
            chosen = torch.zeros(H, n, nb, dtype=torch.bool, device=dev)
            chosen.scatter_(2, top[..., :k_sel], True)
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

    def settle(self) -> None:
        """After attention: fill the sink, age the hot window's overflow."""
        p = self.plan
        if p.sink and self.sink_k.shape[1] < p.sink:
            take = int((self.hot_pos < p.sink).sum())
            if take:
                self.sink_k = torch.cat([self.sink_k, self.hot_k[:, :take]], 1)
                self.sink_v = torch.cat([self.sink_v, self.hot_v[:, :take]], 1)
                self._drop_hot(take)
        if p.hot is None:
            return
        step = p.block if p.cold_k else 1
        while self.hot_k.shape[1] >= p.hot + step:
            m = p.block if p.cold_k else self.hot_k.shape[1] - p.hot
            self._age(m)

    def _drop_hot(self, m: int) -> None:
        self.hot_k, self.hot_v = self.hot_k[:, m:], self.hot_v[:, m:]
        self.hot_pos, self.hot_score = self.hot_pos[m:], self.hot_score[:, m:]

    def _age(self, m: int) -> None:
        """The oldest m hot tokens leave the hot window."""
        p, H = self.plan, self.H
        k, v = self.hot_k[:, :m], self.hot_v[:, :m]  # [H, m, D]
        pos = self.hot_pos[:m].unsqueeze(0).expand(H, m)
        score = self.hot_score[:, :m]
        self._drop_hot(m)
        won = torch.zeros(H, m, dtype=torch.bool, device=self.device)  # aged tokens that enter the kept set
        if p.keep and p.keep_by == "attention":
            won = self._compete(k, v, pos, score)
        if p.cold_k:
            self._add_block(k, v, pos[0, 0].item(), ~won)
        else:
            self.evicted += int((~won).sum())

    def _compete(self, k, v, pos, score) -> torch.Tensor:
        """Aged tokens [H, m] and the kept set compete per head; the top `keep` scores stay kept.
        Kept tokens that lose go back to their cold block (or are evicted); returns which aged tokens won."""
        p, H = self.plan, self.H
        m, old = k.shape[1], self._keep_len()
        all_score = torch.cat([self.keep_score, score], 1)  # [H, old + m]
        top = min(p.keep, old + m)
        idx = all_score.topk(top, dim=1).indices.sort(dim=1).values  # [H, top]
        chosen = torch.zeros(H, old + m, dtype=torch.bool, device=self.device)
        chosen.scatter_(1, idx, True)
        lost_old = ~chosen[:, :old]
        if bool(lost_old.any()):
            if p.cold_k:
                self._revive(self.keep_pos[lost_old], lost_old.nonzero()[:, 0])
            else:
                self.evicted += int(lost_old.sum())
        new_k = self._keep_store(k.float())
        new_v = self._keep_store(v.float())
        if p.keep_bits == 8:
            both_k = tuple(torch.cat([a, b], 1) for a, b in zip(self.keep_k, new_k))
            both_v = tuple(torch.cat([a, b], 1) for a, b in zip(self.keep_v, new_v))
        else:
            both_k, both_v = torch.cat([self.keep_k, new_k], 1), torch.cat([self.keep_v, new_v], 1)
        self.keep_k = self._keep_gather(both_k, idx)
        self.keep_v = self._keep_gather(both_v, idx)
        self.keep_pos = torch.gather(torch.cat([self.keep_pos, pos], 1), 1, idx)
        self.keep_score = torch.gather(all_score, 1, idx)
        return chosen[:, old:]

    def _revive(self, positions: torch.Tensor, heads: torch.Tensor) -> None:
        """Tokens leaving the kept set become live again in their cold blocks."""
        B = self.plan.block
        rel = positions - self.plan.sink
        live = self.live.clone()
        live[rel // B, heads, rel % B] = True
        self.live = live

    def _add_block(self, k: torch.Tensor, v: torch.Tensor, start: int, live: torch.Tensor) -> None:
        """Encode one block of B aged tokens [H, B, D] as cold block `n_blocks`."""
        p = self.plan
        if start != p.sink + self.n_blocks * p.block:
            raise RuntimeError(f"cold block {self.n_blocks} would start at token {start}, expected "
                               f"{p.sink + self.n_blocks * p.block}")
        kf = k.to(self.model_dtype)
        self.cold.put(self.layer_idx, self.n_blocks, self.kcodec.encode(kf), self.vcodec.encode(v.to(self.model_dtype)))
        kk = k.float()
        self.sum_min = _cat3(self.sum_min, _q8_rows(kk.amin(1).unsqueeze(0), "down"))
        self.sum_max = _cat3(self.sum_max, _q8_rows(kk.amax(1).unsqueeze(0), "up"))
        if self.plan.rest == "mean":
            # over every token of the block: tokens now in the warm tier may come back to it later
            self.sum_mean_k = _cat3(self.sum_mean_k, _q8_rows(kk.mean(1).unsqueeze(0), "near"))
            self.sum_mean_v = _cat3(self.sum_mean_v, _q8_rows(v.float().mean(1).unsqueeze(0), "near"))
        self.live = torch.cat([self.live, live.unsqueeze(0)])
        self.n_blocks += 1

    def end_prompt(self) -> None:
        """SnapKV/PyramidKV: the last prompt queries pick which earlier tokens stay."""
        p = self.plan
        if p.keep_by != "window" or not self.is_initialized or self.q_window is None:
            return
        w = min(p.window, self.hot_k.shape[1])
        cand_hot = self.hot_k.shape[1] - w
        old = self._keep_len()
        if old + cand_hot <= p.keep:
            return
        H, D = self.H, self.D
        G = self.q_window.shape[0] // H
        qw = self.q_window[:, -w:].reshape(H, G, w, D)
        ck = torch.cat([self._keep_float(self.keep_k), self.hot_k[:, :cand_hot].float()], 1)  # [H, C, D]
        cv = torch.cat([self._keep_float(self.keep_v), self.hot_v[:, :cand_hot].float()], 1)
        cpos = torch.cat([self.keep_pos, self.hot_pos[:cand_hot].unsqueeze(0).expand(H, -1)], 1)
        wk = self.hot_k[:, cand_hot:].float()  # [H, w, D]
        scale = 1.0 / math.sqrt(D)
        lc = torch.einsum("hgwd,hcd->hgwc", qw, ck) * scale
        lw = torch.einsum("hgwd,hjd->hgwj", qw, wk) * scale
        causal = torch.ones(w, w, dtype=torch.bool, device=self.device).tril()
        lw = lw.masked_fill(~causal, float("-inf"))
        pr = torch.softmax(torch.cat([lc, lw], -1), -1)[..., :ck.shape[1]]  # [H, G, w, C]
        vote = pr.sum(dim=(1, 2))  # [H, C]
        order = cpos.argsort(dim=1)  # pool over neighbours in position order
        vote_sorted = torch.gather(vote, 1, order)
        pooled = F.avg_pool1d(vote_sorted.unsqueeze(1), p.pool, stride=1, padding=p.pool // 2,
                              count_include_pad=False).squeeze(1)
        top = pooled.topk(p.keep, dim=1).indices
        idx = torch.gather(order, 1, top).sort(dim=1).values  # [H, keep] into the candidates
        self.evicted += H * (ck.shape[1] - p.keep)
        self.keep_k = self._keep_store(torch.gather(ck, 1, idx.unsqueeze(-1).expand(-1, -1, D)))
        self.keep_v = self._keep_store(torch.gather(cv, 1, idx.unsqueeze(-1).expand(-1, -1, cv.shape[-1])))
        self.keep_pos = torch.gather(cpos, 1, idx)
        self.keep_score = torch.zeros(H, p.keep, device=self.device)
        self._drop_hot(cand_hot)
