"""What a reward source is: a named scorer of (prompt, response) pairs with a multiplier, and how several combine.

Sources receive the raw prompt texts (not chat-formatted) and the response texts, and return unmultiplied scores;
`combine` applies the multipliers. `RewardSource.check()` validates a source cheaply (e.g. reads a model's config)
before any LLM is loaded.
"""

import inspect
import math
from collections.abc import Callable

from ..data.encoding import CONVERSATION


class RewardSource:
    """One reward: `source(prompts, responses, records)` -> one unmultiplied, finite score per response."""

    def __init__(self, name: str, multiplier: float = 1.0):
        self.name = name
        self.multiplier = float(multiplier)

    def score(self, prompts: list[str], responses: list[str], records: list[dict] | None) -> list[float]:
        raise NotImplementedError

    def check(self) -> None:
        """Cheap validation before any heavy loading (reading configs, not weights). Raises on problems."""

    def __call__(self, prompts: list[str], responses: list[str], records: list[dict] | None = None) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"Reward {self.name!r}: got {len(prompts)} prompts but {len(responses)} responses")
        if records is not None and len(records) != len(prompts):
            raise ValueError(f"Reward {self.name!r}: got {len(records)} records for {len(prompts)} prompts")
        scores = list(self.score(list(prompts), list(responses), records))
        if len(scores) != len(responses):
            raise ValueError(f"Reward {self.name!r} returned {len(scores)} scores for {len(responses)} responses")
        result = []
        for index, value in enumerate(scores):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"Reward {self.name!r} returned a non-number at index {index}: "
                                 f"{value!r:.80}") from None
            if not math.isfinite(value):
                raise ValueError(f"Reward {self.name!r} returned {value} at index {index}; scores must be finite")
            result.append(value)
        return result

    def as_trl_reward(self):
        """This source as a TRL reward function, `fn(prompts, completions, **kwargs) -> list[float]` (multiplied),
        for `GRPOTrainer(reward_funcs=[...])` and TRL's other online trainers: standard (text) and conversational
        (message lists: the prompt's user turn, the completion's assistant content) inputs, the dataset's further
        columns reaching the source as record fields (e.g. `harmful` for `refusal-held`)."""
        def reward(prompts, completions, **kwargs):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            users = [_user_text(p) if isinstance(p, list) else p for p in prompts]
            columns = {k: v for k, v in kwargs.items() if isinstance(v, (list, tuple)) and len(v) == len(texts)}
            records = [{"prompt": u, **{k: v[i] for k, v in columns.items()}} for i, u in enumerate(users)]
            return [self.multiplier * s for s in self(users, texts, records)]

        reward.__name__ = reward.__qualname__ = "".join(c if c.isalnum() else "_" for c in self.name)
        return reward

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, multiplier={self.multiplier:g})"


def _user_text(messages: list[dict]) -> str:
    """The last user turn of a conversational prompt (what the response answers)."""
    return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")


class CallableReward(RewardSource):
    """Wraps a Python reward function, called the way its signature asks:

    - `fn(prompts, responses) -> list[float]`, positionally; `fn` also gets `records=` when it takes that argument;
    - a TRL reward function (one with a `completions` parameter, e.g. `def reward(completions, **kwargs)`), called
      as TRL's trainers call it: with keywords, `prompts=` and `completions=` (texts, TRL's standard format) and,
      when it takes `**kwargs`, each further column of the prompt records as a keyword holding one value per
      response (as TRL passes a dataset's extra columns). Prompts that came as conversations (TRL's
      conversational format) are passed as TRL passes them: `prompts=` the message lists, `completions=` one
      assistant message per response (`[{"role": "assistant", "content": text}]`).
    """

    def __init__(self, fn: Callable, name: str | None = None, multiplier: float = 1.0):
        if not callable(fn):
            raise ValueError(f"Reward {name or fn!r} is not callable")
        super().__init__(name or getattr(fn, "__qualname__", repr(fn)), multiplier)
        self.fn = fn
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # some builtins have no signature
            params = []
        names = {p.name for p in params}
        self._var_keywords = any(p.kind is p.VAR_KEYWORD for p in params)
        self._trl = "completions" in names
        self._takes_records = not self._trl and ("records" in names or self._var_keywords)

    def score(self, prompts, responses, records):
        if self._trl:
            reserved = ("prompt", "prompts", "completions", CONVERSATION)
            columns = {}
            if self._var_keywords and records:
                keys = dict.fromkeys(k for r in records for k in r if k not in reserved)
                columns = {k: [r.get(k) for r in records] for k in keys}
            if records and all(CONVERSATION in r for r in records):  # a conversational dataset, as TRL passes it
                prompts = [r[CONVERSATION] for r in records]
                responses = [[{"role": "assistant", "content": text}] for text in responses]
            return self.fn(prompts=prompts, completions=responses, **columns)
        if self._takes_records:
            return self.fn(prompts, responses, records=records)
        return self.fn(prompts, responses)


def combine(sources: list[RewardSource], prompts: list[str], responses: list[str],
            records: list[dict] | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """Score with every source: (total = sum of multiplier x score per response, {name: unmultiplied scores})."""
    if not sources:
        raise ValueError("combine needs at least one reward source")
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"Reward source names must be unique, got {names}")
    per_source = {source.name: source(prompts, responses, records) for source in sources}
    total = [0.0] * len(responses)
    for source in sources:
        total = [t + source.multiplier * s for t, s in zip(total, per_source[source.name])]
    return total, per_source
