"""Sampling with a veto agent: draw, then judge, widening only where the agent needs it.

The distribution. At a step with candidate set C (MARA's top-k / top-p set) the agent accepts A, a subset of C.
Let q be the LLM's decoding distribution: its scores after `generate`'s sampling warpers (temperature, top-k,
top-p, min-p, typical, epsilon, eta, ...) and S its support. The emitted token is
  1. a draw of q restricted to the accepted candidates it can draw, A and S, when there are any;
  2. otherwise, when the agent accepts candidates only outside S: the most probable of them (the LLM's order);
  3. otherwise (every candidate of C rejected: no veto): a draw of q restricted to C (C's most probable
     candidate when q gives none of C any mass).
So a candidate the agent rejected is never emitted while it accepted another one, whatever the warpers leave.

How it is computed. The candidates are put in one order: those in S in an order drawn from q without replacement
(Gumbel top-k: key = warped logit + Gumbel noise), then those outside S by probability. The first accepted one
in that order is emitted, the first of the order when none is: cases 1-3 above, because the first accepted
element of a draw without replacement is a draw of q restricted to the accepted ones whatever the agent's
(independent) decisions. The agent judges candidates in that order only until one is accepted: about one per
step for an agent that mostly accepts; it reaches the candidates outside S only when it rejects every one in S.

The noise is drawn per token of the vocabulary, from torch's global random number generator on the scores'
device as `generate`'s own draws (`torch.manual_seed` reproduces a call), one step ahead (`Draws`): the
processor's lookahead then knows, from the next step's logits it computes anyway, which candidates the next step
judges first, and scores them inside generate's forward. Indexed by token, the noise serves candidate sets of any
width (ties at the k-th candidate widen them) and gives a token the same key in the lookahead as in the step.

Draws call generate's processors after MARA once more per step (and once for the lookahead). That is exact only
for processors whose output depends on `(input_ids, scores)` alone: `draws_possible` says when they are.
"""

import torch

from .candidates import Candidates
from .rule import DecisionRule

# transformers' logits processors that keep state between calls: applying them more than once a step would
# change what they do (the SynthID watermark advances its state at every call; unbatched classifier-free guidance
# extends a cache of its own)
_STATEFUL = ("SynthIDTextWatermarkLogitsProcessor", "UnbatchedClassifierFreeGuidanceLogitsProcessor")


# what the log says, once per processor, when `draws_possible` does not hold
NOT_DRAWN = ("A logits processor that is not one of transformers' own (or one that keeps state, such as a watermark) "
             "follows MaraProcessor in this sampled call: MARA judges every candidate and leaves the accepted ones to "
             "generate's processors (slower). Put MARA last, or that processor before MARA.")


def draws_possible(after) -> bool:
    """True when every processor in `after` is one of transformers' own, whose output depends only on
    `(input_ids, scores)`, so MARA may apply them itself to draw. A processor of another library, the user's own, or
    a stateful one (a watermark with state): MARA judges every candidate instead and leaves the draw to generate."""
    return all(type(p).__module__.startswith("transformers.generation.") and type(p).__name__ not in _STATEFUL
               for p in after)


def draw_noise(batch: int, vocab: int, device) -> torch.Tensor:
    """The uniform noise of one step's order, one number per token `(batch, vocab)`, from torch's global random
    number generator on `device`, as `generate`'s own sampling draws."""
    return torch.rand((batch, vocab), device=device)


def drawn_order(cands: Candidates, warped: torch.Tensor, noise: torch.Tensor) -> Candidates:
    """`cands` in the order they are judged under sampling (module docstring): the candidates in the support of
    `warped` (the scores after the sampling warpers, -inf outside their support) in an order drawn from it without
    replacement with `noise` (`draw_noise`), then the others by probability, then padding."""
    w = warped.gather(1, cands.ids).float()
    drawable = cands.mask & torch.isfinite(w)
    u = noise.gather(1, cands.ids.to(noise.device)).to(w.device).float().clamp(min=1e-20)
    keys = (w - torch.log(-torch.log(u))).masked_fill(~drawable, float("-inf"))
    # a stable sort keeps the slots with key -inf (outside the support, then padding) in probability order
    perm = keys.argsort(dim=-1, descending=True, stable=True)
    mask = cands.mask.gather(1, perm)
    ids = cands.ids.gather(1, perm)
    return Candidates(ids=torch.where(mask, ids, ids[:, :1]),  # padding repeats the first slot, as candidate_set's
                      logprobs=cands.logprobs.gather(1, perm), mask=mask, counts=cands.counts)


def drawn_rule(threshold: float) -> DecisionRule:
    """The rule over a drawn order: the first accepted candidate, else the first of the order (the LLM's own draw)."""
    return DecisionRule("first", threshold, fallback_index=0)


class Draws:
    """The draws of one sampled call, shared by the processor and `custom_generate`: `after`, generate's processors
    after MARA (its sampling warpers; `draws_possible(after)` must hold), and the noise of the next step's order,
    drawn a step ahead (so the same seed gives the same draws in both routes, and the lookahead knows which
    candidates the next step judges first)."""

    def __init__(self, after):
        self.after = after
        self.noise = None  # the next step's noise
        self.warped = None  # (logits, warped logits) the lookahead computed for the next step

    def warp(self, input_ids, scores):
        return self.after(input_ids, scores.clone()) if len(self.after) else scores

    def order(self, cands: Candidates, input_ids, scores) -> Candidates:
        """This step's candidates in their judging order; draws the next step's noise."""
        noise = self.noise if self.noise is not None and self.noise.shape == scores.shape else draw_noise(
            *scores.shape, scores.device)
        planned, self.warped = self.warped, None  # the lookahead warped these very logits (float32): not again
        same = planned is not None and planned[0].shape == scores.shape and torch.equal(planned[0], scores)
        ordered = drawn_order(cands, planned[1] if same else self.warp(input_ids, scores), noise)
        self.noise = draw_noise(*scores.shape, scores.device)
        return ordered

    def planned_order(self, input_ids):
        """For the lookahead (`GenerateHooks.plan`): the next step's candidates, after `input_ids`, in the order
        they will be judged."""
        noise = self.noise  # drawn by this step's `order`

        def order(nxt: Candidates, logits):
            warped = self.warp(input_ids, logits)
            self.warped = (logits, warped)
            return drawn_order(nxt, warped, noise)
        return order
