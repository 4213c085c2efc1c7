"""MARA's fast loop behind the two fast entry points: `mara_hf.generate` (greedy, the loop alone) and
`custom_generate` (`model.generate(..., custom_generate=mara.custom_generate)`: generate prepares the inputs,
logits processors and stopping criteria, and this loop applies them around MARA's decoding). Both decode with a
`MaraProcessor`'s agent, decision rule and statistics (`MaraProcessor.fast_decode`)."""

from dataclasses import replace

import torch
from transformers import LogitsProcessorList
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from ..utils import token_ids
from .callers import transformers_frame
from .chunks import check_chunk_size
from .loop import check_fast
from .rule import keep_allowed
from .sampling import NOT_DRAWN, Draws, draws_possible, drawn_rule

logger = logging.get_logger(__name__)


@torch.no_grad()
def generate(model, mara, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, chunk_size: "int | str | None" = "auto", **kwargs) -> torch.LongTensor:
    """MARA greedy decoding with the processor `mara`, token-for-token the same as
    `model.generate(..., logits_processor=[mara])`.

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
        pad = (token_ids(eos) or [0])[0]
    max_new_tokens = max_new_tokens or gen.max_new_tokens or 20
    try:
        check_fast(model)
    except NotImplementedError as why:
        mara.warn_slow(f"{why} Falling back to model.generate with the processor (same tokens, slower).", always=True)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad, do_sample=False, num_beams=1,
                              logits_processor=[mara])
    # greedy: "first" and "veto" emit the first accept (else a fixed slot), so scoring may stop there
    lazy = mara.strategy in ("first", "veto")
    return mara.fast_decode(model, input_ids, attention_mask, lazy=lazy, chunk_size=chunk_size,
                            max_new_tokens=max_new_tokens, eos=eos, pad=pad)


def _is_mara(processor) -> bool:
    """A MARA processor (without importing its class: the processor module imports this one)."""
    return callable(getattr(processor, "custom_generate", None)) and hasattr(processor, "decide")


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
def custom_generate(mara, model, input_ids: torch.LongTensor, logits_processor, stopping_criteria,
                    generation_config, synced_gpus: bool = False, streamer=None, **model_kwargs):
    """The decoding loop `model.generate(..., custom_generate=mara.custom_generate)` hands to MARA (see
    `MaraProcessor.custom_generate`): generate prepares the inputs, logits processors and stopping criteria (max and
    min new tokens, EOS, stop strings) and this loop applies them around MARA's fast decoder."""
    gen = generation_config
    sample = bool(gen.do_sample)
    if streamer is None:  # transformers hands a callable custom_generate no `streamer=`: take generate's own
        streamer = _callers_streamer()
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
    if sample and mara.greedy_generate is True:
        raise ValueError("This processor was built with greedy_generate=True, a promise of greedy decoding: build it "
                         "without that flag to sample (custom_generate knows when it decodes greedily).")
    if any(p is mara for p in logits_processor):
        raise ValueError("Pass the processor either as custom_generate=mara.custom_generate or in logits_processor, "
                         "not both.")
    if any(_is_mara(p) for p in logits_processor):
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

    # Sampling with a veto agent: candidates judged in an order drawn from the warped scores, the first accepted
    # emitted (`decoding.sampling`), as the processor route does; the draws come in the same order (the order,
    # then generate's own multinomial), so a seed gives the same tokens in both routes. Processors after MARA
    # that MARA cannot apply itself (not transformers' own, or stateful): every candidate judged, they draw.
    drawn = sample and mara.strategy == "veto" and draws_possible(after)
    if sample and mara.strategy == "veto" and not drawn:
        mara._warn_mode(NOT_DRAWN)
    draws = Draws(after) if drawn else None
    rule_drawn = drawn_rule(mara.threshold) if drawn else None
    judge_all = drawn and mara.greedy_generate is False

    def rule(cands, decided, p_accept, bar):
        decision = mara.decide(cands, decided, p_accept, bar, rule=rule_drawn)
        if not (sample or want_scores):
            return decision
        scores = keep_allowed(now["scores"], cands, decision.allowed)  # what logits_processor=[mara] hands on
        if sample:  # as generate's sampling loop: the warpers after MARA, then one draw per row
            scores = after(now["sequences"], scores) if len(after) else scores
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            decision = replace(decision, index=((cands.ids == token[:, None]) & cands.mask).int().argmax(-1))
        if want_scores:
            scores_out.append(scores)
        return decision

    # Greedy "veto" scores candidates only up to the emitted one (the loop knows it is greedy: no promise flag),
    # sampled "veto" up to the first accepted draw; greedy scores that say which were removed need every one judged.
    lazy = mara.strategy == "first" or (mara.strategy == "veto" and not sample and not want_scores) or (
        drawn and not judge_all)
    out = mara.fast_decode(model, input_ids, model_kwargs.get("attention_mask"), lazy=lazy, rule=rule,
                           order=(lambda cands: draws.order(cands, now["sequences"], now["scores"])) if drawn else None,
                           max_new_tokens=max_new, eos=[], pad=pad, stop=stopping_criteria, process=process,
                           on_token=(lambda t: streamer.put(t.cpu())) if streamer is not None else None)
    if mara.trace:  # generate's stopping criteria end the rows here, not the loop
        mara.stats.ends = token_ids(gen.eos_token_id)
    if streamer is not None:
        streamer.end()
    if gen.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=out, scores=tuple(scores_out) if want_scores else None,
                                         logits=tuple(logits_out) if want_logits else None)
    return out



def _callers_streamer():
    """The `streamer=` given to the transformers `generate` call among the callers (None without one)."""
    frame = transformers_frame("generate")
    return None if frame is None else frame.f_locals.get("streamer")
