"""Aggregation strategies and their registry."""

from fedpeft.state import ClientPlan
from strategies.base import Strategy
from strategies.fedavg import FedAvg
from strategies.registry import available_strategies, create_strategy, register_strategy

register_strategy("fedavg")(FedAvg)

__all__ = [
    "ClientPlan",
    "FedAvg",
    "Strategy",
    "available_strategies",
    "create_strategy",
    "register_strategy",
]
