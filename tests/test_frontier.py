"""The frontier report (`mara_hf.evaluation.frontier`), against independent computations: best-of-N re-drawn and
picked by hand from the same seeded draws, NLL and divergence from full forwards of each unpadded row, MARA's
responses from the serial reference decoder."""

import pytest
import torch

import mara_hf
from mara_hf.evaluation.frontier import format_frontier, frontier, verdict
from mara_hf.rewards import CallableReward
from tests.training_helpers import EOS, PAD, id_share, make_prompts, tiny_model, tiny_tokenizer
from tests.tiny_models import calibrated_agent

TOKENS, TOP_K = 8, 10


def thirds(prompts, responses):
    return id_share(responses, lambda i: i % 3 == 0)


def _setup(rate: float):
    model, tokenizer = tiny_model(2), tiny_tokenizer()
    model.generation_config.eos_token_id = EOS
    tokenizer.padding_side = "left"
    agent = calibrated_agent(model, seed=3, rate=rate, top_k=TOP_K, top_p=1.0, strategy="veto")
    records = make_prompts(5, seed=4, length=4) + make_prompts(1, seed=5, length=7)  # rows of different widths
    return model, tokenizer, agent, records


@torch.no_grad()
def _row_measures(model, prompt_ids: list[int], response: list[int]) -> tuple[float, float]:
    """(NLL, divergence) of one response, from one unpadded full forward."""
    ids = torch.tensor([prompt_ids + response])
    probs = torch.softmax(model(ids).logits[0, len(prompt_ids) - 1:-1].float(), -1)
    nll = div = 0.0
    for t, token in enumerate(response):
        q = probs[t]
        nll -= float(q[token].log())
        div -= float((1 - q[q > q[token]].sum()).log())
    return nll, div


def _response(row: list[int]) -> list[int]:
    return row[:row.index(EOS) + 1] if EOS in row else row


@pytest.mark.parametrize("batch_size", [6, 4])
def test_frontier_against_independent_computations(batch_size):
    model, tokenizer, agent, records = _setup(rate=0.5)
    reward = CallableReward(thirds, name="thirds")
    report = frontier(model, tokenizer, agent, records, [reward], max_new_tokens=TOKENS, samples=6, best_of=(2, 6),
                      batch_size=batch_size, seed=11, top_k=TOP_K, top_p=1.0)
    # MARA and base, row by row: the serial reference decoder (one prompt at a time, full forwards)
    expected = {"base": [0.0, 0.0, 0], "mara": [0.0, 0.0, 0]}
    divergence = 0.0
    for record in records:
        prompt = tokenizer(record["prompt"])["input_ids"]
        ids = torch.tensor([prompt])
        for way in ("base", "mara"):
            if way == "base":
                out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=PAD)
            else:
                out = mara_hf.serial_generate(model, agent, ids, max_new_tokens=TOKENS, eos_token_id=EOS,
                                              top_k=TOP_K, top_p=1.0)
            response = _response(out[0] if way == "mara" else out[0, len(prompt):].tolist())
            nll, div = _row_measures(model, prompt, response)
            expected[way][0] += thirds(None, [tokenizer.decode(response, skip_special_tokens=True)])[0]
            expected[way][1] += nll
            expected[way][2] += len(response)
            if way == "mara":
                divergence += div
            else:
                assert div == pytest.approx(0.0, abs=1e-5)  # greedy emits the top token: nothing removed
    for way, (total, nll, count) in expected.items():
        assert report[way]["reward"] == pytest.approx(total / len(records))
        assert report[way]["nll_per_token"] == pytest.approx(nll / count, rel=1e-4)
    assert report["mara"]["kl_per_token"] == pytest.approx(divergence / expected["mara"][2], rel=1e-4, abs=1e-6)
    assert report["mara"]["kl_per_token"] > 0  # this agent rejects, so the test measures something

    # best-of-N: the same seeded draws, batch by batch, picked by hand
    picked = {2: [], 6: []}
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        enc = mara_hf.data.encoding.encode_prompts(tokenizer, [r["prompt"] for r in batch])
        with torch.random.fork_rng():
            torch.manual_seed(11 + start)
            out = model.generate(**enc, max_new_tokens=TOKENS, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=6, pad_token_id=PAD)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        scores = thirds(None, texts)
        for i in range(len(batch)):
            for n in picked:
                picked[n].append(max(scores[i * 6:i * 6 + n]))
    for n, best in picked.items():
        assert report[f"best_of_{n}"]["reward"] == pytest.approx(sum(best) / len(best))
    assert report["best_of_6"]["reward"] >= report["best_of_2"]["reward"] >= report["samples"]["reward"] - 1e-9
    assert report["gain"] == pytest.approx(report["mara"]["reward"] - report["base"]["reward"])
    table = format_frontier(report)
    assert "best-of-6" in table and report["verdict"] in table.lower()


def test_an_agent_that_accepts_everything_changes_nothing():
    model, tokenizer, agent, records = _setup(rate=1.0)
    report = frontier(model, tokenizer, agent, records, [CallableReward(thirds, name="thirds")],
                      max_new_tokens=TOKENS, samples=0, top_k=TOP_K, top_p=1.0)
    assert report["mara"]["reward"] == report["base"]["reward"]
    assert report["mara"]["nll_per_token"] == pytest.approx(report["base"]["nll_per_token"])
    assert report["mara"]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert report["mara"]["accept_rate"] == 1.0
    assert report["verdict"] == "no gain" and "best_of_16" not in report


def _report(mara_reward, mara_nll, best_reward=1.0, best_nll=2.0):
    return {"base": {"reward": 0.0, "nll_per_token": 1.0}, "mara": {"reward": mara_reward, "nll_per_token": mara_nll},
            "best_of_4": {"reward": best_reward / 2, "nll_per_token": 5.0},
            "best_of_16": {"reward": best_reward, "nll_per_token": best_nll}}


@pytest.mark.parametrize("mara_reward, mara_nll, expected, share", [
    (0.5, 2.5, "reward hack", 0.5),  # judged against the largest N's picks (best-of-4's are less fluent still)
    (0.8, 1.5, "gain", 0.8),
    (0.0, 1.0, "no gain", 0.0),
    (-0.2, 3.0, "no gain", -0.2),
])
def test_verdict(mara_reward, mara_nll, expected, share):
    out = verdict(_report(mara_reward, mara_nll))
    assert out["verdict"] == expected
    assert out["share_of_best_of"] == pytest.approx(share)


@pytest.mark.parametrize("mara_nll, noted", [(2.24, True), (0.9, False)])
def test_a_gain_far_less_fluent_than_greedy_is_flagged_even_within_best_of_ns_bound(mara_nll, noted):
    """SmolLM2's own draws at temperature 1 are broken text (NLL/token about 3 against 0.7 greedy), so an agent as
    fluent as best-of-16's picks can be broken too: the verdict stays "gain" by its rule, and the sentence says
    how far from the greedy answers' fluency the text is when that is over 0.3 nats/token."""
    from mara_hf.evaluation.frontier import describe, verdict

    report = {"prompts": 40, "max_new_tokens": 48, "base": {"reward": 0.26, "nll_per_token": 0.68},
              "mara": {"reward": 0.52, "nll_per_token": mara_nll}, "best_of_16": {"reward": 0.78, "nll_per_token": 2.97}}
    report.update(verdict(report))
    assert report["verdict"] == "gain"
    sentence = describe(report)
    assert ("nats/token less likely than the LLM's greedy answers" in sentence) == noted
    if noted:
        assert f"{mara_nll - 0.68:.2f} nats/token" in sentence
