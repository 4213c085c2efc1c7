"""Where and how the LLM and reward models load (`mara_hf.models`): GPU-first defaults with a CPU fallback, device
maps, 4-bit, and the command-line flags that set them. CUDA is faked where a choice depends on it: this test suite
runs on CPUs."""

import accelerate
import pytest
import torch

from mara_hf import MaraAgent, MaraConfig, MaraProcessor
from mara_hf.cli.app import main
from mara_hf.models import load_model, placement, quantization_config, resolve_device, resolve_dtype

from training_helpers import save_tiny_model


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch sees a CUDA GPU that supports bfloat16 (the attribute `bf16` switches that)."""
    state = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state["bf16"])
    return state


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu(fake_cuda, monkeypatch):
    assert resolve_device("auto") == resolve_device(None) == "cuda"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    fake_cuda["bf16"] = False  # e.g. a T4: no bfloat16
    assert resolve_dtype(None, "cuda:0") is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16 and resolve_dtype(torch.float16, "cpu") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"


def test_a_cpu_machine_loads_in_float32_on_the_cpu(tmp_path):
    folder = save_tiny_model(tmp_path / "llm")
    model, tokenizer = load_model(folder)
    assert model.device.type == "cpu" and model.dtype is torch.float32
    assert tokenizer.padding_side == "left" and placement(model) == "cpu, float32"
    half, _ = load_model(folder, dtype="bfloat16")
    assert half.dtype is torch.bfloat16 and placement(half) == "cpu, bfloat16"


def test_on_a_gpu_the_defaults_are_bfloat16_there_and_4bit_goes_through_transformers(tmp_path, fake_cuda, monkeypatch):
    """What load_model asks transformers for on a (faked) GPU: the weights in bfloat16 on it; with load_in_4bit an
    NF4 config computing in bfloat16 and the GPU as the whole map (bitsandbytes places weights as it loads)."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path / "llm")
    asked, moved = [], []
    real = AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, **kwargs):
        asked.append(kwargs)
        model = real(path)  # on the CPU, in float32: only the request is checked
        monkeypatch.setattr(model, "to", lambda device: moved.append(device) or model)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    load_model(folder)
    assert asked[-1] == {"dtype": torch.bfloat16} and moved == ["cuda"]

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else find_spec(name, *a))
    load_model(folder, device="cuda:1", load_in_4bit=True)
    quant = asked[-1]["quantization_config"]
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_compute_dtype is torch.bfloat16
    assert asked[-1]["device_map"] == {"": "cuda:1"} and moved == ["cuda"]  # not moved again


def test_4bit_without_bitsandbytes_says_what_to_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        quantization_config(True, torch.bfloat16)
    assert quantization_config(False, torch.bfloat16) is None


def _mara_tokens(model, agent, prompt):
    mara = MaraProcessor(agent, model=model)
    try:
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                              logits_processor=[mara], pad_token_id=0)
    finally:
        mara.remove()


def test_a_model_loaded_with_a_device_map_or_dispatched_in_pieces_decodes_as_one_on_a_device(tmp_path):
    """A model split by a device map runs under accelerate's hooks, which move tensors between its pieces; MARA's
    lookahead and hidden-state hooks must give the tokens of the same model loaded whole. On a CPU-only machine the
    pieces all sit on the CPU, with the hooks forced on as on several GPUs."""
    folder = save_tiny_model(tmp_path / "llm")
    whole, _ = load_model(folder, device="cpu")
    torch.manual_seed(0)
    agent = MaraAgent(MaraConfig(state_dim=whole.config.hidden_size, hidden_dims=[16, 8], threshold=0.5))
    prompt = torch.tensor([[3, 5, 7, 9, 11]])
    expected = _mara_tokens(whole, agent, prompt)

    mapped, _ = load_model(folder, device_map="auto")
    assert torch.equal(_mara_tokens(mapped, agent, prompt), expected)

    pieces, _ = load_model(folder, device="cpu")
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"] + [
        f"model.layers.{i}" for i in range(pieces.config.num_hidden_layers)]
    pieces = accelerate.dispatch_model(pieces, device_map={n: "cpu" for n in names}, force_hooks=True)
    assert hasattr(pieces.model.layers[0], "_hf_hook")
    assert torch.equal(_mara_tokens(pieces, agent, prompt), expected)


def test_device_and_device_map_together_are_refused(tmp_path):
    folder = save_tiny_model(tmp_path / "llm")
    with pytest.raises(ValueError, match="not both"):
        load_model(folder, device="cpu", device_map="auto")


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "embedded", "--agent", "x", "--prompts", "p.jsonl", "--output", "o.jsonl", "--device", "cpu",
      "--device-map", "auto"], "not both"),
    (["imitate", "--model", "embedded", "--prompts", "p.jsonl", "--output", "o", "--reward", "repetition",
      "--backend", "ray", "--load-in-4bit"], "--backend ray"),
    (["eval", "--model", "embedded", "--agent", "x", "--prompts", "p.jsonl", "--output", "o.jsonl", "--reward",
      "repetition", "--reward-batch-size", "0"], "--reward-batch-size must be at least 1"),
])
def test_placement_flags_that_do_not_go_together_are_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hi", "harmful": false}\n')
    monkeypatch.setattr("mara_hf.cli.app.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("mara_hf.agent.modeling.MaraAgent.from_pretrained", lambda *a, **k: None)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_reward_model_flags_reach_the_reward_model(tmp_path):
    """--reward-dtype / --reward-device / --reward-batch-size as the reward model loads and scores."""
    from mara_hf.cli.app import _reward_model_kwargs, build_parser
    from mara_hf.rewards import parse_reward_spec

    from test_rewards import PROMPTS, RESPONSES, save_rm

    folder = save_rm(tmp_path / "rm")
    args = build_parser().parse_args(["eval", "--model", "m", "--agent", "a", "--prompts", "p", "--output", "o",
                                      "--reward", folder, "--reward-dtype", "bfloat16", "--reward-device", "cpu",
                                      "--reward-batch-size", "2"])
    source = parse_reward_spec(folder, **_reward_model_kwargs(args))
    calls = []
    source.load()
    forward = source.model.forward
    source.model.forward = lambda **kw: calls.append(kw["input_ids"].shape[0]) or forward(**kw)
    scores = source(PROMPTS, RESPONSES)
    assert source.model.dtype is torch.bfloat16 and source.model.device.type == "cpu"
    assert calls == [2, 1] and len(scores) == 3
    default = build_parser().parse_args(["eval", "--model", "m", "--agent", "a", "--prompts", "p", "--output", "o"])
    assert (default.reward_dtype, default.reward_device, default.reward_batch_size) == ("auto", "auto", 8)
    assert (default.dtype, default.device, default.device_map, default.load_in_4bit) == ("auto", "auto", None, False)
