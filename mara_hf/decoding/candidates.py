"""Candidate sets and batched candidate scoring, shared by the processor, the fast decoder and training.

Scoring K candidates costs one forward: the K tokens go in as one sequence, all at the position after the
prefix, with a 4D mask that lets each see the (unpadded) prefix and itself only ("tree" attention). Their last
hidden states equal those of K separate prefix+candidate forwards. The masks follow each layer's cache and
sliding window, and the candidates are taken out of the cache again, however it stores them (see `caches`).
"""

from dataclasses import dataclass

import torch

from .caches import Scratch, cache_arg, row_subset, seq_length, tree_masks


def chunk_schedule(chunk_size, batch: int) -> tuple[int | None, bool]:
    """(first chunk, whether later chunks double) for a `chunk_size` setting: an int is a fixed chunk, None all
    candidates at once, "auto" 8 at batch 1 (which `ChunkFit` narrows to the agent) and 1, then 2, 4, 8... for larger batches. Why: a forward of a few
    tokens costs about one token's at batch 1 (memory-bound), while with many rows every scored candidate costs
    compute and most rows accept their first candidate; doubling bounds the forwards a row that rejects many
    candidates makes the others wait (docs/benchmarks.md). `ChunkFit` fits "auto" at batch 1 to the agent."""
    if chunk_size == "auto":
        return (8, False) if batch == 1 else (1, True)
    return chunk_size, False


# Cost of one scoring forward of w candidates at batch 1, relative to one of a single candidate: 1 + slope (w - 1).
# CPU: measured on SmolLM2-135M float32, prefix ~100 tokens (w1 52 ms, w4 77, w8 80, w16 111; docs/benchmarks.md).
# Elsewhere a forward of a few tokens is memory-bound and costs about one token's; that slope is assumed, not measured.
WIDTH_COST = {"cpu": 0.075}
WIDTH_COST_OTHER = 0.01


class ChunkFit:
    """The chunk schedule of one decoding call, fitted to what the agent has been doing in it.

    With `chunk_size="auto"` at batch 1, each step's first chunk is the width (1 to 8) with the least expected
    scoring cost over the call's decisions so far, chunks doubling after a miss: the expected cost of first width
    w is the mean, over the accepted-index histogram (fallbacks as a miss of every candidate), of the forwards it
    takes to reach that index, each costing `1 + slope (width - 1)` (`WIDTH_COST`). An agent that accepts its top
    candidate scores one candidate a step; one that rejects often scores several in one forward. The first
    decision of a call scores one. Any other setting, or a batch, follows `chunk_schedule`. Tokens never depend
    on the chunks: scoring stops at the same accept whatever they are.
    """

    def __init__(self, chunk_size):
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.fitted = (-1, 1)  # (decisions seen, first chunk fitted to them)
        self._costs = None  # (widths, top_k + 1) expected forwards' cost of each first width, per accepted index

    def __call__(self, batch: int, stats) -> tuple[int | None, bool]:
        chunk, grow = chunk_schedule(self.chunk_size, batch)
        if self.chunk_size != "auto" or batch != 1 or stats is None:
            return chunk, grow
        decisions = stats.decisions
        if decisions == 0:
            return 1, True
        if decisions != self.fitted[0]:
            seen = torch.cat([stats._index, stats._counts[4:5]]).float()  # accepts by index, then fallbacks
            if self._costs is None:
                slope = WIDTH_COST.get(seen.device.type, WIDTH_COST_OTHER)
                self._costs = width_costs(chunk, stats._index.numel(), slope).to(seen.device)
            # one sync: the cheapest first width (the narrowest of equals)
            self.fitted = (decisions, int((self._costs @ seen).argmin()) + 1)
        return self.fitted[1], True


def width_costs(max_width: int, top_k: int, slope: float) -> torch.Tensor:
    """`(max_width, top_k + 1)`: the cost of scoring, with first chunk w (row w - 1) doubling after each miss, up
    to candidate i (column i), or every candidate (last column, a fallback); a forward of n costs 1 + slope (n - 1)."""
    costs = torch.zeros(max_width, top_k + 1, dtype=torch.float64)
    for w in range(1, max_width + 1):
        for i in range(top_k + 1):
            lo, n, cost = 0, w, 0.0
            while lo <= min(i, top_k - 1):
                n = min(n, top_k - lo)
                cost += 1 + slope * (n - 1)
                lo, n = lo + n, n * 2
            costs[w - 1, i] = cost
    return costs.float()


def check_chunk_size(chunk_size):
    if not (chunk_size is None or chunk_size == "auto" or (isinstance(chunk_size, int) and chunk_size >= 1)):
        raise ValueError(f"chunk_size must be 'auto', None or an int >= 1, got {chunk_size!r}.")


# Config fields of models whose logits are not simply lm_head(last hidden state).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def transforms_logits(model) -> bool:
    """True for models whose logits are not lm_head(last hidden state): their next logits cannot be derived
    from a candidate's state (the fast path and the processor's lookahead rely on that)."""
    config = model.config.get_text_config()
    return any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


@dataclass
class Candidates:
    """The candidate sets of a batch, most probable first, padded to the batch's largest set.

    Attributes:
        ids (`LongTensor` of shape `(batch, K)`): candidate token ids; padding slots repeat the top-1 token.
        logprobs (`FloatTensor` of shape `(batch, K)`): the LLM's untempered log-probabilities of the candidates
            over the whole vocabulary (-inf on padding slots).
        mask (`BoolTensor` of shape `(batch, K)`): which slots hold a real candidate.
        counts (`LongTensor` of shape `(batch,)`): number of candidates per row (at least 1).
    """

    ids: torch.LongTensor
    logprobs: torch.FloatTensor
    mask: torch.BoolTensor
    counts: torch.LongTensor


def candidate_set(scores: torch.Tensor, top_k: int, top_p: float) -> Candidates:
    """Top-k, then top-p of those renormalised, exactly as `TopKLogitsWarper` + `TopPLogitsWarper` keep them.

    `scores` are the untempered next-token scores `(batch, vocab)`. Works on the top-k values only, so it
    never sorts the vocabulary. Ties (frequent in float16/bfloat16 logits): as in `TopKLogitsWarper`, every token
    tied with the k-th one stays; `TopPLogitsWarper` sorts with an unstable sort, so which of several tokens tied
    at the top-p boundary it drops is arbitrary: here the order of a stable ascending sort decides (lower token id
    dropped first), the same on every device. Candidates are ordered by probability, ties by lower token id first.
    """
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    k = min(top_k, scores.shape[-1])
    top = logprobs.topk(k, dim=-1)
    kth = top.values[:, -1:]
    # TopKLogitsWarper removes only the tokens strictly below the k-th value: tokens tied with it stay.
    width = max(int(((logprobs >= kth) & (logprobs > float("-inf"))).sum(-1).max()), 1)
    # the top k are the candidates unless ties with the k-th token widen the set (one topk over the vocabulary per
    # step where possible: at batch 1 on a CPU it costs about a third of a millisecond)
    ids = top.indices if width == k else logprobs.topk(width, dim=-1).indices
    ids_asc = ids.sort(dim=-1).values  # by token id, as the warpers see them
    lp_asc = logprobs.gather(1, ids_asc)
    lp_asc = lp_asc.masked_fill(lp_asc < kth, float("-inf"))
    # TopPLogitsWarper: stable ascending sort, drop the tokens whose cumulative mass from below is <= 1 - p,
    # always keep the most probable one.
    low_lp, low_order = lp_asc.sort(dim=-1, stable=True)
    drop = torch.softmax(low_lp, dim=-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    keep = torch.zeros_like(drop).scatter_(1, low_order, ~drop) & (lp_asc > float("-inf"))
    lp, order = lp_asc.masked_fill(~keep, float("-inf")).sort(dim=-1, descending=True, stable=True)
    ids, mask = ids_asc.gather(1, order), keep.gather(1, order)
    mask[:, 0] = True  # the most probable token always stays
    counts = mask.sum(-1)
    width = int(counts.max())
    ids, lp, mask = ids[:, :width], lp[:, :width], mask[:, :width]
    ids = torch.where(mask, ids, ids[:, :1])
    return Candidates(ids=ids, logprobs=lp.masked_fill(~mask, float("-inf")), mask=mask, counts=counts)


def next_positions(prefix_len: int, prefix_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                   batch: int, device) -> torch.LongTensor:
    """Position id of the token after the prefix, per row: generate's last position + 1 when known."""
    if position_ids is not None and position_ids.shape[0] == batch:
        return position_ids[:, -1].to(device) + 1
    if prefix_mask is not None:  # generate's scheme: positions count real tokens from 0
        return prefix_mask.long().sum(-1).to(device)
    return torch.full((batch,), prefix_len, dtype=torch.long, device=device)


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
                     grow: bool = False, stop_early: bool = True):
    """P(accept) `(batch, K)` of the candidates, scored in probability order, chunk by chunk, and their states.

    Stops after the chunk in which every row that needs a decision (`decided`) has an accept: the paper's serial
    early stop, batched (with `stop_early`; off, every candidate is judged, chunk by chunk). Chunks after the first
    slot score only the rows still without an accept when those are at most half the batch (on a copy of their
    cache rows; dynamic full-attention caches). `threshold` is a float or a `(batch, K)`
    tensor (uniform draws make accepts samples).
    Unscored slots keep P(accept) 0; NaN states count as rejections. Slots before `start` are taken as already
    judged in `p_accept`. With `keep_cache` the scored candidates' entries stay in `cache` after the prefix (a
    rows-alone chunk leaves zeros in the other rows' slots: callers emit only scored candidates).
    Returns `(p_accept, states)`, states `(batch, K_scored, hidden)` for slots `start..start+K_scored-1`. `lm` and
    `logits_out`: see `score_candidates` (one logits tensor per chunk). With `grow`, each chunk is twice the last.
    """
    width = cands.ids.shape[1]
    chunk = chunk_size or width
    prefix_len = seq_length(cache)
    if p_accept is None:
        p_accept = torch.zeros(cands.ids.shape, dtype=torch.float32, device=cands.ids.device)
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
