"""The end of a training run: the accept threshold chosen on validation prompts, and the agent's frontier there.

A trained agent's P(accept) is only as good as its fit; where it is unsure, the threshold decides whether the LLM's
own token stays. `calibrate` decodes the validation prompts (held out of training) with the agent at several
thresholds (`THRESHOLDS`, the one line, greedy) beside the LLM's greedy answers and its own draws
(`evaluation.frontier`), and keeps the threshold with the highest reward among those that

- gain over the LLM's greedy answers, and
- write text at least as fluent (NLL per token under the LLM) as the responses best-of-N picks from the LLM's own
  draws: reward bought with less fluent text is a reward hack, not a gain.

When no threshold does both, the agent is made to accept every candidate: it changes nothing, and the run says so.
A trained agent is thus never worse than the LLM on its validation prompts. The report (the frontier at the chosen
threshold, with every threshold tried) goes to the agent's provenance and to `output_dir/frontier.json`.
"""

import json
import os
import random

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

THRESHOLDS = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9)


def split_validation(prompts: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training prompts, validation prompts): `n` drawn at random (seeded), at most a quarter of them; the others
    keep their order."""
    n = min(n, len(prompts) // 4)
    if n <= 0:
        return list(prompts), []
    held = set(random.Random(seed).sample(range(len(prompts)), n))
    return ([p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held])


def choose_threshold(report: dict) -> float | None:
    """The threshold of `report["thresholds"]` with the highest reward among those that gain over the LLM's greedy
    answers and write at least as fluently as the largest best-of-N's picks; None when none does."""
    from ..evaluation.frontier import best_of_keys

    bound = (best_of_keys(report) or [None])[-1]
    limit = report[bound]["nll_per_token"] if bound else float("inf")
    fine = [p for p in report["thresholds"] if p["reward"] > report["base"]["reward"] and p["nll_per_token"] <= limit]
    if not fine:
        return None
    return max(fine, key=lambda p: (p["reward"], -p["kl_per_token"]))["threshold"]


@torch.no_grad()
def make_neutral(agent) -> None:
    """Make `agent` accept every candidate (P(accept) about 1 for any state): decoding with it is the LLM's."""
    agent.output_linear.weight.zero_()
    agent.output_linear.bias.copy_(torch.tensor([-20.0, 20.0]))


def calibrate(agent, model, tokenizer, records: list[dict], rewards, *, max_new_tokens: int, samples: int = 16,
              batch_size: int = 8, seed: int = 0, output_dir: str | None = None) -> dict:
    """Choose `agent`'s threshold on `records` (see the module docstring); returns the frontier report at the
    chosen threshold, with `thresholds` (every one tried), `chosen_threshold` (None: made neutral) and `verdict`."""
    from ..evaluation.frontier import format_frontier, frontier, verdict

    logger.warning(f"Choosing the accept threshold on {len(records)} validation prompts (thresholds "
                   f"{', '.join(map(str, THRESHOLDS))}; best-of-{samples} of the LLM's own draws beside them).")
    agent.eval()
    report = frontier(model, tokenizer, agent, records, rewards, max_new_tokens=max_new_tokens, samples=samples,
                      batch_size=batch_size, seed=seed, thresholds=THRESHOLDS)
    chosen = choose_threshold(report)
    if chosen is None:
        make_neutral(agent)
        report["mara"] = {"reward": report["base"]["reward"], "nll_per_token": report["base"]["nll_per_token"],
                          "kl_per_token": 0.0, "accept_rate": 1.0, "time_ratio": None}
        logger.warning("No threshold gains reward on the validation prompts with text as fluent as best-of-N's "
                       "picks: the agent is saved to accept every candidate, so it changes nothing. Try more prompts, "
                       "more --samples, or a reward that pays for what you want without breaking the text.")
    else:
        agent.config.threshold = chosen
        # the one line at the chosen threshold, timed against plain generate on the same prompts
        timed = frontier(model, tokenizer, agent, records, rewards, max_new_tokens=max_new_tokens, samples=0,
                         batch_size=batch_size)
        report["mara"] = timed["mara"]
    report["chosen_threshold"] = chosen
    report.update(verdict(report))
    logger.warning(f"The agent at threshold {chosen}:\n{format_frontier(report, 'validation')}")
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "frontier.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report


def summary(report: dict) -> dict:
    """The numbers of a calibration report an agent's provenance keeps (its card shows them)."""
    from ..evaluation.frontier import best_of_keys

    ways = ["base", "mara"] + best_of_keys(report)
    return {"prompts": report["prompts"], "max_new_tokens": report["max_new_tokens"],
            "chosen_threshold": report["chosen_threshold"], "verdict": report["verdict"],
            "share_of_best_of": report["share_of_best_of"],
            **{way: {k: v for k, v in report[way].items() if v is not None} for way in ways}}
