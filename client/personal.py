"""A client's personal LoRA B (FedSA-LoRA, ``ClientPlan.personal_B``): kept in the node's Flower
``Context.state`` between rounds, put in place of the global B after the global state is loaded."""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict

from fedpeft.lora import AdapterHost, load_adapter
from fedpeft.wire import decode_arrays, to_array

PERSONAL_B = "personal-B"


def restore(host: AdapterHost, node_state: RecordDict) -> None:
    """Put this client's personal B (from an earlier round) in place of the global one, if it has one."""
    record = node_state.get(PERSONAL_B)
    if not isinstance(record, ArrayRecord):
        return  # first participation: the global B is the start
    personal = decode_arrays(record)
    factors, extras = host.read_update()
    for module, f in factors.items():
        f.B = personal[module]
    load_adapter(host.model, factors, extras)


def keep(host: AdapterHost, node_state: RecordDict) -> None:
    """Store the B this client just trained, for its next round."""
    factors, _ = host.read_update()
    node_state[PERSONAL_B] = ArrayRecord(
        array_dict={m: to_array(f.B.detach().clone()) for m, f in factors.items()}
    )
