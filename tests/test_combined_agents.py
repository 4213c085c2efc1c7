"""Several veto agents in one processor, `MaraProcessor([safety, style], model=model)`: the LLM decodes among the
candidates every agent accepts, checked against a slow serial reference that asks both agents candidate by
candidate, in every route (processor, custom_generate, the fast path)."""

import pytest
import torch

import mara_hf
from mara_hf import MaraProcessor
from mara_hf.decoding.candidates import candidate_set
from tiny_models import BUILDERS, calibrated_agent, random_prompts

NEW, TOP_K, TOP_P = 10, 8, 0.9

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@torch.no_grad()
def serial_both(model, agents, ids, mask, thresholds=(0.5, 0.5)):
    """Greedy veto with several agents, one prompt at a time, no cache: at each step the most probable candidate
    that every agent accepts (states from a plain forward of prefix + candidate), else the most probable one."""
    rows = []
    for row, keep in zip(ids, mask.bool()):
        seq = row[keep][None]
        out = []
        for _ in range(NEW):
            cands = candidate_set(model(seq).logits[:, -1].float(), TOP_K, TOP_P)
            chosen = cands.ids[0, 0]
            for j in range(int(cands.counts[0])):
                state = model.base_model(torch.cat([seq, cands.ids[:, j:j + 1]], dim=1)).last_hidden_state[:, -1]
                if all(float(a(state).accept_prob) > t for a, t in zip(agents, thresholds)):
                    chosen = cands.ids[0, j]
                    break
            out.append(int(chosen))
            seq = torch.cat([seq, chosen.view(1, 1)], dim=1)
        rows.append(out)
    return rows


def new_tokens(out, ids):
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_route_keeps_what_both_agents_accept(arch, make_mara):
    model = BUILDERS[arch](seed=0)
    safety, style = calibrated_agent(model, seed=1, rate=0.6), calibrated_agent(model, seed=2, rate=0.6)
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1)
    expected = serial_both(model, [safety, style], ids, mask)
    both = make_mara([safety, style], model, strategy="veto", top_k=TOP_K, top_p=TOP_P)
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    assert new_tokens(model.generate(**settings, do_sample=False, logits_processor=[both]), ids) == expected
    assert new_tokens(model.generate(**settings, custom_generate=both.custom_generate), ids) == expected
    assert new_tokens(mara_hf.generate(model, both, ids, mask, max_new_tokens=NEW), ids) == expected
    promised = make_mara([safety, style], model, strategy="veto", top_k=TOP_K, top_p=TOP_P, greedy_generate=True)
    assert new_tokens(model.generate(**settings, do_sample=False, logits_processor=[promised]), ids) == expected
    # each agent matters: neither alone gives these tokens
    for alone in (safety, style):
        mara = make_mara(alone, model, strategy="veto", top_k=TOP_K, top_p=TOP_P)
        assert new_tokens(model.generate(**settings, custom_generate=mara.custom_generate), ids) != expected


def test_each_agent_keeps_its_own_threshold(make_mara):
    model = BUILDERS["llama"](seed=0)
    safety, style = calibrated_agent(model, seed=1, rate=0.6), calibrated_agent(model, seed=2, rate=0.6)
    style.config.threshold = 0.8
    ids, mask = random_prompts(batch=2, length=7, pads=(2, 0), seed=3)
    both = make_mara([safety, style], model, strategy="veto", top_k=TOP_K, top_p=TOP_P)
    got = new_tokens(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                    custom_generate=both.custom_generate), ids)
    assert got == serial_both(model, [safety, style], ids, mask, thresholds=(0.5, 0.8))


def test_sampling_routes_agree_with_combined_agents(make_mara):
    model = BUILDERS["llama"](seed=0)
    agents = [calibrated_agent(model, seed=1, rate=0.6), calibrated_agent(model, seed=2, rate=0.6)]
    ids, mask = random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=1)
    both = make_mara(agents, model, strategy="veto", top_k=TOP_K, top_p=TOP_P)
    runs = []
    for route in (dict(custom_generate=both.custom_generate), dict(logits_processor=[both])):
        torch.manual_seed(11)
        runs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True,
                                   top_k=5, **route).tolist())
    assert runs[0] == runs[1]


def test_combinations_that_are_not_defined_fail_clearly(make_mara):
    model = BUILDERS["llama"](seed=0)
    a, b = calibrated_agent(model, seed=1), calibrated_agent(model, seed=2)
    with pytest.raises(ValueError, match="strategy 'veto'"):
        MaraProcessor([a, b], model=model, strategy="first")
    b.config.top_k = 5
    with pytest.raises(ValueError, match="different top_k"):
        MaraProcessor([a, b], model=model, strategy="veto")
    make_mara([a, b], model, strategy="veto", top_k=TOP_K)  # an explicit candidate set settles it
    first, second = make_mara(a, model), make_mara(b, model)
    ids, mask = random_prompts(batch=1, length=5, pads=(0,), seed=2)
    with pytest.raises(ValueError, match=r"MaraProcessor\(\[agent_a, agent_b\], model=model\)"):
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, logits_processor=[first, second])
