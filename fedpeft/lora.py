"""LoRA factors <-> peft models, and the frozen low-rank ``merged`` delta on base weights.

Names: a module is named as in the base model (``bert.encoder.layer.0.attention.self.query``),
a dense extra as its parameter in the base model (``classifier.weight``). Extraction and loading go
through peft's own ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``.
"""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import Tensor

from fedpeft.lora_sb import CORE, get_core, set_core
from fedpeft.state import AdapterFactors, GlobalState, LowRankDelta

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The model's LoRA-wrapped modules, by base-model name."""
    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def extract_adapter(model: PeftModel) -> tuple[dict[str, AdapterFactors], dict[str, Tensor]]:
    """Copy out the per-module factors (with their scales) and the dense trainable extras."""
    layers = lora_layers(model)
    factors: dict[str, AdapterFactors] = {}
    extras: dict[str, Tensor] = {}
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    for key, value in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(f".{CORE}"):
            continue  # a LoRA-SB core: read from its layer below
        tensor = value.detach().cpu().clone()
        if name.endswith(_A_SUFFIX):
            module = name.removesuffix(_A_SUFFIX)
            factors.setdefault(module, AdapterFactors(A=tensor, B=None, scale=0.0))  # type: ignore[arg-type]
            factors[module].A = tensor
        elif name.endswith(_B_SUFFIX):
            module = name.removesuffix(_B_SUFFIX)
            factors.setdefault(module, AdapterFactors(A=None, B=tensor, scale=0.0))  # type: ignore[arg-type]
            factors[module].B = tensor
        else:
            extras[name] = tensor
    for module, f in factors.items():
        f.scale = float(layers[module].scaling[ADAPTER])
        f.R = get_core(layers[module])
    return factors, extras


def load_adapter(model: PeftModel, factors: dict[str, AdapterFactors], extras: dict[str, Tensor]) -> None:
    """Write factors and extras into the model (ranks must match the model's adapter); a module
    gets a LoRA-SB core where its factors have one, and loses any it had where they have none."""
    layers = lora_layers(model)
    state: dict[str, Tensor] = {}
    for module, layer in layers.items():
        f = factors.get(module)
        set_core(layer, ADAPTER, f.R if f is not None else None)
    for module, f in factors.items():
        if module not in layers:
            raise KeyError(f"the model has no LoRA module {module!r}")
        expected = layers[module].r[ADAPTER]
        if f.rank != expected:
            raise ValueError(
                f"rank mismatch on {module}: factors have rank {f.rank}, the model's adapter {expected}"
            )
        state[f"{PEFT_PREFIX}{module}{_A_SUFFIX}"] = f.A
        state[f"{PEFT_PREFIX}{module}{_B_SUFFIX}"] = f.B
        layers[module].scaling[ADAPTER] = f.scale
    for name, tensor in extras.items():
        state[f"{PEFT_PREFIX}{name}"] = tensor
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = [k for k in result.unexpected_keys if ADAPTER in k or "lora_" in k]
    if unexpected:
        raise KeyError(f"tensors not in the model: {unexpected[:3]}")


def fresh_init(model: PeftModel, seed: int) -> None:
    """Re-initialise every LoRA module as peft does (A random, B zero), reproducibly from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, layer in sorted(lora_layers(model).items()):
            layer.reset_lora_parameters(ADAPTER, init_lora_weights=True)


def delta_in_weight_layout(layer: LoraLayer, delta: Tensor) -> Tensor:
    """Orient a (d_out x d_in) delta like the base weight: transposed for GPT-2 ``Conv1D``."""
    return delta.T if layer.fan_in_fan_out else delta


class FrozenDeltaPath:
    """One module's frozen ``merged`` delta U V, applied beside its base layer in float32:
    y = base(x) + (x V^T) U^T.

    The delta is never added into the base weight: on a bf16 base a LoRA-sized delta loses most of
    its entries to rounding (rms 1e-4 on weights of rms 0.02: a third of them), and a 4-bit base
    cannot take one at all. Hand-written: peft has no frozen low-rank path of a varying rank (a
    second peft adapter would have to be rebuilt whenever the merged rank changes, and would leak
    into the exported adapter).
    """

    def __init__(self, layer: LoraLayer, delta: LowRankDelta) -> None:
        base = layer.get_base_layer()
        device = base.weight.device
        self.U = delta.U.detach().to(device, torch.float32)
        self.V = delta.V.detach().to(device, torch.float32)
        self._handle = base.register_forward_hook(self._add)

    def delta(self) -> Tensor:
        """U V (d_out x d_in), float32."""
        return self.U @ self.V

    def remove(self) -> None:
        self._handle.remove()

    def _add(self, _module: torch.nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = args[0]
        with torch.autocast(x.device.type, enabled=False):  # float32 even under bf16 autocast
            path = (x.to(torch.float32) @ self.V.T) @ self.U.T
        return output + path.to(output.dtype)


class AdapterHost:
    """A peft model whose effective weights are set from a ``GlobalState`` each round.

    The base weights W0 are never written: the round's ``merged`` delta runs as a frozen float32
    path beside each base layer (``FrozenDeltaPath``), the trainable adapter as peft's LoRA, so the
    effective weight W0 + U V + s B A is exact to float32 whatever the base's dtype (bf16, 4-bit).
    """

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.layers = lora_layers(model)
        self._initial_extras = extract_adapter(model)[1]
        self._scales = {name: float(layer.scaling[ADAPTER]) for name, layer in self.layers.items()}
        self.merged_paths: dict[str, FrozenDeltaPath] = {}

    def load_state(self, state: GlobalState, init_seed: int) -> dict[str, AdapterFactors] | None:
        """Set the merged paths, then the trainable adapter (or a seeded fresh one) and the extras.

        A global adapter of a larger rank than this model's is truncated to its leading
        components (``AdapterFactors.truncated``, for the strategies that allow mixed ranks).
        Returns the adapter loaded (None for a fresh one): what the client's update is relative to.
        """
        self._set_merged(state.merged)
        extras = state.extras or self._initial_extras
        if state.adapter is None:
            fresh_init(self.model, init_seed)
            load_adapter(self.model, {}, extras)
            return None
        adapter = {name: self._own_rank(name, f) for name, f in state.adapter.items()}
        load_adapter(self.model, adapter, extras)
        return adapter

    def _own_rank(self, name: str, factors: AdapterFactors) -> AdapterFactors:
        own = self.layers[name].r[ADAPTER] if name in self.layers else factors.rank
        if factors.rank < own:
            raise ValueError(
                f"this client's LoRA rank {own} exceeds the global adapter's {factors.rank}; set its "
                f"rank (lora.client_ranks, or the node's rank setting) to at most {factors.rank}"
            )
        return factors.truncated(own, self._scales[name]) if factors.rank > own else factors

    def base_weights(self) -> dict[str, Tensor]:
        """Each adapted module's base weight parameter W0, in the model's layout."""
        return {name: layer.get_base_layer().weight for name, layer in self.layers.items()}

    def read_update(self) -> tuple[dict[str, AdapterFactors], dict[str, Tensor]]:
        return extract_adapter(self.model)

    def _set_merged(self, merged: dict[str, LowRankDelta]) -> None:
        unknown = set(merged) - set(self.layers)
        if unknown:
            raise KeyError(f"merged delta names modules the model lacks: {sorted(unknown)[:3]}")
        for path in self.merged_paths.values():
            path.remove()
        self.merged_paths = {name: FrozenDeltaPath(self.layers[name], d) for name, d in merged.items()}
