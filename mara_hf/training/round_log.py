"""What a SAC run logs per round: the record of the round's episodes and the learner's updates (`round_record`),
and where it goes besides the log (`tensorboard_writer`, OUTPUT/runs when TensorBoard is installed)."""

import os

import torch

# the learner's numbers per update (`SoftActorCritic.update`), averaged over a round
LOSS_KEYS = ("critic_loss", "actor_loss", "alpha", "entropy", "p_accept", "rejects_at_threshold", "advantage_reject",
             "reject_bar", "over_bar")


def round_record(infos: list[dict], losses: list[dict], episodes: int, updates: int, guide_completion) -> dict:
    """The round's record: reward, accept rate, KL per token, per-source scores, guidance (with
    `guide_completion(infos)`, the share of guided rollouts that emitted their prefix) and the learner's means."""
    decisions = sum(i["decisions"] for i in infos)
    record = {"episodes": episodes, "reward": sum(i["reward"] for i in infos) / len(infos),
              "accept_rate": sum(i["accepts"] for i in infos) / max(decisions, 1), "updates": updates}
    own = [i["reward"] for i in infos if not i.get("guided")]
    if len(own) < len(infos):  # guided rollouts: also the reward of the actor's own rollouts
        record["guided"] = 1 - len(own) / len(infos)
        if own:
            record["reward_unguided"] = sum(own) / len(own)
        record["guide_completed"] = guide_completion(infos)
    for key in infos[0]:
        if key.startswith("score/"):
            record[key] = sum(i[key] for i in infos) / len(infos)
    # nats per token between the agent's decoding distribution and the LLM's, from episode 0 (mdp docs)
    record["kl_per_token"] = sum(i["kl"] for i in infos) / max(sum(i["tokens"] for i in infos), 1)
    if losses:  # the learner's numbers stay tensors until here: one sync per round, not per update
        means = torch.stack([torch.stack([x[k] for k in LOSS_KEYS]) for x in losses]).float().mean(0).tolist()
        record.update(zip(LOSS_KEYS, means))
    return record


def tensorboard_writer(output_dir: str | None):
    """A TensorBoard writer into OUTPUT/runs, or None (no output folder, or TensorBoard not installed)."""
    if not output_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(os.path.join(output_dir, "runs"))
