"""Prompt loading from local files (real prompt sets in ../shared/data, error cases) and chat formatting.

Public prompt sets by name, Hub datasets and mixing several specs: tests/test_public_prompts.py."""

import gzip
import json
import os

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mara_hf.data.encoding import format_prompts
from mara_hf.data.prompts import load_prompts

# ../shared sits beside the repository (in CI too); MARA_SHARED_DATA points elsewhere when it does not.
DATA = os.environ.get("MARA_SHARED_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="shared data not available")


@needs_data
def test_real_prompt_sets():
    hh = load_prompts(f"{DATA}/prompts/HHrlhf/test.json")
    assert len(hh) == 200
    assert hh[0]["prompt"] == hh[0]["instruction"] and hh[0]["prompt"].startswith("Do you know why turkeys")
    assert {p["source"] for p in hh} == {"helpful-base", "harmless-base"}
    assert load_prompts(f"{DATA}/prompts/HHrlhf", split="test") == hh  # a folder holding {split}.json
    assert len(load_prompts(f"{DATA}/prompts/SafeRLHF/test.json")) == 200
    beaver = load_prompts(f"{DATA}/prompts/BeaverTails/test.json", limit=5)
    assert len(beaver) == 5 and {"prompt", "category", "category_id"} <= set(beaver[0])


@needs_data
def test_hh_rlhf_jsonl_gz_with_column():
    path = f"{DATA}/hh-rlhf/harmless-base-test.jsonl.gz"
    pairs = load_prompts(path, column="chosen")
    assert len(pairs) == 2312
    assert pairs[0]["prompt"] == pairs[0]["chosen"] and pairs[0]["prompt"].startswith("\n\nHuman:")
    assert "rejected" in pairs[0]
    assert len(load_prompts(path, column="rejected", limit=3)) == 3
    with pytest.raises(ValueError, match=r"Record 0 of .* has no 'instruction' / 'prompt' / 'question' field; "
                                         r"its fields are \['chosen', 'rejected'\]"):
        load_prompts(path)


def test_local_formats(tmp_path):
    records = [{"prompt": "a", "id": 1}, {"question": "b"}, {"instruction": "c", "prompt": "ignored"}]
    (tmp_path / "list.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "lines.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n\n")
    with gzip.open(tmp_path / "list.json.gz", "wt") as f:
        json.dump(records, f)
    for name in ("list.json", "lines.jsonl", "list.json.gz"):
        prompts = load_prompts(str(tmp_path / name))
        assert [p["prompt"] for p in prompts] == ["a", "b", "c"], name
        assert prompts[0]["id"] == 1 and prompts[2]["instruction"] == "c"
    assert len(load_prompts(str(tmp_path / "lines.jsonl"), limit=2)) == 2
    (tmp_path / "custom.jsonl").write_text('{"text": "x", "harmful": true}\n')
    custom = load_prompts(str(tmp_path / "custom.jsonl"), column="text")
    assert custom == [{"prompt": "x", "text": "x", "harmful": True}]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Prompt file not found: .*missing.json"):
        load_prompts(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="No prompt file for split 'dev'"):
        load_prompts(str(tmp_path), split="dev")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="contains no prompt records"):
        load_prompts(str(tmp_path / "empty.json"))
    (tmp_path / "empty_list.json").write_text("[]")
    with pytest.raises(ValueError, match="contains no prompt records"):
        load_prompts(str(tmp_path / "empty_list.json"))
    (tmp_path / "bad.json").write_text('[\n  {"instruction": "a"},\n  {"instruction": "b",}\n]')
    with pytest.raises(ValueError, match=r"Invalid JSON in .*bad.json \(line 3"):
        load_prompts(str(tmp_path / "bad.json"))
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a"}\n{"instruction": b}\n')
    with pytest.raises(ValueError, match="Invalid JSON in .*bad.jsonl at line 2"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nofield.jsonl").write_text('{"instruction": "a"}\n{"text": "b", "id": 2}\n')
    with pytest.raises(ValueError, match=r"Record 1 .* no 'instruction' / 'prompt' / 'question' field; its fields are "
                                         r"\['id', 'text'\]"):
        load_prompts(str(tmp_path / "nofield.jsonl"))
    with pytest.raises(ValueError, match=r"no 'body' field; its fields are \['instruction'\]"):
        load_prompts(str(tmp_path / "nofield.jsonl"), column="body")
    (tmp_path / "strings.json").write_text('["a", "b"]')
    with pytest.raises(ValueError, match="Record 0 .* is a str, expected a JSON object"):
        load_prompts(str(tmp_path / "strings.json"))
    (tmp_path / "blank.json").write_text('[{"prompt": "  "}]')
    with pytest.raises(ValueError, match="must be a non-empty string"):
        load_prompts(str(tmp_path / "blank.json"))
    with pytest.raises(ValueError, match="limit"):
        load_prompts(str(tmp_path / "blank.json"), limit=0)


def tiny_tokenizer(chat_template=None):
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[EOS]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_format_prompts():
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = tiny_tokenizer(template)
    assert format_prompts(chat, ["hi", "yo"]) == ["<user>hi</s><assistant>", "<user>yo</s><assistant>"]
    assert format_prompts(chat, ["hi"], system_prompt="Be safe.") == ["<system>Be safe.</s><user>hi</s><assistant>"]
    assert format_prompts(tiny_tokenizer(), ["hi", "yo"], system_prompt="ignored") == ["hi", "yo"]


def test_format_prompts_real_chat_template():
    from mara_hf.models import _cache_root

    folder = os.path.join(_cache_root(), "SmolLM2-135M-Instruct")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        pytest.skip("embedded SmolLM2 not converted yet")
    from transformers import AutoTokenizer

    (text,) = format_prompts(AutoTokenizer.from_pretrained(folder), ["How do I bake bread?"])
    assert text.endswith("<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n")


def test_the_request_sets_that_ship_with_mara_hf_load_by_name():
    """`mara-hf:NAME` loads a file of mara_hf/data from any install (a wheel has no clone to point into)."""
    import mara_hf.data
    from mara_hf.data.prompts import parse_prompt_spec

    folder = os.path.dirname(mara_hf.data.__file__)
    with open(os.path.join(folder, "everyday_requests.jsonl")) as f:
        written = [json.loads(line) for line in f if line.strip()]
    assert load_prompts("mara-hf:everyday") == load_prompts("mara-hf:everyday_requests") == written
    assert sum(r["harmful"] for r in written) == 30 and len(written) == 60
    assert load_prompts("mara-hf:everyday,limit=5") == written[:5]
    assert parse_prompt_spec("mara-hf:everyday,limit=5").name == "mara-hf:everyday,limit=5"  # provenance: no path
    for name in ("dev", "harmful", "benign_lookalikes", "contrast"):
        assert load_prompts(f"mara-hf:{name}")
    with pytest.raises(FileNotFoundError, match="shipped: mara-hf:benign_lookalikes, .*mara-hf:everyday"):
        load_prompts("mara-hf:everday")
