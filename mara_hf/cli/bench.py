"""`mara-hf bench`: its flags and the command; what it measures is `mara_hf.evaluation.bench`."""

import argparse
import json
import sys

from transformers.utils import logging

from .arguments import DEVICE_HELP, DTYPES, add_command
from .options import Renamed

logger = logging.get_logger(__name__)


def _chunk(text: str):
    """--chunk-size: "auto", "all" (one forward for the whole candidate set: chunk_size=None) or a count >= 1."""
    if text in ("auto", "all"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, all or a count >= 1, got {text!r}") from None
    if value == 0:  # the earlier spelling of "all"
        logger.warning("--chunk-size 0 is deprecated: use --chunk-size all (one forward for every candidate).")
        return "all"
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto, all or a count >= 1, got {value}")
    return value


def add_parser(commands):
    p = add_command(commands, "bench")
    p.add_argument("--model", help="Hub id or folder of a causal LM (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--agent", help="agent id or folder (default: an untrained agent, seed --seed)")
    p.add_argument("--num-prompts", type=int, default=8, metavar="N",
                   help="number of prompts (default 8; the 8 built-in ones are cycled for more)")
    p.add_argument("--prompts", type=int, dest="num_prompts", metavar="N", default=argparse.SUPPRESS, action=Renamed,
                   new="--num-prompts", why="--prompts names a prompt set in every other command")
    p.add_argument("--max-new-tokens", type=int, nargs="+", default=None,
                   help="new tokens per response (default 64; with --rollouts several lengths, default 64 256; "
                        "with --ray-workers, default 16)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype to load the model in; auto: bfloat16 on a GPU that supports it (float16 on older GPUs), "
                        "float32 on a CPU; in half precision every method's tokens are also compared with those of a "
                        "float32 processor (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the untrained agent's weights, and of the training settings with --rollouts or "
                        "--ray-workers (default: %(default)s)")
    p.add_argument("--chunk-size", type=_chunk, default="auto",
                   help="candidates scored per forward: N, all (the whole set at once) or auto (default: at batch 1, the "
                        "first chunk of least expected cost over the call's decisions so far; in batches 1, 2, 4...)")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="prompts decoded together (default 1; with --rollouts several sizes, default 8 32; with "
                        "--ray-workers, default 4)")
    p.add_argument("--serial-prompts", type=int,
                   help="run the slow serial reference on only this many prompts (default: all)")
    p.add_argument("--rollouts", action="store_true",
                   help="measure training throughput instead: episodes per hour, per --batch-size x --max-new-tokens")
    p.add_argument("--mdp", nargs="+", choices=["veto", "chain"], default=["veto"],
                   help="with --rollouts: decision processes to measure (chain: the paper preset's rollouts) "
                        "(default: veto)")
    p.add_argument("--ray-workers", type=int, nargs="+", metavar="N",
                   help="measure Ray rollout throughput with these worker counts instead (e.g. 1 2 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_main)
    return p


def _main(args) -> int:
    from ..evaluation.bench import format_rollout_table, format_table, run_bench, run_ray_bench, run_rollout_bench

    if args.rollouts:
        results = run_rollout_bench(model=args.model, max_new_tokens=args.max_new_tokens or (64, 256),
                                    batch_sizes=args.batch_size or (8, 32), mdps=args.mdp, device=args.device,
                                    dtype=args.dtype, seed=args.seed)
        print(json.dumps(results) if args.json else format_rollout_table(results))
        return 0
    for name in ("max_new_tokens", "batch_size"):
        if len(getattr(args, name) or [0]) > 1:
            raise ValueError(f"--{name.replace('_', '-')} takes one value (several only with --rollouts).")
    for name, values in (("num-prompts", [args.num_prompts]), ("max-new-tokens", args.max_new_tokens or []),
                         ("batch-size", args.batch_size or []), ("ray-workers", args.ray_workers or [])):
        if any(v < 1 for v in values):
            raise ValueError(f"--{name} must be >= 1, got {min(values)}.")
    max_new_tokens = args.max_new_tokens[0] if args.max_new_tokens else 64
    batch_size = args.batch_size[0] if args.batch_size else 1
    if args.ray_workers:
        results = run_ray_bench(model=args.model or "embedded", workers=args.ray_workers,
                                batch_size=batch_size if batch_size > 1 else 4,
                                max_new_tokens=args.max_new_tokens[0] if args.max_new_tokens else 16, seed=args.seed)
        print(json.dumps(results) if args.json else "\n".join(
            f"{k}: {v['decisions_per_s']:.1f} decisions/s, {v['episodes_per_s']:.2f} episodes/s"
            for k, v in results.items() if k.startswith("workers_")))
        return 0
    results = run_bench(model=args.model, agent=args.agent, num_prompts=args.num_prompts,
                        max_new_tokens=max_new_tokens, device=args.device, dtype=args.dtype, seed=args.seed,
                        chunk_size=None if args.chunk_size == "all" else args.chunk_size, serial_prompts=args.serial_prompts,
                        batch_size=batch_size)
    print(json.dumps(results) if args.json else format_table(results))
    sys.stdout.flush()
    return 0
