"""Several veto agents as one judge (`MaraProcessor([safety, style], model=model)`): a candidate stays when every
agent accepts it. They share one candidate set and one scoring forward."""

import torch

from ..agent.modeling import MaraAgentOutput


def common_setting(agents, name: str, override):
    """The setting `name` the agents share (or the override): combined agents judge one candidate set."""
    if override is not None:
        return override
    values = {getattr(a.config, name) for a in agents}
    if len(values) > 1:
        raise ValueError(f"The agents decode with different {name} ({sorted(values)}): they judge one candidate set "
                         f"together, so pass {name}=... to MaraProcessor.")
    return values.pop()


class AllAccept(torch.nn.Module):
    """Several veto agents as one judge: a candidate is accepted when every agent accepts it, each at its own
    threshold (greedy decisions: P(accept) is 1 or 0, against the bar 0.5), or with the product of their P(accept)
    (sampled decisions: as if each drew its own decision independently)."""

    def __init__(self, agents, thresholds, sampled: bool):
        super().__init__()
        self.agents = torch.nn.ModuleList(agents)
        self.thresholds = list(thresholds)
        self.sampled = sampled

    def forward(self, states):
        probs = [a(states).accept_prob.float() for a in self.agents]
        if self.sampled:
            p = torch.stack(probs).prod(0)
        else:
            p = torch.stack([q > t for q, t in zip(probs, self.thresholds)]).all(0).float()
        return MaraAgentOutput(accept_prob=p)
