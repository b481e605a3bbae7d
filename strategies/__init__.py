"""Aggregation strategies and their registry."""

from fedpeft.state import ClientPlan
from strategies.base import StopFederation, Strategy
from strategies.clip import Clip, create_clip
from strategies.dp import DifferentialPrivacy
from strategies.fedadagrad import FedAdagrad
from strategies.fedadam import FedAdam
from strategies.fedau import FedAU
from strategies.fedavg import FedAvg
from strategies.fedavgm import FedAvgM
from strategies.fedex import FedEx
from strategies.fedsa import FedSA
from strategies.fedsb import FedSB
from strategies.fedyogi import FedYogi
from strategies.ffa import FFA
from strategies.flexlora import FlexLoRA
from strategies.hetlora import HetLoRA
from strategies.median import Median
from strategies.registry import StrategyError, available_strategies, create_strategy, register_strategy
from strategies.stacking import Stacking
from strategies.trimmed_mean import TrimmedMean
from strategies.vcma import VCMA

for _strategy in (
    FedAvg,
    Stacking,
    VCMA,
    FedEx,
    FFA,
    DifferentialPrivacy,
    Median,
    TrimmedMean,
    FedAvgM,
    FedAdam,
    FedYogi,
    FedAdagrad,
    FedAU,
    HetLoRA,
    FlexLoRA,
    FedSA,
    FedSB,
):
    register_strategy(_strategy.name)(_strategy)
register_strategy(Clip.name)(create_clip)  # a factory: it picks the streaming variant when it can

__all__ = [
    "FFA",
    "VCMA",
    "Clip",
    "ClientPlan",
    "DifferentialPrivacy",
    "FedAdagrad",
    "FedAU",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedSA",
    "FedSB",
    "FedEx",
    "FedYogi",
    "FlexLoRA",
    "HetLoRA",
    "Median",
    "Stacking",
    "StopFederation",
    "Strategy",
    "StrategyError",
    "TrimmedMean",
    "available_strategies",
    "create_strategy",
    "register_strategy",
]
