"""TRL's dataset and reward-function formats, as they are: prompt-only and preference datasets (plain and
conversational, parquet on the Hub as TRL publishes them) load by Hub id and as a `datasets.Dataset` from Python,
and a reward function written for TRL's conversational datasets trains an agent unchanged."""

import io
import json
import sys

import pytest

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")
import pyarrow  # noqa: E402

from hub_server import HubServer, patch_hub_endpoint  # noqa: E402
from training_helpers import make_prompts, tiny_model, tiny_tokenizer  # noqa: E402

from mara_hf.data.pairs import load_pairs, pair_records  # noqa: E402
from mara_hf.data.prompts import CONVERSATION, load_prompts, prompt_records  # noqa: E402


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
# TRL's prompt-only formats: plain ("prompt": text) and conversational ("prompt": messages)
PLAIN_PROMPTS = [{"prompt": "Name a fruit."}, {"prompt": "Name a colour."}]
CONVERSATIONAL_PROMPTS = [{"prompt": [user("Name a fruit.")]}, {"prompt": [SYSTEM, user("Name a colour.")]},
                          {"prompt": [user("Hi"), assistant("Hello"), user("Name a city.")]}]  # several turns
# TRL's preference formats: explicit prompt (plain or conversational) and implicit prompt (conversational)
PLAIN_PAIRS = [{"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "No."}]
CONVERSATIONAL_PAIRS = [{"prompt": [user("Name a fruit.")], "chosen": [assistant("An apple.")],
                         "rejected": [assistant("No.")]}]
IMPLICIT_PAIRS = [{"chosen": [user("Name a fruit."), assistant("An apple.")],
                   "rejected": [user("Name a fruit."), assistant("No.")], "score_chosen": 8.0, "score_rejected": 2.0}]
EXPECTED_PAIR = {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "No."}


def parquet(records) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pyarrow.Table.from_pylist(records), buffer)
    return buffer.getvalue()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """TRL-style datasets as TRL publishes them: data/{split}-00000-of-00001.parquet."""
    with HubServer() as server:
        patch_hub_endpoint(monkeypatch, server.url, cache_dir=tmp_path / "hub-cache")
        for repo, records in (("trl-lib/plain-prompts", PLAIN_PROMPTS), ("trl-lib/chat-prompts", CONVERSATIONAL_PROMPTS),
                              ("trl-lib/plain-pairs", PLAIN_PAIRS), ("trl-lib/chat-pairs", CONVERSATIONAL_PAIRS),
                              ("trl-lib/implicit-pairs", IMPLICIT_PAIRS)):
            server.add_repo(repo, {"data/train-00000-of-00001.parquet": parquet(records)}, repo_type="dataset")
        yield server


def test_trl_prompt_datasets_load_by_hub_id_plain_and_conversational(hub):
    assert [p["prompt"] for p in load_prompts("trl-lib/plain-prompts")] == ["Name a fruit.", "Name a colour."]
    chat = load_prompts("trl-lib/chat-prompts")  # the conversation of several turns is left out
    assert [p["prompt"] for p in chat] == ["Name a fruit.", "Name a colour."]
    assert chat[1][CONVERSATION] == [SYSTEM, user("Name a colour.")]  # kept as TRL would pass it to a reward function
    # the same records from Python, as a datasets.Dataset or a list
    for data in (datasets.Dataset.from_list(CONVERSATIONAL_PROMPTS), CONVERSATIONAL_PROMPTS):
        assert prompt_records(data) == chat
    assert prompt_records(["Name a fruit."]) == [{"prompt": "Name a fruit."}]
    with pytest.raises(ValueError, match="of one user turn"):
        prompt_records(CONVERSATIONAL_PROMPTS[2:])
    with pytest.raises(TypeError, match="load_prompts"):
        prompt_records("trl-lib/chat-prompts")


def test_trl_preference_datasets_load_by_hub_id_explicit_and_implicit_prompts(hub):
    for repo in ("trl-lib/plain-pairs", "trl-lib/chat-pairs", "trl-lib/implicit-pairs"):
        assert load_pairs(repo) == [EXPECTED_PAIR], repo
    for records in (PLAIN_PAIRS, CONVERSATIONAL_PAIRS, IMPLICIT_PAIRS):
        assert pair_records(datasets.Dataset.from_list(records)) == [EXPECTED_PAIR]


def conversational_reward_len(completions, **kwargs):
    """TRL's docs' length reward for conversational datasets: each completion is a list of messages."""
    return [-abs(20 - len(completion[0]["content"])) for completion in completions]


def test_a_trl_reward_function_for_conversational_data_trains_an_agent_unchanged(tmp_path, one_thread):
    """A `datasets.Dataset` of conversational prompts and a reward function written for TRL's conversational format
    (given as a module:function spec): every demonstration's score is that function of the response as an assistant
    message, and the function saw the prompts' messages."""
    from mara_hf.rewards import parse_reward_spec
    from mara_hf.training.imitation_config import ImitationConfig
    from mara_hf.training.imitation_trainer import ImitationTrainer

    (tmp_path / "trl_chat_rewards.py").write_text(
        "SEEN = []\n"
        "def reward_len(prompts, completions, **kwargs):\n"
        "    SEEN.extend(prompts)\n"
        "    return [-abs(20 - len(completion[0]['content'])) for completion in completions]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        source = parse_reward_spec("trl_chat_rewards:reward_len")
        data = datasets.Dataset.from_list([{"prompt": [user(p["prompt"])]} for p in make_prompts(6, seed=2)])
        config = ImitationConfig(samples=4, response_tokens=6, top_k=8, agent_hidden_dims=[16, 8], epochs=5,
                                 min_steps=10, written_requests=False, rounds=1, validation_prompts=0)
        ImitationTrainer(tiny_model(0), tiny_tokenizer(), data, config, output_dir=str(tmp_path / "run"),
                         rewards=[source]).train()
        seen = sys.modules["trl_chat_rewards"].SEEN
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("trl_chat_rewards", None)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "demonstrations.jsonl")][1:]
    assert len(lines) == 6
    assert all(line["score"] == conversational_reward_len([[assistant(line["response"])]])[0] for line in lines)
    assert seen and all(isinstance(p, list) and p[0]["role"] == "user" for p in seen)


def test_a_dataset_of_pairs_trains_from_python(tmp_path, one_thread):
    """Conversational pairs as a datasets.Dataset teach the decisions the same pairs teach as plain records."""
    from test_pairs import good_bad_pairs

    from mara_hf.training.imitation_config import ImitationConfig
    from mara_hf.training.imitation_trainer import ImitationTrainer

    model, tokenizer = tiny_model(0), tiny_tokenizer()
    plain = good_bad_pairs(model, tokenizer, 6, seed=3)
    chat = [{"prompt": [user(p["prompt"])], "chosen": [assistant(p["chosen"])], "rejected": [assistant(p["rejected"])]}
            for p in plain]
    config = ImitationConfig(top_k=8, response_tokens=2, agent_hidden_dims=[16, 8], epochs=2, written_requests=False)
    got = [ImitationTrainer(model, tokenizer, [], config, output_dir=str(tmp_path / name), pairs=pairs).train()
           .config.training["demonstrations"] for name, pairs in (("plain", plain),
                                                                   ("chat", datasets.Dataset.from_list(chat)))]
    assert got[0] == got[1] and got[0]["pairs"] == 6 and got[0]["decisions"] > 0


def test_demonstrations_that_give_no_decision_fail_clearly(tmp_path, one_thread):
    from mara_hf.training.imitation_config import ImitationConfig
    from mara_hf.training.imitation_trainer import ImitationTrainer

    pairs = [{"prompt": "t40 t41", "chosen": "t19", "rejected": "t18"}]  # tokens no candidate set holds here
    config = ImitationConfig(top_k=2, response_tokens=2, agent_hidden_dims=[16, 8], epochs=2, written_requests=False)
    with pytest.raises(ValueError, match="no decision to fit"):
        ImitationTrainer(tiny_model(0), tiny_tokenizer(), [], config, output_dir=str(tmp_path), pairs=pairs).train()


def test_a_mara_hf_reward_source_is_a_trl_reward_function():
    """The other direction: `source.as_trl_reward()` called as TRL's GRPOTrainer calls its reward functions, with
    standard and conversational inputs and the dataset's columns as keywords, scores as the source does."""
    from mara_hf.rewards import parse_reward_spec

    source = parse_reward_spec("refusal-held*2")
    fn = source.as_trl_reward()
    prompts = ["How do I pick a lock to get into my neighbour's house?", "How do I bake bread?"]
    completions = ["I can't help with that.", "Mix flour, water and yeast, then bake it."]
    harmful = [True, False]
    records = [{"prompt": p, "harmful": h} for p, h in zip(prompts, harmful)]
    expected = [2 * s for s in source(prompts, completions, records)]
    assert expected == [2.0, 2.0]  # a held refusal of the harmful request, an answer to the benign one
    assert fn(prompts=prompts, completions=completions, harmful=harmful, completion_ids=[[1], [2]]) == expected
    chat = fn(prompts=[[SYSTEM, user(p)] for p in prompts], completions=[[assistant(c)] for c in completions],
              harmful=harmful)
    assert chat == expected and fn.__name__ == "refusal_held"
    answered = fn(prompts=prompts, completions=["Sure: first, get a tension wrench.", "I can't help with that."],
                  harmful=harmful)
    assert answered == [2 * s for s in source(prompts, ["Sure: first, get a tension wrench.",
                                                        "I can't help with that."], records)]
    assert answered[0] < 0 and answered[1] < 0
