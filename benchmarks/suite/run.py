"""The training suite: every training path on every task, judged on held-out prompts by its frontier.

    python -m benchmarks.suite                      # the held-out tasks, every path (the table in docs/training.md)
    python -m benchmarks.suite --tasks tune         # the tasks settings are chosen on
    python -m benchmarks.suite --quick              # two held-out tasks, smaller runs (what CI runs)
    python -m benchmarks.suite --tasks smollm2      # SmolLM2-135M with real scorers (smollm2.py; hours on a CPU)
    python -m benchmarks.suite --tasks tune --set sample_temperature=0.5   # a setting tried before it is a default

Per task and path: a fresh agent trained as a user would run it, only size settings given (prompts, response length,
samples, episodes), then `mara_hf.evaluation.frontier` on prompts no run saw: reward gain over the LLM's greedy
answers, its share of best-of-16's gain and of the computed best agent's (`tasks.oracle`), NLL per token against
that of best-of-16's picks, KL per token, accept rate, decoding time against plain `generate`, training seconds and
the verdict. Results go to `--output` (one JSON line per task and path) and the table is printed with the run time.
"""

import argparse
import json
import os
import tempfile
import time

import torch

from mara_hf.evaluation.frontier import frontier
from mara_hf.rewards import CallableReward

from .smollm2 import QUICK_SIZES, REWARD_MODEL, SIZES, SMOLLM2, run_smol_task
from .tasks import HELD_OUT, QUICK, TUNE, oracle, prompts, tiny_tokenizer

METHODS = ("reward-chosen", "sac", "pairs")
FULL = dict(train_prompts=48, held_out=24, tokens=12, samples=8, episodes=300, pair_draws=4)
SMALL = dict(train_prompts=24, held_out=12, tokens=10, samples=4, episodes=120, pair_draws=4)


def train(method: str, rewards, model, tokenizer, records, sizes: dict, output_dir: str, seed: int = 0,
          settings: dict | None = None):
    """A fresh agent for `rewards` (reward sources) by `method`, only the size settings given (and `settings`, the
    method's config fields that `--set` changes when choosing settings on the tune tasks)."""
    settings = settings or {}
    if method == "reward-chosen":
        from mara_hf import ImitationConfig, ImitationTrainer

        config = ImitationConfig(**{"samples": sizes["samples"], "response_tokens": sizes["tokens"], **settings})
        return ImitationTrainer(model, tokenizer, records, config, output_dir=output_dir, rewards=rewards).train()
    if method == "sac":
        from mara_hf import MaraTrainer, MaraTrainingConfig

        config = MaraTrainingConfig(**{"episodes": sizes["episodes"], "max_new_tokens": sizes["tokens"],
                                       "checkpoint_every": 10 ** 6, **settings})
        trainer = MaraTrainer(model, tokenizer, rewards, records, config, output_dir=output_dir)
        return trainer.train()
    if method == "pairs":
        from mara_hf import ImitationConfig, ImitationTrainer

        config = ImitationConfig(**{"response_tokens": sizes["tokens"], **settings})
        pairs = draw_pairs(rewards, model, tokenizer, records, sizes, seed)
        return ImitationTrainer(model, tokenizer, [], config, output_dir=output_dir, pairs=pairs).train()
    raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}")


@torch.no_grad()
def draw_pairs(rewards, model, tokenizer, records, sizes, seed: int) -> list[dict]:
    """Preference pairs as a dataset would hold them: per prompt, of `pair_draws` LLM samples (T 1.0) the one the
    rewards score highest (chosen) and lowest (rejected); prompts whose draws tie are left out."""
    from mara_hf.data.encoding import encode_prompts
    from mara_hf.rewards import combine

    n = sizes["pair_draws"]
    texts = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        step = sizes.get("draw_batch") or len(records)  # the tiny tasks draw every prompt in one call
        for start in range(0, len(records), step):
            enc = encode_prompts(tokenizer, [r["prompt"] for r in records[start:start + step]], device=model.device)
            out = model.generate(**enc, max_new_tokens=sizes["tokens"], do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    owners = [i for i in range(len(records)) for _ in range(n)]
    scores = combine(rewards, [records[i]["prompt"] for i in owners], texts, [records[i] for i in owners])[0]
    pairs = []
    for i, record in enumerate(records):
        rows = range(i * n, (i + 1) * n)
        best, worst = max(rows, key=lambda j: scores[j]), min(rows, key=lambda j: scores[j])
        if scores[best] > scores[worst]:
            pairs.append({"prompt": record["prompt"], "chosen": texts[best], "rejected": texts[worst]})
    return pairs


def run_task(task, method: str, sizes: dict, work: str, settings: dict | None = None) -> dict:
    model, tokenizer = task.model(), tiny_tokenizer()
    records = prompts(sizes["train_prompts"] + sizes["held_out"], seed=100 + task.seed)
    train_set, held_out = records[:sizes["train_prompts"]], records[sizes["train_prompts"]:]
    torch.manual_seed(0)
    started = time.perf_counter()
    reward = CallableReward(task.reward, name=task.family)
    agent = train(method, [reward], model, tokenizer, train_set, sizes, os.path.join(work, task.name, method),
                  seed=task.seed, settings=settings)
    seconds = time.perf_counter() - started
    report = frontier(model, tokenizer, agent, held_out, [reward], max_new_tokens=sizes["tokens"], samples=16,
                      batch_size=len(held_out))
    best = oracle(task, model, tokenizer, held_out, sizes["tokens"], agent.config.top_k)
    gap = best - report["base"]["reward"]
    return {"task": task.name, "method": method, "train_seconds": seconds, "oracle": best,
            "share_of_oracle": report["gain"] / gap if gap > 0 else None, **report}


def parse_settings(method: str, pairs: list[str]) -> dict:
    """`FIELD=VALUE` strings as the fields of `method`'s config that have them, each value read as its field's
    type; a field no path's config has is an error."""
    import dataclasses

    from mara_hf import ImitationConfig, MaraTrainingConfig

    configs = {"reward-chosen": ImitationConfig, "pairs": ImitationConfig, "sac": MaraTrainingConfig}
    known = {f.name for c in set(configs.values()) for f in dataclasses.fields(c)}
    defaults = configs[method]()
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes FIELD=VALUE, got {pair!r}")
        if name not in known:
            raise SystemExit(f"--set: no config has a field {name!r}")
        if not hasattr(defaults, name):
            continue  # another path's field
        default = getattr(defaults, name)
        kind = type(default) if default is not None else str
        if kind not in (bool, int, float, str):
            raise SystemExit(f"--set takes fields of one number, word or flag; {name!r} is a {kind.__name__}")
        out[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def table(rows: list[dict]) -> str:
    header = ("task", "path", "gain", "of best-of-16", "of best", "NLL", "NLL best-of-16", "KL/token", "accept",
              "time", "train s", "verdict")
    out = [header]
    for r in rows:
        share = r.get("share_of_best_of")
        oracle_share = r.get("share_of_oracle")
        out.append((r["task"], r["method"], f"{r['gain']:+.3f}", "" if share is None else f"{100 * share:.0f}%",
                    "" if oracle_share is None else f"{100 * oracle_share:.0f}%", f"{r['mara']['nll_per_token']:.2f}",
                    f"{r['best_of_16']['nll_per_token']:.2f}", f"{r['mara']['kl_per_token']:.3f}",
                    f"{r['mara']['accept_rate']:.2f}", f"{r['mara']['time_ratio']:.2f}x", f"{r['train_seconds']:.0f}",
                    r["verdict"]))
    widths = [max(len(row[i]) for row in out) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) if i < 2 or i == len(row) - 1 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) + " |" for row in out]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per path: on how many tasks it reached half of best-of-16's gain within the fluency bound."""
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ok = sum((r.get("share_of_best_of") or 0) >= 0.5 and r["verdict"] == "gain" for r in mine)
        lines.append(f"{method}: at least half of best-of-16's gain, as fluent as its picks, on {ok} of {len(mine)} "
                     "tasks")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", choices=("held-out", "tune", "all", "smollm2"), default="held-out",
                        help="which tasks: the tiny-model held-out ones (reported), those settings are chosen on, "
                             "both, or the SmolLM2 tasks with real scorers (benchmarks/suite/smollm2.py; slow)")
    parser.add_argument("--smollm2-tasks", nargs="+", choices=[t.name for t in SMOLLM2],
                        default=[t.name for t in SMOLLM2], help="with --tasks smollm2: which of its tasks")
    parser.add_argument("--reward-model", default=REWARD_MODEL,
                        help="with --tasks smollm2: the folder of the hh-rm task's reward model (python -m "
                             "benchmarks.suite.reward_model makes it; default: %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="training paths to run")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="config fields of the paths' configs (ImitationConfig for reward-chosen and pairs, "
                             "MaraTrainingConfig for sac) changed from their defaults, e.g. sample_temperature=0.5: "
                             "how settings are compared on the tune tasks before they become defaults")
    parser.add_argument("--quick", action="store_true", help="two held-out tasks with smaller runs (CI's version)")
    parser.add_argument("--output", default=None, help="JSON lines of the results (default: a temporary folder)")
    args = parser.parse_args(argv)
    settings = {method: parse_settings(method, args.set) for method in args.methods}
    smol = args.tasks == "smollm2"
    if smol:
        tasks = [t for t in SMOLLM2 if t.name in args.smollm2_tasks]
        sizes = QUICK_SIZES if args.quick else SIZES
    else:
        tasks = QUICK if args.quick else {"held-out": HELD_OUT, "tune": TUNE, "all": TUNE + HELD_OUT}[args.tasks]
        sizes = SMALL if args.quick else FULL
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as work:
        output = args.output or os.path.join(work, "suite.jsonl")
        for task in tasks:
            for method in args.methods:
                rows.append(run_smol_task(task, method, sizes, work, args.reward_model, settings[method]) if smol
                            else run_task(task, method, sizes, work, settings[method]))
                with open(output, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    print(summary(rows))
    print(f"{len(tasks)} tasks x {len(args.methods)} paths in {(time.perf_counter() - started) / 60:.1f} min "
          f"(sizes: {sizes})")
    return 0
