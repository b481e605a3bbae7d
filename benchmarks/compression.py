"""Wire compression: bytes per client per round for none / fp16 / int8 next to full-model FedAvg,
and the accuracy each costs on AG News (same seeded federation for all three).

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/compression.py [--rounds 5]
        [--out benchmarks/results/compression.json]

Bytes are the tensor payload of a real reply record (``fedpeft.wire.record_nbytes``: the one
packed array of a message, its manifest included) for:
- the AG News model: MiniLM with LoRA r = 8 on query/value plus the classification head
  (compressed with the factors, as its delta from the received head), FedAvg (A and B sent);
- adapter shapes of SmolLM2-135M (q/k/v/o, r = 8) and a 7B Llama (q/k/v/o, r = 16).
Full-model FedAvg sends every base parameter in fp32 (for the two LLMs counted from their
published architectures, for MiniLM from the loaded model).

Accuracy: the AG News federation of ``benchmarks/agnews_fedavg.py`` (10 clients, Dirichlet 0.5,
5 of 10 per round, 20 local steps, lr 2e-3), shortened to ``--rounds``, scored on the whole test
file, once per codec.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from aggregation import SHAPES, synthetic_factors
from common import DEFAULT_DATA_DIR, REPO, agnews_config, code_version, full_test, machine, missing_agnews

from fedpeft.compression import CODECS, ErrorFeedback
from fedpeft.data import load_splits
from fedpeft.lora import AdapterHost
from fedpeft.models import ClassifierSpec, load_classifier
from fedpeft.state import AdapterFactors, ClientUpdate
from fedpeft.wire import encode_update, record_nbytes
from server.checkpoint import load_checkpoint
from server.evaluation import CentralEvaluator
from server.simulation import simulate

# Parameters of the published architectures: embeddings + per layer (attention, MLP, 2 norms) + norm
# (+ an untied output head for Llama). SmolLM2-135M: vocab 49152, hidden 576, 30 layers, MLP 1536,
# 3 KV heads of 64, tied embeddings. Llama-2-7B: vocab 32000, hidden 4096, 32 layers, MLP 11008.
SMOLLM2_PARAMS = 49152 * 576 + 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536 + 2 * 576) + 576
LLAMA7B_PARAMS = 2 * 32000 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096


def trained_like(reference: dict[str, AdapterFactors], seed: int) -> dict[str, AdapterFactors]:
    """Factors a round of training might return: the reference plus a small update."""
    gen = torch.Generator().manual_seed(seed)
    return {
        n: AdapterFactors(
            A=f.A + 1e-3 * torch.randn(f.A.shape, generator=gen),
            B=f.B + 1e-3 * torch.randn(f.B.shape, generator=gen),
            scale=f.scale,
        )
        for n, f in reference.items()
    }


def reply_bytes(reference: dict[str, AdapterFactors], extras: dict, rank: int) -> dict[str, int]:
    update = ClientUpdate(trained_like(reference, 1), extras, num_examples=1, round=1, rank=rank, alpha=16.0)
    options = {"reference": reference, "reference_extras": extras}
    return {
        codec: record_nbytes(encode_update(update, compression=codec, feedback=ErrorFeedback(), **options))
        for codec in CODECS
    }


def bytes_table(config) -> list[dict]:
    splits = load_splits(config.data, config.run.seed)
    spec = ClassifierSpec.from_config(
        config.model.name, len(splits.label_names), config.lora, config.run.seed
    )
    model = load_classifier(spec)
    factors, extras = AdapterHost(model).read_update()
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    rows = [("all-MiniLM-L6-v2 (AG News), r = 8, q/v + head", reply_bytes(factors, extras, 8), base_params)]
    for name, params in (("smollm2-135m", SMOLLM2_PARAMS), ("llama-7b", LLAMA7B_PARAMS)):
        shapes = SHAPES[name]
        rows.append(
            (
                f"{name}, r = {shapes.rank}, q/k/v/o",
                reply_bytes(synthetic_factors(shapes, 0), {}, shapes.rank),
                params,
            )
        )
    return [
        {
            "model": model_name,
            "full_model_bytes": 4 * params,
            "bytes": sizes,
            "share_of_full_model": {c: b / (4 * params) for c, b in sizes.items()},
            "reduction_vs_none": {c: sizes["none"] / b for c, b in sizes.items()},
        }
        for model_name, sizes, params in rows
    ]


def accuracy(config, codec: str, data_dir: Path) -> dict:
    config = config.replace(
        train=config.train.replace(compression=codec), run=config.run.replace(name=f"agnews-{codec}")
    )
    run_dir = REPO / "runs" / f"compression-{codec}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    simulate(config, run_dir)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    full = full_test(config)
    scores = CentralEvaluator(full, load_splits(full.data, full.run.seed))(load_checkpoint(run_dir).state, 0)
    return {
        "codec": codec,
        "test_accuracy": scores["eval_accuracy"],
        "test_loss": scores["eval_loss"],
        "bytes_up_per_client_round": sum(r["bytes_up"] for r in rows if r["round"] > 0)
        / sum(r["clients_aggregated"] for r in rows if r["round"] > 0),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/compression.json")
    args = parser.parse_args()
    if missing := missing_agnews(args.data_dir):
        sys.exit(f"AG News is not at {missing}; pass --data-dir")
    load = os.getloadavg()[0]
    overrides = {
        "run.seed": args.seed,
        "run.rounds": args.rounds,
        "data.num_clients": 10,
        "data.dirichlet_alpha": 0.5,
        "data.test_limit": 500,
        "train.local_steps": 20,
        "train.lr": 2e-3,
        "server.fraction": 0.5,
    }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(load),
        "code": code_version(),
        "command": "HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/compression.py "
        + " ".join(sys.argv[1:]),
        "bytes": bytes_table(agnews_config(args.data_dir, overrides)),
    }
    print(json.dumps(result["bytes"], indent=2), flush=True)
    result["agnews"] = [accuracy(agnews_config(args.data_dir, overrides), c, args.data_dir) for c in CODECS]
    result["agnews_setting"] = overrides
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["agnews"], indent=2))


if __name__ == "__main__":
    main()
