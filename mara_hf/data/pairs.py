"""Preference pairs: a prompt with a chosen and a rejected response, from a file or a Hub dataset.

Read as TRL writes them: `prompt`, `chosen`, `rejected` columns, plain text or conversational (lists of
`{"role", "content"}` messages, the prompt then being the user turn and each response the last assistant turn), or
HH-RLHF's `chosen` / `rejected` full dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ..."), whose shared part before the
last assistant turn is the prompt. MARA decodes a prompt as one user turn, so pairs whose prompt holds several
turns are left out (and counted).

A spec is a prompt spec (`data.prompts`): a local JSON / JSONL(.gz/.xz) / parquet file or folder, or a Hub dataset
id, with `@SPLIT` and `,limit=N`.
"""

from transformers.utils import logging

from .files import read_records
from .prompts import parse_prompt_spec, single_user_turn, spec_files

logger = logging.get_logger(__name__)

COLUMNS = ("chosen", "rejected")
_TURN = "\n\nAssistant:"


def load_pairs(spec, split: str = "train", limit: int | None = None) -> list[dict]:
    """`{"prompt", "chosen", "rejected"}` records of one spec or a list of them (see the module docstring); `limit`:
    the first N usable pairs per spec."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    pairs = []
    for one in specs:
        parsed = parse_prompt_spec(one, split=split, limit=limit)
        found, left_out = [], 0
        files, _ = spec_files(parsed)
        for path, where in files:
            for index, record in enumerate(read_records(path, where)):
                pair = to_pair(record, where, index)
                if pair is None:
                    left_out += 1
                    continue
                found.append(pair)
                if parsed.limit is not None and len(found) >= parsed.limit:
                    break
            if parsed.limit is not None and len(found) >= parsed.limit:
                break
        if left_out:
            logger.warning(f"{one}: {left_out} pairs left out (a prompt of several turns, or identical responses).")
        if not found:
            raise ValueError(f"{one}: no usable preference pairs (single-turn prompts with two different responses).")
        pairs += found
    return pairs


def pair_records(data) -> list[dict]:
    """Preference pairs from data held in Python: a `datasets.Dataset` (e.g. a TRL preference dataset, plain or
    conversational) or any iterable of dicts in the formats `load_pairs` reads; pairs MARA cannot decode are left
    out and counted."""
    if isinstance(data, (str, bytes, dict)):
        raise TypeError("pair_records takes a collection of pairs (a datasets.Dataset or a list of dicts), got a "
                        f"single {type(data).__name__}; load a preference set with load_pairs(spec).")
    pairs, left_out = [], 0
    for index, record in enumerate(data):
        pair = to_pair(record, "the given pairs", index)
        if pair is None:
            left_out += 1
        else:
            pairs.append(pair)
    if left_out:
        logger.warning(f"{left_out} of the given pairs left out (a prompt of several turns, or identical responses).")
    if not pairs:
        raise ValueError("No usable preference pairs in the given data (single-turn prompts with two different "
                         "responses).")
    return pairs


def to_pair(record, where: str, index: int) -> dict | None:
    """One record as a pair; None when it cannot be one MARA decodes (several turns, identical responses). A record
    without the columns raises: the file is not a preference set."""
    if not isinstance(record, dict) or not all(c in record for c in COLUMNS):
        have = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: record {index} has no 'chosen' and 'rejected' columns (it has {have}); a "
                         "preference set has TRL's prompt/chosen/rejected columns or HH-RLHF's chosen/rejected "
                         "dialogues.")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen, rejected = _last_assistant(chosen), _last_assistant(rejected)
        if prompt is None:
            prompt = single_user_turn(record["chosen"][:-1]) if isinstance(record["chosen"], list) else None
    if isinstance(prompt, list):
        prompt = single_user_turn(prompt)
    if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):  # HH-RLHF dialogues
        head, _, chosen_text = chosen.rpartition(_TURN)
        head_r, _, rejected_text = rejected.rpartition(_TURN)
        if not head or head != head_r or head.count("\n\nHuman:") != 1:
            return None
        prompt, chosen, rejected = head.split("\n\nHuman:", 1)[1].strip(), chosen_text, rejected_text
    if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        return None
    chosen, rejected = chosen.strip(), rejected.strip()
    if not prompt.strip() or chosen == rejected:
        return None
    return {"prompt": prompt.strip(), "chosen": chosen, "rejected": rejected}


def _last_assistant(messages):
    if isinstance(messages, str):
        return messages
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        return None
    return messages[-1].get("content")


