"""Safe rollout of model versions: fixed, A/B split, canary with automatic rollback, shadow.

Framework-free policy core: ``Router`` decides per request which version serves it and
changes the policy by hand or by itself (``tick``); ``PolicyFile`` and ``HistoryLog``
persist the policy and every change. The server wires these into its request path.
"""

from torchship.rollout.persist import HistoryLog, PolicyFile, recorder
from torchship.rollout.policies import (
    SLO,
    CanaryPolicy,
    FixedPolicy,
    InvalidPolicyError,
    Policy,
    PolicyRecord,
    ShadowPolicy,
    SplitPolicy,
    parse_policy,
    policy_dict,
    sticky_bucket,
)
from torchship.rollout.router import (
    RolloutConflictError,
    RolloutEvent,
    Route,
    Router,
    ShadowStats,
)
from torchship.rollout.window import SlidingWindow, Verdict, WindowStats, judge

__all__ = [
    "SLO",
    "CanaryPolicy",
    "FixedPolicy",
    "HistoryLog",
    "InvalidPolicyError",
    "Policy",
    "PolicyFile",
    "PolicyRecord",
    "RolloutConflictError",
    "RolloutEvent",
    "Route",
    "Router",
    "ShadowPolicy",
    "ShadowStats",
    "SlidingWindow",
    "SplitPolicy",
    "Verdict",
    "WindowStats",
    "judge",
    "parse_policy",
    "policy_dict",
    "recorder",
    "sticky_bucket",
]
