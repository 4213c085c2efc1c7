"""Candidate sets: the tokens the agent judges at a step (top-k, then top-p), most probable first."""

from dataclasses import dataclass

import torch


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


