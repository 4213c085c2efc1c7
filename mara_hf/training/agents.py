"""Where a trained agent starts: a fresh actor at the prior (it decodes like the LLM alone), or the actor weights
of an existing agent (`--init-agent`), with the decoding settings of the run."""

import copy
import math

import torch
from transformers.utils import logging

from ..agent.configuration import MaraConfig
from ..agent.modeling import MaraAgent

logger = logging.get_logger(__name__)


def initial_agent(config, model_config, agent: MaraAgent | None = None) -> tuple[MaraAgent, dict | None]:
    """The agent a SAC run (`MaraTrainingConfig` `config`) for a model of `model_config` starts from: `agent`, else
    `config.init_agent`'s weights, else a fresh one at `config.prior_accept`; and where its weights came from
    (None unless from `init_agent`). A fresh agent's weights are drawn from torch's global generator."""
    hidden = model_config.get_text_config().hidden_size
    # how the agent is meant to decode: what it was trained for (veto: the LLM chooses among accepted tokens;
    # chain: the paper's first accept)
    strategy = {"veto": ("veto", 0), "chain": ("first", 0)}[config.mdp]
    agent_config = MaraConfig(state_dim=hidden, hidden_dims=config.agent_hidden_dims, top_k=config.top_k,
                              top_p=config.top_p, strategy=strategy[0], fallback_index=strategy[1],
                              base_model_name_or_path=model_config.name_or_path)
    started_from = None  # provenance of the --init-agent weights
    if agent is None and config.init_agent:
        agent, started_from = agent_from(config.init_agent, agent_config)
    if agent is not None and agent.config.state_dim != hidden:
        raise ValueError(f"The agent reads width {agent.config.state_dim}, the model has hidden_size {hidden}.")
    if agent is None:
        agent = MaraAgent(agent_config)
        if config.prior_accept is not None:
            start_at_prior(agent, config.prior_accept)
    return agent, started_from


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
