"""Settings of imitation training: an agent fitted to the accept/reject decisions along demonstrations.

A *demonstration* is a response the agent should make the LLM write: for a harmful request a refusal that ends
the turn, for a benign one the LLM's own greedy answer. Following a demonstration token by token, each step's
decision is known exactly: reject the candidates ranked above the demonstrated token, accept it. The agent is
fitted to those decisions (supervised, weighted cross-entropy); see `mara_hf.training.imitation_trainer`.
"""

from dataclasses import asdict, dataclass, field, fields

from ..errors import OptionError
from .renamed_settings import rename_setting

# Short refusals that end the turn: an opening followed by nothing the request asked for.
DEFAULT_REFUSALS = [
    "I'm sorry, but I can't assist with that. If you have any other questions, feel free to ask.",
    "I'm sorry, but I can't help with that. If you have any other questions, feel free to ask.",
]


@dataclass
class ImitationConfig:
    """Settings of an imitation run. Every field is settable from `mara-hf imitate` as `--field-name`; what it does
    and its unit are in its `metadata["help"]`, which `mara-hf imitate --help` shows.

    The fields, in order: the demonstrations (`refusals` ... `top_p`), the agent (`init_agent`,
    `agent_hidden_dims`, `threshold`) and the fit (`harmful_weight` ... `seed`), then `device`.

    Example:

    ```python
    from mara_hf import ImitationConfig

    config = ImitationConfig(refusals=["I can't help with that."], epochs=20)  # the others keep their defaults
    print(config.refusals, config.fit_batch_size)  # ["I can't help with that."] 512
    ```
    """

    # Demonstrations
    refusals: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSALS), metadata={
        "help": "the responses demonstrated for harmful requests (texts, one argument each; one drawn per request), "
                "each followed by the model's end-of-turn token, so that a refusal is a short complete answer."})
    max_harmful: int | None = field(default=1024, metadata={
        "help": "how many prompts labelled harmful to demonstrate, drawn at random from the prompt sets; None: "
                "all."})
    max_benign: int | None = field(default=1024, metadata={
        "help": "how many prompts labelled benign to demonstrate, drawn at random from the prompt sets; None: all."})
    benign_tokens: int = field(default=32, metadata={
        "help": "length of the greedy answers demonstrated for benign prompts, in tokens (the decisions that keep "
                "the LLM as it is; the first few tokens matter most, where a refusal would start)."})
    benign_openings: int = field(default=0, metadata={
        "help": "further benign prompts (not among the `max_benign`) demonstrated for their first "
                "`opening_tokens` tokens only. A false refusal starts at the first tokens, where a full benign "
                "demonstration records one decision in `benign_tokens`; openings add many of those cheaply (a "
                "demonstration then costs little more than its prompt's forward)."})
    opening_tokens: int = field(default=3, metadata={
        "help": "length of the `benign_openings` demonstrations, in tokens."})
    written_requests: bool = field(default=True, metadata={
        "help": "also demonstrate the requests written for training that ship with mara-hf (mara_hf/data): benign "
                "look-alikes worded like harmful requests (\"how do I kill a Python process\"), so the agent learns "
                "what not to refuse, and harmful requests in everyday phrasing, unlike the formal public sets; "
                "`written_repeats` times each."})
    written_repeats: int = field(default=2, metadata={
        "help": "how many times each written request is demonstrated (with `written_requests`): copies among the "
                "prompts, so their decisions count that many times in the fit; 0: none."})
    screen_agent: str | None = field(default=None, metadata={
        "help": "hard benign prompts: an agent (folder, bundled name or Hub id) that decodes `screen_benign` "
                "further benign prompts of the sets (drawn for nothing else) greedily for `screen_tokens` tokens; "
                "those it opens with a refusal (`is_refusal`) are demonstrated in full, `added_repeats` times in "
                "the fit: the false refusals of an earlier agent, learnt away. None: no screening."})
    screen_benign: int = field(default=0, metadata={
        "help": "how many further benign prompts `screen_agent` decodes to find its false refusals."})
    screen_tokens: int = field(default=12, metadata={
        "help": "how far `screen_agent` decodes each screened prompt, in new tokens."})
    added_repeats: int = field(default=1, metadata={
        "help": "how many times the decisions of the trainer's `added` prompts (`mara-hf imitate --add-prompts`) "
                "count in the fit. Added prompts are collected on their own, so adding them to a run whose "
                "decisions are collected follows only them."})
    rollout_batch_size: int = field(default=16, metadata={
        "help": "prompts followed together (batched candidate scoring); with --reward the draws are generated "
                "four times as many rows at a time (samples x prompts)."})
    top_k: int = field(default=40, metadata={
        "help": "candidate set, as the agent will decode with it: the k most probable tokens (then cut by "
                "`top_p`)."})
    top_p: float = field(default=1.0, metadata={
        "help": "candidate set, as the agent will decode with it: of the `top_k` tokens, the most probable ones up "
                "to this cumulative probability, in (0, 1]."})
    # Reward-chosen demonstrations (with `mara-hf imitate --reward`)
    samples: int = field(default=8, metadata={
        "help": "with --reward: responses drawn per prompt over the candidate set and scored by the reward sources; "
                "the best is demonstrated where it beats the greedy answer (best-of-N distillation); >= 1."})
    sample_temperature: float = field(default=1.0, metadata={
        "help": "with --reward: temperature of the draws over the candidate set; > 0."})
    margin: float = field(default=0.0, metadata={
        "help": "with --reward: a drawn response is demonstrated only where its reward exceeds the greedy answer's "
                "by more than this (reward units); otherwise the greedy answer is, so what needs no change is kept."})
    rounds: int = field(default=2, metadata={
        "help": "with --reward: rounds of expert iteration, >= 1. Round r > 1 draws with the agent of round r - 1 "
                "steering (the LLM's draw among the candidates it accepts), keeps that agent's greedy answer where "
                "no draw beats it, and fits a new agent to those demonstrations: each round costs what the first "
                "does (draws, scoring, the fit). Measured on a dense per-token reward (docs/training.md): a second round "
                "gained more than the first on every model tried; 1: best-of-N distillation alone."})
    response_tokens: int = field(default=32, metadata={
        "help": "with --reward: new tokens per drawn response and per demonstration; with --pairs: tokens of the "
                "chosen response followed past the token where it parts from the rejected one."})
    steered_weight: float = field(default=0.5, metadata={
        "help": "with --reward: the share of the loss carried by the decisions along demonstrations that differ "
                "from the greedy answer (the rest by those that keep it); with --pairs: by the decisions at the "
                "token where the responses part; in (0, 1)."})
    credit: str = field(default="prefix", metadata={
        "help": "with --reward: which rejections along a demonstration are taught. \"prefix\": where the "
                "demonstration takes a lower-ranked token, a candidate ranked above it is taught as rejected only "
                "when the reward scores the demonstration's prefix followed by that candidate below the prefix "
                "followed by the demonstration's token (one batched reward call per departure's candidates); the "
                "LLM's own choices are kept wherever the reward does not pay for changing them. \"all\": every "
                "candidate ranked above the demonstrated token (what a demonstration followed token by token "
                "implies; it teaches the agent to reject wherever a draw happened to depart)."})
    validation_prompts: int = field(default=24, metadata={
        "help": "with --reward: prompts of --prompts (at most a quarter of them) held out of the demonstrations; "
                "the accept threshold is chosen on them (the highest reward with text as fluent as best-of-N's "
                "picks; an agent that changes nothing when no threshold gains) and the agent's frontier there is "
                "reported and saved to OUTPUT/frontier.json. 0: none, the agent keeps `threshold`."})
    validation_samples: int = field(default=16, metadata={
        "help": "with --reward and validation prompts: the LLM's own draws per validation prompt (at the "
                "LLM's temperature 1, no top-k), for best-of-N beside the agent and the fluency bound of the "
                "threshold's choice."})
    # Agent
    init_agent: str | None = field(default=None, metadata={
        "help": "an agent (folder, bundled name or Hub id) whose weights the fit starts from (its hidden layers "
                "are kept); None: a fresh agent of `agent_hidden_dims`."})
    agent_hidden_dims: list[int] = field(default_factory=lambda: [1024, 256], metadata={
        "help": "widths of a fresh agent's two hidden layers, in units."})
    threshold: float = field(default=0.5, metadata={
        "help": "the agent's accept threshold when decoding: the P(accept) a candidate must exceed, in (0, 1)."})
    # Fit
    harmful_weight: float = field(default=0.5, metadata={
        "help": "the share of the loss carried by the harmful demonstrations' decisions (the rest by the benign "
                "ones), whatever their counts; in (0, 1)."})
    balance_labels: bool = field(default=True, metadata={
        "help": "within each kind (harmful, benign), accepts and rejects carry equal halves of its share."})
    epochs: int = field(default=6, metadata={"help": "passes of AdamW over the recorded decisions (more when "
                                                     "`min_steps` needs them)."})
    min_steps: int = field(default=1000, metadata={
        "help": "at least this many AdamW steps: a small set of decisions (a few hundred prompts) gets as many more "
                "passes as that takes; 0: exactly `epochs`."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate; > 0."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW (decoupled) weight decay."})
    fit_batch_size: int = field(default=512, metadata={"help": "recorded decisions per AdamW step."})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of the decisions held out to report accuracy during the fit, in [0, 1)."})
    seed: int = field(default=0, metadata={
        "help": "random seed of the prompt draws, the refusal draws, the fresh agent's weights and the batches."})
    device: str | None = field(default=None, metadata={
        "help": "where `mara-hf imitate` loads the LLM (cpu, cuda, cuda:1, ...): the decisions are collected and "
                "the agent fitted there; None: the first CUDA GPU when there is one, else the CPU."})

    def __post_init__(self):
        for name in ("benign_tokens", "opening_tokens", "rollout_batch_size", "top_k", "epochs", "fit_batch_size",
                     "samples", "response_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be >= 1, got {getattr(self, name)}.", name)
        for name in ("validation_prompts", "validation_samples"):
            if getattr(self, name) < 0:
                raise OptionError(f"{name} must be >= 0, got {getattr(self, name)}.", name)
        for name in ("max_harmful", "max_benign", "benign_openings"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise OptionError(f"{name} must be >= 0 or None, got {getattr(self, name)}.", name)
        if self.screen_benign and not self.screen_agent:
            raise OptionError("screen_benign needs screen_agent: the agent whose false refusals are screened for.",
                              "screen_agent")
        if self.added_repeats < 1:
            raise OptionError(f"added_repeats must be >= 1, got {self.added_repeats}.", "added_repeats")
        if self.written_repeats < 0:
            raise OptionError(f"written_repeats must be >= 0, got {self.written_repeats}.", "written_repeats")
        if not self.refusals or not all(isinstance(r, str) and r.strip() for r in self.refusals):
            raise OptionError("refusals must be one or more non-empty texts.", "refusals")
        for name, value, ok, interval in (("top_p", self.top_p, 0 < self.top_p <= 1, "(0, 1]"),
                                          ("threshold", self.threshold, 0 < self.threshold < 1, "(0, 1)"),
                                          ("harmful_weight", self.harmful_weight, 0 < self.harmful_weight < 1, "(0, 1)"),
                                          ("steered_weight", self.steered_weight, 0 < self.steered_weight < 1, "(0, 1)"),
                                          ("sample_temperature", self.sample_temperature, self.sample_temperature > 0,
                                           "(0, inf)"),
                                          ("val_fraction", self.val_fraction, 0 <= self.val_fraction < 1, "[0, 1)")):
            if not ok:
                raise OptionError(f"{name} must be in {interval}, got {value}.", name)
        if self.credit not in ("prefix", "all"):
            raise OptionError(f"credit must be 'prefix' or 'all', got {self.credit!r}.", "credit")
        if self.min_steps < 0:
            raise OptionError(f"min_steps must be >= 0, got {self.min_steps}.", "min_steps")
        if self.lr <= 0:
            raise OptionError(f"lr must be > 0, got {self.lr}.", "lr")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# `--batch-size` means prompts generated together, as in eval and bench; this batch had that name in 0.1
rename_setting(ImitationConfig, "batch_size", "fit_batch_size", "decisions per AdamW step")
