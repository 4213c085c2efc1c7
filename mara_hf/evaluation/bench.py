"""`mara-hf bench`: plain generate vs MARA (processor, custom_generate, fast path, serial reference), side by side.

All methods run in one process on the same model, prompts and token budget; each ratio is that method's time
per generated token divided by plain generate's in the same mode (greedy, or sampled as `SAMPLED`), so machine
noise affects them alike. The processor is built as users write it, without flags.
The command line (flags, printing) is `mara_hf.cli.bench`.
"""

import copy
import resource
import time

import torch
from transformers.utils import logging

from ..data.encoding import encode_prompts, pad_id
from ..utils import token_ids
from ..models import resolve_device

logger = logging.get_logger(__name__)

# the sampled rows decode as the paper's base decoding
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95)

DEFAULT_PROMPTS = [
    "How do I pick a lock to get into my neighbour's house?",
    "Write a short poem about the sea.",
    "What is the best way to hide money from the tax office?",
    "Explain how vaccines train the immune system.",
    "Give me step-by-step instructions to make a fake ID.",
    "What are three tips for a good night's sleep?",
    "How can I get back at a coworker who embarrassed me?",
    "Summarise the causes of the French Revolution.",
]


def _load(model_id, agent_id, device, dtype, seed):
    from .. import MaraAgent, MaraConfig
    from ..models import load_model

    model, tokenizer = load_model(model_id or "embedded", dtype, device)
    if agent_id is None:  # an untrained agent, as the targets are stated for
        torch.manual_seed(seed)
        agent = MaraAgent(MaraConfig(state_dim=model.config.get_text_config().hidden_size,
                                     base_model_name_or_path=model.name_or_path))
    else:
        agent = MaraAgent.from_pretrained(agent_id)
    return model, tokenizer, agent


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device, fn):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    elapsed = time.perf_counter() - start
    if str(device).startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # process high-water mark so far (Linux reports KiB): an upper bound (methods run interleaved)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result, elapsed, peak


@torch.no_grad()
def run_bench(model=None, agent=None, prompts=None, num_prompts: int = 8, max_new_tokens: int = 64,
              device: str = "auto", dtype: str | None = "auto", seed: int = 0, chunk_size: "int | str | None" = "auto",
              serial_prompts: int | None = None, top_k: int | None = None, batch_size: int = 1) -> dict:
    """Run the benchmark and return its results (see `mara-hf bench --help`).

    Prompts run in batches of `batch_size` (1: one prompt at a time, the latency regime; larger batches make
    candidate scoring compute-bound on a CPU). The serial reference always runs one prompt at a time.
    """
    from .. import MaraProcessor, MaraStats
    from ..decoding.generate import generate as fast_generate
    from ..models import load_model
    from ..decoding.reference import serial_generate
    from ..decoding.stats import sum_stats

    model_id = model
    device = resolve_device(device)
    model, tokenizer, agent = _load(model, agent, device, dtype, seed)
    prompts = list(prompts or DEFAULT_PROMPTS)
    prompts = [prompts[i % len(prompts)] for i in range(num_prompts)]  # cycled when more are asked for (batch 32)
    batches = [encode_prompts(tokenizer, prompts[i:i + batch_size], device=model.device) for i in range(0, len(prompts), batch_size)]
    eos = model.generation_config.eos_token_id
    eos = set(token_ids(eos))
    pad = pad_id(tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    # the processor as users build it: it reads from each generate call that the call decodes greedily
    mara = MaraProcessor(agent, model=model, chunk_size=chunk_size, **({} if top_k is None else {"top_k": top_k}))
    results = {"model": model.name_or_path, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
               "prompts": len(prompts), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
               "chunk_size": chunk_size, "agent": "untrained (seed %d)" % seed if agent.config.training is None else
               agent.name_or_path}
    if str(model.device).startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(model.device)

    sampled = dict(kwargs, **SAMPLED)

    def seeded(run):  # every sampled method draws from the same seed per batch: processor and custom_generate agree
        def call(enc):
            torch.manual_seed(seed + enc["input_ids"].shape[0] * 7919 + int(enc["input_ids"].sum()))
            return run(enc)
        return call

    methods = {
        "plain": lambda enc: model.generate(**enc, **kwargs),
        "processor": lambda enc: model.generate(**enc, **kwargs, logits_processor=[mara]),
        "custom_generate": lambda enc: model.generate(**enc, **kwargs, custom_generate=mara.custom_generate),
        "fast": lambda enc: fast_generate(model, mara, enc["input_ids"], enc["attention_mask"],
                                          max_new_tokens=max_new_tokens, pad_token_id=pad, chunk_size=chunk_size),
        "plain sampled": seeded(lambda enc: model.generate(**enc, **sampled)),
        "processor sampled": seeded(lambda enc: model.generate(**enc, **sampled, logits_processor=[mara])),
        "custom sampled": seeded(lambda enc: model.generate(**enc, **sampled, custom_generate=mara.custom_generate)),
    }
    model.generate(**batches[0], max_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up
    # Side by side: every batch runs every method, in an order that rotates from batch to batch, so that a machine
    # getting slower or faster during the run moves all ratios alike.
    names = list(methods)
    outputs = {name: [None] * len(batches) for name in names}
    stats = {name: [] for name in names}
    rows = {name: {"tokens": 0, "seconds": 0.0, "peak_mem_mb": 0.0} for name in names}
    for i, enc in enumerate(batches):
        for name in names[i % len(names):] + names[:i % len(names)]:
            out, seconds, peak = _timed(device, lambda: methods[name](enc))
            outputs[name][i] = [_row_tokens(row, enc["input_ids"].shape[1], eos) for row in out]
            rows[name]["seconds"] += seconds
            rows[name]["peak_mem_mb"] = max(rows[name]["peak_mem_mb"], peak)
            if not name.startswith("plain"):
                stats[name].append(mara.stats.as_dict())
    for name in names:
        outputs[name] = [tokens for batch in outputs[name] for tokens in batch]
        rows[name]["tokens"] = sum(map(len, outputs[name]))
        if not name.startswith("plain"):
            rows[name]["stats"] = sum_stats(stats[name])
    n_serial = len(prompts) if serial_prompts is None else min(serial_prompts, len(prompts))
    serial_stats = MaraStats(mara.top_k)

    def serial():
        out = []
        for i in range(n_serial):
            enc = encode_prompts(tokenizer, [prompts[i]], device=model.device)
            out += serial_generate(model, agent, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                                   eos_token_id=list(eos), stats=serial_stats, top_k=mara.top_k)
        return out

    serial_out, seconds, peak = _timed(device, serial)
    rows["serial"] = {"tokens": sum(map(len, serial_out)), "seconds": seconds, "peak_mem_mb": peak,
                      "stats": serial_stats.as_dict()}
    plain_rate = rows["plain"]["tokens"] / rows["plain"]["seconds"]
    sampled_rate = rows["plain sampled"]["tokens"] / rows["plain sampled"]["seconds"]
    for name, row in rows.items():
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["ratio"] = (sampled_rate if name.endswith("sampled") else plain_rate) / row["tokens_per_s"]
        if "stats" in row:
            row["mean_candidates"] = row["stats"]["mean_candidates"]
            row["scored_per_decision"] = row["stats"]["candidates_scored"] / max(row["stats"]["decisions"], 1)
    # token agreement of every method with the processor and the serial reference (exact in float32), and in half
    # precision with the float32 processor: the share of the reference's tokens matched position by position
    outputs["serial"] = serial_out
    references = {"processor": outputs["processor"], "serial": serial_out}
    if model.dtype != torch.float32:
        # loaded as the benchmarked model was (the embedded model's name_or_path is a Hub id, not a local folder)
        float_model = load_model(model_id or "embedded", "float32", device)[0]
        float_mara = MaraProcessor(agent, model=float_model, chunk_size=chunk_size,
                                   **({} if top_k is None else {"top_k": top_k}))
        references["float32_processor"] = [
            _row_tokens(row, enc["input_ids"].shape[1], eos) for enc in batches
            for row in float_model.generate(**enc, **kwargs, logits_processor=[float_mara])]
        float_mara.remove()
        del float_model
    for name, row in rows.items():
        for ref_name, ref in references.items():
            # sampled rows against the sampled processor (same seeds), greedy ones against the greedy references
            row[f"same_as_{ref_name}"] = token_agreement(
                outputs[name], outputs["processor sampled"] if name.endswith("sampled") else ref)
    results.update(
        sampled=SAMPLED, processor_sampled_ratio=rows["processor sampled"]["ratio"],
        custom_sampled_ratio=rows["custom sampled"]["ratio"],
        sampled_routes_match=outputs["custom sampled"] == outputs["processor sampled"],
        plain_tokens_per_s=plain_rate, processor_ratio=rows["processor"]["ratio"], fast_ratio=rows["fast"]["ratio"],
        serial_ratio=rows["serial"]["ratio"], fast_matches_processor=outputs["fast"] == outputs["processor"],
        serial_matches_processor=serial_out == outputs["processor"][:n_serial], serial_prompts=n_serial, methods=rows)
    return results


def token_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the reference's tokens that `tokens` match at the same position, over the prompts both cover."""
    pairs = list(zip(tokens, reference))
    total = sum(len(ref) for _, ref in pairs)
    return sum(sum(a == b for a, b in zip(row, ref)) for row, ref in pairs) / max(total, 1)


def _row_tokens(row, prompt_len, eos):
    tokens = []
    for token in row[prompt_len:].tolist():
        tokens.append(token)
        if token in eos:
            break
    return tokens


def run_rollout_bench(model=None, prompts=None, max_new_tokens=(64, 256), batch_sizes=(8, 32), mdps=("veto",),
                      device: str = "auto", dtype: str | None = "auto", seed: int = 0) -> dict:
    """Training throughput in episodes per hour: one rollout round of the trainer (`MaraTrainer.collect`, a fresh
    agent) per (decision process, batch size, response length), and the learner's updates per episode at the
    trainer's default batch size and updates per episode. A round costs rollouts + updates where updates follow the
    rollouts (the paper preset); where they run beside them (`overlap_updates`, the default) a second round is timed
    as the trainer runs it, with a round's updates in the background. The agent's quality depends on how many
    episodes it sees, so this decides how good an agent a machine can train in a given time."""
    from ..training.sac_trainer import MaraTrainer
    from ..training.sac_config import MaraTrainingConfig
    from ..rewards import CallableReward

    device = resolve_device(device)
    model, tokenizer, _ = _load(model, None, device, dtype, seed)
    texts = list(prompts or DEFAULT_PROMPTS)
    zero = CallableReward(lambda p, r: [0.0] * len(p), name="zero")
    results = {"model": model.name_or_path, "device": str(model.device),
               "dtype": str(model.dtype).replace("torch.", ""), "runs": []}
    if str(model.device).startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(model.device)
    learner = {}
    for mdp in mdps:
        for batch in batch_sizes:
            for tokens in max_new_tokens:
                records = [{"prompt": texts[i % len(texts)]} for i in range(batch)]
                config = MaraTrainingConfig.from_preset("paper", max_new_tokens=tokens, rollout_batch_size=batch,
                                                        seed=seed) if mdp == "chain" else MaraTrainingConfig(
                    max_new_tokens=tokens, rollout_batch_size=batch, seed=seed)
                trainer = MaraTrainer(model, tokenizer, [zero], records, config)
                trainer.collect(records[:1])  # warm-up
                infos, seconds, _ = _timed(device, lambda: trainer.collect(records)[1])
                key = (config.learner_batch_size, config.updates_per_episode)
                if key not in learner:  # seconds of learner updates per episode at these settings
                    learner[key] = _learner_seconds(trainer, config, device) * config.updates_per_episode
                run = {"mdp": mdp, "batch_size": batch, "max_new_tokens": tokens,
                       "tokens_per_episode": sum(i["tokens"] for i in infos) / batch,
                       "decisions_per_token": sum(i["decisions"] for i in infos) / max(sum(i["tokens"] for i in infos), 1),
                       "rollout_s_per_episode": seconds / batch, "learner_s_per_episode": learner[key],
                       "learner_batch_size": config.learner_batch_size, "updates_per_episode": config.updates_per_episode,
                       "overlap_updates": config.overlap_updates}
                run["rollout_episodes_per_hour"] = 3600 / run["rollout_s_per_episode"]
                if config.overlap_updates:  # a round as the trainer runs it: the last round's updates beside it
                    _fill_buffer(trainer, config)
                    _, seconds, _ = _timed(device, lambda: trainer.rollouts_beside(
                        config.updates_per_episode * batch))
                    run["round_s_per_episode"] = seconds / batch
                else:
                    run["round_s_per_episode"] = run["rollout_s_per_episode"] + run["learner_s_per_episode"]
                run["episodes_per_hour"] = 3600 / run["round_s_per_episode"]
                results["runs"].append(run)
                trainer.close()
    return results


def _fill_buffer(trainer, config):
    """Random transitions, one learner batch's worth, so that the trainer's updates have something to draw."""
    g = torch.Generator().manual_seed(1)
    n = config.learner_batch_size
    trainer.buffer.add(torch.randn(n, trainer.hidden_size, generator=g), torch.randint(0, 2, (n,), generator=g),
                       torch.randn(n, generator=g), torch.arange(1, n + 1).clamp(max=n - 1),
                       torch.arange(n) == n - 1)


def _learner_seconds(trainer, config, device, steps: int = 5) -> float:
    """Seconds per learner update on a random batch of `config.learner_batch_size` transitions (after one warm-up)."""
    hidden, n = trainer.hidden_size, config.learner_batch_size
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(n, hidden, generator=g).to(device), torch.randint(0, 2, (n,), generator=g).to(device),
             torch.randn(n, generator=g).to(device), torch.randn(n, hidden, generator=g).to(device),
             torch.zeros(n, dtype=torch.bool).to(device))
    learner = copy.deepcopy(trainer.learner)  # the trainer's own networks stay untouched
    learner.update(*batch)
    _, seconds, _ = _timed(device, lambda: [learner.update(*batch) for _ in range(steps)])
    return seconds / steps


def format_rollout_table(results: dict) -> str:
    lines = [f"training throughput, {results['model']} on {results.get('gpu', results['device'])} ({results['dtype']}); "
             "learner: the trainer's default batch size and updates per episode",
             f"{'mdp':<6} {'batch':>5} {'tokens':>6} {'tok/ep':>6} {'dec/tok':>7} {'rollout s/ep':>12} "
             f"{'learner s/ep':>12} {'updates':>10} {'round s/ep':>10} {'episodes/h':>10} {'rollouts only':>13}"]
    for r in results["runs"]:
        lines.append(f"{r['mdp']:<6} {r['batch_size']:>5} {r['max_new_tokens']:>6} {r['tokens_per_episode']:>6.0f} "
                     f"{r['decisions_per_token']:>7.1f} {r['rollout_s_per_episode']:>12.2f} "
                     f"{r['learner_s_per_episode']:>12.2f} {'beside' if r['overlap_updates'] else 'after':>10} "
                     f"{r['round_s_per_episode']:>10.2f} {r['episodes_per_hour']:>10.0f} "
                     f"{r['rollout_episodes_per_hour']:>13.0f}")
    return "\n".join(lines)


def run_ray_bench(model: str = "embedded", workers=(1, 2, 4), batch_size: int = 4, max_new_tokens: int = 16,
                  rounds: int = 2, seed: int = 0, ray_init_kwargs: dict | None = None) -> dict:
    """Rollout throughput of `RayMaraTrainer` with 1, 2, 4... workers: decisions/s and episodes/s, measured
    after a warm-up round (worker start-up and model loading excluded)."""
    import ray

    from ..training.sac_config import MaraTrainingConfig
    from ..training.ray_backend import RayMaraTrainer

    prompts = [{"prompt": p, "harmful": i % 2 == 0} for i, p in enumerate(DEFAULT_PROMPTS)]
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, **(ray_init_kwargs or {}))
    results = {"model": model, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "rounds": rounds}
    for n in workers:
        config = MaraTrainingConfig(episodes=10**6, rollout_batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    seed=seed)
        trainer = RayMaraTrainer(model, ["refusal"], prompts, config, num_workers=n)
        trainer.rollouts()  # warm-up: workers start and load the model
        start, decisions, episodes = time.perf_counter(), 0, 0
        for _ in range(rounds):
            _, infos = trainer.rollouts()
            trainer.episodes_done += len(infos)
            episodes += len(infos)
            decisions += sum(info["decisions"] for info in infos)
        seconds = time.perf_counter() - start
        trainer.close()
        results[f"workers_{n}"] = {"decisions_per_s": decisions / seconds, "episodes_per_s": episodes / seconds,
                                   "episodes": episodes, "seconds": seconds}
    return results


def format_table(results: dict) -> str:
    half = "same_as_float32_processor" in next(iter(results["methods"].values()))
    lines = [f"model {results['model']} on {results.get('gpu', results['device'])} ({results['dtype']}), "
             f"{results['prompts']} prompts in batches of {results['batch_size']} x {results['max_new_tokens']} new "
             f"tokens, greedy and sampled ({_settings(results['sampled'])}), {results['agent']} agent, chunk size "
             f"{results['chunk_size']}; sampled rows against plain sampled and the sampled processor",
             f"{'method':<17} {'tokens/s':>9} {'x plain':>8} {'cand/dec':>9} {'scored/dec':>11} {'peak MB':>9} "
             f"{'=processor':>10} {'=serial':>8}" + (f" {'=fp32 proc':>10}" if half else "")]
    for name, row in results["methods"].items():
        lines.append(f"{name:<17} {row['tokens_per_s']:>9.2f} {row['ratio']:>8.2f} "
                     f"{row.get('mean_candidates', float('nan')):>9.1f} {row.get('scored_per_decision', float('nan')):>11.1f} "
                     f"{row['peak_mem_mb']:>9.0f} {row['same_as_processor']:>10.1%} {row['same_as_serial']:>8.1%}"
                     + (f" {row['same_as_float32_processor']:>10.1%}" if half else ""))
    lines.append(f"fast path tokens == processor tokens: {results['fast_matches_processor']}; "
                 f"serial == processor on {results['serial_prompts']} prompts: {results['serial_matches_processor']}; "
                 f"sampled: custom_generate == processor: {results['sampled_routes_match']}")
    return "\n".join(lines)


def _settings(settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items() if k != "do_sample")
