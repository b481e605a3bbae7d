"""The Flower ClientApp: apply the global state, train locally, reply with the LoRA factors.

Message types it answers:
- ``query.identify``: a client id that is stable across runs (Flower's node ids are not);
- ``query.initial_adapter``: the untrained, seeded adapter and head, so the server holds the
  global adapter explicitly from round 1 (it never loads the model to build it);
- ``query.calibration``: per-class moments of the head's input after the last round (CCVR);
- ``train``: one round of local training;
- ``query.secagg_keys``, ``query.secagg_shares``, ``query.secagg_unmask``: the stages of secure
  aggregation around a ``train`` message that carries a ``secagg`` record (``client.secure``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from transformers import PreTrainedTokenizerBase

from client import personal, runtime, secure
from client.errors import private_errors
from client.faults import injected_fault, simulated_faults
from client.node_state import kept_state
from fedpeft.calibration import class_moments, head_of
from fedpeft.config import ClientConfig, RunConfig
from fedpeft.errors import UserError
from fedpeft.lora import AdapterHost, delta_in_weight_layout, load_adapter
from fedpeft.lora_sb import gradient_sketch
from fedpeft.secagg.messages import RECORD as SECAGG
from fedpeft.state import ClientUpdate, GlobalState
from fedpeft.training import Batches, Encoded, LocalResult, evaluate, weight_gradients
from fedpeft.training import train as train_locally
from fedpeft.wire import (
    decode_instructions,
    decode_state,
    encode_identity,
    encode_moments,
    encode_state,
    encode_update,
    load_feedback,
    store_feedback,
)


def identify(msg: Message, context: Context) -> Message:
    return Message(encode_identity(runtime.client_id(context)), reply_to=msg)


def initial_adapter(msg: Message, context: Context) -> Message:
    instructions = decode_instructions(msg.content)
    config = instructions.client_config
    host = runtime.model_host(runtime.model_spec(config, config.lora.rank))
    host.load_state(GlobalState(), init_seed=instructions.init_seed)
    factors, extras = host.read_update()
    return Message(encode_state(GlobalState(adapter=factors, extras=extras)), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """One round of local training on this node's data."""
    instructions = decode_instructions(msg.content)
    config = instructions.client_config
    torch.set_num_threads(config.threads)
    rank = runtime.client_rank(config, context)

    host = runtime.model_host(runtime.model_spec(config, rank))
    tokenizer = runtime.tokenizer(config.model.name)
    data, held_out = runtime.client_splits(config, context)
    received = decode_state(msg.content)
    plan = instructions.plan
    started = host.load_state(received, init_seed=runtime.init_seed(config, instructions.init_seed, context))
    if plan.personal_B:
        personal.restore(host, context.state, plan.personal_extras)
    evaluation = evaluate(host.model, tokenizer, held_out, config.train.eval_batch_size) if held_out else None
    accountant = runtime.example_accountant(config, data, context)
    if plan.init_gradient:
        local = sketch_gradients(host, tokenizer, data, config, plan.init_gradient, context)
    else:
        local = train_locally(
            host.model,
            tokenizer,
            data,
            steps=config.train.local_steps,
            batch_size=config.train.batch_size,
            lr=config.train.round_lr(instructions.round),
            weight_decay=config.train.weight_decay,
            seed=hash((config.seed, instructions.round, runtime.seed_key(context))) & 0x7FFFFFFF,
            train_lora_A=plan.train_lora_A,
            train_lora_B=plan.train_lora_B,
            train_extras=plan.train_extras,
            proximal_mu=config.train.proximal_mu,
            logit_adjustment=runtime.logit_adjustment(config, data),
            example_dp=accountant.dp if accountant else None,
            gradient_checkpointing=config.train.gradient_checkpointing,
            max_batch_tokens=config.train.max_batch_tokens,
            bf16_autocast=config.train.bf16_autocast,
        )
    if plan.personal_B:
        personal.keep(host, context.state, plan.personal_extras)
    metrics, trained = {"train_loss": local.train_loss}, local.examples
    if evaluation is not None:  # the model this client started the round from, on its own held-out rows
        metrics |= {"client_eval_accuracy": evaluation["accuracy"], "client_eval_loss": evaluation["loss"]}
    if accountant is not None:  # the loss and the Poisson batch sizes are private: send neither
        steps = config.train.local_steps
        metrics = {"example_epsilon": runtime.record_example_steps(context, accountant, steps)}
        trained = steps * min(config.train.batch_size, len(data))
    # on this client's own console (a deployed client's log; hidden in simulation unless --verbose)
    print(
        f"round {instructions.round}: trained {config.train.local_steps} steps on {len(data)} rows, "
        f"loss {local.train_loss:.4f}",
        flush=True,
    )
    factors, extras = host.read_update()
    update = ClientUpdate(
        factors=factors,
        extras=extras,
        num_examples=len(data),
        num_trained=trained,
        round=instructions.round,
        rank=rank,
        alpha=config.lora.alpha,
        metrics=metrics,
    )
    if SECAGG in msg.content:
        masked = secure.masked_reply(msg.content, update, received, plan, context)
        return Message(masked, reply_to=msg)
    feedback = load_feedback(context.state)
    content = encode_update(
        update,
        send_A=plan.send_lora_A,
        send_B=plan.send_lora_B,
        send_extras=plan.send_extras,
        compression=config.train.compression,
        reference=started,
        reference_extras=received.extras,
        feedback=feedback,
    )
    store_feedback(context.state, feedback)
    return Message(content, reply_to=msg)


def sketch_gradients(
    host: AdapterHost,
    tokenizer: PreTrainedTokenizerBase,
    data: Batches,
    config: ClientConfig,
    mode: str,
    context: Context,
) -> LocalResult:
    """Put the ``mode`` sketch of this client's mean loss gradient w.r.t. the adapted base weights
    in place of the adapter's B (``range``) or A (``project``), for Fed-SB's initialisation. Both
    rounds of it see the same batches, so the two sketches are of one gradient."""
    if config.example_dp.enabled:
        raise UserError("Fed-SB's initialisation is not example-level private; unset [example_dp]")
    gradients, local = weight_gradients(
        host.model,
        tokenizer,
        data,
        host.base_weights(),
        steps=config.train.local_steps,
        batch_size=config.train.batch_size,
        seed=hash((config.seed, -1, runtime.seed_key(context))) & 0x7FFFFFFF,
        logit_adjustment=runtime.logit_adjustment(config, data),
    )
    factors, extras = host.read_update()
    oriented = {name: delta_in_weight_layout(host.layers[name], g) for name, g in gradients.items()}
    load_adapter(host.model, gradient_sketch(factors, oriented, mode), extras)
    return local


def calibration(msg: Message, context: Context) -> Message:
    """CCVR's statistics: per class, the moments of the head's input over this client's training
    rows under the global state sent (``fedpeft.calibration``)."""
    instructions = decode_instructions(msg.content)
    config = instructions.client_config
    host = runtime.model_host(runtime.model_spec(config, runtime.client_rank(config, context)))
    host.load_state(decode_state(msg.content), init_seed=instructions.init_seed)
    data, _ = runtime.client_splits(config, context)
    assert isinstance(data, Encoded) and config.data.labels, "calibration needs labelled classification data"
    tokenizer = runtime.tokenizer(config.model.name)
    classes, batch_size = len(config.data.labels), config.train.eval_batch_size
    moments = class_moments(host.model, tokenizer, data, classes, batch_size)
    return Message(encode_moments(head_of(host.model)[0], moments), reply_to=msg)


def secagg_keys(msg: Message, context: Context) -> Message:
    return secure.answer_keys(msg, context)


def secagg_shares(msg: Message, context: Context) -> Message:
    return secure.answer_shares(msg, context)


def secagg_unmask(msg: Message, context: Context) -> Message:
    return secure.answer_unmask(msg, context)


def client_app(mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp answering the message types above, with ``mods`` around every handler and,
    innermost, ``private_errors`` (a failure reaches the server as its category only)."""
    app = ClientApp(mods=[*(mods or []), private_errors])
    app.query("identify")(identify)
    app.query("initial_adapter")(initial_adapter)
    app.query("calibration")(calibration)
    app.train()(train)
    app.query("secagg_keys")(secagg_keys)
    app.query("secagg_shares")(secagg_shares)
    app.query("secagg_unmask")(secagg_unmask)
    return app


def simulation_app(config: RunConfig, state_dir: Path) -> ClientApp:
    """The ClientApp ``fedpeft simulate`` runs: its clients keep what they carry between rounds
    under ``state_dir`` too (``client.node_state``: a resumed simulation picks it up), and with
    ``[faults]`` set they misbehave as the section says (``client.faults.simulated_faults``)."""
    mods = [kept_state(state_dir)]
    if config.faults.active:
        mods.append(simulated_faults(config.faults, config.run.seed, config.server.round_timeout))
    return client_app(mods)


# what Flower loads: `flwr run`, and every deployed SuperNode
app = client_app([kept_state(), injected_fault])
