"""A client's personal LoRA B, and with it optionally its dense extras such as a classifier head
(FedSA-LoRA, ``ClientPlan.personal_B`` / ``personal_extras``): kept in the node's Flower
``Context.state`` between rounds, put in place of the global ones after the global state is
loaded."""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict

from fedpeft.lora import AdapterHost, load_adapter
from fedpeft.wire import pack_tensors, unpack_tensors

PERSONAL_B, PERSONAL_EXTRAS = "personal-B", "personal-extras"


def restore(host: AdapterHost, node_state: RecordDict, extras: bool = False) -> None:
    """Put this client's personal B (and with ``extras`` its personal extras), from an earlier
    round, in place of the global ones; nothing on its first participation (the global ones are
    its start)."""
    record = node_state.get(PERSONAL_B)
    if not isinstance(record, ArrayRecord):
        return
    personal = unpack_tensors(record, writable=True)
    factors, global_extras = host.read_update()
    for module, f in factors.items():
        f.B = personal[module]
    kept = node_state.get(PERSONAL_EXTRAS)
    if extras and isinstance(kept, ArrayRecord):
        global_extras = unpack_tensors(kept, writable=True)
    load_adapter(host.model, factors, global_extras)


def keep(host: AdapterHost, node_state: RecordDict, extras: bool = False) -> None:
    """Store the B (and with ``extras`` the extras) this client just trained, for its next round."""
    factors, trained_extras = host.read_update()
    node_state[PERSONAL_B] = pack_tensors({m: f.B for m, f in factors.items()})
    if extras:
        node_state[PERSONAL_EXTRAS] = pack_tensors(trained_extras)
