"""Server aggregation time and peak memory per strategy, against two references in the same run.

    nice -n 10 .venv/bin/python benchmarks/aggregation.py [--shapes smollm2-135m llama-7b]
        [--clients 2 10 100 1000] [--out benchmarks/results/aggregation.json]

Adapter shapes (synthetic factors, no extras): SmolLM2-135M (30 layers, q/o 576x576, k/v 192x576,
r = 8, 3.7 MB fp32) and a 7B Llama (32 layers, q/k/v/o 4096x4096, r = 16, 67 MB fp32).

Each cell (shapes, strategy, K) runs in its own subprocess and measures, one after the other on
the same bytes:
- ``bound``: the memory-bandwidth bound, ``w @ X``: one BLAS matrix-vector product over the
  clients' summed factors as the rows of one matrix (A and B; B only for ffa);
- ``read``: one plain read of every client's bytes (a vectorized sum per reply, nothing kept):
  how fast this machine's core streams memory, to read the bound against (BLAS's ``w @ X`` is a
  reference implementation, not the hardware's limit);
- ``strategy``: the strategy on decoded updates (the streaming accumulator for fedavg, ffa and
  dp(fedavg); ``aggregate`` on the list of K for stacking, fedex and vcma);
- ``server`` (streaming strategies): the server's path from the reply records, as
  ``server.loop`` runs it: decode, validate (the norm screen on, but off under dp as the loop
  has it) and fold each reply, then free it. It is a run's first round: the screen has no norms
  of a previous round, so its first replies are measured in a pass of their own until the pool
  bounds the threshold, the rest in the fold's pass (``server.replies``);
- ``flower`` (in the fedavg cell): Flower's ``FedAvg().aggregate_train`` on the same K replies in
  Flower's own record format (one ``.npy`` array per tensor), which its strategies expect.
Times are the best of up to 5 runs (torch on 1 thread); ``*_rss_rise_bytes`` is the largest rise of
resident memory (VmHWM, reset before each run) above where a run started.

K replies are drawn in turn from a pool of min(K, 1 GiB / adapter) distinct updates: where the
pool outgrows the last-level cache (32 MiB on the machine of 2026-12-07; 1 GiB outgrows any) every
client's bytes come from DRAM as a reply off the network would; a pool that fits is read from
cache, by the bound as well.
A batch method holds K references into that pool, so its RSS understates what a real server
holding K distinct replies needs (K x the adapter); cells where that cannot fit a 24 GiB machine
are reported as skipped with the reason, not run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import REPO, code_version, machine
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

from fedpeft.state import AdapterFactors, ClientUpdate, GlobalState
from fedpeft.wire import NUM_EXAMPLES, UPDATE_ARRAYS, decode_update, encode_update, unpack_tensors
from server.replies import RoundReplies
from server.validation import ReplyLimits
from strategies import create_strategy

POOL_BYTES = 1 << 30
HOLD_LIMIT = 16 << 30  # what a batch method may hold at once on this 24 GiB machine
CELL_TIMEOUT = 150
STREAMING = ("fedavg", "ffa", "dp")
BATCH = ("stacking", "fedex", "vcma")
METHODS = (*STREAMING, *BATCH)


@dataclass(frozen=True)
class Shapes:
    layers: int
    modules: dict[str, tuple[int, int]]  # name -> (d_out, d_in)
    rank: int

    def adapter_bytes(self, with_A: bool = True) -> int:
        per_layer = sum(
            d_out * self.rank + (d_in * self.rank if with_A else 0) for d_out, d_in in self.modules.values()
        )
        return 4 * self.layers * per_layer


SHAPES = {
    "smollm2-135m": Shapes(
        30, {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}, 8
    ),
    "llama-7b": Shapes(32, {p: (4096, 4096) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}, 16),
}


def synthetic_factors(shapes: Shapes, seed: int) -> dict[str, AdapterFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{layer}.self_attn.{name}": AdapterFactors(
            A=torch.randn(shapes.rank, d_in, generator=gen) * 0.02,
            B=torch.randn(d_out, shapes.rank, generator=gen) * 0.02,
            scale=2.0,
        )
        for layer in range(shapes.layers)
        for name, (d_out, d_in) in shapes.modules.items()
    }


def examples(k: int) -> int:
    return 10 + (k * 7919) % 990  # deterministic, uneven example counts


def pool_size(shapes: Shapes, clients: int) -> int:
    return max(1, min(clients, -(-POOL_BYTES // shapes.adapter_bytes())))


def flower_format(record: RecordDict) -> RecordDict:
    """A reply as Flower's own strategies take one: each tensor its own ``.npy`` array."""
    tensors = unpack_tensors(record[UPDATE_ARRAYS])
    arrays = ArrayRecord(array_dict={k: Array(t.numpy()) for k, t in tensors.items()})
    return RecordDict({**{k: v for k, v in record.items() if k != UPDATE_ARRAYS}, UPDATE_ARRAYS: arrays})


class Cell:
    """One (shapes, method, K) measurement, run in this process."""

    def __init__(self, shapes: Shapes, method: str, clients: int) -> None:
        self.shapes, self.method, self.clients = shapes, method, clients
        self.state = GlobalState(adapter=synthetic_factors(shapes, seed=10**6))
        self.frozen_A = method == "ffa"
        self.pool = [self._client(seed) for seed in range(pool_size(shapes, clients))]

    def _client(self, seed: int) -> ClientUpdate:
        """A client's update laid out in one buffer, as ``fedpeft.wire`` decodes a reply."""
        factors = synthetic_factors(self.shapes, seed)
        if self.frozen_A:
            for name, f in factors.items():
                f.A = self.state.adapter[name].A
        sent = [t for f in factors.values() for t in ((f.B,) if self.frozen_A else (f.A, f.B))]
        buffer = torch.cat([t.reshape(-1) for t in sent])
        offset = 0
        for f in factors.values():
            for part in ("B",) if self.frozen_A else ("A", "B"):
                size = getattr(f, part).numel()
                setattr(f, part, buffer[offset : offset + size].view(getattr(f, part).shape))
                offset += size
        return ClientUpdate(
            factors, {}, num_examples=1, round=1, rank=self.shapes.rank, alpha=2.0 * self.shapes.rank
        )

    def updates(self):
        """K updates, lazily, as views of the pool (each with its own example count)."""
        for k in range(self.clients):
            base = self.pool[k % len(self.pool)]
            yield ClientUpdate(base.factors, {}, examples(k), 1, base.rank, base.alpha, client_id=str(k))

    def run(self) -> dict[str, float | str]:
        """The bound, then the strategy, then (streaming strategies) the server path and, with
        fedavg, Flower's FedAvg: all on the same bytes, in this process, one after the other."""
        out: dict[str, float | str] = {}
        out["bound_seconds"], out["bound_rss_rise_bytes"] = self._bound()
        out["read_seconds"], _ = self._read()
        strategy = self._strategy()
        out["strategy_seconds"], out["strategy_rss_rise_bytes"] = self._timed(lambda: self._fold(strategy))
        if self.method not in STREAMING:
            return out
        records = self._records()
        out["server_seconds"], out["server_rss_rise_bytes"] = self._server(strategy, records)
        if self.method == "fedavg":
            reason = skip_reason(self.shapes, "flower", self.clients)
            if reason:
                out["flower_skipped"] = reason
            else:
                out["flower_seconds"], out["flower_rss_rise_bytes"] = self._flower(
                    [flower_format(r) for r in records]
                )
        return out

    def _strategy(self):
        options = (
            {"inner": "fedavg", "clip_norm": 1.0, "noise_multiplier": 1.0} if self.method == "dp" else {}
        )
        return create_strategy(
            self.method, options, {"clients_per_round": self.clients, "num_clients": 10 * self.clients}
        )

    def _fold(self, strategy) -> None:
        if self.method in STREAMING:
            accumulator = strategy.start(1, self.state)
            for update in self.updates():
                accumulator.add(update)
            accumulator.result()
        else:
            strategy.aggregate(1, self.state, list(self.updates()))

    def _records(self) -> list:
        """The pool as reply records (the pool itself is freed: a server only has the records)."""
        records = [encode_update(u, send_A=not self.frozen_A) for u in self.pool]
        self.pool = []
        gc.collect()
        return records

    def _server(self, strategy, records: list) -> tuple[float, int]:
        """Decode, validate and fold each reply record, as ``server.loop`` does."""

        # as server.loop: the norm screen at its default ratio, off under a private strategy (dp)
        limits = ReplyLimits(max_norm_ratio=0.0 if strategy.private else 10.0)

        def fold() -> None:
            replies = RoundReplies(strategy, 1, self.state, limits)
            for k in range(self.clients):
                record = records[k % len(records)]
                update = decode_update(record, str(k), self.state.adapter, replies.decode_buffer)
                update.num_examples = examples(k)
                assert replies.offer(update) is None
                del update  # as server.loop frees each reply before the next
            assert not replies.close()  # folds the replies a cold start held (the norm screen's first two)
            replies.aggregate()

        return self._timed(fold)

    def _flower(self, records: list) -> tuple[float, int]:
        """Flower's ``FedAvg.aggregate_train`` on the K reply messages (sharing the pool's records:
        the weights are not the clients', which does not change the work)."""
        from flwr.serverapp.strategy import FedAvg
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as in a ServerApp
        replies = []
        for k in range(self.clients):
            record = records[k % len(records)]
            message = Message(content=record, dst_node_id=k + 1, message_type=MessageType.TRAIN)
            replies.append(Message(content=record, reply_to=message))
        strategy = FedAvg(weighted_by_key=NUM_EXAMPLES)
        return self._timed(lambda: strategy.aggregate_train(1, replies))

    def _bound(self) -> tuple[float, int]:
        """``w @ X``: the pool's update buffers as the rows of X, once per block of len(pool) clients."""
        matrix = torch.stack([self._buffer(u) for u in self.pool])
        weights = torch.tensor([float(examples(k)) for k in range(self.clients)])

        def weighted_sum() -> None:
            out = torch.zeros(matrix.shape[1])
            for start in range(0, self.clients, matrix.shape[0]):
                w = weights[start : start + matrix.shape[0]]
                out.addmv_(matrix[: len(w)].T, w)
            out.div_(weights.sum())

        return self._timed(weighted_sum)  # the matrix is freed on return

    def _read(self) -> tuple[float, int]:
        """One read of each of the K replies' bytes, in the order the strategy folds them."""
        buffers = [self._buffer(u) for u in self.pool]

        def read() -> None:
            for k in range(self.clients):
                buffers[k % len(buffers)].sum()

        return self._timed(read)

    def _buffer(self, update: ClientUpdate) -> torch.Tensor:
        """The one buffer a pool update's summed factors are views of."""
        first = next(iter(update.factors.values()))
        tensor = first.B if self.frozen_A else first.A
        numel = self.shapes.adapter_bytes(with_A=not self.frozen_A) // 4
        return tensor.new_empty(0).set_(tensor.untyped_storage(), 0, (numel,))

    def _timed(self, fn) -> tuple[float, int]:
        """Best time of up to 5 runs within ~10 s (one run when a run is longer), and the largest
        rise of resident memory above where a run started."""
        best = float("inf")
        spent = 0.0
        rise = 0
        for _ in range(5):
            reset_peak_rss()
            start_rss = status_bytes("VmRSS")
            started = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - started
            rise = max(rise, status_bytes("VmHWM") - start_rss)
            best, spent = min(best, elapsed), spent + elapsed
            if spent > 10:
                break
        return best, rise


def reset_peak_rss() -> None:
    """Linux: restart the process's high-water mark of resident memory (VmHWM) from now."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_cell(shape_name: str, method: str, clients: int) -> dict:
    cell = Cell(SHAPES[shape_name], method, clients)
    result = cell.run()
    return {**result, "pool": pool_size(SHAPES[shape_name], clients)}


def skip_reason(shapes: Shapes, method: str, clients: int) -> str | None:
    if method in STREAMING:
        return None
    held = clients * shapes.adapter_bytes()
    if held > HOLD_LIMIT:
        who = "Flower's FedAvg.aggregate_train takes" if method == "flower" else f"{method} aggregates"
        return (
            f"{who} all {clients} replies at once: {held / 1e9:.0f} GB held, more than a 24 GiB machine holds"
        )
    return None


def measure(shape_name: str, method: str, clients: int) -> dict:
    shapes = SHAPES[shape_name]
    row: dict = {
        "shapes": shape_name,
        "method": method,
        "clients": clients,
        "adapter_bytes": shapes.adapter_bytes(),
    }
    row["payload_bytes_per_client"] = shapes.adapter_bytes(with_A=method != "ffa")
    reason = skip_reason(shapes, method, clients)
    if reason:
        return {**row, "skipped": reason}
    cmd = [sys.executable, __file__, "--cell", shape_name, method, str(clients)]
    try:
        done = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=CELL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return {**row, "skipped": f"did not finish within {CELL_TIMEOUT} s"}
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {**row, "skipped": f"failed: {last[0]}"}
    return {**row, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--clients", nargs="+", type=int, default=[2, 10, 100, 1000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/aggregation.json")
    parser.add_argument("--cell", nargs=3, metavar=("SHAPES", "METHOD", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help="only print the table and plot of --out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.report:
        report(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    if args.cell:
        shape_name, method, clients = args.cell
        print(json.dumps(run_cell(shape_name, method, int(clients))))
        return
    load = os.getloadavg()[0]
    rows = []
    for shape_name in args.shapes:
        for clients in args.clients:
            for method in args.methods:
                row = measure(shape_name, method, clients)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(load),
        "code": code_version(),
        "torch_threads": 1,
        "command": "nice -n 10 .venv/bin/python benchmarks/aggregation.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    report(result, args.out.with_suffix(".png"))


def ratio(row: dict, key: str) -> str:
    if key not in row:
        return "–"
    return f"{row[key]:.3g} s ({row[key] / row['bound_seconds']:.1f}x)"


def report(result: dict, plot_path: Path) -> None:
    """A markdown table of times as ratios to the bound, and a plot of seconds against K."""
    print(
        "| shapes | strategy | K | bound | one read (x bound) | strategy (x bound) | server path (x bound) "
        "| Flower FedAvg (x bound) | server RSS rise (x adapter) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        if "skipped" in row:
            print(
                f"| {row['shapes']} | {row['method']} | {row['clients']} | skipped: {row['skipped']} ||||||"
            )
            continue
        bound = row["bound_seconds"]

        rise = row.get("server_rss_rise_bytes")
        rise_text = f"{rise / row['adapter_bytes']:.2f}" if rise else "–"
        flower = ratio(row, "flower_seconds") if "flower_skipped" not in row else "cannot hold K replies"
        print(
            f"| {row['shapes']} | {row['method']} | {row['clients']} | {bound:.3g} s "
            f"| {ratio(row, 'read_seconds')} | {ratio(row, 'strategy_seconds')} "
            f"| {ratio(row, 'server_seconds')} | {flower} | {rise_text} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(12, 4.5))
    for ax, shape_name in zip(axes, SHAPES, strict=True):
        rows = [r for r in result["rows"] if r["shapes"] == shape_name and "skipped" not in r]
        series = {"bound (A+B)": ("fedavg", "bound_seconds"), "Flower FedAvg": ("fedavg", "flower_seconds")}
        series |= {f"{m} (server path)": (m, "server_seconds") for m in STREAMING}
        series |= {m: (m, "strategy_seconds") for m in BATCH}
        for label, (method, key) in series.items():
            points = sorted((r["clients"], r[key]) for r in rows if r["method"] == method and key in r)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="clients K", ylabel="seconds per round", title=shape_name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Server aggregation time ({result['date']}, {result['machine']['processor']}, 1 thread)")
    fig.tight_layout()
    fig.savefig(plot_path, dpi=120)


if __name__ == "__main__":
    main()
