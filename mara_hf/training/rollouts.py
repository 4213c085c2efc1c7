"""Rollouts: prompts decoded through MARA's own loop (`decoding.loop.decode`) with every decision recorded.

`follow` is the one place that turns prompts into decoded steps with recorded decisions: it encodes the prompts,
decodes them with the bars it is given (sampled for SAC rollouts, forced for demonstrations), keeps rows on a
`Guide` (a token sequence they must emit while they can) and records, per row and step, the states of the judged
candidates and the accept/reject decisions made on them. SAC training (`RolloutCollector`) and imitation
(`imitation_data`) both decode through it.

`RolloutCollector` is what a training rollout computes, wherever it runs (the local trainer, a Ray worker): actions
sampled from the actor, candidates visited in a sampled order (veto), guided rollouts, the response scored by the
reward sources, prefix shaping, and the episode's transitions (`transitions`).
"""

from dataclasses import dataclass

import torch

from ..data.encoding import encode_prompts, pad_id
from ..decoding.candidates import Candidates
from ..decoding.loop import Step, decode
from ..decoding.rule import ALWAYS, DecisionRule, forced_bars
from .transitions import (chain_divergence, decoding_logprobs, episode_transitions, kl_rewards, sampled_order,
                          veto_rewards)

ROLLOUT_CHUNK = 4  # veto rollouts: candidates scored per forward until every row has an accept


class Guide:
    """Per row, a token sequence to emit through forced decisions, as long as the row stays on it.

    `ids` `(batch, longest)` padded with -1 (past its end a row's target is -1: no token); `on` `(batch,)` the
    rows that follow one. A row leaves its guide for good once another token is emitted. With `release`, a row
    whose target is no candidate leaves at that very step, whose bars are then the policy's own (`otherwise`);
    without, its bars reject every candidate there (the rule's fallback is emitted).
    """

    def __init__(self, ids: torch.LongTensor, on: torch.BoolTensor, release: bool):
        self.ids, self.on, self.release = ids, on.clone(), release
        self.length = (ids >= 0).sum(-1)
        self.completed = torch.zeros_like(on)  # rows that emitted their whole sequence
        self.position = 0  # the decoding step

    def target(self) -> torch.LongTensor:
        """Per row, the token to emit at this step; -1 past the end of its sequence."""
        t = self.position
        return self.ids[:, t] if t < self.ids.shape[1] else self.ids.new_full(self.ids.shape[:1], -1)

    def bars(self, cands: Candidates, otherwise) -> "torch.Tensor":
        """Bars that accept exactly the target on rows on the guide, `otherwise` on the others."""
        target = self.target()
        if self.release:
            self.on.logical_and_(((cands.ids == target[:, None]) & cands.mask).any(-1))
        return forced_bars(cands, target, self.on, otherwise)

    def advance(self, step: Step) -> torch.BoolTensor:
        """After a step: rows that emitted another token leave the guide. Returns who was on it before."""
        was = self.on.clone()
        emitted = step.cands.ids.gather(1, step.index[:, None]).squeeze(1)
        self.on.logical_and_(emitted == self.target())  # a forced single candidate can leave the guide too
        self.position += 1
        self.completed.logical_or_(self.on & (self.length == self.position))
        return was


@dataclass
class Decisions:
    """One row's decisions at one step: candidates judged in visiting order, rejected up to the emitted one.

    states `(m, hidden)` float16; accepts `(m,)` bool: the last is True unless every candidate was rejected;
    token: the step; logprobs and p_accept `(n,)`: the LLM's log-probabilities and the agent's
    P(accept) of the row's n candidates (0 where not judged), in visiting order; ids `(n,)`: the candidates' token
    ids, in visiting order (None where not recorded).
    """

    token: int
    states: torch.Tensor
    accepts: torch.BoolTensor
    logprobs: torch.Tensor
    p_accept: torch.Tensor
    ids: torch.Tensor | None = None


@dataclass
class Followed:
    """What `follow` decoded: the new tokens `(batch, T)`, per row its `Decisions` in step order and how many
    tokens it emitted before it ended, and the guide (who stayed on it, who completed it)."""

    new_tokens: torch.LongTensor
    decisions: list[list[Decisions]]
    tokens: torch.LongTensor
    guide: Guide | None


@torch.no_grad()
def follow(model, tokenizer, agent, prompts: list[str], *, bars, rule: DecisionRule, max_new_tokens: int, eos,
           top_k: int, top_p: float, chunk_size: int | None, order=None, guide: Guide | None = None,
           on_guide_only: bool = False) -> Followed:
    """Decode `prompts` with `agent` and record the decisions of every decided row (with `on_guide_only`, only
    while the row stays on `guide`). `bars(cands)` gives the policy's accept bars; a `guide` forces its rows'
    decisions on top of them. `order(cands)`: the order the candidates are visited in (default: probability)."""
    enc = encode_prompts(tokenizer, prompts, device=model.device)
    decisions: list[list[Decisions]] = [[] for _ in prompts]
    tokens = torch.zeros(len(prompts), dtype=torch.long)  # per row, the tokens emitted before it ended
    position = [0]  # the decoding step

    def threshold(cands):
        bar = bars(cands)
        return bar if guide is None else guide.bars(cands, bar)

    def on_step(step: Step):
        token = position[0]
        position[0] += 1
        keep = step.decided
        if guide is not None:
            was = guide.advance(step)
            if on_guide_only:
                keep = keep & was & guide.on
        tokens.add_((~step.finished).long().cpu())
        rows = keep.nonzero().flatten().tolist()
        if not rows:
            return
        states, p, lp = step.states.half().cpu(), step.p_accept.cpu(), step.cands.logprobs.cpu()
        counts, index, ids = step.cands.counts.cpu(), step.index.cpu(), step.cands.ids.cpu()
        accepted = rule.accepted(step.cands, step.decided, step.p_accept, step.threshold).cpu()
        for r in rows:
            n, k = int(counts[r]), int(index[r])
            hit = bool(accepted[r, k])
            m = k + 1 if hit else n  # decisions made: up to the accept, or every candidate rejected
            accepts = torch.zeros(m, dtype=torch.bool)
            accepts[-1] = hit
            decisions[r].append(Decisions(token, states[r, :m], accepts, lp[r, :n], p[r, :n], ids[r, :n]))

    out = decode(model, agent, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, eos=eos,
                 pad=pad_id(tokenizer), top_k=top_k, top_p=top_p, chunk_size=chunk_size, threshold=threshold,
                 rule=rule, on_step=on_step, order=order)
    return Followed(out[:, enc["input_ids"].shape[1]:], decisions, tokens, guide)


def decision_arrays(decisions: list[Decisions], marked: list[bool], hidden: int, kind: str) -> dict:
    """The recorded decisions as the fit reads them: `states` `(N, hidden)` float16, `labels` `(N,)` (1 accept, 0
    reject) and `kind` `(N,)` bool, True for every decision of the `decisions[i]` with `marked[i]`."""
    if not decisions:
        return {"states": torch.zeros(0, hidden, dtype=torch.float16), "labels": torch.zeros(0, dtype=torch.long),
                kind: torch.zeros(0, dtype=torch.bool)}
    return {"states": torch.cat([d.states for d in decisions]),
            "labels": torch.cat([d.accepts for d in decisions]).long(),
            kind: torch.cat([torch.full((len(d.accepts),), m, dtype=torch.bool) for d, m in zip(decisions, marked)])}


def parting_step(followed: Followed, row: int, step: int) -> "Decisions | None":
    """The decisions of `row` at `step` when it was followed through it (its token there accepted), else None."""
    return next((d for d in followed.decisions[row] if d.token == step and bool(d.accepts[-1])), None)


class NoAgent:
    """Stands in for an agent where every decision is forced: P(accept) 0 everywhere, never consulted."""

    def __call__(self, states):
        from ..agent.modeling import MaraAgentOutput

        return MaraAgentOutput(accept_prob=torch.zeros(states.shape[:-1], device=states.device))


def follow_tokens(model, tokenizer, prompts: list[str], responses: list[list[int]], *, eos, top_k: int,
                  top_p: float) -> Followed:
    """Forced decisions along given token sequences (demonstrations): per row, each step rejects the candidates
    ranked above the response's token and accepts it, recorded while the row stays on its response; a row leaves it
    where the token is no candidate (that step is not recorded)."""
    device, n = model.device, len(prompts)
    length = max([len(r) for r in responses] + [1])
    ids = torch.full((n, length), -1, device=device)
    for row, tokens in enumerate(responses):
        if tokens:
            ids[row, :len(tokens)] = torch.tensor(tokens, device=device)
    guide = Guide(ids, torch.ones(n, dtype=torch.bool, device=device), release=False)
    return follow(model, tokenizer, NoAgent(), prompts, bars=lambda cands: ALWAYS,
                  rule=DecisionRule("first", fallback_index=0), max_new_tokens=length, eos=eos, top_k=top_k,
                  top_p=top_p, chunk_size=8, guide=guide, on_guide_only=True)


class RolloutCollector:
    r"""
    Decodes training rollouts of an agent and turns them into transitions: what a rollout computes, wherever it runs.

    Args:
        model: the (frozen) causal LM; tokenizer: its tokenizer (left unchanged).
        rewards (`list[RewardSource]`): scores weighted by each source's multiplier and summed.
        config ([`MaraTrainingConfig`]): the rollout settings (decision process, candidate set, exploration,
            guides, shaping, rewards).
        sampler (`torch.Generator`): draws actions, visiting orders and guides (a new one seeded with
            `config.seed` when not given); the trainer shares its own, which its checkpoints keep.
    """

    def __init__(self, model, tokenizer, rewards, config, sampler: torch.Generator | None = None):
        model.eval()
        self.model, self.tokenizer, self.rewards, self.config = model, tokenizer, list(rewards), config
        self.sampler = sampler if sampler is not None else torch.Generator().manual_seed(config.seed)
        self._guide_ids = None  # guide prefixes as token ids, tokenized on first use

    @torch.no_grad()
    def collect(self, agent, records: list[dict]):
        """Decode `records` with actions sampled from `agent`; returns (transitions per episode with decisions,
        info per episode)."""
        from ..rewards import combine

        cfg = self.config
        veto = cfg.mdp == "veto"
        ids, drawn = self._draw_guides(len(records))
        guide = Guide(ids.to(self.model.device), drawn.to(self.model.device), release=True)
        guided = drawn.tolist()

        def bars(cands):  # accept iff P(accept) > u, u ~ U(0,1): a sample of the actor's policy
            bar = torch.rand(cands.ids.shape, generator=self.sampler).to(cands.ids.device)
            # ... with P(accept) clipped to [exploration, 1 - exploration]: both actions stay tried everywhere
            eps = cfg.exploration
            return torch.where(bar < eps, -1.0, torch.where(bar >= 1 - eps, 2.0, bar))

        def order(cands):  # veto: candidates visited in an order sampled from the LLM's decoding distribution
            perm = sampled_order(decoding_logprobs(cands.logprobs, cfg.temperature), cands.mask, self.sampler)
            return Candidates(ids=cands.ids.gather(1, perm), logprobs=cands.logprobs.gather(1, perm),
                              mask=cands.mask.gather(1, perm), counts=cands.counts)

        prompts = [r["prompt"] for r in records]
        # the first sampled accept, else the training fallback: veto the first visited (the LLM's sample); chain
        # the last candidate. Veto scores candidates only up to the first accept; the authors' reward needs all.
        done = follow(self.model, self.tokenizer, agent, prompts, bars=bars,
                      rule=DecisionRule("first", fallback_index=0 if veto else -1),
                      max_new_tokens=cfg.max_new_tokens, eos=self.model.generation_config.eos_token_id,
                      top_k=cfg.top_k, top_p=cfg.top_p, chunk_size=ROLLOUT_CHUNK if veto else None,
                      order=order if veto else None, guide=guide)
        responses = self.tokenizer.batch_decode(done.new_tokens, skip_special_tokens=True)
        total, per_source = combine(self.rewards, prompts, responses, records)
        lengths = done.tokens.tolist()
        shaped = self._prefix_rewards(prompts, done.new_tokens, lengths, records) if cfg.shaping else None
        transitions, infos = [], []
        for i, record in enumerate(records):
            steps, kl = self._steps(done.decisions[i])
            reward = float(total[i]) - cfg.reward_baseline
            episode = episode_transitions(steps, shaped[i] if shaped else reward, cfg.gamma, cfg.postback_reward)
            if episode is not None:
                transitions.append(episode)
            decisions = sum(len(s["actions"]) for s in steps)
            accepts = sum(int(s["actions"].sum()) for s in steps)
            infos.append({"reward": reward, "decisions": decisions, "accepts": accepts, "response": responses[i],
                          "guided": guided[i], "guide_completed": bool(guide.completed[i]), "kl": kl,
                          "tokens": lengths[i],
                          **{f"score/{name}": float(v[i]) for name, v in per_source.items()}})
        return transitions, infos

    def _steps(self, decisions: list[Decisions]) -> tuple[list[dict], float]:
        """An episode's decision steps with their per-decision rewards (see `transitions`), and the divergence of
        its decoding distribution from the LLM's, in nats."""
        cfg = self.config
        steps, divergence = [], []
        for d in decisions:
            m, acts = len(d.accepts), d.accepts
            log_q = decoding_logprobs(d.logprobs, cfg.temperature)
            if cfg.mdp == "veto":
                rewards = veto_rewards(log_q[:m], acts, cfg.kl_ctl)
                divergence.append(float(-torch.log1p(-log_q[:m][~acts].exp().clamp(max=1 - 1e-6)).sum()))
            else:  # the authors' reward over the whole chain (every candidate was scored)
                rewards = kl_rewards(d.p_accept, d.logprobs / cfg.temperature, cfg.kl_ctl)[:m]
                divergence.append(chain_divergence(log_q, d.p_accept))
            steps.append({"states": d.states, "actions": acts.long(), "rewards": rewards, "token": d.token})
        return steps, sum(divergence)

    def _prefix_rewards(self, prompts, new_tokens, lengths, records) -> list[list[float]]:
        """Per episode, the reward each token caused: phi(first t+1 tokens) - phi(first t), phi being the weighted
        reward of that prefix as a response (see `transitions`). One batched call to the reward sources."""
        from ..rewards import combine

        texts, owners = [], []
        for i, n in enumerate(lengths):
            texts += self.tokenizer.batch_decode([new_tokens[i, :t] for t in range(n + 1)], skip_special_tokens=True)
            owners += [i] * (n + 1)
        phi, _ = combine(self.rewards, [prompts[i] for i in owners], texts, [records[i] for i in owners])
        out, at = [], 0
        for n in lengths:
            values = phi[at:at + n + 1]
            out.append([b - a for a, b in zip(values[:-1], values[1:])])
            at += n + 1
        return out

    def _draw_guides(self, n: int):
        """Per rollout, the token ids of the guide prefix it follows `(n, longest)`, padded with -1, and which
        rollouts are guided `(n,)` (see `guide_fraction`)."""
        cfg = self.config
        if cfg.guide_fraction <= 0:  # draws nothing: unguided runs keep the authors' sampling sequence
            return torch.full((n, 0), -1, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
        if self._guide_ids is None:
            ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in cfg.guide_prefixes]
            self._guide_ids = torch.full((len(ids), max(map(len, ids))), -1, dtype=torch.long)
            for i, row in enumerate(ids):
                self._guide_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        draw = torch.rand(n, generator=self.sampler) < cfg.guide_fraction
        pick = torch.randint(len(self._guide_ids), (n,), generator=self.sampler)
        return self._guide_ids[pick], draw
