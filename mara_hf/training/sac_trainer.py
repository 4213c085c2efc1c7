"""MARA training: discrete soft actor-critic over the accept/reject MDP, in rounds of batched rollouts.

The state is the LLM's hidden state of candidate t_k appended to the prefix; the action is reject (0) or accept
(1). How decisions become tokens and what each costs: `mara_hf.training.transitions` (veto by default, the paper's
chain as an option); the learner: `mara_hf.training.sac`.

A round: rollouts (`RolloutCollector`; `rollouts` is what a backend that runs them elsewhere overrides), their
transitions into the `ReplayBuffer`, learner updates (after the rollouts, or beside the next round's with
`overlap_updates`) and a log record; checkpoints (`mara_hf.training.checkpoints`) every `checkpoint_every` episodes.
"""

import contextlib
import copy
import math
import os
import time

import torch
from transformers.utils import logging

from ..agent.modeling import MaraAgent
from ..data.prompts import prompt_records
from ..models import placement
from ..utils import InBackground, save_atomically
from .agents import initial_agent
from .checkpoints import (checkpoints, read_agent, read_buffer, read_trainer_state, restore_sigterm, stop_on_sigterm,
                          write_checkpoint)
from .replay_buffer import ReplayBuffer
from .round_log import round_record, tensorboard_writer
from .rollouts import RolloutCollector
from .sac import SoftActorCritic
from .sac_config import MaraTrainingConfig
from .validation import calibrate, split_validation, summary

logger = logging.get_logger(__name__)


class MaraTrainer:
    r"""
    Trains a MARA agent for `model` against reward sources.

    Args:
        model: the (frozen) causal LM. tokenizer: its tokenizer.
        rewards (`list[RewardSource]`): see `mara_hf.rewards.parse_reward_spec`; scores are weighted by each
            source's multiplier and summed.
        prompts (`list[dict]`): records with a `"prompt"` field (see `mara_hf.data.load_prompts`); all fields
            reach the reward sources. A `datasets.Dataset` or records in TRL's prompt-only formats (plain or
            conversational) are read the same way (`mara_hf.data.prompts.prompt_records`).
        config ([`MaraTrainingConfig`]): training settings. output_dir: where checkpoints and the agent go.
        data_name: recorded in the agent's provenance (e.g. the prompt file or dataset id; a list for several).
        agent: the agent to train (default: `config.init_agent`'s weights, else a fresh one; see `agents`).
        model_config: the LLM's config, for a learner that is given no model (`model=None`) because its
            rollouts run elsewhere.

    Example (a reward written in Python, the embedded SmolLM2; under a minute on a CPU at these sizes, far too few
    episodes to learn anything: see `MaraTrainingConfig` for a real run's):

    ```python
    import mara_hf
    from mara_hf import MaraTrainer, MaraTrainingConfig
    from mara_hf.rewards import CallableReward

    model, tokenizer = mara_hf.load_embedded_model()
    prompts = [{"prompt": p} for p in ["Name a fruit.", "Name a colour.", "Name an animal.", "Name a city."]]
    brief = CallableReward(lambda prompts, responses: [-len(r.split()) / 16 for r in responses], name="brief")
    config = MaraTrainingConfig(episodes=8, max_new_tokens=16, rollout_batch_size=4, learning_starts=64,
                                learner_batch_size=32, agent_hidden_dims=[64, 32])
    agent = MaraTrainer(model, tokenizer, [brief], prompts, config, output_dir="runs/brief").train()
    mara = mara_hf.MaraProcessor(agent, model=model)  # decodes like any agent; also saved in runs/brief/agent
    ```
    """

    def __init__(self, model, tokenizer, rewards, prompts, config: MaraTrainingConfig | None = None,
                 output_dir: str | None = None, data_name: str | list[str] | None = None, agent: MaraAgent | None = None,
                 model_config=None):
        if not prompts:
            raise ValueError("No prompts to train on.")
        prompts = prompt_records(prompts)  # a datasets.Dataset or records in TRL's prompt formats too
        if not rewards:
            raise ValueError("Give at least one reward source.")
        self.config = config = config or MaraTrainingConfig()
        if model is not None:  # a learner whose rollouts run elsewhere holds no LLM (see RayMaraTrainer)
            model_config = model.config
        self.rewards = list(rewards)
        # validation prompts: held out of the rollouts, the threshold chosen on them at the end (`validation`)
        # (none where the LLM is elsewhere: a learner whose rollouts run on Ray workers)
        self.prompts, self.validation = split_validation(list(prompts), config.validation_prompts if model is not None
                                                         else 0, config.seed)
        self.validation_report = None
        self.output_dir, self.data_name = output_dir, data_name
        self.device = torch.device(config.device or (model.device if model is not None else "cpu"))
        self.hidden_size = hidden = model_config.get_text_config().hidden_size
        torch.manual_seed(config.seed)
        agent, self.started_from = initial_agent(config, model_config, agent)
        self.agent = agent.to(self.device)
        prior = None
        if self.started_from and config.init_agent_prior:  # regularised towards the started agent's own decisions
            prior = copy.deepcopy(self.agent).requires_grad_(False).eval()
        self.learner = SoftActorCritic(self.agent, hidden, config, self.device, prior_actor=prior)
        self.buffer = ReplayBuffer(config.buffer_size, hidden)
        self.sampler = torch.Generator().manual_seed(config.seed)  # rollouts: actions, visiting orders, guides
        # replay batches: a stream of their own, so updates running beside rollouts draw the same batches
        self.replay_sampler = torch.Generator().manual_seed(config.seed + 1)
        self.collector = None if model is None else RolloutCollector(model, tokenizer, self.rewards, config,
                                                                     self.sampler)
        # with overlap_updates, rollouts act with a frozen copy of the actor while the learner updates it
        self._acting = self._acting_copy = None
        self._scale, self._scale_at = 1.0, -1  # reward_scale's cache
        self.episodes_done = 0
        self.history: list[dict] = []
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

    def collect(self, records: list[dict]):
        """Decode `records` with actions sampled from the acting actor; returns (transitions, per-episode info)."""
        return self.collector.collect(self.acting_agent, records)

    def rollouts(self):
        """One round of rollouts: (transitions per episode with decisions, info per episode). Backends that run
        rollouts elsewhere override this; what a rollout computes stays `RolloutCollector.collect`."""
        size = min(self.config.rollout_batch_size, self.config.episodes - self.episodes_done)
        return self.collect(self.prompt_batch(self.episodes_done, size))

    def close(self):
        """Release rollout resources (nothing to do locally)."""

    # ----- learner --------------------------------------------------------------------------------------------
    def update(self) -> dict:
        """One discrete-SAC gradient step on a replay batch (see `mara_hf.training.sac`)."""
        scale = self.reward_scale() if self.config.normalize_rewards else 1.0
        batch = self.buffer.sample(self.config.learner_batch_size, self.replay_sampler, scale=scale)
        s, a, r, s2, d = (t.to(self.device) for t in batch)
        warm = self.learner.updates >= self.config.warmup_updates
        return self.learner.update(s.float(), a, r, s2.float(), d, train_actor=warm)

    def reward_scale(self) -> float:
        """The standard deviation of the response rewards in the replay buffer's transitions (divergence costs
        apart), capped at 1: what `normalize_rewards` divides them by. Computed from the buffer itself (so a
        resumed run gets the same value) once per batch of added transitions."""
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

    @contextlib.contextmanager
    def acting_with(self, agent: MaraAgent):
        """Rollouts inside the block decode with `agent` instead of the learner's actor."""
        self._acting = agent
        try:
            yield
        finally:
            self._acting = None

    def rollouts_beside(self, updates: int):
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
        with self.acting_with(self._acting_copy):
            learner = InBackground(lambda: self._updates(updates))
            try:
                transitions, infos = self.rollouts()
            finally:  # also when interrupted: the updates finish, so a checkpoint after this is consistent
                losses = learner.join()
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
        writer = tensorboard_writer(self.output_dir)
        next_checkpoint = (self.episodes_done // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        bar = tqdm(total=cfg.episodes, initial=self.episodes_done, desc="MARA training", unit="episode")
        started, first_round = time.perf_counter(), self.episodes_done
        previous = stop_on_sigterm()
        interrupted = False
        owed = 0  # updates owed for transitions in the buffer; with overlap_updates they run beside the next round
        rough = False  # whether the rollouts-only estimate was given
        logger.warning(f"Training {cfg.episodes - self.episodes_done} episodes of up to {cfg.max_new_tokens} new "
                       f"tokens, {cfg.rollout_batch_size} prompts per rollout round; the expected duration follows "
                       "the first round.")
        most = len(self.buffer) + (cfg.episodes - self.episodes_done) * cfg.max_new_tokens
        if cfg.mdp == "veto" and most < cfg.updates_start:  # one transition per emitted token; responses may end sooner
            logger.warning(f"These episodes collect about {most} transitions at most and the learner starts at "
                           f"{cfg.updates_start}: it may never update. Give more --episodes or a smaller "
                           "--learning-starts.")
        try:
            while self.episodes_done < cfg.episodes:
                beside, owed = owed, 0
                transitions, infos, losses = self.rollouts_beside(beside)
                for episode in transitions:
                    self.buffer.add(*episode)
                self.episodes_done += len(infos)
                if len(self.buffer) >= cfg.updates_start:
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
                    if not rough and not owed:  # the learner has not started: rollouts alone give a lower bound
                        self._announce_duration((time.perf_counter() - started) / max(
                            self.episodes_done - first_round, 1), with_updates=False)
                        rough = True
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
            interrupted = True
        finally:
            restore_sigterm(previous)
            bar.close()
            self.close()
        self._updates(owed)  # interrupted between a round and its updates: the final checkpoint holds them
        if self.updates_done == 0:
            logger.warning(f"The learner never updated: the run collected {len(self.buffer)} transitions and updates "
                           f"start at {cfg.updates_start}. The agent is the fresh one, which changes nothing: give "
                           "more --episodes or a smaller --learning-starts.")
        if self.output_dir:
            self.save_checkpoint()
        if writer is not None:
            writer.close()
        return self.agent if interrupted else self.finish()

    def finish(self) -> MaraAgent:
        """The agent as the run hands it over: with validation prompts and the LLM here, a copy with its threshold
        chosen on them (`validation.calibrate`), saved to `output_dir/agent` with the report; else the agent."""
        if not self.validation or self.collector is None:
            return self.agent
        c = self.config
        agent = copy.deepcopy(self.agent).requires_grad_(False)
        self.validation_report = calibrate(agent, self.collector.model, self.collector.tokenizer, self.validation,
                                           self.rewards, max_new_tokens=c.max_new_tokens,
                                           samples=c.validation_samples, batch_size=c.rollout_batch_size, seed=c.seed,
                                           output_dir=self.output_dir)
        agent.config.training = {**self.provenance(), "validation": summary(self.validation_report)}
        if self.output_dir:
            save_atomically(agent, os.path.join(self.output_dir, "agent"))
        return agent

    def _announce_duration(self, seconds_per_episode: float, with_updates: bool = True):
        """Say how long the run will take at the rate just measured (`with_updates=False`: rollouts alone, before
        the learner starts: a lower bound), and how to shorten a long one."""
        cfg = self.config
        left = (cfg.episodes - self.episodes_done) * seconds_per_episode
        if with_updates:
            message = (f"Measured {seconds_per_episode:.2f} s per episode (rollouts and learner updates): the "
                       f"remaining {cfg.episodes - self.episodes_done} episodes will take about {left / 3600:.1f} h.")
        else:
            message = (f"Measured {seconds_per_episode:.2f} s per episode for rollouts alone (learner updates start "
                       f"once {cfg.updates_start} transitions are collected, and add to it): the "
                       f"remaining {cfg.episodes - self.episodes_done} episodes will take at least {left / 3600:.1f} h.")
        if self.collector is not None:
            message += f" (the LLM on {placement(self.collector.model)})"
        if left > 3600:
            message += (" To shorten it: fewer --episodes, shorter --max-new-tokens (a first run on a CPU: --episodes "
                        "300 --max-new-tokens 64 --learning-starts 2048), a GPU (--device, --device-map, --load-in-4bit), fewer "
                        "--updates-per-episode or a smaller --learner-batch-size, or rollouts on several workers with --backend "
                        "ray.")
        logger.warning(message)

    def _log(self, infos, losses, writer) -> dict:
        record = round_record(infos, losses, self.episodes_done, self.updates_done, self.guide_completion)
        self.history.append(record)
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if writer is not None:
            for key, value in record.items():
                if key != "episodes":
                    writer.add_scalar(key, value, self.episodes_done)
        return record

    def guide_completion(self, infos) -> float:
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

    # ----- checkpoints ----------------------------------------------------------------------------------------
    def provenance(self) -> dict:
        from .._version import __version__

        return {"reward_sources": [{"name": r.name, "multiplier": r.multiplier} for r in self.rewards],
                "datasets": [self.data_name] if isinstance(self.data_name, str) else list(self.data_name or []), "episodes": self.episodes_done,
                "trainer": f"mara-hf {__version__} (discrete SAC)",
                "settings": {k: v for k, v in self.config.to_dict().items() if k not in ("device",)},
                **({"init_agent": self.started_from} if self.started_from else {})}

    def save_checkpoint(self) -> str:
        """Write `output_dir/checkpoint-<episodes>` (agent folder + trainer state + replay buffer) and
        `output_dir/agent`, each atomically; keeps the two newest checkpoints (see `checkpoints`)."""
        self.agent.config.training = self.provenance()
        return write_checkpoint(self.output_dir, self.episodes_done, self.agent, self._trainer_state(),
                                self.buffer.state_dict())

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
        state = read_trainer_state(path, self.hidden_size)
        self.agent.load_state_dict(read_agent(path).state_dict())
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
            self.buffer.load_state_dict(read_buffer(path))
        logger.warning(f"Resumed from {path} at {self.episodes_done} episodes"
                       + ("." if replay_buffer else ", with an empty replay buffer."))
