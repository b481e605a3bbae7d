"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025): A is shared, B is personal.

Every client trains A and B; only A travels and is averaged as fedavg averages it, while each
client keeps its own B across rounds (``ClientPlan.personal_B``: the client stores it in its Flower
``Context.state`` and puts it back after loading the global state; a client's first round starts
from the global B, the initial zeros). With ``personal_head`` (the default) the dense extras, such
as a classifier head, stay on each client the same way, as in the authors' GLUE configuration
(``Pengxin-Guo/FedSA-LoRA``, ``fedsa-lora.yaml``: ``local_param: ['lora_B', 'classifier']``);
without it they are averaged with A. The paper's finding is that A learns what is common to the
clients and B what is specific to each, so each client's model is the global A with its own B
(and head): evaluate it per client (``data.client_eval_fraction``). The authors' aggregator weighs
each client by the examples it trained on that round (``sample_size``), our ``weighting = "steps"``;
the default here is ``examples``, as for every weighted rule.

The global adapter keeps the initial B (and head); the exported adapter is therefore the shared A
with those: the product of a fedsa run is the per-client models. Secure aggregation refuses it (a
masked summand carries every trained tensor).
"""

from __future__ import annotations

import torch

from fedpeft.state import AdapterFactors, ClientPlan, ClientUpdate, GlobalState
from strategies.base import Accumulator, ForwardsProbes
from strategies.fedavg import FedAvg


class FedSA(FedAvg):
    """fedavg over A (and the extras without ``personal_head``); B (and the head) stay on each
    client."""

    name = "fedsa"

    def __init__(self, weighting: str = "examples", personal_head: bool = True) -> None:
        super().__init__(weighting)
        self.personal_head = personal_head

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        return ClientPlan(personal_B=True, personal_extras=self.personal_head, weighting=self.weighting)

    def start(self, rnd: int, state: GlobalState) -> SharedA:
        return SharedA(super().start(rnd, state), state, self.personal_head)


class SharedA(ForwardsProbes):
    """fedavg's fold, whose result keeps the global B the round started with (zeros before any),
    and with ``keep_extras`` its extras."""

    def __init__(self, inner: Accumulator, state: GlobalState, keep_extras: bool) -> None:
        self.inner, self.state, self.keep_extras = inner, state, keep_extras

    def add(self, update: ClientUpdate) -> None:
        self.inner.add(update)

    def result(self) -> GlobalState:
        out = self.inner.result()
        assert out.adapter is not None
        kept = self.state.adapter or {}
        out.adapter = {
            module: AdapterFactors(
                A=f.A, B=kept[module].B if module in kept else torch.zeros_like(f.B), scale=f.scale
            )
            for module, f in out.adapter.items()
        }
        if self.keep_extras and self.state.extras:
            out.extras = self.state.extras
        return out
