"""FFA-LoRA: A frozen at the shared seeded init, only B trained, sent and averaged.

Exact, since sum_k p_k s B_k A = s (sum_k p_k B_k) A; half the upload bytes of FedAvg; and linear
in the updates, which makes it the right inner strategy under DP (noise lands on B only).
"""

from __future__ import annotations

from fedpeft.state import AdapterFactors, ClientPlan, ClientUpdate, GlobalState
from strategies.base import StatelessStrategy, example_weights, require_updates, weighted_sum
from strategies.fedavg import check_same_ranks


class FFA(StatelessStrategy):
    name = "ffa"
    linear = True

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        return ClientPlan(train_lora_A=False, send_lora_A=False)

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        check_same_ranks(self.name, updates)
        if state.adapter is None:
            raise ValueError(
                "ffa needs the shared initial adapter; it cannot run with lora.client_ranks mixed"
            )
        p = example_weights(updates)
        adapter = {
            module: AdapterFactors(
                A=frozen.A, B=weighted_sum((u.factors[module].B for u in updates), p), scale=frozen.scale
            )
            for module, frozen in state.adapter.items()
        }
        extras = {name: weighted_sum((u.extras[name] for u in updates), p) for name in updates[0].extras}
        return GlobalState(round=rnd, merged=state.merged, adapter=adapter, extras=extras)
