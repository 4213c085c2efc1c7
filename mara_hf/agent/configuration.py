"""Configuration of a MARA agent: network shape, decoding defaults and provenance."""

from typing import Any

from transformers import PreTrainedConfig

from ..errors import OptionError

STRATEGIES = ("first", "max_prob", "filter", "veto")
DECISIONS = ("greedy", "sample")


class MaraConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MaraAgent`], the small accept/reject network of MARA (Zhang et al., IJCAI 2025).

    Args:
        state_dim (`int`, *optional*, defaults to 4096):
            Width of the states the agent reads: the `hidden_size` of the LLM it aligns.
        hidden_dims (`list[int]`, *optional*, defaults to `[1024, 256]`):
            Widths of the two hidden layers (`linear1`, `linear2`) of the actor MLP.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the input LayerNorm (PyTorch's default, as in the authors' code).
        top_k (`int`, *optional*, defaults to 40):
            Decoding default: the candidate set keeps at most this many most probable tokens.
        top_p (`float`, *optional*, defaults to 0.95):
            Decoding default: nucleus mass kept among the top-k candidates (renormalised over them).
        strategy (`str`, *optional*, defaults to `"first"`):
            Decoding default: `"first"` emits the first accepted candidate in probability order (the paper's
            rule); `"max_prob"` the candidate with the largest P(accept); `"filter"` removes rejected candidates
            and leaves the choice among accepted ones to generate (sampling or greedy); `"veto"` is the same, but when
            every candidate is rejected the agent has no say and all candidates stay (what agents trained by mara-hf's
            default recipe are for: a fresh agent that accepts everything decodes exactly like the LLM alone, greedy
            or sampled).
        decision (`str`, *optional*, defaults to `"greedy"`):
            How P(accept) becomes a decision: `"greedy"` accepts iff P(accept) > `threshold` (the paper);
            `"sample"` accepts with probability P(accept) (the policy soft actor-critic trains), from a seeded
            generator, so a generate call is reproducible.
        threshold (`float`, *optional*, defaults to 0.5):
            A candidate is accepted when P(accept) is strictly above this value (0.5 = the agent's argmax).
        fallback_index (`int`, *optional*, defaults to 0):
            Candidate emitted when every candidate is rejected: 0 = the most probable one (the authors' evaluation),
            -1 = the last one (the authors' training rule). An index past the end of a small candidate set means
            the last candidate.
        base_model_name_or_path (`str`, *optional*):
            The LLM the agent was trained on (Hub id or path). Agents of equal width work on other LLMs too.
        base_model_revision (`str`, *optional*):
            Revision of the base model, when known.
        mara_hf_version (`str`, *optional*):
            Version of mara-hf that last saved this agent (written automatically on save).
        training (`dict`, *optional*):
            Facts about how the agent was trained, when known: e.g. `reward_sources` (list of
            `{"name", "multiplier"}`), `datasets`, `episodes`, `source` (where the weights came from).
    """

    model_type = "mara_agent"

    state_dim: int = 4096
    hidden_dims: list[int] | tuple[int, ...] | None = None
    layer_norm_eps: float = 1e-5
    top_k: int = 40
    top_p: float = 0.95
    strategy: str = "first"
    decision: str = "greedy"
    threshold: float = 0.5
    fallback_index: int = 0
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    mara_hf_version: str | None = None
    training: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        self.hidden_dims = [1024, 256] if self.hidden_dims is None else [int(w) for w in self.hidden_dims]
        super().__post_init__(**kwargs)
        check_decoding_settings(self.top_k, self.top_p, self.strategy, self.threshold, self.fallback_index, self.decision)
        if len(self.hidden_dims) != 2 or min(self.hidden_dims) < 1:
            raise ValueError(f"hidden_dims must be two positive widths (linear1, linear2), got {self.hidden_dims}.")
        if int(self.state_dim) < 1:
            raise ValueError(f"state_dim must be a positive int, got {self.state_dim}.")


def check_decoding_settings(top_k, top_p, strategy, threshold, fallback_index, decision="greedy"):
    """Raise a short ValueError for decoding settings that cannot work."""
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        raise OptionError(f"top_k must be an int >= 1, got {top_k!r}.", "top_k")
    if not (0.0 < float(top_p) <= 1.0):
        raise OptionError(f"top_p must be in (0, 1], got {top_p!r}.", "top_p")
    if strategy not in STRATEGIES:
        raise OptionError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.", "strategy")
    if decision not in DECISIONS:
        raise OptionError(f"decision must be one of {DECISIONS}, got {decision!r}.", "decision")
    if not (0.0 <= float(threshold) < 1.0):
        raise OptionError(f"threshold must be in [0, 1), got {threshold!r}.", "threshold")
    if not (isinstance(fallback_index, int) and -1 <= fallback_index < top_k):
        raise OptionError(f"fallback_index must be -1 (last candidate) or an int in [0, top_k), got {fallback_index!r}.",
                          "fallback_index")
