"""The frontier an agent sits on: the reward it buys, and what it pays for it in fluency, divergence and decoding
time, with best-of-N beside it on the same prompts.

An agent finds any hole in a reward, so one number never judges it. `frontier` decodes held-out prompts and
reports, per way of decoding, the mean reward (the weighted sum of the reward sources) and the fluency of the
responses (NLL per token under the base model, `metrics.response_measures`):

    base         the LLM alone, greedy: the point every gain is measured from.
    mara         the one line, greedy: `model.generate(**inputs, logits_processor=[MaraProcessor(agent, model=model)])`,
                 with its accept rate, its divergence from the LLM (`kl_per_token`: per token, -log of the LLM's
                 probability left once the tokens ranked above the emitted one are removed; 0 for the LLM's own
                 greedy answer) and its decoding time per token relative to plain greedy `generate` on the same
                 batches.
    samples      the LLM's own draws at `temperature` (no top-k, no top-p), `samples` per prompt.
    best_of_N    per prompt, the draw the reward scores highest among the first N of those same draws, for N in
                 `best_of` (up to `samples`): what N times the decoding buys, and how fluent the responses it picks
                 are; its `time_ratio` is N draws' decoding time against plain greedy's.

The verdict (`verdict`) compares MARA's gain with the largest best-of-N's, and MARA's fluency with that of the
responses best-of-N picks: an agent whose text is less fluent than those buys its reward with broken text, a reward
hack, and the report says so.
"""

import contextlib
import time

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..data.encoding import encode_prompts, pad_id
from ..decoding.processor import MaraProcessor
from ..decoding.stats import sum_stats
from ..rewards import combine
from ..utils import token_ids
from .metrics import response_lengths, response_measures

logger = logging.get_logger(__name__)

BEST_OF = (4, 16)


@torch.no_grad()
def frontier(model, tokenizer, agent, records: list[dict], rewards, *, max_new_tokens: int = 48, samples: int = 16,
             best_of=BEST_OF, temperature: float = 1.0, batch_size: int = 8, seed: int = 0, thresholds=(),
             **overrides) -> dict:
    """The frontier of `agent` on `records` (dicts with "prompt"): see the module docstring.

    Args:
        model, tokenizer: the causal LM the agent is for and its tokenizer (chat models get their chat template).
        agent: a `MaraAgent` (or a list, combined as `MaraProcessor` combines them).
        records: held-out prompts: none of them should have been used to train or tune the agent.
        rewards: reward sources (`mara_hf.rewards`); their weighted sum is the reward.
        max_new_tokens: length of every response.
        samples: the LLM's draws per prompt, for best-of-N; 0 leaves best-of-N out.
        best_of: the N of best-of-N, each at most `samples`.
        temperature: of the LLM's draws.
        batch_size: prompts decoded together (the draws: `batch_size` x `samples` rows).
        seed: the draws of each batch are seeded by `seed` + the batch's first index.
        thresholds: more accept thresholds MARA decodes with (greedy, the one line): the agent's trade-off between
            reward and divergence, in `report["thresholds"]` (one point each: `threshold`, `reward`,
            `nll_per_token`, `kl_per_token`, `accept_rate`).
        overrides: go to `MaraProcessor` (`top_k`, `top_p`, `threshold`).

    Returns a dict: `prompts`, one entry per way (`base`, `mara`, `samples`, `best_of_N`) with `reward`,
    `nll_per_token` and, where measured, `kl_per_token`, `accept_rate`, `time_ratio`; `gain` (MARA's reward minus
    base's), `best_of_gain`, `share_of_best_of` (MARA's gain over the largest best-of-N's), and `verdict`.
    """
    if not records:
        raise ValueError("frontier needs at least one prompt.")
    if not rewards:
        raise ValueError("frontier needs at least one reward source.")
    best_of = sorted({int(n) for n in best_of if int(n) <= samples}) if samples else []
    pad, eos = pad_id(tokenizer), token_ids(model.generation_config.eos_token_id)
    points = [("mara", overrides)] + [(f"threshold_{i}", {**overrides, "threshold": t})
                                       for i, t in enumerate(thresholds)]
    ways = ["base"] + [name for name, _ in points] + (["samples"] + [f"best_of_{n}" for n in best_of] if samples else [])
    sums = {way: {"reward": 0.0, "nll": 0.0, "tokens": 0, "divergence": 0.0} for way in ways}
    seconds, generated = {"base": 0.0, "mara": 0.0, "samples": 0.0}, {"base": 0, "mara": 0}
    stats = {name: [] for name, _ in points}
    for start in tqdm(range(0, len(records), batch_size), desc="frontier", unit="batch"):
        batch = records[start:start + batch_size]
        prompts = [r["prompt"] for r in batch]
        enc = encode_prompts(tokenizer, prompts, device=model.device)
        width = enc["input_ids"].shape[1]
        if start == 0:  # the first call of generate pays for its set-up: not counted against either way
            model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=pad)
        for way, settings in [("base", None)] + points:
            with contextlib.ExitStack() as stack:
                extra = {}
                if settings is not None:
                    mara = stack.enter_context(MaraProcessor(agent, model=model, **settings))
                    extra = {"logits_processor": [mara]}
                t = time.perf_counter()
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **extra)
                elapsed = time.perf_counter() - t
                if settings is not None:
                    stats[way].append(mara.stats.as_dict())
            lengths = response_lengths(out[:, width:], eos)
            if way in seconds:
                seconds[way] += elapsed
                generated[way] += int(lengths.sum())
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            _add(sums[way], combine(rewards, prompts, texts, batch)[0],
                 response_measures(model, out, enc["attention_mask"], lengths))
        if samples:
            _best_of(model, tokenizer, enc, batch, rewards, samples, best_of, temperature, max_new_tokens,
                     seed + start, sums, seconds, pad, eos)
    n = len(records)
    report = {"prompts": n, "max_new_tokens": max_new_tokens}
    for way in ways:
        s = sums[way]
        count = n * samples if way == "samples" else n
        report[way] = {"reward": s["reward"] / count, "nll_per_token": s["nll"] / max(s["tokens"], 1)}
        if way in stats:
            report[way]["kl_per_token"] = s["divergence"] / max(s["tokens"], 1)
            report[way]["accept_rate"] = sum_stats(stats[way]).get("accept_rate")
    per_token = {way: seconds[way] / max(generated[way], 1) for way in ("base", "mara")}
    report["mara"]["time_ratio"] = per_token["mara"] / per_token["base"] if per_token["base"] else None
    for k in best_of:  # N draws per prompt, against the greedy answer's time
        report[f"best_of_{k}"]["time_ratio"] = seconds["samples"] * k / samples / seconds["base"] if seconds["base"] else None
    if samples:
        report["samples"]["temperature"] = temperature
    if thresholds:
        report["thresholds"] = [{"threshold": t, **report.pop(f"threshold_{i}")} for i, t in enumerate(thresholds)]
    report.update(verdict(report))
    return report


def _best_of(model, tokenizer, enc, batch, rewards, samples, best_of, temperature, max_new_tokens, seed, sums,
             seconds, pad, eos):
    """The LLM's `samples` draws per prompt of one batch, scored; each best-of-N picks among the first N."""
    width, n = enc["input_ids"].shape[1], len(batch)
    gpus = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):  # seeded on a fork: the caller's random state is left as it was
        torch.manual_seed(seed)
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                             top_p=1.0, num_return_sequences=samples, pad_token_id=pad)
        seconds["samples"] += time.perf_counter() - t
    lengths = response_lengths(out[:, width:], eos)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    prompts = [r["prompt"] for r in batch for _ in range(samples)]
    scores = combine(rewards, prompts, texts, [r for r in batch for _ in range(samples)])[0]
    measures = response_measures(model, out, enc["attention_mask"].repeat_interleave(samples, 0), lengths)
    _add(sums["samples"], scores, measures)
    for k in best_of:
        picked = [i * samples + max(range(k), key=lambda s: scores[i * samples + s]) for i in range(n)]
        _add(sums[f"best_of_{k}"], [scores[j] for j in picked], {key: [v[j] for j in picked]
                                                                 for key, v in measures.items()})


def _add(total: dict, rewards: list[float], measures: dict):
    total["reward"] += float(sum(rewards))
    total["nll"] += float(sum(measures["nll"]))
    total["tokens"] += int(sum(measures["tokens"]))
    total["divergence"] += float(sum(measures["divergence"]))


def verdict(report: dict) -> dict:
    """`gain`, `best_of_gain`, `share_of_best_of` and `verdict` of a frontier report (see the module docstring):

    - "no gain": MARA's reward is not above base greedy's;
    - "reward hack": it is, but MARA's text is less fluent (higher NLL per token) than the responses the largest
      best-of-N picks, the LLM's own draws chosen by the same reward;
    - "gain" otherwise (also when best-of-N was not measured; `share_of_best_of` is then None).
    """
    gain = report["mara"]["reward"] - report["base"]["reward"]
    largest = (best_of_keys(report) or [None])[-1]
    out = {"gain": gain, "best_of_gain": None, "share_of_best_of": None}
    if largest is not None:
        out["best_of_gain"] = report[largest]["reward"] - report["base"]["reward"]
        if out["best_of_gain"] > 0:
            out["share_of_best_of"] = gain / out["best_of_gain"]
    if gain <= 0:
        out["verdict"] = "no gain"
    elif largest is not None and report["mara"]["nll_per_token"] > report[largest]["nll_per_token"]:
        out["verdict"] = "reward hack"
    else:
        out["verdict"] = "gain"
    return out


def format_frontier(report: dict, prompts: str = "held-out") -> str:
    """The report as a table: one row per way of decoding, then the verdict in a sentence. `prompts` says which
    prompts they were, in the heading."""
    ways = [w for w in ("base", "mara", "samples") if w in report]
    ways += best_of_keys(report)
    names = {"base": "LLM greedy", "mara": "MARA (the one line)",
             "samples": f"LLM samples (T {report.get('samples', {}).get('temperature', '')})"}
    header = ("decoding", "reward", "gain", "NLL/token", "KL/token", "accept rate", "time vs plain")
    rows = [header]
    base = report["base"]["reward"]
    for way in ways:
        r = report[way]
        rows.append((names.get(way, way.replace("best_of_", "best-of-")), f"{r['reward']:.4g}",
                     f"{r['reward'] - base:+.4g}", f"{r['nll_per_token']:.3f}",
                     _fmt(r.get("kl_per_token"), "{:.3f}", "0" if way == "base" else ""),
                     _fmt(r.get("accept_rate"), "{:.2f}"), _fmt(r.get("time_ratio"), "{:.2f}x",
                                                              "1.00x" if way == "base" else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|")
    lines.insert(0, f"{report['prompts']} {prompts} prompts, {report['max_new_tokens']} new tokens:")
    lines.append(describe(report))
    return "\n".join(lines)


def describe(report: dict) -> str:
    """The verdict in one sentence."""
    share = report.get("share_of_best_of")
    largest = (best_of_keys(report) or [None])[-1]
    label = largest.replace("best_of_", "best-of-") if largest else None
    against = f" ({100 * share:.0f}% of {label}'s gain)" if share is not None else ""
    if report["verdict"] == "no gain":
        return f"No gain: MARA's reward is {report['gain']:+.4g} against the LLM's greedy answers."
    if report["verdict"] == "reward hack":
        return (f"Reward hack: MARA gains {report['gain']:+.4g}{against} with text less fluent than the responses "
                f"{label} picks (NLL/token {report['mara']['nll_per_token']:.3f} against "
                f"{report[largest]['nll_per_token']:.3f}): read its responses before using it.")
    if label is None:
        return f"Gain: MARA gains {report['gain']:+.4g} (best-of-N not measured)." + _greedy_note(report)
    return (f"Gain: MARA gains {report['gain']:+.4g}{against}, with text as fluent as the responses {label} picks or "
            f"more." + _greedy_note(report))


# NLL per token above the LLM's greedy answers' from which a report asks to read the responses: where the LLM's own
# samples are broken (small models at temperature 1), text as fluent as best-of-N's picks can be broken too
LESS_FLUENT_THAN_GREEDY = 0.3


def _greedy_note(report: dict) -> str:
    over = report["mara"]["nll_per_token"] - report["base"]["nll_per_token"]
    if over <= LESS_FLUENT_THAN_GREEDY:
        return ""
    return (f" But its text is {over:.2f} nats/token less likely than the LLM's greedy answers (NLL/token "
            f"{report['mara']['nll_per_token']:.3f} against {report['base']['nll_per_token']:.3f}): where the LLM's "
            "own samples are broken, best-of-N's picks are no fluency bar; read the responses before using it.")


def best_of_keys(report: dict) -> list[str]:
    """The report's best-of-N entries, by N."""
    return sorted((k for k in report if k.startswith("best_of_") and k[8:].isdigit()), key=lambda k: int(k[8:]))


def _fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else spec.format(value)

