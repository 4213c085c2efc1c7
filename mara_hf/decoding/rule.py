"""The accept/reject decision rule: from the agent's P(accept) over a candidate set to the emitted candidate.

One rule serves every loop that applies it: the processor, the fast loop, SAC rollouts, imitation and the serial
reference. A candidate is *accepted* when P(accept) exceeds its *bar*: the threshold (greedy decisions), a uniform
draw per candidate (sampled decisions: accepted with probability P(accept)), or a forced bar that makes the rule
follow a given token (`forced_bars`, for demonstrations and guided rollouts).

Strategies (see `MaraConfig`): `"first"` emits the first accepted candidate in probability order (the paper),
`"max_prob"` the accepted one with the highest P(accept), `"filter"` and `"veto"` keep every accepted candidate
possible and let the LLM decode among them (its most probable one under greedy decoding). With no accept, `"veto"`
keeps every candidate and the others emit the fallback candidate (`fallback_index`; -1: the last).
"""

from dataclasses import dataclass

import torch

# Bars P(accept) always exceeds / never exceeds (P(accept) lies in [0, 1]): forced decisions.
ALWAYS = -1.0
NEVER = 2.0


@dataclass(frozen=True)
class Decision:
    """What the rule decided for each row of a step.

    Attributes:
        index (`LongTensor` `(batch,)`): the emitted candidate's slot (the most probable allowed one for
            `"filter"` / `"veto"`); 0 on rows with nothing to decide.
        allowed (`BoolTensor` `(batch, K)`): the candidates that stay possible for the decoder that emits.
        first (`LongTensor` `(batch,)`): the first accepted slot in probability order, -1 where none was.
        any_accept (`BoolTensor` `(batch,)`): rows where some candidate was accepted.
    """

    index: torch.LongTensor
    allowed: torch.BoolTensor
    first: torch.LongTensor
    any_accept: torch.BoolTensor


@dataclass(frozen=True)
class DecisionRule:
    """The rule with its settings. `emits_top` (for `"veto"`): the decoder emits the most probable allowed
    candidate (greedy decoding), so only that one needs to stay allowed; otherwise every accepted one stays."""

    strategy: str = "first"
    threshold: float = 0.5
    fallback_index: int = 0
    emits_top: bool = False

    @property
    def lazy(self) -> bool:
        """True when the emitted candidate is the first accepted one (or, with none, a fixed slot), so candidates
        need judging only up to it in probability order: the paper's serial early stop."""
        return self.strategy == "first" or (self.strategy == "veto" and self.emits_top)

    def accepted(self, cands, decided: torch.BoolTensor, p_accept: torch.Tensor, bar=None) -> torch.BoolTensor:
        """`(batch, K)`: real candidates of rows that decide whose P(accept) exceeds the bar (default: threshold)."""
        bar = self.threshold if bar is None else bar
        return (p_accept > bar) & cands.mask & decided[:, None]

    def fallback(self, counts: torch.LongTensor) -> torch.LongTensor:
        """The slot emitted when every candidate is rejected, per row of `counts` candidates."""
        if self.fallback_index < 0:
            return counts - 1
        return counts.clamp(max=self.fallback_index + 1) - 1

    def __call__(self, cands, decided: torch.BoolTensor, p_accept: torch.Tensor, bar=None) -> Decision:
        accepted = self.accepted(cands, decided, p_accept, bar)
        any_accept = accepted.any(-1)
        first = torch.where(any_accept, accepted.int().argmax(-1), -1)
        if self.strategy == "max_prob":
            chosen = p_accept.masked_fill(~accepted, -1.0).argmax(-1)
        else:
            chosen = first
        index = torch.where(any_accept, chosen, self.fallback(cands.counts))
        index = torch.where(decided, index, 0)
        slots = torch.arange(cands.ids.shape[1], device=index.device)
        allowed = slots[None] == index[:, None]
        if self.strategy == "filter":
            allowed = torch.where(any_accept[:, None], accepted, allowed)
        elif self.strategy == "veto":  # every candidate rejected: no veto, the LLM chooses among all of them
            index = torch.where(decided & ~any_accept, 0, index)
            if not self.emits_top:
                allowed = torch.where(any_accept[:, None], accepted, cands.mask)
        return Decision(index=index, allowed=allowed, first=first, any_accept=any_accept)


def forced_bars(cands, target: torch.LongTensor, on: torch.BoolTensor, otherwise) -> torch.Tensor:
    """Bars `(batch, K)` that make the rule accept exactly the candidate `target[row]` on rows `on` and reject every
    other candidate there (a target outside the set: all rejected); rows not `on` get `otherwise` (a float or a
    `(batch, K)` tensor). With strategy `"first"` the emitted token is then the target wherever it is a candidate."""
    hit = (cands.ids == target[:, None]) & cands.mask
    forced = torch.where(hit, ALWAYS, NEVER)
    if not torch.is_tensor(otherwise):
        otherwise = torch.full_like(forced, float(otherwise))
    return torch.where(on[:, None], forced, otherwise)


def keep_allowed(scores: torch.Tensor, cands, allowed: torch.BoolTensor) -> torch.Tensor:
    """`scores` with every token but the allowed candidates set to -inf (what `generate` then decodes from)."""
    values = torch.where(allowed, scores.gather(1, cands.ids), float("-inf"))
    out = torch.full_like(scores, float("-inf"))
    return out.scatter_reduce_(1, cands.ids, values, reduce="amax", include_self=True)
