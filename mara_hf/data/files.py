"""Reading prompt files: a JSON list or JSONL (one object a line), gzip / xz / parquet, and the split file of a
folder."""

import gzip
import json
import lzma
import os

# Files tried inside a folder spec, e.g. prompts/HHrlhf + split "test" -> prompts/HHrlhf/test.json.
_SPLIT_FILES = ("{split}.json", "{split}.jsonl", "{split}.json.gz", "{split}.jsonl.gz")


def split_file(folder: str, split: str) -> str:
    for pattern in _SPLIT_FILES:
        path = os.path.join(folder, pattern.format(split=split))
        if os.path.isfile(path):
            return path
    tried = ", ".join(pattern.format(split=split) for pattern in _SPLIT_FILES)
    raise FileNotFoundError(f"No prompt file for split {split!r} in folder {folder} (looked for {tried})")


def read_records(path: str, where: str):
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
