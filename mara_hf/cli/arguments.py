"""The flags of `mara-hf convert, train, imitate, eval, demo`, each with its help; the settings flags of train and
imitate come from their config dataclasses (`options.add_config_arguments`). The commands themselves are in `app`."""

import argparse

from .options import Renamed, add_config_arguments

# what --batch-size means in every command that has it
BATCH_SIZE_MEANING = "--batch-size means prompts generated together, as in eval and bench"

# one line each: shown in `mara-hf --help` and at the top of the command's own --help
DESCRIPTIONS = {
    "convert": "turn an actor .pth of the MARA authors (IAAR-Shanghai/MARA_AGENTS) into an agent folder",
    "train": "train an agent for an LLM against reward sources (discrete soft actor-critic)",
    "imitate": "fit an agent to demonstrations: refusals and the LLM's own benign answers, the best of --samples draws by a "
               "--reward, or preference --pairs",
    "eval": "compare base and MARA responses to the same prompts, scored by reward sources; agreement with held-out pairs",
    "demo": "the embedded SmolLM2-135M with and without the shipped agent, side by side (offline, on a CPU)",
    "bench": "time plain generate against MARA decoding side by side (with --rollouts: training throughput)",
}

# the example that ends each command's --help (tests/test_docs.py parses every one)
EXAMPLES = {
    "convert": "mara-hf convert actor.pth --base-model meta-llama/Llama-3.2-1B-Instruct --output my-agent",
    "train": "mara-hf train --model embedded --prompts hh-rlhf:harmless-base --reward refusal-held --episodes 300 "
             "--max-new-tokens 64 --learning-starts 2048 --output runs/sac",
    "imitate": "mara-hf imitate --model embedded --prompts hh-rlhf:helpful-base,limit=200 --reward my_rewards:score "
               "--samples 8 --output runs/best-of-8",
    "eval": "mara-hf eval --model embedded --agent smollm2-135m-refusal --prompts hh-rlhf:harmless-base,limit=50 "
            "--output eval.jsonl",
    "demo": "mara-hf demo --no-rates",
    "bench": "mara-hf bench --agent smollm2-135m-refusal --num-prompts 4 --max-new-tokens 48",
}

DTYPES = ["auto", "float32", "float16", "bfloat16"]
DTYPE_HELP = ("dtype to load the LLM in; auto: bfloat16 on a GPU that supports it (float16 on older GPUs), float32 on "
              "a CPU (default: %(default)s)")
DEVICE_HELP = ("where the LLM and the agent run: auto (the first CUDA GPU when there is one, else the CPU), cpu, cuda, "
               "cuda:1, ... (default: auto)")


def add_placement_arguments(p, device: bool = True):
    """--dtype, --device-map, --load-in-4bit (and --device, unless a settings dataclass adds it): where and how the
    LLM is loaded (`mara_hf.models.load_model`)."""
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    if device:
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--device-map", metavar="MAP",
                   help="spread an LLM too large for one GPU over all of them, as transformers' device_map: auto, "
                        "balanced, sequential (needs accelerate); instead of --device (default: none, one device)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="load the LLM's weights in 4 bits (NF4, computing in --dtype) with bitsandbytes, on a CUDA "
                        "GPU: a quarter of bfloat16's memory (default: off)")
MODEL_HELP = 'Hub id or folder of the LLM, or "embedded" for the bundled SmolLM2-135M-Instruct'
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


def add_command(commands, name: str, epilog: str = "", **kwargs) -> argparse.ArgumentParser:
    """The subcommand `name`, with its one-line description both in `mara-hf --help` and atop its own --help, and
    an example at the end of its --help."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    epilog = (epilog + "\n\n" if epilog else "") + "example:\n  " + EXAMPLES[name]
    p = commands.add_parser(name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name], epilog=epilog, **kwargs)
    # also after the command name (`mara-hf train ... --verbose`); absent here, the value before it stands
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show info logs of mara-hf and transformers, e.g. the settings and progress of a run "
                        "(default: warnings and errors only)")
    return p


def add_with_prompts(commands, name: str) -> argparse.ArgumentParser:
    """A subcommand that reads prompt sets: its --help ends with the list of prompt set specs."""
    return add_command(commands, name, epilog=PROMPTS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_prompt_selection(p, split: str):
    p.add_argument("--split", default=split,
                   help="split of the prompt sets whose spec names none (default: %(default)s)")
    p.add_argument("--column", help="the field of the prompt sets' records that holds the prompt text (default: the "
                                    "set's own, else instruction, prompt or question)")
    p.add_argument("--limit", type=int, help="use only the first N prompts of each --prompts (default: all)")


def add_reward_arguments(parser, required: bool, purpose: str | None = None):
    parser.add_argument("--reward", required=required, action="append", metavar="SPEC",
                        help="SOURCE[*MULTIPLIER]: a built-in (refusal, refusal-held, repetition), module:function, a "
                             "reward model id/folder, or guard:<id/folder> (a generative safety judge); repeat to "
                             "combine (the reward is the sum of the scores times their multipliers)"
                             + (f"; {purpose}" if purpose else ""))
    parser.add_argument("--reward-template", metavar="FORMAT",
                        help="format reward models read, with {prompt} and {response}; \\n and other escapes are "
                             "read (default: the reward model's chat template, else HH-RLHF's Human/Assistant format)")
    parser.add_argument("--reward-dtype", choices=DTYPES, default="auto",
                        help="dtype to load reward models (and guard: models) in; auto as --dtype (default: "
                             "%(default)s)")
    parser.add_argument("--reward-device", default="auto",
                        help="where reward models (and guard: models) run: auto (the first CUDA GPU when there is "
                             "one, else the CPU), cpu, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--reward-batch-size", type=int, default=8,
                        help="responses a reward model (or guard: model) scores together (default: %(default)s)")
    parser.add_argument("--guard-verdict-prefix", metavar="TEXT",
                        help="what guard: models write before their safe/unsafe verdict, e.g. '\\n\\n' for Llama "
                             "Guard 3 (default: nothing)")


def convert_arguments(p):
    p.add_argument("actor", help="path of the actor .pth state dict (a file of IAAR-Shanghai/MARA_AGENTS)")
    p.add_argument("--base-model", required=True, help="Hub id or folder of the LLM the actor was trained for")
    p.add_argument("--revision", help="revision (branch, tag or commit) of --base-model on the Hub (default: its default "
                                          "branch)")
    p.add_argument("--output", help="folder to write (default: ./mara-agent-<base model name>); must not exist, or be "
                                    "empty")
    p.add_argument("--push-to-hub", metavar="REPO", help="also push the agent with its card to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the Hub repo as private")
    p.add_argument("--paper-training-facts", action=argparse.BooleanOptionalAction, default=True,
                   help="record the paper's training setup in the agent's config and card (default: on)")


def train_arguments(p):
    from ..training.sac_config import MaraTrainingConfig

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompts", required=True, action="append", metavar="SPEC", help=PROMPTS_HELP)
    _add_prompt_selection(p, "train")
    add_reward_arguments(p, required=True)
    p.add_argument("--output", required=True, help="folder for checkpoints and the trained agent (OUTPUT/agent)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--drop-replay-buffer", action="store_true",
                   help="with --resume: keep the agent, critics and optimizers, start with an empty replay buffer "
                        "(after changing settings that make the old transitions misleading, e.g. --top-p)")
    p.add_argument("--push-to-hub", metavar="REPO", help="push the trained agent to this Hub repo at the end")
    add_placement_arguments(p, device=False)
    add_backend_arguments(p, "rollouts")
    p.add_argument("--reward-workers", type=int, default=0,
                   help="with --backend ray: score rewards in this many separate actors (default: %(default)s: in "
                        "each rollout worker)")
    add_config_arguments(p, MaraTrainingConfig, "training settings (mara_hf.training.sac_config.MaraTrainingConfig)",
                         "flags left out keep the value of --preset, if given, else the default shown")
    p.add_argument("--batch-size", dest="learner_batch_size", type=int, default=argparse.SUPPRESS, action=Renamed,
                   new="--learner-batch-size", why=BATCH_SIZE_MEANING)


def add_backend_arguments(p, work: str):
    """--backend and the Ray flags, for the commands whose `work` (rollouts, draws) can run on Ray workers."""
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help=f"where the {work} run: local (this process) or ray (Ray workers; pip install "
                        "'mara-hf[ray]') (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=2,
                   help="with --backend ray: workers, each with its own copy of the LLM (default: %(default)s)")
    p.add_argument("--worker-gpus", type=float, default=0,
                   help="with --backend ray: GPUs per worker, fractions allowed (default: %(default)s: workers on "
                        "CPUs)")
    p.add_argument("--ray-address", help="with --backend ray: an existing Ray cluster (e.g. auto or "
                                         "ray://head:10001) (default: a local Ray started for the run)")


def imitate_arguments(p):
    from ..training.imitation_config import ImitationConfig

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompts", action="append", metavar="SPEC",
                   help=PROMPTS_HELP + "; harmful=true|false labels them (required unless --pairs)")
    p.add_argument("--pairs", action="append", metavar="SPEC",
                   help="preference pairs instead of prompts, repeatable: a file or Hub dataset with TRL's "
                        "prompt/chosen/rejected columns (plain or conversational) or HH-RLHF's chosen/rejected "
                        "dialogues; the agent learns to follow each chosen response and to reject the rejected one "
                        "where they part"),
    p.add_argument("--add-prompts", action="append", metavar="SPEC",
                   help="prompts demonstrated on top of the draws, every one (harmful=true|false labels them), "
                   "collected on their own: adding them to a run already collected follows only them; "
                   "--added-repeats weighs them in the fit")
    _add_prompt_selection(p, "train")
    p.add_argument("--output", required=True, help="folder for the collected decisions and the agent (OUTPUT/agent); "
                   "a run with the same settings resumes collecting there")
    p.add_argument("--push-to-hub", metavar="REPO", help="push the fitted agent to this Hub repo at the end")
    add_placement_arguments(p, device=False)
    add_reward_arguments(p, required=False, purpose="with it, every prompt demonstrates the best of --samples drawn "
                         "responses (or the greedy answer, when no draw beats it) instead of refusals")
    add_backend_arguments(p, "draws of --reward")
    add_config_arguments(p, ImitationConfig, "imitation settings (mara_hf.training.imitation_config.ImitationConfig)")
    p.add_argument("--batch-size", dest="fit_batch_size", type=int, default=argparse.SUPPRESS, action=Renamed,
                   new="--fit-batch-size", why=BATCH_SIZE_MEANING)


def eval_arguments(p):
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--agent", required=True, help="the agent MARA decodes with: a folder, bundled name or Hub id")
    p.add_argument("--prompts", action="append", metavar="SPEC", help=PROMPTS_HELP + " (this or --pairs, or both)")
    p.add_argument("--pairs", action="append", metavar="SPEC",
                   help="held-out preference pairs (as imitate --pairs reads them), repeatable: report the agent's "
                        "agreement, the share of the pairs whose two parting tokens are both candidates where it "
                        "accepts the chosen response's token and rejects the rejected one's (an agent that accepts "
                        "everything: 0)")
    _add_prompt_selection(p, "test")
    p.add_argument("--harmful", choices=["true", "false"],
                   help="label the prompts that carry no source/harmful field (or harmful= in a spec) (default: "
                        "unlabelled prompts stay unlabelled)")
    add_reward_arguments(p, required=False)
    p.add_argument("--output", required=True, help="JSONL file, one line per prompt (resumed if it exists); the "
                   "summary goes to OUTPUT.summary.json")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="response length limit, in new tokens (default: %(default)s)")
    p.add_argument("--top-k", type=int, help="MARA's candidate set: the k most probable tokens (default: the agent's)")
    p.add_argument("--top-p", type=float, help="MARA's candidate set: of the top-k tokens, those up to this cumulative "
                                               "probability, in (0, 1] (default: the agent's)")
    p.add_argument("--threshold", type=float,
                   help="the P(accept) a candidate must exceed to be accepted, in (0, 1) (default: the agent's)")
    add_placement_arguments(p)
    p.add_argument("--sampled", action="store_true",
                   help="also sample base and MARA as the paper's base decoding (temperature 0.8, top-k 40, top-p 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled runs and of --best-of's draws (default: "
                                                       "%(default)s)")
    p.add_argument("--best-of", type=int, default=0, metavar="N",
                   help="also report the agent's frontier with --reward: best-of-4 and best-of-N of N draws of the "
                        "LLM per prompt (temperature 1, no top-k) beside it, their reward and the fluency (NLL under "
                        "the LLM) of the responses they pick, MARA's divergence per token and its decoding time "
                        "against plain generate, and a verdict that names a reward hack (MARA less fluent than "
                        "best-of-N's picks); costs N sampled responses per prompt; in the JSON summary under "
                        "\"frontier\" (default: 0, none; 16 is the usual bar)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line instead of the table")


def demo_arguments(p):
    p.add_argument("--agent", default="smollm2-135m-refusal",
                   help="a bundled agent name, a folder or a Hub id (default: %(default)s, the shipped agent)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="length of the side-by-side example answers, in new tokens (default: %(default)s)")
    p.add_argument("--rates", action=argparse.BooleanOptionalAction, default=True,
                   help="after the examples, measure refusal and fluency on the held-out requests (default: on)")
    p.add_argument("--rate-tokens", type=int, default=64,
                   help="new tokens per held-out request (default: 64: enough to see whether a refusal holds)")
    p.add_argument("--show-decisions", action="store_true",
                   help="under each MARA answer, mark where the agent steered it: the candidates it rejected, with "
                        "their P(accept), and the token emitted instead (the view of mara.stats.view)")
