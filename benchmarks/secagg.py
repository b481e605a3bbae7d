"""Secure aggregation's cost per stage and its precision, against plain FedAvg in the same run.

    nice -n 10 .venv/bin/python benchmarks/secagg.py [--clients 5 10 20] [--shapes minilm-l6 smollm2-135m]
        [--out benchmarks/results/secagg.json]

The real server (``server.secure.SecureAggregation``) and the real client code
(``client.secure``) run in one process over an in-process grid; training is replaced by a
synthetic update (the global adapter plus N(0, 0.01) noise, example counts 50..500), so the
figures are the protocol's own cost. Each cell runs one attempt with every client replying and
one where one client drops after masking (its pairwise masks are then recovered from shares);
with a dropout the train stage's server time includes waiting ``round_timeout`` (0.1 s here) for
the missing reply.

Per stage: bytes down (server -> clients, summed over clients) and up, seconds spent in the
clients' handlers (summed over clients: one client's share is that / K) and on the server (the
stage's wall time minus the clients' time). ``plain`` is the same updates through plain FedAvg:
float32 reply bytes and the server's aggregation time. ``max_abs_error`` is the largest
difference between the securely aggregated adapter (float32, like every aggregate) and the
float64 weighted mean; ``plain_max_abs_error`` the same for plain FedAvg, for comparison (both
are dominated by float32 rounding; ``quantization_bound`` is the ring's own share, 2^-31).

Adapter shapes (synthetic): MiniLM-L6 as in the quickstart (6 layers, query/value 384x384, r = 8,
plus a 4-class head) and SmolLM2-135M (30 layers, q/o 576x576, k/v 192x576, r = 8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from common import REPO, code_version, machine
from flwr.app import Context, Message

from client import secure as client_secure
from fedpeft.config import load_config
from fedpeft.state import AdapterFactors, ClientPlan, ClientUpdate, GlobalState
from fedpeft.wire import RoundInstructions, decode_state, encode_train_message, encode_update
from server.secure import SecureAggregation
from strategies import FedAvg

sys.path.insert(0, str(REPO))  # tests/ is not an installed package
from fedpeft.testing import LocalGrid  # noqa: E402

SHAPES = {
    "minilm-l6": (
        6,
        {"query": (384, 384), "value": (384, 384)},
        {"classifier.weight": (4, 384), "classifier.bias": (4,)},
    ),
    "smollm2-135m": (
        30,
        {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)},
        {},
    ),
}
RANK = 8
DROPOUT_WAIT = 0.1  # round_timeout: how long the train stage waits for the client that dropped


def global_state(shape: str) -> GlobalState:
    layers, modules, extras = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    adapter = {
        f"layers.{i}.{name}": AdapterFactors(
            A=torch.randn(RANK, d_in, generator=g) / d_in**0.5, B=torch.zeros(d_out, RANK), scale=2.0
        )
        for i in range(layers)
        for name, (d_out, d_in) in modules.items()
    }
    return GlobalState(
        round=0, adapter=adapter, extras={k: torch.randn(s, generator=g) * 0.02 for k, s in extras.items()}
    )


class TimedGrid(LocalGrid):
    """The test suite's in-process grid, with synthetic training in place of the real one (the
    clients in ``drop`` never send their masked vector) and the time spent in each client stage
    summed per message type."""

    def __init__(self, nodes: list[int], updates: dict[int, ClientUpdate], drop: set[int]) -> None:
        self.updates, self.drop = updates, drop
        super().__init__(len(nodes), {i: self.train for i in range(len(nodes))}, node_ids=nodes)
        self.client_seconds: dict[str, float] = defaultdict(float)

    def train(self, msg: Message, context: Context) -> Message | None:
        node = msg.metadata.dst_node_id
        received = decode_state(msg.content)
        masked = client_secure.masked_reply(msg.content, self.updates[node], received, True, context)
        return None if node in self.drop else Message(masked, reply_to=msg)

    def _handle(self, msg: Message) -> Message | None:
        started = time.perf_counter()
        reply = super()._handle(msg)
        stage = msg.metadata.message_type.removeprefix("query.secagg_")
        self.client_seconds[stage] += time.perf_counter() - started
        return reply


def synthetic_updates(state: GlobalState, nodes: list[int]) -> dict[int, ClientUpdate]:
    g = torch.Generator().manual_seed(1)
    updates = {}
    for node in nodes:
        factors = {
            m: AdapterFactors(
                A=f.A + 0.01 * torch.randn(f.A.shape, generator=g),
                B=f.B + 0.01 * torch.randn(f.B.shape, generator=g),
                scale=f.scale,
            )
            for m, f in state.adapter.items()
        }
        extras = {k: t + 0.01 * torch.randn(t.shape, generator=g) for k, t in state.extras.items()}
        examples = int(torch.randint(50, 501, (1,), generator=g))
        updates[node] = ClientUpdate(
            factors, extras, examples, round=1, rank=RANK, alpha=16.0, metrics={"train_loss": 1.0}
        )
    return updates


def exact_mean(updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
    total = sum(u.num_examples for u in updates)
    out: dict[str, np.ndarray] = {}
    for u in updates:
        tensors = {f"{p}/{m}": getattr(f, p) for m, f in u.factors.items() for p in ("A", "B")}
        tensors |= {f"extra/{k}": t for k, t in u.extras.items()}
        for key, t in tensors.items():
            out[key] = out.get(key, 0) + t.double().numpy() * (u.num_examples / total)
    return out


def max_abs_error(state: GlobalState, mean: dict[str, np.ndarray]) -> float:
    errors = [
        np.abs(getattr(f, p).double().numpy() - mean[f"{p}/{m}"]).max()
        for m, f in state.adapter.items()
        for p in ("A", "B")
    ]
    errors += [np.abs(t.double().numpy() - mean[f"extra/{k}"]).max() for k, t in state.extras.items()]
    return float(max(errors))


def cell(shape: str, clients: int, dropouts: int) -> dict:
    config = load_config(
        None,
        [
            "server.secure_aggregation=true",
            f"data.num_clients={clients}",
            f"server.min_clients={clients}",
            "server.fraction=1.0",
            f"server.round_timeout={DROPOUT_WAIT}",
        ],
    )
    state = global_state(shape)
    nodes = [1000 + 7 * i for i in range(clients)]
    updates = synthetic_updates(state, nodes)
    drop = set(nodes[:dropouts])
    grid = TimedGrid(nodes, updates, drop)
    secure = SecureAggregation(config, FedAvg())
    content = encode_train_message(state, RoundInstructions(1, 0, ClientPlan(), config.client_config()))
    started = time.perf_counter()
    attempt = secure.attempt(grid, 1, nodes, content, state, ClientPlan())
    result = attempt.replies.aggregate()
    total_seconds = time.perf_counter() - started
    assert attempt.replies.count == clients - dropouts, attempt.dropped
    survivors = [updates[n] for n in nodes if n not in drop]
    stages = {}
    for name, cost in attempt.stages.items():
        client_seconds = grid.client_seconds.get(name, 0.0)
        stages[name] = {
            "bytes_down": int(cost["bytes_down"]),
            "bytes_up": int(cost["bytes_up"]),
            "client_seconds_total": round(client_seconds, 4),
            "server_seconds": round(cost["seconds"] - client_seconds, 4),
        }
    replies = [encode_update(u) for u in survivors]
    plain_started = time.perf_counter()
    plain = FedAvg().aggregate(1, state, survivors)
    plain_seconds = time.perf_counter() - plain_started
    return {
        "shape": shape,
        "clients": clients,
        "dropouts": dropouts,
        "values_per_client": sum(
            t.numel() for u in survivors[:1] for f in u.factors.values() for t in (f.A, f.B)
        )
        + sum(t.numel() for t in survivors[0].extras.values()),
        "stages": stages,
        "secure_total_seconds": round(total_seconds, 3),
        "bytes_up_total": attempt.bytes_up,
        "bytes_down_total": attempt.bytes_down,
        "plain_bytes_up_total": sum(sum(len(a.data) for a in r["update"].values()) for r in replies),
        "plain_aggregation_seconds": round(plain_seconds, 4),
        "max_abs_error": max_abs_error(result, exact_mean(survivors)),
        "plain_max_abs_error": max_abs_error(plain, exact_mean(survivors)),
        "quantization_bound": secure.codec.max_error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "secagg.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    cells = []
    for shape in args.shapes:
        for clients in args.clients:
            for dropouts in (0, 1):
                result = cell(shape, clients, dropouts)
                print(json.dumps({k: v for k, v in result.items() if k != "stages"}))
                print("   ", json.dumps(result["stages"]))
                cells.append(result)
    results = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine(load_before),
        "code": code_version(),
        "cells": cells,
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
