"""`model.generate(..., custom_generate=mara.custom_generate)`: MARA's fast decoder as generate's decoding loop,
checked against the serial reference (the paper's algorithm) and the processor route."""

import copy

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from mara_hf import serial_generate
from tiny_models import BUILDERS, EOS, calibrated_agent, random_prompts

NEW, TOP_K, TOP_P = 10, 8, 0.9


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def make_mara(make_mara):
    return lambda agent, model, **kwargs: make_mara(agent, model, top_k=TOP_K, top_p=TOP_P, **kwargs)


def new_tokens(out, ids):
    return out[:, ids.shape[1]:].tolist()


def upto_eos(rows):
    return [row[:row.index(EOS) + 1] if EOS in row else row for row in rows]


@pytest.mark.parametrize("strategy", ["first", "veto"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_same_tokens_as_serial_reference_and_processor(arch, strategy, make_mara):
    model = BUILDERS[arch](seed=0)
    agent = calibrated_agent(model, seed=0)
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1)
    mara = make_mara(agent, model, strategy=strategy)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=EOS,
                         custom_generate=mara.custom_generate)
    got = new_tokens(out, ids)
    assert mara.stats.rejections > 0  # the agent really decides
    # greedy "veto" emits the most probable accepted candidate, else the most probable: "first" with fallback 0
    fallback = 0 if strategy == "veto" else None
    assert upto_eos(got) == serial_generate(model, agent, ids, mask, max_new_tokens=NEW, eos_token_id=EOS,
                                            top_k=TOP_K, top_p=TOP_P, fallback_index=fallback)
    by_processor = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=EOS,
                                  do_sample=False, logits_processor=[mara])
    # generate pads rows after their EOS: the whole tensors agree
    assert out.tolist() == by_processor.tolist()


def test_veto_scores_only_up_to_the_emitted_candidate_without_a_promise(make_mara):
    model = BUILDERS["llama"](seed=0)
    agent = calibrated_agent(model, seed=0)
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1)
    mara = make_mara(agent, model, strategy="veto", chunk_size=1)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, custom_generate=mara.custom_generate)
    lazy = mara.stats.scored
    by_processor = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                  logits_processor=[mara])
    assert out.tolist() == by_processor.tolist()
    every = make_mara(agent, model, strategy="veto", chunk_size=1, greedy_generate=False)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, logits_processor=[every])
    assert lazy < every.stats.scored / 2  # against a processor that judges every candidate


def test_rows_still_deciding_are_scored_alone_in_the_fast_loop(make_mara, monkeypatch):
    """The fast loop keeps its candidates' cache entries; when at most half the rows still need a candidate, later
    chunks score those rows alone and append their entries: tokens stay the serial reference's, fewer candidates
    are scored, in as many forwards (test_compat checks the same on sliding windows and softcapped logits)."""
    import mara_hf.decoding.scoring as candidates

    model = BUILDERS["llama"](seed=0)
    ids, mask = random_prompts(batch=6, length=7, pads=(3, 1, 0, 2, 0, 4), seed=2)
    lenient = calibrated_agent(model, seed=0, rate=0.8)  # mostly accepts: few rows need a second chunk
    expected = serial_generate(model, lenient, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, top_k=TOP_K,
                               top_p=TOP_P, fallback_index=0)
    subsets, real = [], candidates.row_subset
    monkeypatch.setattr(candidates, "row_subset", lambda cache, rows: subsets.append(len(rows)) or real(cache, rows))
    alone = make_mara(lenient, model, strategy="veto", chunk_size=1)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=EOS,
                         custom_generate=alone.custom_generate)
    assert upto_eos(new_tokens(out, ids)) == expected
    assert subsets and max(subsets) <= 3  # the path was taken, for at most half of the 6 rows

    monkeypatch.setattr(candidates, "row_subset", lambda cache, rows: None)  # every chunk over the whole batch
    whole = make_mara(lenient, model, strategy="veto", chunk_size=1)
    assert model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=EOS,
                          custom_generate=whole.custom_generate).tolist() == out.tolist()
    assert alone.stats.scored < whole.stats.scored and alone.stats.forwards == whole.stats.forwards


@pytest.mark.parametrize("rate, narrows", [(0.97, True), (0.3, False)])
def test_auto_chunk_fits_the_agent_at_batch_1_same_tokens(rate, narrows, make_mara):
    """"auto" at batch 1 narrows to one candidate a step for an agent that accepts its top candidate, stays wide
    for one that rejects often; the tokens are the serial reference's whatever the width."""
    model = BUILDERS["llama"](seed=0)
    agent = calibrated_agent(model, seed=0, rate=rate)
    ids, mask = random_prompts(batch=1, length=7, pads=(0,), seed=3)
    runs = {}
    for chunk in ("auto", 8, 1):
        mara = make_mara(agent, model, strategy="veto", chunk_size=chunk)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24,
                             custom_generate=mara.custom_generate)
        runs[chunk] = (new_tokens(out, ids), mara.stats)
    expected = serial_generate(model, agent, ids, mask, max_new_tokens=24, top_k=TOP_K, top_p=TOP_P, fallback_index=0)
    assert runs["auto"][0] == runs[8][0] == runs[1][0] == expected
    auto, eight, one = runs["auto"][1], runs[8][1], runs[1][1]
    assert auto.decisions > 8
    if narrows:  # past the first 8 decisions it scores as chunks of one do, in as few forwards as chunks of 8
        assert one.scored <= auto.scored < eight.scored and auto.forwards <= one.forwards
    else:  # it stays wide enough to hold most accepts in one forward: fewer forwards than chunks of one
        assert auto.scored <= eight.scored and auto.forwards < one.forwards


class BanToken(LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -float("inf")
        return scores


def test_generate_settings_apply_as_in_the_processor_route(make_mara):
    model = BUILDERS["llama"](seed=0)
    agent = calibrated_agent(model, seed=0)
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1)
    mara = make_mara(agent, model)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, custom_generate=mara.custom_generate)
    banned = plain[0, ids.shape[1]]  # the first token of row 0
    settings = dict(max_new_tokens=NEW, min_new_tokens=4, eos_token_id=EOS, repetition_penalty=1.3)
    got = model.generate(input_ids=ids, attention_mask=mask, custom_generate=mara.custom_generate,
                         logits_processor=[BanToken(banned)], **settings)
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                              logits_processor=[BanToken(banned), mara], **settings)
    assert got.tolist() == expected.tolist()
    assert banned not in got[:, ids.shape[1]:]
    assert got.tolist() != plain.tolist()


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_streamer_sees_the_prompt_and_every_token_as_with_generate_s_own_loop(make_mara):
    """transformers hands a callable custom_generate no `streamer=` (it keeps only the arguments `_sample` lacks);
    the loop takes generate's own, and streams what the processor route streams: the prompt (put by generate),
    then each token."""
    model = BUILDERS["llama"](seed=0)
    mara = make_mara(calibrated_agent(model, seed=0), model)
    ids, _ = random_prompts(batch=1, length=5, pads=(0,), seed=2)
    streamed = []
    for route in (dict(custom_generate=mara.custom_generate), dict(logits_processor=[mara])):
        streamer = Recorder()
        out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, streamer=streamer, **route)
        assert streamer.ended and streamer.puts[0] == ids.tolist()
        assert [t for put in streamer.puts[1:] for t in put] == out[0, ids.shape[1]:].tolist()
        streamed.append(streamer.puts)
    assert streamed[0] == streamed[1]


SAMPLING = [dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, temperature=1.3),
            dict(top_k=6, repetition_penalty=1.2, min_new_tokens=4)]


@pytest.mark.parametrize("strategy, decision", [("veto", "greedy"), ("first", "greedy"), ("veto", "sample")])
@pytest.mark.parametrize("settings", SAMPLING, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_sampling_draws_the_processor_routes_tokens(settings, strategy, decision, make_mara):
    """do_sample=True: the same random draws as `logits_processor=[mara]` (warpers after MARA's decision, one
    multinomial draw per step), so the same seed gives the same tokens in both routes."""
    model = BUILDERS["llama"](seed=0)
    agent = calibrated_agent(model, seed=0)
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1)
    mara = make_mara(agent, model, strategy=strategy, decision=decision)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, **settings)
    runs = []
    for route in (dict(custom_generate=mara.custom_generate), dict(logits_processor=[mara])):
        torch.manual_seed(7)
        runs.append(model.generate(**kwargs, **route).tolist())
    assert mara.stats.rejections > 0
    assert runs[0] == runs[1]
    torch.manual_seed(8)
    other_seed = model.generate(**kwargs, custom_generate=mara.custom_generate).tolist()
    if strategy == "first" and decision == "greedy":  # one allowed token per step: the draw cannot change it
        assert other_seed == runs[0]
    else:
        assert other_seed != runs[0]


@pytest.mark.parametrize("do_sample", [False, True])
def test_return_dict_in_generate_gives_the_processor_routes_scores(do_sample, make_mara):
    model = BUILDERS["llama"](seed=0)
    agent = calibrated_agent(model, seed=0)
    ids, mask = random_prompts(batch=2, length=7, pads=(2, 0), seed=1)
    mara = make_mara(agent, model, strategy="veto")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=do_sample, top_k=6,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)
    outs = []
    for route in (dict(custom_generate=mara.custom_generate), dict(logits_processor=[mara])):
        torch.manual_seed(3)
        outs.append(model.generate(**kwargs, **route))
    got, expected = outs
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert len(got.scores) == len(expected.scores) == len(got.logits) == NEW
    for mine, theirs in zip(got.scores + got.logits, expected.scores + expected.logits):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    assert any(bool(torch.isinf(s).sum() > torch.isinf(l).sum()) for s, l in zip(got.scores, got.logits))  # MARA removed some
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, custom_generate=mara.custom_generate,
                           return_dict_in_generate=True)
    assert plain.scores is None and plain.sequences.shape == got.sequences.shape


@pytest.mark.parametrize("settings, message", [
    (dict(num_beams=2), "num_beams=2"),
    (dict(return_dict_in_generate=True, output_hidden_states=True), "output_hidden_states"),
])
def test_unsupported_settings_fail_clearly(settings, message, make_mara):
    model = BUILDERS["llama"](seed=0)
    mara = make_mara(calibrated_agent(model, seed=0), model)
    ids, _ = random_prompts(batch=1, length=5, pads=(0,), seed=2)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, max_new_tokens=3, custom_generate=mara.custom_generate, **settings)


def test_sampling_with_a_greedy_promise_fails_clearly(make_mara):
    model = BUILDERS["llama"](seed=0)
    mara = make_mara(calibrated_agent(model, seed=0), model, greedy_generate=True)
    ids, _ = random_prompts(batch=1, length=5, pads=(0,), seed=2)
    with pytest.raises(ValueError, match="greedy_generate=True"):
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=True, custom_generate=mara.custom_generate)


def test_processor_in_both_places_fails_clearly(make_mara):
    model = BUILDERS["llama"](seed=0)
    mara = make_mara(calibrated_agent(model, seed=0), model)
    ids, _ = random_prompts(batch=1, length=5, pads=(0,), seed=2)
    with pytest.raises(ValueError, match="not both"):
        model.generate(input_ids=ids, max_new_tokens=3, custom_generate=mara.custom_generate, logits_processor=[mara])
