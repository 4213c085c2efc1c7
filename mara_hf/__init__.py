"""mara-hf: MARA token-level accept/reject alignment for any Hugging Face causal LM.

    from mara_hf import MaraProcessor
    mara = MaraProcessor.from_pretrained(agent_id, model=model)
    model.generate(**inputs, logits_processor=[mara])
"""

from ._version import __version__  # noqa: E402,F401

from ._compat import check_versions

check_versions()  # before transformers is imported: too old a transformers or torch raises a clear ImportError

from transformers import AutoConfig, AutoModel  # noqa: E402

from .agent.configuration import MaraConfig  # noqa: E402
from .agent.modeling import MaraAgent, MaraAgentOutput  # noqa: E402

# Registration lets AutoConfig/AutoModel load saved agents without trust_remote_code.
AutoConfig.register(MaraConfig.model_type, MaraConfig, exist_ok=True)
AutoModel.register(MaraConfig, MaraAgent, exist_ok=True)

from .agent.bundled_agents import bundled_agents
from .models import load_embedded_model  # noqa: E402
from .decoding.generate import generate  # noqa: E402
from .decoding.processor import MaraProcessor  # noqa: E402
from .decoding.reference import serial_generate  # noqa: E402
from .decoding.stats import MaraStats  # noqa: E402

# Training, imported when first named (`from mara_hf import MaraTrainer`): decoding alone never loads it.
_TRAINING = {"MaraTrainer": "training.sac_trainer", "MaraTrainingConfig": "training.sac_config",
             "ImitationTrainer": "training.imitation_trainer", "ImitationConfig": "training.imitation_config"}


def __getattr__(name):
    if name in _TRAINING:
        import importlib

        return getattr(importlib.import_module(f".{_TRAINING[name]}", __name__), name)
    raise AttributeError(f"module 'mara_hf' has no attribute {name!r}")


__all__ = ["MaraConfig", "MaraAgent", "MaraAgentOutput", "MaraProcessor", "MaraStats", "generate", "serial_generate",
           "bundled_agents", "load_embedded_model", "MaraTrainer", "MaraTrainingConfig", "ImitationTrainer",
           "ImitationConfig", "__version__"]
