"""The MARA agent: a small MLP that reads an LLM hidden state and says reject (0) or accept (1).

The layer names are the authors' (ln, linear1, linear2, output_linear), so their actor state dicts
load unchanged.
"""

import difflib
import os
import tempfile
from dataclasses import dataclass

import torch
from huggingface_hub import is_offline_mode
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration import MaraConfig

_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder")

logger = logging.get_logger(__name__)


@dataclass
class MaraAgentOutput(ModelOutput):
    """
    Args:
        accept_prob (`torch.FloatTensor` of shape `(..., )`): P(accept) for every state.
        logits (`torch.FloatTensor` of shape `(..., 2)`): the (reject, accept) logits.
    """

    accept_prob: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class MaraAgent(PreTrainedModel):
    """MARA's actor: LayerNorm -> Linear -> ReLU -> Linear -> ReLU -> Linear(2) -> softmax(reject, accept).

    Call it on states of shape `(..., state_dim)` of any float dtype and device; they are moved to the agent's
    device and dtype (float32 by default, whatever the LLM's dtype), and the output holds `accept_prob`.
    """

    config_class = MaraConfig
    base_model_prefix = "mara"
    main_input_name = "states"
    _no_split_modules = []

    def __init__(self, config: MaraConfig):
        super().__init__(config)
        width1, width2 = config.hidden_dims
        self.ln = nn.LayerNorm(config.state_dim, eps=config.layer_norm_eps)
        self.linear1 = nn.Linear(config.state_dim, width1)
        self.linear2 = nn.Linear(width1, width2)
        self.output_linear = nn.Linear(width2, 2)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # PyTorch's default init, as the authors trained with (not transformers' normal(0, 0.02)).
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            module.reset_parameters()

    def forward(self, states: torch.Tensor) -> MaraAgentOutput:
        if states.shape[-1] != self.config.state_dim:
            raise ValueError(
                f"The agent reads states of width {self.config.state_dim} but got width {states.shape[-1]}: "
                f"use it with an LLM whose hidden_size is {self.config.state_dim}."
            )
        x = states.to(device=self.ln.weight.device, dtype=self.ln.weight.dtype)
        x = torch.relu(self.linear1(self.ln(x)))
        x = torch.relu(self.linear2(x))
        logits = self.output_linear(x)
        return MaraAgentOutput(accept_prob=torch.softmax(logits, dim=-1)[..., 1], logits=logits)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load an agent from a folder, a Hub repo id (`revision`, `token`, `cache_dir` as in transformers) or the
        name of an agent shipped with mara-hf (`mara_hf.bundled_agents()`).

        Folders and repos that do not hold an agent get a short error saying what is wrong.
        """
        name = str(pretrained_model_name_or_path)
        if "/" not in name and not os.path.exists(name):  # a name of an agent shipped with mara-hf
            from .bundled_agents import bundled_agents

            bundled = bundled_agents()
            close = [] if name in bundled else difflib.get_close_matches(name, bundled, n=1, cutoff=0.75)
            if close:
                raise OSError(f"{name!r} is not a folder or an agent shipped with mara-hf: did you mean {close[0]!r}? "
                              f"Shipped agents: {', '.join(bundled)}.")
            name = pretrained_model_name_or_path = bundled.get(name, name)
        if kwargs.get("config") is None:
            kwargs["config"] = _load_agent_config(name, kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as err:
            raise OSError(f"The agent weights in {name!r} are not a valid safetensors file ({err}). "
                          "Download or save the agent again.") from None

    def save_pretrained(self, save_directory, *args, repo_id: str | None = None, license: str | None = None,
                        _existing_card=None, **kwargs):
        """Save config.json + model.safetensors and write (or update) the model card README.md.

        `repo_id` is the id users will load the agent from (shown in the card's usage line), `license` the
        card's license (default apache-2.0).
        """
        from .._version import __version__
        from .card import write_model_card

        if kwargs.get("push_to_hub"):
            raise ValueError("Use agent.push_to_hub(repo_id) to push an agent (it also writes its card).")
        self.config.mara_hf_version = __version__
        super().save_pretrained(save_directory, *args, **kwargs)
        write_model_card(self.config, save_directory, repo_id=repo_id, existing=_existing_card, license=license)

    def push_to_hub(self, repo_id: str, *, token=None, private: bool | None = None, revision: str | None = None,
                    commit_message: str = "Upload MARA agent", create_pr: bool = False, license: str | None = None):
        """Create `repo_id` if needed and upload the agent with its model card.

        A card already in the repo keeps what a person wrote in it; only the generated section and mara-hf's
        metadata are refreshed. Returns huggingface_hub's `CommitInfo`.
        """
        from huggingface_hub import HfApi

        from .card import fetch_hub_card

        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        existing = fetch_hub_card(repo_id, token=token, revision=revision)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, repo_id=repo_id, license=license, _existing_card=existing)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, token=token, revision=revision,
                commit_message=commit_message, create_pr=create_pr,
            )


def _load_agent_config(name: str, kwargs: dict) -> MaraConfig:
    """Read and check an agent's config before transformers looks for weights, for clearer errors."""
    from transformers import AutoConfig

    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise OSError(f"{name!r} is not a MARA agent folder: it has no config.json.")
    elif os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.isfile(name):
        raise OSError(f"No agent folder at {name!r}. Pass a folder saved with save_pretrained or a Hub repo id.")
    try:
        config = AutoConfig.from_pretrained(name, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    except ValueError as err:  # e.g. a config.json of an unknown model type
        raise OSError(f"{name!r} is not a MARA agent: {err}") from None
    except OSError as err:
        # Offline (HF_HUB_OFFLINE=1 or local_files_only) and not cached: transformers says "We couldn't connect to
        # <endpoint>" without naming the agent or saying that offline mode stopped it; say both.
        offline = is_offline_mode() or kwargs.get("local_files_only")
        if offline and not os.path.isdir(name) and _caused_by(err, LocalEntryNotFoundError):
            why = "local_files_only=True" if kwargs.get("local_files_only") else "offline mode is on (HF_HUB_OFFLINE=1)"
            where = kwargs.get("cache_dir") or "the Hugging Face cache"
            raise OSError(f"The agent {name!r} is not in {where} and {why}: load it once online to cache it, or pass "
                          "the folder it was saved to.") from err
        raise
    if not isinstance(config, MaraConfig):
        raise OSError(f"{name!r} holds a {config.model_type!r} model, not a MARA agent (model_type 'mara_agent').")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "model.safetensors")):
        raise OSError(f"The agent folder {name!r} has a config.json but no model.safetensors.")
    return config


def _caused_by(err: BaseException, kind: type) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False
