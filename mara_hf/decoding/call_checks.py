"""The calls a `MaraProcessor` refuses, before anything is scored: a call in another thread while it serves one, a
second processor in the same generate step, and assisted decoding (drafts, not one forward per token)."""

import threading
import weakref

from .callers import called_by_assisted_decoding
from .lookahead import LAST_CALL


def check_one_call_at_a_time(mara, serving):
    """Refuse a step of a generate call in another thread while processor `mara` serves a call there: it holds the
    state of one call (its statistics, draws and rule)."""
    other = mara._call() if mara._call is not None else None
    if (serving is not None and other is not None and other is not serving
            and mara._thread is not None and mara._thread != threading.get_ident()):
        raise RuntimeError("This MaraProcessor is serving a generate call in another thread: build one "
                           "MaraProcessor per thread (they may share the agent and the model).")


def check_alone(mara, input_ids):
    """Refuse a second MaraProcessor on the same model in the same generate step (`logits_processor=[a, b]`):
    each steers generate's forward for its own candidates, so together they would decode wrongly."""
    last = LAST_CALL.get(mara.model)
    if last is not None and last[0]() is not mara and last[1]() is input_ids:
        raise ValueError("Two MaraProcessors in one generate call (logits_processor=[a, b]) are not supported: "
                         "each steers the model's forward for its own candidates. Combine veto agents in one "
                         "processor instead: MaraProcessor([agent_a, agent_b], model=model) keeps the candidates "
                         "every agent accepts.")
    LAST_CALL[mara.model] = (weakref.ref(mara), weakref.ref(input_ids))


def check_one_forward_per_step(mara):
    """generate calls a logits processor once per forward. Assisted decoding calls it on drafts, several times
    per forward or before any: refused at once, before anything is scored (drafts' uniform fake logits would
    score the whole vocabulary), when a call with no forward since the last one comes from its loop."""
    forwards = mara._hooks.forwards
    if forwards == mara._forwards_at_call and called_by_assisted_decoding():
        raise ValueError("MaraProcessor follows generate's decoding one forward per token; assisted decoding "
                         "(prompt_lookup_num_tokens, assistant_model) calls it on drafted tokens. Generate "
                         "without them (greedy, sampling or beam search), or use "
                         "custom_generate=mara.custom_generate for MARA's own fast loop.")
    mara._forwards_at_call = forwards
