"""Demonstrations from preference pairs: make MARA follow the chosen response and leave the rejected one where the
two part.

Each pair's responses are tokenized as continuations of the prompt and compared token by token; at the first one
that differs (the *parting* step) the pair says which continuation is preferred. The chosen response is followed
through forced decisions (`rollouts.follow`) up to `response_tokens` tokens past the parting step (a token at rank k:
k rejections, one accept), and at the parting step the rejected response's token is recorded as a rejection too,
wherever it ranks. What a pair cannot teach: a chosen token outside the candidate set (the agent can only reject
candidates; the pair's decisions stop there) and a rejected token outside it (nothing to reject: the LLM never
emits it anyway).

`agreement` measures what an agent does on held-out pairs: the share of pairs, among those whose two parting
tokens are both candidates, where it accepts the chosen one's and rejects the rejected one's.
"""

import torch
from transformers.utils import logging

from ..utils import token_ids
from .rollouts import Decisions, decision_arrays, follow_tokens, parting_step

logger = logging.get_logger(__name__)


class PairDemonstrations:
    """The forced decisions along preference `pairs` (records with prompt, chosen, rejected).

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        pairs: from `mara_hf.data.pairs.load_pairs`.
        config: `ImitationConfig` (response_tokens, top_k, top_p, rollout_batch_size).
    """

    def __init__(self, model, tokenizer, pairs: list[dict], config):
        if not pairs:
            raise ValueError("No preference pairs to learn from.")
        self.model, self.tokenizer, self.pairs, self.config = model, tokenizer, list(pairs), config
        eos = model.generation_config.eos_token_id
        self.eos = token_ids(eos)
        self.stats = {}

    def tokens(self, pair: dict) -> tuple[list[int], list[int], int] | None:
        """(chosen ids, rejected ids, parting step) of a pair, each response ending with the end-of-turn token;
        None when the two tokenize the same."""
        end = self.eos[:1]
        chosen = self.tokenizer(pair["chosen"], add_special_tokens=False)["input_ids"] + end
        rejected = self.tokenizer(pair["rejected"], add_special_tokens=False)["input_ids"] + end
        t = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
        if t is None:
            return None
        return chosen, rejected, t

    @torch.no_grad()
    def collect(self) -> dict:
        """`states` `(N, hidden)` float16, `labels` (1 accept, 0 reject) and `steered` (the parting step's
        decisions, the rejected token's included)."""
        c = self.config
        parts, counts = [], {"pairs": len(self.pairs), "chosen_followed_to_parting": 0, "rejected_recorded": 0,
                             "same_tokens": 0}
        tokenized = [(p, self.tokens(p)) for p in self.pairs]
        counts["same_tokens"] = sum(t is None for _, t in tokenized)
        usable = [(p, t) for p, t in tokenized if t is not None]
        for i in range(0, len(usable), c.rollout_batch_size):
            part, seen = self._batch(usable[i:i + c.rollout_batch_size])
            parts.append(part)
            for key in ("chosen_followed_to_parting", "rejected_recorded"):
                counts[key] += seen[key]
        self.stats = counts
        logger.warning(f"Preference pairs: {counts['chosen_followed_to_parting']} of {len(usable)} chosen responses "
                       f"followed to the parting token, {counts['rejected_recorded']} rejected parting tokens recorded "
                       "(a token outside the candidate set cannot be).")
        if not parts:
            return decision_arrays([], [], self.model.config.get_text_config().hidden_size, "steered")
        return {k: torch.cat([p[k] for p in parts]) for k in ("states", "labels", "steered")}

    def _batch(self, batch) -> tuple[dict, dict]:
        c = self.config
        prompts = [p["prompt"] for p, _ in batch]
        chosen = [ids[:t + c.response_tokens] for _, (ids, _, t) in batch]
        parting = [t for _, (_, _, t) in batch]
        followed = self.follow(prompts, chosen)
        # the rejected responses up to their parting token: its state, at the end of that step's judged candidates
        ends = self.follow(prompts, [ids[:t + 1] for _, (_, ids, t) in batch])
        decided, marked = [], []
        seen = {"chosen_followed_to_parting": 0, "rejected_recorded": 0}
        for row, t in enumerate(parting):
            chosen_step = parting_step(followed, row, t)
            seen["chosen_followed_to_parting"] += chosen_step is not None
            decided += followed.decisions[row]
            marked += [d.token == t for d in followed.decisions[row]]
            rejected = parting_step(ends, row, t)  # the rejected token's state is the last judged there
            # recorded unless it ranked above the chosen token (then the chosen step rejected it already)
            if rejected is not None and (chosen_step is None or len(rejected.accepts) > len(chosen_step.accepts)):
                decided.append(Decisions(t, rejected.states[-1:], torch.zeros(1, dtype=torch.bool),
                                         rejected.logprobs, rejected.p_accept))
                marked.append(True)
                seen["rejected_recorded"] += 1
        return decision_arrays(decided, marked, self.model.config.get_text_config().hidden_size, "steered"), seen

    def follow(self, prompts: list[str], responses: list[list[int]]):
        """Forced decisions along each response's tokens (`rollouts.follow_tokens`)."""
        return follow_tokens(self.model, self.tokenizer, prompts, responses, eos=self.eos, top_k=self.config.top_k,
                             top_p=self.config.top_p)


@torch.no_grad()
def agreement(agent, model, tokenizer, pairs: list[dict], config, threshold: float | None = None) -> dict:
    """On `pairs`: how many have both parting tokens among the candidates, and the share of those where `agent`
    accepts the chosen response's token and rejects the rejected one's (at `threshold`, default its own). An agent
    that accepts everything agrees with none; one that says the same of every candidate too."""
    threshold = agent.config.threshold if threshold is None else threshold
    demos = PairDemonstrations(model, tokenizer, pairs, config)
    judged, agreed = 0, 0
    usable = [(p, demos.tokens(p)) for p in pairs]
    usable = [(p, t) for p, t in usable if t is not None]
    for i in range(0, len(usable), config.rollout_batch_size):
        batch = usable[i:i + config.rollout_batch_size]
        prompts = [p["prompt"] for p, _ in batch]
        chosen = demos.follow(prompts, [ids[:t + 1] for _, (ids, _, t) in batch])
        rejected = demos.follow(prompts, [ids[:t + 1] for _, (_, ids, t) in batch])
        for row, (_, (_, _, t)) in enumerate(batch):
            c, r = parting_step(chosen, row, t), parting_step(rejected, row, t)
            if c is None or r is None:
                continue
            judged += 1
            p = agent(torch.cat([c.states[-1:], r.states[-1:]]).float().to(agent.device)).accept_prob
            agreed += bool(p[0] > threshold) and bool(p[1] <= threshold)
    return {"pairs": len(pairs), "judged": judged, "agreement": agreed / judged if judged else None}
