"""`mara-hf <command>`: the command-line entry point and the commands. Their flags, each with its help, are in
`arguments` (train's and imitate's settings built from their config dataclasses by `options`) and `bench`."""

import argparse
import sys

from transformers.utils import logging

from ..models import load_model
from . import bench
from .arguments import (PROMPTS_EPILOG, add_command, add_with_prompts, convert_arguments, demo_arguments,
                        eval_arguments, imitate_arguments, train_arguments)

__all__ = ["PROMPTS_EPILOG", "build_parser", "main"]

logger = logging.get_logger("mara_hf")


def _convert(args) -> int:
    from ..agent.convert import convert_actor

    output = args.output or f"mara-agent-{args.base_model.rstrip('/').split('/')[-1]}"
    agent = convert_actor(args.actor, args.base_model, output_dir=output, base_model_revision=args.revision,
                          paper_training_facts=args.paper_training_facts)
    print(f"Saved the agent (state_dim {agent.config.state_dim}) to {output}")
    if args.push_to_hub:
        commit = agent.push_to_hub(args.push_to_hub, private=args.private)
        print(f"Pushed to {args.push_to_hub}: {getattr(commit, 'commit_url', commit)}")
    return 0


def _reward_model_kwargs(args) -> dict:
    """How reward models format (prompt, response): their chat template, or --reward-template."""
    if args.reward_batch_size < 1:
        raise ValueError(f"--reward-batch-size must be at least 1, got {args.reward_batch_size}.")
    kwargs = {"use_chat_template": not args.reward_template, "batch_size": args.reward_batch_size,
              "device": args.reward_device, "dtype": args.reward_dtype}
    if args.reward_template:
        kwargs["template"] = args.reward_template.encode().decode("unicode_escape")  # allow \n in the shell
    if getattr(args, "guard_verdict_prefix", None) is not None:
        kwargs["verdict_prefix"] = args.guard_verdict_prefix.encode().decode("unicode_escape")
    return kwargs


def _load_llm(args, device):
    """The LLM and its tokenizer, placed as the command's --device / --dtype / --device-map / --load-in-4bit say."""
    return load_model(args.model, args.dtype, device, device_map=args.device_map, load_in_4bit=args.load_in_4bit)


def _check_placement(args, device):
    """Placement flags that do not go together, refused before anything loads."""
    if args.device_map and device not in (None, "auto"):
        raise ValueError(f"Give --device ({device}) or --device-map ({args.device_map}), not both.")
    if getattr(args, "backend", "local") == "ray" and (args.device_map or args.load_in_4bit):
        raise ValueError("--device-map and --load-in-4bit load the LLM in this process; with --backend ray each "
                         "worker loads its own copy on --device (give workers GPUs with --worker-gpus).")


def _train(args) -> int:
    from ..training.sac_trainer import MaraTrainer, checkpoints
    from ..training.sac_config import MaraTrainingConfig
    from ..data.prompts import load_prompts, parse_prompt_spec
    from ..rewards import parse_reward_spec

    # only the flags given on the command line: they override the preset's values, which override the defaults
    given = {name: getattr(args, name) for name in MaraTrainingConfig.field_names() if hasattr(args, name)}
    preset = given.pop("preset", None)
    config = MaraTrainingConfig.from_preset(preset, **given) if preset else MaraTrainingConfig(**given)
    # Everything that can be checked without the LLM is checked first: a bad spec fails in seconds.
    prompts = load_prompts(args.prompts, split=args.split, column=args.column, limit=args.limit)
    data_names = [parse_prompt_spec(spec, args.split, args.column, args.limit).name for spec in args.prompts]
    rewards = [parse_reward_spec(spec, **_reward_model_kwargs(args)) for spec in args.reward]
    for source in rewards:
        source.check()
    if args.drop_replay_buffer and not args.resume:
        raise ValueError("--drop-replay-buffer applies only with --resume.")
    if args.resume and not checkpoints(args.output):
        logger.warning(f"--resume: no checkpoint in {args.output!r} yet, starting from scratch.")
    elif not args.resume and checkpoints(args.output):
        raise ValueError(f"{args.output!r} already holds checkpoints: pass --resume to continue, or another --output.")
    _check_placement(args, config.device)
    if args.backend == "ray":
        _need_ray()
        from ..training.ray_backend import RayMaraTrainer

        trainer = RayMaraTrainer(args.model, args.reward, prompts, config, output_dir=args.output,
                                 data_name=data_names, num_workers=args.num_workers, worker_gpus=args.worker_gpus,
                                 ray_address=args.ray_address, dtype=args.dtype, device=config.device,
                                 reward_kwargs=_reward_model_kwargs(args), reward_workers=args.reward_workers)
    else:
        model, tokenizer = _load_llm(args, config.device)
        trainer = MaraTrainer(model, tokenizer, rewards, prompts, config, output_dir=args.output,
                              data_name=data_names)
    agent = trainer.train(resume=args.resume, drop_replay_buffer=args.drop_replay_buffer)
    print(f"Trained for {trainer.episodes_done} episodes; agent saved to {args.output}/agent")
    if args.push_to_hub:
        agent.push_to_hub(args.push_to_hub)
        print(f"Pushed to {args.push_to_hub}")
    return 0


def _need_ray():
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ValueError("--backend ray needs Ray: pip install 'mara-hf[ray]'")


# imitate flags that only mean something with --reward
REWARD_CHOSEN_FLAGS = ("samples", "sample_temperature", "margin", "rounds", "response_tokens", "steered_weight",
                       "credit")
# ... of which these also apply to --pairs
PAIRS_FLAGS = ("response_tokens", "steered_weight")


def _imitate(args) -> int:
    from ..training.imitation_config import ImitationConfig
    from ..training.imitation_trainer import ImitationTrainer
    from ..data.prompts import load_prompts, parse_prompt_spec

    from ..rewards import parse_reward_spec

    config = ImitationConfig(**{name: getattr(args, name) for name in ImitationConfig.field_names()
                                if hasattr(args, name)})
    # Everything that can be checked without the LLM is checked first: a bad spec fails in seconds.
    rewards = [parse_reward_spec(spec, **_reward_model_kwargs(args)) for spec in args.reward or []]
    for source in rewards:
        source.check()
    # --response-tokens and --steered-weight also shape what preference pairs teach
    unused = [n for n in REWARD_CHOSEN_FLAGS if hasattr(args, n) and not (args.pairs and n in PAIRS_FLAGS)]
    if not rewards and unused:
        given = ", ".join("--" + n.replace("_", "-") for n in unused)
        raise ValueError(f"{given} choose demonstrations by a reward: give one with --reward SPEC"
                         + (" (with --pairs, only --response-tokens and --steered-weight apply)." if args.pairs else "."))
    if bool(args.prompts) == bool(args.pairs):
        raise ValueError("Give the prompts to demonstrate (--prompts SPEC) or preference pairs (--pairs SPEC), "
                         "one of the two.")
    pairs = None
    if args.pairs:
        from ..data.pairs import load_pairs

        if rewards:
            raise ValueError("--pairs teaches what the pairs prefer: leave out --reward.")
        pairs = load_pairs(args.pairs, split=args.split, limit=args.limit)
        prompts, data_names = [], list(args.pairs)
    else:
        prompts = load_prompts(args.prompts, split=args.split, column=args.column, limit=args.limit)
        data_names = [parse_prompt_spec(spec, args.split, args.column, args.limit).name for spec in args.prompts]
    added = load_prompts(args.add_prompts, split=args.split, column=args.column) if args.add_prompts else None
    data_names += [parse_prompt_spec(spec, args.split, args.column, None).name for spec in args.add_prompts or []]
    if args.backend == "ray" and not rewards:
        raise ValueError("--backend ray draws the responses of --reward on Ray workers: give --reward SPEC, or leave "
                         "out --backend.")
    _check_placement(args, config.device)
    drawer = None
    if args.backend == "ray":
        _need_ray()
        from ..training.ray_backend import RayDrawer

        drawer = RayDrawer(args.model, args.reward, config, num_workers=args.num_workers,
                           worker_gpus=args.worker_gpus, ray_address=args.ray_address, dtype=args.dtype,
                           device=config.device, reward_kwargs=_reward_model_kwargs(args))
    model, tokenizer = _load_llm(args, config.device)
    trainer = ImitationTrainer(model, tokenizer, prompts, config, output_dir=args.output, data_name=data_names,
                               added=added, rewards=rewards, pairs=pairs, drawer=drawer)
    try:
        agent = trainer.train()
    finally:
        if drawer is not None:
            drawer.close()
    print(f"Fitted to {agent.config.training['demonstrations']['decisions']} decisions; agent saved to "
          f"{args.output}/agent")
    if args.push_to_hub:
        agent.push_to_hub(args.push_to_hub)
        print(f"Pushed to {args.push_to_hub}")
    return 0


def _eval(args) -> int:
    import json

    from ..evaluation.evaluate import evaluate, format_summary
    from ..agent.modeling import MaraAgent
    from ..data.prompts import load_prompts
    from ..rewards import parse_reward_spec

    if not args.prompts and not args.pairs:
        raise ValueError("Give prompts to answer (--prompts SPEC), held-out preference pairs (--pairs SPEC), or both.")
    # --harmful labels the prompts that carry no label of their own (SafeRLHF, BeaverTails)
    harmful = None if args.harmful is None else args.harmful == "true"
    records = load_prompts(args.prompts, split=args.split, column=args.column, limit=args.limit,
                           harmful=harmful) if args.prompts else []
    pairs = None
    if args.pairs:
        from ..data.pairs import load_pairs

        pairs = load_pairs(args.pairs, split=args.split, limit=args.limit)
    rewards = [parse_reward_spec(spec, **_reward_model_kwargs(args)) for spec in args.reward or []]
    for source in rewards:
        source.check()
    if args.best_of < 0 or (args.best_of and not rewards) or (args.best_of and not records):
        raise ValueError("--best-of N compares MARA with best-of-N by a reward: give N >= 1, --reward SPEC and "
                         "--prompts SPEC.")
    _check_placement(args, args.device)
    agent = MaraAgent.from_pretrained(args.agent)
    model, tokenizer = _load_llm(args, args.device)
    overrides = {k: getattr(args, k) for k in ("top_k", "top_p", "threshold") if getattr(args, k) is not None}
    summary = {}
    if records:
        summary = evaluate(model, tokenizer, agent, records, rewards, args.output, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, sampled=args.sampled, seed=args.seed, **overrides)
    if args.best_of:
        from ..evaluation.frontier import format_frontier, frontier

        summary["frontier"] = frontier(model, tokenizer, agent, records, rewards, max_new_tokens=args.max_new_tokens,
                                       samples=args.best_of, best_of=sorted({min(4, args.best_of), args.best_of}),
                                       batch_size=args.batch_size, seed=args.seed, **overrides)
    if pairs is not None:
        summary["pairs"] = _pair_agreement(agent, model, tokenizer, pairs, args)
    if args.best_of or pairs is not None:
        with open(args.output + ".summary.json", "w") as f:
            json.dump(summary, f, indent=2)
    if args.json:
        print(json.dumps(summary))
        return 0
    if records:
        print(format_summary(summary))
    if args.best_of:
        print(format_frontier(summary["frontier"]))
    if pairs is not None:
        p = summary["pairs"]
        share = "none judged" if p["agreement"] is None else f"{p['agreement']:.3f}"
        print(f"Pair agreement: {share} ({p['judged']} of {p['pairs']} pairs have both parting tokens among the "
              "candidates; the share of those where the agent accepts the chosen token and rejects the rejected one)")
    print(f"{'Per-prompt results: ' + args.output + '; ' if records else ''}summary: {args.output}.summary.json "
          "(--json prints it)")
    return 0


def _pair_agreement(agent, model, tokenizer, pairs, args) -> dict:
    """`pair_demonstrations.agreement` on the held-out pairs, with the agent's candidate set (or --top-k / --top-p /
    --threshold)."""
    from ..training.imitation_config import ImitationConfig
    from ..training.pair_demonstrations import agreement

    config = ImitationConfig(top_k=args.top_k or agent.config.top_k,
                             top_p=agent.config.top_p if args.top_p is None else args.top_p,
                             rollout_batch_size=args.batch_size)
    return agreement(agent, model, tokenizer, pairs, config, threshold=args.threshold)


def _demo(args) -> int:
    from ..evaluation.demo import run_demo

    run_demo(args.agent, args.max_new_tokens, rates=args.rates, rate_tokens=args.rate_tokens,
             show_decisions=args.show_decisions)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`mara-hf`'s parser: every command with its flags, each flag with its help (see `arguments`, `options`)."""
    parser = argparse.ArgumentParser(prog="mara-hf", description="MARA accept/reject alignment for Hugging Face LLMs.")
    parser.add_argument("--verbose", action="store_true",
                        help="show info logs of mara-hf and transformers, e.g. the settings and progress of a run "
                             "(default: warnings and errors only)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, name, add_arguments, func in ((add_command, "convert", convert_arguments, _convert),
                                           (add_with_prompts, "train", train_arguments, _train),
                                           (add_with_prompts, "imitate", imitate_arguments, _imitate),
                                           (add_with_prompts, "eval", eval_arguments, _eval),
                                           (add_command, "demo", demo_arguments, _demo)):
        p = add(commands, name)
        add_arguments(p)
        p.set_defaults(func=func)
    bench.add_parser(commands)
    return parser


def _setup_logging(verbose: bool):
    """mara_hf's loggers are not under transformers' root logger: give them a handler and a level."""
    import logging as std_logging

    root = std_logging.getLogger("mara_hf")
    if not root.handlers:
        handler = std_logging.StreamHandler()
        handler.setFormatter(std_logging.Formatter("[mara-hf] %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(std_logging.INFO if verbose else std_logging.WARNING)
    logging.set_verbosity_info() if verbose else logging.set_verbosity_warning()


def _flag(parser, command: str, option: str) -> str | None:
    """The flag of `command` that sets the Python argument `option`, if it has one."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next((a.option_strings[0] for a in commands.choices[command]._actions
                 if a.dest == option and a.option_strings), None)


def main(argv=None) -> int:
    from ..errors import OptionError

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (OSError, ValueError) as err:  # user errors: one clear line, no traceback
        flag = _flag(parser, args.command, err.option) if isinstance(err, OptionError) else None
        print(f"mara-hf {args.command}: error: {err.for_flag(flag) if flag else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
