"""The public prompt sets known by name (HH-RLHF, PKU-SafeRLHF, BeaverTails, UltraFeedback, the MARA authors'
files): where their files are, and the authors' files fetched from GitHub into a local cache."""

import dataclasses
import os

from transformers.utils import logging

logger = logging.get_logger(__name__)

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


def github_file(source: PublicSource, spec):
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
