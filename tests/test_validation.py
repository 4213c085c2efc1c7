"""The end of a training run (`mara_hf.training.validation`): the threshold chosen on validation prompts, and an
agent that is never worse than the LLM there, checked by decoding those prompts again with the saved agent."""

import json

import pytest
import torch
from training_helpers import EOS, PAD, id_share, make_prompts, tiny_model, tiny_tokenizer

import mara_hf
from mara_hf import MaraAgent
from mara_hf.rewards import CallableReward
from mara_hf.training.imitation_config import ImitationConfig
from mara_hf.training.imitation_trainer import ImitationTrainer
from mara_hf.training.sac_config import MaraTrainingConfig
from mara_hf.training.validation import THRESHOLDS, choose_threshold, split_validation

TOKENS = 8


def quarters(prompts, responses):
    return id_share(responses, lambda i: i % 4 == 1)


def _point(threshold, reward, nll, kl=0.1):
    return {"threshold": threshold, "reward": reward, "nll_per_token": nll, "kl_per_token": kl}


def test_the_threshold_with_most_reward_among_fluent_gains_is_chosen():
    report = {"base": {"reward": 0.2, "nll_per_token": 1.0}, "best_of_16": {"reward": 0.6, "nll_per_token": 2.0},
              "best_of_4": {"reward": 0.4, "nll_per_token": 9.0},
              "thresholds": [_point(0.1, 0.25, 1.2), _point(0.5, 0.45, 1.9), _point(0.9, 0.7, 2.5),
                             _point(0.8, 0.45, 1.8, kl=0.05)]}
    assert choose_threshold(report) == 0.8  # 0.9 gains most but writes less fluently; a tie goes to less divergence
    report["thresholds"] = [_point(0.5, 0.2, 1.0), _point(0.9, 0.7, 2.5)]
    assert choose_threshold(report) is None  # no gain, or no gain within the fluency bound


def test_validation_prompts_are_a_seeded_quarter_at_most():
    prompts = [{"prompt": str(i)} for i in range(10)]
    train, val = split_validation(prompts, 24, seed=3)
    assert len(val) == 2 and len(train) == 8 and {p["prompt"] for p in train + val} == {str(i) for i in range(10)}
    assert split_validation(prompts, 24, seed=3) == (train, val)
    assert split_validation(prompts, 0, seed=3) == (prompts, [])


@torch.no_grad()
def _decode(model, tokenizer, agent, records):
    """Mean reward of base greedy and of MARA with `agent` (serial reference decoder), and the responses."""
    base, mara, texts = 0.0, 0.0, []
    for record in records:
        ids = tokenizer([record["prompt"]], return_tensors="pt")["input_ids"]
        plain = model.generate(ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
        plain = tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
        steered = mara_hf.serial_generate(model, agent, ids, max_new_tokens=TOKENS, eos_token_id=EOS)[0]
        steered = tokenizer.decode(steered, skip_special_tokens=True)
        base += quarters(None, [plain])[0]
        mara += quarters(None, [steered])[0]
        texts.append((plain, steered))
    return base / len(records), mara / len(records), texts


def _train(tmp_path, reward):
    model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
    config = ImitationConfig(samples=6, response_tokens=TOKENS, top_k=8, agent_hidden_dims=[32, 16], epochs=100,
                             lr=1e-2, fit_batch_size=64, written_requests=False, rounds=1, validation_prompts=8,
                             validation_samples=4)
    trainer = ImitationTrainer(model, tokenizer, make_prompts(32, seed=7), config, output_dir=str(tmp_path),
                               rewards=[reward])
    trainer.train()
    return model, tokenizer, trainer


def test_a_trained_agent_is_never_worse_than_the_llm_on_its_validation_prompts(tmp_path, one_thread):
    model, tokenizer, trainer = _train(tmp_path, CallableReward(quarters, "quarters"))
    assert len(trainer.validation) == 8 and not {r["prompt"] for r in trainer.validation} & {
        line["prompt"] for line in trainer.demonstrations.choose()}
    saved = MaraAgent.from_pretrained(str(tmp_path / "agent"))
    validation = saved.config.training["validation"]
    assert validation == json.loads(json.dumps(validation))  # in the agent's config as JSON
    report = json.loads((tmp_path / "frontier.json").read_text())
    base, mara, _ = _decode(model, tokenizer, saved, trainer.validation)
    assert base == pytest.approx(report["base"]["reward"])
    assert mara == pytest.approx(report["mara"]["reward"])  # the saved agent decodes as reported
    assert mara >= base
    if report["chosen_threshold"] is None:
        assert mara == base and report["verdict"] == "no gain"
    else:
        assert saved.config.threshold == report["chosen_threshold"] in THRESHOLDS
        assert mara > base and report["mara"]["nll_per_token"] <= report["best_of_4"]["nll_per_token"]


def test_an_agent_that_cannot_gain_is_saved_to_change_nothing(tmp_path, one_thread):
    # a reward no decoding can move: every threshold fails to gain, so the agent accepts everything
    model, tokenizer, trainer = _train(tmp_path, CallableReward(lambda p, r: [0.5] * len(r), "flat"))
    saved = MaraAgent.from_pretrained(str(tmp_path / "agent"))
    assert saved.config.training["validation"]["chosen_threshold"] is None
    _, _, texts = _decode(model, tokenizer, saved, make_prompts(6, seed=99))
    assert all(plain == steered for plain, steered in texts)  # on prompts it never saw, too


def test_short_sac_runs_start_learning():
    assert MaraTrainingConfig(episodes=300, max_new_tokens=12).updates_start == 450
    assert MaraTrainingConfig(episodes=1500, max_new_tokens=64).updates_start == 4096
    assert MaraTrainingConfig(episodes=10, max_new_tokens=12).updates_start == 256  # one learner batch at least
    assert MaraTrainingConfig(episodes=300, max_new_tokens=12, learning_starts=2000).updates_start == 2000
