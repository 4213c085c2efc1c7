"""Batched candidate scoring: the last hidden states of K candidates after a prefix in one forward, and P(accept).

The K tokens go in as one sequence, all at the position after the prefix, with a 4D mask that lets each see the
(unpadded) prefix and itself only ("tree" attention). Their last hidden states equal those of K separate
prefix+candidate forwards. The masks follow each layer's cache and sliding window, and the candidates are taken out
of the cache again, however it stores them (see `caches`). `judge_candidates` scores chunk by chunk in probability
order and stops once every row has an accept (the paper's serial early stop, batched).
"""

import torch

from .caches import Scratch, cache_arg, row_subset, seq_length, tree_masks
from .candidates import Candidates


@torch.no_grad()
def score_candidates(base_model, cache, cand_ids: torch.LongTensor, prefix_mask: torch.Tensor | None,
                     positions: torch.LongTensor, keep_cache: bool = False, prefix_len: int | None = None,
                     lm=None, logits_out: list | None = None):
    """Last hidden states `(batch, K, hidden)` of every candidate appended to its row's prefix, in one forward.

    `cache` holds the prefix (its first `prefix_len` entries, default all; rows aligned with `cand_ids`),
    possibly followed by earlier candidates that stay invisible. The K new entries are taken out afterwards
    unless `keep_cache` (then `cache` must hold full-attention dynamic layers only), so a cache shared with
    `generate` comes back unchanged. Masks follow each layer's cache and sliding window (see `caches`); raises
    `MasksUnsupported` before any forward when the model cannot take them. With `lm` (the causal LM of
    `base_model`), the forward runs through it and the candidates' logits, as the model computes them (softcaps,
    scales), are appended to `logits_out`.
    """
    batch, n_cand = cand_ids.shape
    cached = seq_length(cache)
    prefix_len = cached if prefix_len is None else prefix_len
    dtype = next(base_model.parameters()).dtype
    mask = tree_masks(base_model, cache, prefix_mask, range(cached, cached + n_cand), [prefix_len] * n_cand,
                      [prefix_len] * n_cand, dtype, cand_ids.device)
    kwargs = dict(input_ids=cand_ids, attention_mask=mask, position_ids=positions[:, None].expand(batch, n_cand),
                  use_cache=True, **{cache_arg(base_model if lm is None else lm): cache})
    scratch = None if keep_cache else Scratch(cache).begin()
    try:
        if lm is None:
            states = base_model(**kwargs).last_hidden_state
        else:
            grabbed = []
            hook = base_model.register_forward_hook(lambda m, a, out: grabbed.append(out.last_hidden_state))
            try:
                logits = lm(**kwargs).logits
            finally:
                hook.remove()
            states = grabbed[-1]
            logits_out.append(logits)
    finally:
        if scratch is not None:
            scratch.end(n_cand)
    return states


@torch.no_grad()
def judge_candidates(base_model, agent, cache, cands: Candidates, decided: torch.BoolTensor,
                     prefix_mask: torch.Tensor | None, positions: torch.LongTensor, threshold,
                     chunk_size: int | None = None, keep_cache: bool = False, stats=None,
                     p_accept: torch.Tensor | None = None, start: int = 0, lm=None, logits_out: list | None = None,
                     grow: bool = False, stop_early: bool = True, unscored: float = 0.0):
    """P(accept) `(batch, K)` of the candidates, scored in probability order, chunk by chunk, and their states.

    Stops after the chunk in which every row that needs a decision (`decided`) has an accept: the paper's serial
    early stop, batched (with `stop_early`; off, every candidate is judged, chunk by chunk). Chunks after the first
    slot score only the rows still without an accept when those are at most half the batch (on a copy of their
    cache rows; dynamic full-attention caches). `threshold` is a float or a `(batch, K)`
    tensor (uniform draws make accepts samples).
    Unscored slots keep P(accept) `unscored` (0, or NaN to tell them apart: a rejection either way); NaN states
    count as rejections (P(accept) 0). Slots before `start` are taken as already
    judged in `p_accept`. With `keep_cache` the scored candidates' entries stay in `cache` after the prefix (a
    rows-alone chunk leaves zeros in the other rows' slots: callers emit only scored candidates).
    Returns `(p_accept, states)`, states `(batch, K_scored, hidden)` for slots `start..start+K_scored-1`. `lm` and
    `logits_out`: see `score_candidates` (one logits tensor per chunk). With `grow`, each chunk is twice the last.
    """
    width = cands.ids.shape[1]
    chunk = chunk_size or width
    prefix_len = seq_length(cache)
    if p_accept is None:
        p_accept = torch.full(cands.ids.shape, unscored, dtype=torch.float32, device=cands.ids.device)
    states = []
    lo = start
    batch = cands.ids.shape[0]
    rows = None  # the rows still needing a candidate after slot lo, once known (None: score every row)
    if stop_early and start > 0:
        rows = _rows_still_needing(p_accept, cands, decided, threshold, start)
        rows = rows if len(rows) else None
    while lo < width:
        hi = min(lo + chunk, width)
        sub = row_subset(cache, rows) if rows is not None and len(rows) <= batch // 2 else None
        if sub is not None:  # few rows still need candidates: score those rows alone, on a copy of their cache
            sub_logits = [] if logits_out is not None else None
            h_rows = score_candidates(base_model, sub, cands.ids[rows, lo:hi], None if prefix_mask is None else
                                      prefix_mask[rows], positions[rows], keep_cache=True, prefix_len=prefix_len,
                                      lm=lm, logits_out=sub_logits)
            h = h_rows.new_zeros((batch, hi - lo, h_rows.shape[-1]))
            h[rows] = h_rows
            where = rows
            if keep_cache:  # the other rows have their accept in an earlier slot: their new slots are never read
                _append_rows(cache, sub, rows, hi - lo)
            if logits_out is not None:
                full = sub_logits[0].new_zeros((batch, *sub_logits[0].shape[1:]))
                full[rows] = sub_logits[0]
                logits_out.append(full)
        else:
            h = h_rows = score_candidates(base_model, cache, cands.ids[:, lo:hi], prefix_mask, positions,
                                          keep_cache=keep_cache, prefix_len=prefix_len, lm=lm, logits_out=logits_out)
            where = slice(None)
        p = agent(h_rows).accept_prob.float()
        p_accept[where, lo:hi] = p.masked_fill(torch.isnan(h_rows).any(-1) | torch.isnan(p), 0.0)
        states.append(h)
        if stats is not None:
            stats.scored += h_rows.shape[0] * h_rows.shape[1]
            stats.forwards += 1
        if stop_early and hi < width:
            rows = _rows_still_needing(p_accept, cands, decided, threshold, hi)
            if len(rows) == 0:
                break
        lo, chunk = hi, chunk * 2 if grow else chunk
    return p_accept, torch.cat(states, dim=1) if states else None


def _append_rows(cache, sub, rows: torch.LongTensor, n: int):
    """Append `n` slots to every layer of `cache`: `sub`'s last `n` entries for `rows`, zeros for the rest."""
    for layer, part in zip(cache.layers, sub.layers):
        for name in ("keys", "values"):
            stored, new = getattr(layer, name), getattr(part, name)[:, :, -n:]
            grown = stored.new_zeros((stored.shape[0], stored.shape[1], n, stored.shape[3]))
            grown[rows] = new
            setattr(layer, name, torch.cat([stored, grown], dim=2))


def _still_needing(p_accept, cands: Candidates, decided, threshold, upto: int) -> torch.BoolTensor:
    """Per row: needs a decision, has no accept among its first `upto` slots, and has more slots."""
    bar = threshold[:, :upto] if torch.is_tensor(threshold) else threshold
    done = ((p_accept[:, :upto] > bar) & cands.mask[:, :upto]).any(-1)
    return decided & ~done & (cands.counts > upto)


def _rows_still_needing(p_accept, cands: Candidates, decided, threshold, upto: int) -> torch.LongTensor:
    return _still_needing(p_accept, cands, decided, threshold, upto).nonzero().flatten()


def decided_all(p_accept, cands: Candidates, decided, threshold, upto: int) -> torch.Tensor:
    """True when every row needing a decision has an accept among its first `upto` slots or has no more slots."""
    return ~_still_needing(p_accept, cands, decided, threshold, upto).any()


@torch.no_grad()
def score_rows(base_model, input_ids: torch.LongTensor, prefix_mask: torch.Tensor | None,
               cand_ids: torch.LongTensor) -> torch.Tensor:
    """Last hidden states `(batch, K, hidden)` of the candidates, with no custom mask and no cache: every
    prefix + candidate is a row of one ordinary forward (left-padded like generate's batches). The model builds
    its masks and states itself, as in plain `generate`, so this is right for any causal LM (sliding windows,
    chunked or linear attention, recurrent layers); it costs K forwards' worth of prefix tokens per step."""
    batch, n_cand = cand_ids.shape
    rows = torch.cat([input_ids.repeat_interleave(n_cand, dim=0), cand_ids.reshape(-1, 1)], dim=1)
    mask = None
    if prefix_mask is not None:
        mask = torch.cat([prefix_mask, prefix_mask.new_ones(batch, 1)], dim=1).repeat_interleave(n_cand, dim=0)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None else None
    out = base_model(input_ids=rows, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state[:, -1].reshape(batch, n_cand, -1)
