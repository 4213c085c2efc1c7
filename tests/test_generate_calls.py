"""One generate call is one call: what a processor learns in one call (its lookahead, mode, draws, statistics) never
reaches another; calls it cannot serve are refused with a clear error, never decoded wrongly.

The independent expectation is a fresh processor (or the serial reference) on the same input: whatever happened
before, a processor must decode as if new.
"""

import threading

import pytest
import torch
from tiny_models import calibrated_agent, random_prompts, tiny_llama
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from mara_hf import serial_generate

TOP_K, TOP_P = 10, 0.9
NEW = 10

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def agent(llama):
    return calibrated_agent(llama, seed=0, rate=0.4)


def cache_of(out):
    return out["cache"] if "cache" in out else out.past_key_values


def test_a_continuation_call_is_a_new_call(llama, agent, make_mara):
    """`generate(out.sequences, past_key_values=...)` continuing MARA's returned cache: its own statistics and the
    tokens of the serial reference from the whole sequence, as a fresh processor gives them."""
    ids = random_prompts(batch=1, length=6, pads=(0,), seed=3)[0]
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
    first = llama.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, logits_processor=[mara],
                           return_dict_in_generate=True)
    seq = first.sequences
    more = llama.generate(input_ids=seq, past_key_values=cache_of(first), max_new_tokens=NEW, do_sample=False,
                          logits_processor=[mara])
    assert mara.stats.steps == NEW  # this call's steps only
    expected = serial_generate(llama, agent, seq, max_new_tokens=NEW, top_k=TOP_K, top_p=TOP_P)
    assert more[0, seq.shape[1]:].tolist() == expected[0]
    fresh = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
    again = llama.generate(input_ids=seq, max_new_tokens=NEW, do_sample=False, logits_processor=[fresh])
    assert again.tolist() == more.tolist() and fresh.stats.decisions == mara.stats.decisions


class Boom(StoppingCriteria):
    """Raises at the `at`-th step of a call."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("stopped by the user")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(do_sample=True, top_k=0, temperature=1.2)])
def test_a_call_after_one_that_raised_decodes_as_a_fresh_processor(llama, agent, make_mara, mode):
    ids, mask = random_prompts(batch=2, length=6, pads=(2, 0), seed=4)
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
    with pytest.raises(KeyboardInterrupt):
        llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, logits_processor=[mara],
                       stopping_criteria=StoppingCriteriaList([Boom(4)]), **mode)
    torch.manual_seed(5)
    out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, logits_processor=[mara], **mode)
    fresh = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
    torch.manual_seed(5)
    expected = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, logits_processor=[fresh], **mode)
    assert out.tolist() == expected.tolist()
    assert mara.stats.steps == fresh.stats.steps and mara.stats.decisions == fresh.stats.decisions


def test_a_processor_built_for_another_model_is_refused(llama, agent, make_mara):
    other = tiny_llama(seed=1)
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P)
    ids = random_prompts(batch=1, length=5, pads=(0,), seed=3)[0]
    with pytest.raises(ValueError, match="built for another model"):
        other.generate(input_ids=ids, max_new_tokens=3, do_sample=False, logits_processor=[mara])
    # and then serves its own model as a fresh one would
    out = llama.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, logits_processor=[mara])
    expected = serial_generate(llama, agent, ids, max_new_tokens=NEW, top_k=TOP_K, top_p=TOP_P)
    assert out[0, ids.shape[1]:].tolist() == expected[0]


class Rendezvous(LogitsProcessor):
    """Before MARA: each step of a call waits for the other thread's step, so two calls run interleaved."""

    def __init__(self, barrier):
        self.barrier = barrier

    def __call__(self, input_ids, scores):
        self.barrier.wait(timeout=30)
        return scores


def test_calls_in_two_threads_each_with_its_processor_decode_as_alone(llama, agent, make_mara):
    """Two threads, one model, one processor each, steps interleaved: each call gives its tokens when alone (the
    hooks keep each thread's call apart)."""
    prompts = [random_prompts(batch=2, length=6, pads=(1, 0), seed=s) for s in (6, 7)]
    alone = []
    for ids, mask in prompts:
        mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
        alone.append(llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                    logits_processor=[mara]).tolist())
    barrier = threading.Barrier(2)
    results, errors = [None, None], []

    def run(i):
        try:
            ids, mask = prompts[i]
            mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
            results[i] = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                        logits_processor=LogitsProcessorList([Rendezvous(barrier), mara])).tolist()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == alone


def test_one_processor_in_two_threads_at_once_is_refused(llama, agent, make_mara):
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
    ids = random_prompts(batch=1, length=5, pads=(0,), seed=3)[0]
    inside, done = threading.Event(), threading.Event()

    class Hold(LogitsProcessor):
        """Holds the first thread's call open while the second thread tries the same processor."""

        def __call__(self, input_ids, scores):
            inside.set()
            done.wait(timeout=30)
            return scores

    first = {}

    def hold():
        first["out"] = llama.generate(input_ids=ids, max_new_tokens=3, do_sample=False,
                                      logits_processor=LogitsProcessorList([mara, Hold()]))

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(timeout=30)
    try:
        with pytest.raises(RuntimeError, match="one MaraProcessor per thread"):
            llama.generate(input_ids=ids, max_new_tokens=3, do_sample=False, logits_processor=[mara])
    finally:
        done.set()
        t.join()
    assert first["out"].shape[1] == ids.shape[1] + 3  # the first call went on undisturbed


class Counting(LogitsProcessor):
    """A processor of the user's own after MARA: it may keep state, so it must run once per step."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        return scores


def test_a_users_processor_after_mara_runs_once_per_step_and_every_candidate_is_judged(llama, agent, make_mara,
                                                                                        caplog):
    import logging

    ids, mask = random_prompts(batch=2, length=6, pads=(2, 0), seed=4)
    mara = make_mara(agent, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto")
    after = Counting()
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="mara_hf"):
        out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=0,
                             logits_processor=LogitsProcessorList([mara, after]))
    steps = out.shape[1] - ids.shape[1]
    assert after.calls == steps
    assert mara.stats.scored >= mara.stats.candidates  # every candidate judged
    assert any("judges every candidate" in r.getMessage() for r in caplog.records)
