"""Sampling with a veto agent by drawing, then judging: only the drawn candidates need the agent.

A veto agent under sampling emits a draw of the decoding distribution q (the LLM's scores after generate's
sampling warpers: temperature, top-k, top-p, min-p, ...) restricted to the candidates it accepts, or of q over the
whole candidate set when it rejects them all. Judging every candidate and then drawing is one way; drawing the
candidates in an order sampled from q without replacement (Gumbel top-k) and emitting the first accepted one is
another, with the same distribution: the first accepted element of such an order is a draw of q restricted to the
accepted set, whatever the agent's (independent) decisions. The agent then judges candidates only until one is
accepted, in the drawn order: about one per step for an agent that mostly accepts. The order's first candidate
(a plain draw of q) is the fallback when all are rejected.

The uniform noise of a step's order can be drawn one step ahead (`draw_noise`): the processor's lookahead then
knows, from the next step's logits it computes anyway, which candidates will be drawn first, and scores them
inside generate's forward.
"""

import torch

from .candidates import Candidates
from .rule import DecisionRule


def draw_noise(batch: int, top_k: int, device) -> torch.Tensor:
    """The uniform noise of one step's order `(batch, top_k)`, from torch's global random number generator on
    `device`, as `generate`'s own sampling draws (`torch.manual_seed` reproduces it)."""
    return torch.rand((batch, top_k), device=device)


def drawn_order(cands: Candidates, warped: torch.Tensor, noise: torch.Tensor) -> Candidates:
    """`cands` in an order drawn from the decoding distribution without replacement, with `noise` from
    `draw_noise` (its first columns). `warped` `(batch, vocab)`: the scores after the sampling warpers (-inf outside
    their support); candidates outside that support become padding (they cannot be drawn), and at least the most
    probable candidate stays."""
    w = warped.gather(1, cands.ids).float()
    valid = cands.mask & torch.isfinite(w)
    valid[:, 0] |= ~valid.any(-1)  # warpers keep the most probable token; never leave a row without a candidate
    log_q = torch.log_softmax(w.masked_fill(~valid, float("-inf")), dim=-1)
    u = noise[:, :w.shape[1]].to(w.device).float().clamp(min=1e-20)
    keys = (log_q - torch.log(-torch.log(u))).masked_fill(~valid, float("-inf"))
    perm = keys.argsort(dim=-1, descending=True, stable=True)
    mask = valid.gather(1, perm)
    ids = cands.ids.gather(1, perm)
    return Candidates(ids=torch.where(mask, ids, ids[:, :1]),  # padding repeats the first slot, as candidate_set's
                      logprobs=cands.logprobs.gather(1, perm).masked_fill(~mask, float("-inf")),
                      mask=mask, counts=mask.sum(-1))


def drawn_rule(threshold: float) -> DecisionRule:
    """The rule over a drawn order: the first accepted candidate, else the first drawn (the LLM's own draw)."""
    return DecisionRule("first", threshold, fallback_index=0)


class Draws:
    """The draws of one sampled call, shared by the processor and `custom_generate`: `after`, generate's processors
    after MARA (its sampling warpers), and the noise of the next step's order, drawn a step ahead (so the same seed
    gives the same draws in both routes, and the lookahead knows which candidates the next step draws first)."""

    def __init__(self, after, top_k: int):
        self.after, self.top_k = after, top_k
        self.noise = None  # the next step's noise
        self.warped = None  # (logits, warped logits) the lookahead computed for the next step

    def warp(self, input_ids, scores):
        return self.after(input_ids, scores.clone()) if len(self.after) else scores

    def order(self, cands: Candidates, input_ids, scores) -> Candidates:
        """This step's candidates in their drawn order; draws the next step's noise."""
        batch = cands.ids.shape[0]
        noise = self.noise if self.noise is not None and self.noise.shape[0] == batch else draw_noise(
            batch, self.top_k, scores.device)
        planned, self.warped = self.warped, None  # the lookahead warped these very logits (float32): not again
        same = planned is not None and planned[0].shape == scores.shape and torch.equal(planned[0], scores)
        ordered = drawn_order(cands, planned[1] if same else self.warp(input_ids, scores), noise)
        self.noise = draw_noise(batch, self.top_k, scores.device)
        return ordered

    def planned_order(self, input_ids):
        """For the lookahead (`GenerateHooks.plan`): the next step's candidates, after `input_ids`, in the order
        they will be drawn."""
        noise = self.noise

        def order(nxt: Candidates, logits):
            warped = self.warp(input_ids, logits)
            self.warped = (logits, warped)
            return drawn_order(nxt, warped, noise)
        return order
