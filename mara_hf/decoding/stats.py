"""Decision statistics of MARA decoding (like the authors' gen_info), accumulated on the device."""

import torch


class MaraStats:
    """Counts over the decisions of one decoding run.

    `steps` counts row-steps (a batch of 4 rows decoding 10 tokens: 40), finished rows included. A *decision* is a
    row-step with more than one candidate, where the agent is asked. `rejections` counts the agent's rejections in
    the paper's serial order (up to the first accept), `accepted_index[i]` how often the i-th candidate was
    emitted by an accept, `fallbacks` how often every candidate was rejected. `candidates_scored` counts the
    candidates run through the LLM to be judged (padding included), `scoring_forwards` the LLM forwards made for
    them besides generate's own.
    """

    def __init__(self, top_k: int, device=None, traced: bool = False):
        self._counts = torch.zeros(5, dtype=torch.long, device=device)  # steps, decisions, candidates, rejections, fallbacks
        self._index = torch.zeros(top_k, dtype=torch.long, device=device)
        self.scored = 0  # candidates actually run through the LLM (padding included)
        self.forwards = 0  # extra LLM forwards made to score candidates
        # with trace=True: a dict per decision, the token each row emitted at each step, how the call decoded and
        # the ids that end a row (what `view` shows)
        self.traced = traced
        self.trace: list[dict] = []
        self.tokens: list[torch.Tensor] = []
        self.mode: str | None = None
        self.ends: list[int] = []

    def add(self, decided: torch.Tensor, counts: torch.Tensor, first_accept: torch.Tensor, accepted: torch.Tensor):
        """Record one step. All arguments are per-row tensors; `first_accept` is -1 where none was accepted."""
        d = decided.long()
        rejected = torch.where(accepted, first_accept, counts)
        self._counts += torch.stack([torch.ones_like(d).sum(), d.sum(), (counts * d).sum(), (rejected * d).sum(),
                                     ((~accepted).long() * d).sum()])
        hit = decided & accepted
        self._index += torch.bincount(first_accept[hit].clamp(min=0), minlength=self._index.numel())[: self._index.numel()]

    @property
    def candidates_scored(self) -> int:
        return self.scored

    @property
    def scoring_forwards(self) -> int:
        return self.forwards

    @property
    def steps(self) -> int:
        return int(self._counts[0])

    @property
    def decisions(self) -> int:
        return int(self._counts[1])

    @property
    def candidates(self) -> int:
        return int(self._counts[2])

    @property
    def rejections(self) -> int:
        return int(self._counts[3])

    @property
    def fallbacks(self) -> int:
        return int(self._counts[4])

    @property
    def accepted_index(self) -> list[int]:
        counts = self._index.tolist()
        while counts and counts[-1] == 0:
            counts.pop()
        return counts

    @property
    def mean_candidates(self) -> float:
        return self.candidates / max(self.decisions, 1)

    @property
    def accept_rate(self) -> float:
        """Accepts / agent decisions made in the serial order."""
        accepts = self.decisions - self.fallbacks
        return accepts / max(accepts + self.rejections, 1)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "decisions": self.decisions, "mean_candidates": round(self.mean_candidates, 3),
                "rejections": self.rejections, "fallbacks": self.fallbacks, "accept_rate": round(self.accept_rate, 4),
                "accepted_index": self.accepted_index, "candidates_scored": self.scored, "scoring_forwards": self.forwards}

    def __repr__(self):
        return f"MaraStats({self.as_dict()})"

    def record(self, step: int, cands, decided, p_accept, judged, bar, decision):
        """With trace=True, one step: a dict per deciding row in `trace` (P(accept) and verdict None where `judged` is
        False) and the token each row emits in `tokens`."""
        self.tokens.append(cands.ids.gather(1, decision.index[:, None]).squeeze(1))
        accepted = (p_accept > bar).tolist()
        p_accept, judged = p_accept.tolist(), judged.tolist()
        for row in decided.nonzero().flatten().tolist():
            n = int(cands.counts[row])
            index = int(decision.index[row])
            self.trace.append({
                "row": row, "step": step, "candidates": cands.ids[row, :n].tolist(),
                "logprobs": cands.logprobs[row, :n].tolist(),
                "p_accept": [p if j else None for p, j in zip(p_accept[row][:n], judged[row][:n])],
                "accepted": [a if j else None for a, j in zip(accepted[row][:n], judged[row][:n])],
                "index": index, "token": int(cands.ids[row, index]), "fallback": not bool(decision.any_accept[row]),
            })

    def view(self, tokenizer, prompts: "list[str] | None" = None, sequences=None):
        """The responses of the last traced call with every decision of the agent marked (a `DecisionView`):
        `print(mara.stats.view(tokenizer))` in a terminal, `mara.stats.view(tokenizer)` as a notebook's last line.
        Needs a processor built with `trace=True`. `prompts`: labels for the rows. `sequences`: the call's output;
        needed only where generate itself chooses among several allowed candidates at the last step (another
        processor after MARA, or `greedy_generate=False` while sampling), whose token the processor never sees."""
        from .view import DecisionView

        return DecisionView.from_stats(self, tokenizer, prompts=prompts, sequences=sequences)


def sum_stats(stats: list[dict]) -> dict:
    """The `as_dict()` numbers of several runs (e.g. batches) summed into one, means weighted by decisions."""
    total = {key: sum(s[key] for s in stats) for key in ("steps", "decisions", "rejections", "fallbacks",
                                                           "candidates_scored", "scoring_forwards")}
    total["mean_candidates"] = sum(s["mean_candidates"] * s["decisions"] for s in stats) / max(total["decisions"], 1)
    accepts = total["decisions"] - total["fallbacks"]
    total["accept_rate"] = accepts / max(accepts + total["rejections"], 1)
    return total
