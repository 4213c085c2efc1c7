"""Converting the authors' actor .pth files (IAAR-Shanghai/MARA_AGENTS format) and the `mara-hf convert` CLI.

Expectations come from an independent re-implementation of the authors' actor and from the MARA paper's algorithm.
"""

import collections
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, LlamaConfig

from authors_actor import ReferenceActor
from mara_hf import MaraAgent, MaraConfig
from mara_hf.cli.app import main
from mara_hf.agent.convert import convert_actor

D = 64
UNREADABLE_BASE = "nonexistent-org/nonexistent-model"


def make_reference(state_dim=D, width1=1024, width2=256, seed=0):
    torch.manual_seed(seed)
    ref = ReferenceActor(state_dim, width1, width2)
    with torch.no_grad():  # non-trivial weights everywhere, P(accept) spread away from 0.5
        ref.ln.weight.copy_(1 + 0.5 * torch.randn(state_dim))
        ref.ln.bias.copy_(0.5 * torch.randn(state_dim))
        ref.output_linear.weight.mul_(20)
        ref.output_linear.bias.copy_(torch.randn(2))
    return ref.eval()


def random_states(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(*shape, generator=g) + 1


def save_llama_config(folder, hidden_size):
    LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=4, vocab_size=128).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def base64(tmp_path):
    return save_llama_config(tmp_path / "base-llm-64", D)


@pytest.fixture
def base32(tmp_path):
    return save_llama_config(tmp_path / "base-llm-32", 32)


@pytest.fixture
def reference():
    return make_reference()


@pytest.fixture
def actor_path(tmp_path, reference):
    path = tmp_path / "actor.pth"
    torch.save(reference.state_dict(), path)  # what the authors published: a plain actor state dict
    return str(path)


def assert_matches_reference(agent, ref, atol=1e-6):
    seen = []
    for shape in [(10, D), (2, 3, D)]:
        states = random_states(*shape)
        with torch.no_grad():
            expected = ref(states)[..., 1]
            got = agent.eval()(states).accept_prob
        assert got.shape == shape[:-1] and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
        seen.append(expected.flatten())
    seen = torch.cat(seen)
    assert seen.max() - seen.min() > 0.1  # the probabilities really vary: the comparison means something


def no_leftovers(parent):
    return [name for name in os.listdir(parent) if name.startswith((".tmp-mara-", ".old-mara-"))]


# ------------------------------------------------------------------------------------------------- success


def test_convert_actor_round_trip(tmp_path, actor_path, base64, reference):
    out = tmp_path / "agent"
    agent = convert_actor(actor_path, base_model=base64, output_dir=str(out))
    assert isinstance(agent, MaraAgent)
    assert_matches_reference(agent, reference)
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(out))
    assert no_leftovers(tmp_path) == []

    loaded = AutoModel.from_pretrained(out)
    assert type(loaded) is MaraAgent and loaded.dtype == torch.float32
    assert_matches_reference(loaded, reference)

    config = loaded.config
    assert isinstance(config, MaraConfig)
    assert config.state_dim == D  # read from the weights
    assert list(config.hidden_dims) == [1024, 256]
    assert config.base_model_name_or_path == base64
    # the MARA paper's training setup (IJCAI 2025): beaver reward x 2.0 and cost x -1.0, PKU-SafeRLHF
    # prompts, agents published at episode 18000
    training = config.training
    rewards = {r["name"].split("/")[-1]: r["multiplier"] for r in training["reward_sources"]}
    assert rewards == {"beaver-7b-v1.0-reward": 2.0, "beaver-7b-v1.0-cost": -1.0}
    assert any("PKU-SafeRLHF" in d for d in training["datasets"])
    assert training["episodes"] == 18000
    assert "MARA_AGENTS" in training["source"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["state_dim"] == D and saved["training"]["episodes"] == 18000
    assert "18000" in (out / "README.md").read_text()


def test_convert_half_precision_actor_with_other_widths(tmp_path, base64):
    ref = make_reference(width1=48, width2=16)
    ref = ref.to(torch.bfloat16)
    path = tmp_path / "actor_bf16.pth"
    torch.save(ref.state_dict(), path)
    agent = convert_actor(str(path), base_model=base64)
    assert list(agent.config.hidden_dims) == [48, 16]  # read from the weights
    assert all(p.dtype == torch.float32 for p in agent.parameters())
    assert_matches_reference(agent, ref.float())  # bf16 weights widen to float32 exactly


def test_convert_legacy_serialization_into_nested_output(tmp_path, base64, reference):
    path = tmp_path / "actor_legacy.pth"
    torch.save(reference.state_dict(), path, _use_new_zipfile_serialization=False)  # pre-1.6 torch format
    out = tmp_path / "not" / "yet" / "agent"
    convert_actor(str(path), base_model=base64, output_dir=str(out))
    assert_matches_reference(AutoModel.from_pretrained(out), reference)


def test_convert_without_output_dir_writes_nothing(tmp_path, actor_path, base64, reference, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    agent = convert_actor(actor_path, base_model=base64)
    assert_matches_reference(agent, reference)
    assert os.listdir(work) == []


def test_convert_into_existing_empty_folder(tmp_path, actor_path, base64, reference):
    out = tmp_path / "agent"
    out.mkdir()
    convert_actor(actor_path, base_model=base64, output_dir=str(out))
    assert_matches_reference(AutoModel.from_pretrained(out), reference)


def test_convert_without_paper_training_facts(tmp_path, actor_path, base64):
    out = tmp_path / "agent"
    assert main(["convert", actor_path, "--base-model", base64, "--output", str(out),
                 "--no-paper-training-facts"]) == 0
    training = MaraConfig.from_pretrained(out).training or {}
    assert "episodes" not in training and "reward_sources" not in training and "datasets" not in training


def test_unreadable_base_model_only_warns(tmp_path, actor_path, reference, caplog):
    out = tmp_path / "agent"
    with caplog.at_level(logging.WARNING):
        agent = convert_actor(actor_path, base_model=UNREADABLE_BASE, output_dir=str(out))
    assert any(UNREADABLE_BASE in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert_matches_reference(AutoModel.from_pretrained(out), reference)
    assert agent.config.base_model_name_or_path == UNREADABLE_BASE
    card = (out / "README.md").read_text()
    assert f"base_model: {UNREADABLE_BASE}" in card


def test_cli_unreadable_base_model_converts(tmp_path, actor_path, reference, capsys):
    out = tmp_path / "agent"
    assert main(["convert", actor_path, "--base-model", UNREADABLE_BASE, "--output", str(out)]) == 0
    assert_matches_reference(AutoModel.from_pretrained(out), reference)


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_convert(tmp_path, actor_path, base64, reference, capsys):
    out = tmp_path / "agent"
    assert main(["convert", actor_path, "--base-model", base64, "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    loaded = AutoModel.from_pretrained(out)
    assert loaded.config.base_model_name_or_path == base64
    assert_matches_reference(loaded, reference)
    assert no_leftovers(tmp_path) == []


def test_cli_default_output_folder(tmp_path, actor_path, base64, reference, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", actor_path, "--base-model", base64]) == 0
    assert_matches_reference(AutoModel.from_pretrained(tmp_path / "mara-agent-base-llm-64"), reference)


def _cli_command():
    script = os.path.join(os.path.dirname(sys.executable), "mara-hf")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "mara_hf.cli"]


def test_cli_entry_point_in_subprocess(tmp_path, actor_path, base64, reference):
    out = tmp_path / "agent"
    done = subprocess.run([*_cli_command(), "convert", actor_path, "--base-model", base64, "--output", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    assert_matches_reference(AutoModel.from_pretrained(out), reference)


# --------------------------------------------------------------------------------------------------- errors


class TensorDict(collections.OrderedDict):
    """A dict subclass from this module: unpickling it needs an arbitrary global."""


class Payload:
    """Unpickling this runs os.makedirs(marker): a stand-in for arbitrary code in a malicious .pth."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _missing(tmp_path, ref):
    return tmp_path / "nope.pth", ["nope.pth"]


def _truncated(tmp_path, ref):
    path = tmp_path / "truncated.pth"
    torch.save(ref.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, ["truncated.pth", "cannot read"]


def _garbage(tmp_path, ref):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a pytorch file\n" * 100)
    return path, ["garbage.pth", "cannot read"]


def _named_critic(tmp_path, ref):
    path = tmp_path / "critic.pth"
    torch.save(ref.state_dict(), path)  # even with actor-shaped weights, the name says critic
    return path, ["critic.pth", "critic"]


def _twin_critic_keys(tmp_path, ref):
    path = tmp_path / "agent_weights.pth"
    critic = ReferenceActor(D, 64, 32)  # same MLP shape, 2 Q-values out
    state = {f"{q}.{k}": v for q in ("q1", "q2") for k, v in critic.state_dict().items()}
    torch.save(state, path)
    return path, ["agent_weights.pth", "critic"]


def _wrong_output_shape(tmp_path, ref):
    path = tmp_path / "three_way.pth"
    state = dict(ref.state_dict())
    state["output_linear.weight"] = torch.zeros(3, 256)
    state["output_linear.bias"] = torch.zeros(3)
    torch.save(state, path)
    return path, ["output_linear", "(3, 256)"]


def _not_tensors(tmp_path, ref):
    path = tmp_path / "numbers.pth"
    torch.save({k: 1.0 for k in ref.state_dict()}, path)
    return path, ["numbers.pth", "tensors"]


def _dict_subclass(tmp_path, ref):
    path = tmp_path / "subclass.pth"
    torch.save(TensorDict(ref.state_dict()), path)
    return path, ["subclass.pth", "cannot read"]


def _whole_module(tmp_path, ref):
    path = tmp_path / "module.pth"
    torch.save(ref, path)  # torch.save(model) instead of model.state_dict(): needs this module's class
    return path, ["module.pth", "cannot read"]


ERROR_CASES = {
    "missing": _missing, "truncated": _truncated, "garbage": _garbage, "named_critic": _named_critic,
    "twin_critic_keys": _twin_critic_keys, "wrong_output_shape": _wrong_output_shape, "not_tensors": _not_tensors,
    "dict_subclass": _dict_subclass, "whole_module": _whole_module,
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_actor_files_write_nothing(tmp_path, base64, reference, capsys, case):
    path, needles = ERROR_CASES[case](tmp_path, reference)
    out = tmp_path / "agent"

    with pytest.raises((OSError, ValueError)) as info:
        convert_actor(str(path), base_model=base64, output_dir=str(out))
    message = str(info.value)
    for needle in needles:
        assert needle.lower() in message.lower(), message
    assert not out.exists() and no_leftovers(tmp_path) == []

    assert main(["convert", str(path), "--base-model", base64, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and no_leftovers(tmp_path) == []


def test_hidden_size_mismatch_with_base_model(tmp_path, actor_path, base32, capsys):
    out = tmp_path / "agent"
    with pytest.raises(ValueError) as info:
        convert_actor(actor_path, base_model=base32, output_dir=str(out))
    message = str(info.value)
    assert "64" in message and "32" in message and "hidden_size" in message
    assert main(["convert", actor_path, "--base-model", base32, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and no_leftovers(tmp_path) == []


def test_existing_non_empty_output_is_left_alone(tmp_path, actor_path, base64, capsys):
    out = tmp_path / "agent"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OSError) as info:
        convert_actor(actor_path, base_model=base64, output_dir=str(out))
    assert str(out) in str(info.value)
    assert main(["convert", actor_path, "--base-model", base64, "--output", str(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert no_leftovers(tmp_path) == []


def test_pickled_code_is_refused_not_executed(tmp_path, base64, reference, capsys):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "malicious.pth"
    torch.save({**reference.state_dict(), "ln.weight": Payload(str(marker))}, path)
    out = tmp_path / "agent"

    with pytest.raises(ValueError):
        convert_actor(str(path), base_model=base64, output_dir=str(out))
    assert main(["convert", str(path), "--base-model", base64, "--output", str(out)]) == 2
    assert "malicious.pth" in capsys.readouterr().err
    assert not marker.exists(), "convert unpickled arbitrary code: it must load with weights_only=True"
    assert not out.exists()

    # the payload is live: a full (unsafe) unpickle does run it, so the check above means something
    torch.load(path, weights_only=False)
    assert marker.exists()
    shutil.rmtree(marker)
