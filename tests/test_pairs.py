"""Preference pairs (`mara-hf imitate --pairs SPEC`): read in TRL's and HH-RLHF's formats; the decisions recorded
are those a plain forward of the LLM says reproduce the chosen response and reject the rejected one where they part;
an agent fitted to them agrees with held-out pairs."""

import gzip
import json
import os

import pytest
import torch
from training_helpers import EOS, tiny_model, tiny_tokenizer

from mara_hf.data.pairs import load_pairs, to_pair
from mara_hf.decoding.candidates import candidate_set
from mara_hf.training.imitation_config import ImitationConfig
from mara_hf.training.imitation_trainer import ImitationTrainer
from mara_hf.training.pair_demonstrations import PairDemonstrations, agreement

TOP_K = 8


def write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def test_pairs_are_read_in_trl_and_hh_formats(tmp_path):
    records = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},  # TRL, plain
        {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "No."}]},  # TRL, conversational
        {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]},  # implicit prompt
        {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: No."},  # HH
        {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",  # several turns: left out
         "rejected": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: E"},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},  # nothing to prefer: left out
    ]
    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl.gz", records, gz=True))
    assert pairs == [{"prompt": "Hi?", "chosen": "Hello.", "rejected": r} for r in ("Go away.", "No.", "No.", "No.")]
    assert len(load_pairs(str(tmp_path / "pairs.jsonl.gz") + ",limit=2")) == 2
    with pytest.raises(ValueError, match="no 'chosen' and 'rejected' columns"):
        load_pairs(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi?"}]))
    with pytest.raises(ValueError, match="no usable preference pairs"):
        load_pairs(write_jsonl(tmp_path / "multi.jsonl", records[4:]))
    assert to_pair({"prompt": "x", "chosen": 3, "rejected": "y"}, "f", 0) is None


@pytest.fixture(scope="module")
def llm():
    return tiny_model(seed=0), tiny_tokenizer()


@torch.no_grad()
def ranked(model, ids: list[int]) -> list[int]:
    """The candidate set after `ids`, most probable first, from a plain forward (no cache, no tree masks)."""
    logits = model(torch.tensor([ids])).logits[:, -1]
    cands = candidate_set(logits, TOP_K, 1.0)
    return cands.ids[0, :int(cands.counts[0])].tolist()


@torch.no_grad()
def state(model, ids: list[int]) -> torch.Tensor:
    return model.base_model(torch.tensor([ids])).last_hidden_state[0, -1]


def config(**overrides):
    settings = dict(top_k=TOP_K, response_tokens=2, rollout_batch_size=8, agent_hidden_dims=[32, 16], epochs=150,
                    lr=1e-2, fit_batch_size=64, val_fraction=0.0, written_requests=False)
    return ImitationConfig(**{**settings, **overrides})


def test_decisions_follow_the_chosen_response_and_reject_the_rejected_token(llm, one_thread):
    model, tokenizer = llm
    prompt = "t40 t41 t42"
    prompt_ids = tokenizer(prompt)["input_ids"]
    first = ranked(model, prompt_ids)[0]  # a shared first token, then the responses part
    assert spelled(first)
    after = ranked(model, prompt_ids + [first])
    chosen_token, rejected_token = after[2], after[5]  # the rejected token ranks below the chosen one
    assert spelled(chosen_token) and spelled(rejected_token) and spelled(after[0])
    pair = {"prompt": prompt, "chosen": f"t{first} t{chosen_token} t{after[0]}", "rejected": f"t{first} t{rejected_token}"}
    demos = PairDemonstrations(model, tokenizer, [pair], config(response_tokens=1))
    got = demos.collect()
    # independent expectation: step 0 accepts the top candidate; step 1 rejects ranks 0 and 1, accepts rank 2, and
    # the rejected token (rank 5) gets a rejection of its own; response_tokens=1: nothing past the parting step
    assert got["labels"].tolist() == [1, 0, 0, 1, 0]
    assert got["steered"].tolist() == [False, True, True, True, True]
    expected = [state(model, prompt_ids + [first]), *(state(model, prompt_ids + [first, t]) for t in after[:3]),
                state(model, prompt_ids + [first, rejected_token])]
    assert torch.allclose(got["states"].float(), torch.stack(expected), atol=2e-2)


def spelled(token: int) -> bool:
    """Whether "t<token>" tokenizes back to the token: the special tokens t0 (pad) and t1 (eos) are matched inside
    words, so t10 ... t19 come back split."""
    return token >= 20


def good_bad_pairs(model, tokenizer, n: int, seed: int) -> list[dict]:
    """Pairs whose chosen first token is the most probable candidate that is a multiple of 3, the rejected one the
    most probable that is not: a preference an agent can read off the candidate's state."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    while len(pairs) < n:
        prompt = " ".join(f"t{int(i)}" for i in torch.randint(34, 64, (5,), generator=g))
        cands = ranked(model, tokenizer(prompt)["input_ids"])
        good = [c for c in cands if c % 3 == 0 and spelled(c)]
        bad = [c for c in cands if c % 3 != 0 and spelled(c)]
        if good and bad:
            pairs.append({"prompt": prompt, "chosen": f"t{good[0]}", "rejected": f"t{bad[0]}"})
    return pairs


def test_a_fitted_agent_agrees_with_held_out_pairs(llm, tmp_path, one_thread):
    model, tokenizer = llm
    train, held_out = good_bad_pairs(model, tokenizer, 64, seed=1), good_bad_pairs(model, tokenizer, 32, seed=2)
    trainer = ImitationTrainer(model, tokenizer, [], config(), output_dir=str(tmp_path), pairs=train)
    agent = trainer.train()
    assert agent.config.training["trainer"].endswith("(imitation, preference pairs)")
    measured = agreement(agent, model, tokenizer, held_out, config())
    # independent: P(accept) of the two parting tokens' states from plain forwards
    agreed = 0
    for pair in held_out:
        ids = tokenizer(pair["prompt"])["input_ids"]
        p = agent(torch.stack([state(model, ids + [int(pair[k][1:])]) for k in ("chosen", "rejected")])).accept_prob
        agreed += bool(p[0] > agent.config.threshold) and bool(p[1] <= agent.config.threshold)
    assert measured["judged"] == len(held_out) and measured["agreement"] == pytest.approx(agreed / len(held_out))
    assert measured["agreement"] >= 0.75, measured
    untrained = ImitationTrainer(model, tokenizer, [], config(epochs=1, lr=1e-9), output_dir=str(tmp_path / "u"),
                                 pairs=train[:1]).train()
    assert agreement(untrained, model, tokenizer, held_out, config())["agreement"] < 0.5


def test_cli_imitate_with_pairs(tmp_path, llm, capsys, one_thread):
    from mara_hf.cli.app import main
    from training_helpers import save_tiny_model

    model, tokenizer = llm
    folder = save_tiny_model(tmp_path / "llm")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", good_bad_pairs(model, tokenizer, 8, seed=3))
    out = tmp_path / "run"
    # --response-tokens and --steered-weight shape what pairs teach (docs/imitation.md): accepted with --pairs
    assert main(["imitate", "--model", folder, "--pairs", pairs, "--output", str(out), "--top-k", str(TOP_K),
                 "--agent-hidden-dims", "16", "8", "--epochs", "2", "--no-written-requests", "--response-tokens", "3",
                 "--steered-weight", "0.7"]) == 0
    assert os.path.isfile(out / "agent" / "model.safetensors")
    settings = json.load(open(out / "agent" / "config.json"))["training"]["settings"]
    assert settings["response_tokens"] == 3 and settings["steered_weight"] == 0.7
    bad = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "t40"}])
    for argv, message in ((["--pairs", bad], "no 'chosen' and 'rejected' columns"),
                          (["--pairs", pairs, "--prompts", bad], "one of the two"),
                          ([], "one of the two"),
                          (["--pairs", pairs, "--samples", "4"], "only --response-tokens and --steered-weight apply")):
        capsys.readouterr()
        assert main(["imitate", "--model", folder, "--output", str(tmp_path / "bad"), *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1, error
        assert not os.path.exists(tmp_path / "bad")
    assert EOS == 1


def test_cli_eval_reports_pair_agreement(tmp_path, llm, capsys, one_thread):
    """`mara-hf eval --pairs`: the agreement of `agreement()` (checked against plain forwards above) on the pairs
    as read from a file, with the agent's candidate set or --threshold."""
    from mara_hf.cli.app import main
    from training_helpers import save_tiny_model

    model, tokenizer = llm
    folder = save_tiny_model(tmp_path / "llm")
    trainer = ImitationTrainer(model, tokenizer, [], config(), output_dir=str(tmp_path / "run"),
                               pairs=good_bad_pairs(model, tokenizer, 64, seed=1))
    agent = trainer.train()
    held_out = good_bad_pairs(model, tokenizer, 24, seed=2)
    spec = write_jsonl(tmp_path / "held.jsonl", held_out)
    for extra, threshold in (([], None), (["--threshold", "0.9"], 0.9)):
        capsys.readouterr()
        assert main(["eval", "--model", folder, "--agent", str(tmp_path / "run" / "agent"), "--pairs", spec,
                     "--output", str(tmp_path / "eval.jsonl"), "--json", *extra]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"]
        expected = agreement(agent, model, tokenizer, held_out, config(), threshold=threshold)
        assert got == expected and got["judged"] == 24, (got, expected)
    assert main(["eval", "--model", folder, "--agent", str(tmp_path / "run" / "agent"), "--pairs", spec,
                 "--output", str(tmp_path / "eval.jsonl")]) == 0
    assert "Pair agreement: " in capsys.readouterr().out
    assert json.load(open(str(tmp_path / "eval.jsonl") + ".summary.json"))["pairs"] == expected
