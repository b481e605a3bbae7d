"""What reply validation costs the server: the norm screen on and off, in the same run.

    nice -n 10 .venv/bin/python benchmarks/validation.py [--clients 20] [--shapes smollm2-135m llama-7b]

For each adapter size (synthetic fedavg replies, fp32, no extras), the server's path for K replies
as ``server.loop`` runs it (``RoundReplies.decode``: byte cap and decoding; ``offer``: structural
checks, the norm screen when on, folding into the streaming sum; then ``aggregate``), with
``server.max_norm_ratio`` = 0 (screen off) and 10 (the default), alternated, best of 5 each (torch
on 1 thread). Sizes: SmolLM2-135M's attention (30 layers, q/o 576x576, k/v 192x576, r = 8, 3.7 MB)
and a 7B Llama's (32 layers, q/k/v/o 4096x4096, r = 16, 67 MB).
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import torch
from common import REPO, code_version, machine, write_results

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from fedpeft.wire import encode_update, record_nbytes
from server.replies import RoundReplies
from server.validation import ReplyLimits
from strategies import create_strategy

SHAPES = {
    "smollm2-135m": (30, {"q": (576, 576), "o": (576, 576), "k": (192, 576), "v": (192, 576)}, 8),
    "llama-7b": (32, {m: (4096, 4096) for m in "qkvo"}, 16),
}
DISTINCT = 4  # distinct replies cycled over the K clients
REPEATS = 5


def global_state(name: str) -> GlobalState:
    layers, modules, rank = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    adapter = {
        f"layers.{layer}.{m}": AdapterFactors(
            torch.randn(rank, d_in, generator=gen) / d_in**0.5, torch.zeros(d_out, rank), 2.0
        )
        for layer in range(layers)
        for m, (d_out, d_in) in modules.items()
    }
    return GlobalState(adapter=adapter)


def step(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return t + 1e-3 * torch.randn(t.shape, generator=gen)


def reply(state: GlobalState, seed: int):
    """A reply record one local training step away from ``state``."""
    gen = torch.Generator().manual_seed(seed)
    factors = {
        n: AdapterFactors(
            f.A + 1e-3 * torch.randn(f.A.shape, generator=gen),
            1e-3 * torch.randn(f.B.shape, generator=gen),
            2.0,
        )
        for n, f in (state.adapter or {}).items()
    }
    rank = next(iter(factors.values())).rank
    return encode_update(ClientUpdate(factors, {}, 10, 1, rank, 2.0 * rank))


def server_path(state: GlobalState, records: list, clients: int, ratio: float) -> float:
    """Seconds for the server to decode, validate and fold ``clients`` replies, then aggregate."""
    strategy = create_strategy("fedavg", {}, {"clients_per_round": clients, "num_clients": clients})
    started = time.perf_counter()
    replies = RoundReplies(strategy, 1, state, ReplyLimits(max_norm_ratio=ratio))
    for k in range(clients):
        update = replies.decode(records[k % len(records)], str(k))
        if not isinstance(update, ClientUpdate) or replies.offer(update) is not None:
            raise RuntimeError(f"an honest reply was refused: {update}")
        del update
    replies.aggregate()
    return time.perf_counter() - started


def measure(name: str, clients: int) -> dict:
    state = global_state(name)
    records = [reply(state, seed) for seed in range(DISTINCT)]
    best = {0.0: float("inf"), 10.0: float("inf")}
    for _ in range(REPEATS):
        for ratio in best:
            best[ratio] = min(best[ratio], server_path(state, records, clients, ratio))
    off, on = best[0.0], best[10.0]
    return {
        "reply_bytes": record_nbytes(records[0]),
        "clients": clients,
        "ms_per_reply_screen_off": round(off / clients * 1e3, 3),
        "ms_per_reply_screen_on": round(on / clients * 1e3, 3),
        "screen_overhead": round(on / off - 1, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/validation.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    cells = {}
    for name in args.shapes:
        cells[name] = measure(name, args.clients)
        print(name, cells[name], flush=True)
    result = {
        "benchmark": "validation",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(load),
        "code": code_version(),
        "results": cells,
    }
    write_results(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
