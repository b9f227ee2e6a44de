"""Moving tokens between a tiered layer's tiers after each attention (a mixin of `TierLayer`).

`settle()` fills the sink, then ages the hot window's overflow a block at a time: aged tokens compete with the
warm set by cumulative attention (H2O-style) and the block goes cold (the winners' rows masked out of it), or
is evicted by policies without cold blocks. `end_prompt()` is SnapKV/PyramidKV's pick of the kept set.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .rows import _cat3, _q8_rows


class Settle:
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
        kf = self.key_to_store(k.to(self.model_dtype), start)
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
