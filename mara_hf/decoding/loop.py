"""MARA's fastest decoder: the candidate forward *is* the decode step.

`generate` with a `MaraProcessor` runs two forwards per token: generate's own, then the candidates'. Here the
forward that scores the candidates also extends the sequence: the chosen candidate's KV entry stays in the
cache and the LM head applied to its state gives the next step's logits (models that transform their logits
after the LM head run the candidates through the whole model instead), so each token costs one forward of
the (first few) candidates. The cache keeps every entry of every layer; sliding windows live in the masks.
`decode` is the loop; `mara_hf.generate`, `custom_generate` (see `decoding.generate`), SAC rollouts and imitation
all run it, each with its own bars and the one decision rule (`decoding.rule`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..utils import token_ids
from .caches import accepts_mask_dict, cache_arg, layer_layout
from .candidates import Candidates, candidate_set, transforms_logits
from .chunks import ChunkFit
from .rule import Decision
from .scoring import judge_candidates


@dataclass
class Step:
    """One decoding step of a batch, as `decode` hands it to `on_step`."""

    cands: Candidates
    decided: torch.BoolTensor  # rows where the agent was asked (more than one candidate, not finished)
    p_accept: torch.FloatTensor  # (batch, K); 0 where not scored
    threshold: "float | torch.Tensor"  # what P(accept) had to exceed
    states: torch.Tensor  # (batch, K_scored, hidden)
    index: torch.LongTensor  # emitted candidate per row
    finished: torch.BoolTensor  # rows that had already ended before this step


@torch.no_grad()
def decode(model, agent, input_ids, attention_mask, *, max_new_tokens: int, eos, pad: int, top_k: int, top_p: float,
           chunk_size: "int | str | None", threshold, rule: "Callable[..., Decision]", stats=None, on_step=None,
           order=None, process=None, stop=None, on_token=None, chunks=None,
           unscored: float = 0.0) -> torch.LongTensor:
    """The shared MARA decoding loop. `threshold(cands)` gives the accept bars (float or `(batch, K)` tensor),
    `rule(cands, decided, p_accept, bar)` the `Decision` (a `DecisionRule`, or a callable that applies one and
    records it); the emitted token is the decision's `index`. `on_step(Step)` sees every step (training records it).
    `order(cands)`, when given, returns the candidates in the order the agent judges them (real candidates first),
    e.g. a sampled order in training; by default, probability order. For `model.generate`'s own settings:
    `process(sequences, logits)` transforms the logits before the candidate set is built (logits processors),
    `stop(sequences, logits)` marks rows that end after the token just emitted (stopping criteria), and
    `on_token(tokens)` sees each step's tokens (streamers). `chunks`, a `ChunkFit`, replaces `chunk_size` (a processor
    passes its own, whose fit its statistics then describe). `unscored`: P(accept) of candidates left unjudged (0, or
    NaN for a rule that tells them apart, as a tracing processor does)."""
    check_fast(model)
    eos = torch.tensor(token_ids(eos), device=input_ids.device)
    base, head = model.base_model, model.get_output_embeddings()
    # Models that change their logits after the LM head (softcaps, scales): the candidates' forward runs through
    # the whole model, whose logits of the chosen candidate serve the next step.
    lm = model if transforms_logits(model) else None
    batch = input_ids.shape[0]
    chunks = chunks or ChunkFit(chunk_size)  # "auto" at batch 1 narrows to the agent, from `stats`
    mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else None
    # Full-attention storage for every layer: sliding windows are applied by the masks (see `caches`), so a
    # chosen candidate's entry can simply be kept after the prefix.
    cache = DynamicCache()
    if lm is None:
        hidden = base(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      **{cache_arg(base): cache}).last_hidden_state[:, -1]
        logits = head(hidden)
    else:
        logits = lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_arg(lm): cache}).logits[:, -1]
    next_pos = positions[:, -1] + 1 if positions is not None else torch.full(
        (batch,), input_ids.shape[1], device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    rows = torch.arange(batch, device=input_ids.device)
    new_tokens = []
    sequences = input_ids
    for _ in range(max_new_tokens):
        if process is not None:
            logits = process(sequences, logits)
        cands = candidate_set(logits.float(), top_k, top_p)
        if order is not None:
            cands = order(cands)
        decided = (cands.counts > 1) & ~finished
        bar = threshold(cands)
        prefix_len = cache.get_seq_length()
        chunk_logits = [] if lm is not None else None
        chunk, grow = chunks(batch, stats)
        p_accept, states = judge_candidates(base, agent, cache, cands, decided, mask, next_pos, bar, chunk,
                                            keep_cache=True, stats=stats, lm=lm, logits_out=chunk_logits, grow=grow,
                                            unscored=unscored)
        index = torch.where(decided, rule(cands, decided, p_accept, bar).index, 0)
        if on_step is not None:
            on_step(Step(cands, decided, p_accept, bar, states, index, finished.clone()))
        token = torch.where(finished, pad, cands.ids[rows, index])
        new_tokens.append(token)
        finished |= torch.isin(token, eos)
        if process is not None or stop is not None:
            sequences = torch.cat([sequences, token[:, None]], dim=1)
        if stop is not None:
            finished |= stop(sequences, logits)
        if on_token is not None:
            on_token(token)
        if bool(finished.all()):
            break
        _keep_entry(cache, prefix_len, index)
        logits = head(states[rows, index]) if lm is None else torch.cat(chunk_logits, dim=1)[rows, index]
        next_pos = next_pos + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def check_fast(model):
    """Raise `NotImplementedError` (with the reason) for models the fast decoder cannot run: attention layers
    other than full / sliding-window, or full and sliding layers in a model that takes one mask for all."""
    layout = layer_layout(model)
    if layout is None:
        raise NotImplementedError(f"MARA's fast decoder supports full and sliding-window attention layers only; "
                                  f"{model.config.model_type} has others. Use model.generate(..., "
                                  "logits_processor=[mara]).")
    if len({w for w in layout[1]}) > 1 and not accepts_mask_dict(model.base_model):
        raise NotImplementedError(f"{model.config.model_type} mixes full and sliding-window layers but takes one "
                                  "attention mask for all: use model.generate(..., logits_processor=[mara]).")


def _keep_entry(cache: DynamicCache, prefix_len: int, index: torch.LongTensor):
    """Keep the prefix plus, per row, the cache entry of candidate `index` (scored right after the prefix)."""
    # The chosen entry is written into the first candidate slot and the rest sliced off (a view): no copy of the
    # prefix, which the cache's next update copies anyway. When every row keeps its first candidate (most steps of
    # a trained agent) the entry is in place already: 60 small copies a step saved (about 2% of a step at batch 1).
    moved = bool(index.any())
    for layer in cache.layers:
        if moved:
            gather = (prefix_len + index).view(-1, 1, 1, 1).expand(-1, layer.keys.shape[1], 1, layer.keys.shape[3])
        for name in ("keys", "values"):
            stored = getattr(layer, name)
            if moved:
                stored[:, :, prefix_len:prefix_len + 1] = stored.gather(2, gather)
            if stored.shape[2] > prefix_len + 1:
                setattr(layer, name, stored[:, :, :prefix_len + 1])
