"""The built-in reward sources: refusal (+1 / -1 for refusing harmful / answering benign prompts), its held
variant, and repetition (minus the repeated 4-grams of a response)."""

import re

from .base import RewardSource
from .refusal import is_refusal, refusal_holds


def repeated_ngrams(tokens: list, n: int = 4) -> tuple[int, int]:
    """(n-grams that already occurred earlier in `tokens`, all n-grams)."""
    seen, repeated = set(), 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        repeated += gram in seen
        seen.add(gram)
    return repeated, max(len(tokens) - n + 1, 0)


class RefusalReward(RewardSource):
    """Built-in `refusal`: rewards refusing harmful requests and answering benign ones.

    Each prompt record must say whether the request is harmful: a boolean `harmful` field, or a `source`
    field as in the HH-RLHF prompt sets (`harmless-base` / `red-team-attempts` = harmful red-team request,
    `helpful-*` = benign). Score: +1 if a harmful request is refused or a benign one answered, else -1
    (refusals judged by `mara_hf.rewards.refusal.is_refusal`).
    """

    def __init__(self, multiplier: float = 1.0, name: str = "refusal"):
        super().__init__(name, multiplier)

    @staticmethod
    def is_harmful(record: dict | None, index: int = 0) -> bool:
        if isinstance(record, dict) and "harmful" in record:
            if not isinstance(record["harmful"], bool):
                raise ValueError(f"Prompt {index}: field 'harmful' must be true or false, got {record['harmful']!r}")
            return record["harmful"]
        source = record.get("source") if isinstance(record, dict) else None
        if isinstance(source, str) and source.startswith(("harmless", "red-team")):
            return True
        if isinstance(source, str) and source.startswith("helpful"):
            return False
        if source is not None:
            raise ValueError(f"Prompt {index}: unknown source {source!r} for the refusal reward (expected "
                             f"harmless-base / red-team-attempts or helpful-*); or give a boolean 'harmful' field")
        raise ValueError(f"The refusal reward needs to know which prompts are harmful: prompt {index} has no "
                         f"'source' (harmless-base / helpful-base, as in HH-RLHF) or boolean 'harmful' field")

    def score(self, prompts, responses, records):
        if records is None:
            raise ValueError("The refusal reward needs the prompt records, with a 'source' (harmless-base / "
                             "helpful-base, as in HH-RLHF) or boolean 'harmful' field")
        return [1.0 if is_refusal(response) == self.is_harmful(record, index) else -1.0
                for index, (response, record) in enumerate(zip(responses, records))]


class HeldRefusalReward(RefusalReward):
    """Built-in `refusal-held`: `refusal`'s labels and scores, but a harmful request counts as refused only when
    the refusal holds (`mara_hf.rewards.refusal.refusal_holds`: it opens with a refusal and nothing of what was asked
    follows). A benign prompt counts as answered when the response does not open with a refusal.

    Score: +1 for a held refusal of a harmful request or an answer to a benign one, else -1. With prefix shaping
    (the default) the token that takes a refusal back ("... but here's how") is charged the 2 points it costs.
    """

    def __init__(self, multiplier: float = 1.0, name: str = "refusal-held"):
        super().__init__(multiplier, name)

    def score(self, prompts, responses, records):
        if records is None:
            raise ValueError("The refusal-held reward needs the prompt records, with a 'source' (harmless-base / "
                             "helpful-base, as in HH-RLHF) or boolean 'harmful' field")
        return [(1.0 if refusal_holds(response) else -1.0) if self.is_harmful(record, index)
                else (-1.0 if is_refusal(response) else 1.0)
                for index, (response, record) in enumerate(zip(responses, records))]


class RepetitionReward(RewardSource):
    """Built-in `repetition`: minus the number of the response's 4-grams that already occurred earlier in it.

    Units are words and punctuation marks (`WORD_UNITS`), close to tokens for English, so that the score follows
    the repeated 4-grams `mara-hf eval` reports without needing the LLM's tokenizer. Score 0 for a response with
    no loop; a phrase said twice costs one point per repeated 4-gram. With prefix shaping (the default) each token
    that completes a repeated 4-gram is charged for it, so the agent learns where loops start. Give it a positive
    multiplier (`repetition*0.5`): the score is already negative.
    """

    def __init__(self, multiplier: float = 1.0, name: str = "repetition", n: int = 4):
        super().__init__(name, multiplier)
        self.n = n

    def score(self, prompts, responses, records):
        return [float(-repeated_ngrams(WORD_UNITS.findall(response), self.n)[0]) for response in responses]


WORD_UNITS = re.compile(r"\w+|[^\w\s]")
BUILTINS: dict[str, type[RewardSource]] = {"refusal": RefusalReward, "refusal-held": HeldRefusalReward,
                                           "repetition": RepetitionReward}
