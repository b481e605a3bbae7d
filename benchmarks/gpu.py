"""A fedpeft client on a GPU against a plain peft training loop, on Llama shapes of 135M, 1B and 8B.

No model hub is reachable from the machines here, so each shape is built from its published
configuration with random weights (throughput and memory do not depend on the weights), saved once
to a scratch folder in bf16, and loaded as a user loads a model: in bf16, or quantized to 4-bit NF4
(QLoRA's recipe, fedpeft's ``model.quantization = "4bit"``).

Pieces (``--only`` takes globs; results are appended to one JSON, so a run can be resumed):

- ``<shape>/<precision>/plain``: transformers + peft + a bare AdamW loop;
- ``<shape>/<precision>/fedpeft``: one fedpeft client round doing the same steps: the global adapter
  loaded (``AdapterHost.load_state``), ``fedpeft.training.train``, the update read back to the CPU
  (``read_update``), as ``client/app.py`` does minus the message encoding;
- ``shared/<shape>/<precision>``: ``--clients`` client processes sharing one GPU (what Ray's
  fractional GPUs, ``simulation.gpus_per_client = 1/clients``, schedule), each running rounds of
  the fedpeft piece: federated rounds per hour (all clients' rounds done) and the GPU's utilisation.

Both loops: LoRA r = 16 (alpha 32) on q/k/v/o, ``--batch`` rows of ``--seq`` random tokens,
gradient checkpointing, AdamW at lr 1e-4; ``--warmup`` untimed steps, then ``--steps`` timed ones.
Reported: tokens per second, peak GPU memory (``torch.cuda.max_memory_allocated`` from the model's
load on), and fedpeft / plain.

    python benchmarks/gpu.py                      # everything, on a CUDA machine
    python benchmarks/gpu.py --only '1b/*'        # one shape
    python benchmarks/gpu.py --tiny --out /tmp/g.json   # a 2-layer smoke run, CPU is fine

Results: ``benchmarks/results/gpu.json``; reading in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from records import REPO, RunsFile

sys.path.insert(0, str(REPO))  # run as a script: fedpeft from this checkout

from fedpeft.lora import AdapterHost  # noqa: E402
from fedpeft.models import CausalLMSpec, load_causal_lm, quantization_config  # noqa: E402
from fedpeft.state import GlobalState  # noqa: E402
from fedpeft.training import activation_checkpointing, train  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK, ALPHA, LR = 16, 32.0, 1e-4

# Published configurations: SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B (rope scaling left out: it
# changes no shape or cost).
SHAPES: dict[str, dict[str, Any]] = {
    "135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
    ),
    "8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
    ),
    "tiny": dict(  # --tiny: a smoke test of the script itself, not a measurement
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0,
    ),
}  # fmt: skip
PRECISIONS = ("bf16", "4bit")


@dataclass(frozen=True)
class Workload:
    batch: int
    seq: int
    warmup: int
    steps: int

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq


class RandomTokens:
    """``rows`` rows of ``seq`` seeded random token ids, as ``fedpeft.training.Batches`` (the loss
    is the model's own next-token loss over every token)."""

    def __init__(self, rows: int, seq: int, vocab: int) -> None:
        self.input_ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, indices: list[int], _tokenizer: object = None) -> dict[str, torch.Tensor]:
        ids = self.input_ids[indices]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def checkpoint(shape: str, scratch: Path) -> Path:
    """The shape's random-weight model saved in bf16 under ``scratch`` (built once, on the GPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = scratch / shape
    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, head_dim=None)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    release()
    return path


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def plain_peft(path: Path, precision: str, work: Workload, data: RandomTokens) -> dict[str, Any]:
    """transformers + peft + AdamW, nothing of fedpeft's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"device_map": {"": device()}} if torch.cuda.is_available() else {}
    if precision == "4bit":
        kwargs["quantization_config"] = quantization_config("4bit")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS)))
    activation_checkpointing(model, True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    order = iter(range(10**9))

    def steps(n: int) -> None:
        for _ in range(n):
            rows = [next(order) % len(data) for _ in range(work.batch)]
            batch = {k: v.to(device()) for k, v in data.collate(rows).items()}
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    steps(work.warmup)
    return timed(lambda: steps(work.steps), work)


def fedpeft_round(path: Path, precision: str, work: Workload, data: RandomTokens) -> dict[str, Any]:
    """One fedpeft client round: load the global adapter, train, read the update back."""
    host = client_host(path, precision)
    state = GlobalState(adapter=host.read_update()[0])
    parts: dict[str, float] = {}
    client_round(host, state, data, work, work.warmup, seed=0)
    timing = timed(lambda: parts.update(client_round(host, state, data, work, work.steps, seed=0)), work)
    return timing | {k: round(v, 3) for k, v in parts.items()}


def client_round(
    host: AdapterHost, state: GlobalState, data: RandomTokens, work: Workload, steps: int, seed: int
) -> dict[str, float]:
    """What a fedpeft client does in a round, each part's seconds."""
    return {
        "load_state_s": seconds(lambda: host.load_state(state, init_seed=0)),
        "train_s": seconds(
            lambda: train(
                host.model,
                None,
                data,
                steps=steps,
                batch_size=work.batch,
                lr=LR,
                weight_decay=0.0,
                seed=seed,
                gradient_checkpointing=True,
            )
        ),  # fmt: skip
        "read_update_s": seconds(host.read_update),
    }


def seconds(run: Callable[[], object]) -> float:
    sync()
    started = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - started


def client_host(path: Path, precision: str) -> AdapterHost:
    quantization = "4bit" if precision == "4bit" else "none"
    spec = CausalLMSpec(
        name=str(path), rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS, seed=0,
        dtype="bfloat16", quantization=quantization,
    )  # fmt: skip
    return AdapterHost(load_causal_lm(spec))


def timed(run: Callable[[], None], work: Workload) -> dict[str, Any]:
    took = seconds(run)
    return {"seconds": round(took, 3), "tokens_per_s": round(work.tokens / took, 1), "peak_gib": peak_gib()}


# ---------------------------------------------------------------------------- clients sharing a GPU


def shared_gpu(path: Path, precision: str, work: Workload, clients: int, rounds: int) -> dict[str, Any]:
    """``clients`` processes, each a fedpeft client holding its model on the one GPU, start every
    round together; a federated round ends when the last of them has its update."""
    go = Path(tempfile.mkdtemp()) / "go"
    command = [sys.executable, __file__, "--worker", str(path), precision, str(go), str(rounds),
               str(work.batch), str(work.seq), str(work.warmup), str(work.steps)]  # fmt: skip
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    for w in workers:
        assert w.stdout is not None and w.stdout.readline().strip() == "ready", "a worker failed to load"
    with gpu_utilisation() as samples:
        go.touch()
        reports = [json.loads(w.stdout.read()) for w in workers if w.stdout is not None]
    if any(w.wait() for w in workers):
        raise RuntimeError("a shared-GPU client failed")
    walls = [max(r["ends"][i] for r in reports) - min(r["starts"][i] for r in reports) for i in range(rounds)]
    round_s = sum(walls[1:]) / (rounds - 1)  # the first round pays the CUDA warm-up of 8 contexts
    return {
        "clients": clients,
        "round_seconds": [round(w, 2) for w in walls],
        "rounds_per_hour": round(3600 / round_s, 1),
        "tokens_per_s": round(clients * work.tokens / round_s, 1),
        "gpu_utilisation_mean": round(sum(samples) / len(samples), 1) if samples else None,
        "peak_gib_per_client": max(r["peak_gib"] or 0 for r in reports),
    }


def worker(args: list[str]) -> None:
    """One shared-GPU client: load, say ready, wait for the start, run the rounds, report times."""
    path, precision, go, rounds = Path(args[0]), args[1], Path(args[2]), int(args[3])
    work = Workload(*map(int, args[4:8]))
    data = RandomTokens(64, work.seq, vocab_size(path))
    host = client_host(path, precision)
    state = GlobalState(adapter=host.read_update()[0])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    starts, ends = [], []
    for rnd in range(rounds):
        starts.append(time.time())
        client_round(host, state, data, work, work.steps, seed=rnd)
        ends.append(time.time())
    print(json.dumps({"starts": starts, "ends": ends, "peak_gib": peak_gib()}), flush=True)


def vocab_size(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["vocab_size"]


@contextmanager
def gpu_utilisation() -> Iterator[list[float]]:
    """The GPU's utilisation in percent, sampled every 0.2 s while the block runs (NVML)."""
    samples: list[float] = []
    stop = threading.Event()
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no NVML (CPU smoke run): no samples
        handle = None

    def sample() -> None:
        while handle is not None and not stop.wait(0.2):
            samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------- pieces and report


def environment() -> dict[str, Any]:
    """The GPU, its driver and the library versions the figures were measured with."""
    import peft
    import transformers

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "transformers": transformers.__version__, "peft": peft.__version__}  # fmt: skip
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        facts["driver"] = driver.stdout.strip()
        try:
            import bitsandbytes

            facts["bitsandbytes"] = bitsandbytes.__version__
        except ImportError:
            pass
    return facts


def pieces(shapes: list[str]) -> list[str]:
    """Each shape's four pieces, then its shared-GPU piece (the 1B shape's, and the smoke shape's)."""
    names = []
    for s in shapes:
        names += [f"{s}/{p}/{m}" for p in PRECISIONS for m in ("plain", "fedpeft")]
        names += [f"shared/{s}/bf16"] if s in ("1b", "tiny") else []
    return names


def run_piece(piece: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    parts = piece.split("/")
    shape, precision = (parts[1], parts[2]) if parts[0] == "shared" else (parts[0], parts[1])
    if precision == "4bit" and not torch.cuda.is_available():
        return {"skipped": "4-bit quantization needs a CUDA GPU"}
    work = Workload(args.batch, args.seq, args.warmup, args.steps)
    path = checkpoint(shape, scratch)
    data = RandomTokens(64, work.seq, SHAPES[shape]["vocab_size"])
    release()
    facts = {"shape": shape, "precision": precision, "workload": dataclasses.asdict(work)}
    try:
        if parts[0] == "shared":
            return facts | shared_gpu(path, precision, work, args.clients, args.rounds)
        measure = plain_peft if parts[2] == "plain" else fedpeft_round
        return facts | measure(path, precision, work, data)
    finally:
        release()


def guarded(piece: str, args: argparse.Namespace) -> dict[str, Any]:
    """The piece's figures, or its error: one failing piece (out of memory, say) must not stop the
    others."""
    try:
        return run_piece(piece, args, args.scratch)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def report(data: dict[str, Any]) -> str:
    """The latest figures per shape and precision, with fedpeft / plain of every run on file (the
    ``superseded`` measurements too: their spread is the noise a single ratio carries)."""
    runs = {r["piece"]: r for r in data.get("runs", [])}
    lines = [
        "| shape | precision | plain tokens/s | fedpeft tokens/s | fedpeft time / plain | range over runs "
        "| plain peak GiB | fedpeft peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted({p.rsplit("/", 1)[0] for p in runs if not p.startswith("shared/")}):
        plain, fed = runs.get(f"{key}/plain", {}), runs.get(f"{key}/fedpeft", {})
        if "tokens_per_s" not in plain or "tokens_per_s" not in fed:
            continue
        shape, precision = key.split("/")
        every = ratios(data, key)
        spread = f"{min(every):.3f}-{max(every):.3f} ({len(every)} runs)"
        lines.append(
            f"| {shape} | {precision} | {plain['tokens_per_s']:,.0f} | {fed['tokens_per_s']:,.0f} | "
            f"{time_ratio(plain, fed):.3f} | {spread} | {plain['peak_gib']} | {fed['peak_gib']} |"
        )
    for piece, run in sorted(runs.items()):
        if piece.startswith("shared/") and "rounds_per_hour" in run:
            lines.append(
                f"\n{piece}: {run['clients']} clients on one GPU, {run['workload']['steps']} steps each a "
                f"round, {run['rounds_per_hour']} rounds/hour, {run['tokens_per_s']:,.0f} tokens/s together, "
                f"GPU utilisation {run['gpu_utilisation_mean']}%, peak {run['peak_gib_per_client']} GiB "
                "per client"
            )
    return "\n".join(lines)


def time_ratio(plain: dict[str, Any], fed: dict[str, Any]) -> float:
    return plain["tokens_per_s"] / fed["tokens_per_s"]


def ratios(data: dict[str, Any], key: str) -> list[float]:
    """fedpeft / plain (time) of every run of ``key`` on file, pairing the two pieces measured at
    the same commit with the same workload."""
    pairs: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for run in data.get("runs", []) + data.get("superseded", []):
        if run["piece"].rsplit("/", 1)[0] == key and "tokens_per_s" in run:
            at = (run["commit"]["commit"], json.dumps(run.get("workload")))
            pairs.setdefault(at, {})[run["piece"].rsplit("/", 1)[1]] = run
    both = [p for p in pairs.values() if len(p) == 2]
    return [time_ratio(p["plain"], p["fedpeft"]) for p in both]


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--worker"]:
        return worker(raw[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--only", default="*", help="comma-separated globs over the pieces")
    parser.add_argument("--list", action="store_true", help="print the pieces and whether each is done")
    parser.add_argument("--report", action="store_true", help="print the results table and stop")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer shape, short sequences: a smoke run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8, help="clients sharing the GPU")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the shared-GPU clients")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "fedpeft-gpu-models")
    args = parser.parse_args(raw)
    results = RunsFile(args.out, "gpu")
    if args.report:
        return print(report(results.data))
    if args.tiny:
        args.seq, args.warmup, args.steps, args.clients, args.rounds = 32, 1, 2, 2, 2
    names = pieces(["tiny"] if args.tiny else ["135m", "1b", "8b"])
    globs = args.only.split(",")
    chosen = [n for n in names if any(fnmatch.fnmatch(n, g) for g in globs)]
    if args.list:
        return print("\n".join(f"{n:24} {'done' if results.get(n) else 'ready'}" for n in names))
    results.data["environment"] = environment()
    for piece in chosen:
        print(f"[{piece}]", flush=True)
        run = results.measure(piece, functools.partial(guarded, piece, args))
        print(json.dumps({k: v for k, v in run.items() if k not in ("commit", "command")}), flush=True)
    print(report(results.data))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
