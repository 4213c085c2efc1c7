"""Prompt sets from any Hub dataset: the data files of a split, listed and downloaded (or read from the cache)."""

import fnmatch
import os
import re

from transformers.utils import logging

logger = logging.get_logger(__name__)

_DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".jsonl.xz", ".parquet")


def hub_files(spec):
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


def _repo_files(repo: str, spec) -> list[str]:
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
