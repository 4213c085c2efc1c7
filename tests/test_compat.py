"""Compatibility matrix: MARA on the architectures users bring, with every cache `generate` makes on this CPU.

Each row of `ARCHS` is a tiny random-weight model built from the real transformers config class of that
architecture (2 layers, hidden 32, sliding window `WINDOW` where the architecture has one, both layer kinds for
hybrid ones). A left-padded batch of a 5-token and a 13-token prompt decodes 16 new tokens, well past the window.
Every case must give, token for token, the authors' serial algorithm (`serial_generate`: one prompt at a time,
one forward per candidate), with an agent calibrated to reject about half of the candidates:

- `dynamic`: `model.generate(..., logits_processor=[mara])` with generate's default cache.
- `static`: the same with `cache_implementation="static"` (what compiled generation uses).
- `beams`, `beams_static`: `num_beams=2` (MARA leaves one token possible, so beams equal greedy), either cache.
- `fast`: `mara_hf.generate`, the decoder training rollouts use (chunked scoring).

Adding an architecture is adding a row. The compatibility table of docs/compatibility.md is rendered from this
matrix: `python tests/test_compat.py --write` updates it, and `test_compat_table_is_the_rendered_matrix` checks it.
"""

import functools
import logging
import os
import re
import sys

import pytest
import torch
from tiny_models import BOS, EOS, PAD, _finish, calibrated_agent, random_prompts
import transformers
from transformers import AutoConfig

import mara_hf
from mara_hf import MaraProcessor, serial_generate
from mara_hf.decoding.caches import LAYOUTS, MASK_DICTS, layer_layout
from mara_hf.decoding.loop import check_fast

WINDOW = 6
NEW = 16
TOP_K, TOP_P = 10, 0.9
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
              pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
HYBRID = ["sliding_attention", "full_attention"]

# model_type -> config fields on top of COMMON. Windows where the architecture has one; hybrid layouts where it has
# both kinds of layer (qwen2/qwen3 in their `use_sliding_window` form, gemma 2/3 and cohere2 as released).
ARCHS = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, layer_types=HYBRID[::-1]),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, layer_types=HYBRID[::-1]),
    "mistral": dict(sliding_window=WINDOW),
    "gemma2": dict(sliding_window=WINDOW, layer_types=HYBRID),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=HYBRID),
    "phi3": dict(sliding_window=WINDOW),
    "olmo2": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "granite": {},
    "cohere": {},
    "cohere2": dict(sliding_window=WINDOW, layer_types=HYBRID),
    "gpt_neox": dict(rotary_pct=0.5),
    "smollm3": {},
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, layer_types=HYBRID),
    "olmo3": dict(sliding_window=WINDOW, layer_types=HYBRID),
    "ministral": dict(sliding_window=WINDOW, layer_types=HYBRID),
    "exaone4": dict(sliding_window=WINDOW, layer_types=HYBRID),
    "starcoder2": dict(sliding_window=WINDOW),
    # linear attention (gated delta net) + full attention: no tree masks possible, the exact slow path
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                       linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2,
                       num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32),
}
CASES = ("dynamic", "static", "beams", "beams_static", "fast")
EXACT, SLOW = "exact", "exact, slow path (warns once)"
HANDOVER = "hands over to `generate` (warns once); no training"
RESULTS: dict = {}  # (arch, case) -> EXACT or SLOW, filled by the matrix tests and by the table renderer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(arch: str, seed: int = 0, **overrides):
    try:
        config = AutoConfig.for_model(arch, **{**COMMON, **ARCHS[arch], **overrides})
    except ValueError:  # a row for an architecture newer than the installed transformers
        pytest.skip(f"transformers {transformers.__version__} does not know the architecture {arch!r}")
    return _finish(config, seed, 4.0, None)


@functools.cache
def setup(arch: str):
    """The row's model, agent, prompts, the serial reference's tokens and plain greedy's."""
    model = build(arch)
    ids, mask = random_prompts(batch=2, length=13, pads=(8, 0), seed=1)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    # Calibrated on the states of the plain continuations (not of random text), so that it rejects about half of
    # the candidates met while decoding these prompts in every architecture.
    with torch.no_grad():
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], NEW)], dim=1)
        states = model.base_model(input_ids=plain, attention_mask=full_mask).last_hidden_state[full_mask.bool()]
    agent = calibrated_agent(model, seed=0, states=states.float())
    reference = serial_generate(model, agent, ids, mask, max_new_tokens=NEW, top_k=TOP_K, top_p=TOP_P)
    return model, agent, ids, mask, reference, plain[:, ids.shape[1]:].tolist()


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_case(arch: str, case: str) -> str:
    """Decode the row's prompts in this case; assert the serial reference's tokens; EXACT or SLOW (one warning)."""
    model, agent, ids, mask, reference, _ = setup(arch)
    mara = MaraProcessor(agent, model=model, top_k=TOP_K, top_p=TOP_P)
    handler = _Warnings()
    logging.getLogger("mara_hf").addHandler(handler)
    try:
        if case == "fast":
            out = mara_hf.generate(model, mara, ids, mask, max_new_tokens=NEW, chunk_size=2)
        else:
            kwargs = {"static": dict(cache_implementation="static"), "beams": dict(num_beams=2),
                      "beams_static": dict(num_beams=2, cache_implementation="static")}.get(case, {})
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 logits_processor=[mara], **kwargs)
    finally:
        logging.getLogger("mara_hf").removeHandler(handler)
        mara.remove()
    assert out[:, ids.shape[1]:].tolist() == reference, f"{arch} / {case}: not the serial algorithm's tokens"
    assert len(handler.messages) <= 1, handler.messages
    RESULTS[arch, case] = SLOW if handler.messages else EXACT
    if case == "fast" and layer_layout(model) is None:
        RESULTS[arch, case] = HANDOVER
    return RESULTS[arch, case]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_matrix(arch, case):
    # Architectures made of full / sliding-window attention share generate's cache (no slow path) and run the
    # fast decoder; others take the exact slow path with one warning.
    maskable = layer_layout(setup(arch)[0]) is not None
    assert run_case(arch, case) == (EXACT if maskable else HANDOVER if case == "fast" else SLOW)


@pytest.mark.parametrize("arch", ["gemma2", "mistral"])
def test_fast_rows_alone_keep_their_cache_entries(arch, monkeypatch):
    """In the fast decoder a row still deciding after its batch-mates is scored alone and its candidates' entries
    are appended to the shared cache: the serial tokens past a sliding window, and with softcapped logits (gemma2),
    whose next logits come from the rows-alone forward."""
    import mara_hf.decoding.scoring as candidates

    subsets, real = [], candidates.row_subset
    monkeypatch.setattr(candidates, "row_subset", lambda cache, rows: subsets.append(len(rows)) or real(cache, rows))
    assert run_case(arch, "fast") == EXACT
    assert subsets


@pytest.mark.parametrize("arch", list(ARCHS))
def test_row_is_not_trivial(arch):
    """The agent changes plain greedy's output, and the contexts pass the sliding window where there is one."""
    model, _, ids, _, reference, plain = setup(arch)
    assert reference != plain
    windows = [w for w in (layer_layout(model) or ([], []))[1] if w is not None]
    assert all(ids.shape[1] + NEW > 2 * w for w in windows)
    if "sliding_window" in ARCHS[arch]:
        assert windows, f"{arch}: the config's window did not reach the layers"


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3_text"])
def test_static_cache_unpadded_prompt_then_padded_batch(arch):
    """With a static cache generate hides the padding in prepared masks (none at all for an unpadded prefill):
    the padding recorded at each prefill must be that call's."""
    model, agent, ids, mask, reference, _ = setup(arch)
    mara = MaraProcessor(agent, model=model, top_k=TOP_K, top_p=TOP_P)
    try:
        for rows in (slice(1, 2), slice(0, 2)):
            out = model.generate(input_ids=ids[rows], attention_mask=mask[rows], max_new_tokens=NEW, do_sample=False,
                                 logits_processor=[mara], cache_implementation="static")
            assert out[:, ids.shape[1]:].tolist() == reference[rows]
    finally:
        mara.remove()


@pytest.mark.parametrize("arch", ["mistral", "gemma3_text", "qwen2"])
def test_eager_attention(arch):
    """Eager attention reads the additive masks itself (sdpa in the matrix): same tokens, both caches."""
    _, agent, ids, mask, reference, _ = setup(arch)
    model = build(arch)
    model.set_attn_implementation("eager")
    mara = MaraProcessor(agent, model=model, top_k=TOP_K, top_p=TOP_P)
    try:
        for implementation in (None, "static"):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 logits_processor=[mara], cache_implementation=implementation)
            assert out[:, ids.shape[1]:].tolist() == reference
        assert mara_hf.generate(model, mara, ids, mask, max_new_tokens=NEW)[:, ids.shape[1]:].tolist() == reference
    finally:
        mara.remove()


# ------------------------------------------------------------------------------------------- other cache kinds


def test_quantized_cache_takes_the_slow_exact_path_with_one_warning(caplog):
    """generate's quantized cache (fp8 backend: no extra package) cannot be shared: one warning, same tokens."""
    model, agent, ids, mask, reference, _ = setup("llama")
    mara = MaraProcessor(agent, model=model, top_k=TOP_K, top_p=TOP_P)
    try:
        with caplog.at_level(logging.WARNING):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 logits_processor=[mara], cache_implementation="quantized",
                                 cache_config={"backend": "fp8"})
    finally:
        mara.remove()
    assert out[:, ids.shape[1]:].tolist() == reference
    assert sum("re-encodes the prefix" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("arch", ["gemma3_text", "mistral"])
def test_no_cache_takes_the_slow_exact_path_with_one_warning(arch, caplog):
    """use_cache=False: the prefix is re-encoded into MARA's own cache (full storage, windows in the masks)."""
    model, agent, ids, mask, reference, _ = setup(arch)
    mara = MaraProcessor(agent, model=model, top_k=TOP_K, top_p=TOP_P)
    try:
        with caplog.at_level(logging.WARNING):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 logits_processor=[mara], use_cache=False)
    finally:
        mara.remove()
    assert out[:, ids.shape[1]:].tolist() == reference
    assert sum("re-encodes the prefix" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_integer_quantized_caches(backend, caplog):
    module = {"quanto": "optimum.quanto", "hqq": "hqq"}[backend]
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f"{module} is not installed (not a mara-hf dependency; no network here to install it)")
    model, agent, ids, mask, reference, _ = setup("llama")
    mara = MaraProcessor(agent, model=model, top_k=TOP_K, top_p=TOP_P)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             logits_processor=[mara], cache_implementation="quantized",
                             cache_config={"backend": backend, "nbits": 4})
    finally:
        mara.remove()
    # integer quantization changes generate's own logits: the tokens are MARA's on those logits; no crash
    assert out.shape == (ids.shape[0], ids.shape[1] + NEW)


@pytest.mark.parametrize("implementation", ["offloaded", "offloaded_static"])
def test_offloaded_caches(implementation):
    if not torch.cuda.is_available():
        pytest.skip("offloaded caches need CUDA streams: plain generate fails with them on a CPU-only torch")
    model, agent, ids, mask, reference, _ = setup("gemma3_text")
    model = model.cuda()
    mara = MaraProcessor(agent, model=model, top_k=TOP_K, top_p=TOP_P)
    try:
        out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=NEW, do_sample=False,
                             logits_processor=[mara], cache_implementation=implementation)
    finally:
        mara.remove()
        model.cpu()
    assert out[:, ids.shape[1]:].tolist() == reference


def test_hybrid_model_taking_one_mask_falls_back_exactly(monkeypatch, caplog):
    """A model mixing full and sliding layers whose forward takes one mask for all (a future or remote-code model):
    once the window is passed no single tree mask fits, so the processor scores candidates as ordinary rows (one
    warning, same tokens), and the fast decoder hands over to generate (one warning, same tokens)."""
    model, agent, ids, mask, reference, _ = setup("gemma3_text")
    monkeypatch.setitem(MASK_DICTS, model.base_model, False)
    mara = MaraProcessor(agent, model=model, top_k=TOP_K, top_p=TOP_P)
    try:
        with caplog.at_level(logging.WARNING):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 logits_processor=[mara])
            assert out[:, ids.shape[1]:].tolist() == reference
            assert sum("as its own row" in r.getMessage() for r in caplog.records) == 1
            with pytest.raises(NotImplementedError, match="one attention mask"):
                check_fast(model)
            fast = mara_hf.generate(model, mara, ids, mask, max_new_tokens=NEW)
    finally:
        mara.remove()
    assert fast[:, ids.shape[1]:].tolist() == reference
    assert sum("Falling back to model.generate" in r.getMessage() for r in caplog.records) == 1


def test_unknown_layer_types_fall_back_exactly(monkeypatch, caplog):
    """Layer types MARA cannot mask (chunked, linear, ...): exact row-wise scoring with one warning."""
    model, agent, ids, mask, reference, _ = setup("mistral")
    monkeypatch.setitem(LAYOUTS, model.base_model, None)
    mara = MaraProcessor(agent, model=model, top_k=TOP_K, top_p=TOP_P)
    try:
        with caplog.at_level(logging.WARNING):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 logits_processor=[mara], cache_implementation="static")
    finally:
        mara.remove()
    assert out[:, ids.shape[1]:].tolist() == reference
    assert sum("as its own row" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ["gemma3_text", "mistral"])
def test_training_runs_on_sliding_window_models(arch):
    """A short MaraTrainer run (rollouts through the fast decoder) on a hybrid and a sliding-window model."""
    from training_helpers import avoid_banned, make_prompts, tiny_tokenizer

    from mara_hf.training.sac_trainer import MaraTrainer
    from mara_hf.training.sac_config import MaraTrainingConfig
    from mara_hf.rewards import CallableReward

    model = build(arch, vocab_size=64, sliding_window=4)
    model.generation_config.eos_token_id = EOS
    config = MaraTrainingConfig(episodes=4, rollout_batch_size=2, max_new_tokens=12, top_k=5, learner_batch_size=8,
                                learning_starts=8, updates_per_episode=1, agent_hidden_dims=[16, 8], seed=0,
                                checkpoint_every=10**6)
    trainer = MaraTrainer(model, tiny_tokenizer(), [CallableReward(avoid_banned, name="avoid")],
                          make_prompts(4, seed=3), config)
    before = [p.detach().clone() for p in trainer.agent.parameters()]
    trainer.train()
    assert trainer.episodes_done == 4 and trainer.updates_done > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.agent.parameters()))


# ------------------------------------------------------------------------------------- docs/compatibility.md table

COMPAT_DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "compatibility.md")
TABLE_START, TABLE_END = "<!-- compat-table:start -->", "<!-- compat-table:end -->"


def _layers(model) -> str:
    layout = layer_layout(model)
    if layout is None:
        return "other (e.g. linear attention)"
    windows = layout[1]
    if all(w is None for w in windows):
        return "full"
    return "sliding window" if all(w is not None for w in windows) else "hybrid (full + sliding)"


def render_table() -> str:
    """The compatibility table of docs/compatibility.md, from the matrix's results (cases not yet run are run here)."""
    lines = ["| architecture | attention layers | dynamic cache | static cache | beams, dynamic | beams, static | "
             "fast path & training |", "|---|---|---|---|---|---|---|"]
    for arch in ARCHS:
        cells = [RESULTS.get((arch, case)) or run_case(arch, case) for case in CASES]
        lines.append(f"| `{arch}` | {_layers(setup(arch)[0])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def documented_table() -> str:
    """The table between the markers in docs/compatibility.md, as it stands."""
    text = open(COMPAT_DOC).read()
    found = re.search(re.escape(TABLE_START) + r"\n(.*?)\n" + re.escape(TABLE_END), text, re.S)
    return found.group(1) if found else ""


def test_compat_table_is_the_rendered_matrix():
    assert documented_table() == render_table(), \
        "docs/compatibility.md is stale: run `python tests/test_compat.py --write`"


if __name__ == "__main__":
    torch.set_num_threads(1)
    table = render_table()
    if "--write" in sys.argv:
        text = open(COMPAT_DOC).read()
        text = re.sub(re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END),
                      lambda _: f"{TABLE_START}\n{table}\n{TABLE_END}", text, flags=re.S)
        open(COMPAT_DOC, "w").write(text)
    print(table)
