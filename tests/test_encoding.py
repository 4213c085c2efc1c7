"""One prompt encoder: every command decodes from the ids `tokenizer(prompt)` gives (chat template aside), so an
agent is fitted and trained on the states decoding produces. The tokenizer here adds a BOS token and has no chat
template: the case where encoding prompts without special tokens in one command and with them in another made
`imitate` fit states that decoding never produces."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from training_helpers import VOCAB, tiny_model
from transformers import LlamaModel, PreTrainedTokenizerFast

from mara_hf import MaraAgent, MaraConfig
from mara_hf.cli.app import main
from mara_hf.data.encoding import encode_prompts

PROMPTS = ["t40 t41 t42", "t50 t51", "t60 t61 t62 t63 t44"]


def bos_tokenizer(chat_template=None) -> PreTrainedTokenizerFast:
    """Word-level ("t<i>" is id i) with a BOS token (t2) that plain `tokenizer(text)` adds; pad t0, eos t1."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="t2 $A", special_tokens=[("t2", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1", bos_token="t2")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_plain_prompts_keep_the_tokenizers_special_tokens_left_padded():
    tokenizer = bos_tokenizer()
    tokenizer.padding_side = "right"
    enc = encode_prompts(tokenizer, PROMPTS)
    for ids, mask, prompt in zip(enc["input_ids"], enc["attention_mask"], PROMPTS):
        expected = tokenizer(prompt)["input_ids"]
        assert expected[0] == 2 and ids[mask.bool()].tolist() == expected
        assert mask.tolist() == sorted(mask.tolist())  # padding on the left
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was


def test_chat_prompts_take_the_templates_tokens_only():
    template = ("{% for m in messages %}t3 {{ m['content'] }} t4 {% endfor %}"
                "{% if add_generation_prompt %}t5{% endif %}")
    tokenizer = bos_tokenizer(template)
    enc = encode_prompts(tokenizer, ["t40 t41"])
    assert enc["input_ids"][0].tolist() == [3, 40, 41, 4, 5]  # no BOS before what the template writes


def test_a_tokenizer_without_pad_token_is_padded_with_eos_and_not_changed():
    tokenizer = bos_tokenizer()
    tokenizer.pad_token = None
    enc = encode_prompts(tokenizer, PROMPTS)
    assert tokenizer.pad_token is None
    assert enc["input_ids"][1, 0].item() == tokenizer.eos_token_id and enc["attention_mask"][1, 0].item() == 0


@pytest.fixture
def prefills(monkeypatch):
    """The prompts (padding stripped) of every prefill of a llama's KV cache: what each command decodes from (a
    forward without a cache, such as the NLL measurement over prompt and response, is not decoding)."""
    seen = []
    real = LlamaModel.forward

    def spy(self, *args, **kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        prefill = cache is not None and cache.get_seq_length() == 0
        if ids is not None and prefill and (mask is None or mask.dim() == 2):
            for row in range(ids.shape[0]):
                seen.append(tuple(ids[row][mask[row].bool()].tolist() if mask is not None else ids[row].tolist()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", spy)
    return seen


@pytest.fixture
def files(tmp_path):
    model, tokenizer = tiny_model(seed=0), bos_tokenizer()
    model.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    torch.manual_seed(0)
    MaraAgent(MaraConfig(state_dim=model.config.hidden_size, hidden_dims=[8, 4], top_k=5)).save_pretrained(tmp_path / "agent")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p, "harmful": i == 0}) + "\n" for i, p in enumerate(PROMPTS))
    return tmp_path, {tuple(tokenizer(p)["input_ids"]) for p in PROMPTS}


def test_imitate_train_eval_and_generate_decode_from_the_same_ids(files, prefills, one_thread):
    tmp, expected = files
    llm, prompts = str(tmp / "llm"), str(tmp / "prompts.jsonl")
    commands = {
        "imitate": ["imitate", "--model", llm, "--prompts", prompts, "--output", str(tmp / "imitate"),
                    "--refusals", "t30 t31", "--top-k", "5", "--benign-tokens", "2", "--no-written-requests",
                    "--agent-hidden-dims", "8", "4", "--epochs", "1"],
        "train": ["train", "--model", llm, "--prompts", prompts, "--reward", "repetition", "--output",
                  str(tmp / "train"), "--episodes", "3", "--rollout-batch-size", "3", "--max-new-tokens", "2",
                  "--top-k", "5", "--batch-size", "4", "--learning-starts", "4", "--updates-per-episode", "1",
                  "--agent-hidden-dims", "8", "4", "--no-shaping"],
        "eval": ["eval", "--model", llm, "--agent", str(tmp / "agent"), "--prompts", prompts, "--output",
                 str(tmp / "eval.jsonl"), "--max-new-tokens", "2"],
    }
    for name, argv in commands.items():
        prefills.clear()
        assert main(argv) == 0, name
        assert prefills and set(prefills) <= expected, (name, set(prefills) - expected)
        assert set(prefills) == expected, name  # every prompt was decoded, each from the tokenizer's own ids
