"""Prompt sets for MARA training and evaluation: local JSON / JSONL files, public prompt sets by name, any Hub dataset.

Every prompt is a dict with the text under "prompt" plus all the other fields of its record (e.g. `source`,
`category`, `harmful`), so that rewards such as the built-in `refusal` can use them.

A prompt spec (`load_prompts(spec)`, `mara-hf train/eval --prompts SPEC`, repeatable to mix sets) is

    SOURCE[:SUBSET][@SPLIT][,KEY=VALUE...]

SOURCE is a local JSON / JSONL(.gz/.xz) file or a folder holding `{split}.json` (as before), a public prompt set
by name (`PUBLIC_SOURCES`: `hh-rlhf`, `pku-saferlhf`, `beavertails`, `ultrafeedback`, `mara` = the MARA authors'
prompt files, or their full ids), the request files that ship with mara-hf (`mara-hf:everyday`, `mara-hf:dev`,
`mara-hf:harmful`, `mara-hf:benign_lookalikes`, `mara-hf:contrast`: `mara_hf/data/*.jsonl`, described in its
README.md), or any other Hub dataset id (its JSON / JSONL / parquet files of the split).
KEYs: `harmful=true|false` labels every prompt of this source (for the `refusal` reward), `column=FIELD` picks
the prompt field, `limit=N` keeps the first N prompts, `revision=REV` pins a Hub revision or git ref.
Examples: `hh-rlhf:harmless-base@test`, `pku-saferlhf@test,harmful=true,limit=200`, `mara:HHrlhf@train`,
`mara-hf:everyday`.

Hub prompt sets are de-duplicated (a prompt paired with several responses appears once); local files and the
authors' files are read as they are.
"""

import dataclasses
import os
import re

from transformers.utils import logging

from ..errors import OptionError
from .encoding import CONVERSATION
from .files import read_records, split_file
from .hub import hub_files
from .public import PUBLIC_SOURCES, PublicSource, github_file

logger = logging.get_logger(__name__)

# Fields tried, in order, when no `column` is given.
PROMPT_FIELDS = ("instruction", "prompt", "question")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_FILE_SUFFIXES = (".json", ".jsonl", ".gz", ".xz", ".txt", ".csv", ".parquet")
_OPTIONS = ("harmful", "column", "limit", "revision")
SHIPPED = "mara-hf"  # `mara-hf:NAME`: a request file that ships in mara_hf/data



@dataclasses.dataclass
class PromptSpec:
    """One parsed `--prompts` spec, with the defaults it was given filled in."""

    text: str
    path: str | None = None  # a local file or folder
    source: PublicSource | None = None
    hub_id: str | None = None  # a Hub dataset that is not a public source of the table
    subset: str | None = None
    split: str = "train"
    harmful: bool | None = None
    column: str | None = None
    limit: int | None = None
    revision: str | None = None
    from_spec: tuple[str, ...] = ()  # options written in the spec itself (errors name them there)

    @property
    def name(self) -> str:
        """How the set is recorded in an agent's provenance: a spec that loads the same prompts again."""
        if self.path is not None:
            return self.text
        head = (self.source.id if self.source else self.hub_id) + (f":{self.subset}" if self.subset else "")
        options = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k in _OPTIONS
                   if (v := getattr(self, k)) is not None]
        return ",".join([f"{head}@{self.split}", *options])


def parse_prompt_spec(spec, split: str = "train", column: str | None = None, limit: int | None = None) -> PromptSpec:
    """Parse `SOURCE[:SUBSET][@SPLIT][,KEY=VALUE...]` (see the module docstring); the arguments are defaults."""
    text = os.fspath(spec)
    if limit is not None and limit < 1:
        raise OptionError(f"limit must be a positive number of prompts or None, got {limit}", "limit")
    parsed = PromptSpec(text, split=split, column=column, limit=limit)
    if os.path.exists(text):  # a local path wins, whatever characters it holds
        parsed.path = text
        return parsed
    head, *pairs = text.split(",")
    for pair in pairs:
        key, _, value = pair.partition("=")
        key = key.strip()
        if key not in _OPTIONS or not value:
            raise ValueError(f"Prompt spec {text!r}: {pair!r} is not KEY=VALUE with KEY one of {', '.join(_OPTIONS)}")
        setattr(parsed, key, _option_value(text, key, value.strip()))
        parsed.from_spec += (key,)
    if "@" in head and not os.path.exists(head):
        head, parsed.split = head.rsplit("@", 1)
    if os.path.exists(head):
        parsed.path = head
        return parsed
    name, _, subset = head.partition(":")
    if name.lower() == SHIPPED:
        parsed.path = shipped_file(subset)
        return parsed
    parsed.source = next((s for s in PUBLIC_SOURCES if name.lower() in (s.id.lower(), *s.aliases)), None)
    if parsed.source is None:
        if not _HUB_ID.match(name) or name.lower().endswith(_FILE_SUFFIXES):
            raise FileNotFoundError(f"Prompt file not found: {text} (give a JSON/JSONL file, a folder with "
                                    f"{parsed.split}.json, a public set such as hh-rlhf:harmless-base, or a Hub "
                                    f"dataset id like org/name)")
        parsed.hub_id, parsed.subset = name, subset or None
        return parsed
    _check_public(parsed, subset)
    return parsed


def shipped_sets() -> dict[str, str]:
    """The request files that ship in `mara_hf/data`, by the name `mara-hf:NAME` gives them: file stem, with a
    `_requests` ending left out."""
    folder = os.path.dirname(__file__)
    return {name.removesuffix(".jsonl").removesuffix("_requests"): os.path.join(folder, name)
            for name in sorted(os.listdir(folder)) if name.endswith(".jsonl")}


def shipped_file(name: str) -> str:
    """The file of the shipped request set `name` (see `shipped_sets`); an unknown name lists the known ones."""
    sets = shipped_sets()
    key = name.lower().removesuffix("_requests")
    if key not in sets:
        raise FileNotFoundError(f"{SHIPPED}:{name} is not a request set shipped with mara-hf; shipped: "
                                f"{', '.join(f'{SHIPPED}:{n}' for n in sets)}.")
    return sets[key]


def load_prompts(spec, split: str = "train", column: str | None = None, limit: int | None = None,
                 harmful: bool | None = None) -> list[dict]:
    """Load prompts from one spec or a list of specs (their prompts concatenated, in order).

    `split`, `column` and `limit` (first N prompts, per spec) apply where a spec does not set its own.
    `harmful` labels the prompts that carry no label of their own (a `harmful` field, or a `source` such as
    HH-RLHF's harmless-base / helpful-base).
    A JSON file holds a list of objects, a JSONL file one object a line (gzip / xz are detected from the content).
    The text is read from `column`, else the set's own field, else the first of instruction / prompt / question.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    prompts = []
    for one in specs:
        parsed = parse_prompt_spec(one, split=split, column=column, limit=limit)
        records = _load(parsed)
        if harmful is not None:
            records = [r if _labelled(r) else {**r, "harmful": harmful} for r in records]
        prompts += records
    return prompts


def _labelled(record: dict) -> bool:
    from ..rewards import RefusalReward

    try:  # the labels the refusal reward reads; UltraFeedback's `source` (flan, sharegpt, ...) is none
        RefusalReward.is_harmful(record)
        return True
    except ValueError:
        return False


def hub_datasets(names) -> list[str]:
    """Hub dataset ids behind recorded prompt-set names (for a model card's `datasets` metadata)."""
    ids = []
    for name in names or []:
        head = str(name).split(",")[0].split("@")[0]
        base, _, subset = head.partition(":")
        source = next((s for s in PUBLIC_SOURCES if base.lower() in (s.id.lower(), *s.aliases)), None)
        if source is not None:
            found = source.derived_from.get(subset) if source.github else source.id
        else:  # a Hub id as given; local paths and free text are no dataset ids
            found = base if _HUB_ID.match(base) and not base.lower().endswith(_FILE_SUFFIXES) else None
        if found and found not in ids:
            ids.append(found)
    return ids


def first_human_turn(dialogue: str) -> str:
    """The first human turn of an HH-RLHF dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    text = dialogue.split("\n\nAssistant:", 1)[0].strip()
    return text.removeprefix("Human:").strip()


# ----- spec parsing ---------------------------------------------------------------------------------------------
def _option_value(text: str, key: str, value: str):
    if key == "harmful":
        if value.lower() not in ("true", "false"):
            raise ValueError(f"Prompt spec {text!r}: harmful must be true or false, got {value!r}")
        return value.lower() == "true"
    if key == "limit":
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"Prompt spec {text!r}: limit must be a positive number of prompts, got {value!r}")
        return int(value)
    return value


def _check_public(parsed: PromptSpec, subset: str):
    source = parsed.source
    parsed.subset = subset or source.subset
    if parsed.subset is None:
        raise ValueError(f"{source.id} needs a subset: {source.aliases[0]}:SUBSET with SUBSET one of "
                         f"{', '.join(source.subsets)} (e.g. {source.aliases[0]}:{source.subsets[0]}@{parsed.split})")
    if parsed.subset == "*":
        parsed.subset = None  # all of them; the name stays short
    if source.subsets and parsed.subset and parsed.subset not in source.subsets:
        raise ValueError(f"{source.id} has no subset {parsed.subset!r}; its subsets are {', '.join(source.subsets)}")
    if parsed.split not in source.splits:
        raise ValueError(f"{source.id} has no split {parsed.split!r}; its splits are {', '.join(source.splits)} "
                         f"(add @{source.splits[0]} to the spec)")


# ----- loading --------------------------------------------------------------------------------------------------
def spec_files(spec: PromptSpec) -> tuple[list[tuple[str, str]], bool]:
    """The files one parsed spec reads, as (local path, where it came from), and whether its records are
    de-duplicated (Hub sets pair a prompt with several responses)."""
    if spec.path is not None:
        path = split_file(spec.path, spec.split) if os.path.isdir(spec.path) else spec.path
        return [(path, path)], False
    if spec.source is not None and spec.source.github:
        return github_file(spec.source, spec), False
    return hub_files(spec), True


def _load(spec: PromptSpec) -> list[dict]:
    """The prompts of one parsed spec, files read one at a time until `limit` prompts are in."""
    source = spec.source
    column = spec.column or (source.column if source else None)
    files, dedupe = spec_files(spec)
    prompts, seen, turns = [], set(), 0
    for path, where in files:
        for index, record in enumerate(read_records(path, where)):
            prompt = _to_prompt(record, column, index, where, spec, first_turn=bool(source and source.first_turn))
            if prompt is None:
                turns += 1
                continue
            if dedupe:
                if prompt["prompt"] in seen:
                    continue
                seen.add(prompt["prompt"])
            if source is not None and source.subset_field and spec.subset:
                prompt[source.subset_field] = spec.subset
            if spec.harmful is not None:
                prompt["harmful"] = spec.harmful
            prompts.append(prompt)
            if spec.limit is not None and len(prompts) >= spec.limit:
                break
        if spec.limit is not None and len(prompts) >= spec.limit:
            break
    _say_left_out(turns, spec.text)
    if not prompts:
        raise ValueError(f"{spec.text} contains no prompt records" + (" of one user turn" if turns else ""))
    return prompts


def _say_left_out(turns: int, where: str):
    if turns:
        logger.warning(f"{where}: {turns} conversational prompts of several turns left out (MARA decodes a prompt as "
                       "one user turn).")


def prompt_records(data, column: str | None = None) -> list[dict]:
    """Prompt records from data held in Python: a `datasets.Dataset` (e.g. a TRL prompt-only dataset, plain or
    conversational) or any iterable of dicts or strings, normalised as the prompt sets are (the text under
    "prompt", the other columns kept; a conversation of one user turn becomes its text, the messages kept for TRL
    reward functions; conversations of several turns are left out and counted)."""
    if isinstance(data, (str, bytes, dict)):
        raise TypeError("prompt_records takes a collection of prompts (a datasets.Dataset, a list of dicts or of "
                        f"strings), got a single {type(data).__name__}; load a prompt set with load_prompts(spec).")
    spec = PromptSpec(text="the given prompts")
    records, turns = [], 0
    for index, record in enumerate(data):
        record = {"prompt": record} if isinstance(record, str) else record
        prompt = _to_prompt(record, column, index, "the given prompts", spec)
        if prompt is None:
            turns += 1
            continue
        records.append(prompt)
    _say_left_out(turns, "the given prompts")
    if not records:
        raise ValueError("No prompts" + (" of one user turn" if turns else "") + " in the given data.")
    return records


def single_user_turn(messages) -> str | None:
    """The text of a conversation that is one user turn (system messages aside); None for any other."""
    turns = [m for m in messages if isinstance(m, dict) and m.get("role") != "system"]
    if len(turns) != 1 or turns[0].get("role") != "user":
        return None
    return turns[0].get("content")


def _to_prompt(record, column: str | None, index: int, where: str, spec: PromptSpec, first_turn: bool = False) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"Record {index} of {where} is a {type(record).__name__}, expected a JSON object")
    field = column or next((name for name in PROMPT_FIELDS if name in record), None)
    if field is None or field not in record:
        wanted = repr(column) if column else " / ".join(map(repr, PROMPT_FIELDS))
        message = f"Record {index} of {where} has no {wanted} field; its fields are {sorted(record)}. "
        if "column" in spec.from_spec:
            raise ValueError(message + f"Pick the prompt field with column=FIELD in the spec {spec.text!r}")
        raise OptionError(message + "Pick the prompt field with column=FIELD", "column")
    text = record[field]
    messages = None
    if isinstance(text, list) and text and all(isinstance(m, dict) and "role" in m for m in text):
        messages, text = list(text), single_user_turn(text)  # TRL's conversational format
        if text is None:
            return None
    if first_turn and isinstance(text, str):
        text = first_human_turn(text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"Record {index} of {where}: field {field!r} must be a non-empty string or a conversation, "
                         f"got {text!r:.80}")
    out = {"prompt": text, **{key: value for key, value in record.items() if key != "prompt"}}
    if messages is not None:
        out[CONVERSATION] = messages
    return out
