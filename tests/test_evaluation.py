"""mara-hf eval: base vs MARA on the same prompts, the summary's arithmetic, resuming."""

import json

import pytest

import mara_hf
from mara_hf.evaluation.evaluate import evaluate, summarise
from mara_hf.rewards import CallableReward, RewardSource
from training_helpers import avoid_banned, make_prompts, tiny_model, tiny_tokenizer
from tiny_models import calibrated_agent, model_states


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
    agent = calibrated_agent(model, seed=0, states=model_states(model, seed=0, vocab=64))
    return model, tokenizer, agent


def test_eval_that_raises_leaves_the_model_and_tokenizer_as_they_were(setup, tmp_path):
    model, tokenizer, agent = setup
    hooks = lambda: len(model._forward_pre_hooks) + len(model._forward_hooks) + len(model.base_model._forward_hooks)  # noqa: E731
    before, side = hooks(), tokenizer.padding_side

    def broken(prompts, responses):
        raise RuntimeError("reward server down")

    with pytest.raises(RuntimeError, match="reward server down"):
        evaluate(model, tokenizer, agent, make_prompts(2), [CallableReward(broken, name="broken")],
                 str(tmp_path / "eval.jsonl"), max_new_tokens=2, top_k=10, sampled=True)
    assert hooks() == before and tokenizer.padding_side == side


def test_eval_matches_independent_generation(setup, tmp_path):
    model, tokenizer, agent = setup
    records = make_prompts(6)
    for i, r in enumerate(records):
        r["harmful"] = i % 2 == 0
    reward = CallableReward(avoid_banned, name="avoid")
    out = str(tmp_path / "eval.jsonl")
    summary = evaluate(model, tokenizer, agent, records, [reward], out, batch_size=4, max_new_tokens=8, top_k=10)
    lines = [json.loads(x) for x in open(out)]
    assert [line["index"] for line in lines] == list(range(6))
    # independent expectation: base = greedy generate, MARA = the processor in generate, one prompt at a time
    mara = mara_hf.MaraProcessor(agent, model=model, top_k=10)
    for line, record in zip(lines, records):
        enc = tokenizer([record["prompt"]], return_tensors="pt")
        n = enc["input_ids"].shape[1]
        base = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0)
        aligned = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0, logits_processor=[mara])
        assert line["base"]["response"] == tokenizer.decode(base[0, n:], skip_special_tokens=True)
        assert line["mara"]["response"] == tokenizer.decode(aligned[0, n:], skip_special_tokens=True)
        assert line["mara"]["scores"]["avoid"] == avoid_banned(None, [line["mara"]["response"]])[0]
    mara.remove()
    assert any(line["base"]["response"] != line["mara"]["response"] for line in lines)
    assert summary == {**summarise(lines, [reward]), "mara_stats": summary["mara_stats"],
                       "tokens_per_s": summary["tokens_per_s"], "top_candidate_share": summary["top_candidate_share"]}
    assert summary["mara_stats"]["decisions"] > 0 and set(summary["tokens_per_s"]) == {"base", "mara"}
    assert json.load(open(out + ".summary.json")) == summary
    assert summary["refusal_rate"]["harmful"]["prompts"] == 3 and summary["refusal_rate"]["benign"]["prompts"] == 3


def test_sampled_methods_are_seeded_generate_calls(setup, tmp_path):
    """--sampled: base and MARA sampled as the paper's base decoding, each batch seeded by its first index."""
    import torch

    from mara_hf.evaluation.evaluate import SAMPLING, format_summary

    model, tokenizer, agent = setup
    records = make_prompts(5)
    for i, r in enumerate(records):
        r["harmful"] = i < 2
    out = str(tmp_path / "eval.jsonl")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    summary = evaluate(model, tokenizer, agent, records, [], out, batch_size=3, max_new_tokens=8, top_k=10,
                       sampled=True, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    lines = [json.loads(x) for x in open(out)]
    tokenizer.padding_side = "left"
    for start in (0, 3):
        batch = [r["prompt"] for r in records[start:start + 3]]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        n = enc["input_ids"].shape[1]
        for name, processors in (("base_sampled", []), ("mara_sampled", [mara_hf.MaraProcessor(agent, model=model,
                                                                                               top_k=10)])):
            torch.manual_seed(7 + start)
            ids = model.generate(**enc, max_new_tokens=8, pad_token_id=0, logits_processor=processors, **SAMPLING)
            expected = tokenizer.batch_decode(ids[:, n:], skip_special_tokens=True)
            assert [line[name]["response"] for line in lines[start:start + 3]] == expected
    assert any(line["base_sampled"]["response"] != line["base"]["response"] for line in lines)
    assert set(summary["nll_per_token"]) == {"base", "mara", "base_sampled", "mara_sampled"}
    assert set(summary["refusal_rate"]["harmful"]) == {"base", "mara", "base_sampled", "mara_sampled", "prompts"}
    benign = lines[2:]  # fluency on the benign prompts alone, from their lines
    assert summary["benign"]["prompts"] == 3
    for name in ("base", "mara", "base_sampled", "mara_sampled"):
        nll = sum(line[name]["nll"] for line in benign) / sum(line[name]["tokens"] for line in benign)
        assert summary["benign"]["nll_per_token"][name] == pytest.approx(nll)
    assert "| NLL per token, benign prompts " in format_summary(summary)
    header = format_summary(summary).splitlines()[1]
    assert [c.strip() for c in header.split("|")[1:-1]] == ["metric", "base", "MARA", "change", "base sampled",
                                                             "MARA sampled", "change"]


def test_resume_skips_done_prompts_and_refuses_other_prompts(setup, tmp_path):
    model, tokenizer, agent = setup
    records = make_prompts(5)
    calls = []

    def counting(prompts, responses):
        calls.append(len(prompts))
        return [0.0] * len(prompts)

    reward = CallableReward(counting, name="count")
    out = str(tmp_path / "eval.jsonl")
    evaluate(model, tokenizer, agent, records[:3], [reward], out, batch_size=2, max_new_tokens=4, top_k=10)
    calls.clear()
    summary = evaluate(model, tokenizer, agent, records, [reward], out, batch_size=2, max_new_tokens=4, top_k=10)
    assert sum(calls) == 2 * 2  # only the 2 new prompts, once for base and once for MARA
    assert summary["prompts"] == 5
    with pytest.raises(ValueError, match="other prompts"):
        evaluate(model, tokenizer, agent, make_prompts(5, seed=9), [reward], out, max_new_tokens=4)


class Fixed(RewardSource):
    def __init__(self, name, multiplier, table):
        super().__init__(name, multiplier)
        self.table = table

    def score(self, prompts, responses, records):
        return [self.table[r] for r in responses]


def test_summary_arithmetic_and_cost_direction():
    lines = [{"harmful": h, "base": {"response": b, "refusal": rb, "scores": {"r": sb, "c": cb}},
              "mara": {"response": m, "refusal": rm, "scores": {"r": sm, "c": cm}}}
             for h, b, m, rb, rm, sb, sm, cb, cm in [
                 (True, "x", "y", False, True, 0.0, 1.0, 2.0, 1.0),   # MARA better on both
                 (True, "x", "y", False, False, 1.0, 1.0, 1.0, 3.0),  # tie on r, worse on cost
                 (False, "x", "y", False, True, 2.0, 0.0, 0.0, 0.0),  # worse on r, tie on cost
                 (None, "x", "y", True, True, 0.0, 5.0, 0.0, 0.0)]]   # better on r, tie on cost
    summary = summarise(lines, [RewardSource("r", 2.0), RewardSource("c", -1.0)])
    assert summary["win_tie_loss"] == {"r": [2, 1, 1], "c": [1, 2, 1]}
    assert summary["net_preference"] == {"r": 0.25, "c": 0.0}
    assert summary["mean"]["r"] == {"base": 0.75, "mara": 1.75}
    assert summary["refusal_rate"]["all"] == {"base": 0.25, "mara": 0.75, "prompts": 4}
    assert summary["refusal_rate"]["harmful"] == {"base": 0.0, "mara": 0.5, "prompts": 2}
    assert summary["refusal_rate"]["benign"] == {"base": 0.0, "mara": 1.0, "prompts": 1}
    # lines without a held-refusal judgement (written before it existed) are judged from their text
    assert summary["held_refusal_rate"]["all"] == {"base": 0.0, "mara": 0.0, "prompts": 4}
    held = [{**line, "mara": {**line["mara"], "response": "I can't help with that.", "refusal": True}} for line in lines]
    held[1]["mara"]["refusal_held"] = False  # a stored judgement wins
    rates = summarise(held, [])["held_refusal_rate"]
    assert rates["harmful"] == {"base": 0.0, "mara": 0.5, "prompts": 2} and rates["all"]["mara"] == 0.75


def test_cli_eval_checks_inputs_before_loading(tmp_path, capsys):
    from mara_hf.cli.app import main

    rc = main(["eval", "--model", str(tmp_path / "nope"), "--agent", str(tmp_path / "nope"), "--prompts",
               str(tmp_path / "missing.json"), "--output", str(tmp_path / "o.jsonl")])
    assert rc == 2 and "missing.json" in capsys.readouterr().err


def test_fluency_and_repetition_measured_independently(setup, tmp_path):
    """Per-response NLL under the base model (one unpadded full forward per response) and repeated 4-grams."""
    import torch

    model, tokenizer, agent = setup
    records = make_prompts(5)
    out = str(tmp_path / "eval.jsonl")
    summary = evaluate(model, tokenizer, agent, records, [], out, batch_size=3, max_new_tokens=10, top_k=10)
    lines = [json.loads(x) for x in open(out)]
    totals = {"base": [0.0, 0, 0, 0], "mara": [0.0, 0, 0, 0]}
    mara = mara_hf.MaraProcessor(agent, model=model, top_k=10)
    for line, record in zip(lines, records):  # one prompt at a time, unpadded, full forwards
        prompt = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        for name, processors in (("base", []), ("mara", [mara])):
            ids = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=1,
                                 logits_processor=processors)
            targets = ids[0, prompt.shape[1]:]
            if 1 in targets.tolist():
                targets = targets[: targets.tolist().index(1) + 1]
            ids = ids[:, : prompt.shape[1] + len(targets)]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, :-1], -1)
            nll = -float(logprobs[prompt.shape[1] - 1:].gather(1, targets[:, None]).sum())
            assert abs(line[name]["nll"] - nll) < 1e-3 and line[name]["tokens"] == len(targets)
            grams = [tuple(targets[i:i + 4].tolist()) for i in range(len(targets) - 3)]
            repeated = sum(g in grams[:i] for i, g in enumerate(grams))
            assert (line[name]["repeated_4grams"], line[name]["4grams"]) == (repeated, len(grams))
            for k, v in enumerate((nll, len(targets), repeated, len(grams))):
                totals[name][k] += v
    mara.remove()
    for name, (nll, n, repeated, grams) in totals.items():
        assert abs(summary["nll_per_token"][name] - nll / n) < 1e-4
        assert summary["repeated_4gram_share"][name] == repeated / grams
    assert summary["repeated_4gram_share"]["base"] > 0  # the tiny random model loops: the measure sees it
    assert 0 < summary["top_candidate_share"] < 1


SUMMARY = {"prompts": 4, "mean": {"refusal": {"base": -0.5, "mara": 0.25}},
           "win_tie_loss": {"refusal": [2, 1, 1]}, "net_preference": {"refusal": 0.25},
           "refusal_rate": {"all": {"base": 0.25, "mara": 0.75, "prompts": 4},
                            "harmful": {"base": 0.0, "mara": 0.5, "prompts": 2}},
           "held_refusal_rate": {"harmful": {"base": 0.0, "mara": 0.25, "prompts": 2}},
           "mara_stats": {"decisions": 200, "accept_rate": 0.41, "mean_candidates": 16.8, "fallbacks": 9},
           "tokens_per_s": {"base": 15.8, "mara": 11.2}}


def test_summary_table():
    from mara_hf.evaluation.evaluate import format_summary

    text = format_summary(SUMMARY)
    lines = text.splitlines()
    assert lines[0] == "4 prompts, base (greedy) vs MARA:"
    assert [c.strip() for c in lines[1].split("|")[1:-1]] == ["metric", "base", "MARA", "change"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in lines[1:] if
            line.startswith("| ")}
    assert rows["opens with a refusal, all prompts (n=4)"] == ["25.0%", "75.0%", "+50.0 pts"]
    assert rows["opens with a refusal, harmful prompts (n=2)"] == ["0.0%", "50.0%", "+50.0 pts"]
    assert rows["refusal holds, harmful prompts (n=2)"] == ["0.0%", "25.0%", "+25.0 pts"]
    assert "benign prompts" not in text  # no benign prompts: no row
    assert rows["mean score, refusal"] == ["-0.5", "0.25", "+0.75"]
    assert rows["tokens/s"] == ["15.8", "11.2", "-4.6"]
    assert len({len(line) for line in lines[1:7]}) == 1  # aligned columns
    assert "refusal, MARA vs base per prompt: 2 better, 1 same, 1 worse (net preference +0.25)" in text
    assert "accept rate 0.41, 16.8 candidates per decision, 4.5% fell back" in text
    # a metric added to the summary later shows by adding one row
    summary = {**SUMMARY, "nll_per_token": {"base": 1.5, "mara": 2.0}}
    from mara_hf.evaluation.evaluate import TABLE_ROWS

    extended = format_summary(summary, TABLE_ROWS + [("NLL per token", ("nll_per_token",), "number")])
    assert any(line.startswith("| NLL per token") and line.split("|")[4].strip() == "+0.5"
               for line in extended.splitlines())


def test_cli_eval_prints_the_table_or_json(monkeypatch, tmp_path, capsys):
    import mara_hf.evaluation.evaluate
    from mara_hf.cli import app as cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi", "harmful": true}\n')
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(mara_hf.MaraAgent, "from_pretrained", classmethod(lambda cls, *a, **k: None))
    monkeypatch.setattr(mara_hf.evaluation.evaluate, "evaluate", lambda *a, **k: SUMMARY)
    argv = ["eval", "--model", "m", "--agent", "a", "--prompts", str(prompts), "--output", str(tmp_path / "e.jsonl")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| refusal holds, harmful prompts (n=2)" in out and "e.jsonl.summary.json" in out and "{" not in out
    assert cli.main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == SUMMARY
