"""MARA training: learning evidence, the MDP pieces (KL reward, transitions), the replay buffer, checkpoints and
resume (in process and after a real SIGKILL of `mara-hf train`), and the CLI's early errors.

Everything runs on CPU with a 2-layer, hidden-32 llama (see `training_helpers`). Torch is kept to one thread:
these tensors are tiny, and on a small shared machine two intra-op threads made training up to 15x slower.
"""

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import typing

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mara_hf.cli.app as cli
from mara_hf import MaraAgent
from mara_hf.training.checkpoints import BUFFER_FILE, STATE_FILE, checkpoints
from mara_hf.training.sac_trainer import MaraTrainer
from mara_hf.training.sac_config import MaraTrainingConfig
from mara_hf.training.replay_buffer import ReplayBuffer
from mara_hf.training.transitions import (decoding_logprobs, episode_transitions, kl_rewards, sampled_order,
                                        veto_rewards)
from mara_hf.rewards import CallableReward, parse_reward_spec
from mara_hf.utils import InBackground
from training_helpers import (BANNED, EOS, avoid_banned, evaluate, id_share, make_prompts, save_tiny_model,
                              tiny_model, tiny_tokenizer)

REWARD_MODULE = "mara_toy_reward"
REWARD_SOURCE = '''"""Toy reward for the mara_hf training tests: -(number of banned tokens t2..t33 in the response)."""
import os
import time

_calls = 0


def score(prompts, responses):
    global _calls
    _calls += 1
    block_after = os.environ.get("MARA_TOY_BLOCK_AFTER")
    if block_after is not None and _calls > int(block_after):
        blocked = os.environ.get("MARA_TOY_BLOCKED")
        if blocked:
            open(blocked, "w").close()  # tells the test the run now waits here
        time.sleep(600)  # a stalled run: the crash tests kill or stop the process while it waits here
    log = os.environ.get("MARA_TOY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {len(responses)}\\n")
    return [-float(sum(2 <= int(word[1:]) < 34 for word in r.split())) for r in responses]


def wrong_count(prompts, responses):
    return [0.0] * (len(responses) + 1)


def nan_score(prompts, responses):
    return [float("nan")] * len(responses)
'''

# A few episodes of a few tokens: enough for replay, updates and checkpoints, in well under a second per run.
SMALL = dict(rollout_batch_size=2, max_new_tokens=4, top_k=5, learner_batch_size=8, learning_starts=8, updates_per_episode=1,
             agent_hidden_dims=[16, 8], kl_ctl=0.01, reward_baseline=-2.0, seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A folder holding the importable module `mara_toy_reward` (for `module:function` reward specs)."""
    folder = tmp_path_factory.mktemp("reward")
    (folder / f"{REWARD_MODULE}.py").write_text(REWARD_SOURCE)
    return folder


@pytest.fixture
def toy_reward(reward_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(reward_dir))
    return REWARD_MODULE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "train.jsonl"
    path.write_text("".join(json.dumps({**r, "harmful": False}) + "\n" for r in make_prompts(8, seed=3)))
    return str(path)


def load_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def small_trainer(model_dir, rewards, output_dir=None, **overrides):
    model, tokenizer = load_model(model_dir)
    prompts = [{**r, "harmful": False} for r in make_prompts(8, seed=3)]
    config = MaraTrainingConfig(**{**SMALL, **overrides})
    return MaraTrainer(model, tokenizer, rewards, prompts, config, output_dir=output_dir and str(output_dir),
                       data_name="toy-prompts")


# ----- 1. learning evidence -----------------------------------------------------------------------------------------
# The task: a dense reward, minus the number of banned tokens in a 12-token response. The best any agent can reach
# is the oracle: at every step the most probable candidate that is not banned (the top candidate when all are).
# Defaults with only size settings changed must close at least 60% of the gap from base greedy decoding to the
# oracle, held out. Measured share of the gap closed with these sizes, for (LLM seed, trainer seed) (one thread):
# (0, 0) 99%, (0, 1) 98%, (0, 2) 95%, (0, 3) 97%, (1, 0) 74%, (1, 1) 93%, (1, 2) 98%, (2, 0) 58%, (2, 2) 76%,
# (2, 3) 84%; with overlap_updates=False 99, 94, 94, 85, 80, 97, 98, 76, 69, 87%. With lr_actor=0 the agent stays
# the fresh one, which decodes as the LLM alone.
SIZES = dict(episodes=500, rollout_batch_size=16, max_new_tokens=12, top_k=10, learner_batch_size=256, learning_starts=1000,
             agent_hidden_dims=[64, 32], checkpoint_every=10**6, seed=0)
GAP_CLOSED = 0.6


@torch.no_grad()
def oracle_reward(model, tokenizer, records, max_new_tokens: int, top_k: int, top_p: float = 0.95) -> float:
    """Mean reward of the best achievable agent, decoded serially with full forwards."""
    from mara_hf.decoding.candidates import candidate_set

    total = 0.0
    for record in records:
        ids = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        for _ in range(max_new_tokens):
            cands = candidate_set(model(ids).logits[:, -1], top_k, top_p)
            tokens = cands.ids[0, : int(cands.counts[0])].tolist()
            token = next((t for t in tokens if t not in BANNED), tokens[0])
            total -= token in BANNED
            if token == EOS:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return total / len(records)


def run(lr_actor: float) -> tuple[float, float, float, float]:
    """(base greedy, untrained MARA, trained MARA, oracle) mean reward on 16 held-out prompts after a seeded run."""
    model, tokenizer = tiny_model(0), tiny_tokenizer()
    prompts = make_prompts(64, seed=1)
    train, held_out = prompts[:48], prompts[48:]
    reward = CallableReward(avoid_banned, name="avoid_banned")
    trainer = MaraTrainer(model, tokenizer, [reward], train, MaraTrainingConfig(lr_actor=lr_actor, **SIZES))
    base, untrained = evaluate(model, tokenizer, trainer.agent, held_out, SIZES["max_new_tokens"], SIZES["top_k"])
    trainer.train()
    base_again, trained = evaluate(model, tokenizer, trainer.agent, held_out, SIZES["max_new_tokens"], SIZES["top_k"])
    assert base_again == base  # the LLM is frozen
    best = oracle_reward(model, tokenizer, held_out, SIZES["max_new_tokens"], SIZES["top_k"])
    return base, untrained, trained, best


@pytest.mark.slow  # a learning run
@pytest.mark.parametrize("lr_actor", [3e-4, 0.0])
def test_defaults_close_most_of_the_gap_to_the_oracle(lr_actor):
    base, untrained, trained, best = run(lr_actor)
    print(f"lr_actor={lr_actor}: base {base:.3f}, untrained {untrained:.3f}, trained {trained:.3f}, oracle {best:.3f}")
    assert untrained == base  # a fresh agent decodes exactly like the LLM alone
    assert best > base + 2  # the task leaves room to learn
    if lr_actor:
        assert (trained - base) / (best - base) >= GAP_CLOSED, (base, trained, best)
    else:
        assert trained == untrained  # no actor update: the same agent, the same decoding


# A second task, of another kind: a reward scored as a share of the response (each of 12 tokens is worth 1/12), here
# the share of tokens whose id is a multiple of 3. Its stakes per decision are small: the defaults (gamma 0.5,
# alpha 0.01) are what make them count (docs/training.md, "Why these defaults"). Measured share of the gap to the
# oracle closed after 500 episodes, LLM seeds 0 / 1 / 2 (trainer seed 0): 50 / 79 / 87% (seed 2: 91% once the
# divergence cost was kept apart from the normalised reward); without normalize_rewards
# 57 / 89 / 54%. The bars sit well under them: float kernels differ by CPU, and the trajectory with them.
def multiple_of_3_share(prompts, responses):
    return id_share(responses, lambda i: i % 3 == 0)


@torch.no_grad()
def _share_oracle(model, tokenizer, records, max_new_tokens, top_k):
    from mara_hf.decoding.candidates import candidate_set

    total = 0.0
    for record in records:
        ids, emitted = tokenizer(record["prompt"], return_tensors="pt")["input_ids"], []
        for _ in range(max_new_tokens):
            cands = candidate_set(model(ids).logits[:, -1], top_k, 0.95)
            tokens = cands.ids[0, : int(cands.counts[0])].tolist()
            token = next((t for t in tokens if t % 3 == 0), tokens[0])
            if token == EOS:
                break
            emitted.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        total += multiple_of_3_share(None, [" ".join(f"t{t}" for t in emitted)])[0]
    return total / len(records)


@pytest.mark.slow  # a learning run
@pytest.mark.parametrize("overrides, closed_at_least", [({}, 0.5), ({"normalize_rewards": False}, 0.3)])
def test_a_share_reward_is_learned(overrides, closed_at_least):
    model, tokenizer = tiny_model(2), tiny_tokenizer()
    prompts = make_prompts(64, seed=1)
    reward = CallableReward(multiple_of_3_share, name="multiple_of_3_share")
    trainer = MaraTrainer(model, tokenizer, [reward], prompts[:48], MaraTrainingConfig(**{**SIZES, **overrides}))
    trainer.train()
    base, trained = evaluate(model, tokenizer, trainer.agent, prompts[48:], SIZES["max_new_tokens"], SIZES["top_k"],
                             reward=multiple_of_3_share)
    best = _share_oracle(model, tokenizer, prompts[48:], SIZES["max_new_tokens"], SIZES["top_k"])
    closed = (trained - base) / (best - base)
    print(f"{overrides}: base {base:.3f}, trained {trained:.3f}, oracle {best:.3f}, closed {closed:.2f}")
    assert best > base + 0.5  # the task leaves room to learn
    assert closed >= closed_at_least


def fifths(prompts, responses):
    """Share of the response's tokens whose id is 0 or 2 modulo 5: a dense per-token reward of this test's own."""
    return id_share(responses, lambda i: i % 5 in (0, 2))


@pytest.mark.slow  # a learning run
@pytest.mark.parametrize("llm_seed", [0, 2, 3])
def test_defaults_learn_a_dense_reward_in_300_episodes(llm_seed):
    """As a new user runs it: 300 episodes of 12 tokens, only the size flags given (learning starts, batch size),
    every other setting at its default; the gain of the agent the run hands over (its threshold chosen on the 16
    validation prompts the run holds out of its 64) is measured on other held-out prompts with greedy decoding.
    Measured gains, LLM seeds 0 / 2 / 3: +0.45 / +0.31 / +0.54; the learner's own agent at threshold 0.5: +0.44 /
    +0.00 / +0.54 (on seed 2 its P(accept) sits above 0.5 where it would reject: the chosen threshold, 0.1, is what
    shows what it learnt; with all 64 prompts in the rollouts it gained +0.66 at 0.5)."""
    model, tokenizer = tiny_model(llm_seed), tiny_tokenizer()
    prompts = make_prompts(96, seed=1)
    config = MaraTrainingConfig(episodes=300, max_new_tokens=12, learning_starts=1000, learner_batch_size=256)
    trainer = MaraTrainer(model, tokenizer, [CallableReward(fifths, name="fifths")], prompts[:64], config)
    agent = trainer.train()
    base, trained = evaluate(model, tokenizer, agent, prompts[64:], 12, config.top_k, reward=fifths)
    print(f"LLM seed {llm_seed}: base {base:.3f}, trained {trained:.3f}")
    assert trained - base >= 0.25


# ----- 2. per-decision KL reward and episode transitions --------------------------------------------------------------
def test_kl_rewards_by_hand():
    p_accept, llm_logprobs, kl_ctl = [0.6, 0.3, 0.8], [-0.5, -1.5, -2.5], 0.1
    a1, a2, a3 = p_accept
    chain = [a1, a2 * (1 - a1), a3 * (1 - a1) * (1 - a2)]  # P(the agent emits t_k) when scanning in order
    # the authors' log pi_agent: log-softmax over the candidates of the chain probabilities themselves
    log_agent = [c - math.log(sum(math.exp(x) for x in chain)) for c in chain]
    expected = [-kl_ctl * (a - b) for a, b in zip(log_agent, llm_logprobs)]  # LLM log-probs as given

    got = kl_rewards(torch.tensor(p_accept), torch.tensor(llm_logprobs), kl_ctl)
    assert got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=1e-6)


def _step(ids, actions, rewards, token, nan=False):
    states = torch.tensor([[float(i), -float(i)] for i in ids], dtype=torch.float16)
    if nan:
        states[1, 0] = float("nan")
    return {"states": states, "actions": torch.tensor(actions), "rewards": torch.tensor(rewards), "token": token}


def _steps():
    return [
        _step([10, 11], [0, 1], [-0.1, 0.0], token=0),  # a rejection, then the accept
        _step([20, 21], [0, 0], [-0.2, -0.3], token=2),  # every candidate rejected (a fallback); step 1 had no decision
        _step([30, 31, 32], [0, 0, 1], [-0.1, -0.1, 0.0], token=3, nan=True),  # NaN states: skipped
        _step([40, 41], [0, 1], [-0.4, 0.0], token=4),  # the last step
    ]


@pytest.mark.parametrize("postback", [False, True])
def test_episode_transitions(postback):
    reward, gamma = 5.0, 0.5
    states, actions, rewards, next_offsets, dones, costs = episode_transitions(_steps(), reward, gamma, postback)

    assert states[:, 0].tolist() == [10, 11, 20, 21, 40, 41]  # every decision in order, no NaN step
    assert states.dtype == torch.float16 and states.shape == (6, 2)
    assert actions.tolist() == [0, 1, 0, 0, 0, 1]
    assert next_offsets.tolist() == [1, 2, 3, 4, 5, 5]  # the next candidate / next step; the last points at itself
    assert dones.tolist() == [False] * 5 + [True]
    own = torch.tensor([-0.1, 0.0, -0.2, -0.3, -0.4, 0.0])
    if postback:  # every decision gets reward * gamma ** (tokens emitted after its step): 4, 4, 2, 2, 0, 0
        extra = reward * torch.tensor([gamma ** 4, gamma ** 4, gamma ** 2, gamma ** 2, 1, 1])
    else:
        extra = torch.tensor([0, 0, 0, 0, 0, 1.0]) * reward  # only on the last transition
    torch.testing.assert_close(costs, own)  # the per-decision costs, kept apart from the response's reward
    torch.testing.assert_close(rewards, extra)


def test_episode_transitions_without_decisions():
    nan_only = [_step([1, 2], [0, 1], [0.0, 0.0], token=0, nan=True)]
    assert episode_transitions(nan_only, 1.0, 0.9, True) is None
    assert episode_transitions([], 1.0, 0.9, False) is None


def test_veto_rewards_are_the_kl_of_each_removal():
    """A rejection of candidate k costs kl_ctl * KL(q without k || q) = kl_ctl * -log(1 - q_k); accepts are free."""
    llm_logprobs = torch.tensor([-0.4, -1.6, -2.5, float("-inf")])  # untempered, over the whole vocabulary
    log_q = decoding_logprobs(llm_logprobs, 0.8)
    q = torch.softmax(llm_logprobs[:3] / 0.8, 0)
    torch.testing.assert_close(log_q[:3].exp(), q)
    got = veto_rewards(log_q[:3], torch.tensor([False, True, False]), 0.1)
    for k in (0, 2):  # the KL of the renormalised distribution without k, computed directly
        without = q.clone()
        without[k] = 0
        without /= without.sum()
        kl = float((without[without > 0] * (without[without > 0] / q[without > 0]).log()).sum())
        assert abs(float(got[k]) + 0.1 * kl) < 1e-5
    assert float(got[1]) == 0.0


def test_sampled_order_samples_the_decoding_distribution():
    """The first candidate of a sampled order is a sample of q (the all-rejected fallback), padding always last."""
    log_q = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]])).expand(20000, 4)
    mask = torch.tensor([[True, True, True, False]]).expand(20000, 4)
    order = sampled_order(log_q, mask, torch.Generator().manual_seed(0))
    first = torch.bincount(order[:, 0], minlength=4).float() / 20000
    torch.testing.assert_close(first, torch.tensor([0.6, 0.3, 0.1, 0.0]), atol=0.015, rtol=0)
    assert (order[:, 3] == 3).all()


# ----- 3. replay buffer ---------------------------------------------------------------------------------------------
def _episode(start, n, dim=3):
    """n transitions whose state (and reward) is their global id, chained within the episode."""
    ids = torch.arange(start, start + n, dtype=torch.float32)
    states = ids[:, None].repeat(1, dim)
    next_offsets = torch.arange(1, n + 1)
    next_offsets[-1] = n - 1
    dones = torch.zeros(n, dtype=torch.bool)
    dones[-1] = True
    return states, torch.arange(n) % 2, ids, next_offsets, dones


def _check_samples(buffer, stored_ids, dones_at):
    s, _, r, s2, d = buffer.sample(4000, torch.Generator().manual_seed(0))
    ids = s[:, 0].long()
    assert set(ids.tolist()) == set(stored_ids)  # uniform over what is stored, nothing else
    torch.testing.assert_close(r, ids.float())  # a row's fields belong together
    assert d.tolist() == [int(i) in dones_at for i in ids]
    successor = torch.where(d, ids, ids + 1)  # done: the next state is masked; it points at itself
    assert torch.equal(s2[:, 0].long(), successor)
    assert (s2[:, 1:] == s2[:, :1]).all()


def test_replay_buffer_successors_growth_and_wraparound():
    capacity, sizes = 10, [4, 3, 5, 2, 6, 1]
    buffer = ReplayBuffer(capacity, 3)
    added, dones_at = 0, set()
    for n in sizes:
        buffer.add(*_episode(added, n))
        added += n
        dones_at.add(added - 1)
        assert len(buffer) == min(added, capacity) and buffer.added == added
        assert buffer.states.shape[0] <= capacity  # storage grows on demand, never past capacity
        # FIFO: the newest `capacity` transitions, every one with its successor still stored
        _check_samples(buffer, range(max(0, added - capacity), added), dones_at)
    assert added > 2 * capacity and buffer.states.shape[0] == capacity
    assert buffer.states.dtype == torch.float16
    with pytest.raises(ValueError, match="do not fit"):
        buffer.add(*_episode(added, capacity + 1))


@pytest.mark.parametrize("total", [7, 23])  # before and after wrapping around
def test_replay_buffer_state_dict_round_trip(total, tmp_path):
    buffer, added = ReplayBuffer(10, 3), 0
    while added < total:
        n = min(3, total - added)
        buffer.add(*_episode(added, n))
        added += n
    torch.save(buffer.state_dict(), tmp_path / "buffer.pt")
    restored = ReplayBuffer(10, 3)
    restored.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=True))
    assert len(restored) == len(buffer) and restored.added == buffer.added
    for _ in range(2):  # the same samples, before and after more adds
        for x, y in zip(buffer.sample(64, torch.Generator().manual_seed(1)),
                        restored.sample(64, torch.Generator().manual_seed(1))):
            assert torch.equal(x, y)
        buffer.add(*_episode(added, 4))
        restored.add(*_episode(added, 4))
        added += 4


# ----- 4. checkpoints and resume ------------------------------------------------------------------------------------
AGENT_FILES = ("config.json", "model.safetensors", "README.md")


def test_checkpoints_layout_and_provenance(tmp_path, model_dir, toy_reward):
    out = tmp_path / "out"
    rewards = [parse_reward_spec(f"{toy_reward}:score*2"), parse_reward_spec("refusal*-0.5")]
    trainer = small_trainer(model_dir, rewards, out, episodes=10, checkpoint_every=4)
    trainer.train()

    assert trainer.episodes_done == 10 and trainer.updates_done > 0
    # checkpoints at 4, 8 and the end (10); the two newest are kept
    assert checkpoints(str(out)) == [str(out / "checkpoint-8"), str(out / "checkpoint-10")]
    left = sorted(set(os.listdir(out)) - {"runs"})  # runs/: TensorBoard logs, when it is installed
    assert left == ["agent", "checkpoint-10", "checkpoint-8", "frontier.json"]  # no temporary folders left behind
    for name in ("checkpoint-8", "checkpoint-10"):
        for file in AGENT_FILES:
            assert (out / name / "agent" / file).is_file(), (name, file)
        assert (out / name / STATE_FILE).is_file() and (out / name / BUFFER_FILE).is_file()
    for file in AGENT_FILES:
        assert (out / "agent" / file).is_file()

    config = json.loads((out / "agent" / "config.json").read_text())
    assert config["base_model_name_or_path"] == model_dir
    training = config["training"]
    assert training["reward_sources"] == [{"name": f"{toy_reward}:score", "multiplier": 2.0},
                                          {"name": "refusal", "multiplier": -0.5}]
    assert training["datasets"] == ["toy-prompts"] and training["episodes"] == 10
    assert training["settings"]["checkpoint_every"] == 4
    assert json.loads((out / "checkpoint-8" / "agent" / "config.json").read_text())["training"]["episodes"] == 8
    assert "MARA agent" in (out / "agent" / "README.md").read_text()

    state = torch.load(out / "checkpoint-10" / STATE_FILE, map_location="cpu", weights_only=True)
    assert state["episodes_done"] == 10 and state["learner"]["updates"] == trainer.updates_done
    assert state["state_dim"] == 32 and state["config"] == trainer.config.to_dict()
    buffer = torch.load(out / "checkpoint-10" / BUFFER_FILE, map_location="cpu", weights_only=True)
    assert int(buffer["added"]) == trainer.buffer.added and buffer["states"].dtype == torch.float16

    # the agent handed over: the learner's, with its threshold chosen on the validation prompts (or made to accept
    # everything when no threshold gains there); the checkpoint keeps the learner's own
    saved, checkpointed = (MaraAgent.from_pretrained(str(out / folder)) for folder in ("agent", "checkpoint-10/agent"))
    chosen = saved.config.training["validation"]["chosen_threshold"]
    neutral = {"output_linear.weight", "output_linear.bias"} if chosen is None else set()
    for key, value in trainer.agent.state_dict().items():
        assert torch.equal(checkpointed.state_dict()[key], value), key
        assert torch.equal(saved.state_dict()[key], value) != (key in neutral), key
    assert saved.config.threshold == (checkpointed.config.threshold if chosen is None else chosen)


def _assert_same_learner(a: MaraTrainer, b: MaraTrainer):
    for name in ("agent", "critics", "targets"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (name, key, (sa[key] - sb[key]).abs().max().item())
    assert torch.equal(a.log_alpha, b.log_alpha)
    assert (a.episodes_done, a.updates_done, a.buffer.added) == (b.episodes_done, b.updates_done, b.buffer.added)
    n = len(a.buffer)
    for name in ("states", "actions", "rewards", "next_index", "dones"):
        assert torch.equal(getattr(a.buffer, name)[:n], getattr(b.buffer, name)[:n]), name
    assert torch.equal(a.sampler.get_state(), b.sampler.get_state())
    assert torch.equal(a.replay_sampler.get_state(), b.replay_sampler.get_state())


def test_resume_matches_an_uninterrupted_run(tmp_path, model_dir, toy_reward):
    rewards = [parse_reward_spec(f"{toy_reward}:score")]
    full = small_trainer(model_dir, rewards, tmp_path / "full", episodes=12, checkpoint_every=100)
    full.train()

    first = small_trainer(model_dir, rewards, tmp_path / "split", episodes=6, checkpoint_every=6)
    first.train()
    assert first.updates_done > 0  # the optimizers have state by then, which the checkpoint must carry
    assert checkpoints(str(tmp_path / "split")) == [str(tmp_path / "split" / "checkpoint-6")]
    second = small_trainer(model_dir, rewards, tmp_path / "split", episodes=12, checkpoint_every=6)
    torch.manual_seed(1234)  # whatever the new process' global RNG holds, the resumed run must not depend on it
    second.train(resume=True)

    assert [h["episodes"] for h in second.history] == [8, 10, 12]  # continued from episode 6
    _assert_same_learner(full, second)


def test_overlapped_updates_are_the_serial_schedule_one_round_behind(model_dir, toy_reward):
    """With overlap_updates, round r's rollouts act with the actor as it was before round r-1's updates, which run
    beside them: the same run as a serial loop that takes that copy, makes the updates, then decodes with it."""
    rewards = [parse_reward_spec(f"{toy_reward}:score")]
    sizes = dict(episodes=10, learning_starts=0)
    overlapped = small_trainer(model_dir, rewards, **sizes)
    assert overlapped.config.overlap_updates  # the default
    acted_with, rollouts = [], overlapped.rollouts

    def recorded():
        acted_with.append(overlapped.acting_agent.linear1.weight.detach().clone())
        return rollouts()

    overlapped.rollouts = recorded
    overlapped.train()

    serial = small_trainer(model_dir, rewards, overlap_updates=False, **sizes)
    cfg, owed, expected, lagging = serial.config, 0, [], 0
    while serial.episodes_done < cfg.episodes:
        acting = copy.deepcopy(serial.agent)
        for _ in range(owed):
            serial.update()
        expected.append(acting.linear1.weight.detach().clone())
        lagging += not torch.equal(acting.linear1.weight, serial.agent.linear1.weight)
        with serial.acting_with(acting):
            transitions, infos = serial.rollouts()
        for episode in transitions:
            serial.buffer.add(*episode)
        serial.episodes_done += len(infos)
        owed = cfg.updates_per_episode * len(infos)
    for _ in range(owed):  # the end of the run waits for the last round's updates
        serial.update()
    assert serial.updates_done == cfg.updates_per_episode * cfg.episodes
    assert lagging == len(expected) - 1  # every round after the first acted behind the learner
    assert len(acted_with) == len(expected) and all(map(torch.equal, acted_with, expected))
    _assert_same_learner(overlapped, serial)

    sequential = small_trainer(model_dir, rewards, overlap_updates=False, **sizes)
    sequential.train()  # the authors' schedule: as many updates, each round acting with the latest actor
    assert sequential.updates_done == overlapped.updates_done


def test_in_background_returns_raises_and_outlasts_an_interrupt():
    assert InBackground(lambda: 42).join() == 42
    with pytest.raises(ZeroDivisionError):
        InBackground(lambda: 1 / 0).join()
    done = []
    worker = InBackground(lambda: (time.sleep(0.3), done.append(True)))
    original = worker._thread.join
    calls = []

    def interrupted_once():  # a Ctrl-C arriving while the caller waits
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        original()

    worker._thread.join = interrupted_once
    with pytest.raises(KeyboardInterrupt):
        worker.join()
    assert done == [True]  # join kept waiting for the thread before passing the interrupt on


def test_resume_can_drop_the_replay_buffer(tmp_path, model_dir, toy_reward):
    """Resuming with drop_replay_buffer keeps the agent, critics and episode count of the checkpoint and starts
    with no transitions; without resume it is an error."""
    rewards = [parse_reward_spec(f"{toy_reward}:score")]
    first = small_trainer(model_dir, rewards, tmp_path / "run", episodes=6, checkpoint_every=6)
    first.train()
    assert len(first.buffer) > 0
    second = small_trainer(model_dir, rewards, tmp_path / "run", episodes=12, checkpoint_every=6)
    second.load_checkpoint(replay_buffer=False)
    assert len(second.buffer) == 0 and second.episodes_done == 6 and second.updates_done == first.updates_done
    for a, b in zip(first.agent.parameters(), second.agent.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(first.critics.parameters(), second.critics.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="only applies when resuming"):
        second.train(drop_replay_buffer=True)


def test_resume_takes_a_new_fixed_alpha_and_keeps_a_tuned_one(tmp_path, model_dir, toy_reward):
    import math

    rewards = [parse_reward_spec(f"{toy_reward}:score")]
    small_trainer(model_dir, rewards, tmp_path / "fixed", episodes=4, checkpoint_every=4).train()
    again = small_trainer(model_dir, rewards, tmp_path / "fixed", episodes=4, init_alpha=0.02)
    again.load_checkpoint()
    assert math.isclose(float(again.log_alpha.exp()), 0.02, rel_tol=1e-6)  # a fixed alpha is a setting
    tuned = small_trainer(model_dir, rewards, tmp_path / "tuned", episodes=4, checkpoint_every=4, auto_alpha=True)
    tuned.train()
    learned = float(tuned.log_alpha.exp())
    resumed = small_trainer(model_dir, rewards, tmp_path / "tuned", episodes=4, auto_alpha=True, init_alpha=0.3)
    resumed.load_checkpoint()
    assert float(resumed.log_alpha.exp()) == learned  # a tuned alpha is state: the checkpoint's value goes on


def test_resume_without_checkpoint_starts_fresh(tmp_path, model_dir, toy_reward):
    trainer = small_trainer(model_dir, [parse_reward_spec(f"{toy_reward}:score")], tmp_path / "new", episodes=2)
    trainer.train(resume=True)
    assert trainer.episodes_done == 2 and checkpoints(str(tmp_path / "new")) == [str(tmp_path / "new" / "checkpoint-2")]


def test_resume_rejects_a_checkpoint_of_another_width(tmp_path, model_dir, toy_reward, prompt_file):
    out = tmp_path / "out"
    small_trainer(model_dir, [parse_reward_spec(f"{toy_reward}:score")], out, episodes=2).train()
    wide_dir = tmp_path / "wide"
    tiny_model(0, hidden=48).save_pretrained(wide_dir)
    tiny_tokenizer().save_pretrained(wide_dir)

    model, tokenizer = load_model(str(wide_dir))
    trainer = MaraTrainer(model, tokenizer, [parse_reward_spec(f"{toy_reward}:score")], make_prompts(4),
                          MaraTrainingConfig(**{**SMALL, "episodes": 4}), output_dir=str(out))
    with pytest.raises(ValueError, match=r"hidden size 32, this model has 48"):
        trainer.train(resume=True)
    # the same through the CLI: one clear line, exit status 2
    code, err = run_cli(["train", "--model", str(wide_dir), "--prompts", prompt_file, "--reward",
                         f"{toy_reward}:score", "--output", str(out), "--resume", "--episodes", "4"])
    assert code == 2 and "hidden size 32, this model has 48" in err


def _cli_args(model_dir, prompt_file, output, episodes):
    return ["train", "--model", model_dir, "--prompts", prompt_file, "--reward", f"{REWARD_MODULE}:score",
            "--output", str(output), "--episodes", str(episodes), "--checkpoint-every", "4",
            "--rollout-batch-size", "2", "--max-new-tokens", "4", "--top-k", "5", "--learner-batch-size", "8",
            "--learning-starts", "8", "--updates-per-episode", "1", "--agent-hidden-dims", "16", "8",
            "--reward-baseline", "-2", "--no-shaping",  # one reward call per round: the stall counts calls
            "--validation-prompts", "0"]  # no reward calls after the rollouts either


def test_cli_resumes_after_sigkill(tmp_path, model_dir, reward_dir, toy_reward, prompt_file, monkeypatch):
    out, log = tmp_path / "out", tmp_path / "scored.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(reward_dir), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MARA_TOY_LOG": str(log), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "mara_hf.cli", *_cli_args(model_dir, prompt_file, out, 16)]
    # The reward stalls on its 3rd call (episodes 4-5), after checkpoint-4 was written: kill the run there.
    with open(tmp_path / "first.err", "w") as err:
        process = subprocess.Popen(command, env={**env, "MARA_TOY_BLOCK_AFTER": "2"}, stdout=subprocess.DEVNULL,
                                   stderr=err)
        deadline = time.monotonic() + 60
        try:
            while not checkpoints(str(out)):
                assert process.poll() is None, (tmp_path / "first.err").read_text()
                assert time.monotonic() < deadline, "no checkpoint within 60 s"
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert checkpoints(str(out)) == [str(out / "checkpoint-4")]
    first_run_calls = len(log.read_text().splitlines())

    # `--resume` (in this process, which saves a second interpreter start-up) continues from checkpoint-4
    monkeypatch.setenv("MARA_TOY_LOG", str(log))
    code, stdout, stderr = run_cli(command[3:] + ["--resume"], with_stdout=True)
    assert code == 0, stderr
    assert "Resumed from" in stderr and "at 4 episodes" in stderr
    assert "Trained for 16 episodes" in stdout
    assert checkpoints(str(out)) == [str(out / "checkpoint-12"), str(out / "checkpoint-16")]
    assert json.loads((out / "agent" / "config.json").read_text())["training"]["episodes"] == 16

    scored = {}
    for line in log.read_text().splitlines():
        pid, n = line.split()
        scored[pid] = scored.get(pid, 0) + int(n)
    assert first_run_calls == 2 and scored[str(process.pid)] == 4  # 2 calls of 2 responses before the stall
    assert scored[str(os.getpid())] == 12  # the resumed run generated exactly episodes 4..15: nothing lost, no repeat


def test_cli_sigterm_ends_with_a_final_checkpoint(tmp_path, model_dir, reward_dir, toy_reward, prompt_file):
    """SIGTERM (a scheduler's preemption; also what stops a job started with `&`, which ignores SIGINT) stops the run
    like Ctrl-C: the episodes done since the last interval are checkpointed, not lost."""
    out, blocked = tmp_path / "out", tmp_path / "blocked"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(reward_dir), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "MARA_TOY_BLOCK_AFTER": "3",
           "MARA_TOY_BLOCKED": str(blocked)}
    command = [sys.executable, "-m", "mara_hf.cli", *_cli_args(model_dir, prompt_file, out, 16)]
    with open(tmp_path / "run.err", "w") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        try:
            while not blocked.exists():  # 3 rounds of 2 episodes done, checkpoint-4 written, the 4th round waits
                assert process.poll() is None, (tmp_path / "run.err").read_text()
                assert time.monotonic() < deadline, "the run did not reach its 4th reward call within 60 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert "Interrupted at 6 episodes" in (tmp_path / "run.err").read_text()
    assert checkpoints(str(out)) == [str(out / "checkpoint-4"), str(out / "checkpoint-6")]
    assert json.loads((out / "agent" / "config.json").read_text())["training"]["episodes"] == 6


# ----- 5. CLI: early errors, flags, reward errors during training ---------------------------------------------------
def run_cli(argv, with_stdout=False):
    """`mara-hf ARGV` in this process: (exit status, stderr), or (status, stdout, stderr) with `with_stdout`.
    The mara_hf logger's handlers and level are restored afterwards."""
    logger = logging.getLogger("mara_hf")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            logger.handlers = []
            code = cli.main(argv)
    finally:
        logger.handlers, logger.propagate, logger.level = saved
    return (code, out.getvalue(), err.getvalue()) if with_stdout else (code, err.getvalue())


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(cli, "load_model", refuse)


def _base_argv(tmp_path, prompts, reward, output=None):
    return ["train", "--model", str(tmp_path / "no-such-model"), "--prompts", str(prompts), "--reward", reward,
            "--output", str(output or tmp_path / "out")]


def test_cli_missing_prompt_file(tmp_path, toy_reward, no_model_load):
    code, err = run_cli(_base_argv(tmp_path, tmp_path / "missing.jsonl", f"{toy_reward}:score"))
    assert code == 2 and "Prompt file not found" in err and "missing.jsonl" in err
    assert "no-such-model" not in err


@pytest.mark.parametrize("spec, message", [("not-a-reward", "Unknown reward source 'not-a-reward'"),
                                           ("no_such_module_xyz:score", "module 'no_such_module_xyz' not found"),
                                           ("mara_toy_reward:missing", "has no attribute 'missing'"),
                                           ("mara_toy_reward:score*two", "multiplier 'two' is not a number")])
def test_cli_bad_reward_spec(tmp_path, toy_reward, prompt_file, no_model_load, spec, message):
    code, err = run_cli(_base_argv(tmp_path, prompt_file, spec))
    assert code == 2 and message in err, err
    assert "no-such-model" not in err


def test_cli_existing_checkpoints_need_resume(tmp_path, toy_reward, prompt_file, no_model_load):
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / STATE_FILE).write_bytes(b"")
    code, err = run_cli(_base_argv(tmp_path, prompt_file, f"{toy_reward}:score", out))
    assert code == 2 and "already holds checkpoints" in err and "--resume" in err


def test_cli_drop_replay_buffer_needs_resume(tmp_path, toy_reward, prompt_file, no_model_load):
    argv = _base_argv(tmp_path, prompt_file, f"{toy_reward}:score", tmp_path / "out") + ["--drop-replay-buffer"]
    code, err = run_cli(argv)
    assert code == 2 and "--drop-replay-buffer applies only with --resume" in err


def test_cli_checks_the_model_last(tmp_path, toy_reward, prompt_file):
    code, err = run_cli(_base_argv(tmp_path, prompt_file, f"{toy_reward}:score"))
    assert code == 2 and "no-such-model" in err  # inputs were fine; only then the model failed to load


def _train_parser():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, commands.choices["train"]


def test_every_config_field_is_a_flag():
    from mara_hf.cli.options import Renamed

    parser, train = _train_parser()
    by_dest = {action.dest: action for action in train._actions if not isinstance(action, Renamed)}
    help_text = train.format_help()
    argv, expected = ["train", "--model", "m", "--prompts", "p", "--reward", "r", "--output", "o"], {}
    for field in dataclasses.fields(MaraTrainingConfig):
        flag = "--" + field.name.replace("_", "-")
        assert field.name in by_dest and flag in by_dest[field.name].option_strings, field.name
        assert flag in help_text, field.name
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, bool):
            value, args = not default, [flag if not default else "--no-" + flag[2:]]
        elif isinstance(default, list):
            item = typing.get_args(field.type)[0]
            value, args = [item("7"), item("5")], [flag, "7", "5"]
        elif isinstance(default, int):
            value, args = default + 1, [flag, str(default + 1)]
        elif field.name in ("critic_warmup", "learning_starts"):  # optional ints
            value, args = 7, [flag, "7"]
        elif isinstance(default, float) and field.name == "prior_accept":
            value, args = 0.9, [flag, "0.9"]
        elif isinstance(default, float):
            value = default / 2 if default else 0.25
            args = [flag, repr(value)]
        else:
            value = {"preset": "paper", "mdp": "chain", "init_agent": "my-agent"}.get(field.name, "cpu")
            args = [flag, value]
        expected[field.name] = value
        argv += args
    args = parser.parse_args(argv)
    config = MaraTrainingConfig(**{name: getattr(args, name) for name in MaraTrainingConfig.field_names()})
    assert config.to_dict() == expected
    assert config.to_dict() != MaraTrainingConfig().to_dict()


def test_preset_paper_with_flags_on_top():
    """`--preset paper` gives the authors' settings; flags given on the command line win; others keep defaults."""
    parser, _ = _train_parser()
    base = ["train", "--model", "m", "--prompts", "p", "--reward", "r", "--output", "o"]
    args = parser.parse_args(base + ["--preset", "paper", "--episodes", "40", "--mdp", "veto"])
    given = {n: getattr(args, n) for n in MaraTrainingConfig.field_names() if hasattr(args, n)}
    assert given == {"preset": "paper", "episodes": 40, "mdp": "veto"}  # flags left out are not in the namespace
    config = MaraTrainingConfig.from_preset(given.pop("preset"), **given)
    assert (config.preset, config.episodes, config.mdp, config.prior_accept, config.init_alpha, config.auto_alpha,
            config.bootstrap, config.learning_starts) == ("paper", 40, "veto", None, 0.01, True, True, 65536)
    with pytest.raises(ValueError, match="Unknown preset"):
        MaraTrainingConfig.from_preset("papers")


def test_reward_with_wrong_count_fails_during_training(model_dir, toy_reward):
    trainer = small_trainer(model_dir, [parse_reward_spec(f"{toy_reward}:wrong_count")], episodes=2)
    with pytest.raises(ValueError, match=r"Reward 'mara_toy_reward:wrong_count' returned 3 scores for 2 responses"):
        trainer.train()


def test_reward_nan_fails_during_training(tmp_path, model_dir, toy_reward, prompt_file):
    trainer = small_trainer(model_dir, [CallableReward(lambda p, r: [float("nan")] * len(r), name="nan")], episodes=2)
    with pytest.raises(ValueError, match=r"Reward 'nan' returned nan at index 0; scores must be finite"):
        trainer.train()
    code, err = run_cli(["train", "--model", model_dir, "--prompts", prompt_file, "--reward", f"{toy_reward}:nan_score",
                         "--output", str(tmp_path / "out"), "--episodes", "2", "--rollout-batch-size", "2",
                         "--max-new-tokens", "4", "--top-k", "5"])
    assert code == 2 and "returned nan at index 0" in err
    assert not checkpoints(str(tmp_path / "out"))


def test_guided_rollouts_follow_the_prefix_while_it_is_a_candidate():
    """A guided rollout emits the guide's tokens for as long as each is in the step's candidate set, then leaves
    it for good; checked against a teacher-forced top-k walk of the same model."""
    torch.set_num_threads(1)
    model, tokenizer = tiny_model(), tiny_tokenizer()
    guide = [40, 41, 42, 43, 44, 45, 46, 47]
    records = make_prompts(6)
    config = MaraTrainingConfig(max_new_tokens=10, top_k=16, top_p=1.0, guide_fraction=1.0,
                                guide_prefixes=[" ".join(f"t{i}" for i in guide)])
    trainer = MaraTrainer(model, tokenizer, [CallableReward(avoid_banned, "toy")], records, config)
    transitions, infos = trainer.collect(records)
    followed = []
    for record, info, (states, actions, rewards, _, _, _) in zip(records, infos, transitions):
        ids = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        n = 0
        with torch.no_grad():
            while n < len(guide) and guide[n] in model(ids).logits[0, -1].topk(16).indices:
                ids = torch.cat([ids, torch.tensor([[guide[n]]])], dim=1)
                n += 1
        emitted = [int(w[1:]) for w in info["response"].split()]
        assert info["guided"] and emitted[:n] == guide[:n]
        assert info["guide_completed"] == (n == len(guide))
        if n < len(guide):
            assert emitted[n] != guide[n]
        followed.append(n)
        # every guided step ends with an accept: n accepts among the first decisions
        assert int(actions.sum()) >= n
    assert max(followed) >= 2 and min(followed) < len(guide)  # the walk both follows and leaves the guide


def test_rarely_completed_guides_are_reported_once(caplog):
    """The log says which share of guided rollouts emitted their whole prefix, and warns once when fewer than half
    do (a prefix that leaves the candidate set cannot reveal the reward it was meant to)."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    config = MaraTrainingConfig(guide_fraction=0.5, guide_prefixes=["t1 t2"])
    trainer = MaraTrainer(model, tokenizer, [CallableReward(avoid_banned, "toy")], make_prompts(2), config)
    infos = [{"guided": True, "guide_completed": i < 4} for i in range(16)] + [{"guided": False}] * 4
    with caplog.at_level(logging.WARNING):
        assert trainer.guide_completion(infos) == 0.25  # 16 guided so far: too few to judge
        assert "guide prefix" not in caplog.text
        assert trainer.guide_completion(infos) == 0.25
        trainer.guide_completion(infos)
    assert caplog.text.count("Only 8 of 32 guided rollouts emitted their whole guide prefix") == 1
    assert "--top-p 1.0" in caplog.text


def test_guide_fraction_needs_prefixes():
    with pytest.raises(ValueError, match="guide_prefixes"):
        MaraTrainingConfig(guide_fraction=0.5)
    with pytest.raises(ValueError, match="guide_fraction"):
        MaraTrainingConfig(guide_fraction=1.5, guide_prefixes=["no"])


@pytest.mark.parametrize("bootstrap", [True, False])
def test_critic_targets_bootstrap_or_monte_carlo(bootstrap):
    """bootstrap=False: the critics regress on each transition's own reward; True: on r + gamma * V(next)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tokenizer = tiny_model(), tiny_tokenizer()
    config = MaraTrainingConfig(learner_batch_size=16, learning_starts=0, lr_critic=1e-2, bootstrap=bootstrap, gamma=0.5,
                                max_grad_norm=100.0, agent_hidden_dims=[32, 16], prior_accept=None,
                                normalize_rewards=False)
    trainer = MaraTrainer(model, tokenizer, [CallableReward(avoid_banned, "toy")], make_prompts(2), config)
    states = torch.randn(16, model.config.hidden_size)
    rewards = torch.linspace(-1, 1, 16)
    trainer.buffer.add(states, torch.ones(16, dtype=torch.long), rewards, torch.arange(1, 17).clamp(max=15),
                       torch.zeros(16, dtype=torch.bool))
    for _ in range(400):
        with torch.no_grad():  # the target critics value every next state at 10 (both actions), before every
            trainer.targets.weights[-1].zero_()  # update: soft updates would pull them towards the critics
            trainer.targets.biases[-1].copy_(torch.tensor([0.0, 10.0]))  # (difference, value) per head
        trainer.update()
    with torch.no_grad():
        q = trainer.critics(states.half().float())[0, :, 1]
    alpha = trainer.log_alpha.exp().item()
    # V(next) = sum_a pi(a) (10 - alpha log pi(a)) is between 10 and 10 + alpha log 2
    expected = rewards if not bootstrap else rewards + 0.5 * 10.0
    assert (q - expected).abs().max() < 0.15 + (0 if not bootstrap else 0.5 * alpha * math.log(2))


def test_normalize_rewards_divides_small_spreads_only():
    """Rewards that spread less than 1 in the buffer are divided by their standard deviation (the critics then
    regress on the scaled targets); rewards that spread more are left alone."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tokenizer = tiny_model(), tiny_tokenizer()
    for spread, scale in ((1.0, torch.linspace(-1, 1, 16).std().item()), (10.0, 1.0)):
        config = MaraTrainingConfig(learner_batch_size=16, learning_starts=0, lr_critic=1e-2, gamma=0.5, max_grad_norm=100.0,
                                    agent_hidden_dims=[32, 16], prior_accept=None)
        trainer = MaraTrainer(model, tokenizer, [CallableReward(avoid_banned, "toy")], make_prompts(2), config)
        states = torch.randn(16, model.config.hidden_size)
        rewards = torch.linspace(-spread, spread, 16)
        trainer.buffer.add(states, torch.ones(16, dtype=torch.long), rewards, torch.arange(1, 17).clamp(max=15),
                           torch.zeros(16, dtype=torch.bool))
        assert trainer.reward_scale() == pytest.approx(scale, rel=1e-5)
        for _ in range(400):
            trainer.update()
        with torch.no_grad():
            q = trainer.critics(states.half().float())[0, :, 1]
        assert (q - rewards / scale).abs().max() < 0.15 * max(spread / scale, 1)


@pytest.mark.slow  # a learning run
def test_a_fresh_agent_decodes_like_the_llm_alone():
    """Greedy decisions: the LLM's own tokens. Sampled decisions (each candidate kept with P(accept) = the prior
    0.95): the emitted tokens follow the LLM's candidate distribution within total variation 0.08 (measured 0.015)."""
    import mara_hf

    torch.set_num_threads(1)
    model, tokenizer = tiny_model(), tiny_tokenizer()
    trainer = MaraTrainer(model, tokenizer, [CallableReward(avoid_banned, "toy")], make_prompts(2),
                          MaraTrainingConfig(top_k=10))
    agent = trainer.agent
    assert agent.config.strategy == "veto"
    ids = tokenizer([r["prompt"] for r in make_prompts(4, seed=5)], return_tensors="pt")["input_ids"]
    mara = mara_hf.MaraProcessor(agent, model=model)
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False, logits_processor=[mara])
    assert torch.equal(greedy, model.generate(ids, max_new_tokens=12, do_sample=False))
    mara.remove()

    sampled = mara_hf.MaraProcessor(agent, model=model, decision="sample", seed=None)
    prompt = ids[:1]
    with torch.no_grad():
        scores = model(prompt).logits[:, -1]
    cands = mara_hf.decoding.candidates.candidate_set(scores, 10, 0.95)
    n = int(cands.counts[0])
    llm = torch.softmax(scores[0, cands.ids[0, :n]], -1)  # what plain sampling (top-k 10, top-p 0.95) draws from
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(scores.shape[-1])
    draws = 3000
    for _ in range(draws):
        out = sampled(prompt, scores.clone())
        counts[torch.multinomial(torch.softmax(out[0], -1), 1, generator=generator)] += 1
    sampled.remove()
    emitted = counts[cands.ids[0, :n]] / draws
    assert float(emitted.sum()) == 1.0  # only candidates
    tv = 0.5 * float((emitted - llm).abs().sum())
    print(f"total variation from the LLM's candidate distribution: {tv:.3f}")
    assert tv < 0.08


@pytest.mark.parametrize("overlap", [False, True])
def test_the_run_says_how_long_it_will_take(model_dir, toy_reward, caplog, overlap):
    """After the first round with learner updates, one warning gives the measured rate and the time left. Rounds of
    2 episodes; beside rollouts, the first round's updates run in the second round."""
    trainer = small_trainer(model_dir, [parse_reward_spec(f"{toy_reward}:score")], episodes=6, learning_starts=0,
                            overlap_updates=overlap)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "s per episode" in r.getMessage()]
    left = 2 if overlap else 4
    assert len(said) == 1 and f"the remaining {left} episodes will take about" in said[0], said


# ----- starting from an existing agent (--init-agent) ----------------------------------------------------------------
def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_init_agent_starts_from_its_weights_with_fresh_critics(tmp_path, model_dir, toy_reward):
    first = small_trainer(model_dir, [parse_reward_spec(f"{toy_reward}:score")], tmp_path / "first", episodes=24)
    first.train()
    start = MaraAgent.from_pretrained(str(tmp_path / "first" / "agent"))
    fresh = small_trainer(model_dir, [parse_reward_spec(f"{toy_reward}:score")], episodes=24)
    assert not _same_weights(start, fresh.agent)  # the first run moved its actor

    # critic warm-up longer than the run: the actor stays the started one, the critics learn
    second = small_trainer(model_dir, [parse_reward_spec(f"{toy_reward}:score")], tmp_path / "second", episodes=24,
                           init_agent=str(tmp_path / "first" / "agent"), critic_warmup=10**6)
    assert _same_weights(second.agent, start)
    assert not _same_weights(second.critics, first.critics)  # fresh critics, not the first run's
    critics_before = copy.deepcopy(second.critics)
    second.train()
    assert second.updates_done > 0 and _same_weights(second.agent, start)
    assert not _same_weights(second.critics, critics_before)
    training = json.loads((tmp_path / "second" / "agent" / "config.json").read_text())["training"]
    assert training["settings"]["init_agent"] == str(tmp_path / "first" / "agent")
    assert training["init_agent"]["episodes"] == 24
    assert training["init_agent"]["reward_sources"] == [{"name": f"{toy_reward}:score", "multiplier": 1.0}]
    card = (tmp_path / "second" / "agent" / "README.md").read_text()
    assert f"| started from | `{tmp_path / 'first' / 'agent'}` (24 episodes, `{toy_reward}:score` x 1) |" in card

    # the actor is regularised towards the started agent's decisions, state by state (or towards prior_accept)
    states = torch.randn(5, 32)
    assert torch.allclose(second.learner.prior_logprobs(states), start(states).logits.log_softmax(-1))
    fixed = small_trainer(model_dir, [parse_reward_spec(f"{toy_reward}:score")], init_agent_prior=False,
                          init_agent=str(tmp_path / "first" / "agent"))
    assert torch.equal(fixed.learner.prior_logprobs(states), fixed.learner.log_prior)

    # without a warm-up the actor learns from the first update
    third = small_trainer(model_dir, [parse_reward_spec(f"{toy_reward}:score")], episodes=24,
                          init_agent=str(tmp_path / "first" / "agent"), critic_warmup=0)
    third.train()
    assert not _same_weights(third.agent, start)
    assert MaraTrainingConfig(init_agent="x").warmup_updates == 1000
    assert MaraTrainingConfig().warmup_updates == 0


def test_init_agent_of_another_width_is_refused(model_dir, toy_reward):
    # the bundled SmolLM2 agent reads width 576; the tiny model has hidden size 32
    with pytest.raises(ValueError, match="reads width 576, the model has hidden_size 32"):
        small_trainer(model_dir, [parse_reward_spec(f"{toy_reward}:score")], init_agent="smollm2-135m-refusal")


def test_a_run_says_its_size_at_once_and_a_first_duration_after_one_round(caplog):
    """Before the learner starts (here: never, learning_starts beyond the run), the first round's rollouts already
    give a lower bound of the duration; the run's size is said before the first rollout."""
    import logging

    torch.set_num_threads(1)
    model, tokenizer = tiny_model(), tiny_tokenizer()
    config = MaraTrainingConfig(episodes=16, rollout_batch_size=8, max_new_tokens=4, learning_starts=10 ** 6,
                                agent_hidden_dims=[16, 8])
    trainer = MaraTrainer(model, tokenizer, [CallableReward(avoid_banned, "toy")], make_prompts(8), config)
    with caplog.at_level(logging.WARNING, logger="mara_hf"):
        trainer.train()
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("Training 16 episodes of up to 4 new tokens")
    assert "about 64 transitions at most" in said[1] and "it may never update" in said[1]  # 16 x 4 < 10 ** 6
    assert sum("for rollouts alone" in m and "at least" in m and "the LLM on cpu, float32" in m for m in said) == 1


@pytest.mark.parametrize("prior_accept, threshold", [(0.95, 0.5), (0.5, 0.3), (0.8, 0.7)])
def test_the_logged_reject_bar_is_where_the_soft_optimal_policy_starts_to_reject(prior_accept, threshold):
    """`SoftActorCritic.evidence`: a decision is over the bar exactly when the soft-optimal policy for its critic
    values, pi proportional to prior x exp(Q / alpha), puts P(accept) at or under the agent's threshold, computed
    here from that definition for random values."""
    from mara_hf import MaraConfig
    from mara_hf.training.sac import SoftActorCritic
    from mara_hf.training.sac_config import MaraTrainingConfig

    g = torch.Generator().manual_seed(0)
    actor = MaraAgent(MaraConfig(state_dim=8, hidden_dims=[8, 8], threshold=threshold))
    learner = SoftActorCritic(actor, 8, MaraTrainingConfig(prior_accept=prior_accept, agent_hidden_dims=[8, 8]), "cpu")
    q = torch.randn(4096, 2, generator=g) * 3
    alpha = torch.tensor(0.7)
    optimal = (learner.log_prior + q / alpha).softmax(-1)
    pi = torch.rand(4096, 2, generator=g).softmax(-1)  # the actor's own policy: only its reject share is read
    got = learner.evidence(pi, q, learner.log_prior, alpha)
    assert got["over_bar"].item() == pytest.approx((optimal[:, 1] <= threshold).float().mean().item(), abs=1e-3)
    assert got["rejects_at_threshold"].item() == pytest.approx((pi[:, 1] <= threshold).float().mean().item())
    assert got["advantage_reject"].item() == pytest.approx((q[:, 0] - q[:, 1]).mean().item(), abs=1e-6)
    assert 0 < got["over_bar"].item() < 1
