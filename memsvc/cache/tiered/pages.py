"""A tiered layer's mutable state in parts, so that a commit writes only the parts that changed.

KV entry indices of one layer (cold blocks are 0, 1, 2, ... below PART_BASE):
- HEAD (0xFFFFFFFF): the counters, the sink, hot positions and scores, warm positions and
  scores, SnapKV's remembered queries, and the other parts with their digests; every commit;
- WARM_BASE + g: the warm rows (8-bit codes, scales, mins) of every head whose tokens came from
  cold blocks [WARM_GROUP*g, WARM_GROUP*(g+1)); when a block ages, its winners make a new group
  and the groups the losers leave change (in a long session, a few rows of one or two groups);
- SUM_BASE + g: the 8-bit summaries of cold blocks [SUM_PAGE*g, SUM_PAGE*(g+1)): only the last
  page grows (a state written with another page size still loads: pages hold their first block);
- LIVE_BASE + g: the live masks of the same blocks: the last page grows, and an older one
  changes when a warm token goes back to one of its blocks;
- HOT_BASE + p: the hot tokens at positions [HOT_PAGE*p, HOT_PAGE*(p+1)), exactly the ones
  still hot; a page that empties is dropped.

States of older layouts (stored whole, all warm rows in one entry at WARM_INDEX, live masks inside the
summary pages) are read by memsvc.cache.tiered.upgrade, which turns them into these parts.

A part is identified by a digest of its tensors and metadata: the session remembers the digest
of every stored part (a resumed one reads them from the heads) and writes a part only when its
digest changed (or it is new).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch

from .partcodec import Part, digest

PART_BASE = 0x80000000  # indices at or above this are state parts, below are cold blocks
SUM_BASE = 0x80000000
LIVE_BASE = 0x90000000
WARM_BASE = 0xA0000000
HOT_BASE = 0xC0000000
WARM_INDEX = 0xFFFFFFFE  # all warm rows in one entry: states written before warm groups
HEAD_INDEX = 0xFFFFFFFF
SUM_PAGE = 16  # cold blocks per summary page (a page is about 1 KB per block and layer)
HOT_PAGE = 16  # tokens per hot page
WARM_GROUP = 4  # cold blocks whose warm rows share a part

_HEAD = ("sink_k", "sink_v", "hot_pos", "hot_score", "keep_pos", "keep_score", "q_window")
_POSITIONS = ("hot_pos", "keep_pos")  # stored as int32, held as int64
_SUMS = ("sum_min", "sum_max", "sum_mean_k", "sum_mean_v")
_INTS = ("seen", "evicted", "n_blocks", "H", "D", "Dv")


def is_cold_block(index: int) -> bool:
    return index < PART_BASE


def part_name(index: int) -> str:
    if index == HEAD_INDEX:
        return "state"
    if index == WARM_INDEX:
        return "warm"
    if index >= HOT_BASE:
        return f"hot{index - HOT_BASE}"
    if index >= WARM_BASE:
        return f"warm{index - WARM_BASE}"
    if index >= LIVE_BASE:
        return f"live{index - LIVE_BASE}"
    if index >= SUM_BASE:
        return f"sum{index - SUM_BASE}"
    return str(index)




def _put(tensors: dict, name: str, value) -> None:
    if isinstance(value, tuple):  # 8-bit rows: codes, scale, base
        for i, t in enumerate(value):
            tensors[f"{name}.{i}"] = t.contiguous()
    elif value is not None:
        tensors[name] = value.contiguous()


def _get(tensors: dict, name: str):
    if f"{name}.0" in tensors:
        return tuple(tensors[f"{name}.{i}"] for i in range(3))
    return tensors.get(name)


def _rows(value, lo: int, hi: int):
    """Rows lo:hi of a tensor or of each tensor of an 8-bit triple (dim 0)."""
    return tuple(t[lo:hi] for t in value) if isinstance(value, tuple) else value[lo:hi]


def _flat(value, rows: int):
    """[H, m, *] -> [H*m, *], of a tensor or of each tensor of an 8-bit triple."""
    return tuple(t.reshape(rows, -1) for t in value) if isinstance(value, tuple) else value.reshape(rows, -1)


def _take(value, idx: torch.Tensor):
    return tuple(t[idx] for t in value) if isinstance(value, tuple) else value[idx]


def warm_groups(pos: torch.Tensor, keep_k, keep_v, sink: int, block: int) -> dict[int, Part]:
    """group -> part: every head's warm rows of tokens from cold blocks [WARM_GROUP*g, WARM_GROUP*(g+1)),
    ordered by (head, position): tensors head [r] uint8, pos [r], k and v rows [r, D] (or 8-bit triples).
    pos: keep_pos [H, m]; keep_k / keep_v: [H, m, D] (or 8-bit triples) in its order."""
    H, m = pos.shape
    if not m:
        return {}
    heads = torch.arange(H, device=pos.device).unsqueeze(1).expand(H, m).reshape(-1)  # [H*m]
    flat = pos.reshape(-1)
    group = (flat - sink).clamp(min=0) // (block * WARM_GROUP)
    order = torch.argsort((group * H + heads) * (int(flat.max()) + 1) + flat)  # by group, head, position
    # one gather per tensor in (group, head, position) order, then each group's rows as a slice of it
    cols = {"head": heads[order].to(torch.uint8), "pos": flat[order]}
    _put(cols, "k", _take(_flat(keep_k, H * m), order))
    _put(cols, "v", _take(_flat(keep_v, H * m), order))
    groups, counts = torch.unique_consecutive(group[order], return_counts=True)
    counts = counts.tolist()
    pieces = {name: t.split(counts) for name, t in cols.items()}  # name -> one view per group
    return {WARM_BASE + g: ({name: pieces[name][i] for name in cols}, {}, c)
            for i, (g, c) in enumerate(zip(groups.tolist(), counts))}


def _moved(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A decoded part's tensors (CPU) on `device`: the same dict on the CPU (no call per tensor)."""
    if torch.device(device).type == "cpu":
        return tensors
    return {k: v.to(device) for k, v in tensors.items()}


def _assemble_warm(layer, parts: dict[int, Part], device: torch.device) -> None:
    """keep_k/keep_v [H, m, *] from the warm groups, in keep_pos's order. ValueError when rows are missing."""
    H, m = layer.keep_pos.shape
    groups = [parts[i][0] for i in sorted(parts) if WARM_BASE <= i < HOT_BASE]
    if not m:
        if groups:
            raise ValueError("warm rows stored for an empty warm tier")
        layer.keep_k = layer._keep_store(torch.empty(H, 0, layer.D, device=device))
        layer.keep_v = layer._keep_store(torch.empty(H, 0, layer.Dv, device=device))
        return
    if not groups:
        raise ValueError(f"the state lists no warm rows for its {H * m} warm tokens")
    span = layer.seen + 1
    have = torch.cat([g["head"].long() * span + g["pos"] for g in groups]).to(device)  # [R]
    want = (torch.arange(H, device=device).unsqueeze(1) * span + layer.keep_pos).reshape(-1)  # [H*m]
    order = have.argsort()
    at = order[torch.searchsorted(have[order], want).clamp(max=have.numel() - 1)]
    if have.numel() != want.numel() or not torch.equal(have[at], want):
        raise ValueError("the warm groups do not hold the warm rows the state lists")
    for name in ("k", "v"):
        rows = [_get(_moved(g, device), name) for g in groups]
        if isinstance(rows[0], tuple):
            value = tuple(torch.cat([r[i] for r in rows])[at].reshape(H, m, -1) for i in range(3))
        else:
            value = torch.cat(rows)[at].reshape(H, m, -1)
        setattr(layer, "keep_k" if name == "k" else "keep_v", value)


def layer_parts(layer, skip: frozenset[int] | set[int] = frozenset()) -> dict[int, Part]:
    """index -> part, for every part but the head the (initialized) layer's state has (see `with_head`);
    the summary and live pages in `skip` (known unchanged) are left out."""
    parts: dict[int, Part] = {}
    nb, B = layer.n_blocks, layer.plan.block
    for g in range(math.ceil(nb / SUM_PAGE)):
        lo, hi = g * SUM_PAGE, min(nb, (g + 1) * SUM_PAGE)
        if SUM_BASE + g not in skip:
            tensors: dict = {}
            for name in _SUMS:
                _put(tensors, name, _rows(getattr(layer, name), lo, hi))
            parts[SUM_BASE + g] = (tensors, {"first_block": str(lo)}, (hi - lo) * B)
        if LIVE_BASE + g not in skip:
            parts[LIVE_BASE + g] = ({"live": layer.live[lo:hi].contiguous()}, {"first_block": str(lo)}, (hi - lo) * B)
    pos = layer.hot_pos  # [h] consecutive positions
    if pos.numel():
        first, last = int(pos[0]), int(pos[-1])
        for p in range(first // HOT_PAGE, last // HOT_PAGE + 1):
            lo, hi = max(first, p * HOT_PAGE) - first, min(last + 1, (p + 1) * HOT_PAGE) - first
            tensors = {"k": layer.hot_k[:, lo:hi].contiguous(), "v": layer.hot_v[:, lo:hi].contiguous()}
            parts[HOT_BASE + p] = (tensors, {"first": str(first + lo)}, hi - lo)
    parts |= warm_groups(layer.keep_pos, layer.keep_k, layer.keep_v, layer.plan.sink, layer.plan.block)
    return parts


def with_head(layer, parts: dict[int, Part], known: dict[int, bytes] | None = None
              ) -> tuple[dict[int, Part], dict[int, bytes]]:
    """The parts and the layer's head, which lists them with their digests (so that a resumed session
    knows what is stored without hashing it again); and every part's digest, the head's included.
    known: digests of parts the state has but `parts` leaves out (unchanged since they were stored)."""
    digests = dict(known or {}) | {i: digest(p) for i, p in parts.items()}
    listed = sorted(digests)
    tensors: dict = {"part_digests": torch.tensor([list(digests[i]) for i in listed], dtype=torch.uint8)
                     .reshape(len(listed), 16)}
    for name in _HEAD:
        value = getattr(layer, name)
        _put(tensors, name, value.to(torch.int32) if name in _POSITIONS else value)
    meta = {name: str(getattr(layer, name)) for name in _INTS}
    meta |= {"init": "1", "paged": "1", "model_dtype": str(layer.model_dtype).removeprefix("torch."),
             "parts": json.dumps(listed)}
    head = (tensors, meta, layer.seen)
    return parts | {HEAD_INDEX: head}, digests | {HEAD_INDEX: digest(head)}


def block_rows(layer) -> tuple[int, list[torch.Tensor], torch.Tensor]:
    """What the summary and live pages are cut from: (blocks, the summary tensors [nb, ...], live [nb, H, B])."""
    sums = [t for name in _SUMS for t in getattr(layer, name)]
    return layer.n_blocks, sums, layer.live


def _changed_rows(new: list[torch.Tensor], old: list[torch.Tensor], n: int) -> torch.Tensor:
    """[n] bool: blocks among the first n whose rows differ in any of the tensors."""
    changed = torch.zeros(n, dtype=torch.bool)
    for a, b in zip(new, old):
        if a is not b:
            changed |= (a[:n] != b[:n]).reshape(n, -1).any(1).cpu()
    return changed


def unchanged_pages(layer, before: tuple, stored: Callable[[int], bytes | None]) -> dict[int, bytes]:
    """index -> digest of the summary and live pages whose blocks (bounds and rows) are what they were in
    `before` (`block_rows` of the state whose part digests `stored(index)` gives), so a commit need not
    rebuild them.
    Summary rows only grow, and live rows change where a warm token goes back to its block."""
    n_old, sums_old, live_old = before
    n_new, sums_new, live_new = block_rows(layer)
    n = min(n_old, n_new)
    if not n:
        return {}
    changed = {SUM_BASE: _changed_rows(sums_new, sums_old, n), LIVE_BASE: _changed_rows([live_new], [live_old], n)}
    out = {}
    for g in range(math.ceil(n_new / SUM_PAGE)):
        lo, hi = g * SUM_PAGE, min(n_new, (g + 1) * SUM_PAGE)
        if hi > n or hi != min(n_old, (g + 1) * SUM_PAGE):  # the page grew (or shrank) since
            break
        for base, rows in changed.items():
            known = stored(base + g)
            if known is not None and not bool(rows[lo:hi].any()):
                out[base + g] = known
    return out


def pages_in_layout(parts: dict[int, Part], n_blocks: int) -> bool:
    """Whether a loaded state's summary and live pages are the ones `layer_parts` cuts now (SUM_PAGE blocks
    each, live masks in their own pages), so that their stored digests can stand for unchanged pages."""
    sizes = [min(SUM_PAGE, n_blocks - lo) for lo in range(0, n_blocks, SUM_PAGE)]
    for lo, hi, rows in ((SUM_BASE, LIVE_BASE, "sum_min.0"), (LIVE_BASE, WARM_BASE, "live")):
        try:
            pages = _pages(parts, lo, hi, rows)
        except (ValueError, KeyError):  # a gap, or a page without those rows
            return False
        if pages != [lo + g for g in range(len(sizes))] or [parts[i][0][rows].shape[0] for i in pages] != sizes:
            return False
    return True


def listed_digests(head: Part) -> dict[int, bytes] | None:
    """The digests a head lists for its parts (None for a head written before it listed them)."""
    listed, table = listed_parts(head[1]), head[0].get("part_digests")
    if listed is None or table is None or table.shape != (len(listed), 16):
        return None
    return {i: bytes(row.tolist()) for i, row in zip(listed, table)}


def listed_parts(head_meta: dict) -> list[int] | None:
    """The part indices a head lists (None for a state stored whole, before parts)."""
    if head_meta.get("paged") != "1":
        return None
    return [int(i) for i in json.loads(head_meta["parts"])]


def _pages(parts: dict[int, Part], lo: int, hi: int, rows: str) -> list[int]:
    """Indices of the pages in [lo, hi), in order; ValueError unless they cover blocks 0, 1, ... without gaps
    (a page holds its first block in its metadata and `rows`'s first dimension counts its blocks)."""
    pages = sorted(i for i in parts if lo <= i < hi)
    first = 0
    for i in pages:
        if int(parts[i][1].get("first_block", -1)) != first:
            raise ValueError(f"page {i - lo} of {part_name(i)} does not start at block {first}")
        first += parts[i][0][rows].shape[0]
    return pages


def assemble(layer, head: Part, parts: dict[int, Part], device: torch.device, dtypes: dict) -> None:
    """Set a layer's state from its head and the parts the head lists. ValueError when they disagree."""
    tensors, meta, _ = head
    for name in _INTS:
        setattr(layer, name, int(meta[name]))
    layer.model_dtype = dtypes[meta["model_dtype"]]
    layer.device = device
    on = _moved(tensors, device)
    for name in _HEAD:
        value = _get(on, name)
        setattr(layer, name, value.long() if name in _POSITIONS else value)
    _assemble_warm(layer, parts, device)
    pages = _pages(parts, SUM_BASE, LIVE_BASE, "sum_min.0")
    sums = [_moved(parts[i][0], device) for i in pages]
    H, D, Dv, B = layer.H, layer.D, layer.Dv, layer.plan.block
    for name in _SUMS:
        width = Dv if name == "sum_mean_v" else D
        empty = (torch.empty(0, H, width, dtype=torch.uint8, device=device),
                 torch.empty(0, H, 1, dtype=torch.float16, device=device),
                 torch.empty(0, H, 1, dtype=torch.float16, device=device))
        rows = [_get(s, name) for s in sums]
        setattr(layer, name, tuple(torch.cat([e] + [r[i] for r in rows]) for i, e in enumerate(empty)))
    lives = [{"live": parts[i][0]["live"].to(device)} for i in _pages(parts, LIVE_BASE, WARM_BASE, "live")]
    layer.live = torch.cat([torch.empty(0, H, B, dtype=torch.bool, device=device)] + [s["live"] for s in lives])
    if layer.live.shape[0] != layer.n_blocks:
        raise ValueError(f"summary pages hold {layer.live.shape[0]} blocks, the state says {layer.n_blocks}")
    hot = sorted(i for i in parts if HOT_BASE <= i < WARM_INDEX)
    ks = [parts[i][0]["k"].to(device) for i in hot]
    vs = [parts[i][0]["v"].to(device) for i in hot]
    starts = [int(parts[i][1]["first"]) for i in hot]
    got = [torch.arange(s, s + k.shape[1]) for s, k in zip(starts, ks)]
    got = torch.cat(got) if got else torch.empty(0, dtype=torch.long)
    if not torch.equal(got.to(device), layer.hot_pos):
        raise ValueError("the hot pages do not hold the hot positions the state lists")
    e = layer.sink_k.dtype
    layer.hot_k = torch.cat([torch.empty(H, 0, D, dtype=e, device=device)] + ks, 1)
    layer.hot_v = torch.cat([torch.empty(H, 0, Dv, dtype=e, device=device)] + vs, 1)
    layer.is_initialized = True
