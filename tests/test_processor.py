"""MaraProcessor inside `model.generate`: equality with the authors' serial algorithm, generation modes, strategies,
candidate sets, tree scoring, dtypes, NaN states, construction errors and statistics.

The independent expectation is `serial_generate` (one prompt at a time, one full LLM forward per candidate, the
candidate set from transformers' own TopK/TopP warpers), plus a few even simpler loops written here (full
forwards without any cache). Models: tiny seeded random llama / GPT-NeoX / GPT-2 (tests/tiny_models.py) and the
embedded SmolLM2-135M-Instruct, with agents calibrated to reject about half of the candidates, so the tests can
tell MARA decoding from plain greedy decoding.
"""

import contextlib
import copy
import logging
import signal

import pytest
import torch

import mara_hf
from tiny_models import (
    BUILDERS,
    PAD,
    calibrated_agent,
    model_states,
    random_prompts,
    tiny_llama,
)
from transformers import DynamicCache, TopKLogitsWarper, TopPLogitsWarper

from mara_hf import MaraAgent, MaraConfig, MaraProcessor, MaraStats, serial_generate
from mara_hf.decoding.caches import cache_arg
from mara_hf.decoding.candidates import candidate_set, next_positions
from mara_hf.decoding.scoring import score_candidates


def generated_cache(out):
    """generate's KV cache in its output (`cache` since transformers 5.24, `past_key_values` before)."""
    return out["cache"] if "cache" in out else out.past_key_values


TOP_K, TOP_P = 10, 0.9
NEW = 16  # new tokens per row on the tiny models


# ------------------------------------------------------------------------------------------------------ helpers


def trim(rows, eos=None):
    """Each row's new tokens up to and including its first EOS (generate pads finished rows after it)."""
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    out = []
    for row in rows:
        ends = [i for i, t in enumerate(row) if t in eos]
        out.append(row[: ends[0] + 1] if ends else row)
    return out


def generate(model, mara, input_ids, attention_mask=None, max_new_tokens=NEW, eos=None, **kwargs):
    """New tokens of every returned sequence (as lists, trimmed after EOS)."""
    kwargs.setdefault("do_sample", False)
    if eos is not None:
        kwargs["eos_token_id"] = eos
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         logits_processor=[mara] if mara is not None else [], **kwargs)
    return trim(out[:, input_ids.shape[1]:].tolist(), eos)


def reference(model, agent, input_ids, attention_mask=None, max_new_tokens=NEW, eos=None, top_k=TOP_K, top_p=TOP_P,
              stats=None):
    return serial_generate(model, agent, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           top_k=top_k, top_p=top_p, stats=stats)


def stat_counts(stats):
    """The counts that the processor and the serial reference must agree on."""
    return {"decisions": stats.decisions, "candidates": stats.candidates, "mean_candidates": stats.mean_candidates,
            "rejections": stats.rejections, "fallbacks": stats.fallbacks, "accepted_index": stats.accepted_index}


def warped_candidates(logits, top_k, top_p):
    """Candidate ids of one row, most probable first, from transformers' own warpers (logits: (vocab,))."""
    warped = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logits[None].clone()))[0]
    kept = torch.isfinite(warped).nonzero().flatten()
    return kept[logits[kept].argsort(descending=True, stable=True)].tolist()


@torch.no_grad()
def simple_decode(model, agent, prompt, steps, rule, top_k=TOP_K, top_p=TOP_P):
    """Decode one unpadded prompt with full forwards (no cache anywhere): P(accept) of every candidate from its own
    forward of prompt + candidate; `rule(candidates, p_accept) -> index`. Returns (tokens, per-step records)."""
    ids = prompt[None]
    tokens, records = [], []
    for _ in range(steps):
        logits = model(input_ids=ids).logits[0, -1].float()
        cands = warped_candidates(logits, top_k, top_p)
        index, p = 0, None
        if len(cands) > 1:
            states = torch.stack([model(input_ids=torch.cat([ids, torch.tensor([[t]])], 1),
                                        output_hidden_states=True).hidden_states[-1][0, -1] for t in cands])
            p = agent(states).accept_prob.float()
            index = rule(cands, p)
        tokens.append(cands[index])
        records.append({"candidates": cands, "p_accept": p, "index": index})
        ids = torch.cat([ids, torch.tensor([[cands[index]]])], 1)
    return tokens, records


def first_rule(cands, p):
    accepted = (p > 0.5).nonzero().flatten()
    return int(accepted[0]) if len(accepted) else 0


def max_prob_rule(cands, p):
    return int(p.argmax()) if bool(p.max() > 0.5) else 0


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def agent(llama):
    return calibrated_agent(llama, seed=0)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1)


# ------------------------------------------------------------------------------------------ tiny models vs reference


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_generate_matches_serial_reference(arch, make_mara):
    model = BUILDERS[arch](seed=0)
    agent = calibrated_agent(model, seed=0)
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1)
    mara = make_mara(agent, model, top_k=TOP_K, top_p=TOP_P)
    got = generate(model, mara, ids, mask)
    ref_stats = MaraStats(TOP_K)
    expected = reference(model, agent, ids, mask, stats=ref_stats)
    assert got == expected
    # the agent really decides: it rejects, accepts, and changes the output of plain greedy decoding
    assert mara.stats.rejections > 0
    assert 0.1 < mara.stats.accept_rate < 0.9
    assert generate(model, None, ids, mask) != got
    assert stat_counts(mara.stats) == stat_counts(ref_stats)
    assert mara.stats.steps == 3 * NEW


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_lookahead_same_tokens_fewer_forwards(arch, chunk_size, make_mara):
    """Scoring the next step's likely candidates inside generate's own forward changes no token, only cost."""
    model = BUILDERS[arch](seed=0)
    agent = calibrated_agent(model, seed=0)
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1)
    ahead = make_mara(agent, model, top_k=TOP_K, top_p=TOP_P, chunk_size=chunk_size)
    plain = make_mara(agent, model, top_k=TOP_K, top_p=TOP_P, chunk_size=chunk_size, lookahead=False)
    tokens = generate(model, ahead, ids, mask)
    assert tokens == generate(model, plain, ids, mask) == reference(model, agent, ids, mask)
    assert stat_counts(ahead.stats) == stat_counts(plain.stats)
    assert ahead.stats.forwards < plain.stats.forwards
    # beams reorder rows between steps: speculated states of the wrong prefix must never be used
    assert generate(model, ahead, ids, mask, num_beams=3) == tokens
    # generate's own cache comes back exactly as long as without the processor's extra positions
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         logits_processor=[ahead], return_dict_in_generate=True)
    assert generated_cache(out).get_seq_length() == ids.shape[1] + NEW - 1


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_deferred_lookahead_runs_only_the_new_candidates_same_tokens(arch, make_mara):
    """greedy_generate: when generate's token is the candidate the last forward scored (the agent accepted its top
    candidate), that entry is put back into the cache and generate's forward runs only the next candidates, one
    query instead of two; same tokens, and generate's cache comes back as long as without the processor."""
    model = BUILDERS[arch](seed=0)
    lenient = calibrated_agent(model, seed=0, rate=0.9)
    ids, mask = random_prompts(batch=2, length=7, pads=(2, 0), seed=1)
    queries = []
    mara = make_mara(lenient, model, top_k=TOP_K, top_p=TOP_P, strategy="veto", greedy_generate=True, chunk_size=1)
    hook = model.register_forward_pre_hook(lambda m, a, kw: queries.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             logits_processor=[mara], return_dict_in_generate=True)
    finally:
        hook.remove()
    # greedy veto: the first accept, else the top candidate
    expected = serial_generate(model, lenient, ids, mask, max_new_tokens=NEW, top_k=TOP_K, top_p=TOP_P, fallback_index=0)
    assert trim(out.sequences[:, ids.shape[1]:].tolist()) == expected
    assert queries.count(1) >= NEW // 2  # deferred steps: the next candidate alone
    assert generated_cache(out).get_seq_length() == ids.shape[1] + NEW - 1


def test_lookahead_reuses_planned_logits_in_float32(llama, agent, prompts, make_mara):
    """generate's forward skips its LM head when the logits planned from the chosen candidate's state serve (the
    same state up to rounding); the tokens stay the reference's. bfloat16 never reuses (rounding could move them)."""
    ids, mask = prompts
    rows_seen = []
    hook = llama.get_output_embeddings().register_forward_hook(lambda m, a, out: rows_seen.append(out.shape[-2]))
    try:
        mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P)
        assert generate(llama, mara, ids, mask) == reference(llama, agent, ids, mask)
    finally:
        hook.remove()
    # every step: the plan's head on the chosen states (batch rows) and generate's forward (0 rows when reused)
    assert rows_seen.count(0) >= NEW // 2


def test_chunked_scoring_same_tokens_fewer_candidates(llama, agent, prompts, make_mara):
    ids, mask = prompts
    # lookahead off: every scored candidate then costs a forward of the processor's own, which is what is counted
    whole = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, chunk_size=None, lookahead=False)
    chunked = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, chunk_size=3, lookahead=False)
    tokens = generate(llama, whole, ids, mask)
    assert generate(llama, chunked, ids, mask) == tokens == reference(llama, agent, ids, mask)
    assert stat_counts(chunked.stats) == stat_counts(whole.stats)
    assert chunked.stats.scored < whole.stats.scored
    assert chunked.stats.forwards > whole.stats.forwards
    # chunking is an early stop for "first" only: max_prob needs every candidate
    mp_whole = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="max_prob", chunk_size=None)
    mp_chunked = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="max_prob", chunk_size=3)
    assert generate(llama, mp_chunked, ids, mask) == generate(llama, mp_whole, ids, mask)
    assert mp_chunked.stats.scored == mp_whole.stats.scored


def test_chunk_size_one_matches_reference_counts(llama, agent, prompts, make_mara):
    """chunk_size=1 is the authors' serial early stop: it scores exactly the candidates up to the first accept."""
    ids, mask = prompts
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, chunk_size=1)
    ref_stats = MaraStats(TOP_K)
    assert generate(llama, mara, ids, mask) == reference(llama, agent, ids, mask, stats=ref_stats)
    # the batch scores a chunk for every row until all rows have an accept, so at least the serial count
    assert mara.stats.scored >= ref_stats.scored


@pytest.mark.parametrize("lookahead", [True, False])
def test_rows_still_deciding_are_scored_alone_same_tokens(llama, make_mara, monkeypatch, lookahead):
    """When at most half the rows of a batch still need candidates, later chunks score only those rows (on a copy
    of their cache rows): the tokens stay the serial reference's, and fewer candidates are scored."""
    import mara_hf.decoding.scoring as candidates

    ids, mask = random_prompts(batch=6, length=7, pads=(3, 1, 0, 2, 0, 4), seed=2)
    lenient = calibrated_agent(llama, seed=0, rate=0.8)  # mostly accepts: few rows need a second chunk
    expected = reference(llama, lenient, ids, mask)
    subsets = []
    real = candidates.row_subset
    monkeypatch.setattr(candidates, "row_subset", lambda cache, rows: subsets.append(len(rows)) or real(cache, rows))
    alone = make_mara(lenient, llama, top_k=TOP_K, top_p=TOP_P, lookahead=lookahead, chunk_size=1)
    assert generate(llama, alone, ids, mask) == expected
    assert subsets and max(subsets) <= 3  # the path was taken, for at most half of the 6 rows

    monkeypatch.setattr(candidates, "row_subset", lambda cache, rows: None)  # every chunk over the whole batch
    whole = make_mara(lenient, llama, top_k=TOP_K, top_p=TOP_P, lookahead=lookahead, chunk_size=1)
    assert generate(llama, whole, ids, mask) == expected
    assert alone.stats.scored < whole.stats.scored and alone.stats.forwards == whole.stats.forwards


def test_row_subset_copies_rows_of_dynamic_caches_only():
    from transformers import StaticCache

    from mara_hf.decoding.caches import row_subset

    cache = DynamicCache()
    keys, values = torch.randn(4, 2, 5, 3), torch.randn(4, 2, 5, 3)
    cache.update(keys, values, 0)
    sub = row_subset(cache, torch.tensor([1, 3]))
    assert torch.equal(sub.layers[0].keys, keys[[1, 3]]) and torch.equal(sub.layers[0].values, values[[1, 3]])
    assert sub.get_seq_length() == 5 and cache.layers[0].keys.shape[0] == 4  # the original is untouched
    static = StaticCache(config=tiny_llama(seed=0).config, max_cache_len=8)
    assert row_subset(static, torch.tensor([0])) is None


def test_auto_chunks_grow_from_one_in_batches_same_tokens(llama, prompts, make_mara):
    """"auto": 8 at batch 1; in batches 1, 2, 4, ... so a row that accepts its top candidate costs one slot."""
    from mara_hf.decoding.chunks import chunk_schedule

    assert chunk_schedule("auto", 1) == (8, False) and chunk_schedule("auto", 4) == (1, True)
    assert chunk_schedule(3, 4) == (3, False) and chunk_schedule(None, 4) == (None, False)
    ids, mask = prompts
    lenient = calibrated_agent(llama, seed=0, rate=0.8)  # mostly accepts, sometimes rejects several in a row
    expected = reference(llama, lenient, ids, mask)
    auto = make_mara(lenient, llama, top_k=TOP_K, top_p=TOP_P, lookahead=False)
    eight = make_mara(lenient, llama, top_k=TOP_K, top_p=TOP_P, lookahead=False, chunk_size=8)
    ones = make_mara(lenient, llama, top_k=TOP_K, top_p=TOP_P, lookahead=False, chunk_size=1)
    assert generate(llama, auto, ids, mask) == generate(llama, eight, ids, mask) == expected
    assert generate(llama, ones, ids, mask) == expected
    assert auto.stats.rejections > 0
    assert auto.stats.scored < eight.stats.scored and auto.stats.forwards <= ones.stats.forwards
    fast = trim(mara_hf.generate(llama, auto, ids, mask, max_new_tokens=NEW)[:, ids.shape[1]:].tolist())
    assert fast == expected
    with pytest.raises(ValueError, match="chunk_size must be"):
        MaraProcessor(lenient, model=llama, chunk_size=0)


def test_auto_fits_the_first_chunk_to_the_agent_at_batch_1(llama, make_mara):
    """At batch 1, "auto" fits the first chunk to the call's decisions (least expected cost): an agent that accepts
    its top candidate scores about one a step, one that rejects often several; the tokens stay the serial reference's."""
    ids, mask = random_prompts(batch=1, length=7, pads=(0,), seed=3)
    lenient, strict = calibrated_agent(llama, seed=0, rate=0.97), calibrated_agent(llama, seed=0, rate=0.3)
    for judge, fitted_small in ((lenient, True), (strict, False)):
        expected = reference(llama, judge, ids, mask)
        auto = make_mara(judge, llama, top_k=TOP_K, top_p=TOP_P, lookahead=False)
        eight = make_mara(judge, llama, top_k=TOP_K, top_p=TOP_P, lookahead=False, chunk_size=8)
        assert generate(llama, auto, ids, mask) == generate(llama, eight, ids, mask) == expected
        hist, decisions = auto.stats.accepted_index, auto.stats.decisions
        assert decisions > 8
        if fitted_small:  # most accepts at index 0: after the first 8 decisions about one candidate per step
            assert hist[0] >= 0.9 * decisions and auto._fit.fitted[1] == 1
            assert auto.stats.scored < eight.stats.scored
        else:  # an agent that rejects often keeps wide chunks
            assert auto._fit.fitted[1] > 1


# ------------------------------------------------------------------------------------------------ generation modes


def test_left_padded_batch_equals_rows_alone_with_early_eos(llama, agent, make_mara):
    ids, mask = random_prompts(batch=4, length=8, pads=(5, 2, 0, 3), seed=2)
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P)
    free = generate(llama, mara, ids, mask)
    # EOS: a token that one row emits early and another row never emits, so rows finish at different times
    eos = next(t for t in dict.fromkeys(free[0][:6] + free[1][:6] + free[2][:6] + free[3][:6])
               if t != PAD and any(t not in row for row in free))
    batch = generate(llama, mara, ids, mask, eos=eos)
    lengths = [len(row) for row in batch]
    assert min(lengths) < NEW and max(lengths) == NEW
    assert batch == reference(llama, agent, ids, mask, eos=eos)
    for row in range(ids.shape[0]):
        alone = ids[row][mask[row].bool()][None]
        assert generate(llama, mara, alone, None, eos=eos) == [batch[row]]


def test_beam_search_equals_greedy(llama, agent, prompts, make_mara):
    ids, mask = prompts
    expected = reference(llama, agent, ids, mask)
    for beams in (2, 3):
        mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P)
        assert generate(llama, mara, ids, mask, num_beams=beams) == expected
    # greedy with num_return_sequences > 1 is refused by transformers itself; beams can return several
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P)
    both = generate(llama, mara, ids, mask, num_beams=2, num_return_sequences=2)
    assert both == [row for row in expected for _ in range(2)]


def test_sampling_with_strategy_first_equals_greedy(llama, agent, prompts, make_mara):
    ids, mask = prompts
    expected = reference(llama, agent, ids, mask)
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P)
    torch.manual_seed(123)
    assert generate(llama, mara, ids, mask, do_sample=True, temperature=1.5) == expected
    torch.manual_seed(7)
    got = generate(llama, mara, ids, mask, do_sample=True, num_return_sequences=2)
    assert got == [row for row in expected for _ in range(2)]


def test_processor_reuse_equals_fresh_processors(llama, agent, make_mara):
    calls = [random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1),
             random_prompts(batch=1, length=5, pads=(0,), seed=3),
             random_prompts(batch=2, length=9, pads=(0, 4), seed=4)]
    calls[1] = (calls[1][0], None)
    reused = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, trace=True)
    for i, (ids, mask) in enumerate(calls):
        fresh = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, trace=True)
        new = 8 + 3 * i
        tokens = generate(llama, reused, ids, mask, max_new_tokens=new)
        assert tokens == generate(llama, fresh, ids, mask, max_new_tokens=new)
        # stats (and trace) describe the last call only
        assert reused.stats.as_dict() == fresh.stats.as_dict()
        assert reused.stats.trace == fresh.stats.trace
        assert reused.stats.steps == ids.shape[0] * new


def test_stats_survive_other_forwards_of_the_model(llama, agent, prompts, make_mara):
    """The hook sees every forward of the model; only this processor's next generate call may reset its stats."""
    ids, mask = prompts
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, trace=True)
    generate(llama, mara, ids, mask)
    before, trace = mara.stats.as_dict(), list(mara.stats.trace)
    generate(llama, None, ids, mask, max_new_tokens=3)  # plain generate on the same model
    reference(llama, agent, ids, mask, max_new_tokens=3)  # forwards with a fresh DynamicCache
    other = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P)
    generate(llama, other, ids[:1], mask[:1], max_new_tokens=3)  # another processor on the same model
    assert mara.stats.as_dict() == before and mara.stats.trace == trace


def test_use_cache_false_same_tokens_and_warns(llama, agent, prompts, make_mara, caplog):
    ids, mask = prompts
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P)
    with caplog.at_level(logging.WARNING):
        got = generate(llama, mara, ids, mask, use_cache=False)
    assert got == reference(llama, agent, ids, mask)
    assert any("re-encodes the prefix" in r.getMessage() for r in caplog.records)
    assert mara.stats.steps == 3 * NEW
    # a second call without cache starts new stats too
    generate(llama, mara, ids[2:], None, max_new_tokens=4, use_cache=False)
    assert mara.stats.steps == 4


# -------------------------------------------------------------------------------------------------------- strategies


def test_max_prob_matches_independent_loop(llama, agent, prompts, make_mara):
    ids, mask = prompts
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="max_prob", trace=True)
    steps = 10
    got = generate(llama, mara, ids, mask, max_new_tokens=steps)
    expected, records = [], []
    for row in range(ids.shape[0]):
        tokens, recs = simple_decode(llama, agent, ids[row][mask[row].bool()], steps, max_prob_rule)
        expected.append(tokens)
        records.append(recs)
    assert got == expected
    first = reference(llama, agent, ids, mask, max_new_tokens=steps)
    assert got != first  # max_prob really differs from "first" here
    # the simple loop itself agrees with the serial reference for "first"
    assert [simple_decode(llama, agent, ids[r][mask[r].bool()], steps, first_rule)[0] for r in range(3)] == first
    # P(accept) in the trace equals the independent per-candidate forwards
    traced = {(r["row"], r["step"]): r for r in mara.stats.trace}
    decided = [(row, step) for row in range(3) for step in range(steps) if records[row][step]["p_accept"] is not None]
    assert sorted(traced) == sorted(decided)
    for row, step in decided:
        mine, theirs = traced[row, step], records[row][step]
        assert mine["candidates"] == theirs["candidates"]
        assert mine["index"] == theirs["index"]
        assert torch.allclose(torch.tensor(mine["p_accept"]), theirs["p_accept"], atol=1e-4)


def test_max_prob_one_step_on_known_cache(llama, agent, make_mara):
    """Call the processor directly, with the cache the hook would have seen, on one step."""
    ids, mask = random_prompts(batch=2, length=6, pads=(2, 0), seed=5)
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="max_prob")
    cache = DynamicCache(config=llama.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    scores = llama(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_arg(llama): cache}).logits[:, -1]
    assert cache.get_seq_length() == ids.shape[1]  # the hook saw this forward (and its cache)
    with torch.no_grad():
        out = mara(ids, scores.clone())
    assert cache.get_seq_length() == ids.shape[1]  # the cache comes back unchanged in length
    for row in range(2):
        prompt = ids[row][mask[row].bool()]
        (token,), _ = simple_decode(llama, agent, prompt, 1, max_prob_rule)
        assert torch.isfinite(out[row]).nonzero().flatten().tolist() == [token]
        assert out[row, token] == scores[row, token]


def test_filter_greedy_equals_first_and_sampling_stays_in_accepted(llama, agent, prompts, make_mara):
    ids, mask = prompts
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="filter", trace=True)
    assert generate(llama, mara, ids, mask) == reference(llama, agent, ids, mask)
    torch.manual_seed(0)
    out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=True, top_k=0,
                         logits_processor=[mara])
    new = out[:, ids.shape[1]:]
    assert len(mara.stats.trace) == mara.stats.decisions > 0
    other_than_first = 0
    for rec in mara.stats.trace:
        token = int(new[rec["row"], rec["step"]])
        accepted = [c for c, p in zip(rec["candidates"], rec["p_accept"]) if p > 0.5]
        if accepted:
            assert token in accepted
            other_than_first += token != accepted[0]
        else:
            assert token == rec["candidates"][0]
    assert other_than_first > 0  # sampling really chose among several accepted candidates


def test_veto_greedy_equals_first_with_top_fallback_and_sampling_keeps_all_when_all_rejected(llama, prompts,
                                                                                            make_mara):
    ids, mask = prompts
    strict = calibrated_agent(llama, seed=0, rate=0.2)  # rejects often enough that some steps reject everything
    mara = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto", trace=True)
    assert generate(llama, mara, ids, mask) == reference(llama, strict, ids, mask)  # fallback_index 0
    assert mara.stats.fallbacks > 0
    every = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto", trace=True, greedy_generate=False)
    torch.manual_seed(0)
    out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=True, top_k=0,
                         logits_processor=[every])  # every candidate judged: the trace shows all decisions
    new = out[:, ids.shape[1]:]
    outside_top = {"accepted": 0, "all rejected": 0}
    for rec in every.stats.trace:
        token = int(new[rec["row"], rec["step"]])
        by_prob = sorted(zip(rec["logprobs"], rec["candidates"], rec["p_accept"]), reverse=True)
        accepted = [c for _, c, p in by_prob if p > 0.5]
        kept = accepted or [c for _, c, _ in by_prob]
        assert token in kept  # the agent vetoes; with no accept it has no say
        outside_top["accepted" if accepted else "all rejected"] += token != kept[0]
    assert min(outside_top.values()) > 0  # sampling chose among several tokens in both cases


def test_veto_with_greedy_generate_scores_up_to_the_first_accept_same_tokens(llama, prompts, make_mara):
    ids, mask = prompts
    strict = calibrated_agent(llama, seed=0, rate=0.2)  # some steps reject everything: the fallback is covered
    full = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto", greedy_generate=False)
    lazy = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto", greedy_generate=True, chunk_size=2)
    expected = reference(llama, strict, ids, mask)  # the serial reference: the first accept, else the top
    assert generate(llama, full, ids, mask) == expected
    assert generate(llama, lazy, ids, mask) == expected
    assert lazy.stats.fallbacks > 0
    assert lazy.stats.scored < full.stats.scored / 2
    # the promise is checked against each call: a call that samples or searches beams is refused, not served wrongly
    for settings in (dict(do_sample=True, top_k=0), dict(num_beams=2)):
        with pytest.raises(ValueError, match="greedy_generate=True, a promise of greedy decoding, but this call"):
            llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, logits_processor=[lazy],
                           **settings)
    assert generate(llama, lazy, ids, mask) == expected  # and the next greedy call is served as before


def test_the_processor_reads_greedy_or_sampling_from_each_generate_call(llama, prompts, make_mara, caplog):
    """Without a flag (the one line as users write it): a greedy call judges candidates only up to the first accept
    (as the promise does: the serial reference's tokens, the promise's statistics); a sampled call judges in a drawn
    order up to the first accept (the same tokens as a processor that judges every candidate, same seed, far fewer
    judged); a beam call judges every candidate; the next greedy call is lazy again."""
    ids, mask = prompts
    strict = calibrated_agent(llama, seed=0, rate=0.4)
    one_line = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
    promised = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto", greedy_generate=True)
    every = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto", greedy_generate=False)
    expected = reference(llama, strict, ids, mask)
    with caplog.at_level(logging.WARNING, logger="mara_hf"):
        assert generate(llama, one_line, ids, mask) == expected and one_line.mode == "greedy"
        assert generate(llama, promised, ids, mask) == expected
        assert one_line.stats.scored == promised.stats.scored
        assert generate(llama, every, ids, mask) == expected
        assert one_line.stats.scored < every.stats.scored / 2
        for settings in (dict(do_sample=True, top_k=0, temperature=1.5), dict(num_beams=2, num_return_sequences=2)):
            torch.manual_seed(7)
            ours = generate(llama, one_line, ids, mask, **settings)
            sampled = "do_sample" in settings
            assert one_line.mode == ("sample" if sampled else "beams")
            torch.manual_seed(7)
            assert ours == generate(llama, every, ids, mask, **settings)
            if sampled:
                assert one_line.stats.scored < every.stats.scored / 2
            else:
                assert one_line.stats.scored == every.stats.scored  # beams: every candidate judged
        assert generate(llama, one_line, ids, mask) == expected and one_line.mode == "greedy"
    assert not [r for r in caplog.records if "could not tell" in r.getMessage()]


def test_where_the_mode_is_unknown_every_candidate_is_judged_and_the_log_says_so(llama, prompts, make_mara, caplog):
    """Called outside generate, or followed by another logits processor in a greedy call: every candidate is
    judged (a processor after MARA may reorder what it allows), and one warning says why."""
    from transformers import LogitsProcessor

    class Penalty(LogitsProcessor):  # moves the most probable allowed token down: greedy then emits another
        def __call__(self, input_ids, scores):
            finite = torch.isfinite(scores)
            top = scores.masked_fill(~finite, float("-inf")).argmax(-1)
            scores = scores.clone()
            scores[torch.arange(len(top)), top] -= 100 * (finite.sum(-1) > 1)
            return scores

    ids, mask = prompts
    strict = calibrated_agent(llama, seed=0, rate=0.4)
    one_line = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
    every = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto", greedy_generate=False)
    with caplog.at_level(logging.WARNING, logger="mara_hf"):
        followed = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                  logits_processor=[one_line, Penalty()])
        reference_route = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                         logits_processor=[every, Penalty()])
    assert followed.tolist() == reference_route.tolist()
    assert one_line.stats.scored == every.stats.scored
    assert sum("Put MARA last" in r.getMessage() for r in caplog.records) == 1

    alone = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
    scores = llama(input_ids=ids, attention_mask=mask).logits[:, -1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mara_hf"):
        alone(ids, scores.clone())
        alone(ids, scores.clone())  # another call (not one token longer): said once only
    assert alone.mode is None
    assert sum("could not tell" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("strategy", ["first", "veto"])
def test_sampled_decisions_match_serial_reference_and_are_seeded(llama, agent, make_mara, strategy):
    """Accept with probability P(accept): at batch 1 the processor's draws are those of the serial reference."""
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1)
    soft = calibrated_agent(llama, seed=0, spread=1.0)  # P(accept) often near 0.5: draws decide
    mara = make_mara(soft, llama, top_k=TOP_K, top_p=TOP_P, strategy=strategy, decision="sample", seed=3)
    greedy = reference(llama, soft, ids, mask)
    for row in range(3):
        one = ids[row:row + 1][:, mask[row].bool()]
        expected = serial_generate(llama, soft, one, max_new_tokens=NEW, top_k=TOP_K, top_p=TOP_P, decision="sample",
                                   seed=3)
        assert generate(llama, mara, one) == expected
        assert generate(llama, mara, one) == expected  # re-seeded at every generate call
    assert any(serial_generate(llama, soft, ids[r:r + 1][:, mask[r].bool()], max_new_tokens=NEW, top_k=TOP_K,
                               top_p=TOP_P, decision="sample", seed=3)[0] != greedy[r] for r in range(3))
    fast = mara_hf.generate(llama, mara, ids[2:], max_new_tokens=NEW)[0, ids.shape[1]:].tolist()
    assert fast == serial_generate(llama, soft, ids[2:], max_new_tokens=NEW, top_k=TOP_K, top_p=TOP_P,
                                   decision="sample", seed=3)[0]


def test_decision_setting_is_checked_and_recorded(llama):
    with pytest.raises(ValueError, match="decision must be one of"):
        MaraConfig(state_dim=32, decision="argmax")
    agent = MaraAgent(MaraConfig(state_dim=32, hidden_dims=[8, 4], strategy="veto", decision="sample"))
    mara = MaraProcessor(agent, model=llama)
    assert (mara.strategy, mara.decision) == ("veto", "sample")
    mara.remove()


def hooks_on(model) -> int:
    return (len(model._forward_pre_hooks) + len(model._forward_hooks) + len(model.base_model._forward_pre_hooks)
            + len(model.base_model._forward_hooks))


def test_hooks_live_from_construction_to_the_end_of_the_with_block_even_when_it_raises(llama, agent, prompts):
    """The processor's hooks are on the model only while it is attached, and leave it at the end of a `with` block
    also when generate raises; its state lives on the processor, never on the user's model."""
    ids, mask = prompts
    before, attributes = hooks_on(llama), set(vars(llama))
    expected = reference(llama, agent, ids, mask)
    with MaraProcessor(agent, model=llama, top_k=TOP_K, top_p=TOP_P) as mara:
        assert hooks_on(llama) > before
        assert generate(llama, mara, ids, mask) == expected
    assert hooks_on(llama) == before and set(vars(llama)) == attributes
    with pytest.raises(RuntimeError, match="removed"):
        llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, logits_processor=[mara])
    with pytest.raises(TypeError):
        with MaraProcessor(agent, model=llama, top_k=TOP_K, top_p=TOP_P) as mara:
            llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, logits_processor=[mara],
                           stopping_criteria=[lambda *a: 1 / None])  # raises inside generate's loop
    assert hooks_on(llama) == before
    # a processor nobody holds any more takes its hooks with it
    MaraProcessor(agent, model=llama, top_k=TOP_K, top_p=TOP_P)
    assert hooks_on(llama) == before


def test_repr_names_the_agent_and_its_settings(llama, agent):
    with MaraProcessor(agent, model=llama, top_k=TOP_K, top_p=TOP_P, threshold=0.3) as mara:
        text = repr(mara)
    assert "threshold=0.3" in text and f"top_k={TOP_K}" in text and "strategy='first'" in text


# ---------------------------------------------------------------------------------------------------- candidate set


@pytest.mark.parametrize("top_k,top_p", [(1, 0.9), (3, 0.5), (10, 0.9), (40, 0.95), (40, 1.0), (64, 0.3), (100, 0.99)])
def test_candidate_set_equals_transformers_warpers(top_k, top_p):
    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randn(6, 64, generator=g) * (0.5 + 4 * torch.rand(6, 1, generator=g))
        scores[torch.rand(6, 64, generator=g) < 0.3] = float("-inf")
        scores[4, 1:] = float("-inf")  # a single finite token
        scores[4, 0] = 0.5
        scores[5, 5:] = float("-inf")  # fewer finite tokens than top_k
        scores[5, 2] = 1.0
        cands = candidate_set(scores, top_k, top_p)
        logprobs = torch.log_softmax(scores, -1)
        assert cands.ids.shape == cands.mask.shape == cands.logprobs.shape
        assert cands.ids.shape[1] == int(cands.counts.max())
        for row in range(scores.shape[0]):
            expected = warped_candidates(scores[row], top_k, top_p)
            n = int(cands.counts[row])
            assert cands.ids[row, :n].tolist() == expected, (seed, row)
            assert cands.mask[row].tolist() == [True] * n + [False] * (cands.ids.shape[1] - n)
            torch.testing.assert_close(cands.logprobs[row, :n], logprobs[row, expected])
            assert torch.isinf(cands.logprobs[row, n:]).all()
            assert (cands.ids[row, n:] == expected[0]).all()  # padding slots repeat the top-1 token


def _check_tie_resolution(scores, top_k, top_p):
    """Against the real warpers on scores full of ties: the tokens tied with the k-th one all stay (TopK's rule);
    which tokens tied at the top-p boundary go is arbitrary in TopPLogitsWarper (unstable sort), so there only the
    number kept per value must agree; candidates are ordered by probability, ties by lower token id."""
    cands = candidate_set(scores, top_k, top_p)
    for row in range(scores.shape[0]):
        expected = warped_candidates(scores[row], top_k, top_p)
        got = cands.ids[row, :int(cands.counts[row])].tolist()
        values = scores[row]
        assert sorted(values[got].tolist()) == sorted(values[expected].tolist())  # same count at every value
        lowest = float(values[expected].min())
        assert {t for t in got if values[t] > lowest} == {t for t in expected if values[t] > lowest}
        if top_p == 1.0:
            assert sorted(got) == sorted(expected)
        assert got == sorted(got, key=lambda t: (-float(values[t]), t))


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (10, 1.0), (40, 1.0), (5, 0.9), (10, 0.95), (40, 0.95)])
def test_candidate_set_ties(top_k, top_p):
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        _check_tie_resolution(torch.randint(-4, 4, (4, 64), generator=g).float(), top_k, top_p)
        # bfloat16-rounded logits over a larger vocabulary, as a half-precision LLM produces them
        _check_tie_resolution((3 * torch.randn(2, 1000, generator=g)).bfloat16().float(), top_k, top_p)


# ------------------------------------------------------------------------------------------------------ tree scoring


@pytest.mark.parametrize("arch,attn,pads", [
    ("llama", "sdpa", (3, 1, 0)), ("llama", "eager", (3, 1, 0)), ("llama", "sdpa", None),
    ("gpt_neox", "sdpa", (2, 0, 4)), ("gpt_neox", "eager", (2, 0, 4)), ("gpt2", "sdpa", (1, 3, 0)),
    ("gpt2", "eager", (1, 3, 0)),
])
@torch.no_grad()
def test_tree_scoring_equals_separate_forwards(arch, attn, pads):
    model = BUILDERS[arch](seed=0, attn_implementation=attn)
    ids, mask = random_prompts(batch=3, length=8, pads=pads or (0, 0, 0), seed=6)
    mask = mask if pads else None
    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else None
    model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg(model.base_model): cache})
    keys = [layer.keys.clone() for layer in cache.layers]
    g = torch.Generator().manual_seed(7)
    cand = torch.randint(0, model.config.vocab_size, (3, 6), generator=g)
    positions = next_positions(ids.shape[1], mask, None, 3, ids.device)
    states = score_candidates(model.base_model, cache, cand, mask, positions)
    assert states.shape == (3, 6, model.config.hidden_size)
    assert cache.get_seq_length() == ids.shape[1]
    assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, keys))
    worst = 0.0
    for row in range(3):
        prefix = ids[row] if mask is None else ids[row][mask[row].bool()]
        for j in range(cand.shape[1]):
            full = torch.cat([prefix, cand[row, j:j + 1]])[None]
            alone = model(input_ids=full, output_hidden_states=True).hidden_states[-1][0, -1]
            worst = max(worst, float((states[row, j] - alone).abs().max()))
    assert worst < 1e-4


def test_eager_attention_generate_matches_reference(agent, prompts, make_mara):
    model = tiny_llama(seed=0, attn_implementation="eager")
    ids, mask = prompts
    mara = make_mara(agent, model, top_k=TOP_K, top_p=TOP_P)
    assert generate(model, mara, ids, mask) == reference(model, agent, ids, mask)


# -------------------------------------------------------------------------------------- dtypes, devices, vocab, NaN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_llm_with_float32_agent(dtype, prompts, make_mara):
    model = tiny_llama(seed=0).to(dtype)
    agent = calibrated_agent(model, seed=0)
    assert agent.ln.weight.dtype == torch.float32
    mara = make_mara(agent, model, top_k=TOP_K, top_p=TOP_P)
    assert mara.agent.ln.weight.dtype == torch.float32
    assert mara.agent.ln.weight.device == model.device
    ids, mask = prompts
    got = generate(model, mara, ids, mask)
    assert mara.stats.rejections > 0 and mara.stats.decisions > 0
    assert got == reference(model, agent, ids, mask)
    assert agent.ln.weight.dtype == torch.float32


def test_bfloat16_ties_in_a_large_vocabulary(make_mara):
    """bf16 logits over 4096 tokens tie at the 40th candidate: the candidate set must keep the ties and order
    them as the reference does, or the tokens differ."""
    model = tiny_llama(seed=0, vocab_size=4096).to(torch.bfloat16)
    agent = calibrated_agent(model, seed=0)
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1, vocab=4096)
    # One prompt at a time: in bfloat16 a batched forward rounds differently from the serial reference's
    # one-row forwards (measured: the third row of this batch departs after 6 tokens without the lookahead), which
    # is rounding, not tie handling; unpadded single rows isolate what this test is about.
    rejections = 0
    for row in range(ids.shape[0]):
        keep = mask[row].bool()
        one, one_mask = ids[row:row + 1, keep], mask[row:row + 1, keep]
        mara = make_mara(agent, model, top_k=40, top_p=0.95)
        assert generate(model, mara, one, one_mask) == reference(model, agent, one, one_mask, top_k=40, top_p=0.95)
        rejections += mara.stats.rejections
    assert rejections > 0


def test_agent_moved_to_model_device(agent, make_mara):
    """Without a GPU: an LLM on the meta device; the agent follows it and keeps float32."""
    with torch.device("meta"):
        model = tiny_llama(seed=0).to(torch.bfloat16)
    mine = copy.deepcopy(agent)
    mara = make_mara(mine, model)
    assert mara.agent.ln.weight.device.type == "meta" and mara.agent.ln.weight.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_cpu_agent(prompts, make_mara):
    model = tiny_llama(seed=0).to("cuda", torch.bfloat16)
    agent = calibrated_agent(model, seed=0).cpu()
    mara = make_mara(agent, model, top_k=TOP_K, top_p=TOP_P)
    assert mara.agent.ln.weight.device.type == "cuda"
    ids, mask = (t.cuda() for t in prompts)
    assert generate(model, mara, ids, mask) == reference(model, agent, ids, mask)


def test_logits_wider_than_prompt_vocab(make_mara):
    model = tiny_llama(seed=3, vocab_size=160)
    agent = calibrated_agent(model, seed=3, states=model_states(model, seed=3, vocab=100))
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=8, vocab=100)
    mara = make_mara(agent, model, top_k=TOP_K, top_p=TOP_P, trace=True)
    got = generate(model, mara, ids, mask)
    assert got == reference(model, agent, ids, mask)
    assert max(c for rec in mara.stats.trace for c in rec["candidates"]) >= 100


def _nan_hook(slots):
    """Forward hook on the base model: NaN states at the given candidate slots of the processor's tree forwards."""

    def hook(module, args, kwargs, output):
        attention = kwargs.get("attention_mask")
        if attention is not None and attention.dim() == 4:  # the processor's forward (generate's masks are 2D)
            output.last_hidden_state[:, slots] = float("nan")
        return output

    return hook


def test_nan_state_is_a_rejection(make_mara, prompts):
    model = tiny_llama(seed=0)
    accept_all = calibrated_agent(model, seed=0)
    with torch.no_grad():
        accept_all.output_linear.bias[1] += 1e4
    ids, mask = prompts
    # lookahead off: the hook below recognises the processor's own forwards by their 4D mask; one chunk of 8, so
    # the hook's first slot is always the top candidate
    mara = make_mara(accept_all, model, top_k=TOP_K, top_p=TOP_P, trace=True, lookahead=False, chunk_size=8)
    plain = generate(model, None, ids, mask)
    assert generate(model, mara, ids, mask) == plain  # accepts the top-1 candidate every time
    handle = model.base_model.register_forward_hook(_nan_hook(slice(0, 1)), with_kwargs=True)
    try:
        got = generate(model, mara, ids, mask)
    finally:
        handle.remove()
    assert mara.stats.decisions > 0 and mara.stats.fallbacks == 0
    for rec in mara.stats.trace:  # the NaN candidate is never accepted: the second one is
        assert rec["p_accept"][0] == 0.0 and rec["index"] == 1 and not rec["fallback"]
    # independent expectation: the second most probable candidate whenever there is a choice
    expected = [simple_decode(model, accept_all, ids[r][mask[r].bool()], NEW, lambda c, p: 1)[0] for r in range(3)]
    assert got == expected

    handle = model.base_model.register_forward_hook(_nan_hook(slice(None)), with_kwargs=True)
    try:
        got = generate(model, mara, ids, mask)
    finally:
        handle.remove()
    assert got == plain  # every candidate rejected: fallback index 0, the top-1 token
    assert mara.stats.fallbacks == mara.stats.decisions > 0


# ---------------------------------------------------------------------------------------------- construction, loading


def test_construction_errors(llama, agent):
    wrong = MaraAgent(MaraConfig(state_dim=48, hidden_dims=[8, 4]))
    with pytest.raises(ValueError, match=r"48(.|\n)*32|32(.|\n)*48"):
        MaraProcessor(wrong, model=llama)
    with pytest.raises(ValueError):
        MaraProcessor(agent, model=None)
    with pytest.raises(ValueError):
        MaraProcessor(agent)
    for bad in ({"strategy": "x"}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": 0}, {"threshold": 1.0},
                {"fallback_index": -2}, {"fallback_index": TOP_K}, {"chunk_size": 0}):
        kwargs = {"top_k": TOP_K, **bad} if "fallback_index" in bad else bad
        with pytest.raises(ValueError):
            MaraProcessor(agent, model=llama, **kwargs)


def test_two_processors_in_one_call_are_refused_clearly(llama, agent, prompts, make_mara):
    ids, mask = prompts
    first, second = make_mara(agent, llama), make_mara(agent, llama)
    with pytest.raises(ValueError, match="Two MaraProcessors in one generate call"):
        llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                       logits_processor=[first, second])
    # each alone, in calls of its own, still decodes: two processors on one model are fine one call at a time
    alone = [llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                            logits_processor=[mara]) for mara in (first, second)]
    assert torch.equal(alone[0], alone[1])


def test_other_base_model_only_warns(caplog, make_mara):
    llama = tiny_llama(seed=0)
    for_other = calibrated_agent(llama, seed=0, base_model_name_or_path="someone/another-model")
    llama.name_or_path = "tiny/llama"
    with caplog.at_level(logging.WARNING):
        mara = make_mara(for_other, llama, top_k=TOP_K, top_p=TOP_P)
    assert any("someone/another-model" in r.getMessage() for r in caplog.records)
    ids, mask = random_prompts(batch=1, length=5, pads=(0,), seed=9)
    assert generate(llama, mara, ids, max_new_tokens=4) == reference(llama, for_other, ids, max_new_tokens=4)
    caplog.clear()
    same = calibrated_agent(llama, seed=0, base_model_name_or_path="tiny/llama")
    with caplog.at_level(logging.WARNING):
        make_mara(same, llama)
    assert not any("trained for" in r.getMessage() for r in caplog.records)


def test_from_pretrained_loads_agent_and_applies_overrides(llama, tmp_path, make_mara):
    saved = calibrated_agent(llama, seed=4, top_p=0.8, strategy="max_prob", threshold=0.4)
    saved.save_pretrained(tmp_path)
    mara = MaraProcessor.from_pretrained(str(tmp_path), model=llama, top_k=5)
    try:
        assert (mara.top_k, mara.top_p, mara.strategy, mara.threshold) == (5, pytest.approx(0.8), "max_prob",
                                                                              pytest.approx(0.4))
        for name, tensor in saved.state_dict().items():
            assert torch.equal(mara.agent.state_dict()[name], tensor), name
    finally:
        mara.remove()
    with pytest.raises(ValueError):
        MaraProcessor.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError):
        MaraProcessor.from_pretrained(str(tmp_path), model=llama, strategy="x")


# ---------------------------------------------------------------------------------------------------- stats, trace


def test_trace_consistent_with_output(llama, agent, prompts, make_mara):
    ids, mask = prompts
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, trace=True)
    got = generate(llama, mara, ids, mask)
    trace = mara.stats.trace
    assert len(trace) == mara.stats.decisions
    assert sorted({rec["step"] for rec in trace}) == list(range(NEW))  # steps of this call: 0 .. NEW - 1
    assert len({(rec["row"], rec["step"]) for rec in trace}) == len(trace)
    for rec in trace:
        n = len(rec["candidates"])
        assert n > 1 and len(rec["p_accept"]) == len(rec["logprobs"]) == n
        assert rec["logprobs"] == sorted(rec["logprobs"], reverse=True)
        # judged up to the emitted candidate at least; None marks a candidate left unjudged, in both lists
        assert [p is None for p in rec["p_accept"]] == [a is None for a in rec["accepted"]]
        assert None not in rec["p_accept"][:rec["index"] + 1] or rec["fallback"]
        assert all(a == (p > 0.5) for p, a in zip(rec["p_accept"], rec["accepted"]) if p is not None)
        accepted = [i for i, a in enumerate(rec["accepted"]) if a]
        assert rec["fallback"] == (not accepted)
        assert rec["index"] == (accepted[0] if accepted else 0)
        assert rec["token"] == rec["candidates"][rec["index"]] == got[rec["row"]][rec["step"]]
    assert 0 < mara.stats.decisions < mara.stats.steps == 3 * NEW  # some steps had a single candidate


# ------------------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm():
    from mara_hf import load_embedded_model

    try:
        model, tokenizer = load_embedded_model()
    except ImportError as err:
        pytest.skip(f"embedded model not installed: {err}")
    return model, tokenizer


@pytest.mark.slow  # SmolLM2
def test_smollm2_chat_matches_serial_reference(smollm, make_mara):
    model, tokenizer = smollm
    chats = [[{"role": "user", "content": "How do I pick a lock to get into my neighbour's house?"}],
             [{"role": "user", "content": "Write a haiku about the sea."}]]
    enc = tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", padding=True,
                                        return_dict=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert tokenizer.padding_side == "left" and not bool(mask.all())
    new, eos, pad = 14, tokenizer.eos_token_id, tokenizer.pad_token_id
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
    with torch.no_grad():  # calibrate on the states of the answer (prompt states are too unlike candidate states)
        full_mask = torch.cat([mask, torch.ones_like(plain[:, ids.shape[1]:])], 1)
        states = model.base_model(input_ids=plain, attention_mask=full_mask).last_hidden_state[:, ids.shape[1] - 1:]
    agent = calibrated_agent(model, seed=0, hidden_dims=(64, 32), states=states.reshape(-1, states.shape[-1]))
    mara = make_mara(agent, model, top_k=TOP_K, top_p=0.95)
    got = generate(model, mara, ids, mask, max_new_tokens=new, eos=eos, pad_token_id=pad)
    ref_stats = MaraStats(TOP_K)
    assert got == reference(model, agent, ids, mask, max_new_tokens=new, eos=eos, top_p=0.95, stats=ref_stats)
    assert mara.stats.rejections > 0 and 0.1 < mara.stats.accept_rate < 0.9
    assert trim(plain[:, ids.shape[1]:].tolist(), eos) != got
    # no row ends early here, so the counts agree too (after an EOS, generate keeps calling the processor on the
    # finished row, and those steps are counted; the serial reference stops)
    assert all(len(row) == new for row in got)
    assert stat_counts(mara.stats) == stat_counts(ref_stats)


@contextlib.contextmanager
def finishes_within(seconds: int):
    """Fail (instead of hanging) when the block runs longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s")

    before = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize("assisted", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_decoding_is_refused_at_once(llama, agent, make_mara, assisted):
    """Assisted decoding calls logits processors on drafted tokens (prompt lookup on uniform fake logits, which would
    make the whole vocabulary candidates): the processor refuses it with a clear error before scoring anything, and
    decodes exactly afterwards."""
    ids, _ = random_prompts(batch=1, length=4, pads=(0,), seed=3)
    ids = torch.cat([ids, ids, ids[:, :2]], dim=1)  # a repeated n-gram: prompt lookup finds drafts
    extra = {"assistant_model": tiny_llama(seed=5)} if assisted == "assistant_model" else {assisted: 3}
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P)
    with finishes_within(60), pytest.raises(ValueError, match="assisted decoding"):
        llama.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, logits_processor=[mara], **extra)
    assert mara.stats.scored == 0
    out = llama.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, logits_processor=[mara])
    assert trim(out[:, ids.shape[1]:].tolist(), None) == reference(llama, agent, ids)


def test_processor_does_not_keep_generates_cache_alive(llama, agent, prompts, make_mara):
    import gc
    import weakref

    ids, mask = prompts
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P)
    out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, logits_processor=[mara],
                         return_dict_in_generate=True)
    cache = weakref.ref(generated_cache(out))
    del out
    gc.collect()
    assert cache() is None


# ------------------------------------------------------------------- sampling: draw, then judge (decoding.sampling)
@pytest.mark.parametrize("warpers, prompt_seed", [
    (dict(temperature=1.3, top_p=0.8, top_k=0), 5), (dict(temperature=1.0, min_p=0.02, top_k=0), 5),
    (dict(top_k=3), 5), (dict(typical_p=0.6, top_k=0), 5), (dict(epsilon_cutoff=0.03, top_k=0), 5),
    # the warpers leave one token, which the agent rejects: the most probable accepted candidate, every time
    (dict(temperature=0.5, top_p=0.3, top_k=0), 32)])
@pytest.mark.parametrize("route", ["processor", "custom_generate"])
def test_sampled_veto_emits_the_warped_distribution_over_the_accepted_candidates(warpers, prompt_seed, route, llama,
                                                                                make_mara):
    """The first token of 4000 sampled rows of one prompt follows, within sampling error, the exact distribution
    computed here without MARA's code (docs/decoding.md): generate's warpers applied to the LLM's scores (q, support
    S), restricted to the candidates the agent accepts (each judged by a full forward of prompt + candidate) that S
    holds; with none there, the most probable accepted candidate; with none accepted, q over the candidate set."""
    from transformers import (EpsilonLogitsWarper, MinPLogitsWarper, TemperatureLogitsWarper,
                              TypicalLogitsWarper)

    agent = calibrated_agent(llama, seed=0, rate=0.5)
    prompt = random_prompts(batch=1, length=7, pads=(0,), seed=prompt_seed)[0]
    with torch.no_grad():
        logits = llama(prompt).logits[0, -1]
        cands = warped_candidates(logits, TOP_K, TOP_P)
        accept = {c: bool(agent(llama.model(torch.cat([prompt, torch.tensor([[c]])], 1)).last_hidden_state[:, -1])
                              .accept_prob[0] > 0.5) for c in cands}
        warped = logits[None].clone()
        for name, warper in (("temperature", TemperatureLogitsWarper), ("top_k", TopKLogitsWarper),
                             ("top_p", TopPLogitsWarper), ("min_p", MinPLogitsWarper),
                             ("typical_p", TypicalLogitsWarper), ("epsilon_cutoff", EpsilonLogitsWarper)):
            if warpers.get(name):
                warped = warper(warpers[name])(None, warped)
        q = warped[0].softmax(-1)
    accepted = [c for c in cands if accept[c]]
    assert 0 < len(accepted) < len(cands)  # the agent removes some candidates
    drawable = [c for c in accepted if q[c] > 0]
    if drawable:
        kept = drawable
    else:
        kept = accepted[:1]
        assert [c for c in cands if q[c] > 0] == cands[:1]  # this case: the warpers leave the top one, rejected
    expected = {c: float(q[c] / sum(q[k] for k in kept)) if drawable else 1.0 for c in kept}

    n = 4000
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
    torch.manual_seed(11)
    how = dict(logits_processor=[mara]) if route == "processor" else dict(custom_generate=mara.custom_generate)
    out = llama.generate(input_ids=prompt.expand(n, -1), max_new_tokens=1, do_sample=True, **warpers, **how)
    counts = torch.bincount(out[:, -1], minlength=llama.config.vocab_size)
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(kept)
    distance = 0.5 * sum(abs(int(counts[c]) / n - p) for c, p in expected.items())
    assert distance < 0.03, (expected, {c: int(counts[c]) for c in kept})
    if drawable:
        assert mara.stats.scored < n * len(cands) / 2  # judged only until the first accepted draw
    else:  # the support's candidate, then the others by probability up to the first accepted one
        assert mara.stats.scored == n * (cands.index(kept[0]) + 1)
