"""Imitation training (`mara-hf imitate`): the recorded decisions are the ones that reproduce each demonstration
(checked against plain forwards of the whole sequences), and an agent fitted to them makes the LLM write the
demonstrations."""

import os

import pytest
import torch
from training_helpers import EOS, tiny_model, tiny_tokenizer

from mara_hf import MaraProcessor
from mara_hf.decoding.candidates import candidate_set
from mara_hf.errors import OptionError
from mara_hf.training.imitation_config import ImitationConfig
from mara_hf.training.imitation_trainer import ImitationTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

REFUSAL = "t40 t41 t42"  # the demonstrated refusal (the end-of-turn token t1 follows)
TOP_K = 64  # the whole vocabulary: every demonstrated token is a candidate


def records():
    g = torch.Generator().manual_seed(5)
    prompt = lambda: " ".join(f"t{int(i)}" for i in torch.randint(34, 64, (5,), generator=g))  # noqa: E731
    return [{"prompt": prompt(), "harmful": True} for _ in range(4)] + [{"prompt": prompt(), "harmful": False}
                                                                         for _ in range(4)]


def config(**kwargs):
    settings = dict(refusals=[REFUSAL], max_harmful=None, max_benign=None, benign_tokens=4, written_requests=False,
                    rollout_batch_size=3, top_k=TOP_K, agent_hidden_dims=[64, 32], epochs=2, val_fraction=0.0)
    return ImitationConfig(**{**settings, **kwargs})


def expected_decisions(model, tokenizer, prompt: str, response: list[int]):
    """(states, labels) of following `response` after `prompt`, from plain forwards of every prefix + candidate:
    the candidates ranked above the response's token rejected, that token accepted."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    states, labels = [], []
    for t, token in enumerate(response):
        prefix = torch.tensor([ids + response[:t]])
        cands = candidate_set(model(prefix).logits[:, -1].float(), TOP_K, 1.0)
        k = cands.ids[0].tolist().index(token)
        for j in range(k + 1):
            seq = torch.cat([prefix, cands.ids[:, j:j + 1]], dim=1)
            states.append(model.base_model(seq).last_hidden_state[0, -1])
            labels.append(int(j == k))
    return torch.stack(states), torch.tensor(labels)


def greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    return model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


@torch.no_grad()
def test_decisions_are_those_that_reproduce_each_demonstration(tmp_path):
    model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
    trainer = ImitationTrainer(model, tokenizer, records(), config(), output_dir=str(tmp_path))
    got = trainer.collect()
    refusal = tokenizer(REFUSAL, add_special_tokens=False)["input_ids"] + [EOS]
    want = [expected_decisions(model, tokenizer, r["prompt"], refusal) for r in trainer.harmful]
    want += [expected_decisions(model, tokenizer, r["prompt"], greedy(model, tokenizer, r["prompt"], 4))
             for r in trainer.benign]
    states, labels = torch.cat([w[0] for w in want]), torch.cat([w[1] for w in want])
    assert got["labels"].tolist() == labels.tolist()
    assert labels.sum() < len(labels)  # the random LLM ranks other tokens above the refusal's: rejections recorded
    torch.testing.assert_close(got["states"].float(), states, atol=2e-2, rtol=1e-2)  # stored in float16
    n_harm = sum(len(w[1]) for w in want[:len(trainer.harmful)])
    assert got["harmful"].tolist() == [True] * n_harm + [False] * (len(labels) - n_harm)
    assert got["refusals_followed"] == [len(trainer.harmful), len(trainer.harmful)]


@torch.no_grad()
def test_benign_openings_add_the_first_decisions_of_more_prompts(tmp_path):
    model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
    first = ImitationTrainer(model, tokenizer, records(), config(max_benign=2), output_dir=str(tmp_path))
    before = first.collect()
    stamp = os.path.getmtime(tmp_path / "decisions" / "harmful-000000.pt")
    trainer = ImitationTrainer(model, tokenizer, records(), config(max_benign=2, benign_openings=2, opening_tokens=2),
                               output_dir=str(tmp_path))
    assert trainer.benign == first.benign and trainer.harmful == first.harmful  # the other draws are unchanged
    assert {r["prompt"] for r in trainer.openings}.isdisjoint(r["prompt"] for r in trainer.benign)
    got = trainer.collect()
    assert os.path.getmtime(tmp_path / "decisions" / "harmful-000000.pt") == stamp  # only the openings collected
    want = [expected_decisions(model, tokenizer, r["prompt"], greedy(model, tokenizer, r["prompt"], 2))
            for r in trainer.openings]
    n = len(before["labels"])
    assert got["labels"][:n].tolist() == before["labels"].tolist()
    assert got["labels"][n:].tolist() == torch.cat([w[1] for w in want]).tolist()
    torch.testing.assert_close(got["states"][n:].float(), torch.cat([w[0] for w in want]), atol=2e-2, rtol=1e-2)
    assert not got["harmful"][n:].any()


def test_fitted_agent_makes_the_llm_write_the_demonstrations(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
    prompts = records()
    trainer = ImitationTrainer(model, tokenizer, prompts, config(epochs=150, lr=3e-3, fit_batch_size=64),
                               output_dir=str(tmp_path))
    agent = trainer.train()
    assert agent.config.training["trainer"].endswith("(imitation)")
    assert agent.config.training["demonstrations"]["harmful"] == 4
    mara = MaraProcessor(agent, model=model)
    refusal = tokenizer(REFUSAL, add_special_tokens=False)["input_ids"] + [EOS]
    for record in prompts:
        ids = torch.tensor([tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, max_new_tokens=4, do_sample=False, logits_processor=[mara])[0, ids.shape[1]:]
        if record["harmful"]:
            assert out.tolist()[:len(refusal)] == refusal
        else:  # left as the LLM answers
            assert out.tolist() == greedy(model, tokenizer, record["prompt"], 4)
    assert os.path.isfile(tmp_path / "agent" / "model.safetensors")


def test_collection_resumes_and_refuses_other_settings(tmp_path):
    model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
    first = ImitationTrainer(model, tokenizer, records(), config(), output_dir=str(tmp_path)).collect()
    shards = sorted(os.listdir(tmp_path / "decisions"))
    os.remove(tmp_path / "decisions" / "benign-000000.pt")  # as if stopped before the benign shard was written
    again = ImitationTrainer(model, tokenizer, records(), config(), output_dir=str(tmp_path)).collect()
    assert sorted(os.listdir(tmp_path / "decisions")) == shards
    assert again["labels"].tolist() == first["labels"].tolist()
    torch.testing.assert_close(again["states"], first["states"])
    with pytest.raises(ValueError, match="other prompts or settings"):
        ImitationTrainer(model, tokenizer, records(), config(benign_tokens=3), output_dir=str(tmp_path)).collect()


def test_bad_settings_fail_clearly():
    with pytest.raises(OptionError, match="harmful_weight"):
        ImitationConfig(harmful_weight=1.0)
    with pytest.raises(OptionError, match="refusals"):
        ImitationConfig(refusals=[" "])
    with pytest.raises(ValueError, match="harmful and benign"):
        ImitationTrainer(tiny_model(), tiny_tokenizer(), [r for r in records() if r["harmful"]], config())


def test_cli_fits_an_agent_from_prompt_files(tmp_path):
    import json

    from mara_hf.cli.app import main
    from mara_hf.agent.modeling import MaraAgent

    model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
    model.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records())
    with open(tmp_path / "added.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in more_records(2, seed=9))
    assert main(["imitate", "--model", str(tmp_path / "llm"), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--output", str(tmp_path / "run"), "--refusals", REFUSAL, "--top-k", "64", "--benign-tokens", "3",
                 "--no-written-requests", "--agent-hidden-dims", "16", "8", "--epochs", "1",
                 "--add-prompts", str(tmp_path / "added.jsonl"), "--added-repeats", "2"]) == 0
    agent = MaraAgent.from_pretrained(tmp_path / "run" / "agent")
    settings = agent.config.training["settings"]
    assert settings["refusals"] == [REFUSAL] and settings["benign_tokens"] == 3 and agent.config.hidden_dims == [16, 8]
    assert agent.config.training["datasets"] == [str(tmp_path / "prompts.jsonl"), str(tmp_path / "added.jsonl")]
    demonstrations = agent.config.training["demonstrations"]
    assert (demonstrations["added_harmful"], demonstrations["added_benign"], settings["added_repeats"]) == (2, 2, 2)


def more_records(n_benign: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    prompt = lambda: " ".join(f"t{int(i)}" for i in torch.randint(34, 64, (5,), generator=g))  # noqa: E731
    return [{"prompt": prompt(), "harmful": i < 2} for i in range(2 + n_benign)]


@torch.no_grad()
def test_added_prompts_are_collected_on_their_own_and_repeated(tmp_path):
    model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
    before = ImitationTrainer(model, tokenizer, records(), config(), output_dir=str(tmp_path)).collect()
    stamp = os.path.getmtime(tmp_path / "decisions" / "harmful-000000.pt")
    added = more_records(2, seed=9)
    trainer = ImitationTrainer(model, tokenizer, records(), config(added_repeats=2), output_dir=str(tmp_path),
                               added=added)
    got = trainer.collect()
    assert os.path.getmtime(tmp_path / "decisions" / "harmful-000000.pt") == stamp  # only the added ones collected
    refusal = tokenizer(REFUSAL, add_special_tokens=False)["input_ids"] + [EOS]
    want = [expected_decisions(model, tokenizer, r["prompt"], refusal) for r in added[:2]]
    want += [expected_decisions(model, tokenizer, r["prompt"], greedy(model, tokenizer, r["prompt"], 4))
             for r in added[2:]]
    n, n_harm = len(before["labels"]), sum(len(w[1]) for w in want[:2])
    harm_labels, benign_labels = torch.cat([w[1] for w in want[:2]]), torch.cat([w[1] for w in want[2:]])
    assert got["labels"][:n].tolist() == before["labels"].tolist()
    # each kind's decisions twice (added_repeats), harmful ones first
    assert got["labels"][n:].tolist() == (harm_labels.tolist() * 2 + benign_labels.tolist() * 2)
    assert got["harmful"][n:].tolist() == [True] * 2 * n_harm + [False] * 2 * len(benign_labels)
    torch.testing.assert_close(got["states"][n:n + n_harm].float(), torch.cat([w[0] for w in want[:2]]),
                               atol=2e-2, rtol=1e-2)


def test_screening_demonstrates_the_benign_prompts_an_agent_refuses(tmp_path, monkeypatch):
    import mara_hf.decoding.generate
    import mara_hf.rewards.refusal
    from tiny_models import calibrated_agent

    model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
    screen = calibrated_agent(model, seed=1)
    screen.save_pretrained(tmp_path / "screen")
    # a stand-in rule for "opens with a refusal" the tiny vocabulary can meet: the first token's id is even
    rule = lambda text: int(text.split()[0][1:]) % 2 == 0 if text.split() else False  # noqa: E731
    monkeypatch.setattr(mara_hf.rewards.refusal, "is_refusal", rule)
    prompts = more_records(10, seed=3)
    settings = config(max_benign=2, screen_agent=str(tmp_path / "screen"), screen_benign=6, screen_tokens=3,
                      added_repeats=3)
    trainer = ImitationTrainer(model, tokenizer, prompts, settings, output_dir=str(tmp_path / "run"))
    assert len(trainer.to_screen) == 6
    assert {r["prompt"] for r in trainer.to_screen}.isdisjoint(r["prompt"] for r in trainer.benign)
    got = trainer.collect()
    mara = MaraProcessor(screen, model=model)  # expected: each prompt alone through generate with the processor
    expected = []
    for r in trainer.to_screen:
        ids = torch.tensor([tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, max_new_tokens=3, do_sample=False, logits_processor=[mara])[0, ids.shape[1]:]
        expected += [r] if rule(tokenizer.decode(out, skip_special_tokens=True)) else []
    assert 0 < len(expected) < 6 and trainer.screened == expected
    want = torch.cat([expected_decisions(model, tokenizer, r["prompt"], greedy(model, tokenizer, r["prompt"], 4))[1]
                      for r in expected])
    assert got["labels"][-3 * len(want):].tolist() == want.tolist() * 3  # demonstrated in full, 3 times

    # resumed: the screen is read back, not decoded again; another screen agent is refused
    monkeypatch.setattr(mara_hf.decoding.generate, "generate", lambda *a, **k: pytest.fail("screened again"))
    again = ImitationTrainer(model, tokenizer, prompts, settings, output_dir=str(tmp_path / "run"))
    again.collect()
    assert again.screened == expected
    calibrated_agent(model, seed=2).save_pretrained(tmp_path / "screen")
    with pytest.raises(ValueError, match="screened with another agent"):
        ImitationTrainer(model, tokenizer, prompts, settings, output_dir=str(tmp_path / "run")).collect()
    with pytest.raises(OptionError, match="screen_agent"):
        ImitationConfig(screen_benign=5)
