"""Convert an actor `.pth` published by the MARA authors (IAAR-Shanghai/MARA_AGENTS) into an agent folder."""

import os

import torch
from transformers import AutoConfig
from transformers.utils import logging

from .configuration import MaraConfig
from .modeling import MaraAgent
from ..utils import save_atomically

logger = logging.get_logger(__name__)

ACTOR_KEYS = ("ln.weight", "ln.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
              "output_linear.weight", "output_linear.bias")

# What the paper (Zhang et al., IJCAI 2025, arXiv 2505.19743) states about how the published agents were trained.
PAPER_TRAINING_FACTS = {
    "source": "IAAR-Shanghai/MARA_AGENTS (converted with mara-hf convert)",
    "reward_sources": [{"name": "PKU-Alignment/beaver-7b-v1.0-reward", "multiplier": 2.0},
                       {"name": "PKU-Alignment/beaver-7b-v1.0-cost", "multiplier": -1.0}],
    "datasets": ["PKU-Alignment/PKU-SafeRLHF"],
    "episodes": 18000,
}


def read_actor_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load and check an authors'-format actor state dict (safe unpickling only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such actor file: {path!r}.")
    if "critic" in os.path.basename(path).lower():
        raise ValueError(f"{path!r} looks like a critic; convert the actor file (e.g. actor.pth) instead.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a pickle, disallowed globals, ...
        raise ValueError(f"Cannot read {path!r} as a PyTorch state dict ({type(err).__name__}): "
                         "is the file complete and an actor .pth?") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors.")
    missing = [k for k in ACTOR_KEYS if k not in state]
    extra = sorted(set(state) - set(ACTOR_KEYS))
    if missing or extra:
        looks_critic = any(k.startswith(("q1", "q2", "critic", "target", "Q")) for k in state)
        hint = " It looks like a critic, not an actor." if looks_critic else ""
        raise ValueError(f"{path!r} is not a MARA actor: missing keys {missing}, unexpected keys {extra[:6]}.{hint}")
    dim = state["ln.weight"].shape[0]
    width1, width2 = state["linear1.weight"].shape[0], state["linear2.weight"].shape[0]
    expected = {"ln.weight": (dim,), "ln.bias": (dim,), "linear1.weight": (width1, dim), "linear1.bias": (width1,),
                "linear2.weight": (width2, width1), "linear2.bias": (width2,),
                "output_linear.weight": (2, width2), "output_linear.bias": (2,)}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path!r}: {key} has shape {tuple(state[key].shape)}, expected {shape} for an actor "
                             "with 2 outputs (reject, accept).")
    return state


def _base_hidden_size(base_model: str, revision: str | None) -> int | None:
    """hidden_size of `base_model` when its config can be read (local folder, cache or Hub), else None."""
    try:
        config = AutoConfig.from_pretrained(base_model, revision=revision)
    except Exception as err:
        logger.warning(f"Could not read the config of {base_model!r} ({type(err).__name__}); "
                       "the agent's width is not checked against it.")
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "hidden_size", None)


def convert_actor(path: str, base_model: str, output_dir: str | None = None, base_model_revision: str | None = None,
                  paper_training_facts: bool = True) -> MaraAgent:
    """Build a [`MaraAgent`] from an authors' actor `.pth`; with `output_dir`, save it there (atomically).

    `state_dim` is read from the weights and must equal `base_model`'s hidden size when its config is readable.
    Nothing is written when any check fails.
    """
    state = read_actor_state_dict(path)
    dim = state["ln.weight"].shape[0]
    hidden = _base_hidden_size(base_model, base_model_revision)
    if hidden is not None and hidden != dim:
        raise ValueError(f"The actor reads states of width {dim} but {base_model!r} has hidden_size {hidden}: "
                         "pick the base model this actor was trained for.")
    if output_dir is not None and os.path.exists(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"{output_dir!r} exists and is not empty; choose another --output or remove it.")
    training = dict(PAPER_TRAINING_FACTS) if paper_training_facts else {}
    training["converted_from"] = os.path.basename(path)
    config = MaraConfig(state_dim=dim, hidden_dims=[state["linear1.weight"].shape[0], state["linear2.weight"].shape[0]],
                        base_model_name_or_path=base_model, base_model_revision=base_model_revision, training=training)
    agent = MaraAgent(config)
    agent.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    if output_dir is not None:
        save_atomically(agent, output_dir)
    return agent
