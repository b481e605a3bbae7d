"""FFA-LoRA: A frozen at the shared seeded init, only B trained, sent and averaged.

Exact, since sum_k p_k s B_k A = s (sum_k p_k B_k) A; half the upload bytes of FedAvg; and linear
in the updates, which makes it the right inner strategy under DP (noise lands on B only).
"""

from __future__ import annotations

from fedpeft.state import ClientPlan, ClientUpdate, GlobalState
from strategies.base import WeightedStrategy, aggregate_stream, require_updates
from strategies.fedavg import FactorAverage
from strategies.registry import StrategyError


class FFA(WeightedStrategy):
    name = "ffa"
    linear = True

    def client_instructions(self, rnd: int, state: GlobalState) -> ClientPlan:
        return ClientPlan(train_lora_A=False, send_lora_A=False, weighting=self.weighting)

    def start(self, rnd: int, state: GlobalState) -> FactorAverage:
        if state.adapter is None:
            raise StrategyError(
                "ffa needs the shared initial adapter; it cannot run with lora.client_ranks mixed "
                "or lora.init = 'per_client'"
            )
        return FactorAverage(self.name, rnd, state, self.weighting, frozen=state.adapter)

    def aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        require_updates(self.name, updates)
        return aggregate_stream(self, rnd, state, updates)
