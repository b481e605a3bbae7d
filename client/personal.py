"""A client's personal LoRA B, and with it optionally its dense extras such as a classifier head
(FedSA-LoRA, ``ClientPlan.personal_B`` / ``personal_extras``): kept in the node's Flower
``Context.state`` between rounds, put in place of the global ones after the global state is
loaded."""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict

from fedpeft.lora import AdapterHost, load_adapter
from fedpeft.wire import decode_arrays, to_array

PERSONAL_B, PERSONAL_EXTRAS = "personal-B", "personal-extras"


def restore(host: AdapterHost, node_state: RecordDict, extras: bool = False) -> None:
    """Put this client's personal B (and with ``extras`` its personal extras), from an earlier
    round, in place of the global ones; nothing on its first participation (the global ones are
    its start)."""
    record = node_state.get(PERSONAL_B)
    if not isinstance(record, ArrayRecord):
        return
    personal = decode_arrays(record)
    factors, global_extras = host.read_update()
    for module, f in factors.items():
        f.B = personal[module]
    kept = node_state.get(PERSONAL_EXTRAS)
    if extras and isinstance(kept, ArrayRecord):
        global_extras = decode_arrays(kept)
    load_adapter(host.model, factors, global_extras)


def keep(host: AdapterHost, node_state: RecordDict, extras: bool = False) -> None:
    """Store the B (and with ``extras`` the extras) this client just trained, for its next round."""
    factors, trained_extras = host.read_update()
    node_state[PERSONAL_B] = ArrayRecord(
        array_dict={m: to_array(f.B.detach().clone()) for m, f in factors.items()}
    )
    if extras:
        node_state[PERSONAL_EXTRAS] = ArrayRecord(
            array_dict={k: to_array(t.detach().clone()) for k, t in trained_extras.items()}
        )
