"""`mara-hf <command>`: the command-line entry point. Each command lives next to the code it drives."""

import argparse
import sys

from transformers.utils import logging

from ..models import load_model

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
    kwargs = {"use_chat_template": not args.reward_template}
    if args.reward_template:
        kwargs["template"] = args.reward_template.encode().decode("unicode_escape")  # allow \n in the shell
    if getattr(args, "guard_verdict_prefix", None) is not None:
        kwargs["verdict_prefix"] = args.guard_verdict_prefix.encode().decode("unicode_escape")
    return kwargs


def _add_reward_arguments(parser, required: bool):
    parser.add_argument("--reward", required=required, action="append", metavar="SPEC",
                        help="SOURCE[*MULTIPLIER]: a built-in (refusal, refusal-held, repetition), module:function, a "
                             "reward model id/folder, or guard:<id/folder> (a generative safety judge); repeat to combine")
    parser.add_argument("--reward-template", metavar="FORMAT",
                        help="format reward models read, with {prompt} and {response} (default: the reward "
                             "model's chat template, else HH-RLHF's Human/Assistant format)")
    parser.add_argument("--guard-verdict-prefix", metavar="TEXT",
                        help="what guard: models write before their safe/unsafe verdict, e.g. '\\n\\n' for Llama "
                             "Guard 3 (default: nothing)")


def _train(args) -> int:
    from ..training.sac_trainer import MaraTrainer, checkpoints
    from ..training.sac_config import MaraTrainingConfig
    from ..data.prompts import load_prompts, parse_prompt_spec
    from ..rewards.sources import parse_reward_spec

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
    if args.backend == "ray":
        try:
            from ..training.ray_backend import RayMaraTrainer
        except ImportError:
            raise ValueError("--backend ray needs Ray: pip install 'mara-hf[ray]'") from None
        trainer = RayMaraTrainer(args.model, args.reward, prompts, config, output_dir=args.output,
                                 data_name=data_names, num_workers=args.num_workers, worker_gpus=args.worker_gpus,
                                 ray_address=args.ray_address, dtype=args.dtype, device=config.device,
                                 reward_kwargs=_reward_model_kwargs(args), reward_workers=args.reward_workers)
    else:
        model, tokenizer = load_model(args.model, args.dtype, config.device)
        trainer = MaraTrainer(model, tokenizer, rewards, prompts, config, output_dir=args.output,
                              data_name=data_names)
    agent = trainer.train(resume=args.resume, drop_replay_buffer=args.drop_replay_buffer)
    print(f"Trained for {trainer.episodes_done} episodes; agent saved to {args.output}/agent")
    if args.push_to_hub:
        agent.push_to_hub(args.push_to_hub)
        print(f"Pushed to {args.push_to_hub}")
    return 0


def _imitate(args) -> int:
    from ..training.imitation_config import ImitationConfig
    from ..training.imitation_trainer import ImitationTrainer
    from ..data.prompts import load_prompts, parse_prompt_spec

    config = ImitationConfig(**{name: getattr(args, name) for name in ImitationConfig.field_names()
                                if hasattr(args, name)})
    prompts = load_prompts(args.prompts, split=args.split, column=args.column, limit=args.limit)
    data_names = [parse_prompt_spec(spec, args.split, args.column, args.limit).name for spec in args.prompts]
    added = load_prompts(args.add_prompts, split=args.split, column=args.column) if args.add_prompts else None
    data_names += [parse_prompt_spec(spec, args.split, args.column, None).name for spec in args.add_prompts or []]
    model, tokenizer = load_model(args.model, args.dtype, config.device)
    trainer = ImitationTrainer(model, tokenizer, prompts, config, output_dir=args.output, data_name=data_names,
                               added=added)
    agent = trainer.train()
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
    from ..rewards.sources import parse_reward_spec

    # --harmful labels the prompts that carry no label of their own (SafeRLHF, BeaverTails)
    harmful = None if args.harmful is None else args.harmful == "true"
    records = load_prompts(args.prompts, split=args.split, column=args.column, limit=args.limit, harmful=harmful)
    rewards = [parse_reward_spec(spec, **_reward_model_kwargs(args)) for spec in args.reward or []]
    for source in rewards:
        source.check()
    agent = MaraAgent.from_pretrained(args.agent)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    overrides = {k: getattr(args, k) for k in ("top_k", "top_p", "threshold") if getattr(args, k) is not None}
    summary = evaluate(model, tokenizer, agent, records, rewards, args.output, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, sampled=args.sampled, seed=args.seed, **overrides)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
        print(f"Per-prompt results: {args.output}; summary: {args.output}.summary.json (--json prints it)")
    return 0


def _demo(args) -> int:
    from ..evaluation.demo import run_demo

    run_demo(args.agent, args.max_new_tokens, rates=args.rates, rate_tokens=args.rate_tokens)
    return 0


def _add_config_arguments(parser, config_class):
    """One `--field-name` per dataclass field, typed from its default (list fields from their annotation). Flags
    left out are absent from the parsed namespace (argparse.SUPPRESS), so that a preset can tell them apart."""
    import dataclasses
    import typing

    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        shown = f"default: {default}"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=shown)
        elif isinstance(default, list):
            item = (typing.get_args(f.type) or (str,))[0]
            parser.add_argument(flag, dest=f.name, type=item, nargs="+", default=argparse.SUPPRESS, help=shown)
        else:
            kind = type(default) if default is not None else next(
                (t for t in typing.get_args(f.type) if t is not type(None)), str)
            if type(None) in typing.get_args(f.type):  # an optional setting: "none" unsets it
                kind = _or_none(kind)
                shown += " (none to unset)"
            parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=shown)


PROMPTS_HELP = "SOURCE[:SUBSET][@SPLIT][,KEY=VALUE...]; repeat to mix prompt sets (see below)"
PROMPTS_EPILOG = """prompt sets (--prompts SPEC, repeatable; KEYs: harmful=true|false, column=FIELD, limit=N, revision=REV):
  hh-rlhf:harmless-base@test          Anthropic/hh-rlhf red-team first turns (harmful, from the subset)
  hh-rlhf:helpful-base@test           Anthropic/hh-rlhf benign first turns
  pku-saferlhf@test,harmful=true      PKU-Alignment/PKU-SafeRLHF prompts, labelled harmful
  beavertails:30k@test,harmful=true   PKU-Alignment/BeaverTails prompts (330k by default)
  ultrafeedback@train,harmful=false   openbmb/UltraFeedback instructions
  mara:HHrlhf@train                   the MARA authors' prompt files (GitHub IAAR-Shanghai/MARA; also
                                      SafeRLHF, BeaverTails, Ultra-Feedback)
  org/name[:SUBSET][@SPLIT]           any Hub dataset's JSON/JSONL files of the split
  prompts.jsonl[,harmful=false]       a local JSON/JSONL file, or a folder holding {split}.json
Hub sets are downloaded once and cached (then HF_HUB_OFFLINE=1 works)."""


def _or_none(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mara-hf", description="MARA accept/reject alignment for Hugging Face LLMs.")
    parser.add_argument("--verbose", action="store_true", help="show info logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("convert", help="turn an actor .pth from IAAR-Shanghai/MARA_AGENTS into an agent folder")
    p.add_argument("actor", help="path of the actor .pth state dict")
    p.add_argument("--base-model", required=True, help="Hub id or folder of the LLM the actor was trained for")
    p.add_argument("--revision", help="revision of the base model")
    p.add_argument("--output", help="folder to write (default: ./mara-agent-<base model name>); must not exist")
    p.add_argument("--push-to-hub", metavar="REPO", help="also push the agent with its card to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--paper-training-facts", action=argparse.BooleanOptionalAction, default=True,
                   help="record the paper's training setup in the agent's config and card (default: on)")
    p.set_defaults(func=_convert)

    p = commands.add_parser("train", help="train an agent for a model against reward sources (discrete SAC)",
                            epilog=PROMPTS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help='Hub id or folder of the LLM, or "embedded" for SmolLM2-135M')
    p.add_argument("--prompts", required=True, action="append", metavar="SPEC", help=PROMPTS_HELP)
    p.add_argument("--split", default="train", help="split of sets whose spec names none (default: train)")
    p.add_argument("--column", help="prompt field (default: the set's own, else instruction, prompt or question)")
    p.add_argument("--limit", type=int, help="use only the first N prompts of each --prompts")
    _add_reward_arguments(p, required=True)
    p.add_argument("--output", required=True, help="folder for checkpoints and the trained agent (OUTPUT/agent)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--drop-replay-buffer", action="store_true",
                   help="with --resume: keep the agent, critics and optimizers, start with an empty replay buffer "
                        "(after changing settings that make the old transitions misleading, e.g. --top-p)")
    p.add_argument("--push-to-hub", metavar="REPO", help="push the trained agent to this Hub repo at the end")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype to load the LLM in")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="where rollouts run: this process, or Ray rollout workers (pip install 'mara-hf[ray]')")
    p.add_argument("--num-workers", type=int, default=2, help="Ray rollout workers, each with its own LLM copy")
    p.add_argument("--worker-gpus", type=float, default=0, help="GPUs per Ray rollout worker")
    p.add_argument("--ray-address", help="an existing Ray cluster (e.g. auto or ray://head:10001); default: local")
    p.add_argument("--reward-workers", type=int, default=0,
                   help="with --backend ray: score rewards in this many separate actors (default: in each worker)")
    from ..training.sac_config import MaraTrainingConfig

    _add_config_arguments(p, MaraTrainingConfig)
    p.set_defaults(func=_train)

    p = commands.add_parser("imitate", help="fit an agent to the decisions along demonstrations (held refusals for "
                            "harmful prompts, the LLM's own answers for benign ones)", epilog=PROMPTS_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help='Hub id or folder of the LLM, or "embedded" for SmolLM2-135M')
    p.add_argument("--prompts", required=True, action="append", metavar="SPEC",
                   help=PROMPTS_HELP + "; harmful=true|false labels them")
    p.add_argument("--add-prompts", action="append", metavar="SPEC",
                   help="prompts demonstrated on top of the draws, every one (harmful=true|false labels them), "
                   "collected on their own: adding them to a run already collected follows only them; "
                   "--added-repeats weighs them in the fit")
    p.add_argument("--split", default="train", help="split of sets whose spec names none (default: train)")
    p.add_argument("--column", help="prompt field (default: the set's own, else instruction, prompt or question)")
    p.add_argument("--limit", type=int, help="use only the first N prompts of each --prompts")
    p.add_argument("--output", required=True, help="folder for the collected decisions and the agent (OUTPUT/agent); "
                   "a run with the same settings resumes collecting there")
    p.add_argument("--push-to-hub", metavar="REPO", help="push the fitted agent to this Hub repo at the end")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype to load the LLM in")
    from ..training.imitation_config import ImitationConfig

    _add_config_arguments(p, ImitationConfig)
    p.set_defaults(func=_imitate)

    p = commands.add_parser("eval", help="base vs MARA responses on the same prompts, scored by reward sources",
                            epilog=PROMPTS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help='Hub id or folder of the LLM, or "embedded" for SmolLM2-135M')
    p.add_argument("--agent", required=True, help="agent id or folder")
    p.add_argument("--prompts", required=True, action="append", metavar="SPEC", help=PROMPTS_HELP)
    p.add_argument("--split", default="test", help="split of sets whose spec names none (default: test)")
    p.add_argument("--column", help="prompt field (default: the set's own, else instruction, prompt or question)")
    p.add_argument("--limit", type=int, help="use only the first N prompts of each --prompts")
    p.add_argument("--harmful", choices=["true", "false"],
                   help="label the prompts that carry no source/harmful field (or harmful= in a spec)")
    _add_reward_arguments(p, required=False)
    p.add_argument("--output", required=True, help="JSONL file, one line per prompt (resumed if it exists)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--threshold", type=float)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device")
    p.add_argument("--sampled", action="store_true",
                   help="also sample base and MARA as the paper's base decoding (temperature 0.8, top-k 40, top-p 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled runs (default: 0)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line instead of the table")
    p.set_defaults(func=_eval)

    p = commands.add_parser("demo", help="the embedded SmolLM2 with and without the shipped agent, side by side")
    p.add_argument("--agent", default="smollm2-135m-refusal", help="a bundled agent name, a folder or a Hub id")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rates", action=argparse.BooleanOptionalAction, default=True,
                   help="after the examples, measure refusal and fluency on the held-out requests (default: on)")
    p.add_argument("--rate-tokens", type=int, default=64,
                   help="new tokens per held-out request (default: 64: enough to see whether a refusal holds)")
    p.set_defaults(func=_demo)

    from ..evaluation import bench

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
