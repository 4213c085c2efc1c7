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

from .rollouts import follow_tokens

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
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
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
        hidden = self.model.config.get_text_config().hidden_size
        if not parts:
            return {"states": torch.zeros(0, hidden, dtype=torch.float16), "labels": torch.zeros(0, dtype=torch.long),
                    "steered": torch.zeros(0, dtype=torch.bool)}
        return {k: torch.cat([p[k] for p in parts]) for k in ("states", "labels", "steered")}

    def _batch(self, batch) -> tuple[dict, dict]:
        c = self.config
        prompts = [p["prompt"] for p, _ in batch]
        chosen = [ids[:t + c.response_tokens] for _, (ids, _, t) in batch]
        parting = [t for _, (_, _, t) in batch]
        followed = self.follow(prompts, chosen)
        # the rejected responses up to their parting token: its state, at the end of that step's judged candidates
        ends = self.follow(prompts, [ids[:t + 1] for _, (_, ids, t) in batch])
        states, labels, steered = [], [], []
        seen = {"chosen_followed_to_parting": 0, "rejected_recorded": 0}
        for row, t in enumerate(parting):
            steps = {d.token: d for d in followed.decisions[row]}
            seen["chosen_followed_to_parting"] += _reached(followed, row, t)
            for d in followed.decisions[row]:
                states.append(d.states)
                labels.append(d.accepts.long())
                steered.append(torch.full((len(d.accepts),), d.token == t, dtype=torch.bool))
            last = [d for d in ends.decisions[row] if d.token == t]
            if last and bool(last[0].accepts[-1]) and (t not in steps or not _rejected_there(steps[t], last[0])):
                states.append(last[0].states[-1:])
                labels.append(torch.zeros(1, dtype=torch.long))
                steered.append(torch.ones(1, dtype=torch.bool))
                seen["rejected_recorded"] += 1
        hidden = self.model.config.get_text_config().hidden_size
        return ({"states": torch.cat(states) if states else torch.zeros(0, hidden, dtype=torch.float16),
                 "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
                 "steered": torch.cat(steered) if steered else torch.zeros(0, dtype=torch.bool)}, seen)

    def follow(self, prompts: list[str], responses: list[list[int]]):
        """Forced decisions along each response's tokens (`rollouts.follow_tokens`)."""
        return follow_tokens(self.model, self.tokenizer, prompts, responses, eos=self.eos, top_k=self.config.top_k,
                             top_p=self.config.top_p)


def _reached(followed, row: int, t: int) -> bool:
    """The chosen response was followed through its parting step (its token there was a candidate)."""
    return any(d.token == t and bool(d.accepts[-1]) for d in followed.decisions[row])


def _rejected_there(chosen_step, rejected_step) -> bool:
    """The rejected token was among the candidates judged (and rejected) before the chosen one at the parting step:
    its rejection is recorded already."""
    return len(rejected_step.accepts) <= len(chosen_step.accepts) - 1


@torch.no_grad()
def agreement(agent, model, tokenizer, pairs: list[dict], config) -> dict:
    """On `pairs`: how many have both parting tokens among the candidates, and the share of those where `agent`
    accepts the chosen response's token and rejects the rejected one's (at its own threshold)."""
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
            c = [d for d in chosen.decisions[row] if d.token == t and bool(d.accepts[-1])]
            r = [d for d in rejected.decisions[row] if d.token == t and bool(d.accepts[-1])]
            if not c or not r:
                continue
            judged += 1
            p = agent(torch.cat([c[0].states[-1:], r[0].states[-1:]]).float().to(agent.device)).accept_prob
            agreed += bool(p[0] > agent.config.threshold) and bool(p[1] <= agent.config.threshold)
    return {"pairs": len(pairs), "judged": judged, "agreement": agreed / judged if judged else None}
