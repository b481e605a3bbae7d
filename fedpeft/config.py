"""Typed run configuration: a TOML file plus ``--set section.key=value`` overrides, validated.

Each section is a frozen pydantic model whose fields carry their type, default, constraint and
description (``docs/configuration.md`` is generated from them: ``python -m fedpeft.config``). Every
mistake a user can make here raises ``ConfigError`` with one line naming the key and the fix.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from fedpeft.errors import UserError
from fedpeft.secagg.ring import FixedPoint, RingOverflowError


class ConfigError(UserError):
    """A configuration mistake the user can fix; the message says how."""


TASKS = ("classification", "causal_lm")
LORA_INITS = ("shared", "per_client")
PARTITIONS = ("iid", "dirichlet", "field", "files")
SIMULATED_FAULTS = ("crash", "timeout", "garbage")


class Section(BaseModel):
    """A configuration section: unknown keys refused, types strict (an int is accepted for a
    float), frozen and hashable (a client caches its model and data by configuration)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @cached_property
    def _hash(self) -> int:
        return hash(self.model_dump_json())

    def __hash__(self) -> int:  # lists inside make the default field hash fail
        return self._hash

    def replace(self, **changes: Any) -> typing.Self:
        """A validated copy with ``changes`` (sections are frozen)."""
        return type(self).model_validate({**self.model_dump(), **changes})


class RunSection(Section):
    name: str = Field("run", description="name of the run; the run directory is `<output_dir>/<name>-<time>`")
    output_dir: str = Field("runs", description="where new run directories are created")
    seed: int = Field(0, description="seeds the partition, the initial adapter, client sampling and batches")
    rounds: int = Field(5, ge=1, description="federated rounds")
    export_merged: bool = Field(False, description="also export the base model with the adapter merged in")


class ModelSection(Section):
    name: str = Field(
        "all-MiniLM-L6-v2",
        description="an embedded model, a fetched one (`fedpeft models`), a model directory, a .gguf file "
        "or a hub id",
    )
    max_length: int = Field(64, ge=1, description="inputs are truncated to this many tokens")
    task: Literal["classification", "causal_lm"] = Field(
        "classification", description="sequence classification or causal language modelling"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="the frozen base's dtype (causal LMs): `auto` is bfloat16 on a GPU that supports "
        "it, else float32; the LoRA factors, the merged delta and the head stay float32",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="load the frozen base quantized by bitsandbytes (causal LMs, CUDA only): `4bit` is "
        "QLoRA's NF4 with double quantization and bfloat16 compute, `8bit` LLM.int8()",
    )

    @model_validator(mode="after")
    def _quantized_lm_only(self) -> ModelSection:
        if self.quantization != "none" and self.task != "causal_lm":
            raise ValueError(
                f"model.quantization = {self.quantization!r} applies to causal LMs only; set "
                'model.task = "causal_lm" or model.quantization = "none"'
            )
        return self


class LoraSection(Section):
    rank: int = Field(
        8,
        ge=1,
        description="the LoRA rank r of every client (unless `client_ranks`); the global adapter's under "
        "hetlora and flexlora",
    )
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA path")
    target_modules: list[str] | None = Field(
        None, description="the modules to adapt (peft's default for the architecture when unset)"
    )
    client_ranks: list[int] | None = Field(
        None, description="per-client ranks, cycled over clients (e.g. `[4, 8, 16]`), for `stacking`"
    )
    init: Literal["shared", "per_client"] = Field(
        "shared",
        description="`shared`: every client starts from one seeded adapter; `per_client`: each draws its "
        "first adapter from a seed of its own (the setting `vcma` is for)",
    )

    @field_validator("client_ranks")
    @classmethod
    def _mixed_positive_ranks(cls, ranks: list[int] | None) -> list[int] | None:
        if ranks is None:
            return ranks
        if not all(r >= 1 for r in ranks):
            raise ValueError("lora.client_ranks must be a list of positive integers, e.g. [4, 8, 16]")
        if len(set(ranks)) < 2:
            raise ValueError(
                "lora.client_ranks must mix at least two ranks; for one rank on every client set lora.rank"
            )
        return ranks


class DataSection(Section):
    source: str = Field("demo", description="`demo` (generated), a file, or a glob of one file per client")
    test_source: str | None = Field(None, description="the held-out file the server evaluates on")
    text_field: str = Field("text", description="the field holding the text (classification)")
    label_field: str = Field("label", description="the field holding the label (classification)")
    columns: list[str] | None = Field(None, description="column names of a CSV/TSV file without a header")
    labels: list[str] | None = Field(
        None, description="the label names (default: the sorted labels of the training data)"
    )
    num_clients: int = Field(8, ge=1, description="clients in the federation")
    partition: Literal["iid", "dirichlet", "field", "files"] = Field(
        "iid", description="how the training data is split into clients (flwr-datasets partitioners)"
    )
    partition_field: str | None = Field(
        None,
        description="`field`: the field whose values are dealt to clients; `dirichlet`: the field split over",
    )
    instruction_field: str | None = Field(
        None, description="causal LM data: the instruction field (detected)"
    )
    input_field: str | None = Field(None, description="causal LM data: the optional input field (detected)")
    response_field: str | None = Field(None, description="causal LM data: the response field (detected)")
    dirichlet_alpha: float = Field(0.5, gt=0, description="concentration of the Dirichlet label split")
    min_partition_size: int = Field(
        10, ge=0, description="redraw the Dirichlet split until every client has this many rows"
    )
    demo_train_size: int = Field(2000, ge=1, description="rows of generated training data")
    demo_test_size: int = Field(400, ge=1, description="rows of generated held-out data")
    test_limit: int | None = Field(
        None, ge=1, description="evaluate each round on at most this many held-out rows"
    )
    client_eval_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of each client's rows it holds out (seeded) to evaluate, each round, the model "
        "it starts from (its personal one under fedsa); logged per client and as their mean, "
        "`client_eval_accuracy`",
    )


class TrainSection(Section):
    local_steps: int = Field(10, ge=1, description="AdamW steps each client takes per round")
    batch_size: int = Field(16, ge=1, description="rows per step")
    lr: float = Field(5e-4, gt=0, description="the clients' learning rate")
    lr_decay: float = Field(1.0, gt=0, le=1, description="round r trains at `lr` x `lr_decay`^(r-1)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    proximal_mu: float = Field(
        0.0, ge=0, description="FedProx: mu/2 ‖w - w_global‖² on the trainable tensors"
    )
    label_skew: Literal["none", "fedlc", "balanced_softmax"] = Field(
        "none", description="a client-side logit adjustment against label skew (classification only)"
    )
    label_skew_tau: float = Field(1.0, gt=0, description="tau of the label-skew adjustment")
    freeze_head: bool = Field(
        False,
        description="FedBABU: the dense extras (a head) stay at their shared init, neither trained nor sent "
        "(nor clipped and noised under dp); only LoRA trains",
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="a step's batch stops before its padded size (rows x its longest row) passes this "
        "many tokens, so long rows come in smaller batches; a row longer than it trains alone",
    )
    bf16_autocast: bool = Field(
        False,
        description="run the forward pass under bfloat16 autocast (a float32 base computing in bf16, as "
        "transformers' Trainer with bf16 = True); the merged delta's path stays float32",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass instead of keeping them: far less "
        "memory for long rows and large models, about a third more compute",
    )
    eval_batch_size: int = Field(64, ge=1, description="rows per forward pass when evaluating")
    compression: Literal["none", "fp16", "int8"] = Field(
        "none",
        description="how clients send their factors and dense extras (a head): fp32, half precision, or int8 "
        "with error feedback",
    )

    def round_lr(self, rnd: int) -> float:
        """The local learning rate of round ``rnd`` (from 1)."""
        return self.lr * self.lr_decay ** (rnd - 1)


class ExampleDPSection(Section):
    """Example-level differential privacy: DP-SGD on every client (fedpeft/dp_sgd.py)."""

    enabled: bool = Field(False, description="train every client with DP-SGD")
    noise_multiplier: float = Field(1.0, gt=0, description="z: noise std over the clipping norm")
    max_grad_norm: float = Field(1.0, gt=0, description="C, the L2 bound on each example's gradient")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of each client's (ε, δ)")
    epsilon_budget: float | None = Field(
        None, gt=0, description="a client refuses a round that would take its ε above this"
    )


class EvalSection(Section):
    """Central evaluation of causal LMs beyond held-out loss: greedy generation + exact match."""

    generate: bool = Field(False, description="greedy generation on the held-out rows, scored by exact match")
    max_new_tokens: int = Field(256, ge=1, description="tokens generated per row")
    extractor: str = Field("gsm8k", description="how the answer is read from a generation")


class ServerSection(Section):
    fraction: float = Field(0.5, gt=0, le=1, description="share of the connected clients sampled per round")
    min_clients: int = Field(2, ge=1, description="sample at least this many (and wait for them to connect)")
    min_replies: int | None = Field(
        None,
        description="valid replies a round needs (default `min_clients`); 0: a round with none passes "
        "without an update (clients that are only sometimes available)",
    )
    round_timeout: float = Field(600.0, gt=0, description="seconds a round waits for replies")
    connect_timeout: float = Field(
        120.0, gt=0, description="seconds a round waits for `min_clients` clients to connect and identify"
    )
    max_retries: int = Field(2, ge=0, description="attempts at a round beyond the first")
    evaluate: bool = Field(True, description="evaluate the global state on the held-out data each round")
    max_reply_bytes: int = Field(
        0, description="refuse larger replies before decoding; 0: twice the adapter's size plus 1 MiB"
    )
    max_norm_ratio: float = Field(
        10.0, description="refuse an update longer than this times its peers' median; 0: no norm check"
    )
    secure_aggregation: bool = Field(
        False, description="the server learns only the sum of each round's updates"
    )

    @field_validator("max_reply_bytes")
    @classmethod
    def _byte_count(cls, value: int) -> int:
        if value < 0:
            raise ValueError(
                "server.max_reply_bytes must be a byte count >= 0 (0 derives the cap from the adapter's size)"
            )
        return value

    @field_validator("max_norm_ratio")
    @classmethod
    def _norm_ratio(cls, value: float) -> float:
        if value != 0 and value < 1:
            raise ValueError("server.max_norm_ratio must be 0 (no norm check) or at least 1, e.g. 10")
        return value


class SecureSection(Section):
    """Secure aggregation's parameters (used when ``server.secure_aggregation``; docs/security.md)."""

    threshold: float = Field(
        0.6, gt=0, le=1, description="fraction of an attempt's participants whose shares recover a secret"
    )
    clip_range: float = Field(8.0, gt=0, description="each value is clipped to [-clip_range, clip_range]")
    fraction_bits: int = Field(
        30, ge=8, le=48, description="fixed-point precision: values are scaled by 2^bits"
    )
    max_examples: int = Field(
        1_000_000, ge=1, description="the largest weight (example count) one client may report"
    )


class StrategySection(Section):
    name: str = Field("fedavg", description="a registered strategy, `module:Class` or `path/file.py:Class`")
    options: dict[str, Any] = Field(
        default_factory=dict, description="every other key of [strategy]: the strategy's keyword arguments"
    )


class SimulationSection(Section):
    cpus_per_client: int = Field(1, ge=1, description="CPU cores (and torch threads) per virtual client")
    gpus_per_client: float = Field(
        0.0,
        ge=0,
        description="GPUs each virtual client holds, fractions allowed (Ray's GPU resources: 0.125 runs "
        "8 clients at once on one GPU, each keeping its model there across rounds); 0: no GPU accounting",
    )
    ray_address: str | None = Field(
        None,
        description="join a running Ray cluster (`auto`, or the head's `host:port` printed by `ray start "
        "--head`) instead of starting a private one on this machine; every node needs fedpeft installed",
    )


class FaultsSection(Section):
    """Simulated client misbehaviour, for testing the server's fault handling (simulation only;
    see client/faults.py)."""

    rate: float = Field(0.0, description="each sampled client fails a round with this probability")
    kinds: list[str] = Field(
        default_factory=lambda: list(SIMULATED_FAULTS), description="how a failing client fails"
    )
    poisoned: list[int] = Field(
        default_factory=list, description="partition ids that send every update scaled by `poison_scale`"
    )
    poison_scale: float = Field(100.0, description="the factor a poisoned client scales its delta by")
    availability_beta: list[float] | None = Field(
        None,
        description="each client is available with its own probability, drawn once from Beta(a, b) "
        "(seeded by run.seed); a sampled client that is unavailable does not train that round "
        "(with server.min_replies = 0 a round every sampled client sits out passes without an update)",
    )

    @field_validator("availability_beta")
    @classmethod
    def _beta(cls, beta: list[float] | None) -> list[float] | None:
        if beta is not None and (len(beta) != 2 or min(beta) <= 0):
            raise ValueError(f"faults.availability_beta must be two positive numbers [a, b], got {beta}")
        return beta

    @field_validator("rate")
    @classmethod
    def _rate(cls, rate: float) -> float:
        if not 0 <= rate <= 1:
            raise ValueError(f"faults.rate must be in [0, 1], got {rate}")
        return rate

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, kinds: list[str]) -> list[str]:
        if not kinds or not set(kinds) <= set(SIMULATED_FAULTS):
            raise ValueError(
                f"faults.kinds must be a non-empty list of {', '.join(SIMULATED_FAULTS)}, got {kinds!r}"
            )
        return kinds

    @property
    def active(self) -> bool:
        return self.rate > 0 or bool(self.poisoned) or self.availability_beta is not None

    def refuse_deployment(self) -> None:
        """Raise if set: deployed clients are real, their faults are not simulated."""
        if self.active:
            raise ConfigError(
                "[faults] simulates misbehaving clients in `fedpeft simulate` only; remove it from a "
                "deployment's config (a deployed client can misbehave with `fedpeft client --inject-fault`)"
            )


class ClientConfig(Section):
    """The part of the run configuration every client needs; sent in each round's message."""

    seed: int
    model: ModelSection
    lora: LoraSection
    data: DataSection
    train: TrainSection
    threads: int = 1
    round_timeout: float = 600.0
    example_dp: ExampleDPSection = Field(default_factory=ExampleDPSection)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> ClientConfig:
        return cls.model_validate_json(text)


class CalibrationSection(Section):
    """Classifier calibration after the last round: CCVR (fedpeft/calibration.py)."""

    method: Literal["none", "ccvr"] = Field(
        "none",
        description="`ccvr`: after the last round every client sends per-class moments of the head's "
        "input over its rows, and the server retrains the head on virtual features drawn from them",
    )
    virtual_per_class: int = Field(2000, ge=1, description="virtual features drawn for each class")
    epochs: int = Field(10, ge=1, description="passes of the head's retraining over the virtual features")
    batch_size: int = Field(64, ge=1, description="virtual features per SGD step")
    lr: float = Field(
        0.1,
        gt=0,
        description="SGD's learning rate (momentum 0.9); 0.1 was chosen on the AG News benchmark's "
        "validation split (the reference code's is 0.001)",
    )


class TrackingSection(Section):
    tensorboard: bool = Field(
        False, description="write each round's metrics as TensorBoard scalars into `RUN_DIR/tensorboard`"
    )
    mlflow_uri: str | None = Field(
        None,
        description="log the configuration, each round's metrics and the final adapter to MLflow at this "
        "tracking URI (`local`: a SQLite store in the run directory; `sqlite:///path.db`; an MLflow server's "
        "`http://host:5000`); needs `pip install 'fedpeft[tracking]'`",
    )
    mlflow_experiment: str = Field("fedpeft", description="the MLflow experiment the run is logged under")


class RunConfig(Section):
    run: RunSection = Field(
        default_factory=RunSection, description="The run: its name, seed, length and outputs"
    )
    model: ModelSection = Field(
        default_factory=ModelSection, description="The base model every client adapts"
    )
    lora: LoraSection = Field(default_factory=LoraSection, description="The LoRA adapters the clients train")
    data: DataSection = Field(
        default_factory=DataSection, description="The data, and how simulation splits it into clients"
    )
    train: TrainSection = Field(
        default_factory=TrainSection, description="Each client's local training per round"
    )
    server: ServerSection = Field(
        default_factory=ServerSection,
        description="The server: sampling, fault tolerance, reply validation, evaluation",
    )
    eval: EvalSection = Field(
        default_factory=EvalSection, description="Generation-based evaluation of causal LMs"
    )
    strategy: StrategySection = Field(
        default_factory=StrategySection, description="The aggregation rule ([strategies.md](strategies.md))"
    )
    simulation: SimulationSection = Field(
        default_factory=SimulationSection, description="Resources of `fedpeft simulate`"
    )
    faults: FaultsSection = Field(
        default_factory=FaultsSection,
        description="Simulated client faults, for testing fault handling (simulation only)",
    )
    secure: SecureSection = Field(
        default_factory=SecureSection,
        description="Secure aggregation's parameters ([security.md](security.md))",
    )
    example_dp: ExampleDPSection = Field(
        default_factory=ExampleDPSection,
        description="Example-level differential privacy: DP-SGD on every client",
    )
    tracking: TrackingSection = Field(
        default_factory=TrackingSection, description="Experiment tracking sinks (TensorBoard, MLflow)"
    )
    calibration: CalibrationSection = Field(
        default_factory=CalibrationSection,
        description="Classifier calibration after the last round (CCVR)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        for ok, message in _cross_checks(self):
            if not ok:
                raise ValueError(message)
        if self.server.secure_aggregation:
            _check_secure(self)
        return self

    def client_config(self, **changes: Any) -> ClientConfig:
        """The clients' part of the configuration (``changes``: sections to replace in it)."""
        fields = {
            "seed": self.run.seed,
            "model": self.model,
            "lora": self.lora,
            "data": self.data,
            "train": self.train,
            "threads": self.simulation.cpus_per_client,
            "round_timeout": self.server.round_timeout,
            "example_dp": self.example_dp,
        }
        return ClientConfig(**(fields | changes))

    @property
    def clients_per_round(self) -> int:
        """How many clients the server samples each round (when all are connected)."""
        n = self.data.num_clients
        return min(n, max(self.server.min_clients, math.ceil(self.server.fraction * n)))

    @property
    def min_replies(self) -> int:
        return self.server.min_clients if self.server.min_replies is None else self.server.min_replies


def _cross_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Rules that span keys (a single key's rules live beside its field)."""
    return [
        (
            config.data.partition != "field" or bool(config.data.partition_field),
            "data.partition = 'field' needs data.partition_field, e.g. 'category'",
        ),
        (
            config.data.client_eval_fraction == 0 or config.model.task == "classification",
            "data.client_eval_fraction applies to classification only; set it to 0 for a causal LM",
        ),
        (
            config.train.label_skew == "none" or config.model.task == "classification",
            "train.label_skew applies to classification only; set it to 'none' for a causal LM",
        ),
        (
            config.server.min_clients <= config.data.num_clients,
            f"server.min_clients ({config.server.min_clients}) exceeds data.num_clients "
            f"({config.data.num_clients}); lower it or add clients",
        ),
        (
            0 <= config.min_replies <= config.server.min_clients,
            "server.min_replies must be between 0 and server.min_clients",
        ),
        (
            all(0 <= p < config.data.num_clients for p in config.faults.poisoned),
            f"faults.poisoned must list partition ids below data.num_clients "
            f"({config.data.num_clients}), got {config.faults.poisoned!r}",
        ),
        (
            config.calibration.method == "none" or config.model.task == "classification",
            "calibration.method = 'ccvr' calibrates a classifier head; set it to 'none' for a causal LM",
        ),
        (
            config.calibration.method == "none"
            or not (config.example_dp.enabled or config.server.secure_aggregation),
            "calibration.method = 'ccvr' sends each client's per-class feature moments unprotected; set it "
            "to 'none' with example_dp.enabled or server.secure_aggregation",
        ),
        (
            not config.example_dp.enabled or config.train.max_batch_tokens is None,
            "example-level DP samples Poisson batches, which a token budget would bias; unset "
            "train.max_batch_tokens with example_dp.enabled",
        ),
        (
            not config.example_dp.enabled or config.train.label_skew == "none",
            "train.label_skew computes from each client's label counts, which example-level DP protects; "
            "set train.label_skew = 'none' with example_dp.enabled",
        ),
    ]


def _check_secure(config: RunConfig) -> None:
    """What secure aggregation cannot serve, and that the sum of a round cannot overflow its ring."""
    checks = [
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
        (
            not config.faults.poisoned,
            "faults.poisoned edits plain replies, and a masked one cannot be edited; unset it or set "
            "server.secure_aggregation = false",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    secure = config.secure
    try:
        FixedPoint(secure.clip_range, secure.fraction_bits).check_capacity(
            config.clients_per_round, secure.max_examples
        )
    except RingOverflowError as exc:
        raise ValueError(
            f"secure aggregation: {exc}; lower secure.fraction_bits, secure.clip_range or secure.max_examples"
        ) from exc


# ---------------------------------------------------------------------------- loading


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
    strategy = raw.get("strategy")
    if isinstance(strategy, dict):  # [strategy]: a name, then the strategy's own options
        options = {k: v for k, v in strategy.items() if k != "name"}
        raw["strategy"] = {"name": strategy.get("name", "fedavg"), "options": options}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, raw)) from None


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


def _one_line(exc: ValidationError, raw: dict[str, Any]) -> str:
    """The first of pydantic's errors as one line that names the key and the fix."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    kind = error["type"]
    if kind == "value_error":  # a validator's own message
        return str(error["ctx"]["error"])
    if not loc:
        return str(error["msg"])
    section = loc[0]
    if kind == "extra_forbidden" and len(loc) == 1:
        return f"unknown section [{section}]; valid sections: {', '.join(RunConfig.model_fields)}"
    model = RunConfig.model_fields[section].annotation
    if len(loc) == 1:
        return f"[{section}] must be a table of keys, got {raw.get(section)!r}"
    key = f"{section}.{loc[1]}"
    fields = model.model_fields  # type: ignore[union-attr]
    if kind == "extra_forbidden":
        return f"unknown key '{key}'; valid keys in [{section}]: {', '.join(fields)}"
    field = fields[loc[1]]
    value = raw.get(section, {}).get(loc[1], error.get("input"))
    if kind == "literal_error":
        choices = typing.get_args(_without_none(field.annotation))
        return f"{key} must be one of {', '.join(choices)}, got {value!r}"
    bounds = _bounds(field)
    if bounds and kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key} must be {bounds}"
    return f"'{key}' must be {_type_name(field.annotation)}, got {value!r}"


def _without_none(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else annotation
    return annotation


def _type_name(annotation: Any) -> str:
    annotation = _without_none(annotation)
    origin = typing.get_origin(annotation)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    """A field's numeric constraint in words: 'at least 1', 'positive', 'in (0, 1]'."""
    lower = upper = None
    for rule in field.metadata:
        for name, bracket in (("ge", "["), ("gt", "(")):
            if getattr(rule, name, None) is not None:
                lower = (getattr(rule, name), bracket)
        for name, bracket in (("le", "]"), ("lt", ")")):
            if getattr(rule, name, None) is not None:
                upper = (getattr(rule, name), bracket)
    if lower and upper:
        return f"in {lower[1]}{lower[0]:g}, {upper[0]:g}{upper[1]}"
    if lower:
        if lower[1] == "(" and lower[0] == 0:
            return "positive"
        return f"at least {lower[0]:g}" if lower[1] == "[" else f"greater than {lower[0]:g}"
    if upper:
        return f"at most {upper[0]:g}" if upper[1] == "]" else f"below {upper[0]:g}"
    return ""


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """A plain-data copy (for summary.json and checkpoints)."""
    return config.model_dump()


# ---------------------------------------------------------------------------- the reference


def reference() -> str:
    """``docs/configuration.md``: every section and key with its type, default, constraint and
    description, from the models."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `fedpeft/config.py` by `python -m fedpeft.config > docs/configuration.md`;",
        "a test fails when this file is out of date. A run's configuration is a TOML file with these",
        "sections, plus `--set section.key=value` overrides on the command line. Unknown keys and wrong",
        "types are refused with one line naming the key.",
    ]
    for section, info in RunConfig.model_fields.items():
        lines += ["", f"## [{section}]", "", f"{info.description}.", ""]
        if section == "strategy":
            lines += [
                "`name` selects the rule; the other keys are its options ([strategies.md](strategies.md)).",
                "",
            ]
        lines += ["| key | type | default | constraint | description |", "|---|---|---|---|---|"]
        for key, field in info.annotation.model_fields.items():  # type: ignore[union-attr]
            if (section, key) != ("strategy", "options"):
                lines.append(_reference_row(key, field))
    return "\n".join(lines) + "\n"


def _reference_row(key: str, field: FieldInfo) -> str:
    kind = _without_none(field.annotation)
    if typing.get_origin(kind) is Literal:
        name, constraint = "str", "one of " + ", ".join(f"`{c}`" for c in typing.get_args(kind))
    else:
        name, constraint = _type_name(kind), _bounds(field)
    if kind is not field.annotation:
        name += " or none"
    default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
    return f"| `{key}` | {name} | `{_toml(default)}` | {constraint} | {field.description or ''} |"


def _toml(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    print(reference(), end="")
