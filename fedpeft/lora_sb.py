"""LoRA-SB's trained core on peft's LoRA layers (Fed-SB, ``strategies/fedsb.py``).

LoRA-SB (Ponkshe et al. 2024) adapts W = W0 + s B R A with B and A frozen and only the r x r
matrix R trained. peft has no such layer, so the core is attached here by hand (no library offers
it): a parameter ``fedsb_core`` on the LoRA layer, and a forward pre-hook on its ``lora_B`` that
maps lora_A's output h to R h, so peft's own forward computes s B (R (A x)).
``fedpeft.lora.extract_adapter`` reads the core from here, not from peft's adapter state dict.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from fedpeft.state import AdapterFactors

CORE = "fedsb_core"
SKETCHES = ("range", "project")
_HOOK = "_fedsb_core_hook"


def set_core(layer: LoraLayer, adapter: str, core: Tensor | None) -> None:
    """Give ``layer`` the core ``core`` (trainable), or remove any core with None."""
    if core is None:
        if hasattr(layer, CORE):
            getattr(layer, _HOOK).remove()
            delattr(layer, _HOOK)
            delattr(layer, CORE)
        return
    rank = layer.r[adapter]
    if tuple(core.shape) != (rank, rank):
        raise ValueError(f"a LoRA-SB core must be {rank} x {rank}, got {tuple(core.shape)}")
    weight = layer.lora_B[adapter].weight
    if hasattr(layer, CORE):
        with torch.no_grad():
            getattr(layer, CORE).copy_(core)
        return
    layer.register_parameter(CORE, nn.Parameter(core.detach().to(weight.device, weight.dtype).clone()))
    hook = layer.lora_B[adapter].register_forward_pre_hook(partial(_through_core, layer))
    setattr(layer, _HOOK, hook)


def get_core(layer: LoraLayer) -> Tensor | None:
    """A detached copy of ``layer``'s core, None without one."""
    core = getattr(layer, CORE, None)
    return None if core is None else core.detach().cpu().clone()


def _through_core(layer: LoraLayer, module: nn.Module, args: tuple) -> tuple:
    return (F.linear(args[0], getattr(layer, CORE)), *args[1:])


def gradient_sketch(
    factors: dict[str, AdapterFactors], gradients: dict[str, Tensor], mode: str
) -> dict[str, AdapterFactors]:
    """Fed-SB's initialisation sketches of each module's gradient G (d_out x d_in): ``range``
    replaces B by G Aᵀ (A: the shared seeded init), ``project`` replaces A by Bᵀ G (B: the
    orthonormal basis the server found from the range sketches)."""
    if mode not in SKETCHES:
        raise ValueError(f"unknown gradient sketch {mode!r}; one of {', '.join(SKETCHES)}")
    out = {}
    for name, f in factors.items():
        g = gradients[name].to(f.A.dtype)
        if mode == "range":
            out[name] = AdapterFactors(A=f.A, B=g @ f.A.T, scale=f.scale)
        else:
            out[name] = AdapterFactors(A=f.B.T @ g, B=f.B, scale=f.scale)
    return out


def first_step_frame(gradients: dict[str, Tensor], rank: int) -> dict[str, tuple[Tensor, Tensor]]:
    """LoRA-SB's frame (A, B) per module from its loss gradient G (d_out x d_in): the top-``rank``
    right and left singular vectors of the first full fine-tuning step's estimate -sign(G) (Adam's
    first step, up to the lr), A = V_rᵀ and B = U_r, as the paper initialises B and A."""
    frame = {}
    for name, g in gradients.items():
        U, _, Vh = torch.linalg.svd(-torch.sign(g.double()), full_matrices=False)
        frame[name] = (Vh[:rank].float().contiguous(), U[:, :rank].float().contiguous())
    return frame
