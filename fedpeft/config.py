"""Typed run configuration: TOML file + ``--set section.key=value`` overrides, validated.

Every mistake a user can make here raises ``ConfigError`` with one line naming the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedpeft.compression import CODECS
from fedpeft.errors import UserError
from fedpeft.label_skew import LABEL_SKEW_METHODS
from fedpeft.secagg.ring import FixedPoint, RingOverflowError


class ConfigError(UserError):
    """A configuration mistake the user can fix; the message says how."""


TASKS = ("classification", "causal_lm")
LORA_INITS = ("shared", "per_client")
PARTITIONS = ("iid", "dirichlet", "field", "files")
SIMULATED_FAULTS = ("crash", "timeout", "garbage")


@dataclass
class RunSection:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    rounds: int = 5
    export_merged: bool = False


@dataclass
class ModelSection:
    name: str = "all-MiniLM-L6-v2"
    max_length: int = 64
    task: str = "classification"


@dataclass
class LoraSection:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    client_ranks: list[int] | None = None
    init: str = "shared"  # "per_client": each client draws its first A from a seed of its own id


@dataclass
class DataSection:
    source: str = "demo"
    test_source: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    columns: list[str] | None = None
    labels: list[str] | None = None
    num_clients: int = 8
    partition: str = "iid"
    partition_field: str | None = None
    instruction_field: str | None = None
    input_field: str | None = None
    response_field: str | None = None
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 10
    demo_train_size: int = 2000
    demo_test_size: int = 400
    test_limit: int | None = None


@dataclass
class TrainSection:
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    lr_decay: float = 1.0  # round r trains at lr * lr_decay ** (r - 1)
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_global||^2 on the trainable tensors
    label_skew: str = "none"  # a client-side remedy for label skew (fedpeft/label_skew.py)
    label_skew_tau: float = 1.0
    eval_batch_size: int = 64
    compression: str = "none"

    def round_lr(self, rnd: int) -> float:
        """The local learning rate of round ``rnd`` (from 1)."""
        return self.lr * self.lr_decay ** (rnd - 1)


@dataclass
class ExampleDPSection:
    """Example-level differential privacy: DP-SGD on every client (fedpeft/dp_sgd.py)."""

    enabled: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0  # C, the L2 bound on each example's gradient
    delta: float = 1e-5
    epsilon_budget: float | None = None  # a client stops training before a round would exceed it


@dataclass
class EvalSection:
    """Central evaluation of causal LMs beyond held-out loss: greedy generation + exact match."""

    generate: bool = False
    max_new_tokens: int = 256
    extractor: str = "gsm8k"


@dataclass
class ServerSection:
    fraction: float = 0.5
    min_clients: int = 2
    min_replies: int | None = None
    round_timeout: float = 600.0
    max_retries: int = 2
    evaluate: bool = True
    max_reply_bytes: int = 0  # 0: derived from the global adapter's size (server/validation.py)
    max_norm_ratio: float = 10.0  # 0: no norm check
    secure_aggregation: bool = False


@dataclass
class SecureSection:
    """Secure aggregation's parameters (used when ``server.secure_aggregation``; docs/security.md)."""

    threshold: float = 0.6  # fraction of an attempt's participants whose shares recover a secret
    clip_range: float = 8.0  # each value is clipped to [-clip_range, clip_range] before encoding
    fraction_bits: int = 30  # fixed-point precision: values are scaled by 2^fraction_bits
    max_examples: int = 1_000_000  # the largest example count (weight) one client may report


@dataclass
class StrategySection:
    name: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimulationSection:
    cpus_per_client: int = 1


@dataclass
class FaultsSection:
    """Simulated client misbehaviour, for testing the server's fault handling (simulation only;
    see client/faults.py)."""

    rate: float = 0.0
    kinds: list[str] = field(default_factory=lambda: list(SIMULATED_FAULTS))
    poisoned: list[int] = field(default_factory=list)
    poison_scale: float = 100.0

    @property
    def active(self) -> bool:
        return self.rate > 0 or bool(self.poisoned)

    def refuse_deployment(self) -> None:
        """Raise if set: deployed clients are real, their faults are not simulated."""
        if self.active:
            raise ConfigError(
                "[faults] simulates misbehaving clients in `fedpeft simulate` only; remove it from a "
                "deployment's config (a deployed client can misbehave with `fedpeft client --inject-fault`)"
            )


@dataclass
class ClientConfig:
    """The part of the run configuration every client needs; sent in each round's message."""

    seed: int
    model: ModelSection
    lora: LoraSection
    data: DataSection
    train: TrainSection
    threads: int = 1
    faults: FaultsSection = field(default_factory=FaultsSection)
    round_timeout: float = 600.0
    example_dp: ExampleDPSection = field(default_factory=ExampleDPSection)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClientConfig:
        raw = json.loads(text)
        return cls(
            seed=raw["seed"],
            threads=raw["threads"],
            model=ModelSection(**raw["model"]),
            lora=LoraSection(**raw["lora"]),
            data=DataSection(**raw["data"]),
            train=TrainSection(**raw["train"]),
            faults=FaultsSection(**raw["faults"]),
            round_timeout=raw["round_timeout"],
            example_dp=ExampleDPSection(**raw["example_dp"]),
        )


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    server: ServerSection = field(default_factory=ServerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    secure: SecureSection = field(default_factory=SecureSection)
    example_dp: ExampleDPSection = field(default_factory=ExampleDPSection)

    def client_config(self) -> ClientConfig:
        """A copy of the clients' part of the configuration (editing it leaves this one alone)."""
        return ClientConfig(
            seed=self.run.seed,
            model=copy.deepcopy(self.model),
            lora=copy.deepcopy(self.lora),
            data=copy.deepcopy(self.data),
            train=copy.deepcopy(self.train),
            threads=self.simulation.cpus_per_client,
            faults=copy.deepcopy(self.faults),
            round_timeout=self.server.round_timeout,
            example_dp=copy.deepcopy(self.example_dp),
        )

    @property
    def clients_per_round(self) -> int:
        """How many clients the server samples each round (when all are connected)."""
        n = self.data.num_clients
        return min(n, max(self.server.min_clients, math.ceil(self.server.fraction * n)))

    @property
    def min_replies(self) -> int:
        return self.server.min_replies or self.server.min_clients


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML file (or start from defaults), apply ``section.key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass the path of a TOML file")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML ({exc}); fix the syntax there") from exc
    for item in overrides:
        _apply_override(raw, item)
    config = _build(raw)
    _validate(config)
    return config


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: take it as a string
    raw.setdefault(section, {})[name] = value


def _build(raw: dict[str, Any]) -> RunConfig:
    sections = {f.name: f for f in fields(RunConfig)}
    built: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown section [{section}]; valid sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        cls = typing.get_type_hints(RunConfig)[section]
        if section == "strategy":
            values = dict(values)
            built[section] = StrategySection(
                name=_check_type("strategy.name", values.pop("name", "fedavg"), str),
                options=values,
            )
            continue
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"unknown key '{section}.{key}'; valid keys in [{section}]: {', '.join(hints)}"
                )
            _check_type(f"{section}.{key}", value, hints[key])
        built[section] = cls(**values)
    return RunConfig(**built)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return value
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is int and isinstance(value, bool):
            continue
        if isinstance(origin, type) and isinstance(value, origin):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed if k is not type(None))
    raise ConfigError(f"'{key}' must be {names}, got {value!r}")


def _validate(config: RunConfig) -> None:
    checks = [
        (config.run.rounds >= 1, "run.rounds must be at least 1"),
        (config.lora.rank >= 1, "lora.rank must be at least 1"),
        (config.lora.alpha > 0, "lora.alpha must be positive"),
        (
            all(isinstance(r, int) and r >= 1 for r in config.lora.client_ranks or []),
            "lora.client_ranks must be a list of positive integers, e.g. [4, 8, 16]",
        ),
        (
            config.lora.client_ranks is None or len(set(config.lora.client_ranks)) > 1,
            "lora.client_ranks must mix at least two ranks; for one rank on every client set lora.rank",
        ),
        (
            config.lora.init in LORA_INITS,
            f"lora.init must be one of {', '.join(LORA_INITS)}, got {config.lora.init!r}",
        ),
        (config.data.num_clients >= 1, "data.num_clients must be at least 1"),
        (
            config.model.task in TASKS,
            f"model.task must be one of {', '.join(TASKS)}, got {config.model.task!r}",
        ),
        (
            config.data.partition in PARTITIONS,
            f"data.partition must be one of {', '.join(PARTITIONS)}, got {config.data.partition!r}",
        ),
        (
            config.data.partition != "field" or bool(config.data.partition_field),
            "data.partition = 'field' needs data.partition_field, e.g. 'category'",
        ),
        (config.eval.max_new_tokens >= 1, "eval.max_new_tokens must be at least 1"),
        (config.data.dirichlet_alpha > 0, "data.dirichlet_alpha must be positive"),
        (config.train.local_steps >= 1, "train.local_steps must be at least 1"),
        (config.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (config.train.lr > 0, "train.lr must be positive"),
        (0 < config.train.lr_decay <= 1, "train.lr_decay must be in (0, 1], e.g. 0.9 (1: a constant lr)"),
        (config.train.proximal_mu >= 0, "train.proximal_mu must be >= 0 (0: no proximal term)"),
        (
            config.train.label_skew in LABEL_SKEW_METHODS,
            f"train.label_skew must be one of {', '.join(LABEL_SKEW_METHODS)}, "
            f"got {config.train.label_skew!r}",
        ),
        (config.train.label_skew_tau > 0, "train.label_skew_tau must be positive"),
        (
            config.train.label_skew == "none" or config.model.task == "classification",
            "train.label_skew applies to classification only; set it to 'none' for a causal LM",
        ),
        (
            config.train.compression in CODECS,
            f"train.compression must be one of {', '.join(CODECS)}, got {config.train.compression!r}",
        ),
        (0 < config.server.fraction <= 1, "server.fraction must be in (0, 1]"),
        (config.server.min_clients >= 1, "server.min_clients must be at least 1"),
        (
            config.server.min_clients <= config.data.num_clients,
            f"server.min_clients ({config.server.min_clients}) exceeds data.num_clients "
            f"({config.data.num_clients}); lower it or add clients",
        ),
        (
            1 <= config.min_replies <= config.server.min_clients,
            "server.min_replies must be between 1 and server.min_clients",
        ),
        (
            config.server.max_reply_bytes >= 0,
            "server.max_reply_bytes must be a byte count >= 0 (0 derives the cap from the adapter's size)",
        ),
        (
            config.server.max_norm_ratio == 0 or config.server.max_norm_ratio >= 1,
            "server.max_norm_ratio must be 0 (no norm check) or at least 1, e.g. 10",
        ),
        (config.simulation.cpus_per_client >= 1, "simulation.cpus_per_client must be at least 1"),
        *_faults_checks(config),
        *_example_dp_checks(config),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if config.server.secure_aggregation:
        _validate_secure(config)


def _validate_secure(config: RunConfig) -> None:
    """Secure aggregation's parameters, and that the sum of a round cannot overflow its ring."""
    secure = config.secure
    checks = [
        (0 < secure.threshold <= 1, "secure.threshold must be in (0, 1], e.g. 0.6"),
        (secure.clip_range > 0, "secure.clip_range must be positive"),
        (8 <= secure.fraction_bits <= 48, "secure.fraction_bits must be between 8 and 48"),
        (secure.max_examples >= 1, "secure.max_examples must be at least 1"),
        (
            config.clients_per_round >= 2,
            "secure aggregation needs at least 2 clients per round; raise server.min_clients",
        ),
        (
            not config.lora.client_ranks,
            "secure aggregation sums one adapter layout; unset lora.client_ranks or "
            "set server.secure_aggregation = false",
        ),
        (
            config.lora.init == "shared",
            "secure aggregation needs the shared initial adapter to mask against; set "
            "lora.init = 'shared' or server.secure_aggregation = false",
        ),
        (
            config.train.compression == "none",
            "train.compression cannot apply under secure aggregation (a masked update is uniform "
            "over the 64-bit ring); set train.compression = 'none'",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    codec = FixedPoint(secure.clip_range, secure.fraction_bits)
    try:
        codec.check_capacity(config.clients_per_round, secure.max_examples)
    except RingOverflowError as exc:
        raise ConfigError(
            f"secure aggregation: {exc}; lower secure.fraction_bits, secure.clip_range or secure.max_examples"
        ) from exc


def _faults_checks(config: RunConfig) -> list[tuple[bool, str]]:
    faults = config.faults
    return [
        (0 <= faults.rate <= 1, f"faults.rate must be in [0, 1], got {faults.rate}"),
        (
            bool(faults.kinds) and set(faults.kinds) <= set(SIMULATED_FAULTS),
            f"faults.kinds must be a non-empty list of {', '.join(SIMULATED_FAULTS)}, got {faults.kinds!r}",
        ),
        (
            all(isinstance(p, int) and 0 <= p < config.data.num_clients for p in faults.poisoned),
            f"faults.poisoned must list partition ids below data.num_clients "
            f"({config.data.num_clients}), got {faults.poisoned!r}",
        ),
    ]


def _example_dp_checks(config: RunConfig) -> list[tuple[bool, str]]:
    dp = config.example_dp
    return [
        (dp.noise_multiplier > 0, "example_dp.noise_multiplier must be positive"),
        (dp.max_grad_norm > 0, "example_dp.max_grad_norm must be positive"),
        (0 < dp.delta < 1, "example_dp.delta must be in (0, 1), e.g. 1e-5"),
        (dp.epsilon_budget is None or dp.epsilon_budget > 0, "example_dp.epsilon_budget must be positive"),
        (
            not dp.enabled or config.train.label_skew == "none",
            "train.label_skew computes from each client's label counts, which example-level DP protects; "
            "set train.label_skew = 'none' with example_dp.enabled",
        ),
    ]


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """A plain-data copy (for summary.json and checkpoints)."""
    return dataclasses.asdict(config)
