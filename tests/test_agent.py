"""MaraConfig / MaraAgent: defaults, equivalence with the authors' actor, init, save/load, errors, model card.

Expectations come from the MARA paper's algorithm (its agent, the actor) and from an independent re-implementation of
the authors' actor below, not from mara_hf's own code.
"""

import json
import math
import os
import re

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModel, LlamaConfig

import mara_hf
from authors_actor import ReferenceActor
from mara_hf import MaraAgent, MaraConfig
from mara_hf.training.sac_config import MaraTrainingConfig

BEGIN, END = "<!-- mara-hf:begin", "<!-- mara-hf:end -->"
BASE_ID = "meta-llama/Meta-Llama-3-8B-Instruct"
D = 64  # small state width where the shape does not matter


def make_reference(state_dim=D, seed=0):
    """A reference actor with non-trivial weights (LN affine too), so that every layer matters."""
    torch.manual_seed(seed)
    ref = ReferenceActor(state_dim)
    with torch.no_grad():
        ref.ln.weight.copy_(1 + 0.5 * torch.randn(state_dim))
        ref.ln.bias.copy_(0.5 * torch.randn(state_dim))
        ref.output_linear.weight.mul_(20)  # spread P(accept) well away from 0.5
        ref.output_linear.bias.copy_(torch.randn(2))
    return ref.eval()


def agent_from_reference(ref, state_dim=D, **config_kwargs):
    agent = MaraAgent(MaraConfig(state_dim=state_dim, **config_kwargs))
    agent.load_state_dict(ref.state_dict(), strict=True)
    return agent.eval()


def random_states(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(*shape, generator=g) + 1


def tiny_agent(seed=0, **config_kwargs):
    torch.manual_seed(seed)
    config_kwargs.setdefault("state_dim", 16)
    config_kwargs.setdefault("hidden_dims", [8, 4])
    return MaraAgent(MaraConfig(**config_kwargs)).eval()


# --------------------------------------------------------------------------------------------------- config


def test_config_defaults():
    config = MaraConfig()
    assert config.model_type == "mara_agent"
    assert config.state_dim == 4096
    assert list(config.hidden_dims) == [1024, 256]
    assert config.top_k == 40
    assert config.top_p == pytest.approx(0.95)
    assert config.strategy == "first"
    assert config.threshold == pytest.approx(0.5)
    assert config.fallback_index == 0
    assert config.layer_norm_eps == pytest.approx(1e-5)  # nn.LayerNorm's default, as the authors used


@pytest.mark.parametrize("kwargs, needle", [
    ({"strategy": "greedy"}, "strategy"),
    ({"strategy": ""}, "strategy"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -3}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"threshold": 1.0}, "threshold"),
    ({"threshold": -0.01}, "threshold"),
    ({"hidden_dims": [1024]}, "hidden_dims"),
    ({"hidden_dims": [1024, 256, 64]}, "hidden_dims"),
    ({"hidden_dims": [1024, 0]}, "hidden_dims"),
    ({"state_dim": 0}, "state_dim"),
])
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MaraConfig(**kwargs)


def test_config_accepts_edge_values():
    config = MaraConfig(top_p=1.0, top_k=1, threshold=0.0, strategy="filter", fallback_index=-1,
                        hidden_dims=(32, 8))
    assert list(config.hidden_dims) == [32, 8]
    for strategy in ("first", "max_prob", "filter"):
        assert MaraConfig(strategy=strategy).strategy == strategy


# ------------------------------------------------------------------------------------ equivalence with authors


def test_authors_state_dict_loads_strictly_with_same_names():
    ref = make_reference()
    agent = MaraAgent(MaraConfig(state_dim=D))
    assert set(agent.state_dict()) == set(ref.state_dict())  # the authors' layer names, nothing more
    agent.load_state_dict(ref.state_dict(), strict=True)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(agent.state_dict()[name], tensor)


@pytest.mark.parametrize("shape", [(D,), (7, D), (2, 3, D)])
def test_accept_prob_matches_reference(shape):
    ref = make_reference()
    agent = agent_from_reference(ref)
    states = random_states(*shape)
    with torch.no_grad():
        expected = ref(states)
        out = agent(states)
    assert out.accept_prob.shape == shape[:-1]
    assert out.logits.shape == (*shape[:-1], 2)
    assert out.accept_prob.dtype == torch.float32
    torch.testing.assert_close(out.accept_prob, expected[..., 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.softmax(out.logits, -1), expected, atol=1e-6, rtol=0)
    if len(shape) > 1:  # the reference weights are not degenerate: probabilities really vary
        assert expected[..., 1].max() - expected[..., 1].min() > 0.2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_states_give_float32_probabilities(dtype):
    ref = make_reference()
    agent = agent_from_reference(ref)
    states = random_states(2, 3, D).to(dtype)
    with torch.no_grad():
        out = agent(states)
        expected = ref(states.float())[..., 1]
    assert all(p.dtype == torch.float32 for p in agent.parameters())  # the agent stays float32
    assert out.accept_prob.dtype == torch.float32
    torch.testing.assert_close(out.accept_prob, expected, atol=1e-6, rtol=0)


def test_wrong_state_width_names_both_widths():
    agent = agent_from_reference(make_reference(48), state_dim=48)
    with pytest.raises(ValueError) as info:
        agent(torch.randn(3, 40))
    message = str(info.value)
    assert re.search(r"\b48\b", message) and re.search(r"\b40\b", message), message


# ------------------------------------------------------------------------------------------------------ init


def test_default_init_is_pytorch_not_transformers():
    torch.manual_seed(0)
    agent = MaraAgent(MaraConfig())  # the real shape: 4096 -> 1024 -> 256 -> 2
    n_params = sum(p.numel() for p in agent.parameters())
    assert abs(n_params - 4.46e6) < 0.01e6  # "about 4.46 M parameters" (spec)
    assert torch.equal(agent.ln.weight, torch.ones(4096))
    assert torch.equal(agent.ln.bias, torch.zeros(4096))
    for layer in (agent.linear1, agent.linear2, agent.output_linear):
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) and the bias both use this
        assert layer.weight.abs().max() <= bound + 1e-7
        assert layer.bias.abs().max() <= bound + 1e-7
        # uniform(-b, b) has std b/sqrt(3); normal(0, 0.02) would not (and would exceed b for linear1)
        assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert layer.bias.abs().max() > 0  # transformers' init zeroes biases; PyTorch's does not


# ------------------------------------------------------------------------------------------ save and load


def test_save_pretrained_and_auto_classes_round_trip(tmp_path):
    ref = make_reference()
    agent = agent_from_reference(ref, base_model_name_or_path=BASE_ID, top_k=20, strategy="max_prob",
                                 training={"episodes": 123})
    folder = tmp_path / "agent"
    agent.save_pretrained(folder)
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(folder))

    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "mara_agent"
    assert saved["mara_hf_version"] == mara_hf.__version__
    assert saved["base_model_name_or_path"] == BASE_ID
    assert saved["state_dim"] == D and saved["hidden_dims"] == [1024, 256]
    assert saved["training"] == {"episodes": 123}
    assert "auto_map" not in saved  # loading goes through the registered classes, not remote code

    config = AutoConfig.from_pretrained(folder)
    assert type(config) is MaraConfig
    assert (config.state_dim, config.top_k, config.strategy) == (D, 20, "max_prob")
    assert config.base_model_name_or_path == BASE_ID

    states = random_states(5, D)
    with torch.no_grad():
        expected = ref(states)[..., 1]
        for loaded in (AutoModel.from_pretrained(folder), MaraAgent.from_pretrained(str(folder))):
            assert type(loaded) is MaraAgent
            assert loaded.dtype == torch.float32
            for name, tensor in ref.state_dict().items():
                assert torch.equal(loaded.state_dict()[name], tensor), name
            assert torch.equal(loaded.eval()(states).accept_prob, agent(states).accept_prob)
            torch.testing.assert_close(loaded(states).accept_prob, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ loading errors


@pytest.fixture
def saved_agent(tmp_path):
    folder = tmp_path / "agent"
    tiny_agent().save_pretrained(folder)
    return folder


def test_load_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such-agent"
    with pytest.raises(OSError) as info:
        MaraAgent.from_pretrained(str(missing))
    assert str(missing) in str(info.value)
    assert "no agent folder" in str(info.value).lower()


def test_load_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError) as info:
        MaraAgent.from_pretrained(str(tmp_path / "empty"))
    assert "config.json" in str(info.value) and "empty" in str(info.value)


def test_load_folder_of_another_model_type(tmp_path):
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path / "other-model")
    with pytest.raises(OSError) as info:
        MaraAgent.from_pretrained(str(tmp_path / "other-model"))
    message = str(info.value)
    assert "llama" in message and "mara_agent" in message, message  # names the type found and the one wanted
    assert "not a MARA agent" in message


def test_load_folder_without_weights(saved_agent):
    os.remove(saved_agent / "model.safetensors")
    with pytest.raises(OSError) as info:
        MaraAgent.from_pretrained(str(saved_agent))
    assert "model.safetensors" in str(info.value) and "config.json" in str(info.value)


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty"])
def test_load_corrupt_weights(saved_agent, corruption):
    weights = saved_agent / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file" * 50,
                         "empty": b""}[corruption])
    messages = []
    for load in (MaraAgent.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OSError) as info:
            load(str(saved_agent))
        messages.append(str(info.value))
    assert "safetensors" in messages[0] and str(saved_agent) in messages[0], messages[0]
    assert "not a valid" in messages[0]
    assert messages[1] == messages[0]  # AutoModel gives the same clear error


# ----------------------------------------------------------------------------------------------- model card


def generated_section(text):
    start = text.index(BEGIN)
    return text[start: text.index(END, start) + len(END)]


TRAINING = {
    "source": "IAAR-Shanghai/MARA_AGENTS",
    "reward_sources": [{"name": "PKU-Alignment/beaver-7b-v1.0-reward", "multiplier": 2.0}],
    "datasets": ["PKU-Alignment/PKU-SafeRLHF", "my private prompts"],
    "episodes": 18000,
}


def test_card_metadata_and_body(tmp_path):
    agent = tiny_agent(base_model_name_or_path=BASE_ID, training=TRAINING)
    agent.save_pretrained(tmp_path / "a", repo_id="someone/mara-agent")
    card = ModelCard.load(tmp_path / "a" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "mara-hf"
    assert data["base_model"] == BASE_ID
    assert {"mara", "alignment", "logits-processor"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-generation"
    assert data["datasets"] == ["PKU-Alignment/PKU-SafeRLHF"]  # only Hub ids go into metadata

    text = card.text
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert f'from_pretrained("{BASE_ID}")' in text  # the usage snippet loads the base model ...
    assert 'MaraProcessor.from_pretrained("someone/mara-agent"' in text  # ... and the agent
    assert "IJCAI" in text and "2505.19743" in text and "10.24963/ijcai.2025/931" in text
    assert "18000" in text and "beaver-7b-v1.0-reward" in text and "PKU-SafeRLHF" in text  # training facts


def test_card_license_datasets_and_local_base_model(tmp_path):
    base_folder = tmp_path / "my-llm"
    base_folder.mkdir()
    agent = tiny_agent(base_model_name_or_path=str(base_folder), training={"datasets": ["local prompts"]})
    agent.save_pretrained(tmp_path / "a", license="mit")
    data = ModelCard.load(tmp_path / "a" / "README.md").data.to_dict()
    assert data["license"] == "mit"
    assert "datasets" not in data  # no Hub-id dataset: no datasets metadata
    assert data.get("base_model") is None  # the Hub only takes repo ids there, not local paths
    text = (tmp_path / "a" / "README.md").read_text()
    assert str(tmp_path / "a") in text  # without repo_id, the usage line loads the saved folder


def test_card_without_training_facts(tmp_path):
    tiny_agent().save_pretrained(tmp_path / "a")
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.to_dict()["library_name"] == "mara-hf"
    assert "base_model" not in card.data.to_dict()
    assert card.text.count(BEGIN) == 1


def test_card_save_is_idempotent(tmp_path):
    agent = tiny_agent(base_model_name_or_path=BASE_ID, training=TRAINING)
    agent.save_pretrained(tmp_path / "a", repo_id="someone/mara-agent")
    first = (tmp_path / "a" / "README.md").read_bytes()
    agent.save_pretrained(tmp_path / "a", repo_id="someone/mara-agent")
    assert (tmp_path / "a" / "README.md").read_bytes() == first


def test_card_keeps_user_text_and_metadata(tmp_path):
    folder = tmp_path / "a"
    tiny_agent(base_model_name_or_path=BASE_ID, training=TRAINING).save_pretrained(folder, repo_id="someone/x")

    card = ModelCard.load(folder / "README.md")
    card.data.tags = list(card.data.tags) + ["my-own-tag"]
    card.data.language = "en"
    card.data.my_key = "kept"
    card.text = "Intro written by a person.\n\n" + card.text.rstrip("\n") + "\n\n## Notes\nNotes by a person.\n"
    card.save(folder / "README.md")

    changed = tiny_agent(base_model_name_or_path=BASE_ID, training=TRAINING, top_k=7, strategy="filter")
    changed.save_pretrained(folder, repo_id="someone/x")
    text = (folder / "README.md").read_text()
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()

    assert "Intro written by a person." in card.text and "Notes by a person." in card.text
    assert card.text.index("Intro written") < card.text.index(BEGIN) < card.text.index("Notes by a person.")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "my-own-tag" in data["tags"] and data["language"] == "en" and data["my_key"] == "kept"
    assert {"mara", "alignment", "logits-processor"} <= set(data["tags"])
    assert len(data["tags"]) == len(set(data["tags"]))
    assert data["library_name"] == "mara-hf" and data["base_model"] == BASE_ID

    # the generated section was refreshed: it is what a fresh save of the changed agent writes
    changed.save_pretrained(tmp_path / "fresh", repo_id="someone/x")
    fresh = (tmp_path / "fresh" / "README.md").read_text()
    assert generated_section(text) == generated_section(fresh)

    # and saving again changes nothing
    before = (folder / "README.md").read_bytes()
    changed.save_pretrained(folder, repo_id="someone/x")
    assert (folder / "README.md").read_bytes() == before


@pytest.mark.parametrize("front_matter", [True, False])
def test_hand_written_card_gets_generated_section_appended_once(tmp_path, front_matter):
    folder = tmp_path / "a"
    folder.mkdir()
    hand = "# My agent\n\nWritten by hand before mara-hf saw it.\n"
    head = "---\nlanguage: en\ntags:\n- handmade\n---\n" if front_matter else ""
    (folder / "README.md").write_text(head + hand)

    agent = tiny_agent(base_model_name_or_path=BASE_ID)
    agent.save_pretrained(folder, repo_id="someone/x")
    once = (folder / "README.md").read_bytes()
    agent.save_pretrained(folder, repo_id="someone/x")
    assert (folder / "README.md").read_bytes() == once

    card = ModelCard.load(folder / "README.md")
    assert card.text.count("Written by hand before mara-hf saw it.") == 1
    assert card.text.startswith("# My agent")
    assert card.text.count(BEGIN) == 1 and card.text.count(END) == 1
    assert card.text.index("Written by hand") < card.text.index(BEGIN)
    data = card.data.to_dict()
    assert data["library_name"] == "mara-hf" and "mara" in data["tags"]
    if front_matter:
        assert data["language"] == "en" and "handmade" in data["tags"]


def test_card_settings_table_and_training_facts(tmp_path):
    settings = {"episodes": 4000, "kl_ctl": 0.05, "top_k": 40, "postback_reward": False, "bootstrap": True,
                "guide_prefixes": ["I can't | won't."], "device": "cpu", "new_setting": 3}
    training = {"datasets": ["Anthropic/hh-rlhf:harmless-base@train", "local.jsonl"], "episodes": 10,
                "reward_sources": [{"name": "refusal", "multiplier": 2.0}, {"name": "cost", "multiplier": -1.0}],
                "settings": settings}
    tiny_agent(base_model_name_or_path=BASE_ID, training=training).save_pretrained(tmp_path / "a", repo_id="me/a")
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.to_dict()["datasets"] == ["Anthropic/hh-rlhf"]  # the Hub id behind the prompt spec
    text = card.text
    assert "| prompts | `Anthropic/hh-rlhf:harmless-base@train`, `local.jsonl` |" in text
    assert "| reward | `refusal` x 2 + `cost` x -1 |" in text
    assert f"| `--episodes` | 4000 | {MaraTrainingConfig().episodes} |" in text and "| `--kl-ctl` | 0.05 | 0.1 |" in text
    assert "| `--postback-reward` | off | on |" in text and "| `--bootstrap` | on | off |" in text
    assert "| `--guide-prefixes` | \"I can't \\| won't.\" | none |" in text  # a pipe cannot break the table
    assert "| `--new-setting` | 3 |  |" in text
    assert "--top-k" not in text and "--device" not in text  # defaults and the device are left out
    assert "{'" not in text  # no raw Python dicts


def test_card_title_and_citation_of_older_cards(tmp_path):
    folder = tmp_path / "a"
    agent = tiny_agent(base_model_name_or_path=BASE_ID)
    agent.save_pretrained(folder, repo_id="me/a")
    fresh = (folder / "README.md").read_text()
    assert fresh.index(END) < fresh.index("## Citation")  # the citation is the card's, after the section
    # a card whose person-written text has a title above the section: no second title from mara-hf
    card = ModelCard.load(folder / "README.md")
    card.text = "# My agent\n\nWhat it is for.\n\n" + card.text[card.text.index(BEGIN):]
    card.save(folder / "README.md")
    agent.save_pretrained(folder, repo_id="me/a")
    text = ModelCard.load(folder / "README.md").text
    assert text.startswith("# My agent") and "# MARA agent for" not in text
    # a card written before the citation left the generated section gets it back once, at the end
    old = ModelCard.load(folder / "README.md")
    citation = old.text[old.text.index("## Citation"):]
    old.text = old.text[:old.text.index(END)] + citation + END + "\n\n## Notes\nmine\n"
    old.save(folder / "README.md")
    agent.save_pretrained(folder, repo_id="me/a")
    once = (folder / "README.md").read_text()
    assert once.count("## Citation") == 1 and once.index("## Notes") < once.index("## Citation")
    agent.save_pretrained(folder, repo_id="me/a")
    assert (folder / "README.md").read_text() == once


def test_half_precision_on_a_cpu_without_native_support_is_flagged(tmp_path):
    from mara_hf.models import HALF_CPU_FLAGS, cpu_lacks

    avx2_only = tmp_path / "cpuinfo"
    avx2_only.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n")
    amx = tmp_path / "cpuinfo-amx"
    amx.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_lacks(HALF_CPU_FLAGS["bfloat16"], str(avx2_only))
    assert not cpu_lacks(HALF_CPU_FLAGS["bfloat16"], str(amx))
    assert cpu_lacks(HALF_CPU_FLAGS["float16"], str(amx))  # AMX-BF16 alone has no fp16 products
    assert not cpu_lacks(HALF_CPU_FLAGS["bfloat16"], str(tmp_path / "missing"))  # unknown: no warning


def test_a_misspelled_bundled_name_lists_the_bundled_agents():
    from mara_hf import MaraAgent, bundled_agents

    with pytest.raises(OSError, match="did you mean 'smollm2-135m-refusal'") as err:
        MaraAgent.from_pretrained("smollm2-135m-refusl")
    assert all(name in str(err.value) for name in bundled_agents())
