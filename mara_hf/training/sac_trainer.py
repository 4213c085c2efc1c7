"""MARA training: discrete soft actor-critic over the accept/reject MDP, with batched rollouts.

The state is the LLM's hidden state of candidate t_k appended to the prefix; the action is reject (0) or accept
(1). How decisions become tokens and what each costs: `mara_hf.rollouts` (veto by default, the paper's chain as an
option); the learner: `mara_hf.sac`.

The trainer is split in pieces that do not care where they run: `collect` (rollouts -> transitions),
`ReplayBuffer`, `update` (learner step) and the checkpoint functions, so another backend can move rollouts
elsewhere without changing what they compute.
"""

import copy
import math
import os
import shutil
import signal
import tempfile
import threading

import torch
from transformers.utils import logging

from ..agent.configuration import MaraConfig
from ..decoding.loop import Step, decode
from .sac_config import MaraTrainingConfig
from ..agent.modeling import MaraAgent
from .replay_buffer import ReplayBuffer
from ..decoding.candidates import Candidates
from ..decoding.rule import DecisionRule, forced_bars
from .transitions import (chain_divergence, decoding_logprobs, episode_transitions, kl_rewards, sampled_order,
                       veto_rewards)
from .sac import SoftActorCritic
from ..utils import InBackground, save_atomically

logger = logging.get_logger(__name__)

STATE_FILE = "trainer_state.pt"
ROLLOUT_CHUNK = 4  # veto rollouts: candidates scored per forward until every row has an accept
LOSS_KEYS = ("critic_loss", "actor_loss", "alpha", "entropy", "p_accept")
BUFFER_FILE = "replay_buffer.pt"


class MaraTrainer:
    r"""
    Trains a MARA agent for `model` against reward sources.

    Args:
        model: the (frozen) causal LM. tokenizer: its tokenizer (left padding is set for batched rollouts).
        rewards (`list[RewardSource]`): see `mara_hf.rewards.parse_reward_spec`; scores are weighted by each
            source's multiplier and summed.
        prompts (`list[dict]`): records with a `"prompt"` field (see `mara_hf.prompts.load_prompts`); all fields
            reach the reward sources.
        config ([`MaraTrainingConfig`]): training settings. output_dir: where checkpoints and the agent go.
        data_name: recorded in the agent's provenance (e.g. the prompt file or dataset id; a list for several).
        model_config: the LLM's config, for a learner that is given no model (`model=None`) because its
            rollouts run elsewhere.
    """

    def __init__(self, model, tokenizer, rewards, prompts, config: MaraTrainingConfig | None = None,
                 output_dir: str | None = None, data_name: str | list[str] | None = None, agent: MaraAgent | None = None,
                 model_config=None):
        if not prompts:
            raise ValueError("No prompts to train on.")
        if not rewards:
            raise ValueError("Give at least one reward source.")
        self.config = config = config or MaraTrainingConfig()
        self.model, self.tokenizer = model, tokenizer
        if model is not None:  # a learner whose rollouts run elsewhere holds no LLM (see RayMaraTrainer)
            model.eval()
            model_config = model.config
        self.rewards, self.prompts = list(rewards), list(prompts)
        self.output_dir, self.data_name = output_dir, data_name
        self.device = torch.device(config.device or (model.device if model is not None else "cpu"))
        self.hidden_size = hidden = model_config.get_text_config().hidden_size
        torch.manual_seed(config.seed)
        # how the agent is meant to decode: what it was trained for (veto: the LLM chooses among accepted tokens;
        # chain: the paper's first accept)
        strategy = {"veto": ("veto", 0), "chain": ("first", 0)}[config.mdp]
        agent_config = MaraConfig(state_dim=hidden, hidden_dims=config.agent_hidden_dims, top_k=config.top_k,
                                  top_p=config.top_p, strategy=strategy[0], fallback_index=strategy[1],
                                  base_model_name_or_path=model_config.name_or_path)
        self.started_from = None  # provenance of the --init-agent weights
        if agent is None and config.init_agent:
            agent, self.started_from = agent_from(config.init_agent, agent_config)
        if agent is not None and agent.config.state_dim != hidden:
            raise ValueError(f"The agent reads width {agent.config.state_dim}, the model has hidden_size {hidden}.")
        if agent is None:
            agent = MaraAgent(agent_config)
            if config.prior_accept is not None:
                start_at_prior(agent, config.prior_accept)
        self.agent = agent.to(self.device)
        prior = None
        if self.started_from and config.init_agent_prior:  # regularised towards the started agent's own decisions
            prior = copy.deepcopy(self.agent).requires_grad_(False).eval()
        self.learner = SoftActorCritic(self.agent, hidden, config, self.device, prior_actor=prior)
        self.buffer = ReplayBuffer(config.buffer_size, hidden)
        self.sampler = torch.Generator().manual_seed(config.seed)  # rollouts: actions, visiting orders, guides
        # replay batches: a stream of their own, so updates running beside rollouts draw the same batches
        self.replay_sampler = torch.Generator().manual_seed(config.seed + 1)
        # with overlap_updates, rollouts act with a frozen copy of the actor while the learner updates it
        self._acting = self._acting_copy = None
        self._scale, self._scale_at = 1.0, -1  # reward_scale's cache
        self.episodes_done = 0
        self.history: list[dict] = []
        self._guide_ids = None  # guide prefixes as token ids, tokenized on first use
        self._guide_counts, self._guide_warned = [0, 0], False  # guided rollouts that completed their prefix / all

    # ----- rollouts -------------------------------------------------------------------------------------------
    def prompt_batch(self, start: int, size: int) -> list[dict]:
        """Prompts of episodes start..start+size-1: a seeded permutation per pass over the data (resume-safe)."""
        out, n = [], len(self.prompts)
        for episode in range(start, start + size):
            epoch, pos = divmod(episode, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch))
            out.append(self.prompts[int(order[pos])])
        return out

    @torch.no_grad()
    def collect(self, records: list[dict]):
        """Decode `records` with actions sampled from the actor; returns (transitions, per-episode info)."""
        from ..data.encoding import encode_prompts, pad_id
        from ..rewards.sources import combine

        cfg = self.config
        veto = cfg.mdp == "veto"
        enc = encode_prompts(self.tokenizer, [r["prompt"] for r in records], device=self.model.device)
        steps: list[list[dict]] = [[] for _ in records]
        divergence = [[] for _ in records]
        tokens = torch.zeros(len(records), dtype=torch.long)
        guides, on_guide = self._draw_guides(len(records))
        guides, on_guide = guides.to(self.model.device), on_guide.to(self.model.device)
        guided = on_guide.tolist()
        guide_length = (guides >= 0).sum(-1)
        completed = torch.zeros_like(on_guide)  # guided rollouts that emitted their whole prefix
        position = [0]  # decoding step, for the guides

        def guide_token():  # per row, the guide's token at this step; -1 (no token) past its end
            t = position[0]
            return guides[:, t] if t < guides.shape[1] else guides.new_full(guides.shape[:1], -1)

        def threshold(cands):  # accept iff P(accept) > u, u ~ U(0,1): a sample of the actor's policy
            bar = torch.rand(cands.ids.shape, generator=self.sampler).to(cands.ids.device)
            # ... with P(accept) clipped to [exploration, 1 - exploration]: both actions stay tried everywhere
            eps = cfg.exploration
            bar = torch.where(bar < eps, -1.0, torch.where(bar >= 1 - eps, 2.0, bar))
            target = guide_token()
            # off the guide for good once its token is no candidate: the actor's own policy from here on
            on_guide.logical_and_(((cands.ids == target[:, None]) & cands.mask).any(-1))
            return forced_bars(cands, target, on_guide, bar)

        def order(cands):  # veto: candidates visited in an order sampled from the LLM's decoding distribution
            perm = sampled_order(decoding_logprobs(cands.logprobs, cfg.temperature), cands.mask, self.sampler)
            return Candidates(ids=cands.ids.gather(1, perm), logprobs=cands.logprobs.gather(1, perm),
                              mask=cands.mask.gather(1, perm), counts=cands.counts)

        # the first sampled accept, else the training fallback: veto the first visited (the LLM's sample); chain
        # the last candidate
        rule = DecisionRule("first", fallback_index=0 if veto else -1)

        def on_step(step: Step):
            emitted = step.cands.ids.gather(1, step.index[:, None]).squeeze(1)
            on_guide.logical_and_(emitted == guide_token())  # a forced single candidate can leave the guide too
            token = position[0]
            position[0] += 1
            completed.logical_or_(on_guide & (guide_length == position[0]))
            tokens.add_((~step.finished).long().cpu())
            rows = step.decided.nonzero().flatten().tolist()
            if not rows:
                return
            states, p, lp = step.states.half().cpu(), step.p_accept.cpu(), step.cands.logprobs.cpu()
            counts, index = step.cands.counts.cpu(), step.index.cpu()
            accepted = rule.accepted(step.cands, step.decided, step.p_accept, step.threshold).cpu()
            for r in rows:
                n, k = int(counts[r]), int(index[r])
                hit = bool(accepted[r, k])
                m = k + 1 if hit else n  # decisions made: up to the accept, or every candidate rejected
                acts = torch.zeros(m, dtype=torch.bool)
                acts[-1] = hit
                log_q = decoding_logprobs(lp[r, :n], cfg.temperature)
                if veto:
                    rewards = veto_rewards(log_q[:m], acts, cfg.kl_ctl)
                    divergence[r].append(float(-torch.log1p(-log_q[:m][~acts].exp().clamp(max=1 - 1e-6)).sum()))
                else:  # the authors' reward over the whole chain (every candidate was scored)
                    rewards = kl_rewards(p[r, :n], lp[r, :n] / cfg.temperature, cfg.kl_ctl)[:m]
                    divergence[r].append(chain_divergence(log_q, p[r, :n]))
                steps[r].append({"states": states[r, :m], "actions": acts.long(), "rewards": rewards, "token": token})

        eos = self.model.generation_config.eos_token_id
        out = decode(self.model, self.acting_agent, enc["input_ids"], enc["attention_mask"], max_new_tokens=cfg.max_new_tokens,
                     eos=eos, pad=pad_id(self.tokenizer), top_k=cfg.top_k, top_p=cfg.top_p,
                     # veto scores candidates only up to the first accept; the authors' reward needs all of them
                     chunk_size=ROLLOUT_CHUNK if veto else None, threshold=threshold, rule=rule,
                     on_step=on_step, order=order if veto else None)
        new = out[:, enc["input_ids"].shape[1]:]
        responses = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        prompts = [r["prompt"] for r in records]
        total, per_source = combine(self.rewards, prompts, responses, records)
        shaped = self._prefix_rewards(prompts, new, tokens.tolist(), records) if cfg.shaping else None
        transitions, infos = [], []
        for i, record in enumerate(records):
            reward = float(total[i]) - cfg.reward_baseline
            episode = episode_transitions(steps[i], shaped[i] if shaped else reward, cfg.gamma, cfg.postback_reward)
            if episode is not None:
                transitions.append(episode)
            decisions = sum(len(s["actions"]) for s in steps[i])
            accepts = sum(int(s["actions"].sum()) for s in steps[i])
            infos.append({"reward": reward, "decisions": decisions, "accepts": accepts, "response": responses[i],
                          "guided": guided[i], "guide_completed": bool(completed[i]), "kl": sum(divergence[i]),
                          "tokens": int(tokens[i]),
                          **{f"score/{name}": float(v[i]) for name, v in per_source.items()}})
        return transitions, infos

    def _prefix_rewards(self, prompts, new_tokens, lengths, records) -> list[list[float]]:
        """Per episode, the reward each token caused: phi(first t+1 tokens) - phi(first t), phi being the weighted
        reward of that prefix as a response (see `mara_hf.rollouts`). One batched call to the reward sources."""
        from ..rewards.sources import combine

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

    # ----- learner --------------------------------------------------------------------------------------------
    def update(self) -> dict:
        """One discrete-SAC gradient step on a replay batch (see `mara_hf.sac`)."""
        batch = self.buffer.sample(self.config.batch_size, self.replay_sampler)
        s, a, r, s2, d = (t.to(self.device) for t in batch)
        if self.config.normalize_rewards:
            r = r / self.reward_scale()
        warm = self.learner.updates >= self.config.warmup_updates
        return self.learner.update(s.float(), a, r, s2.float(), d, train_actor=warm)

    def reward_scale(self) -> float:
        """The standard deviation of the rewards (targets) in the replay buffer, that `normalize_rewards` divides
        them by. Computed from the buffer itself (so a resumed run gets the same value) once per batch of added
        transitions."""
        if self._scale_at != self.buffer.added:
            rewards = self.buffer.rewards[:len(self.buffer)]
            self._scale = min(max(float(rewards.std()), 1e-3), 1.0) if len(rewards) > 1 else 1.0
            self._scale_at = self.buffer.added
        return self._scale

    def _updates(self, n: int) -> list[dict]:
        return [self.update() for _ in range(n)]

    @property
    def acting_agent(self) -> MaraAgent:
        """The agent rollouts decode with: `agent`, or its frozen copy while the learner updates it beside them."""
        return self.agent if self._acting is None else self._acting

    def _rollouts_beside(self, updates: int):
        """One round of rollouts, with `updates` learner updates running beside it (in a thread) on the replay
        buffer as it is: (transitions, infos, losses). The rollouts act with a copy of the actor taken before the
        updates start, so what they do does not depend on how the two threads interleave."""
        if not updates:
            return (*self.rollouts(), [])
        if self._acting_copy is None:
            self._acting_copy = copy.deepcopy(self.agent).requires_grad_(False)
        with torch.no_grad():
            for mine, theirs in zip(self._acting_copy.parameters(), self.agent.parameters()):
                mine.copy_(theirs)
        self._acting = self._acting_copy
        learner = InBackground(lambda: self._updates(updates))
        try:
            transitions, infos = self.rollouts()
        finally:  # also when interrupted: the updates finish, so a checkpoint after this is consistent
            losses = learner.join()
            self._acting = None
        return transitions, infos, losses

    @property
    def critics(self):
        return self.learner.critics

    @property
    def targets(self):
        return self.learner.targets

    @property
    def log_alpha(self):
        return self.learner.log_alpha

    @property
    def updates_done(self) -> int:
        return self.learner.updates

    # ----- loop -----------------------------------------------------------------------------------------------
    def train(self, resume: bool = False, drop_replay_buffer: bool = False) -> MaraAgent:
        """Run until `config.episodes` episodes; checkpoints every `checkpoint_every` and at the end. `resume`
        continues from the newest checkpoint, without its replayed transitions with `drop_replay_buffer`."""
        from tqdm.auto import tqdm

        cfg = self.config
        if drop_replay_buffer and not resume:
            raise ValueError("drop_replay_buffer only applies when resuming (--resume).")
        if resume:
            self.load_checkpoint(replay_buffer=not drop_replay_buffer)
        writer = self._tensorboard()
        next_checkpoint = (self.episodes_done // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        bar = tqdm(total=cfg.episodes, initial=self.episodes_done, desc="MARA training", unit="episode")
        import time

        started, first_round = time.perf_counter(), self.episodes_done
        previous = _stop_on_sigterm()
        owed = 0  # updates owed for transitions in the buffer; with overlap_updates they run beside the next round
        try:
            while self.episodes_done < cfg.episodes:
                beside, owed = owed, 0
                transitions, infos, losses = self._rollouts_beside(beside)
                for episode in transitions:
                    self.buffer.add(*episode)
                self.episodes_done += len(infos)
                if len(self.buffer) >= max(cfg.learning_starts, cfg.batch_size):
                    owed = cfg.updates_per_episode * len(infos)
                checkpoint = bool(self.output_dir) and next_checkpoint <= self.episodes_done < cfg.episodes
                # Sequential updates; and before a checkpoint or the end, so that a checkpoint holds every update its
                # episodes are owed and a resumed run continues exactly as an uninterrupted one.
                if owed and (not cfg.overlap_updates or checkpoint or self.episodes_done >= cfg.episodes):
                    losses += self._updates(owed)
                    owed = 0
                if losses and first_round is not None:  # the first round with updates: a full-cost measurement
                    self._announce_duration((time.perf_counter() - started) / (self.episodes_done - first_round))
                    first_round = None
                elif first_round is not None and not losses:
                    started, first_round = time.perf_counter(), self.episodes_done
                if infos:
                    record = self._log(infos, losses, writer)
                    bar.update(len(infos))
                    bar.set_postfix(reward=f"{record['reward']:.3f}", accept=f"{record['accept_rate']:.2f}")
                if checkpoint:
                    self.save_checkpoint()
                    next_checkpoint += cfg.checkpoint_every
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop cleanly, with a final checkpoint below
            logger.warning(f"Interrupted at {self.episodes_done} episodes; writing a final checkpoint.")
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            bar.close()
            self.close()
        self._updates(owed)  # interrupted between a round and its updates: the final checkpoint holds them
        if self.output_dir:
            self.save_checkpoint()
        if writer is not None:
            writer.close()
        return self.agent

    def _announce_duration(self, seconds_per_episode: float):
        """Say how long the run will take at the rate just measured, and how to shorten a long one."""
        left = (self.config.episodes - self.episodes_done) * seconds_per_episode
        message = (f"Measured {seconds_per_episode:.2f} s per episode (rollouts and learner updates): the remaining "
                   f"{self.config.episodes - self.episodes_done} episodes will take about {left / 3600:.1f} h.")
        if left > 3600:
            message += (" To shorten it: fewer --episodes, shorter --max-new-tokens, --dtype bfloat16 (CPUs with AMX, "
                        "GPUs), fewer --updates-per-episode or a smaller --batch-size, or rollouts on several workers "
                        "with --backend ray.")
        logger.warning(message)

    def rollouts(self):
        """One round of rollouts: (transitions per episode with decisions, info per episode). Backends that run
        rollouts elsewhere override this; what a rollout computes stays `collect`."""
        size = min(self.config.rollout_batch_size, self.config.episodes - self.episodes_done)
        return self.collect(self.prompt_batch(self.episodes_done, size))

    def close(self):
        """Release rollout resources (nothing to do locally)."""

    def _log(self, infos, losses, writer) -> dict:
        decisions = sum(i["decisions"] for i in infos)
        record = {"episodes": self.episodes_done, "reward": sum(i["reward"] for i in infos) / len(infos),
                  "accept_rate": sum(i["accepts"] for i in infos) / max(decisions, 1), "updates": self.updates_done}
        own = [i["reward"] for i in infos if not i.get("guided")]
        if len(own) < len(infos):  # guided rollouts: also the reward of the actor's own rollouts
            record["guided"] = 1 - len(own) / len(infos)
            if own:
                record["reward_unguided"] = sum(own) / len(own)
            record["guide_completed"] = self._guide_completion(infos)
        for key in infos[0]:
            if key.startswith("score/"):
                record[key] = sum(i[key] for i in infos) / len(infos)
        # nats per token between the agent's decoding distribution and the LLM's, from episode 0 (mdp docs)
        record["kl_per_token"] = sum(i["kl"] for i in infos) / max(sum(i["tokens"] for i in infos), 1)
        if losses:  # the learner's numbers stay tensors until here: one sync per round, not per update
            means = torch.stack([torch.stack([x[k] for k in LOSS_KEYS]) for x in losses]).float().mean(0).tolist()
            record.update(zip(LOSS_KEYS, means))
        self.history.append(record)
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if writer is not None:
            for key, value in record.items():
                if key != "episodes":
                    writer.add_scalar(key, value, self.episodes_done)
        return record

    def _guide_completion(self, infos) -> float:
        """Share of this round's guided rollouts that emitted their whole prefix. A prefix token outside the
        candidate set (top-k, then top-p) ends the guidance, so a prefix the LLM ranks low is rarely completed and
        the reward it was meant to reveal stays out of sight: warn once, early, with what to change."""
        done = [bool(i["guide_completed"]) for i in infos if i.get("guided")]
        self._guide_counts[0] += sum(done)
        self._guide_counts[1] += len(done)
        share = sum(done) / len(done)
        completed, total = self._guide_counts
        if not self._guide_warned and total >= 32 and completed < 0.5 * total:
            self._guide_warned = True
            logger.warning(f"Only {completed} of {total} guided rollouts emitted their whole guide prefix: a prefix "
                           f"token was outside the candidate set (top-k {self.config.top_k}, top-p "
                           f"{self.config.top_p}). Widen the set (e.g. --top-p 1.0) or choose prefixes the model "
                           "ranks higher; the log's guide_completed shows the share per round.")
        return share

    def _tensorboard(self):
        if not self.output_dir:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional
            return None
        return SummaryWriter(os.path.join(self.output_dir, "runs"))

    # ----- checkpoints ----------------------------------------------------------------------------------------
    def provenance(self) -> dict:
        from .. import __version__

        return {"reward_sources": [{"name": r.name, "multiplier": r.multiplier} for r in self.rewards],
                "datasets": [self.data_name] if isinstance(self.data_name, str) else list(self.data_name or []), "episodes": self.episodes_done,
                "trainer": f"mara-hf {__version__} (discrete SAC)",
                "settings": {k: v for k, v in self.config.to_dict().items() if k not in ("device",)},
                **({"init_agent": self.started_from} if self.started_from else {})}

    def save_checkpoint(self) -> str:
        """Write `output_dir/checkpoint-<episodes>` (agent folder + trainer state) and `output_dir/agent`, each
        atomically (built under a temporary name, then renamed); keeps the two newest checkpoints."""
        os.makedirs(self.output_dir, exist_ok=True)
        self.agent.config.training = self.provenance()
        name = os.path.join(self.output_dir, f"checkpoint-{self.episodes_done}")
        tmp = tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=self.output_dir)
        try:
            self.agent.save_pretrained(os.path.join(tmp, "agent"))
            torch.save(self._trainer_state(), os.path.join(tmp, STATE_FILE))
            torch.save(self.buffer.state_dict(), os.path.join(tmp, BUFFER_FILE))
            if os.path.isdir(name):
                shutil.rmtree(name)
            os.replace(tmp, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        save_atomically(self.agent, os.path.join(self.output_dir, "agent"))
        for old in checkpoints(self.output_dir)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info(f"Checkpoint at {self.episodes_done} episodes: {name}")
        return name

    def _trainer_state(self) -> dict:
        return {"learner": self.learner.state_dict(), "episodes_done": self.episodes_done,
                "sampler": self.sampler.get_state(), "replay_sampler": self.replay_sampler.get_state(),
                "torch_rng": torch.get_rng_state(),
                "state_dim": self.agent.config.state_dim, "config": self.config.to_dict()}

    def load_checkpoint(self, path: str | None = None, replay_buffer: bool = True):
        """Restore the newest checkpoint in `output_dir` (or `path`); a fresh start when there is none. Without
        `replay_buffer` the buffer starts empty: transitions collected under other settings (a narrower candidate
        set, other guides) would otherwise outweigh the new ones for a long time."""
        path = path or (checkpoints(self.output_dir) or [None])[-1]
        if path is None:
            logger.warning(f"No checkpoint in {self.output_dir!r}: starting from scratch.")
            return
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
        hidden = self.hidden_size
        if state["state_dim"] != hidden:
            raise ValueError(f"The checkpoint {path!r} is for a model of hidden size {state['state_dim']}, "
                             f"this model has {hidden}.")
        agent = MaraAgent.from_pretrained(os.path.join(path, "agent"))
        self.agent.load_state_dict(agent.state_dict())
        if "learner" not in state:
            raise ValueError(f"The checkpoint {path!r} was written by an older mara-hf (separate critics); it cannot "
                             "be resumed with this version: start a new run in another --output.")
        self.learner.load_state_dict(state["learner"])
        if not self.config.auto_alpha:  # a fixed temperature is a setting: the one given now applies from here on
            saved = float(self.learner.log_alpha.exp())
            if not math.isclose(saved, self.config.init_alpha, rel_tol=1e-6):
                logger.warning(f"Alpha {saved:.4g} in the checkpoint, {self.config.init_alpha:.4g} from here on "
                               "(--init-alpha; alpha is fixed without --auto-alpha).")
                with torch.no_grad():
                    self.learner.log_alpha.fill_(math.log(self.config.init_alpha))
        self.episodes_done = state["episodes_done"]
        self.sampler.set_state(state["sampler"])
        if "replay_sampler" in state:  # older checkpoints drew replay batches from `sampler`
            self.replay_sampler.set_state(state["replay_sampler"])
        torch.set_rng_state(state["torch_rng"])
        if replay_buffer:
            self.buffer.load_state_dict(torch.load(os.path.join(path, BUFFER_FILE), map_location="cpu",
                                                   weights_only=True))
        logger.warning(f"Resumed from {path} at {self.episodes_done} episodes"
                       + ("." if replay_buffer else ", with an empty replay buffer."))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_on_sigterm():
    """Make SIGTERM (a scheduler's preemption, `kill`; also the only stop signal a job started with `&` receives,
    since such jobs ignore SIGINT) end training like Ctrl-C, with a final checkpoint. Returns the handler to
    restore, or None where handlers cannot be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def checkpoints(output_dir: str | None) -> list[str]:
    """Complete checkpoints in `output_dir`, oldest first (a checkpoint folder only appears once complete)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            if os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
                found.append((int(name[len("checkpoint-"):]), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def agent_from(name: str, config: MaraConfig) -> tuple[MaraAgent, dict]:
    """A new agent with `config`'s decoding settings and provenance and the actor weights of agent `name` (a
    folder, bundled name or Hub id; its hidden layers are those of `name`), and what is known of where it started."""
    start = MaraAgent.from_pretrained(name)
    if start.config.state_dim != config.state_dim:
        raise ValueError(f"--init-agent {name!r} reads width {start.config.state_dim}, the model has hidden_size "
                         f"{config.state_dim}: start from an agent trained for a model of that width.")
    if start.config.strategy != config.strategy:
        logger.warning(f"--init-agent {name!r} decodes with strategy {start.config.strategy!r}; the new agent is "
                       f"trained and saved for {config.strategy!r}.")
    config = copy.deepcopy(config)
    config.hidden_dims = list(start.config.hidden_dims)
    agent = MaraAgent(config)
    agent.load_state_dict(start.state_dict())
    trained = start.config.training or {}
    info = {"name_or_path": str(name), "episodes": trained.get("episodes"),
            "reward_sources": trained.get("reward_sources"), "mara_hf_version": start.config.mara_hf_version}
    return agent, info


def start_at_prior(agent: MaraAgent, prior_accept: float):
    """Make a fresh actor output P(accept) = prior_accept for every state (last layer zero, bias at the prior's
    logit): greedy decisions then accept everything, i.e. decode exactly like the LLM alone."""
    with torch.no_grad():
        agent.output_linear.weight.zero_()
        agent.output_linear.bias.copy_(torch.tensor([0.0, math.log(prior_accept / (1 - prior_accept))]))
