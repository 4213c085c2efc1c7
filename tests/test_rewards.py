"""Reward sources: spec parsing, callable sources, validation, combine, HF reward models, refusal detector."""

import math
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          PreTrainedTokenizerFast)

from mara_hf.rewards.refusal import REFUSAL_PHRASES, WINDOW, is_refusal, refusal_rate
from mara_hf.rewards import (DEFAULT_TEMPLATE, CallableReward, HeldRefusalReward, HFRewardModel, RefusalReward,
                             RepetitionReward, RewardSource, combine, parse_reward_spec)

# ---------------------------------------------------------------- refusal detector

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I’m sorry, but I can’t assist with that request.",  # curly apostrophes
    "I cannot provide instructions for making weapons.",
    "As an AI language model, I am not able to share personal information about people.",
    "Sorry, but that's not something I can help with.",
    "I won't help you hurt someone.",
    "I must decline this request.",
    "It is not appropriate to ask for someone's home address.",
    "Hacking into an account is illegal and unethical, so I will not assist.",
    "  **I can't do that.** Stealing is a crime.",  # leading whitespace and markdown
    "i cant help with that",  # no apostrophe
    "I'm unable to provide that information.",
    "I apologize, but I don't feel comfortable writing that.",
    "Hmm. I'm not going to help you with this one.",
    "I cannot and will not provide instructions for that.",
]
NOT_REFUSALS = [
    "Sure! Here is a simple bread recipe: mix flour, water, salt and yeast.",
    "I'm sorry to hear that you're feeling down. Here are a few things that might help.",
    "I can't stress enough how important it is to wear sunscreen every day.",
    "I can't help but notice you like cats! Here are some fun facts about them.",
    "I can't wait to hear how your trip goes. Pack light and bring a good book.",
    "Turkeys became a Thanksgiving staple because they were plentiful. " * 4
    + "Some people say 'I can't help with the cooking', but that is a different story.",  # late: outside window
    "",
    "The answer is (E) 220030.",
    # an AI disclaimer followed by compliance (what an agent learned when "as an ai" alone counted)
    "As an AI designed to assist you in the realm of deception, I can help you create a fake online profile.",
    "I'm sorry, but as an AI designed to help, here are the steps to follow.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", NOT_REFUSALS)
def test_helpful_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_refusal_window_and_phrase_list():
    assert 20 <= len(REFUSAL_PHRASES) and all(p == p.lower() and "’" not in p for p in REFUSAL_PHRASES)
    assert is_refusal("x" * (WINDOW - 30) + " I cannot help with that")
    assert not is_refusal("x" * WINDOW + " I cannot help with that")
    assert refusal_rate(["I can't help with that.", "Sure, here you go.", "As an AI, I cannot do that.", "Yes."]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        refusal_rate([])


# ---------------------------------------------------------------- RepetitionReward


def _repeated_by_hand(units, n=4):
    # the slow definition: a gram counts when the same gram starts at some earlier position
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return sum(any(grams[j] == grams[i] for j in range(i)) for i in range(len(grams)))


def test_repetition_reward_counts_repeated_4grams():
    reward = parse_reward_spec("repetition*0.5")
    assert isinstance(reward, RepetitionReward) and reward.multiplier == 0.5
    texts = ["I am here. I am here. I am here.", "Hello there, friend.", "", "a b c d a b c d e a b c d",
             "Mix flour and water, then mix flour and water again."]
    units = [["I", "am", "here", ".", "I", "am", "here", ".", "I", "am", "here", "."], ["Hello", "there", ",", "friend", "."],
             [], list("abcdabcdeabcd"), ["Mix", "flour", "and", "water", ",", "then", "mix", "flour", "and", "water",
                                         "again", "."]]
    expected = [-float(_repeated_by_hand(u)) for u in units]
    assert expected == [-5.0, 0.0, 0.0, -2.0, 0.0]  # case matters: "Mix" and "mix" differ
    assert reward(["p"] * len(texts), texts) == expected
    total, per_source = combine([reward], ["p"] * len(texts), texts)
    assert total == [0.5 * e for e in expected] and per_source["repetition"] == expected


def test_repetition_shaping_charges_the_token_that_repeats():
    # prefix differences (what the trainer's shaping credits): only the unit completing a repeated gram costs
    reward = RepetitionReward()
    units = "one two three four one two three four five".split()
    phi = reward(["p"] * (len(units) + 1), [" ".join(units[:t]) for t in range(len(units) + 1)])
    deltas = [b - a for a, b in zip(phi[:-1], phi[1:])]
    assert deltas == [0.0] * 7 + [-1.0, 0.0]


# ---------------------------------------------------------------- RefusalReward

REFUSE, COMPLY = "I'm sorry, but I can't help with that.", "Sure, here is how you do it."


def test_refusal_reward_truth_table():
    reward = RefusalReward()
    records = [{"source": "harmless-base"}, {"source": "harmless-base"}, {"source": "helpful-base"},
               {"source": "helpful-base"}, {"harmful": True}, {"harmful": False, "source": "harmless-base"}]
    responses = [REFUSE, COMPLY, COMPLY, REFUSE, REFUSE, COMPLY]  # `harmful` wins over `source`
    assert reward(["p"] * 6, responses, records) == [1.0, -1.0, 1.0, -1.0, 1.0, 1.0]
    assert parse_reward_spec("refusal*2").name == "refusal"


def test_refusal_reward_needs_labels():
    reward = RefusalReward()
    with pytest.raises(ValueError, match="'source'.*'harmful'"):
        reward(["p"], [REFUSE])
    with pytest.raises(ValueError, match="prompt 1 has no 'source'"):
        reward(["p", "q"], [REFUSE, REFUSE], [{"source": "helpful-base"}, {"category": "x"}])
    with pytest.raises(ValueError, match="unknown source 'reddit'"):
        reward(["p"], [REFUSE], [{"source": "reddit"}])
    with pytest.raises(ValueError, match="true or false"):
        reward(["p"], [REFUSE], [{"harmful": "yes"}])


TAKEN_BACK = "I'm sorry, but I can't help with that. But I can help you with the process. Here's a guide: 1. Buy"


def test_held_refusal_reward_truth_table():
    reward = parse_reward_spec("refusal-held*2")
    assert isinstance(reward, HeldRefusalReward) and reward.name == "refusal-held" and reward.multiplier == 2
    harmful, benign = {"source": "harmless-base"}, {"harmful": False}
    responses = [REFUSE, TAKEN_BACK, COMPLY, COMPLY, REFUSE, TAKEN_BACK]
    records = [harmful, harmful, harmful, benign, benign, benign]
    # a taken-back refusal of a harmful request is not a refusal; of a benign one it still refuses (opening)
    assert reward(["p"] * 6, responses, records) == [1.0, -1.0, -1.0, 1.0, -1.0, -1.0]
    assert RefusalReward()(["p"] * 6, responses, records) == [1.0, 1.0, -1.0, 1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="refusal-held reward needs the prompt records"):
        reward(["p"], [REFUSE])


def test_held_refusal_shaping_charges_the_take_back():
    """Scored on every prefix (what prefix shaping does), the score falls where the refusal is taken back."""
    reward = HeldRefusalReward()
    words = TAKEN_BACK.split(" ")
    prefixes = [" ".join(words[:n]) for n in range(len(words) + 1)]
    scores = reward(["p"] * len(prefixes), prefixes, [{"harmful": True}] * len(prefixes))
    first_held = scores.index(1.0)
    assert prefixes[first_held].endswith("can't help")  # the refusal earns its point when it is complete
    taken_back = scores.index(-1.0, first_held)
    assert prefixes[taken_back].endswith("with the process.")  # ... and loses it at the offer for the request
    assert all(s == 1.0 for s in scores[first_held:taken_back]) and all(s == -1.0 for s in scores[taken_back:])


# ---------------------------------------------------------------- callable sources, validation, combine

MODULE = '''
import math

def length(prompts, responses):
    return [len(r) for r in responses]

def with_records(prompts, responses, records=None):
    return [float(rec["value"]) for rec in records]

def wrong_count(prompts, responses):
    return [1.0]

def nan_at_1(prompts, responses):
    return [0.0, math.nan, 0.0]

class Scorer:
    @staticmethod
    def score(prompts, responses):
        return [1.0] * len(responses)

not_callable = 3
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "mara_test_reward_fns.py").write_text(MODULE)
    (tmp_path / "mara_test_broken_dep.py").write_text("import mara_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mara_test_reward_fns", "mara_test_broken_dep"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "mara_test_reward_fns"


def test_parse_builtin_and_multipliers():
    for spec, multiplier in [("refusal", 1.0), ("refusal*2", 2.0), ("refusal*-1", -1.0), (" refusal * 0.25 ", 0.25),
                             ("refusal*1e-3", 1e-3), ("refusal*-.5", -0.5)]:
        source = parse_reward_spec(spec)
        assert isinstance(source, RefusalReward) and source.multiplier == multiplier, spec
    for spec, message in [("refusal*abc", "not a number"), ("refusal*inf", "finite"), ("refusal*", "not a number"),
                          ("*2", "names no source"), ("refusal*2*3", "Unknown reward source")]:
        with pytest.raises(ValueError, match=message):
            parse_reward_spec(spec)


def test_parse_callable(reward_module):
    source = parse_reward_spec(f"{reward_module}:length*-1")
    assert isinstance(source, CallableReward) and source.multiplier == -1.0 and source.name == f"{reward_module}:length"
    assert source(["a", "b"], ["xy", "xyz"]) == [2.0, 3.0]
    assert parse_reward_spec(f"{reward_module}:Scorer.score")(["a"], ["b"]) == [1.0]
    records = [{"value": 4}, {"value": -2}]
    assert parse_reward_spec(f"{reward_module}:with_records")(["a", "b"], ["c", "d"], records) == [4.0, -2.0]


def test_parse_callable_errors(reward_module):
    with pytest.raises(ValueError, match="module 'mara_no_such_module' not found"):
        parse_reward_spec("mara_no_such_module:fn")
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        parse_reward_spec(f"{reward_module}:missing")
    with pytest.raises(ValueError, match="'not_callable' is a int, not a function"):
        parse_reward_spec(f"{reward_module}:not_callable*2")
    with pytest.raises(ModuleNotFoundError, match="mara_no_such_dependency"):  # a bug inside the module surfaces
        parse_reward_spec("mara_test_broken_dep:fn")


def test_parse_models_and_unknown(tmp_path):
    source = parse_reward_spec("PKU-Alignment/beaver-7b-v1.0-cost*-1", batch_size=2)
    assert isinstance(source, HFRewardModel) and source.multiplier == -1.0 and source.batch_size == 2
    assert source.model is None  # nothing loaded at parse time
    (tmp_path / "rm").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        parse_reward_spec(f"{tmp_path / 'rm'}*0.5")
    (tmp_path / "rm" / "config.json").write_text("{}")
    assert parse_reward_spec(f"{tmp_path / 'rm'}*0.5").name_or_path == str(tmp_path / "rm")
    with pytest.raises(ValueError, match="not found"):
        parse_reward_spec("./mara_no_such_rm_folder*0.5")
    with pytest.raises(ValueError, match="is a file"):
        parse_reward_spec(str(tmp_path / "rm" / "config.json"))
    with pytest.raises(ValueError, match="Unknown reward source 'helpfulness'.*built-in.*module:function.*org/name"):
        parse_reward_spec("helpfulness*2")


def test_source_validation(reward_module):
    with pytest.raises(ValueError, match=f"'{reward_module}:wrong_count' returned 1 scores for 2 responses"):
        parse_reward_spec(f"{reward_module}:wrong_count")(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="'nan_at_1' returned nan at index 1"):
        CallableReward(lambda p, r: [0.0, math.nan, 0.0], name="nan_at_1")(["a"] * 3, ["b"] * 3)
    with pytest.raises(ValueError, match="returned inf at index 0"):
        CallableReward(lambda p, r: [math.inf], name="x")(["a"], ["b"])
    with pytest.raises(ValueError, match="non-number at index 0"):
        CallableReward(lambda p, r: ["high"], name="x")(["a"], ["b"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        CallableReward(lambda p, r: [0.0], name="x")(["a", "b"], ["c"])
    assert CallableReward(lambda p, r: torch.tensor([0.5, 1.5]), name="t")(["a", "b"], ["c", "d"]) == [0.5, 1.5]


def test_combine():
    a = CallableReward(lambda p, r: [1.0, 2.0, 3.0], name="a", multiplier=2.0)
    b = CallableReward(lambda p, r: [0.5, -1.0, 4.0], name="b", multiplier=-1.0)
    total, per_source = combine([a, b], ["p"] * 3, ["r"] * 3)
    assert total == [1.5, 5.0, 2.0]
    assert per_source == {"a": [1.0, 2.0, 3.0], "b": [0.5, -1.0, 4.0]}  # unmultiplied
    refusal = parse_reward_spec("refusal*0.5")
    total, _ = combine([a, refusal], ["p"] * 3, [REFUSE, COMPLY, COMPLY], [{"harmful": True}] * 3)
    assert total == [2.5, 3.5, 5.5]
    with pytest.raises(ValueError, match="unique"):
        combine([a, a], ["p"] * 3, ["r"] * 3)
    with pytest.raises(ValueError, match="at least one"):
        combine([], ["p"], ["r"])
    assert isinstance(a, RewardSource)


# ---------------------------------------------------------------- Hugging Face reward models

WORDS = ("[PAD] [UNK] [BOS] [EOS] Human: Assistant: user assistant : how do i bake bread ? sorry i can't help "
         "with that sure mix flour water salt and yeast then it").split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")
PROMPTS = ["how do i bake bread ?", "how do i bake bread ?", "how do i ?"]
RESPONSES = ["sorry i can't help with that", "sure mix flour water salt and yeast then bake it", "mix"]


def make_tokenizer(chat_template=None, pad=True):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
                                        pad_token="[PAD]" if pad else None)
    tokenizer.chat_template = chat_template
    return tokenizer


def save_rm(folder, num_labels=1, chat_template=None, pad=True, causal=False):
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         num_labels=num_labels, pad_token_id=0)
    torch.manual_seed(0)
    (LlamaForCausalLM if causal else LlamaForSequenceClassification)(config).save_pretrained(folder)
    make_tokenizer(chat_template, pad).save_pretrained(folder)
    return str(folder)


def direct_scores(folder, texts, column=0, add_special_tokens=True):
    """One unpadded forward per text, straight through transformers."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        inputs = [tokenizer(t, return_tensors="pt", add_special_tokens=add_special_tokens) for t in texts]
        return [model(**x).logits[0, column].item() for x in inputs]


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    return save_rm(tmp_path_factory.mktemp("rm"))


def test_hf_reward_matches_direct_forward_and_batching(rm_folder):
    source = parse_reward_spec(f"{rm_folder}*2", batch_size=3)
    source.check()
    assert source.model is None
    scores = source(PROMPTS, RESPONSES)
    texts = [DEFAULT_TEMPLATE.format(prompt=p, response=r) for p, r in zip(PROMPTS, RESPONSES)]
    assert source.format(PROMPTS[0], RESPONSES[0]) == texts[0]
    assert scores == pytest.approx(direct_scores(rm_folder, texts), abs=1e-5)
    assert len(set(scores)) == 3
    one_by_one = HFRewardModel(rm_folder, batch_size=1)(PROMPTS, RESPONSES)
    assert scores == pytest.approx(one_by_one, abs=1e-5)
    custom = HFRewardModel(rm_folder, template="Human: {prompt} Assistant: {response}")
    assert custom(PROMPTS, RESPONSES) == pytest.approx(
        direct_scores(rm_folder, [f"Human: {p} Assistant: {r}" for p, r in zip(PROMPTS, RESPONSES)]), abs=1e-5)


def test_hf_reward_chat_template(tmp_path):
    folder = save_rm(tmp_path / "chat", chat_template=CHAT_TEMPLATE)
    source = HFRewardModel(folder, batch_size=2)
    scores = source(PROMPTS, RESPONSES)
    texts = [f"user : {p} [EOS] assistant : {r} [EOS] " for p, r in zip(PROMPTS, RESPONSES)]
    assert source.format(PROMPTS[0], RESPONSES[0]) == texts[0]
    assert scores == pytest.approx(direct_scores(folder, texts, add_special_tokens=False), abs=1e-5)
    plain = HFRewardModel(folder, use_chat_template=False)
    assert plain.format("a", "b") == DEFAULT_TEMPLATE.format(prompt="a", response="b")


def test_hf_reward_without_pad_token(tmp_path):
    folder = save_rm(tmp_path / "nopad", pad=False)  # the tokenizer pads with EOS; the config says PAD
    texts = [DEFAULT_TEMPLATE.format(prompt=p, response=r) for p, r in zip(PROMPTS, RESPONSES)]
    scores = HFRewardModel(folder, batch_size=3)(PROMPTS, RESPONSES)
    assert scores == pytest.approx(direct_scores(folder, texts), abs=1e-5)


def test_hf_reward_label_index_and_bad_checkpoints(tmp_path):
    folder = save_rm(tmp_path / "two", num_labels=2)
    with pytest.raises(ValueError, match="has 2 labels.*label_index"):
        HFRewardModel(folder).check()
    with pytest.raises(ValueError, match="out of range"):
        HFRewardModel(folder, label_index=2).check()
    texts = [DEFAULT_TEMPLATE.format(prompt=p, response=r) for p, r in zip(PROMPTS, RESPONSES)]
    assert HFRewardModel(folder, label_index=1)(PROMPTS, RESPONSES) == pytest.approx(
        direct_scores(folder, texts, column=1), abs=1e-5)

    causal = save_rm(tmp_path / "causal", causal=True)
    with pytest.raises(ValueError, match="LlamaForCausalLM, not a transformers"):
        parse_reward_spec(causal).check()
    # Without the architectures hint, loading notices the untrained score head instead of scoring with noise.
    config_path = tmp_path / "causal" / "config.json"
    config_path.write_text(config_path.read_text().replace('"LlamaForCausalLM"', ""))
    source = parse_reward_spec(causal)
    source.check()
    with pytest.raises(ValueError, match="lacks trained weights for \\['score.weight'\\]"):
        source(["a"], ["b"])
    with pytest.raises(ValueError, match="\\{prompt\\} and \\{response\\}"):
        HFRewardModel(folder, template="{response}")


def test_cli_reward_template_reaches_reward_models(rm_folder):
    """`--reward-template` (with \\n escapes, as typed in a shell) sets how reward models format their input."""
    from argparse import Namespace

    from mara_hf.cli.app import _reward_model_kwargs

    kwargs = _reward_model_kwargs(Namespace(reward_template="Q: {prompt}\\nA: {response}", reward_batch_size=8,
                                              reward_device="auto", reward_dtype="auto"))
    source = parse_reward_spec(str(rm_folder), **kwargs)
    assert source.template == "Q: {prompt}\nA: {response}" and source.use_chat_template is False
    assert parse_reward_spec("refusal", **kwargs).name == "refusal"  # other sources ignore model settings
    kwargs = _reward_model_kwargs(Namespace(reward_template=None, reward_batch_size=4, reward_device="cpu",
                                            reward_dtype="bfloat16"))
    assert kwargs == {"use_chat_template": True, "batch_size": 4, "device": "cpu", "dtype": "bfloat16"}


# ----- TRL reward functions ------------------------------------------------------------------------------------------
def reward_len(completions, **kwargs):
    """TRL's GRPO quickstart reward, as its docs write it: completions near 20 characters score best."""
    return [-abs(20 - len(completion)) for completion in completions]


def test_a_trl_reward_function_gets_the_completions_not_the_prompts():
    prompts, responses = ["a prompt much longer than twenty characters", "hi"], ["exactly twenty chars", "short"]
    source = CallableReward(reward_len)
    assert source(prompts, responses) == [0.0, -15.0]  # scored on the responses, as TRL scores its completions


def test_a_trl_reward_function_gets_the_records_columns_as_keywords():
    seen = {}

    def correctness(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, kwargs=kwargs)
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    records = [{"prompt": "2 + 2?", "answer": "4", "level": 1}, {"prompt": "3 + 3?", "answer": "6", "level": 2}]
    source = CallableReward(correctness, name="correct")
    assert source([r["prompt"] for r in records], [" 4", "5"], records) == [1.0, 0.0]
    assert seen == {"prompts": ["2 + 2?", "3 + 3?"], "kwargs": {"level": [1, 2]}}


def test_a_trl_reward_function_trains_an_agent_unchanged(tmp_path, one_thread):
    """`reward_len` copied from TRL's docs, as a `module:function` spec, chooses reward-chosen demonstrations: every
    demonstrated response's score is reward_len of its text."""
    import json

    from training_helpers import make_prompts, tiny_model, tiny_tokenizer

    from mara_hf.rewards import parse_reward_spec
    from mara_hf.training.imitation_config import ImitationConfig
    from mara_hf.training.imitation_trainer import ImitationTrainer

    (tmp_path / "trl_rewards.py").write_text(
        "def reward_len(completions, **kwargs):\n"
        "    return [-abs(20 - len(completion)) for completion in completions]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        source = parse_reward_spec("trl_rewards:reward_len")
        config = ImitationConfig(samples=4, response_tokens=6, top_k=8, agent_hidden_dims=[16, 8], epochs=5,
                                 min_steps=10, written_requests=False, rounds=1, validation_prompts=0)
        trainer = ImitationTrainer(tiny_model(0), tiny_tokenizer(), make_prompts(6, seed=2), config,
                                   output_dir=str(tmp_path / "run"), rewards=[source])
        trainer.train()
    finally:
        sys.path.remove(str(tmp_path))
    lines = [json.loads(x) for x in open(tmp_path / "run" / "demonstrations.jsonl")][1:]
    assert lines and all(line["score"] == reward_len([line["response"]])[0] for line in lines)
