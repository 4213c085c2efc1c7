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
from ..utils import save_atomically
from .imitation_config import ImitationConfig
from .imitation_data import Demonstrations

logger = logging.get_logger(__name__)


class ImitationTrainer:
    """Collects forced decisions along demonstrations (`collect`) and fits an agent to them (`fit`); `train` does
    both and saves `output_dir/agent` with its provenance.

    Args:
        model, tokenizer: the causal LM the agent is for, and its tokenizer (with a chat template for chat models).
        prompts: records with "prompt" and a harmful label (a `harmful` field or an HH-RLHF `source`).
        config: `ImitationConfig`.
        output_dir: where decisions and the agent are written.
        data_name: the prompt specs, recorded in the agent's provenance.
        added: more prompts, each demonstrated (see `Demonstrations`).
    """

    def __init__(self, model, tokenizer, prompts: list[dict], config: ImitationConfig | None = None,
                 output_dir: str = "mara-imitation", data_name=None, added: list[dict] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or ImitationConfig()
        self.output_dir = output_dir
        self.data_name = [data_name] if isinstance(data_name, str) else list(data_name or [])
        self.demonstrations = Demonstrations(model, tokenizer, prompts, self.config, output_dir, added)

    # the demonstrated prompts, by kind (see `Demonstrations`)
    harmful = property(lambda self: self.demonstrations.harmful)
    benign = property(lambda self: self.demonstrations.benign)
    openings = property(lambda self: self.demonstrations.openings)
    to_screen = property(lambda self: self.demonstrations.to_screen)
    screened = property(lambda self: self.demonstrations.screened)

    def collect(self) -> dict:
        """Follow every demonstration (see `Demonstrations.collect`): `states`, `labels`, `harmful`."""
        return self.demonstrations.collect()

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
        agent, self.started_from = self.new_agent()
        agent.to(self.model.device)
        x, y, harm = decisions["states"], decisions["labels"], decisions["harmful"]
        n_harm, n_benign = int(harm.sum()), int((~harm).sum())
        weight = self.weights(harm, y) * len(y)
        gen = torch.Generator().manual_seed(c.seed)
        order = torch.randperm(len(y), generator=gen)
        n_val = int(len(y) * c.val_fraction)
        val, train = order[:n_val], order[n_val:]
        opt = torch.optim.AdamW(agent.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        steps = c.epochs * math.ceil(len(train) / c.batch_size)
        logger.warning(f"Fitting the agent: {len(train)} decisions x {c.epochs} epochs ({steps} steps).")
        bar = tqdm(total=steps, desc="fit")
        self.history = []
        for epoch in range(c.epochs):
            agent.train()
            shuffled = train[torch.randperm(len(train), generator=gen)]
            for i in range(0, len(shuffled), c.batch_size):
                b = shuffled[i:i + c.batch_size]
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

    def weights(self, harm: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-decision loss weights summing to 1: harmful demonstrations carry `harmful_weight`, benign ones the
        rest, whatever their counts; with `balance_labels` a kind's accepts and rejects carry equal halves of its
        share (a refusal records few accepts beside many rejections, and a missed accept derails it)."""
        c = self.config
        weight = torch.zeros(len(labels))
        for kind, share in ((harm, c.harmful_weight), (~harm, 1 - c.harmful_weight)):
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

    def train(self) -> MaraAgent:
        """Collect (or resume collecting) the decisions, fit the agent, save it to `output_dir/agent`."""
        decisions = self.collect()
        agent = self.fit(decisions)
        agent.config.training = self.provenance(decisions)
        save_atomically(agent, os.path.join(self.output_dir, "agent"))
        return agent
