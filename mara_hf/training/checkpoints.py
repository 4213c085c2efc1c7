"""Training checkpoints and clean stops.

A checkpoint is a folder `output_dir/checkpoint-<episodes>` holding the agent (`agent/`), the trainer's state
(`STATE_FILE`: learner, episode count, random generators, settings) and the replay buffer (`BUFFER_FILE`). It is
built under a temporary name and renamed once complete, so a crash never leaves a half-written one; the two newest
are kept, and `output_dir/agent` is the newest agent. SIGTERM (a scheduler's preemption, `kill`) ends a run like
Ctrl-C, with a final checkpoint.
"""

import os
import shutil
import signal
import tempfile
import threading

import torch
from transformers.utils import logging

from ..agent.modeling import MaraAgent
from ..utils import save_atomically

logger = logging.get_logger(__name__)

STATE_FILE = "trainer_state.pt"
BUFFER_FILE = "replay_buffer.pt"


def checkpoints(output_dir: str | None) -> list[str]:
    """Complete checkpoints in `output_dir`, oldest first (a checkpoint folder only appears once complete)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            if os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
                found.append((int(name[len("checkpoint-"):]), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def write_checkpoint(output_dir: str, episodes: int, agent: MaraAgent, state: dict, buffer_state: dict) -> str:
    """Write `output_dir/checkpoint-<episodes>` (agent folder, trainer `state`, replay buffer) and
    `output_dir/agent`, each atomically; keeps the two newest checkpoints. Returns the checkpoint's path."""
    os.makedirs(output_dir, exist_ok=True)
    name = os.path.join(output_dir, f"checkpoint-{episodes}")
    tmp = tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=output_dir)
    try:
        agent.save_pretrained(os.path.join(tmp, "agent"))
        torch.save(state, os.path.join(tmp, STATE_FILE))
        torch.save(buffer_state, os.path.join(tmp, BUFFER_FILE))
        if os.path.isdir(name):
            shutil.rmtree(name)
        os.replace(tmp, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save_atomically(agent, os.path.join(output_dir, "agent"))
    for old in checkpoints(output_dir)[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info(f"Checkpoint at {episodes} episodes: {name}")
    return name


def read_trainer_state(path: str, state_dim: int) -> dict:
    """The trainer state of checkpoint `path`, checked against the model's hidden size and this version."""
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    if state["state_dim"] != state_dim:
        raise ValueError(f"The checkpoint {path!r} is for a model of hidden size {state['state_dim']}, "
                         f"this model has {state_dim}.")
    if "learner" not in state:
        raise ValueError(f"The checkpoint {path!r} was written by an older mara-hf (separate critics); it cannot "
                         "be resumed with this version: start a new run in another --output.")
    return state


def read_agent(path: str) -> MaraAgent:
    """The agent of checkpoint `path`."""
    return MaraAgent.from_pretrained(os.path.join(path, "agent"))


def read_buffer(path: str) -> dict:
    """The replay buffer's state of checkpoint `path` (for `ReplayBuffer.load_state_dict`)."""
    return torch.load(os.path.join(path, BUFFER_FILE), map_location="cpu", weights_only=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_on_sigterm():
    """Make SIGTERM (a scheduler's preemption, `kill`; also the only stop signal a job started with `&` receives,
    since such jobs ignore SIGINT) end training like Ctrl-C, with a final checkpoint. Returns the handler to
    restore, or None where handlers cannot be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def restore_sigterm(previous):
    """Put back the SIGTERM handler `stop_on_sigterm` replaced (nothing when it set none)."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
