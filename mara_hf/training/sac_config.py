"""Settings of MARA training (discrete soft actor-critic).

The defaults are mara-hf's recipe: veto decisions, a true KL cost, an actor regularised towards "accept" and
Monte Carlo critic targets (see `mara_hf.training.transitions` and `mara_hf.training.sac` for why). The authors'
exact settings are the preset `"paper"`: `MaraTrainingConfig.from_preset("paper")`, `mara-hf train --preset paper`.
"""

from dataclasses import asdict, dataclass, field, fields

from ..errors import OptionError
from .renamed_settings import rename_setting

# The published run of the MARA authors (Zhang et al., IJCAI 2025, arXiv 2505.19743: the paper's training section,
# and the `training_params.json` published with their code).
PRESETS = {
    "paper": dict(mdp="chain", exploration=0.0, shaping=False, temperature=0.8, kl_ctl=0.1, prior_accept=None,
                  auto_alpha=True, init_alpha=0.01, gamma=0.99, bootstrap=True, postback_reward=True,
                  episodes=21000, max_new_tokens=512, learner_batch_size=1024, learning_starts=65536,
                  updates_per_episode=10, overlap_updates=False, normalize_rewards=False),
}


@dataclass
class MaraTrainingConfig:
    """Settings of a MARA training run (discrete soft actor-critic). Every field is settable from `mara-hf train` as
    `--field-name`; what it does and its unit are in its `metadata["help"]`, which `mara-hf train --help` shows.

    The fields, in order: the preset and starting point (`preset`, `init_agent`, `critic_warmup`,
    `init_agent_prior`); the decisions (`mdp`, `temperature`); the rollouts (`episodes`, `rollout_batch_size`,
    `max_new_tokens`, `top_k`, `top_p`); the rewards (`kl_ctl` ... `shaping`); exploration (`exploration`,
    `guide_prefixes`, `guide_fraction`); the learner (`learner_batch_size` ... `max_grad_norm`); bookkeeping
    (`checkpoint_every`, `seed`, `agent_hidden_dims`, `device`).

    Example:

    ```python
    from mara_hf import MaraTrainingConfig

    config = MaraTrainingConfig(episodes=300, max_new_tokens=32)  # any fields; the others keep their defaults
    print(config.episodes, config.learner_batch_size)  # 300 256
    paper = MaraTrainingConfig.from_preset("paper", episodes=4000)  # the authors' settings, with overrides
    print(paper.mdp, paper.episodes, paper.learner_batch_size)  # chain 4000 1024
    ```
    """

    # Preset and starting point
    preset: str | None = field(default=None, metadata={
        "help": "the preset these settings started from: its settings, with the flags given on top; recorded in the "
                "agent's provenance (`from_preset` sets it). paper: the MARA authors' published run.",
        "metavar": "{" + ",".join(PRESETS) + "}"})
    init_agent: str | None = field(default=None, metadata={
        "help": "an agent (folder, bundled name such as smollm2-135m-refusal, or Hub id) whose actor weights the new "
                "agent starts from, to improve a shipped or converted agent; the critics start fresh. Its width must "
                "be the model's hidden size; its hidden layers are kept (`agent_hidden_dims` then sizes only the "
                "critics). Recorded in the new agent's config. None: a fresh actor (at `prior_accept`)."})
    critic_warmup: int | None = field(default=None, metadata={
        "help": "learner updates at the start in which only the critics learn and the actor stays as it is. Fresh "
                "critics see no difference between the actions, so without a warm-up the actor's regulariser pulls "
                "a started agent back to the prior before the critics know what its rejections are worth. None: "
                "1000 updates with `init_agent`, 0 without."})
    init_agent_prior: bool = field(default=True, metadata={
        "help": "with `init_agent`, regularise the actor towards the started agent's own decisions (a KL to its "
                "P(accept) in every state, weighted by alpha) instead of towards `prior_accept`: where the critics "
                "see no difference, it keeps deciding as the started agent did. Off: towards `prior_accept`, which "
                "pulls a started agent back to accepting everything unless the critics confirm each of its "
                "rejections (measured on SmolLM2: the shipped agent's refusal openings fell from 50% to 21% of "
                "development prompts in 320 episodes that way)."})
    # Decisions
    mdp: str = field(default="veto", metadata={
        "help": "the decision process. veto: the agent accepts or rejects every candidate and the token is drawn "
                "from the LLM's decoding distribution restricted to the accepted ones (all when all are rejected); "
                "trained agents decode with strategy veto, so an agent that accepts everything is the LLM alone, "
                "greedy or sampled. chain: the paper's: the first accepted candidate in probability order is "
                "emitted, the last when every one is rejected; agents decode with strategy first.",
        "metavar": "{veto,chain}"})
    temperature: float = field(default=0.8, metadata={
        "help": "the LLM decoding being aligned: the candidates' probabilities at this softmax temperature, "
                "renormalised over the candidate set (the authors' base decoding: 0.8). Veto rollouts sample tokens "
                "from it; the KL cost is measured against it (the paper preset tempers the authors' KL with it)."})
    # Rollouts
    episodes: int = field(default=1500, metadata={
        "help": "episodes to generate in total (one episode = one prompt's response): the length of the run. The "
                "default, with 64-token responses, is about an hour on a 2-core CPU with SmolLM2-135M (the paper "
                "preset: 21,000 of 512 tokens)."})
    rollout_batch_size: int = field(default=8, metadata={
        "help": "prompts decoded together per rollout round (batched candidate scoring)."})
    max_new_tokens: int = field(default=64, metadata={
        "help": "response length limit of a rollout, in new tokens (the paper preset: 512)."})
    top_k: int = field(default=40, metadata={
        "help": "candidate set: the k most probable tokens (then cut by `top_p`)."})
    top_p: float = field(default=0.95, metadata={
        "help": "candidate set: of the `top_k` tokens, the most probable ones up to this cumulative probability, "
                "in (0, 1]."})
    # Rewards
    kl_ctl: float = field(default=0.1, metadata={
        "help": "weight of the per-decision divergence cost, in reward units per nat. Veto: a rejection of "
                "candidate k costs kl_ctl * -log(1 - q_k), the KL its removal causes. Chain: the authors' reward "
                "-kl_ctl * (log pi_agent(t) - log pi_LLM(t)) (`mara_hf.training.transitions.kl_rewards`)."})
    gamma: float = field(default=0.5, metadata={
        "help": "discount factor, in [0, 1]: per transition in the critic target, and per accepted token when the "
                "terminal reward is propagated back (`postback_reward`). With shaping, a token's own reward is what "
                "it changed: a short horizon credits each decision with it rather than with the noise of the "
                "tokens after it (docs/training.md, 'Defaults'); the paper preset uses 0.99."})
    postback_reward: bool = field(default=True, metadata={
        "help": "also add the terminal reward, discounted by `gamma`, to earlier transitions of the episode."})
    bootstrap: bool = field(default=False, metadata={
        "help": "critic targets are r + gamma * V(next state) (soft Q-learning, the authors'). Off: each "
                "transition's own reward is its target, a Monte Carlo return when used with `postback_reward` "
                "(then every decision carries the discounted terminal reward). Bootstrapping adds, on top of a "
                "postback reward, the postback rewards of all later decisions, so a longer chain of rejections "
                "looks better or worse only for having more transitions; Monte Carlo targets also need no value "
                "propagation along long episodes."})
    reward_baseline: float = field(default=0.0, metadata={
        "help": "subtracted from the weighted sum of reward-source scores, in reward units."})
    normalize_rewards: bool = field(default=True, metadata={
        "help": "when the response rewards in the replay buffer's transitions spread less than 1 (standard "
                "deviation), the learner divides them by that spread; the divergence cost (`kl_ctl`) is not "
                "divided, so `kl_ctl` weighs a nat against one spread of the reward whatever the reward's scale. "
                "Rewards spread 1 or more are left as they are. A reward scored as a share of the response (each "
                "of 12 tokens worth 1/12) is otherwise outweighed by the divergence cost of the rejections that "
                "would raise it, and its agent never rejects (measured: docs/training.md, 'Why these defaults'). "
                "Off in the paper preset."})
    shaping: bool = field(default=True, metadata={
        "help": "with `postback_reward`, credit every token with the change in reward it caused: the reward sources "
                "also score every prefix of the response (one batched call per rollout round, n + 1 texts for n "
                "tokens: cheap for functions and the refusal detector, costly for large reward models)."})
    # Exploration
    exploration: float = field(default=0.2, metadata={
        "help": "in rollouts each decision takes each action with at least this probability, in [0, 0.5) "
                "(P(accept) clipped to [exploration, 1 - exploration]), so that the critic keeps seeing both actions "
                "everywhere."})
    guide_prefixes: list[str] = field(default_factory=list, metadata={
        "help": "response openings (plain texts, one argument each) that guided rollouts steer towards, e.g. a "
                "refusal; see `guide_fraction`."})
    guide_fraction: float = field(default=0.0, metadata={
        "help": "share of rollouts that are guided, in [0, 1]: one of `guide_prefixes`, drawn at random, is "
                "followed token by token for as long as its next token is in the candidate set (every earlier "
                "candidate is rejected, that one accepted); the rest of the response is the actor's own sampled "
                "policy. The reward is scored as for any rollout. Rewards that the actor's own random search almost "
                "never reaches (a refusal written token by token) become visible to the critic this way; SAC learns "
                "off-policy, so these transitions are valid training data. 0 = the authors' setting."})
    # Learner
    learner_batch_size: int = field(default=256, metadata={
        "help": "transitions per gradient update. 256 (the authors: 1024, in the paper preset): with 10 updates per "
                "episode every transition is still replayed about 35 times at 64 tokens, and the learner then takes "
                "a fraction of a rollout's time instead of about half of it (`mara-hf bench --rollouts`)."})
    learning_starts: int | None = field(default=None, metadata={
        "help": "transitions in the replay buffer before the first update; updates also wait for at least one full "
                "batch. None: 4096 (about 64 episodes at 64 tokens), or an eighth of the transitions the run is "
                "expected to collect (episodes x max_new_tokens / 8) when that is fewer, so that a short run learns "
                "over most of its episodes. The paper preset: 64 batches of 1024."})
    updates_per_episode: int = field(default=10, metadata={
        "help": "gradient updates per collected episode."})
    overlap_updates: bool = field(default=True, metadata={
        "help": "run a round's learner updates in a background thread while the next round's rollouts decode, with "
                "a frozen copy of the actor (so those rollouts act one round behind the learner; SAC learns "
                "off-policy). The two use the hardware differently (rollouts stream the LLM's weights, the learner "
                "computes on a small network), so part of the learner's time is hidden: rounds about 1.1x faster on "
                "a 2-core CPU, where the two compete for the cores (README, Benchmark). Checkpoints and the end of "
                "the run wait for the updates, so resuming gives the same run. Off: updates after each round, as "
                "the authors (paper preset)."})
    buffer_size: int = field(default=1_000_000, metadata={
        "help": "replay buffer capacity, in transitions."})
    lr_actor: float = field(default=3e-4, metadata={"help": "Adam learning rate of the actor."})
    lr_critic: float = field(default=3e-4, metadata={"help": "Adam learning rate of the critics."})
    lr_alpha: float = field(default=3e-4, metadata={
        "help": "Adam learning rate of the regulariser's temperature alpha (with `auto_alpha`)."})
    prior_accept: float | None = field(default=0.95, metadata={
        "help": "the actor is regularised towards accepting with this probability, in (0, 1) (a KL to that prior, "
                "weighted by alpha) instead of towards 50/50 (entropy); a fresh actor starts there. Where the "
                "critic sees no difference the agent keeps accepting, so it rejects only on evidence. None: "
                "entropy, as the paper."})
    init_alpha: float = field(default=0.01, metadata={
        "help": "the (initial) temperature alpha of that regulariser: its weight against the rewards, in reward "
                "units per nat; > 0."})
    auto_alpha: bool = field(default=False, metadata={
        "help": "tune alpha towards the target entropy (the paper); off: alpha stays `init_alpha`."})
    target_entropy_factor: float = field(default=0.6, metadata={
        "help": "with `auto_alpha`, the target entropy per decision = factor * log(2) nats."})
    tau: float = field(default=0.005, metadata={
        "help": "soft update rate of the target critics: the share of the critics' weights mixed in per update, "
                "in (0, 1]."})
    max_grad_norm: float = field(default=0.5, metadata={
        "help": "gradient clipping: the largest L2 norm of a network's gradients per update."})
    # Bookkeeping
    checkpoint_every: int = field(default=500, metadata={
        "help": "episodes between checkpoints (a checkpoint is also written at the end)."})
    validation_prompts: int = field(default=24, metadata={
        "help": "prompts (at most a quarter of them) held out of the rollouts; at the end of the run the accept "
                "threshold is chosen on them (the highest reward with text as fluent as best-of-N's picks; an agent "
                "that changes nothing when no threshold gains) and the agent's frontier there is reported and saved "
                "to OUTPUT/frontier.json (not with --backend ray, whose LLM is on the workers). 0: none."})
    validation_samples: int = field(default=16, metadata={
        "help": "the LLM's own draws per validation prompt (temperature 1, no top-k), for best-of-N beside the "
                "agent and the fluency bound of the threshold's choice."})
    seed: int = field(default=0, metadata={
        "help": "random seed of the prompts' order, the action sampling and the networks' initial weights."})
    agent_hidden_dims: list[int] = field(default_factory=lambda: [1024, 256], metadata={
        "help": "widths of the actor's (and critics') two hidden layers, in units."})
    device: str | None = field(default=None, metadata={
        "help": "where the LLM and the networks run (cpu, cuda, cuda:1, ...); None: the LLM's device (on the "
                "command line, where it loads: the first CUDA GPU when there is one, else the CPU)."})

    def __post_init__(self):
        positive = ("episodes", "rollout_batch_size", "max_new_tokens", "top_k", "learner_batch_size", "buffer_size",
                    "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be >= 1, got {getattr(self, name)}.", name)
        for name in ("validation_prompts", "validation_samples", "learning_starts", "updates_per_episode", "kl_ctl", "tau", "max_grad_norm", "critic_warmup"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise OptionError(f"{name} must be >= 0, got {getattr(self, name)}.", name)
        if not 0 <= self.exploration < 0.5:
            raise OptionError(f"exploration must be in [0, 0.5), got {self.exploration}.", "exploration")
        if not 0 <= self.guide_fraction <= 1:
            raise OptionError(f"guide_fraction must be in [0, 1], got {self.guide_fraction}.", "guide_fraction")
        if self.guide_fraction > 0 and not self.guide_prefixes:
            raise OptionError("guide_fraction > 0 needs guide_prefixes (the openings guided rollouts steer towards).",
                              "guide_prefixes")
        for name, ok, interval in (("top_p", 0 < self.top_p <= 1, "(0, 1]"), ("gamma", 0 <= self.gamma <= 1, "[0, 1]"),
                                   ("tau", 0 < self.tau <= 1, "(0, 1]")):
            if not ok:
                raise OptionError(f"{name} must be in {interval}, got {getattr(self, name)}.", name)
        if self.mdp not in ("veto", "chain"):
            raise OptionError(f"mdp must be 'veto' or 'chain', got {self.mdp!r}.", "mdp")
        if self.temperature <= 0:
            raise OptionError(f"temperature must be > 0, got {self.temperature}.", "temperature")
        if self.prior_accept is not None and not 0 < self.prior_accept < 1:
            raise OptionError(f"prior_accept must be in (0, 1) or None, got {self.prior_accept}.", "prior_accept")
        if self.init_alpha <= 0:
            raise OptionError(f"init_alpha must be > 0, got {self.init_alpha}.", "init_alpha")
        if self.preset is not None and self.preset not in PRESETS:
            raise OptionError(f"Unknown preset {self.preset!r}; presets: {sorted(PRESETS)}.", "preset")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MaraTrainingConfig":
        """The settings of preset `name` (e.g. "paper"), with `overrides` on top."""
        if name not in PRESETS:
            raise OptionError(f"Unknown preset {name!r}; presets: {sorted(PRESETS)}.", "preset")
        return cls(**{**PRESETS[name], **overrides, "preset": name})

    @property
    def updates_start(self) -> int:
        """Transitions in the replay buffer before the first update: `learning_starts` with its default resolved, and
        at least one learner batch."""
        starts = self.learning_starts
        if starts is None:
            starts = min(4096, self.episodes * self.max_new_tokens // 8)
        return max(starts, self.learner_batch_size)

    @property
    def warmup_updates(self) -> int:
        """`critic_warmup` with its default resolved."""
        if self.critic_warmup is not None:
            return self.critic_warmup
        return 1000 if self.init_agent else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# `--batch-size` means prompts generated together, as in eval and bench; this batch had that name in 0.1
rename_setting(MaraTrainingConfig, "batch_size", "learner_batch_size", "transitions per update")
