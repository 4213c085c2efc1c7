"""MARA's fastest decoder: the candidate forward *is* the decode step.

`generate` with a `MaraProcessor` runs two forwards per token: generate's own, then the candidates'. Here the
forward that scores the candidates also extends the sequence: the chosen candidate's KV entry stays in the
cache and the LM head applied to its state gives the next step's logits (models that transform their logits
after the LM head run the candidates through the whole model instead), so each token costs one forward of
the (first few) candidates. The cache keeps every entry of every layer; sliding windows live in the masks. `decode` is the loop; `generate` (greedy inference) and the trainer's rollouts
(sampled actions) both run it.
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .caches import accepts_mask_dict, cache_arg, layer_layout
from .candidates import Candidates, ChunkFit, candidate_set, check_chunk_size, judge_candidates, transforms_logits
from .processor import MaraProcessor, keep_allowed

logger = logging.get_logger(__name__)


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
           chunk_size: "int | str | None", threshold, choose, stats=None, on_step=None, order=None, process=None,
           stop=None, on_token=None, chunks=None) -> torch.LongTensor:
    """The shared MARA decoding loop. `threshold(cands)` gives the accept bar (float or tensor), `choose(cands,
    decided, p_accept, bar)` the emitted index per row; `on_step(Step)` sees every step (training records it).
    `order(cands)`, when given, returns the candidates in the order the agent judges them (real candidates first),
    e.g. a sampled order in training; by default, probability order. For `model.generate`'s own settings:
    `process(sequences, logits)` transforms the logits before the candidate set is built (logits processors),
    `stop(sequences, logits)` marks rows that end after the token just emitted (stopping criteria), and
    `on_token(tokens)` sees each step's tokens (streamers). `chunks`, a `ChunkFit`, replaces `chunk_size` (a processor
    passes its own, whose fit its statistics then describe)."""
    check_fast(model)
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
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
                                            keep_cache=True, stats=stats, lm=lm, logits_out=chunk_logits, grow=grow)
        index = torch.where(decided, choose(cands, decided, p_accept, bar), 0)
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


@torch.no_grad()
def generate(model, mara: MaraProcessor, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, chunk_size: "int | str | None" = "auto", **kwargs) -> torch.LongTensor:
    """MARA greedy decoding, token-for-token the same as `model.generate(..., logits_processor=[mara])`.

    Returns `input_ids` followed by the new tokens, rows that ended early padded with `pad_token_id`, like
    `model.generate`. `chunk_size` candidates are scored per forward, in probability order, until every row has
    an accept (None: all at once; "auto": as `MaraProcessor`'s default). Only the arguments above are supported:
    use `model.generate` with the processor for sampling, beams or other logits processors. `mara.stats`
    describes the call afterwards.
    """
    if kwargs:
        raise ValueError(f"mara_hf.generate does not support {sorted(kwargs)}: use "
                         "model.generate(..., logits_processor=[mara]) for other generation settings.")
    check_chunk_size(chunk_size)
    if mara.model is not model:
        raise ValueError("The processor was built for another model: MaraProcessor(agent, model=model).")
    gen = model.generation_config
    eos = eos_token_id if eos_token_id is not None else gen.eos_token_id
    pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
    if pad is None:
        pad = eos if isinstance(eos, int) else (list(eos)[0] if eos else 0)
    try:
        check_fast(model)
    except NotImplementedError as why:
        logger.warning(f"{why} Falling back to model.generate with the processor (same tokens, slower).")
        mara._warned_slow = True  # one warning for the whole slow path
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             max_new_tokens=max_new_tokens or gen.max_new_tokens or 20, eos_token_id=eos,
                             pad_token_id=pad, do_sample=False, num_beams=1, logits_processor=[mara])
        return out
    return _decode_with(mara, model, input_ids, attention_mask, chunk_size, max_new_tokens=max_new_tokens or
                        gen.max_new_tokens or 20, eos=eos, pad=pad)


def _decode_with(mara: MaraProcessor, model, input_ids, attention_mask, chunk_size, lazy: bool | None = None,
                 choose=None, **loop) -> torch.LongTensor:
    """`decode` with `mara`'s agent and decision rule (greedy unless `choose` says otherwise); `mara.stats` describe
    the call afterwards. `lazy`: candidates may be scored in chunks that stop at the emitted one (default: greedy
    "first" and "veto", whose emission is the first accept, else the top candidate)."""
    lazy = mara.strategy in ("first", "veto") if lazy is None else lazy
    if mara.model is not model:
        raise ValueError("The processor was built for another model: MaraProcessor(agent, model=model).")
    mara.reset_stats()
    if chunk_size == mara.chunk_size and lazy:
        loop["chunks"] = mara._fit  # the processor's schedule, fitted from this call's `mara.stats`
    mara._busy = True  # keep the processor's hook out of these forwards
    try:
        return decode(model, mara.agent, input_ids, attention_mask, top_k=mara.top_k, top_p=mara.top_p,
                      chunk_size=chunk_size if lazy else None, threshold=mara.decision_bar,
                      choose=choose or (lambda c, d, p, bar: mara.choose(c, d, p, bar)[0]),
                      stats=mara.stats, **loop)
    finally:
        mara._busy = False


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


def _after_mara():
    """Processors `generate` appends after the user's `logits_processor` (sampling warpers, watermarks, logit
    normalisation): in `logits_processor=[mara]` they see the processor's output, so they come after MARA here too."""
    from transformers.generation import logits_process, watermarking

    names = ("TemperatureLogitsWarper", "TopHLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
             "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "LogitNormalization",
             "WatermarkLogitsProcessor", "SynthIDTextWatermarkLogitsProcessor")
    return tuple(c for c in (getattr(logits_process, n, None) or getattr(watermarking, n, None) for n in names) if c)


def split_processors(processors) -> tuple[LogitsProcessorList, LogitsProcessorList]:
    """(before MARA, after MARA): the trailing processors of the kinds generate appends after the user's."""
    after = _after_mara()
    cut = len(processors)
    while cut > 0 and isinstance(processors[cut - 1], after):
        cut -= 1
    return LogitsProcessorList(processors[:cut]), LogitsProcessorList(processors[cut:])


@torch.no_grad()
def custom_generate(mara: MaraProcessor, model, input_ids: torch.LongTensor, logits_processor, stopping_criteria,
                    generation_config, synced_gpus: bool = False, streamer=None, **model_kwargs):
    """The decoding loop `model.generate(..., custom_generate=mara.custom_generate)` hands to MARA (see
    `MaraProcessor.custom_generate`): generate prepares the inputs, logits processors and stopping criteria (max and
    min new tokens, EOS, stop strings) and this loop applies them around MARA's fast decoder."""
    gen = generation_config
    sample = bool(gen.do_sample)
    unsupported = []
    if (gen.num_beams or 1) > 1:
        unsupported.append(f"num_beams={gen.num_beams}")
    if synced_gpus:
        unsupported.append("synced_gpus=True")
    if gen.return_dict_in_generate and (gen.output_attentions or gen.output_hidden_states):
        unsupported.append("output_attentions / output_hidden_states")
    given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if given is not None and given.get_seq_length() > 0:  # generate's own fresh cache is empty
        unsupported.append("a cache passed in (it decodes with a cache of its own)")
    if unsupported:
        raise ValueError(f"MARA's custom_generate decodes one sequence per prompt, greedy or sampled; it does not "
                         f"support {', '.join(unsupported)}. Use model.generate(..., logits_processor=[mara]) for those.")
    if sample and mara.greedy_generate:
        raise ValueError("This processor was built with greedy_generate=True, a promise of greedy decoding: build it "
                         "without that flag to sample (custom_generate knows when it decodes greedily).")
    if any(p is mara for p in logits_processor):
        raise ValueError("Pass the processor either as custom_generate=mara.custom_generate or in logits_processor, "
                         "not both.")
    if any(isinstance(p, MaraProcessor) for p in logits_processor):
        raise ValueError("Another MaraProcessor is in logits_processor: combine veto agents in one processor instead, "
                         "MaraProcessor([agent_a, agent_b], model=model), and pass that one's custom_generate.")
    check_fast(model)
    pad = getattr(gen, "_pad_token_tensor", None)  # set by generate from pad_token_id (else EOS)
    pad = int(pad) if pad is not None else (gen.pad_token_id or 0)
    max_new = gen.max_length - input_ids.shape[1]
    if max_new < 1:
        raise ValueError(f"max_length={gen.max_length} leaves no room after the prompt's {input_ids.shape[1]} tokens: "
                         "set max_new_tokens.")
    want_scores = bool(gen.return_dict_in_generate and gen.output_scores)
    want_logits = bool(gen.return_dict_in_generate and gen.output_logits)
    before, after = split_processors(logits_processor) if sample else (logits_processor, LogitsProcessorList())
    scores_out, logits_out, now = [], [], {}

    def process(sequences, logits):  # generate's processors up to the user's, then MARA's candidate set
        if want_logits:
            logits_out.append(logits.clone())
        now["sequences"], now["scores"] = sequences, before(sequences, logits) if len(before) else logits
        return now["scores"]

    def choose(cands, decided, p_accept, bar):
        index, allowed = mara.choose(cands, decided, p_accept, bar)
        if not (sample or want_scores):
            return index
        scores = keep_allowed(now["scores"], cands, allowed)  # what logits_processor=[mara] hands on
        if sample:  # as generate's sampling loop: the warpers after MARA, then one draw per row
            scores = after(now["sequences"], scores) if len(after) else scores
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            index = ((cands.ids == token[:, None]) & cands.mask).int().argmax(-1)
        if want_scores:
            scores_out.append(scores)
        return index

    # Greedy "veto" scores candidates only up to the emitted one (the loop knows it is greedy: no promise flag).
    # Sampling from the accepted ones, or scores that say which were removed, need every candidate judged.
    lazy = mara.strategy == "first" or (mara.strategy == "veto" and not sample and not want_scores)
    out = _decode_with(mara, model, input_ids, model_kwargs.get("attention_mask"), mara.chunk_size, lazy=lazy,
                       choose=choose, max_new_tokens=max_new, eos=[], pad=pad, stop=stopping_criteria, process=process,
                       on_token=(lambda t: streamer.put(t.cpu())) if streamer is not None else None)
    if streamer is not None:
        streamer.end()
    if gen.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=out, scores=tuple(scores_out) if want_scores else None,
                                         logits=tuple(logits_out) if want_logits else None)
    return out
