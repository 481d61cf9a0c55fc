"""Roll-outs: shadow, canary and blue-green deployments of a registered model, judged and rolled back."""

from fovea._duration import parse_duration
from fovea.deploy._deploy import (
    STRATEGIES,
    Thresholds,
    View,
    abort,
    active,
    advance,
    deployments,
    figures_now,
    judge,
    overview,
    production,
    promote,
    refresh,
    rollback,
    start,
    stats,
    sticky_bucket,
    takes_turn,
)

__all__ = ["STRATEGIES", "Thresholds", "View", "abort", "active", "advance", "deployments", "figures_now", "judge", "overview", "parse_duration",
           "production", "promote", "refresh", "rollback", "start", "stats", "sticky_bucket", "takes_turn"]
