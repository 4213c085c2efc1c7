"""One step of `MaraProcessor`: P(accept) of the step's candidates, from the lookahead's states where it scored
them inside generate's forward, and from scoring forwards on generate's own KV cache for the rest."""

import torch

from .caches import MasksUnsupported, room
from .scoring import decided_all, judge_candidates, score_rows


def score_step(mara, input_ids, cands, decided, ahead, bar, lazy: bool):
    """P(accept) `(batch, K)` of the candidates of processor `mara`'s step, and the states of slots 0..n-1
    `(batch, n, hidden)` (None when nothing was scored). The lookahead's states cover the leading slots whose ids it
    scored, in every row; the rest is scored on generate's cache, only when some row still needs it. `lazy`: the
    rule emits the first accepted candidate in the judging order, so judging may stop there."""
    width = cands.ids.shape[1]
    p_accept = torch.full(cands.ids.shape, mara._unscored, dtype=torch.float32, device=cands.ids.device)
    states, start = None, 0
    if ahead is not None and ahead.ids.shape[0] == cands.ids.shape[0]:
        # the leading candidates (in the order judged: by probability, or drawn) that the lookahead scored,
        # wherever they sit among its ids
        match = (cands.ids[:, :, None] == ahead.ids[:, None, :]) & ahead.valid[:, None, :]
        start = int(match.any(-1).int().cumprod(-1).sum(-1).min())
        if start > 0:
            where = match[:, :start].int().argmax(-1)
            states = ahead.states.gather(1, where[..., None].expand(-1, -1, ahead.states.shape[-1]))
            p = mara.agent(states).accept_prob.float()
            p_accept[:, :start] = p.masked_fill(torch.isnan(states).any(-1) | torch.isnan(p), 0.0)
    if not bool(decided.any()) or start >= width:
        return p_accept, states
    if lazy and start > 0 and bool(decided_all(p_accept, cands, decided, bar, start)):
        return p_accept, states  # the other strategies need every candidate judged; lazy ones may stop here
    chunk, grow = mara._fit(input_ids.shape[0], mara.stats) if lazy else (None, False)
    hooks = mara._hooks
    with hooks.paused():  # the scoring forwards are not generate's
        try:
            cache, mask, positions = hooks.prefix(input_ids, mara.warn_slow)
            # a static cache has room for this many more entries: score at most that many at a time
            if room(cache) < width:
                chunk, grow = min(chunk or width, room(cache)), False
            p_accept, more = judge_candidates(mara.model.base_model, mara.agent, cache, cands, decided, mask,
                                              positions, bar, chunk, stats=mara.stats, p_accept=p_accept,
                                              grow=grow, start=start, stop_early=lazy)
        except MasksUnsupported as why:
            mara.warn_slow(f"MaraProcessor cannot score candidates on a shared KV cache for this model ({why}): "
                           "it re-encodes the prefix and scores each candidate as its own row; exact but slow.")
            mask = hooks.seen.get("attention_mask")
            mask = None if mask is None or bool(mask.all()) else mask
            more = score_rows(mara.model.base_model, input_ids, mask, cands.ids[:, start:])
            p = mara.agent(more).accept_prob.float()
            p_accept[:, start:] = p.masked_fill(torch.isnan(more).any(-1) | torch.isnan(p), 0.0)
            mara.stats.scored += more.shape[0] * more.shape[1]
            mara.stats.forwards += 1
    return p_accept, more if states is None else torch.cat([states, more], dim=1)
