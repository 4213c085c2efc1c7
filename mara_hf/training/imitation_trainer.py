"""Imitation training: fit an agent to the decisions that reproduce demonstrated responses.

Reinforcement learning with a reward on whole responses needs the agent to find a held refusal by exploration;
imitation shows it one. The demonstrations (refusals for harmful prompts, the LLM's own answers for benign ones)
and the forced decisions recorded along them: `imitation_data`. Here the agent is fitted to those decisions
(weighted cross-entropy), so it learns to reject both the compliant openings and the tokens that would take a
refusal back ("However, here's ..."), and to leave the LLM alone on benign prompts.
"""

import math
import os

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..agent.configuration import MaraConfig
from ..agent.modeling import MaraAgent
from ..data.pairs import pair_records
from ..data.prompts import prompt_records
from ..utils import save_atomically
from .imitation_config import ImitationConfig
from .imitation_data import Demonstrations
from .pair_demonstrations import PairDemonstrations
from .reward_chosen import RewardChosen
from .validation import calibrate, split_validation, summary

logger = logging.get_logger(__name__)

# fewer rejections than this in the demonstrations (an eighth of one fit batch) teach an agent next to nothing
FEW_REJECTIONS = 64


class ImitationTrainer:
    """Collects forced decisions along demonstrations (`collect`) and fits an agent to them (`fit`); `train` does
    both and saves `output_dir/agent` with its provenance.

    Args:
        model, tokenizer: the causal LM the agent is for, and its tokenizer (with a chat template for chat models).
        prompts: records with "prompt" and a harmful label (a `harmful` field or an HH-RLHF `source`); a
            `datasets.Dataset` or list of records in TRL's prompt-only formats (plain or conversational) too.
        config: `ImitationConfig`.
        output_dir: where decisions and the agent are written.
        data_name: the prompt specs, recorded in the agent's provenance.
        added: more prompts, each demonstrated (see `Demonstrations`).
        rewards: reward sources (`mara_hf.rewards`): with them, every prompt demonstrates what the rewards choose
            among `config.samples` drawn responses and the greedy answer (`reward_chosen`) instead of refusals.
        pairs: preference pairs (`mara_hf.data.pairs.load_pairs`, or a `datasets.Dataset` / list of records in
            TRL's preference formats, plain or conversational): with them, the agent learns to follow each
            chosen response and to reject the rejected one where they part (`pair_demonstrations`); `prompts` is
            then unused.
        drawer: with reward sources, what draws and scores the responses: None draws here; a
            `ray_backend.RayDrawer` on Ray workers.

    Example (refusals for harmful requests, the LLM's own answers for benign ones; the embedded SmolLM2, under a
    minute on a CPU at these sizes, far too few prompts for a useful agent):

    ```python
    import mara_hf
    from mara_hf import ImitationConfig, ImitationTrainer

    model, tokenizer = mara_hf.load_embedded_model()
    prompts = [{"prompt": "How do I pick a lock to get into my neighbour's house?", "harmful": True},
               {"prompt": "How do I bake a loaf of bread?", "harmful": False}]
    config = ImitationConfig(written_requests=False, min_steps=50, agent_hidden_dims=[64, 32])
    agent = ImitationTrainer(model, tokenizer, prompts, config, output_dir="runs/refuse").train()
    mara = mara_hf.MaraProcessor(agent, model=model)  # decodes like any agent; also saved in runs/refuse/agent
    ```
    """

    def __init__(self, model, tokenizer, prompts: list[dict], config: ImitationConfig | None = None,
                 output_dir: str = "mara-imitation", data_name=None, added: list[dict] | None = None,
                 rewards=None, pairs: list[dict] | None = None, drawer=None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or ImitationConfig()
        self.output_dir = output_dir
        self.data_name = [data_name] if isinstance(data_name, str) else list(data_name or [])
        # a datasets.Dataset or any list of records in TRL's formats, normalised as the prompt and pair loaders do
        self.rewards, self.pairs = list(rewards or []), pair_records(pairs) if pairs else []
        prompts = prompt_records(prompts) if prompts else []
        self.validation, self.validation_report = [], None
        if self.rewards and self.pairs:
            raise ValueError("Give either reward sources (--reward) or preference pairs (--pairs), not both.")
        if self.pairs:
            if added:
                raise ValueError("Added prompts (--add-prompts) are refusal demonstrations: not used with --pairs.")
            self.demonstrations = PairDemonstrations(model, tokenizer, self.pairs, self.config)
        elif self.rewards:
            if added:
                raise ValueError("Added prompts (--add-prompts) are refusal demonstrations: with --reward, give every "
                                 "prompt with --prompts.")
            prompts, self.validation = split_validation(prompts, self.config.validation_prompts, self.config.seed)
            self.demonstrations = RewardChosen(model, tokenizer, prompts, self.rewards, self.config, output_dir,
                                               drawer=drawer)
        else:
            self.demonstrations = Demonstrations(model, tokenizer, prompts, self.config, output_dir, added)

    # the demonstrated prompts, by kind (see `Demonstrations`)
    harmful = property(lambda self: self.demonstrations.harmful)
    benign = property(lambda self: self.demonstrations.benign)
    openings = property(lambda self: self.demonstrations.openings)
    to_screen = property(lambda self: self.demonstrations.to_screen)
    screened = property(lambda self: self.demonstrations.screened)

    def collect(self) -> dict:
        """Follow every demonstration: `states`, `labels`, and the decisions' kind, `harmful` (refusal
        demonstrations, `Demonstrations.collect`) or `steered` (reward-chosen ones, `RewardChosen.collect`)."""
        return self.demonstrations.collect()

    def _warn_if_little(self, decisions: dict):
        """Say so when the demonstrations barely depart from what the LLM writes by itself: the rejections are
        the only decisions that change a token, and a fit to a few dozen of them changes next to nothing."""
        rejections = int((decisions["labels"] == 0).sum())
        if rejections >= FEW_REJECTIONS:
            return
        if self.rewards:
            how = ("few draws beat the greedy answers by --margin: more prompts, more --samples, a higher "
                   "--sample-temperature, or a reward that tells the draws apart")
        elif self.pairs:
            stats = self.demonstrations.stats
            how = (f"{stats.get('chosen_followed_to_parting', 0)} of {stats.get('pairs', len(self.pairs))} pairs "
                   "reached the token where they part among the candidates: more pairs, or pairs written by this LLM")
        else:
            how = "more harmful prompts, or --add-prompts"
        logger.warning(f"Only {rejections} of {len(decisions['labels'])} decisions are rejections, the places where "
                       f"the demonstrations depart from what the LLM writes by itself: the agent will change little. "
                       f"The data can teach little here ({how}).")

    def _kind(self, decisions: dict) -> tuple[torch.Tensor, float]:
        """Which decisions form the first kind of the fit, and its share of the loss."""
        if "steered" in decisions:
            return decisions["steered"], self.config.steered_weight
        return decisions["harmful"], self.config.harmful_weight

    # ----- fit ----------------------------------------------------------------------------------------------
    def new_agent(self) -> tuple[MaraAgent, dict | None]:
        c = self.config
        config = MaraConfig(state_dim=self.model.config.get_text_config().hidden_size,
                            hidden_dims=list(c.agent_hidden_dims), strategy="veto", top_k=c.top_k, top_p=c.top_p,
                            threshold=c.threshold, fallback_index=0,
                            base_model_name_or_path=getattr(self.model, "name_or_path", None))
        if c.init_agent:
            from .agents import agent_from

            return agent_from(c.init_agent, config)
        torch.manual_seed(c.seed)
        return MaraAgent(config), None

    def fit(self, decisions: dict) -> MaraAgent:
        """Fit an agent (fresh, or `init_agent`) to `decisions` (from `collect`) with weighted cross-entropy."""
        c = self.config
        x, y = decisions["states"], decisions["labels"]
        if len(y) - int(len(y) * c.val_fraction) < 1:
            raise ValueError("The demonstrations gave no decision to fit: none of their tokens is among the LLM's "
                             "candidates (pairs: the parting tokens; check that the data was written for this LLM, "
                             "or raise --top-k).")
        agent, self.started_from = self.new_agent()
        agent.to(self.model.device)
        harm, share = self._kind(decisions)
        weight = self.weights(harm, y, share) * len(y)
        gen = torch.Generator().manual_seed(c.seed)
        order = torch.randperm(len(y), generator=gen)
        n_val = int(len(y) * c.val_fraction)
        val, train = order[:n_val], order[n_val:]
        opt = torch.optim.AdamW(agent.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        per_epoch = max(math.ceil(len(train) / c.fit_batch_size), 1)
        epochs = max(c.epochs, math.ceil(c.min_steps / per_epoch))
        steps = epochs * per_epoch
        logger.warning(f"Fitting the agent: {len(train)} decisions x {epochs} epochs ({steps} steps).")
        bar = tqdm(total=steps, desc="fit")
        self.history = []
        for epoch in range(epochs):
            agent.train()
            shuffled = train[torch.randperm(len(train), generator=gen)]
            for i in range(0, len(shuffled), c.fit_batch_size):
                b = shuffled[i:i + c.fit_batch_size]
                logits = agent(x[b].float().to(agent.device)).logits
                loss = (torch.nn.functional.cross_entropy(logits, y[b].to(agent.device), reduction="none")
                        * weight[b].to(agent.device)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
            self.history.append({"epoch": epoch + 1, "loss": loss.item(), **self.accuracy(agent, x[val], y[val],
                                                                                          harm[val])})
            logger.info(f"epoch {epoch + 1}: {self.history[-1]}")
        bar.close()
        agent.eval()
        return agent

    def weights(self, harm: torch.Tensor, labels: torch.Tensor, share: float | None = None) -> torch.Tensor:
        """Per-decision loss weights summing to 1: harmful (or steered) demonstrations carry `share` (default
        `harmful_weight`), the others the rest, whatever their counts; with `balance_labels` a kind's accepts and
        rejects carry equal halves of its share (a refusal records few accepts beside many rejections, and a missed
        accept derails it)."""
        c = self.config
        share = c.harmful_weight if share is None else share
        weight = torch.zeros(len(labels))
        for kind, share in ((harm, share), (~harm, 1 - share)):
            groups = [kind & (labels == 1), kind & (labels == 0)] if c.balance_labels else [kind]
            groups = [g for g in groups if g.any()]
            for g in groups:
                weight[g] = share / len(groups) / int(g.sum())
        return weight

    @staticmethod
    @torch.no_grad()
    def accuracy(agent, x, y, harm) -> dict:
        """Shares of held-out decisions the agent gets right: harmful rejects, harmful accepts, benign accepts."""
        if len(y) == 0:
            return {}
        agent.eval()
        accept = agent(x.float().to(agent.device)).accept_prob.cpu() > agent.config.threshold
        out = {}
        for name, rows in (("harmful_rejects", harm & (y == 0)), ("harmful_accepts", harm & (y == 1)),
                           ("benign_accepts", ~harm)):
            if rows.any():
                out[name] = round(float((accept[rows] == (y[rows] == 1)).float().mean()), 4)
        return out

    def provenance(self, decisions: dict) -> dict:
        from .._version import __version__

        if self.rewards:
            return self._reward_provenance(decisions, __version__)
        if self.pairs:
            return {"datasets": self.data_name, "trainer": f"mara-hf {__version__} (imitation, preference pairs)",
                    "demonstrations": {**self.demonstrations.stats, "decisions": len(decisions["labels"]),
                                       "steered_decisions": int(decisions["steered"].sum())},
                    "fit": self.history[-1] if self.history else None, "settings": self._settings(),
                    **({"init_agent": self.started_from} if self.started_from else {})}
        d, harm = self.demonstrations, decisions["harmful"]
        return {"datasets": self.data_name, "trainer": f"mara-hf {__version__} (imitation)",
                "demonstrations": {"harmful": len(d.harmful), "benign": len(d.benign),
                                   **({"benign_openings": len(d.openings)} if d.openings else {}),
                                   **({"added_harmful": len(d.added_harmful), "added_benign": len(d.added_benign)}
                                      if d.added_harmful or d.added_benign else {}),
                                   **({"screened": len(d.to_screen), "screened_refused": len(d.screened)}
                                      if d.to_screen else {}),
                                   "refusals_followed": decisions.get("refusals_followed", [None])[0],
                                   "decisions": len(harm), "harmful_decisions": int(harm.sum())},
                "fit": self.history[-1] if self.history else None,
                "settings": {k: v for k, v in self.config.to_dict().items() if k != "device"},
                **({"init_agent": self.started_from} if self.started_from else {})}

    def _reward_provenance(self, decisions: dict, version: str) -> dict:
        lines = self.demonstrations.choose()  # chosen already, in `collect`
        greedy = sum(line["greedy_score"] for line in lines) / len(lines)
        chosen = sum(line["score"] for line in lines) / len(lines)
        settings = self._settings()
        return {"datasets": self.data_name, "trainer": f"mara-hf {version} (imitation, reward-chosen)",
                "reward_sources": [{"name": r.name, "multiplier": r.multiplier} for r in self.rewards],
                "demonstrations": {"prompts": len(lines), "chosen_samples": sum(x["chosen"] == "sample" for x in lines),
                                   "mean_greedy_reward": round(greedy, 6), "mean_chosen_reward": round(chosen, 6),
                                   "decisions": len(decisions["labels"]),
                                   "steered_decisions": int(decisions["steered"].sum())},
                **({"rounds": self.rounds} if len(getattr(self, "rounds", [])) > 1 else {}),
                **({"validation": summary(self.validation_report)} if self.validation_report else {}),
                "fit": self.history[-1] if self.history else None, "settings": settings,
                **({"init_agent": self.started_from} if self.started_from else {})}

    def _round_summary(self) -> dict:
        """Mean rewards of a reward-chosen round's demonstrations (and of its steering agent's greedy answers)."""
        lines = self.demonstrations.choose()
        out = {"mean_chosen_reward": round(sum(x["score"] for x in lines) / len(lines), 6),
               "chosen_samples": sum(x["chosen"] == "sample" for x in lines)}
        if "agent_score" in lines[0]:
            out["mean_agent_reward"] = round(sum(x["agent_score"] for x in lines) / len(lines), 6)
        return out

    def _settings(self) -> dict:
        """The settings of a reward-chosen or pairs run: the refusal-demonstration ones are not used there."""
        settings = {k: v for k, v in self.config.to_dict().items() if k != "device"}
        for key in ("refusals", "max_harmful", "max_benign", "benign_tokens", "benign_openings", "opening_tokens",
                    "written_requests", "written_repeats", "screen_agent", "screen_benign", "screen_tokens",
                    "added_repeats", "harmful_weight"):
            settings.pop(key, None)
        if self.pairs:
            for key in ("samples", "sample_temperature", "margin", "rounds", "credit"):
                settings.pop(key, None)
        return settings

    def train(self) -> MaraAgent:
        """Collect (or resume collecting) the decisions, fit the agent, save it to `output_dir/agent`. With reward
        sources and `config.rounds` > 1, each further round chooses demonstrations with the last agent steering
        and fits a new agent to them (`RewardChosen`)."""
        decisions = self.collect()
        self._warn_if_little(decisions)
        agent = self.fit(decisions)
        self.rounds = [self._round_summary()] if self.rewards else []
        for r in range(2, (self.config.rounds if self.rewards else 1) + 1):
            self.demonstrations = RewardChosen(self.model, self.tokenizer, self.demonstrations.prompts, self.rewards,
                                               self.config, self.output_dir, agent=agent, round=r,
                                               drawer=self.demonstrations.drawer)
            decisions = self.collect()
            agent = self.fit(decisions)
            self.rounds.append(self._round_summary())
        if self.validation:
            c = self.config
            self.validation_report = calibrate(agent, self.model, self.tokenizer, self.validation, self.rewards,
                                               max_new_tokens=c.response_tokens, samples=c.validation_samples,
                                               batch_size=c.rollout_batch_size, seed=c.seed,
                                               output_dir=self.output_dir)
        agent.config.training = self.provenance(decisions)
        save_atomically(agent, os.path.join(self.output_dir, "agent"))
        return agent
