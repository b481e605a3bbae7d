"""Fed-SB's frame from public rows (``fedpeft frame``; ``strategies/fedsb.py``, ``init = "public"``).

The operator computes, once and before the run, LoRA-SB's initialisation on rows it may publish:
the loss gradient of every adapted base weight over those rows, at the run's initial state (the
seeded adapter and head every client starts from), and the truncated SVD of its first-step estimate
(``fedpeft.lora_sb.first_step_frame``). The frame costs the federation no round and, under ``dp``,
no privacy budget; it reveals the public rows' gradient subspace and nothing of the clients' data.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedpeft.config import RunConfig
from fedpeft.errors import UserError
from fedpeft.lora import AdapterHost, delta_in_weight_layout
from fedpeft.lora_sb import first_step_frame
from fedpeft.models import load_model, load_tokenizer
from fedpeft.state import GlobalState
from fedpeft.tasks import get_task
from fedpeft.training import weight_gradients
from server.loop import round_init_seed
from strategies.fedsb import save_frame


def write_public_frame(config: RunConfig, rows: Path, out: Path) -> str:
    """Write the frame of ``config``'s adapter from the public rows in ``rows`` (a file in the
    format of a client's data file) to ``out``; returns a line saying what was written."""
    task = get_task(config.model.task)
    labels = config.data.labels
    if task.labelled and not labels:  # the run's label names, as its server finds them
        labels = task.splits(config.data, config.run.seed).label_names
    data_spec = config.data.replace(labels=labels)
    tokenizer = load_tokenizer(config.model.name)
    data = task.encode_rows(task.client_file(str(rows), data_spec), tokenizer, config.model.max_length)
    if len(data) == 0:
        raise UserError(f"{rows} holds no rows; pass the public rows the frame is computed on")
    spec = task.model_spec(config.model, config.lora, config.run.seed, labels, config.lora.rank)
    host = AdapterHost(load_model(spec))
    host.load_state(GlobalState(), init_seed=round_init_seed(config.run.seed, 1))
    batch_size = config.train.batch_size
    gradients, _ = weight_gradients(
        host.model,
        tokenizer,
        data,
        host.base_weights(),
        steps=math.ceil(len(data) / batch_size),  # every row about once
        batch_size=batch_size,
        seed=config.run.seed,
    )
    oriented = {name: delta_in_weight_layout(host.layers[name], g) for name, g in gradients.items()}
    frame = first_step_frame(oriented, config.lora.rank)
    about = {"model": config.model.name, "rows": str(len(data)), "seed": str(config.run.seed)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_frame(out, frame, about)
    return (
        f"frame of {len(frame)} modules at rank {config.lora.rank} from {len(data)} public rows: {out}\n"
        f'use it with [strategy] init = "public", frame = "{out}" (under dp: in inner_options)'
    )
