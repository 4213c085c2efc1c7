"""MARA training on Ray: rollout workers (each with its own copy of the LLM and reward sources) feed one learner;
draw workers draw and score the responses of reward-chosen demonstrations (`RayDrawer`, `mara-hf imitate --reward
... --backend ray`).

Only the small agent travels: the learner sends its weights with every rollout request, workers send back
transitions (float16 states) and per-episode info. A worker holds the LLM, its tokenizer, the reward sources and a
`RolloutCollector`, the same rollout code as local training, and an agent to load the weights into; the learner is
`MaraTrainer` itself (updates, replay buffer, checkpoints, resume). A worker that dies is restarted and its
episodes are lost, not the run.
"""

import os

from transformers import AutoConfig
from transformers.utils import logging

from ..agent.configuration import MaraConfig
from ..agent.modeling import MaraAgent
from ..rewards import RewardSource
from .rollouts import RolloutCollector
from .sac_config import MaraTrainingConfig
from .sac_trainer import MaraTrainer

logger = logging.get_logger(__name__)


class RewardWorker:
    """A Ray actor holding the reward sources, for rollout workers that should not load reward models."""

    def __init__(self, reward_specs: list[str], reward_kwargs: dict):
        from ..rewards import parse_reward_spec

        self.sources = {s.name: s for s in (parse_reward_spec(spec, **reward_kwargs) for spec in reward_specs)}

    def score(self, name: str, prompts, responses, records):
        return self.sources[name](prompts, responses, records)


class RemoteReward(RewardSource):
    """Stands in for a reward source that lives in `RewardWorker` actors (used round-robin)."""

    def __init__(self, name: str, multiplier: float, actors):
        super().__init__(name, multiplier)
        self.actors, self._next = list(actors), 0

    def score(self, prompts, responses, records):
        import ray

        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return ray.get(actor.score.remote(self.name, prompts, responses, records))


class RolloutWorker:
    """A Ray actor: the LLM, its tokenizer and the reward sources (or stand-ins for reward workers) in a
    `RolloutCollector`, and an agent of the learner's architecture (`agent_config`, a `MaraConfig` dict) that
    takes the learner's weights for each round; collects episodes for the learner."""

    def __init__(self, model: str, dtype: str | None, device: str | None, reward_specs: list[str],
                 reward_kwargs: dict, config: dict, agent_config: dict, reward_actors=None):
        from ..models import load_model
        from ..rewards import parse_reward_spec

        llm, tokenizer = load_model(model, dtype, device)
        rewards = [parse_reward_spec(spec, **reward_kwargs) for spec in reward_specs]
        if reward_actors:  # score in the reward workers; the specs only give names and multipliers
            rewards = [RemoteReward(r.name, r.multiplier, reward_actors) for r in rewards]
        config = MaraTrainingConfig(**config)
        self.collector = RolloutCollector(llm, tokenizer, rewards, config)
        self.agent = MaraAgent(MaraConfig.from_dict(agent_config)).to(config.device or llm.device).eval()

    def collect(self, agent_state: dict, records: list[dict], seed: int):
        self.agent.load_state_dict(agent_state)
        self.collector.sampler.manual_seed(seed)
        return self.collector.collect(self.agent, records)


class DrawWorker:
    """A Ray actor: the LLM, its tokenizer and the reward sources in a `reward_chosen.Drawer`, and an agent of the
    steering agent's architecture for expert iteration's later rounds."""

    def __init__(self, model: str, dtype: str | None, device: str | None, reward_specs: list[str],
                 reward_kwargs: dict, config: dict):
        from ..models import load_model
        from ..rewards import parse_reward_spec
        from .imitation_config import ImitationConfig
        from .reward_chosen import Drawer

        llm, tokenizer = load_model(model, dtype, device)
        rewards = [parse_reward_spec(spec, **reward_kwargs) for spec in reward_specs]
        self.drawer = Drawer(llm, tokenizer, rewards, ImitationConfig(**config))
        self.device = llm.device

    def choose_batch(self, records: list[dict], seed: int, agent: tuple | None):
        """`Drawer.choose_batch`; `agent` is (config dict, state dict) or None."""
        steer = None
        if agent is not None:
            steer = MaraAgent(MaraConfig.from_dict(agent[0])).to(self.device).eval()
            steer.load_state_dict(agent[1])
        return self.drawer.choose_batch(records, seed, steer)


class RayDrawer:
    r"""
    Draws and scores reward-chosen demonstrations on `num_workers` Ray actors, each with its own copy of the LLM
    and the reward sources; `choose_batches` has `reward_chosen.Drawer`'s interface, so `RewardChosen` writes and
    resumes its file as with local drawing. Batches are spread over the workers and come back in order; a batch
    whose worker dies is drawn again on a new worker (same seed: the same draws).

    Args:
        model (`str`): Hub id or folder of the LLM (or "embedded"), loaded by every worker.
        reward_specs (`list[str]`): reward specs (`mara_hf.rewards.parse_reward_spec`), built by every worker.
        config: `ImitationConfig`. num_workers: draw actors. worker_gpus: GPUs per actor (0 on CPU).
        ray_address: an existing cluster ("auto", "ray://host:10001"); None starts a local one. dtype, device: how
        workers load the LLM.
    """

    def __init__(self, model: str, reward_specs: list[str], config, num_workers: int = 2, worker_gpus: float = 0,
                 ray_address: str | None = None, dtype: str | None = None, device: str | None = None,
                 reward_kwargs: dict | None = None, ray_init_kwargs: dict | None = None):
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        if not ray.is_initialized():
            ray.init(address=ray_address, **(ray_init_kwargs or {}))
        options = {"num_gpus": worker_gpus} if worker_gpus else {}
        actor = ray.remote(DrawWorker).options(max_restarts=0, **options)
        worker_device = device or ("cuda" if worker_gpus else None)
        settings = {k: v for k, v in config.to_dict().items() if k != "device"}
        self._spawn = lambda: actor.remote(model, dtype, worker_device, list(reward_specs), reward_kwargs or {},
                                           settings)
        self.num_workers, self.workers = num_workers, []

    def choose_batches(self, batches, agent=None):
        """The chosen demonstrations of every `(records, seed)` batch, yielded in order; at most two batches per
        worker in flight, so the caller writes results as they come."""
        import ray
        from ray.exceptions import RayActorError

        if not self.workers:
            self.workers = [self._spawn() for _ in range(self.num_workers)]
        steer = None if agent is None else ray.put(
            (agent.config.to_dict(), {k: v.detach().cpu() for k, v in agent.state_dict().items()}))
        pending = {}  # batch index -> (worker index, job)

        def submit(i):
            w = i % len(self.workers)
            pending[i] = (w, self.workers[w].choose_batch.remote(*batches[i], steer))

        ahead = 2 * len(self.workers)
        for i in range(min(ahead, len(batches))):
            submit(i)
        for i in range(len(batches)):
            while True:
                w, job = pending.pop(i)
                try:
                    lines = ray.get(job)
                    break
                except RayActorError as err:  # the worker died: a new one draws the batch again
                    logger.warning(f"Draw worker {w} died ({type(err).__name__}); restarting it.")
                    self.workers[w] = self._spawn()
                    submit(i)
            if i + ahead < len(batches):
                submit(i + ahead)
            yield lines

    def close(self):
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


class RayMaraTrainer(MaraTrainer):
    r"""
    [`MaraTrainer`] whose rollouts run on `num_workers` Ray actors, each decoding `rollout_batch_size` prompts
    per round. The learner holds no LLM.

    Args:
        model (`str`): Hub id or folder of the LLM (or "embedded"), loaded by every worker.
        reward_specs (`list[str]`): reward specs (`mara_hf.rewards.parse_reward_spec`), built by every worker.
        num_workers: rollout actors. worker_gpus: GPUs per actor (0 on CPU). ray_address: an existing cluster
        ("auto", "ray://host:10001"); None starts a local one. dtype, device: how workers load the LLM.
        reward_workers: when > 0, the reward sources live in that many separate actors
        (`reward_worker_gpus` GPUs each) instead of in every rollout worker.
        Other arguments as for [`MaraTrainer`].
    """

    def __init__(self, model: str, reward_specs: list[str], prompts, config: MaraTrainingConfig | None = None,
                 output_dir: str | None = None, data_name: str | list[str] | None = None, num_workers: int = 2,
                 worker_gpus: float = 0, ray_address: str | None = None, dtype: str | None = None,
                 device: str | None = None, reward_kwargs: dict | None = None, ray_init_kwargs: dict | None = None,
                 reward_workers: int = 0, reward_worker_gpus: float = 0):
        import ray

        from ..rewards import parse_reward_spec

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        rewards = [parse_reward_spec(spec, **(reward_kwargs or {})) for spec in reward_specs]  # names, multipliers
        model_config = _model_config(model)
        config = config or MaraTrainingConfig()
        super().__init__(None, None, rewards, prompts, config, output_dir=output_dir, data_name=data_name,
                         model_config=model_config)
        if not ray.is_initialized():
            ray.init(address=ray_address, **(ray_init_kwargs or {}))
        options = {"num_gpus": worker_gpus} if worker_gpus else {}
        actor = ray.remote(RolloutWorker).options(max_restarts=0, **options)
        worker_device = device or ("cuda" if worker_gpus else None)
        scorer = ray.remote(RewardWorker).options(**({"num_gpus": reward_worker_gpus} if reward_worker_gpus else {}))
        self.reward_actors = [scorer.remote(list(reward_specs), reward_kwargs or {}) for _ in range(reward_workers)]
        self._spawn = lambda: actor.remote(model, dtype, worker_device, list(reward_specs), reward_kwargs or {},
                                           config.to_dict(), self.agent.config.to_dict(), self.reward_actors)
        self.num_workers = num_workers
        self.workers = []

    def rollouts(self):
        """One round: every worker decodes its own batch of prompts with the current agent weights."""
        import ray
        from ray.exceptions import RayActorError

        cfg = self.config
        if not self.workers:  # started lazily, and again after close()
            self.workers = [self._spawn() for _ in range(self.num_workers)]
        agent_state = ray.put({k: v.detach().cpu() for k, v in self.acting_agent.state_dict().items()})
        jobs, start = [], self.episodes_done
        for i, worker in enumerate(self.workers):
            size = min(cfg.rollout_batch_size, cfg.episodes - start)
            if size <= 0:
                break
            seed = cfg.seed * 1_000_003 + start  # sampling depends on the episodes, not on which worker runs them
            jobs.append((i, worker.collect.remote(agent_state, self.prompt_batch(start, size), seed)))
            start += size
        transitions, infos = [], []
        for i, job in jobs:
            try:
                episode_transitions, episode_infos = ray.get(job)
            except RayActorError as err:  # the worker died: its episodes are lost, the run goes on
                logger.warning(f"Rollout worker {i} died ({type(err).__name__}); restarting it.")
                self.workers[i] = self._spawn()
                continue
            transitions += episode_transitions
            infos += episode_infos
        return transitions, infos

    def close(self):
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []  # reward workers stay: rollouts may start again


def _model_config(model: str):
    """The LLM's config, without its weights (the learner only needs its hidden size and name)."""
    if model == "embedded":
        from ..models import EMBEDDED_MODEL_ID, embedded_model_path

        config = AutoConfig.from_pretrained(embedded_model_path())
        config.name_or_path = EMBEDDED_MODEL_ID
        return config
    config = AutoConfig.from_pretrained(model)
    config.name_or_path = model if not os.path.isdir(model) else config.name_or_path or model
    return config
