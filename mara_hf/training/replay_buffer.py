"""Replay buffer of MARA transitions; states are kept (float16), so learner updates need no LLM forward."""

import torch


class ReplayBuffer:
    """A FIFO ring of transitions (state, action, reward, next state, done, cost). A transition's return is
    reward + cost: the response's reward and the divergence cost of the decision, kept apart so that the reward
    alone can be scaled (`sample(scale=...)`).

    A transition's next state is always the state of a transition stored after it (the next candidate, or the
    first candidate of the next step), so it is kept as that transition's index rather than a second copy. FIFO
    overwriting never breaks this: a transition is overwritten before its successor. Storage grows on demand
    up to `capacity`.
    """

    def __init__(self, capacity: int, state_dim: int, dtype=torch.float16):
        self.capacity, self.state_dim, self.dtype = capacity, state_dim, dtype
        self.states = torch.empty(0, state_dim, dtype=dtype)
        self.actions = torch.empty(0, dtype=torch.long)
        self.rewards = torch.empty(0, dtype=torch.float32)
        self.next_index = torch.empty(0, dtype=torch.long)  # absolute insertion index of the next state
        self.dones = torch.empty(0, dtype=torch.bool)
        self.costs = torch.empty(0, dtype=torch.float32)
        self.added = 0  # transitions ever added

    def __len__(self) -> int:
        return min(self.added, self.capacity)

    def add(self, states, actions, rewards, next_offsets, dones, costs=None):
        """Append n transitions; `next_offsets[i]` is the next state's position within this same call; `costs`
        default to 0."""
        n = states.shape[0]
        if n > self.capacity:
            raise ValueError(f"{n} transitions do not fit a replay buffer of {self.capacity}.")
        absolute = torch.arange(self.added, self.added + n)
        slots = absolute % self.capacity
        fields = {"states": states.to(self.dtype), "actions": actions.long(), "rewards": rewards.float(),
                  "next_index": self.added + next_offsets.long(), "dones": dones.bool(),
                  "costs": torch.zeros(n) if costs is None else costs.float()}
        needed = int(slots.max()) + 1
        for name, value in fields.items():
            store = getattr(self, name)
            if store.shape[0] < needed:  # grow geometrically, up to capacity
                size = min(self.capacity, max(needed, 2 * store.shape[0]))
                grown = torch.empty((size,) + tuple(store.shape[1:]), dtype=store.dtype)
                grown[: store.shape[0]] = store
                setattr(self, name, store := grown)
            store[slots] = value
        self.added += n

    def sample(self, batch_size: int, generator: torch.Generator | None = None, scale: float = 1.0):
        """(states, actions, returns, next_states, dones) for `batch_size` transitions drawn uniformly; a return is
        reward / `scale` + cost."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        nxt = self.next_index[idx] % self.capacity
        returns = self.rewards[idx] / scale + self.costs[idx]
        return self.states[idx], self.actions[idx], returns, self.states[nxt], self.dones[idx]

    def state_dict(self) -> dict:
        n = len(self)
        return {"states": self.states[:n].clone(), "actions": self.actions[:n].clone(), "rewards": self.rewards[:n].clone(),
                "next_index": self.next_index[:n].clone(), "dones": self.dones[:n].clone(),
                "costs": self.costs[:n].clone(), "added": torch.tensor(self.added)}

    def load_state_dict(self, state: dict):
        for name in ("states", "actions", "rewards", "next_index", "dones"):
            setattr(self, name, state[name].clone())
        # a buffer saved before rewards and costs were kept apart holds their sum in `rewards`
        self.costs = state["costs"].clone() if "costs" in state else torch.zeros_like(self.rewards)
        self.added = int(state["added"])
