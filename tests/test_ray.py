"""Training on Ray: rollout workers on a local cluster feed the learner; it learns like local training."""

import os
import sys

import pytest
import torch

ray = pytest.importorskip("ray")  # the [ray] extra; CI installs it
pytestmark = pytest.mark.slow  # starts a local Ray cluster

from mara_hf.training.sac_trainer import MaraTrainer, checkpoints  # noqa: E402
from mara_hf.training.sac_config import MaraTrainingConfig  # noqa: E402
from mara_hf.training.ray_backend import RayMaraTrainer  # noqa: E402
from mara_hf.rewards import parse_reward_spec  # noqa: E402
from test_training import SIZES as LEARN  # noqa: E402

from training_helpers import make_prompts, tiny_model, tiny_tokenizer  # noqa: E402

REWARD = "training_helpers:avoid_banned"  # importable by the workers: tests/ is on their PYTHONPATH


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    here = os.path.dirname(__file__)
    os.environ["PYTHONPATH"] = os.pathsep.join([here] + [p for p in sys.path if p])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "OMP_NUM_THREADS": "1",
                                       "HF_HUB_OFFLINE": "1"}})
    yield str(folder)
    ray.shutdown()


def test_two_workers_train_and_checkpoint(cluster, tmp_path):
    config = MaraTrainingConfig(**{**LEARN, "episodes": 48, "rollout_batch_size": 8, "checkpoint_every": 32,
                                   "learning_starts": 64})
    trainer = RayMaraTrainer(cluster, [REWARD], make_prompts(48, seed=1), config, output_dir=str(tmp_path),
                             num_workers=2)
    before = {k: v.clone() for k, v in trainer.agent.state_dict().items()}
    trainer.train()
    assert trainer.episodes_done == 48 and trainer.updates_done > 0
    assert [h["episodes"] for h in trainer.history] == [16, 32, 48]  # two batches of 8 per round
    assert any(not torch.equal(before[k], v) for k, v in trainer.agent.state_dict().items())
    assert [os.path.basename(c) for c in checkpoints(str(tmp_path))] == ["checkpoint-32", "checkpoint-48"]
    assert os.path.isfile(tmp_path / "agent" / "model.safetensors")


def test_a_dead_worker_is_replaced_and_only_its_episodes_are_lost(cluster):
    config = MaraTrainingConfig(**{**LEARN, "episodes": 32, "rollout_batch_size": 8})
    trainer = RayMaraTrainer(cluster, [REWARD], make_prompts(32, seed=1), config, num_workers=2)
    transitions, infos = trainer.rollouts()
    assert len(infos) == 16
    ray.kill(trainer.workers[0])
    transitions, infos = trainer.rollouts()
    assert len(infos) == 8  # worker 0's batch was lost
    transitions, infos = trainer.rollouts()
    assert len(infos) == 16  # and it was restarted
    trainer.close()


def test_cli_backend_ray(cluster, tmp_path):
    import json

    from mara_hf.cli.app import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(make_prompts(16, seed=2)))
    out = tmp_path / "run"
    rc = main(["train", "--model", cluster, "--prompts", str(prompts), "--reward", REWARD, "--output", str(out),
               "--backend", "ray", "--num-workers", "2", "--episodes", "16", "--rollout-batch-size", "8",
               "--max-new-tokens", "6", "--top-k", "10", "--learning-starts", "32", "--batch-size", "16",
               "--agent-hidden-dims", "16", "8"])
    assert rc == 0
    assert json.loads((out / "agent" / "config.json").read_text())["training"]["episodes"] == 16


def test_reward_workers_score_the_same(cluster):
    """Rewards scored in separate reward actors give the very same run as rewards in the rollout workers."""
    config = MaraTrainingConfig(**{**LEARN, "episodes": 32, "rollout_batch_size": 8, "learning_starts": 64,
                                   "learner_batch_size": 32})
    agents = []
    for reward_workers in (0, 1):
        trainer = RayMaraTrainer(cluster, [REWARD], make_prompts(32, seed=1), config, num_workers=1,
                                 reward_workers=reward_workers)
        trainer.train()
        assert len(trainer.reward_actors) == reward_workers and trainer.updates_done > 0
        agents.append(trainer.agent.state_dict())
    assert all(torch.equal(agents[0][k], agents[1][k]) for k in agents[0])


# ----- reward-chosen draws on Ray workers (mara-hf imitate --reward ... --backend ray) -------------------------------
def test_draws_on_workers_are_the_local_draws(cluster, tmp_path):
    """Demonstrations drawn and scored by two Ray workers equal those drawn here (same seeds), unsteered and with an
    agent steering (expert iteration), also after a worker dies mid-run."""
    from tiny_models import calibrated_agent

    from mara_hf.rewards import parse_reward_spec
    from mara_hf.training.imitation_config import ImitationConfig
    from mara_hf.training.ray_backend import RayDrawer
    from mara_hf.training.reward_chosen import RewardChosen

    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): the same float kernels
    model, tokenizer = tiny_model(0), tiny_tokenizer()
    config = ImitationConfig(samples=3, response_tokens=6, top_k=10, rollout_batch_size=8, written_requests=False)
    records, rewards = make_prompts(10, seed=4), [parse_reward_spec(REWARD)]
    steer = calibrated_agent(model, rate=0.6, hidden_dims=(16, 8))
    drawer = RayDrawer(cluster, [REWARD], config, num_workers=2)
    try:
        chosen = {}
        for agent, name in ((None, "plain"), (steer, "steered")):
            local = RewardChosen(model, tokenizer, records, rewards, config, str(tmp_path / f"local-{name}"),
                                 agent=agent).choose()
            remote = RewardChosen(model, tokenizer, records, rewards, config, str(tmp_path / f"ray-{name}"),
                                  agent=agent, drawer=drawer).choose()
            assert remote == local and len(remote) == 10
            chosen[name] = local
        assert any(line["chosen"] == "sample" for line in chosen["plain"])  # the draws mattered
        ray.kill(drawer.workers[0])
        again = RewardChosen(model, tokenizer, records, rewards, config, str(tmp_path / "ray-again"),
                             drawer=drawer).choose()
        assert again == RewardChosen(model, tokenizer, records, rewards, config, str(tmp_path / "local-plain")).choose()
    finally:
        drawer.close()


def test_cli_imitate_backend_ray(cluster, tmp_path):
    import json

    from mara_hf.cli.app import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(make_prompts(12, seed=2)))
    out = tmp_path / "run"
    rc = main(["imitate", "--model", cluster, "--prompts", str(prompts), "--reward", REWARD, "--samples", "3",
               "--output", str(out), "--backend", "ray", "--num-workers", "2", "--response-tokens", "5", "--top-k",
               "10", "--rollout-batch-size", "8", "--agent-hidden-dims", "16", "8", "--epochs", "2", "--min-steps",
               "10", "--no-written-requests"])
    assert rc == 0
    training = json.loads((out / "agent" / "config.json").read_text())["training"]
    # a quarter of the 12 prompts is held out to choose the threshold on: 9 are demonstrated
    assert training["demonstrations"]["prompts"] == 9 and len(training["rounds"]) == 2
    assert training["validation"]["prompts"] == 3
    assert (out / "demonstrations-round2.jsonl").is_file()
