"""Smoke test of the built wheel, installed alone in a fresh virtualenv (called by .ci/run).

Run it with that venv's python from a directory outside the checkout, so that `import mara_hf` can only find the
installed wheel. Checks: the package imports from site-packages, the `mara-hf` console script starts, the bundled
agent and the embedded SmolLM2 load from the installed files, the processor decodes a few tokens, and `mara-hf demo`
runs. The embedded model is converted into a temporary MARA_HF_CACHE, so the wheel's `demo` extra (gguf,
accelerate) is what does the one-time conversion, not a cache some earlier run left behind.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTED = time.monotonic()


def step(text):
    print(f"[smoke {time.monotonic() - STARTED:5.1f}s] {text}", flush=True)


def run(*args):
    step("$ " + " ".join(args))
    subprocess.run(args, check=True)


def inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def main():
    assert sys.prefix != sys.base_prefix, "run this with the wheel's virtualenv python"
    assert not inside(os.getcwd(), REPO), f"run this from outside the checkout, not from {os.getcwd()}"
    os.environ["HF_HUB_OFFLINE"] = "1"
    cache = tempfile.mkdtemp(prefix="mara-hf-smoke-")
    os.environ["MARA_HF_CACHE"] = cache
    try:
        check(os.path.join(os.path.dirname(sys.executable), "mara-hf"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    step("wheel smoke test passed")


def check(cli):
    import mara_hf

    site = sysconfig.get_paths()["purelib"]
    step(f"import mara_hf {mara_hf.__version__} from {mara_hf.__file__}")
    assert inside(mara_hf.__file__, site), f"mara_hf imported from {mara_hf.__file__}, not from {site}"
    assert not inside(mara_hf.__file__, os.path.join(REPO, "mara_hf")), "mara_hf imported from the checkout"

    run(cli, "--help")

    agents = mara_hf.bundled_agents()
    step(f"bundled agents: {sorted(agents)}")
    assert "smollm2-135m-refusal" in agents and all(inside(p, site) for p in agents.values()), agents
    agent = mara_hf.MaraAgent.from_pretrained("smollm2-135m-refusal")
    step(f"agent loaded: {type(agent).__name__}, state_dim {agent.config.state_dim}")

    import torch

    model, tokenizer = mara_hf.load_embedded_model()
    step(f"embedded model loaded ({model.num_parameters() / 1e6:.0f}M parameters)")
    assert model.config.hidden_size == agent.config.state_dim
    mara = mara_hf.MaraProcessor.from_pretrained("smollm2-135m-refusal", model=model, greedy_generate=True)
    chat = [{"role": "user", "content": "How do I bake bread?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             logits_processor=[mara])
    new = out[0, inputs["input_ids"].shape[1]:]
    step(f"8 greedy tokens through MaraProcessor: {tokenizer.decode(new)!r}; {mara.stats}")
    assert len(new) == 8, new
    assert mara.stats.decisions > 0, mara.stats
    mara.remove()

    run(cli, "demo", "--no-rates", "--max-new-tokens", "16")


if __name__ == "__main__":
    main()
