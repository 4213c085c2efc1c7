"""Prompt sets for MARA training and evaluation: local JSON / JSONL files, public prompt sets by name, any Hub dataset.

Every prompt is a dict with the text under "prompt" plus all the other fields of its record (e.g. `source`,
`category`, `harmful`), so that rewards such as the built-in `refusal` can use them.

A prompt spec (`load_prompts(spec)`, `mara-hf train/eval --prompts SPEC`, repeatable to mix sets) is

    SOURCE[:SUBSET][@SPLIT][,KEY=VALUE...]

SOURCE is a local JSON / JSONL(.gz/.xz) file or a folder holding `{split}.json` (as before), a public prompt set
by name (`PUBLIC_SOURCES`: `hh-rlhf`, `pku-saferlhf`, `beavertails`, `ultrafeedback`, `mara` = the MARA authors'
prompt files, or their full ids), or any other Hub dataset id (its JSON / JSONL / parquet files of the split).
KEYs: `harmful=true|false` labels every prompt of this source (for the `refusal` reward), `column=FIELD` picks
the prompt field, `limit=N` keeps the first N prompts, `revision=REV` pins a Hub revision or git ref.
Examples: `hh-rlhf:harmless-base@test`, `pku-saferlhf@test,harmful=true,limit=200`, `mara:HHrlhf@train`.

Hub prompt sets are de-duplicated (a prompt paired with several responses appears once); local files and the
authors' files are read as they are.
"""

import dataclasses
import fnmatch
import gzip
import json
import lzma
import os
import re

from transformers.utils import logging

from ..errors import OptionError

logger = logging.get_logger(__name__)

# Fields tried, in order, when no `column` is given.
PROMPT_FIELDS = ("instruction", "prompt", "question")
# Files tried inside a folder spec, e.g. prompts/HHrlhf + split "test" -> prompts/HHrlhf/test.json.
_SPLIT_FILES = ("{split}.json", "{split}.jsonl", "{split}.json.gz", "{split}.jsonl.gz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_FILE_SUFFIXES = (".json", ".jsonl", ".gz", ".xz", ".txt", ".csv", ".parquet")
_DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".jsonl.xz", ".parquet")
_OPTIONS = ("harmful", "column", "limit", "revision")
# raw.githubusercontent.com serves a file of a public repository at a branch, tag or commit.
GITHUB_RAW = "https://raw.githubusercontent.com/{repo}/{revision}/{path}"


@dataclasses.dataclass(frozen=True)
class PublicSource:
    """A public prompt set: where its files are and how a prompt is read from a record.

    `files` is a path in the repository with `{subset}` and `{split}` (globs allowed); `subset` None means the
    set needs one, "*" all of them. `first_turn`: the field holds HH-RLHF dialogues and the prompt is the first
    human turn. `subset_field`: record field that gets the subset name (HH-RLHF's `source`: harmless-base marks
    red-team requests, helpful-base benign ones, as the `refusal` reward reads it).
    """

    id: str
    aliases: tuple[str, ...]
    files: str
    column: str
    subsets: tuple[str, ...] = ()  # the known subsets; empty: any name is tried
    subset: str | None = "*"
    splits: tuple[str, ...] = ("train", "test")
    github: bool = False
    dedupe: bool = True
    first_turn: bool = False
    subset_field: str | None = None
    derived_from: dict = dataclasses.field(default_factory=dict)  # subset -> the Hub dataset it was drawn from


# File layouts as published. Checked against the Hub's file listings: HH-RLHF, PKU-SafeRLHF (data/<model>/<split>.jsonl,
# models Alpaca-7B, Alpaca2-7B, Alpaca3-8B), BeaverTails (round0/330k/*.jsonl.xz, round0/30k/*.jsonl.gz) and
# UltraFeedback (one <source>.jsonl per source at the top level); the authors' repository holds data/<Set>/<split>.json
# for BeaverTails, HHrlhf, HarmfulQA, SafeRLHF and Ultra-Feedback (its default branch name is assumed: main).
PUBLIC_SOURCES = (
    PublicSource("Anthropic/hh-rlhf", ("hh-rlhf", "hh"), "{subset}/{split}.jsonl.gz", "chosen",
                 subsets=("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"),
                 subset=None, first_turn=True, subset_field="source"),
    PublicSource("PKU-Alignment/PKU-SafeRLHF", ("pku-saferlhf", "saferlhf"), "data/{subset}/{split}.jsonl", "prompt"),
    # 330k is xz-compressed, 30k gzip-compressed
    PublicSource("PKU-Alignment/BeaverTails", ("beavertails",), "round0/{subset}/{split}.jsonl.[gx]z", "prompt",
                 subsets=("330k", "30k"), subset="330k"),
    PublicSource("openbmb/UltraFeedback", ("ultrafeedback",), "{subset}.jsonl", "instruction", splits=("train",)),
    PublicSource("IAAR-Shanghai/MARA", ("mara",), "data/{subset}/{split}.json", "instruction",
                 subsets=("HHrlhf", "SafeRLHF", "BeaverTails", "HarmfulQA", "Ultra-Feedback"), subset=None, github=True,
                 dedupe=False, derived_from={"HHrlhf": "Anthropic/hh-rlhf", "SafeRLHF": "PKU-Alignment/PKU-SafeRLHF",
                                             "BeaverTails": "PKU-Alignment/BeaverTails",
                                             "Ultra-Feedback": "openbmb/UltraFeedback"}),
)


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
def _load(spec: PromptSpec) -> list[dict]:
    """The prompts of one parsed spec, files read one at a time until `limit` prompts are in."""
    source = spec.source
    column = spec.column or (source.column if source else None)
    if spec.path is not None:
        path = _split_file(spec.path, spec.split) if os.path.isdir(spec.path) else spec.path
        files, dedupe = [(path, path)], False
    elif source is not None and source.github:
        files, dedupe = _github_file(source, spec), False
    else:
        files, dedupe = _hub_files(spec), True
    prompts, seen = [], set()
    for path, where in files:
        for index, record in enumerate(_read_records(path, where)):
            prompt = _to_prompt(record, column, index, where, spec, first_turn=bool(source and source.first_turn))
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
                return prompts
    if not prompts:
        raise ValueError(f"{spec.text} contains no prompt records")
    return prompts


def _split_file(folder: str, split: str) -> str:
    for pattern in _SPLIT_FILES:
        path = os.path.join(folder, pattern.format(split=split))
        if os.path.isfile(path):
            return path
    tried = ", ".join(pattern.format(split=split) for pattern in _SPLIT_FILES)
    raise FileNotFoundError(f"No prompt file for split {split!r} in folder {folder} (looked for {tried})")


def _hub_files(spec: PromptSpec):
    """(local path, display name) of the dataset files for the spec, each downloaded when it is reached."""
    from huggingface_hub import hf_hub_download

    repo = spec.source.id if spec.source else spec.hub_id
    if spec.source is not None:
        pattern = spec.source.files.format(subset=spec.subset or "*", split=spec.split)
        names = [pattern] if not any(c in pattern for c in "*?[") else sorted(fnmatch.filter(_repo_files(repo, spec), pattern))
    else:
        names = _split_data_files(_repo_files(repo, spec), spec.split, spec.subset)
    if not names:
        where = f"{repo}" + (f" (subset {spec.subset})" if spec.subset else "")
        raise FileNotFoundError(f"No data files for split {spec.split!r} in the Hub dataset {where}: check the "
                                f"split and subset, or download the file and give its path")
    logger.info(f"Reading prompts from the Hub dataset {repo}: {', '.join(names)}")
    from huggingface_hub import constants

    for name in names:
        try:
            path = hf_hub_download(repo, name, repo_type="dataset", revision=spec.revision)
        except Exception as err:  # the Hub's own errors are long; say which file of which set failed
            if constants.HF_HUB_OFFLINE:
                raise OSError(f"{name} of the Hub dataset {repo} is not in the local cache and HF_HUB_OFFLINE is "
                              "set: load it once online") from None
            raise OSError(f"Cannot download {name} of the Hub dataset {repo} ({_first_line(err)}): check the "
                          "dataset id and split, and your network") from None
        yield path, f"{repo}/{name}"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _repo_files(repo: str, spec: PromptSpec) -> list[str]:
    """Files of a Hub dataset repo; offline, those of its snapshot in the local cache."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().list_repo_files(repo, repo_type="dataset", revision=spec.revision)
        except Exception as err:
            raise OSError(f"Cannot list the files of the Hub dataset {repo} ({_first_line(err)}): check the id "
                          "(and log in for a gated or private dataset)") from None
    try:
        folder = snapshot_download(repo, repo_type="dataset", revision=spec.revision, local_files_only=True)
    except Exception:
        raise OSError(f"The Hub dataset {repo} is not in the local cache and HF_HUB_OFFLINE is set: "
                      "load it once online") from None
    return sorted(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
                  for root, _, files in os.walk(folder) for f in files)


def _split_data_files(names: list[str], split: str, subset: str | None) -> list[str]:
    """Data files of a split in a dataset repo of unknown layout: the split is a folder or the file name's stem
    (`test.jsonl`, `data/test-00000-of-00001.parquet`, `test/part.json`); a subset is a folder."""
    chosen = []
    for name in sorted(names):
        if not name.lower().endswith(_DATA_SUFFIXES):
            continue
        *folders, base = name.split("/")
        stem = base.split(".")[0]
        if subset and subset not in folders:
            continue
        if split in folders or stem == split or re.match(rf"{re.escape(split)}[-_]", stem):
            chosen.append(name)
    return chosen


def _github_file(source: PublicSource, spec: PromptSpec):
    """The authors' prompt file from their repository, cached under mara-hf's cache folder."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    from ..models import _cache_root

    revision = spec.revision or "main"
    relative = source.files.format(subset=spec.subset, split=spec.split)
    path = os.path.join(_cache_root(), "prompts", source.id, revision, relative)
    where = f"{source.id}/{relative}"
    if not os.path.isfile(path):
        if constants.HF_HUB_OFFLINE:
            raise OSError(f"{where} is not in the local cache ({path}) and HF_HUB_OFFLINE is set: load it once online")
        url = GITHUB_RAW.format(repo=source.id, revision=revision, path=relative)
        logger.info(f"Downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                raise FileNotFoundError(f"No {relative} in {source.id} at {revision!r} (on GitHub): the authors' "
                                        f"sets are {', '.join(source.subsets)}; BeaverTails and Ultra-Feedback have "
                                        f"only a test split") from None
            raise OSError(f"Cannot download {url}: HTTP {err.code}") from None
        except (urllib.error.URLError, TimeoutError) as err:
            raise OSError(f"Cannot download {url}: {getattr(err, 'reason', err)}") from None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a half-written file is never taken for the cache
    return [(path, where)]


def _read_records(path: str, where: str):
    """The records of a file, one at a time: a JSON list, or JSONL (one object a line); gzip / xz / parquet."""
    with open(path, "rb") as raw:
        magic = raw.read(6)
    if magic.startswith(b"PAR1"):
        yield from _read_parquet(path, where)
        return
    # The extension may lie: the compression is read from the magic bytes.
    opener = gzip.open if magic[:2] == b"\x1f\x8b" else lzma.open if magic == b"\xfd7zXZ\x00" else open
    with opener(path, "rt", encoding="utf-8") as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        if first == "[":  # a JSON list
            try:
                records = json.loads(first + f.read())
            except json.JSONDecodeError as e:
                raise ValueError(f"Invalid JSON in {where} (line {e.lineno}, column {e.colno}): {e.msg}") from None
            yield from records
            return
        for lineno, line in enumerate(_lines(first, f), start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"Invalid JSON in {where} at line {lineno}: {e.msg} (a JSONL file needs one JSON "
                                 f"object a line; a JSON file needs a list of objects)") from None


def _lines(first: str, f):
    """Lines of `f`, the first of them starting with the character already read (leading blank lines dropped)."""
    rest = f.readline()
    yield first + rest
    yield from f


def _read_parquet(path: str, where: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{where} is a parquet file: reading it needs pyarrow (pip install pyarrow)") from None
    yield from pq.read_table(path).to_pylist()


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
    if first_turn and isinstance(text, str):
        text = first_human_turn(text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"Record {index} of {where}: field {field!r} must be a non-empty string, got {text!r:.80}")
    return {"prompt": text, **{key: value for key, value in record.items() if key != "prompt"}}
