"""The learner of MARA training: discrete soft actor-critic on replayed (state, accept/reject) transitions.

Two ideas beyond textbook discrete SAC, both switchable (`MaraTrainingConfig`):
- A prior policy. With `prior_accept`, the actor is regularised towards "accept with probability prior_accept"
  instead of towards the uniform policy: loss = E[sum_a pi(a) (alpha (log pi(a) - log prior(a)) - Q(a))], whose
  optimum is pi(a) ~ prior(a) exp(Q(a) / alpha). Where the critic sees no difference between accepting and
  rejecting, the agent stays at the prior (accept: greedy decisions change nothing); it rejects only once the
  critic's evidence exceeds alpha * log(prior_accept / (1 - prior_accept)). Entropy regularisation (the paper's)
  instead drives undecided states to 50/50, i.e. random rejections, which is what decoding then shows.
- Monte Carlo targets (`bootstrap=False`): the critics regress on each transition's own return.

With an `--init-agent`, the prior is that agent's own decisions (`init_agent_prior`): the actor is regularised
towards what the started agent did, so where the fresh critics see no difference it keeps deciding as before.

Both critics live in one module with stacked weights, so a learner step is two forward/backward passes (critics,
actor) and two optimizer steps, whatever the batch.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def _adam(params, lr):
    """Adam with its fused kernel where torch has one for these parameters' device (faster steps), else the
    default implementation."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch or a device without a fused Adam
        return torch.optim.Adam(params, lr=lr)


class TwinCritic(nn.Module):
    """Two Q-networks (reject, accept) of the actor's shape, sharing the input LayerNorm (as the authors' critic),
    evaluated together with batched matrix products. `forward(states)` -> `(2, batch, 2)` Q-values.

    Each network's last layer gives a value v and a difference d: Q(accept) = v, Q(reject) = v + d, with d starting
    at zero. A fresh critic thus sees no difference between the actions, and d moves only with evidence from
    rejections; with two free outputs, the rarely taken action's untrained value would steer the actor from the
    first update, and can drive an agent that accepts nearly everything to reject everything.
    """

    def __init__(self, state_dim: int, hidden_dims, heads: int = 2):
        super().__init__()
        widths = [state_dim, *hidden_dims, 2]
        self.ln = nn.LayerNorm(state_dim)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init, per head
            self.weights.append(nn.Parameter(torch.empty(heads, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(heads, 1, fan_out).uniform_(-bound, bound)))
        with torch.no_grad():
            self.weights[-1][..., 0].zero_()
            self.biases[-1][..., 0].zero_()

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        x = self.ln(states).expand(self.weights[0].shape[0], *states.shape)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        difference, value = x.unbind(-1)
        return torch.stack([value + difference, value], dim=-1)


class SoftActorCritic:
    """Critics, their target copy, the temperature and the optimizers for `actor`; `update(batch)` is one step.

    `config` is a `MaraTrainingConfig` (lr_*, init_alpha, auto_alpha, target_entropy_factor, prior_accept, gamma,
    bootstrap, tau, max_grad_norm, agent_hidden_dims).
    """

    def __init__(self, actor: nn.Module, state_dim: int, config, device, prior_actor: nn.Module | None = None):
        self.actor, self.config = actor, config
        # a frozen actor whose decisions are the prior (an --init-agent's), instead of the fixed prior_accept
        self.prior_actor = prior_actor
        self.critics = TwinCritic(state_dim, config.agent_hidden_dims).to(device)
        self.targets = copy.deepcopy(self.critics).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), device=device, requires_grad=config.auto_alpha)
        self.actor_opt = _adam(actor.parameters(), config.lr_actor)
        self.critic_opt = _adam(self.critics.parameters(), config.lr_critic)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=config.lr_alpha) if config.auto_alpha else None
        self._actor_params, self._critic_params = list(actor.parameters()), list(self.critics.parameters())
        self.target_entropy = config.target_entropy_factor * math.log(2)
        p = config.prior_accept
        # log prior(reject), log prior(accept); the uniform prior (the paper's entropy bonus) when unset
        self.log_prior = torch.tensor([math.log(1 - p), math.log(p)] if p is not None else [0.0, 0.0], device=device)
        self.updates = 0

    def update(self, states, actions, rewards, next_states, dones, train_actor: bool = True) -> dict:
        """One learner step; with `train_actor=False` (critic warm-up) only the critics learn."""
        cfg = self.config
        alpha = self.log_alpha.exp().detach()
        log_prior = self.prior_logprobs(states)
        target = rewards
        if cfg.bootstrap:
            with torch.no_grad():
                logits2 = self.actor(next_states).logits
                pi2, logpi2 = logits2.softmax(-1), logits2.log_softmax(-1)
                q_next = self.targets(next_states).min(0).values
                value = (pi2 * (q_next - alpha * (logpi2 - self.prior_logprobs(next_states)))).sum(-1)
                target = rewards + cfg.gamma * (~dones).float() * value
        q_all = self.critics(states)  # (2, batch, 2)
        q_taken = q_all.gather(2, actions.view(1, -1, 1).expand(2, -1, 1)).squeeze(2)
        critic_loss = F.mse_loss(q_taken, target.expand_as(q_taken), reduction="none").mean(1).sum()
        self._step(self.critic_opt, critic_loss, self._critic_params)

        # The critics' values before this step's update serve the actor (one step stale: standard, and one forward
        # fewer).
        q = q_all.detach().min(0).values
        logits = self.actor(states).logits
        pi, logpi = logits.softmax(-1), logits.log_softmax(-1)
        actor_loss = (pi * (alpha * (logpi - log_prior) - q)).sum(-1).mean()
        if train_actor:
            self._step(self.actor_opt, actor_loss, self._actor_params)
        else:
            actor_loss = actor_loss.detach()

        entropy = -(pi * logpi).sum(-1).detach()
        if self.alpha_opt is not None and train_actor:
            alpha_loss = (self.log_alpha * (entropy - self.target_entropy)).mean()
            self._step(self.alpha_opt, alpha_loss, [self.log_alpha])
        if cfg.bootstrap:
            with torch.no_grad():
                for p, tp in zip(self.critics.parameters(), self.targets.parameters()):
                    tp.lerp_(p, cfg.tau)
        self.updates += 1
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "alpha": alpha,
                "entropy": entropy.mean(), "p_accept": pi[:, 1].detach().mean(),
                **self.evidence(pi.detach(), q, log_prior, alpha)}

    def evidence(self, pi, q, log_prior, alpha) -> dict:
        """Why the agent rejects or does not, on the replayed decisions: the share it rejects at its decoding
        threshold t; the critics' advantage of rejecting, Q(reject) - Q(accept); the bar that advantage must clear
        for the soft-optimal policy (pi proportional to prior x exp(Q / alpha)) to reject at t,
        alpha x (log((1 - t) / t) - log(prior(reject) / prior(accept))); and the share of decisions over it. An
        actor that never rejects with no decision over the bar is not failing to learn: no rejection pays there."""
        t = float(self.actor.config.threshold)
        advantage = q[:, 0] - q[:, 1]
        prior_odds = (log_prior[..., 0] - log_prior[..., 1]).expand_as(advantage)
        bar = alpha * (math.log((1 - t) / t) - prior_odds)
        return {"rejects_at_threshold": (pi[:, 1] <= t).float().mean(), "advantage_reject": advantage.mean(),
                "reject_bar": bar.mean(), "over_bar": (advantage > bar).float().mean()}

    def prior_logprobs(self, states) -> torch.Tensor:
        """log prior(reject), log prior(accept): fixed, or per state from the prior actor."""
        if self.prior_actor is None:
            return self.log_prior
        with torch.no_grad():
            return self.prior_actor(states).logits.log_softmax(-1)

    def _step(self, optimizer, loss, params):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        optimizer.step()

    def state_dict(self) -> dict:
        return {"critics": self.critics.state_dict(), "targets": self.targets.state_dict(),
                "log_alpha": self.log_alpha.detach().cpu(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(),
                "alpha_opt": self.alpha_opt.state_dict() if self.alpha_opt is not None else None,
                "updates": self.updates}

    def load_state_dict(self, state: dict):
        self.critics.load_state_dict(state["critics"])
        self.targets.load_state_dict(state["targets"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        if self.alpha_opt is not None and state.get("alpha_opt") is not None:
            self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.updates = state["updates"]
