"""MARA decoding as a Hub `custom_generate` recipe.

    model.generate(**inputs, custom_generate="<this repo>", trust_remote_code=True,
                   mara_agent="<agent repo id or folder>", max_new_tokens=256)

runs MARA's fast decoder as generate's decoding loop (`mara_hf.MaraProcessor.custom_generate`): greedy or
sampled, with generate's stopping criteria and logits processors. `mara_overrides={...}` overrides the agent's
decoding settings (e.g. {"threshold": 0.6}). Needs `pip install mara-hf` (custom_generate/requirements.txt).
"""

import weakref

from transformers import GenerationMixin

from mara_hf import MaraProcessor

# Set this to your agent's repo id when you push this folder next to it, so callers can leave out mara_agent.
DEFAULT_AGENT = None

_processors = weakref.WeakKeyDictionary()  # model -> {(agent, overrides): processor}, reused across calls


def generate(model, *args, mara_agent=None, mara_overrides=None, **kwargs):
    agent = mara_agent or DEFAULT_AGENT
    if agent is None:
        raise ValueError("Name the MARA agent to decode with: model.generate(..., custom_generate=<this repo>, "
                         "trust_remote_code=True, mara_agent='<agent repo id or folder>').")
    key = (str(agent), tuple(sorted((mara_overrides or {}).items())))
    mine = _processors.setdefault(model, {})
    if key not in mine:  # one processor per model and agent: its hooks are registered once
        mine[key] = MaraProcessor.from_pretrained(agent, model=model, **(mara_overrides or {}))
    return GenerationMixin.generate(model, *args, custom_generate=mine[key].custom_generate, **kwargs)
