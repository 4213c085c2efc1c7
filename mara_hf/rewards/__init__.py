"""Reward sources: what an agent is trained and evaluated for (`--reward SPEC` on the command line)."""

from .base import CallableReward, RewardSource, combine
from .builtin import BUILTINS, HeldRefusalReward, RefusalReward, RepetitionReward, repeated_ngrams
from .guard import GUARD_OPTIONS, GUARD_PREFIX, GuardReward
from .models import DEFAULT_TEMPLATE, HFRewardModel
from .spec import parse_reward_spec

__all__ = ["RewardSource", "CallableReward", "combine", "RefusalReward", "HeldRefusalReward", "RepetitionReward",
           "BUILTINS", "repeated_ngrams", "GuardReward", "GUARD_PREFIX", "GUARD_OPTIONS", "HFRewardModel",
           "DEFAULT_TEMPLATE", "parse_reward_spec"]
