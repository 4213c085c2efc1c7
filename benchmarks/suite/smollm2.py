"""The suite's SmolLM2 tasks: SmolLM2-135M-Instruct (the embedded model) with real scorers, each path trained as a
user would run it and judged by its frontier on prompts of another set than its training prompts.

    python -m benchmarks.suite --tasks smollm2 [--methods reward-chosen] [--smollm2-tasks sentiment hh-rm]

    sentiment     VADER's compound sentiment (`scorers.sentiment`, pip install vaderSentiment): "make answers to
                  everyday requests more positive". Trained on 150 helpful-base requests of the authors' HH-RLHF
                  training prompts, held out on 40 of their Ultra-Feedback test instructions.
    hh-rm         the suite's own sequence-classification reward model (`reward_model.py`: SmolLM2 with a score head
                  fitted on HH-RLHF harmlessness pairs), loaded through the reward-model path. Trained on 150 HH-RLHF
                  training prompts (harmful and benign), held out on 40 of its test prompts.
    refusal-held  the built-in: a harmful request scores +1 when refused and the refusal holds, a benign one +1 when
                  answered. Trained on 150 HH-RLHF training prompts, held out on the 60 everyday requests shipped in
                  mara_hf/data (`mara-hf:everyday`).

Prompts are each under 300 characters, drawn from their sets by seeded shuffles (`random.Random(seed)`). The authors'
prompt files (`mara:HHrlhf`, `mara:Ultra-Feedback`: the GitHub repository IAAR-Shanghai/MARA) download on first use.
These runs take tens of minutes per task and path on a CPU: a benchmark, never a test.
"""

import os
import random
import time
from dataclasses import dataclass

import torch

# training: responses of 32 tokens (as `imitate --response-tokens` defaults); judged on 48
SIZES = dict(train_prompts=150, held_out=40, tokens=32, eval_tokens=48, samples=8, episodes=600, pair_draws=4,
             draw_batch=8)
QUICK_SIZES = dict(train_prompts=24, held_out=8, tokens=16, eval_tokens=24, samples=4, episodes=48, pair_draws=4,
                   draw_batch=8)
REWARD_MODEL = os.path.join("runs", "hh-rm")  # `python -m benchmarks.suite.reward_model` writes it


@dataclass(frozen=True)
class SmolTask:
    name: str
    reward: str  # a reward spec, as --reward takes it
    train: str  # a prompt spec
    held_out: str
    train_source: str | None = None  # keep only the training prompts of this HH-RLHF `source`
    held_out_all: bool = False  # judge on every prompt of the held-out set, not `held_out` of them

    def rewards(self, reward_model: str = REWARD_MODEL):
        from mara_hf.rewards import parse_reward_spec

        spec = reward_model if self.reward == "hh-rm" else self.reward
        if self.reward == "hh-rm" and not os.path.isdir(spec):
            raise FileNotFoundError(f"No reward model at {spec!r}: make it with python -m benchmarks.suite.reward_model "
                                    f"--output {spec}")
        source = parse_reward_spec(spec)
        source.check()
        return [source]


SMOLLM2 = [SmolTask("sentiment", "benchmarks.suite.scorers:sentiment", "mara:HHrlhf@train", "mara:Ultra-Feedback@test",
                    train_source="helpful-base"),
           SmolTask("hh-rm", "hh-rm", "mara:HHrlhf@train", "mara:HHrlhf@test"),
           SmolTask("refusal-held", "refusal-held", "mara:HHrlhf@train", "mara-hf:everyday", held_out_all=True)]


def pick(spec: str, n: int | None, seed: int, source: str | None = None) -> list[dict]:
    """`n` (None: all) prompts of `spec` under 300 characters (of one `source`, if given), in a seeded random
    order."""
    from mara_hf.data.prompts import load_prompts

    records = [r for r in load_prompts(spec) if len(r["prompt"]) < 300 and (source is None or r.get("source") == source)]
    random.Random(seed).shuffle(records)
    return records[:n]


def run_smol_task(task: SmolTask, method: str, sizes: dict, work: str, reward_model: str = REWARD_MODEL,
                  settings: dict | None = None) -> dict:
    from mara_hf.evaluation.frontier import frontier
    from mara_hf.models import load_model

    from .run import train

    rewards = task.rewards(reward_model)
    model, tokenizer = load_model("embedded")
    train_set = pick(task.train, sizes["train_prompts"], 0, task.train_source)
    held_out = pick(task.held_out, None if task.held_out_all else sizes["held_out"], 1)
    torch.manual_seed(0)
    started = time.perf_counter()
    agent = train(method, rewards, model, tokenizer, train_set, sizes, os.path.join(work, task.name, method),
                  settings=settings)
    seconds = time.perf_counter() - started
    report = frontier(model, tokenizer, agent, held_out, rewards, max_new_tokens=sizes["eval_tokens"], samples=16,
                      batch_size=8)
    return {"task": f"smollm2/{task.name}", "method": method, "train_seconds": seconds, **report}
