"""The node settings a deployed client's SuperNode carries (``flower-supernode --node-config``).

Kept free of heavy imports: ``fedpeft client`` reads them before any model code loads.
"""

DATA_PATH = "data-path"  # this client's own training file
CLIENT_ID = "client-id"  # its name in the server's logs and metrics
RANK = "rank"  # its LoRA rank
INJECT_FAULT = "inject-fault"  # misbehave on purpose (client/faults.py)
FAULT_KINDS = ("nan", "wrong-shape")
STATE_DIR = "state-dir"  # where it keeps what it carries between rounds (client/node_state.py)
