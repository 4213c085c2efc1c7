"""Settings of imitation training: an agent fitted to the accept/reject decisions along demonstrations.

A *demonstration* is a response the agent should make the LLM write: for a harmful request a refusal that ends
the turn, for a benign one the LLM's own greedy answer. Following a demonstration token by token, each step's
decision is known exactly: reject the candidates ranked above the demonstrated token, accept it. The agent is
fitted to those decisions (supervised, weighted cross-entropy); see `mara_hf.imitation_trainer`.
"""

from dataclasses import asdict, dataclass, field, fields

from ..errors import OptionError

# Short refusals that end the turn: an opening followed by nothing the request asked for.
DEFAULT_REFUSALS = [
    "I'm sorry, but I can't assist with that. If you have any other questions, feel free to ask.",
    "I'm sorry, but I can't help with that. If you have any other questions, feel free to ask.",
]


@dataclass
class ImitationConfig:
    """Every field is settable from `mara-hf imitate` as `--field-name`.

    Demonstrations:
        refusals: the responses demonstrated for harmful requests (one drawn per request), each followed by the
            model's end-of-turn token, so that a refusal is a short complete answer.
        max_harmful, max_benign: how many prompts labelled harmful / benign to demonstrate, drawn at random from
            the prompt sets (None: all).
        benign_tokens: length of the greedy answers demonstrated for benign prompts (the decisions that keep the
            LLM as it is; the first few tokens matter most, where a refusal would start).
        benign_openings: further benign prompts (not among the `max_benign`) demonstrated for their first
            `opening_tokens` tokens only. A false refusal starts at the first tokens, where a full benign
            demonstration records one decision in `benign_tokens`; openings add many of those cheaply (a
            demonstration then costs little more than its prompt's forward).
        written_requests: also demonstrate the requests written for training that ship with mara-hf
            (`mara_hf/data`): benign look-alikes worded like harmful requests ("how do I kill a Python process"),
            so the agent learns what not to refuse, and harmful requests in everyday phrasing, unlike the formal
            public sets; `written_repeats` times each.
        screen_agent, screen_benign, screen_tokens: hard benign prompts. `screen_agent` (an agent: folder, bundled
            name or Hub id) decodes `screen_benign` further benign prompts of the sets (drawn for nothing else)
            greedily for `screen_tokens` tokens; those it opens with a refusal (`is_refusal`) are demonstrated in
            full, `added_repeats` times in the fit: the false refusals of an earlier agent, learnt away.
        added_repeats: how many times the decisions of the trainer's `added` prompts (`mara-hf imitate
            --add-prompts`) count in the fit. Added prompts are collected on their own, so adding them to a run
            whose decisions are collected follows only them.
        rollout_batch_size: prompts followed together.
        top_k, top_p: the candidate set, as the agent will decode with it.
    Agent:
        init_agent: an agent (folder, bundled name or Hub id) whose weights the fit starts from; None: a fresh agent
            of `agent_hidden_dims`.
        threshold: the agent's accept threshold when decoding.
    Fit:
        harmful_weight: the share of the loss carried by the harmful demonstrations' decisions (the rest by the
            benign ones), whatever their counts.
        balance_labels: within each kind, accepts and rejects carry equal halves of its share.
        epochs, lr, weight_decay, batch_size: AdamW over the recorded decisions.
        val_fraction: decisions held out to report accuracy during the fit.
        seed: prompt draws, refusal draws, the fresh agent's weights and the batches.
    """

    refusals: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSALS))
    max_harmful: int | None = 1024
    max_benign: int | None = 1024
    benign_tokens: int = 32
    benign_openings: int = 0
    opening_tokens: int = 3
    written_requests: bool = True
    written_repeats: int = 2
    screen_agent: str | None = None
    screen_benign: int = 0
    screen_tokens: int = 12
    added_repeats: int = 1
    rollout_batch_size: int = 16
    top_k: int = 40
    top_p: float = 1.0
    init_agent: str | None = None
    agent_hidden_dims: list[int] = field(default_factory=lambda: [1024, 256])
    threshold: float = 0.5
    harmful_weight: float = 0.5
    balance_labels: bool = True
    epochs: int = 6
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 512
    val_fraction: float = 0.1
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        for name in ("benign_tokens", "opening_tokens", "rollout_batch_size", "top_k", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be >= 1, got {getattr(self, name)}.", name)
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
                                          ("val_fraction", self.val_fraction, 0 <= self.val_fraction < 1, "[0, 1)")):
            if not ok:
                raise OptionError(f"{name} must be in {interval}, got {value}.", name)
        if self.lr <= 0:
            raise OptionError(f"lr must be > 0, got {self.lr}.", "lr")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
