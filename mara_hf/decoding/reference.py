"""The authors' serial MARA decoding, written to be obviously correct rather than fast.

One prompt at a time, one LLM forward per candidate, candidates judged in probability order until the first
accept. The candidate set comes from transformers' own `TopKLogitsWarper` + `TopPLogitsWarper`. Tests compare
the fast paths against this; `mara-hf bench` times it as the "serial" baseline.
"""

import copy

import torch
from transformers import DynamicCache, TopKLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

from ..utils import token_ids
from .caches import cache_arg
from .rule import DecisionRule
from .stats import MaraStats


@torch.no_grad()
def serial_generate(model, agent, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None, top_k: int | None = None,
                    top_p: float | None = None, threshold: float | None = None, fallback_index: int | None = None,
                    stats: MaraStats | None = None, decision: str = "greedy", seed: int = 0) -> list[list[int]]:
    """MARA decoding with strategy "first" of each row on its own; returns the new tokens of every row.

    `attention_mask` marks left padding, which is stripped: every row is decoded exactly as if it were alone.
    Decoding of a row stops after an EOS token or `max_new_tokens`. `decision="sample"`: candidate k is accepted
    when P(accept) exceeds the k-th of the uniform draws made for that step, one per candidate, from a CPU
    generator seeded with `seed` for each row (what `MaraProcessor(decision="sample", seed=seed)` does at batch 1).
    """
    cfg = agent.config
    top_k, top_p = top_k or cfg.top_k, top_p or cfg.top_p
    threshold = cfg.threshold if threshold is None else threshold
    fallback_index = cfg.fallback_index if fallback_index is None else fallback_index
    eos = set(token_ids(eos_token_id))
    warp_k, warp_p = TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)
    rule = DecisionRule("first", threshold, fallback_index)  # for its fallback: the serial loop below decides
    outputs = []
    for row in range(input_ids.shape[0]):
        draws = torch.Generator().manual_seed(seed)
        ids = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row].bool()]
        ids = ids[None]
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, **{cache_arg(model): cache}, use_cache=True).logits[:, -1].float()
        new = []
        for _ in range(max_new_tokens):
            warped = warp_p(ids, warp_k(ids, logits.clone()))[0]
            kept = torch.isfinite(warped).nonzero().flatten()
            candidates = kept[logits[0, kept].argsort(descending=True, stable=True)].tolist()
            choice = candidates[0]
            bars = [threshold] * len(candidates)
            if decision == "sample":
                bars = torch.rand(len(candidates), generator=draws).tolist()
            if len(candidates) > 1:
                fallback = candidates[int(rule.fallback(torch.tensor([len(candidates)])))]
                choice, index = fallback, None
                # Only full-attention layers are restored exactly by crop(-1); others (sliding windows drop their
                # oldest entry, recurrent states overwrite themselves) score each candidate on a copy of the cache.
                croppable = all(type(layer) is DynamicLayer for layer in cache.layers)
                for k, token in enumerate(candidates):
                    scratch = cache if croppable else copy.deepcopy(cache)
                    out = model(input_ids=torch.tensor([[token]], device=ids.device), **{cache_arg(model): scratch},
                                use_cache=True, output_hidden_states=True)
                    if croppable:
                        cache.crop(-1)
                    state = out.hidden_states[-1][0, -1]
                    if bool(agent(state).accept_prob > bars[k]):
                        choice, index = token, k
                        break
                if stats is not None:
                    _count(stats, len(candidates), index)
            new.append(choice)
            if choice in eos:
                break
            ids = torch.cat([ids, torch.tensor([[choice]], device=ids.device)], dim=1)
            logits = model(input_ids=ids[:, -1:], **{cache_arg(model): cache}, use_cache=True).logits[:, -1].float()
        outputs.append(new)
    return outputs


def _count(stats: MaraStats, n: int, index: int | None):
    one = torch.ones(1, dtype=torch.bool)
    first = torch.tensor([-1 if index is None else index])
    stats.add(one, torch.tensor([n]), first, torch.tensor([index is not None]))
    stats.scored += n if index is None else index + 1
    stats.forwards += n if index is None else index + 1
