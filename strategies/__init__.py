"""Aggregation strategies and their registry."""

from fedpeft.state import ClientPlan
from strategies.base import StopFederation, Strategy
from strategies.dp import DifferentialPrivacy
from strategies.fedavg import FedAvg
from strategies.fedex import FedEx
from strategies.ffa import FFA
from strategies.registry import StrategyError, available_strategies, create_strategy, register_strategy
from strategies.stacking import Stacking
from strategies.vcma import VCMA

for _strategy in (FedAvg, Stacking, VCMA, FedEx, FFA, DifferentialPrivacy):
    register_strategy(_strategy.name)(_strategy)

__all__ = [
    "FFA",
    "VCMA",
    "ClientPlan",
    "DifferentialPrivacy",
    "FedAvg",
    "FedEx",
    "Stacking",
    "StopFederation",
    "Strategy",
    "StrategyError",
    "available_strategies",
    "create_strategy",
    "register_strategy",
]
