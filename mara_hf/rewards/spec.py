"""Reward specs: `SOURCE[*MULTIPLIER]` strings parsed into reward sources. MARA's terminal reward is the sum over
sources of multiplier x score(prompt, response).

A source is given as a spec string `SOURCE[*MULTIPLIER]` (see `parse_reward_spec`):

    refusal                                  built-in: +1 / -1 for refusing harmful / answering benign prompts
    refusal-held                             built-in: the same, but a harmful request counts as refused only when
                                             the refusal holds (nothing of what was asked follows it)
    repetition*0.5                           built-in: minus the number of repeated 4-grams (loops cost)
    my_pkg.rewards:score*-1                  a Python function fn(prompts, responses) -> list[float]
    OpenAssistant/reward-model-deberta-v3-large-v2*0.5   a Hugging Face sequence-classification reward model (Hub id)
    ./my_rm_folder*0.5                       ... or a local folder
    guard:meta-llama/Llama-Guard-3-1B        a generative safety judge (Hub id or folder): P(safe verdict) in [0, 1]

The `guard:` prefix is reserved: `guard:X` always names a guard model `X` (a Hub id or local folder), never the
function `X` of a module called `guard`. A guard model (`GuardReward`) is an `AutoModelForCausalLM` in the
Llama Guard style that judges the conversation through its own chat template and answers "safe" or "unsafe";
the score is how likely it answers safe rather than unsafe. Its verdict texts (`safe_text`, `unsafe_text`,
`verdict_prefix`) are set from Python: `GuardReward(id, verdict_prefix="\\n\\n")` (what Llama Guard 3 needs), or
as the module:function source `my_guards:judge` for such an object `judge` from the command line.

Sources receive the raw prompt texts (not chat-formatted) and the response texts, and return unmultiplied
scores; `combine` applies the multipliers. Parsing is cheap (no model is loaded), so a trainer can validate
every spec before loading its LLM; `RewardSource.check()` goes one step further (e.g. reads a model's config).
"""

import importlib
import math
import os
import re
from collections.abc import Callable

from .base import CallableReward, RewardSource
from .builtin import BUILTINS
from .guard import GUARD_OPTIONS, GUARD_PREFIX, GuardReward
from .models import HFRewardModel

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_ACCEPTED_FORMS = ("a built-in name ({builtins}), module:function (an importable Python function "
                   "fn(prompts, responses) -> list[float]), a local reward model folder, a Hub reward model "
                   "id org/name, or guard:<Hub id or folder> for a generative safety judge (Llama Guard style); "
                   "each optionally followed by *MULTIPLIER, e.g. refusal*2 or org/rm*-0.5")


def parse_reward_spec(spec: str, **model_kwargs) -> RewardSource:
    """Build a reward source from `SOURCE[*MULTIPLIER]` without loading any model.

    `model_kwargs` (batch_size, device, dtype, template, label_index, ...) go to `HFRewardModel`; `GuardReward`
    (`guard:` specs) takes batch_size, device and dtype from them and ignores the others, as do the other sources.
    `GUARD_OPTIONS` (verdict_prefix, safe_text, unsafe_text) go to guard sources only.
    """
    text = spec.strip()
    source, multiplier = text, 1.0
    if "*" in text:
        source, _, factor = text.rpartition("*")
        source = source.strip()
        try:
            multiplier = float(factor)
        except ValueError:
            raise ValueError(f"Reward spec {spec!r}: multiplier {factor.strip()!r} is not a number") from None
        if not math.isfinite(multiplier):
            raise ValueError(f"Reward spec {spec!r}: the multiplier must be finite")
    if not source:
        raise ValueError(f"Reward spec {spec!r} names no source; give {_accepted()}")
    # the guard's verdict settings are for guard sources only
    guard_kwargs = {k: model_kwargs.pop(k) for k in GUARD_OPTIONS if k in model_kwargs}
    if source.startswith(GUARD_PREFIX):  # before module:function, which `guard:folder` would look like
        return _guard_source(spec, source[len(GUARD_PREFIX):].strip(), multiplier, {**model_kwargs, **guard_kwargs})
    if source in BUILTINS:
        return BUILTINS[source](multiplier=multiplier)
    if _CALLABLE.match(source):
        return CallableReward(_import_function(source), name=source, multiplier=multiplier)
    location = _model_location(source, "Reward")
    if location is None:
        raise ValueError(f"Unknown reward source {source!r}; give {_accepted()}")
    return HFRewardModel(location, multiplier=multiplier, **model_kwargs)


def _guard_source(spec: str, target: str, multiplier: float, model_kwargs: dict) -> "GuardReward":
    if not target:
        raise ValueError(f"Reward spec {spec!r} names no guard model; give {GUARD_PREFIX}<Hub id or local folder>")
    location = _model_location(target, "Guard")
    if location is None:
        raise ValueError(f"Guard model {target!r} is neither a local folder nor a Hub id org/name")
    return GuardReward(location, multiplier=multiplier, name=GUARD_PREFIX + target, **model_kwargs)


def _model_location(source: str, kind: str) -> str | None:
    """A model given as a local folder (its expanded path) or a Hub id (as given); None when it is neither. Short
    errors for a folder without config.json, a file, or a path that does not exist. `kind`: "Reward" or "Guard"."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{kind} model folder {source!r} has no config.json")
        return path
    if os.path.exists(path):
        raise ValueError(f"{kind} source {source!r} is a file; a {kind.lower()} model is given as its folder")
    if source.startswith((".", "/", "~")) or "\\" in source:  # clearly a path, not a Hub id
        raise ValueError(f"{kind} model folder {source!r} not found")
    return source if _HUB_ID.match(source) else None


def _accepted() -> str:
    return _ACCEPTED_FORMS.format(builtins=", ".join(sorted(BUILTINS)))


def _import_function(source: str) -> Callable:
    module_name, _, attribute = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only a missing *target* module is the spec's fault; a missing dependency inside it is re-raised.
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise
        raise ValueError(f"Reward {source!r}: module {module_name!r} not found (install it or add its folder "
                         f"to PYTHONPATH)") from None
    fn = module
    for part in attribute.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"Reward {source!r}: {module_name!r} has no attribute {attribute!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"Reward {source!r}: {attribute!r} is a {type(fn).__name__}, not a function")
    return fn
