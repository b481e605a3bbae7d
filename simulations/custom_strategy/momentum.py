"""Server momentum, written from docs/writing-a-strategy.md alone (built in as ``fedavgm``).

x_{t+1} = x_t + lr v_t with v_t = momentum v_{t-1} + (mean_k x_k - x_t), over every trained tensor.
"""

from __future__ import annotations

import torch

from fedpeft.state import ClientUpdate, GlobalState, split_trained, trained_tensors
from strategies import Strategy


class ServerMomentum(Strategy):
    name = "server_momentum"

    def __init__(self, momentum: float = 0.9, server_lr: float = 1.0) -> None:
        self.momentum, self.server_lr = momentum, server_lr
        self.velocity: dict[str, torch.Tensor] = {}

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        if state.adapter is None:
            raise ValueError("server_momentum needs a global adapter (lora.init = 'shared', one rank)")
        current = trained_tensors(state.adapter, state.extras, trains_A=True)
        sent = [trained_tensors(u.factors, u.extras, trains_A=True) for u in updates]
        total = sum(u.num_examples for u in updates)
        stepped = {}
        for key, x in current.items():
            mean = sum(u.num_examples / total * s[key] for u, s in zip(updates, sent, strict=True))
            v = self.momentum * self.velocity.get(key, torch.zeros_like(x)) + (mean - x)
            self.velocity[key] = v
            stepped[key] = x + self.server_lr * v
        factors, extras = split_trained(stepped, state.adapter)
        return GlobalState(round=rnd, merged=state.merged, adapter=factors, extras=extras)

    def state_dict(self) -> dict:
        return {"velocity": {key: v.clone() for key, v in self.velocity.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.velocity = {key: v.clone() for key, v in state["velocity"].items()}
