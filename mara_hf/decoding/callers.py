"""The transformers `generate` call that runs MARA, found among the callers.

A logits processor is handed only `(input_ids, scores)`; how the call decodes (its loop, generation config, the
processors after MARA, its streamer, the model it runs) lives in the frames of the transformers functions that call
it. `GenerateCall` is what the processor reads there once per call; `serving_list` and `in_prefill` are the cheap
per-step checks that tell one call from the next.
"""

import sys
from dataclasses import dataclass

# transformers' functions that run assisted decoding: the verification loop and the draft generators
ASSISTED_LOOPS = ("_assisted_decoding", "get_candidates")
# the decoding loops a logits processor is called from, one forward per token
DECODING_LOOPS = ("_sample", "_beam_search")


def transformers_frame(*names: str):
    """The innermost caller frame of a transformers function named one of `names`, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in names and frame.f_globals.get("__name__", "").startswith("transformers."):
            return frame
        frame = frame.f_back
    return None


def in_prefill(depth: int = 24) -> bool:
    """True when a forward is the prefill of a transformers `generate` call (its `_prefill` among the nearest
    callers): the first forward of a new call, also of one that continues a cache (`past_key_values=`)."""
    frame = sys._getframe(1)
    while frame is not None and depth > 0:
        name = frame.f_code.co_name
        if name in DECODING_LOOPS or name == "_prefill":
            return name == "_prefill" and frame.f_globals.get("__name__", "").startswith("transformers.")
        frame, depth = frame.f_back, depth - 1
    return False


def serving_list(depth: int = 4):
    """The `LogitsProcessorList` whose call runs the processor calling this (within `depth` frames), or None.
    generate builds a new list for every call and keeps it for the call's every step: its identity tells one call
    from the next."""
    from transformers import LogitsProcessorList

    code = LogitsProcessorList.__call__.__code__
    frame = sys._getframe(2)
    while frame is not None and depth > 0:
        if frame.f_code is code:
            return frame.f_locals.get("self")
        frame, depth = frame.f_back, depth - 1
    return None


@dataclass
class GenerateCall:
    """How the transformers `generate` call among the callers decodes, read from its decoding loop's locals.

    Attributes:
        mode: "greedy", "greedy_scored" (greedy, with the scores returned), "sample", "beams", or None (no
            transformers decoding loop among the callers).
        after: the logits processors that follow `processor` in that call (None when it is not among them).
        config: the call's generation config.
        model: the model `generate` runs on.
    """

    mode: "str | None" = None
    after: "object | None" = None
    config: "object | None" = None
    model: "object | None" = None

    @classmethod
    def find(cls, processor) -> "GenerateCall":
        from transformers import LogitsProcessorList

        frame = transformers_frame(*DECODING_LOOPS)
        if frame is None:
            return cls()
        local = frame.f_locals
        config, processors = local.get("generation_config"), list(local.get("logits_processor") or [])
        mine = [i for i, p in enumerate(processors) if p is processor]
        after = LogitsProcessorList(processors[mine[0] + 1:]) if mine else None
        model = local.get("self")
        if frame.f_code.co_name == "_beam_search":
            return cls("beams", after, config, model)
        if config is None:
            return cls(None, after, None, model)
        if config.do_sample:
            return cls("sample", after, config, model)
        # scores asked for should say which candidates the agent removed: every candidate judged
        wants_scores = bool(config.return_dict_in_generate and config.output_scores)
        return cls("greedy_scored" if wants_scores else "greedy", after, config, model)


def called_by_assisted_decoding() -> bool:
    """True when `generate`'s assisted-decoding loop (or its draft generator) is among the callers."""
    return transformers_frame(*ASSISTED_LOOPS) is not None
