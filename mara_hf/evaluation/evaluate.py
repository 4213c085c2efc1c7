"""`mara-hf eval`: base (greedy) vs MARA responses on the same prompts, scored by every reward source.

What the numbers mean (the paper's exact preference-rate definition is not public; these are ours):
    mean[source]          mean unweighted score of base and of MARA responses.
    win/tie/loss[source]  per prompt, MARA's score against base's, in the source's direction (a negative
                          multiplier, e.g. a cost model, means lower is better); tie = equal scores.
    net_preference        (wins - losses) / prompts, per source: +1 = MARA better on every prompt.
    refusal_rate          share of responses that open with a refusal (`mara_hf.rewards.refusal.is_refusal`), for
                          base and MARA, overall and split into harmful / benign prompts when the prompts say which
                          they are.
    held_refusal_rate     share of responses whose refusal holds (`mara_hf.rewards.refusal.refusal_holds`: it opens
                          with a refusal and the rest gives nothing of what was asked), same groups. On harmful prompts
                          this is the number a reader believes; on benign ones any refusal opening is a refusal.
    nll_per_token         negative log-likelihood of the responses under the base model itself, per token (nats):
                          how far from what the base model finds likely the text moved (mara_hf.evaluation.metrics).
    repeated_4gram_share  share of the responses' 4-grams that already occurred earlier in the same response.
    benign                both measures on the benign prompts alone, when the prompts mix harmful and benign ones
                          (where an agent should change nothing).
    top_candidate_share   share of MARA's decisions that emitted the most probable candidate (what greedy base
                          decoding emits at that point).
    mara_stats            MARA's decision statistics summed over the run; tokens_per_s per method.
With `sampled=True` two more methods run on every prompt: "base_sampled", the base model sampled as the paper's
base decoding (temperature 0.8, top-k 40, top-p 0.95), and "mara_sampled", the same sampling through `generate`
with the processor; each batch is seeded (`seed` + the batch's first index), so a rerun or a resume draws the same
tokens. The refusal, fluency and repetition measures are reported for them too.
Results go to OUTPUT (one JSON line per prompt, appended as batches finish, so a rerun resumes) and the summary
to OUTPUT.summary.json; `format_summary` renders it as the table `mara-hf eval` prints (rows: `TABLE_ROWS`).
"""

import contextlib
import json
import os
import time

import torch
from transformers.utils import logging

from ..data.encoding import encode_prompts, pad_id
from ..decoding.generate import generate as fast_generate
from ..decoding.processor import MaraProcessor
from ..decoding.stats import sum_stats
from ..rewards.refusal import is_refusal, refusal_holds
from ..rewards import RefusalReward, repeated_ngrams
from .metrics import response_lengths, response_nll

logger = logging.get_logger(__name__)


# The paper's base decoding, for the sampled methods.
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95)
GREEDY_METHODS = ("base", "mara")
SAMPLED_METHODS = ("base_sampled", "mara_sampled")


@torch.no_grad()
def evaluate(model, tokenizer, agent, records: list[dict], rewards, output: str, batch_size: int = 8,
             max_new_tokens: int = 128, sampled: bool = False, seed: int = 0, **overrides) -> dict:
    """Generate, score and summarise; see the module docstring. `overrides` go to `MaraProcessor`."""
    from tqdm.auto import tqdm

    done = _read_done(output, records)
    todo = [i for i in range(len(records)) if i not in done]
    methods = GREEDY_METHODS + (SAMPLED_METHODS if sampled else ())
    seconds = dict.fromkeys(methods, 0.0)
    tokens = dict.fromkeys(methods, 0)
    batch_stats = []
    eos = model.generation_config.eos_token_id
    pad = pad_id(tokenizer)
    # the processors leave the model when the run ends, also when it raises; sampled MARA gets its own, so the
    # greedy run's decision statistics stay its own
    with contextlib.ExitStack() as stack:
        mara = stack.enter_context(MaraProcessor(agent, model=model, **overrides))
        mara_sampling = stack.enter_context(MaraProcessor(agent, model=model, **overrides)) if sampled else None
        sink = stack.enter_context(open(output, "a"))
        bar = stack.enter_context(tqdm(total=len(records), initial=len(done), desc="MARA eval", unit="prompt"))
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            batch = [records[i] for i in idx]
            prompts = [r["prompt"] for r in batch]
            enc = encode_prompts(tokenizer, prompts, device=model.device)
            n = enc["input_ids"].shape[1]
            responses, measures = {}, {}
            for name in methods:
                t = time.perf_counter()
                if name == "base":
                    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=pad)
                elif name == "mara":
                    out = fast_generate(model, mara, enc["input_ids"], enc["attention_mask"],
                                        max_new_tokens=max_new_tokens, pad_token_id=pad)
                else:  # seeded per batch, on a fork of the RNG: the caller's random state is left as it was
                    extra = {"logits_processor": [mara_sampling]} if name == "mara_sampled" else {}
                    gpus = [model.device.index or 0] if model.device.type == "cuda" else []
                    with torch.random.fork_rng(devices=gpus):
                        torch.manual_seed(seed + idx[0])
                        out = model.generate(**enc, max_new_tokens=max_new_tokens,
                                             pad_token_id=pad, **SAMPLING, **extra)
                seconds[name] += time.perf_counter() - t
                new = out[:, n:]
                lengths = response_lengths(new, eos)
                tokens[name] += int(lengths.sum())
                responses[name] = tokenizer.batch_decode(new, skip_special_tokens=True)
                nll, counted = response_nll(model, out, enc["attention_mask"], lengths)
                grams = [repeated_ngrams(row[:int(k)].tolist()) for row, k in zip(new, lengths)]
                measures[name] = [{"nll": a, "tokens": b, "repeated_4grams": g[0], "4grams": g[1]}
                                  for a, b, g in zip(nll, counted, grams)]
            batch_stats.append(mara.stats.as_dict())
            scores = {name: {src.name: src(prompts, responses[name], batch) for src in rewards}
                      for name in methods}
            for j, i in enumerate(idx):
                line = {"index": i, "prompt": prompts[j], "harmful": _harmful(batch[j]),
                        **{name: {"response": responses[name][j], "refusal": is_refusal(responses[name][j]),
                                  "refusal_held": refusal_holds(responses[name][j]),
                                  "scores": {s: v[j] for s, v in scores[name].items()}, **measures[name][j]}
                           for name in methods}}
                sink.write(json.dumps(line) + "\n")
            sink.flush()
            bar.update(len(idx))
    lines = _read_lines(output)
    summary = summarise(lines, rewards)
    summary["mara_stats"] = stats = sum_stats(batch_stats) if batch_stats else {}
    if stats and stats["decisions"]:  # the top candidate is emitted by an accept at index 0, or by a fallback to it
        top_fallback = mara.strategy == "veto" or mara.fallback_index == 0
        kept = sum(s["accepted_index"][0] for s in batch_stats if s["accepted_index"])
        summary["top_candidate_share"] = (kept + (stats["fallbacks"] if top_fallback else 0)) / stats["decisions"]
    summary["tokens_per_s"] = {k: tokens[k] / seconds[k] for k in seconds if seconds[k] > 0}
    with open(output + ".summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def summarise(lines: list[dict], rewards) -> dict:
    """The summary numbers of the module docstring, from the per-prompt lines."""
    n = len(lines)
    summary = {"prompts": n, "mean": {}, "win_tie_loss": {}, "net_preference": {}}
    for src in rewards:
        base = [line["base"]["scores"][src.name] for line in lines]
        mara = [line["mara"]["scores"][src.name] for line in lines]
        sign = -1.0 if src.multiplier < 0 else 1.0
        wins = sum(sign * (m - b) > 0 for b, m in zip(base, mara))
        losses = sum(sign * (m - b) < 0 for b, m in zip(base, mara))
        summary["mean"][src.name] = {"base": sum(base) / n, "mara": sum(mara) / n}
        summary["win_tie_loss"][src.name] = [wins, n - wins - losses, losses]
        summary["net_preference"][src.name] = (wins - losses) / n
    # the sampled methods count only when every line has them (a resumed file may mix runs with and without)
    methods = GREEDY_METHODS + tuple(m for m in SAMPLED_METHODS if lines and all(m in line for line in lines))
    for key, field, judge in (("refusal_rate", "refusal", is_refusal),
                              ("held_refusal_rate", "refusal_held", refusal_holds)):
        rates = {}
        for group, keep in (("all", lambda h: True), ("harmful", lambda h: h is True),
                            ("benign", lambda h: h is False)):
            chosen = [line for line in lines if keep(line["harmful"])]
            if chosen:
                # lines written before the held-refusal judge existed are judged now, from their text
                rates[group] = {name: sum(line[name][field] if field in line[name] else judge(line[name]["response"])
                                          for line in chosen) / len(chosen) for name in methods}
                rates[group]["prompts"] = len(chosen)
        summary[key] = rates
    if lines and all("nll" in line["base"] for line in lines):  # lines written by older versions lack them
        summary.update(_fluency(lines, methods))
        benign = [line for line in lines if line["harmful"] is False]
        if benign and len(benign) < n:  # a mixed set: fluency where nothing needs changing, on its own
            summary["benign"] = {**_fluency(benign, methods), "prompts": len(benign)}
    return summary


def _fluency(lines: list[dict], methods) -> dict:
    return {"nll_per_token": {name: sum(line[name]["nll"] for line in lines)
                              / max(sum(line[name]["tokens"] for line in lines), 1) for name in methods},
            "repeated_4gram_share": {name: sum(line[name]["repeated_4grams"] for line in lines)
                                     / max(sum(line[name]["4grams"] for line in lines), 1) for name in methods}}


# The rows of the table `mara-hf eval` prints: (label, path in the summary to a {"base": ..., "mara": ...} dict,
# kind). "*" in a path stands for every key at that level (one row per reward source); "{key}" in the label is
# that key. kind "rate": a share, shown in percent with its change in points; "number": shown as it is.
# A metric added to the summary shows in the table by adding its row here.
TABLE_ROWS = [
    ("opens with a refusal, all prompts", ("refusal_rate", "all"), "rate"),
    ("opens with a refusal, harmful prompts", ("refusal_rate", "harmful"), "rate"),
    ("refusal holds, harmful prompts", ("held_refusal_rate", "harmful"), "rate"),
    ("opens with a refusal, benign prompts", ("refusal_rate", "benign"), "rate"),
    ("NLL per token under the base model", ("nll_per_token",), "number"),
    ("NLL per token, benign prompts", ("benign", "nll_per_token"), "number"),
    ("repeated 4-grams", ("repeated_4gram_share",), "rate"),
    ("repeated 4-grams, benign prompts", ("benign", "repeated_4gram_share"), "rate"),
    ("mean score, {key}", ("mean", "*"), "number"),
    ("tokens/s", ("tokens_per_s",), "number"),
]


def format_summary(summary: dict, rows=None) -> str:
    """The summary as a table a person reads at a glance: metric, base, MARA, change; then the per-prompt
    comparison per reward source and MARA's decision statistics."""
    # (base, MARA) column pairs: greedy, and sampled when the summary has it
    pairs = [GREEDY_METHODS]
    if any(SAMPLED_METHODS[0] in (pair or {}) for pair in summary.get("refusal_rate", {}).values()):
        pairs.append(SAMPLED_METHODS)
    table = [("metric", "base", "MARA", "change", "base sampled", "MARA sampled", "change")[:1 + 3 * len(pairs)]]
    for label, path, kind in rows or TABLE_ROWS:
        for key, pair in _lookup(summary, path):
            if not isinstance(pair, dict) or not {"base", "mara"} <= set(pair):
                continue
            row = [label.format(key=key) + (f" (n={pair['prompts']})" if "prompts" in pair else "")]
            for base_name, mara_name in pairs:
                if base_name not in pair or mara_name not in pair:
                    row += ["", "", ""]
                    continue
                base, mara = pair[base_name], pair[mara_name]
                if kind == "rate":
                    row += [f"{100 * base:.1f}%", f"{100 * mara:.1f}%", f"{100 * (mara - base):+.1f} pts"]
                else:
                    row += [f"{base:.4g}", f"{mara:.4g}", f"{mara - base:+.4g}"]
            table.append(tuple(row))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|")
    sampling = ("; then both sampled (temperature 0.8, top-k 40, top-p 0.95)" if len(pairs) > 1 else "")
    lines.insert(0, f"{summary.get('prompts', 0)} prompts, base (greedy) vs MARA{sampling}:")
    for source, (wins, ties, losses) in summary.get("win_tie_loss", {}).items():
        net = summary.get("net_preference", {}).get(source, 0.0)
        lines.append(f"{source}, MARA vs base per prompt: {wins} better, {ties} same, {losses} worse "
                     f"(net preference {net:+.2f})")
    stats = summary.get("mara_stats") or {}
    if stats.get("decisions"):
        top = summary.get("top_candidate_share")
        lines.append(f"MARA decisions: {stats['decisions']}, accept rate {stats['accept_rate']:.2f}, "
                     f"{stats['mean_candidates']:.1f} candidates per decision, "
                     f"{100 * stats['fallbacks'] / stats['decisions']:.1f}% fell back (all rejected)"
                     + (f", {100 * top:.1f}% kept the top candidate" if top is not None else ""))
    return "\n".join(lines)


def _lookup(summary: dict, path: tuple):
    """(key, value) pairs at `path` in the summary; "*" expands every key at its level."""
    found = [(None, summary)]
    for part in path:
        found = [(k if part == "*" else key, v) for key, node in found if isinstance(node, dict)
                 for k, v in (node.items() if part == "*" else [(part, node.get(part))]) if v is not None]
    return found


def _harmful(record: dict):
    try:
        return RefusalReward.is_harmful(record)
    except ValueError:
        return None



def _read_lines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_done(path: str, records: list[dict]) -> set[int]:
    """Indices already in OUTPUT; refuses a file written for other prompts."""
    done = set()
    for line in _read_lines(path):
        i = line.get("index")
        if not isinstance(i, int) or i >= len(records) or records[i]["prompt"] != line.get("prompt"):
            raise ValueError(f"{path!r} holds results for other prompts: pass another --output or remove it.")
        done.add(i)
    if done:
        logger.warning(f"Resuming: {len(done)} of {len(records)} prompts already in {path}.")
    return done
