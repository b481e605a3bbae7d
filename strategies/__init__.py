"""Aggregation strategies and their registry."""

from fedpeft.state import ClientPlan
from strategies.base import Strategy
from strategies.fedavg import FedAvg
from strategies.registry import StrategyError, available_strategies, create_strategy, register_strategy

register_strategy("fedavg")(FedAvg)

__all__ = [
    "ClientPlan",
    "FedAvg",
    "Strategy",
    "StrategyError",
    "available_strategies",
    "create_strategy",
    "register_strategy",
]
