"""MARA training: discrete soft actor-critic over the accept/reject MDP, with batched rollouts.

MDP (MARA_SPEC): the state is the LLM's hidden state of candidate t_k appended to the prefix; the action is
reject (0) or accept (1). Reject moves to the next candidate of the same step, accept to the first candidate of
the next step. Every decision earns -kl_ctl * (log pi_agent(t_k) - log pi_LLM(t_k)); the response's reward
(weighted reward-source scores minus a baseline) is added to its last transition.

The trainer is split in pieces that do not care where they run: `collect` (rollouts -> transitions),
`ReplayBuffer`, `update` (learner step) and the checkpoint functions, so another backend can move rollouts
elsewhere without changing what they compute.
"""

import copy
import math
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .configuration_mara import MaraConfig
from .convert import save_atomically
from .fast import Step, decode
from .mara_training_config import MaraTrainingConfig
from .modeling_mara import MaraAgent
from .replay_buffer import ReplayBuffer

logger = logging.get_logger(__name__)

STATE_FILE = "trainer_state.pt"
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
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            model_config = model.config
        self.rewards, self.prompts = list(rewards), list(prompts)
        self.output_dir, self.data_name = output_dir, data_name
        self.device = torch.device(config.device or (model.device if model is not None else "cpu"))
        self.hidden_size = hidden = model_config.get_text_config().hidden_size
        torch.manual_seed(config.seed)
        agent_config = MaraConfig(state_dim=hidden, hidden_dims=config.agent_hidden_dims, top_k=config.top_k,
                                  top_p=config.top_p, base_model_name_or_path=model_config.name_or_path)
        if agent is not None and agent.config.state_dim != hidden:
            raise ValueError(f"The agent reads width {agent.config.state_dim}, the model has hidden_size {hidden}.")
        self.agent = (agent or MaraAgent(agent_config)).to(self.device)
        self.critics = torch.nn.ModuleList([MaraAgent(agent_config), MaraAgent(agent_config)]).to(self.device)
        self.targets = copy.deepcopy(self.critics).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), device=self.device, requires_grad=True)
        self.actor_opt = torch.optim.Adam(self.agent.parameters(), lr=config.lr_actor)
        self.critic_opt = torch.optim.Adam(self.critics.parameters(), lr=config.lr_critic)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=config.lr_alpha)
        self.target_entropy = config.target_entropy_factor * math.log(2)
        self.buffer = ReplayBuffer(config.buffer_size, hidden)
        self.sampler = torch.Generator().manual_seed(config.seed)
        self.episodes_done = 0
        self.updates_done = 0
        self.history: list[dict] = []
        self._guide_ids = None  # guide prefixes as token ids, tokenized on first use

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
        from .prompts import format_prompts
        from .rewards import combine

        cfg = self.config
        texts = format_prompts(self.tokenizer, [r["prompt"] for r in records])
        enc = self.tokenizer(texts, return_tensors="pt", padding=True,
                             add_special_tokens=not getattr(self.tokenizer, "chat_template", None)).to(self.model.device)
        steps: list[list[dict]] = [[] for _ in records]
        guides, on_guide = self._draw_guides(len(records))
        guides, on_guide = guides.to(self.model.device), on_guide.to(self.model.device)
        guided = on_guide.tolist()
        position = [0]  # decoding step, for the guides

        def guide_token():  # per row, the guide's token at this step; -1 (no token) past its end
            t = position[0]
            return guides[:, t] if t < guides.shape[1] else guides.new_full(guides.shape[:1], -1)

        def threshold(cands):  # accept iff P(accept) > u, u ~ U(0,1): a sample of the actor's policy
            bar = torch.rand(cands.ids.shape, generator=self.sampler).to(cands.ids.device)
            hit = (cands.ids == guide_token()[:, None]) & cands.mask
            on_guide.logical_and_(hit.any(-1))  # off the guide for good: the actor's own policy from here on
            # P(accept) <= 1 < 2: reject every candidate but the guide's token, accepted with a bar of -1
            forced = torch.where(hit, -1.0, 2.0)
            return torch.where(on_guide[:, None], forced, bar)

        def choose(cands, decided, p_accept, bar):  # first sampled accept, else the training fallback: the last
            accepted = (p_accept > bar) & cands.mask
            return torch.where(accepted.any(-1), accepted.int().argmax(-1), cands.counts - 1)

        def on_step(step: Step):
            emitted = step.cands.ids.gather(1, step.index[:, None]).squeeze(1)
            on_guide.logical_and_(emitted == guide_token())  # a forced single candidate can leave the guide too
            position[0] += 1
            rows = step.decided.nonzero().flatten().tolist()
            if not rows:
                return
            states, p, lp = step.states.half().cpu(), step.p_accept.cpu(), step.cands.logprobs.cpu()
            counts, index = step.cands.counts.cpu(), step.index.cpu()
            accepted = (step.p_accept > step.threshold).gather(1, step.index[:, None]).squeeze(1).cpu()
            for r in rows:
                n = int(counts[r])
                steps[r].append({"states": states[r, :n], "p_accept": p[r, :n], "llm_logprobs": lp[r, :n],
                                 "index": int(index[r]), "accepted": bool(accepted[r])})

        eos = self.model.generation_config.eos_token_id
        out = decode(self.model, self.agent, enc["input_ids"], enc["attention_mask"], max_new_tokens=cfg.max_new_tokens,
                     eos=eos, pad=self.tokenizer.pad_token_id, top_k=cfg.top_k, top_p=cfg.top_p, chunk_size=None,
                     threshold=threshold, choose=choose, on_step=on_step)
        responses = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        total, per_source = combine(self.rewards, [r["prompt"] for r in records], responses, records)
        transitions, infos = [], []
        for i, record in enumerate(records):
            reward = float(total[i]) - cfg.reward_baseline
            episode = episode_transitions(steps[i], reward, cfg.kl_ctl, cfg.gamma, cfg.postback_reward)
            if episode is not None:
                transitions.append(episode)
            decisions = sum(len(s["states"]) if not s["accepted"] else s["index"] + 1 for s in steps[i])
            accepts = sum(s["accepted"] for s in steps[i])
            infos.append({"reward": reward, "decisions": decisions, "accepts": accepts, "response": responses[i],
                          "guided": guided[i],
                          **{f"score/{name}": float(v[i]) for name, v in per_source.items()}})
        return transitions, infos

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
        """One discrete-SAC gradient step on a replay batch."""
        cfg = self.config
        s, a, r, s2, d = (t.to(self.device) for t in self.buffer.sample(cfg.batch_size, self.sampler))
        s, s2 = s.float(), s2.float()
        alpha = self.log_alpha.exp().detach()
        target = r
        if cfg.bootstrap:
            with torch.no_grad():
                logits2 = self.agent(s2).logits
                pi2, logpi2 = logits2.softmax(-1), logits2.log_softmax(-1)
                q_next = torch.min(self.targets[0](s2).logits, self.targets[1](s2).logits)
                target = r + cfg.gamma * (~d).float() * (pi2 * (q_next - alpha * logpi2)).sum(-1)
        q1, q2 = (c(s).logits.gather(1, a[:, None]).squeeze(1) for c in self.critics)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self._step(self.critic_opt, critic_loss, self.critics.parameters())

        logits = self.agent(s).logits
        pi, logpi = logits.softmax(-1), logits.log_softmax(-1)
        with torch.no_grad():
            q = torch.min(self.critics[0](s).logits, self.critics[1](s).logits)
        actor_loss = (pi * (alpha * logpi - q)).sum(-1).mean()
        self._step(self.actor_opt, actor_loss, self.agent.parameters())

        entropy = -(pi * logpi).sum(-1).detach()
        alpha_loss = (self.log_alpha * (entropy - self.target_entropy)).mean()
        self._step(self.alpha_opt, alpha_loss, [self.log_alpha])

        with torch.no_grad():
            for critic, target_net in zip(self.critics, self.targets):
                for p, tp in zip(critic.parameters(), target_net.parameters()):
                    tp.lerp_(p, cfg.tau)
        self.updates_done += 1
        return {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(), "alpha": alpha.item(),
                "entropy": float(entropy.mean())}

    def _step(self, optimizer, loss, params):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params), self.config.max_grad_norm)
        optimizer.step()

    # ----- loop -----------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> MaraAgent:
        """Run until `config.episodes` episodes; checkpoints every `checkpoint_every` and at the end."""
        from tqdm.auto import tqdm

        cfg = self.config
        if resume:
            self.load_checkpoint()
        writer = self._tensorboard()
        next_checkpoint = (self.episodes_done // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        bar = tqdm(total=cfg.episodes, initial=self.episodes_done, desc="MARA training", unit="episode")
        try:
            while self.episodes_done < cfg.episodes:
                transitions, infos = self.rollouts()
                for episode in transitions:
                    self.buffer.add(*episode)
                self.episodes_done += len(infos)
                losses = []
                if len(self.buffer) >= max(cfg.learning_starts, cfg.batch_size):
                    losses = [self.update() for _ in range(cfg.updates_per_episode * len(infos))]
                if infos:
                    record = self._log(infos, losses, writer)
                    bar.update(len(infos))
                    bar.set_postfix(reward=f"{record['reward']:.3f}", accept=f"{record['accept_rate']:.2f}")
                if self.output_dir and next_checkpoint <= self.episodes_done < cfg.episodes:
                    self.save_checkpoint()
                    next_checkpoint += cfg.checkpoint_every
        except KeyboardInterrupt:  # Ctrl-C: stop cleanly, with a final checkpoint below
            logger.warning(f"Interrupted at {self.episodes_done} episodes; writing a final checkpoint.")
        finally:
            bar.close()
            self.close()
        if self.output_dir:
            self.save_checkpoint()
        if writer is not None:
            writer.close()
        return self.agent

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
        for key in infos[0]:
            if key.startswith("score/"):
                record[key] = sum(i[key] for i in infos) / len(infos)
        for key in ("critic_loss", "actor_loss", "alpha", "entropy"):
            if losses:
                record[key] = sum(x[key] for x in losses) / len(losses)
        self.history.append(record)
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if writer is not None:
            for key, value in record.items():
                if key != "episodes":
                    writer.add_scalar(key, value, self.episodes_done)
        return record

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
        from . import __version__

        return {"reward_sources": [{"name": r.name, "multiplier": r.multiplier} for r in self.rewards],
                "datasets": [self.data_name] if isinstance(self.data_name, str) else list(self.data_name or []), "episodes": self.episodes_done,
                "trainer": f"mara-hf {__version__} (discrete SAC)",
                "settings": {k: v for k, v in self.config.to_dict().items() if k not in ("device",)}}

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
        return {"critics": self.critics.state_dict(), "targets": self.targets.state_dict(),
                "log_alpha": self.log_alpha.detach().cpu(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "alpha_opt": self.alpha_opt.state_dict(),
                "episodes_done": self.episodes_done, "updates_done": self.updates_done,
                "sampler": self.sampler.get_state(), "torch_rng": torch.get_rng_state(),
                "state_dim": self.agent.config.state_dim, "config": self.config.to_dict()}

    def load_checkpoint(self, path: str | None = None):
        """Restore the newest checkpoint in `output_dir` (or `path`); a fresh start when there is none."""
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
        self.critics.load_state_dict(state["critics"])
        self.targets.load_state_dict(state["targets"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.episodes_done, self.updates_done = state["episodes_done"], state["updates_done"]
        self.sampler.set_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.buffer.load_state_dict(torch.load(os.path.join(path, BUFFER_FILE), map_location="cpu", weights_only=True))
        logger.warning(f"Resumed from {path} at {self.episodes_done} episodes.")


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


def episode_transitions(steps: list[dict], reward: float, kl_ctl: float, gamma: float, postback: bool):
    """Transitions of one episode: (states, actions, rewards, next offsets, dones), or None without decisions.

    Each decision step contributes its candidates in order up to the first accept (all of them when every
    candidate was rejected and the last was emitted). Steps whose states contain NaN are skipped.
    """
    states, actions, rewards, opens_accepted_step = [], [], [], []
    for step in steps:
        if not torch.isfinite(step["states"].float()).all():
            continue
        n = len(step["states"])
        last = step["index"] if step["accepted"] else n - 1
        kl = kl_rewards(step["p_accept"], step["llm_logprobs"], kl_ctl)
        for k in range(last + 1):
            states.append(step["states"][k])
            actions.append(1 if (step["accepted"] and k == last) else 0)
            rewards.append(float(kl[k]))
            opens_accepted_step.append(k == 0 and step["accepted"])
    if not states:
        return None
    n = len(states)
    rewards = torch.tensor(rewards)
    actions = torch.tensor(actions)
    if postback:  # the terminal reward, discounted by gamma at each accepted token back from the end: every
        factor = 1.0  # decision of a step gets reward * gamma ** (accepted tokens after that step)
        for i in range(n - 1, -1, -1):
            rewards[i] += reward * factor
            if opens_accepted_step[i]:  # going back past the first decision of a step whose token was accepted
                factor *= gamma
    else:
        rewards[-1] += reward
    next_offsets = torch.arange(1, n + 1)
    next_offsets[-1] = n - 1  # terminal: points at itself, masked by done
    dones = torch.zeros(n, dtype=torch.bool)
    dones[-1] = True
    return torch.stack(states), actions, rewards, next_offsets, dones


def kl_rewards(p_accept: torch.Tensor, llm_logprobs: torch.Tensor, kl_ctl: float) -> torch.Tensor:
    """-kl_ctl * (log pi_agent(t_k) - log pi_LLM(t_k)) for every candidate of a step, as the authors compute it.

    The agent's chance of emitting t_k is the conditional acceptance chain p_k = P_acc(t_k) * prod_{j<k}
    (1 - P_acc(t_j)); log pi_agent is the log-softmax of those chances over the candidates (of the chances
    themselves, not of their logs: the authors' choice, kept for fidelity). log pi_LLM is the LLM's untempered
    log-probability of t_k over the whole vocabulary.
    """
    p = p_accept.double()
    chain = p * torch.cat([p.new_ones(1), (1 - p).cumprod(0)[:-1]])
    log_agent = chain.log_softmax(0)
    return (-kl_ctl * (log_agent - llm_logprobs.double())).float()
