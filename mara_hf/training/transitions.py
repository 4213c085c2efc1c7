"""What a training rollout turns into: per-decision rewards and the transitions of an episode.

Two decision processes (`MaraTrainingConfig.mdp`):

- `"veto"` (default): the agent may remove candidates; the token is the LLM's choice among the rest (all of
  them when every candidate is removed). Decoded with strategy "veto", greedy decoding emits the most probable
  accepted candidate and sampling samples among the accepted ones, so an agent that accepts everything is the LLM
  alone. In training the candidates are visited in an order sampled from the LLM's decoding distribution q (the
  candidates' probabilities at `temperature`, renormalised over the set; sampling without replacement) and the
  first accepted one is emitted, the first visited when all are rejected: exactly a sample of q restricted to
  the accepted set, with every decision causal (accept = this token is emitted), as in the paper's chain, and
  only the candidates visited up to the accept need scoring. Rejecting candidate k alone moves the decoding
  distribution by KL = -log(1 - q_k): that is its per-decision cost, -kl_ctl * -log(1 - q_k), a true divergence
  from the distribution being aligned (accepting costs nothing).
- `"chain"` (the paper's): candidates in probability order, the first accepted is emitted (the last when all are
  rejected); each decision up to the emitted one is a transition; per-decision reward as the authors compute it
  (`kl_rewards`).

An episode's transitions chain every decision to the next one (the next candidate, or the first of the next
step); the response's reward goes to the last one, or with `postback` to every decision, discounted by gamma per
token emitted after the decision's step.

Prefix shaping (`shaping`): the reward sources also score every prefix of the response, and token t is credited
with the change it caused, phi(y<=t) - phi(y<t). The shaped rewards sum to the response's reward (minus the empty
response's), and a decision's return then counts only what came from its own token on: the reward earned before
it, which it could not change, no longer adds noise to its target (potential-based shaping: the best policy
stays the same). A refusal detector, for instance, then credits the opening tokens that made the refusal.
"""

import torch


def kl_rewards(p_accept: torch.Tensor, llm_logprobs: torch.Tensor, kl_ctl: float) -> torch.Tensor:
    """-kl_ctl * (log pi_agent(t_k) - log pi_LLM(t_k)) for every candidate of a step, as the authors compute it.

    The agent's chance of emitting t_k is the conditional acceptance chain p_k = P_acc(t_k) * prod_{j<k}
    (1 - P_acc(t_j)); log pi_agent is the log-softmax of those chances over the candidates (of the chances
    themselves, not of their logs: the authors' choice, kept for fidelity; it moves by at most about 1 nat).
    log pi_LLM is what the caller passes (the authors: log p / temperature, over the whole vocabulary).
    """
    p = p_accept.double()
    chain = p * torch.cat([p.new_ones(1), (1 - p).cumprod(0)[:-1]])
    log_agent = chain.log_softmax(0)
    return (-kl_ctl * (log_agent - llm_logprobs.double())).float()


def decoding_logprobs(llm_logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """log q over the candidate set: the LLM's log-probabilities at `temperature`, renormalised over the set
    (-inf stays -inf). Works on the last dimension."""
    return torch.log_softmax(llm_logprobs.float() / temperature, dim=-1)


def veto_rewards(log_q: torch.Tensor, accepted: torch.Tensor, kl_ctl: float) -> torch.Tensor:
    """Per-candidate reward of veto decisions: -kl_ctl * -log(1 - q_k) for a rejection of candidate k, 0 for an
    accept. `log_q` from `decoding_logprobs`."""
    cost = -torch.log1p(-log_q.exp().clamp(max=1 - 1e-6))
    return torch.where(accepted, torch.zeros_like(cost), -kl_ctl * cost)


def sampled_order(log_q: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.LongTensor:
    """Per row, the candidate slots in an order sampled without replacement from q (Gumbel top-k), padding last."""
    u = torch.rand(log_q.shape, generator=generator).clamp(min=1e-12).to(log_q.device)
    keys = (log_q - torch.log(-torch.log(u))).masked_fill(~mask, float("-inf"))
    return keys.argsort(dim=-1, descending=True, stable=True)


def chain_divergence(log_q: torch.Tensor, p_accept: torch.Tensor) -> float:
    """KL(pi || q) in nats for one step of the paper's chain, pi being its emission distribution under the agent's
    probabilities (the last candidate takes the all-rejected mass)."""
    p = p_accept.double().clamp(0, 1)
    reach = torch.cat([p.new_ones(1), (1 - p).cumprod(0)[:-1]])
    pi = p * reach
    pi[-1] = reach[-1]  # the last candidate is emitted when reached, accepted or not
    keep = pi > 0
    return float((pi[keep] * (pi[keep].log() - log_q.double()[keep])).sum())


def episode_transitions(steps: list[dict], reward, gamma: float, postback: bool):
    """Transitions of one episode: (states, actions, rewards, next offsets, dones, costs), or None without
    decisions. A transition's return is its reward plus its cost: the two are kept apart so that the learner can
    scale the response's reward (`normalize_rewards`) without scaling the divergence cost.

    `steps` holds the decision steps in order, each `{"states", "actions", "rewards", "token": step number}` with
    one entry per transition (its per-decision reward: the divergence cost, `costs`). Steps whose states contain
    NaN are skipped. `reward` is the response's reward: on the last transition, or with `postback` on every
    transition, times gamma ** (tokens emitted after its step). With postback, `reward` may instead be a list of
    per-token rewards (prefix shaping): each transition then gets the discounted sum of the rewards of its token
    and the later ones.
    """
    steps = [s for s in steps if torch.isfinite(s["states"].float()).all() and len(s["states"])]
    if not steps:
        return None
    states = torch.cat([s["states"] for s in steps])
    actions = torch.cat([torch.as_tensor(s["actions"], dtype=torch.long) for s in steps])
    costs = torch.cat([torch.as_tensor(s["rewards"], dtype=torch.float32) for s in steps])
    n = len(states)
    rewards = torch.zeros(n)
    if postback and isinstance(reward, (list, tuple)):
        to_go, running = [0.0] * len(reward), 0.0
        for t in range(len(reward) - 1, -1, -1):
            running = reward[t] + gamma * running
            to_go[t] = running
        rewards += torch.cat([torch.full((len(s["states"]),), to_go[s["token"]]) for s in steps])
    elif postback:
        last = steps[-1]["token"]
        after = torch.cat([torch.full((len(s["states"]),), float(last - s["token"])) for s in steps])
        rewards += reward * gamma ** after
    else:
        rewards[-1] += reward if not isinstance(reward, (list, tuple)) else sum(reward)
    next_offsets = torch.arange(1, n + 1)
    next_offsets[-1] = n - 1  # terminal: points at itself, masked by done
    dones = torch.zeros(n, dtype=torch.bool)
    dones[-1] = True
    return states, actions, rewards, next_offsets, dones, costs
