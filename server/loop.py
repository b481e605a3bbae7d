"""The federated round loop, independent of how clients are reached (simulation or deployment)."""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from fedpeft.config import RunConfig, config_to_dict
from fedpeft.data import Splits
from fedpeft.errors import UserError
from fedpeft.export import export_adapter, export_merged
from fedpeft.model_card import write_card, write_labels
from fedpeft.models import check_rank_fits, resolve_model
from fedpeft.state import ClientPlan, ClientUpdate, GlobalState
from fedpeft.tasks import get_task
from fedpeft.wire import (
    RoundInstructions,
    WireError,
    decode_identity,
    decode_state,
    encode_train_message,
    record_nbytes,
)
from server.calibration import CalibrationFailed, calibrate
from server.checkpoint import FILENAME as CHECKPOINT_FILE
from server.checkpoint import load_checkpoint, save_checkpoint
from server.evaluation import make_evaluator
from server.replies import Replies, RoundReplies, client_error, receive
from server.report import Participation, RoundProgress, RoundRecord, RunRecorder, print_round, print_summary
from server.secure import SecureAggregation
from server.tracking import open_trackers
from server.validation import ReplyLimits
from strategies import StopFederation, Strategy, StrategyError, create_strategy

EVAL_METRICS = ("eval_accuracy", "eval_loss", "eval_perplexity", "eval_exact_match")


class RunDirError(UserError):
    """A run directory that cannot be used as asked."""


class RoundFailed(RuntimeError):
    """Too few valid replies in every attempt at a round."""


@dataclass
class RoundOutcome:
    replies: Replies
    dropped: list[dict[str, str]] = field(default_factory=list)
    sampled: int = 0
    bytes_down: int = 0
    bytes_up: int = 0


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run needs a directory without one; a resumed run needs an earlier run's directory
    (one stopped before its first checkpoint starts again from round 0: a run's config.json, or the
    Flower home ``fedpeft server`` makes first, shows one was started there)."""
    started = (CHECKPOINT_FILE, "config.json", "flower")
    if resume and not any((run_dir / name).exists() for name in started):
        raise RunDirError(f"{run_dir} holds no checkpoint to resume; pass the directory of an earlier run")
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise RunDirError(
            f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another --run-dir"
        )


RUN_KEY_FILE = "run-key"


def run_key(run_dir: Path, resume: bool) -> str:
    """The name clients keep their state between rounds under (``client/node_state.py``): drawn
    when the run starts, read back when it resumes, so a resumed run's clients pick up their own
    state and a new run never inherits another's. A resumed run that stopped before its first
    checkpoint keeps it too: its clients' DP step counts include the aborted attempt's steps."""
    path = run_dir / RUN_KEY_FILE
    if not (resume and path.is_file()):
        staging = path.with_suffix(".tmp")
        staging.write_text(secrets.token_hex(8))
        os.replace(staging, path)
    return path.read_text().strip()


def build_strategy(config: RunConfig) -> Strategy:
    """The configured strategy, told how many clients there are and how many train per round."""
    return create_strategy(
        config.strategy.name,
        config.strategy.options,
        context={
            "clients_per_round": config.clients_per_round,
            "num_clients": config.data.num_clients,
            "freeze_extras": config.train.freeze_head,
        },
    )


def fresh_starts(config: RunConfig, strategy: Strategy) -> bool:
    """Whether clients start each round from their own adapters, with no global one: under mixed
    ranks (unless the strategy takes them from one global adapter) or ``lora.init = "per_client"``."""
    mixed = bool(config.lora.client_ranks) and not strategy.mixed_ranks
    return mixed or config.lora.init == "per_client"


def check_ranks(config: RunConfig, strategy: Strategy) -> None:
    """Refuse what cannot start: a strategy that freezes or withholds A when clients start without a
    shared adapter (there is no A to freeze or fill in then), or a client rank above the global
    adapter's (``lora.rank``) under a strategy that truncates the global adapter to each client's."""
    ranks = config.lora.client_ranks or []
    if strategy.mixed_ranks and max(ranks, default=0) > config.lora.rank:
        raise StrategyError(
            f"strategy '{strategy.name}' gives each client the leading components of a global adapter of "
            f"rank lora.rank = {config.lora.rank}; set lora.rank to the largest client rank, {max(ranks)}"
        )
    if not fresh_starts(config, strategy):
        return
    plan = strategy.client_instructions(1, GlobalState())
    if not (plan.train_lora_A and plan.send_lora_A):
        raise StrategyError(
            f"strategy '{strategy.name}' keeps A frozen at the shared initial adapter, which clients "
            "starting from their own adapters (lora.client_ranks mixed or lora.init = 'per_client') "
            "do not have; use another strategy or lora.init = 'shared'"
        )


def round_init_seed(run_seed: int, rnd: int) -> int:
    """The seed every client uses for a fresh LoRA init in round ``rnd`` of a run seeded ``run_seed``."""
    return run_seed * 100_003 + rnd


class FederatedRun:
    """Runs ``config.run.rounds`` rounds against a Flower ``Grid`` and writes the run directory."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        console: Console | None = None,
        splits: Splits | None = None,
    ) -> None:
        """Set up everything that can fail before any client is contacted (``splits``: the
        dataset if the caller has already loaded it)."""
        self.config = config
        self.run_dir = Path(run_dir)
        check_run_dir(self.run_dir, resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_key = run_key(self.run_dir, resume)
        self.console = console or Console()
        self.strategy = build_strategy(config)
        check_ranks(config, self.strategy)
        self.task = get_task(config.model.task)
        check_rank_fits(config.model.name, self.task.auto_model, config.lora)
        self.secure = SecureAggregation(config, self.strategy) if config.server.secure_aggregation else None
        self.splits = splits or self.task.splits(config.data, config.run.seed)
        self.client_config = config.client_config(data=config.data.replace(labels=self.splits.label_names))
        self.recorder = RunRecorder(self.run_dir)
        self.trackers = open_trackers(config, self.run_dir)  # before any round: a missing library fails now
        self.evaluator = make_evaluator(config, self.splits) if config.server.evaluate else None
        self.rng = random.Random(config.run.seed)
        self.state = GlobalState()
        self.identities: dict[int, str] = {}  # Flower node id -> stable client id
        self.nodes: dict[str, int] = {}  # stable client id -> its latest Flower node id
        self.last_clients: list[str] = []  # whose replies made the last round's result (same_clients)
        self.limits = ReplyLimits.from_config(config.server)
        # A private strategy (dp) samples its own clients, runs each round once with whatever
        # arrives, and nothing per client reaches the logs. The norm screen is off: refusing a
        # reply for its norm relative to the others' would let one client's update change whether
        # another's counts, which clipping alone bounds.
        self.private = self.strategy.private
        if self.private:
            self.limits.max_norm_ratio = 0.0
        if self.private and config.calibration.method != "none":
            raise StrategyError(
                f"strategy '{self.strategy.name}' is private, and calibration.method = "
                f"'{config.calibration.method}' sends each client's per-class feature moments unprotected; "
                "set calibration.method = 'none'"
            )
        if (
            config.calibration.method != "none"
            and self.strategy.client_instructions(1, GlobalState()).personal_B
        ):
            raise StrategyError(
                f"strategy '{self.strategy.name}' keeps B on each client, so the global model CCVR would "
                "calibrate is one no client uses; set calibration.method = 'none'"
            )
        if resume:
            self._resume()
        else:
            (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))

    def _record(self, row: dict[str, Any]) -> None:
        self.recorder.record(row)
        for tracker in self.trackers:
            tracker.round(row)

    def init_seed(self, rnd: int) -> int:
        return round_init_seed(self.config.run.seed, rnd)

    def _instructions(self, rnd: int, init_seed: int, plan: ClientPlan) -> RoundInstructions:
        return RoundInstructions(rnd, init_seed, plan, self.client_config, self.run_key)

    def run(self, grid: Grid) -> dict[str, Any]:
        started = time.perf_counter()
        if self.state.round == 0:
            self._fetch_initial_adapter(grid)
            self.state = self.strategy.initial_state(self.state, self.config.run.seed)
            if self.evaluator is not None:
                row = {"round": 0, **self.evaluator(self.state, self.init_seed(1))}
                self._record(row)
                print_round(self.console, row, self.config.run.rounds)
        stopped = None
        for rnd in range(self.state.round + 1, self.config.run.rounds + 1):
            try:
                plan = self.strategy.client_instructions(rnd, self.state)
                if self.config.train.freeze_head:  # the head stays at the global one: not trained, not sent
                    plan = replace(plan, train_extras=False)
            except StopFederation as stop:
                stopped = f"stopped before round {rnd}: {stop}"
                self.console.print(f"[bold yellow]{stopped}[/bold yellow]")
                break
            self._run_round(grid, rnd, plan)
        calibrated = any("calibration" in r for r in self.recorder.rounds)  # before a resume
        if self.config.calibration.method == "ccvr" and not calibrated:
            self.calibrate(grid)
        return self._finish(time.perf_counter() - started, stopped)

    def calibrate(self, grid: Grid) -> None:
        """CCVR after the last round, on every connected client (``server.calibration``); its row
        follows the last round's in ``metrics.jsonl``, with the calibrated head's evaluation."""
        rnd = self.state.round
        nodes = self._sample(grid, everyone=True)
        instructions = self._instructions(rnd, self.init_seed(rnd + 1), ClientPlan())
        content = encode_train_message(self.state, instructions)
        timeout, seed = self.config.server.round_timeout, self.config.run.seed
        try:
            state, outcome = calibrate(
                grid, {n: self.identities[n] for n in nodes}, content, self.state, self.config.calibration,
                seed, timeout,
            )  # fmt: skip
        except CalibrationFailed as exc:
            raise RoundFailed(f"calibration after round {rnd}: {exc}") from None
        self.state = state
        row = outcome.row(rnd)
        if self.evaluator is not None:
            row |= self.evaluator(self.state, self.init_seed(rnd + 1))
        save_checkpoint(self.run_dir, self.state, self.rng.getstate())
        self._record(row)
        scores = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("eval_"))
        self.console.print(f"calibrated the head (CCVR) on {outcome.clients} clients' moments  {scores}")

    def _fetch_initial_adapter(self, grid: Grid) -> None:
        """Make the untrained global adapter explicit: ask one client for its seeded init.

        Skipped when clients start from their own adapters (``fresh_starts``: mixed ranks under a
        strategy without ``mixed_ranks``, or ``lora.init = "per_client"``): there is no single
        adapter then, and each client starts round 1 from its own seeded init
        (``GlobalState.adapter is None``). Under ``mixed_ranks`` the adapter is at ``lora.rank``.
        """
        if fresh_starts(self.config, self.strategy):
            return
        node = self._sample(grid, count=1)[0]
        instructions = self._instructions(0, self.init_seed(1), ClientPlan())
        content = encode_train_message(GlobalState(), instructions)
        message = Message(content=content, message_type="query.initial_adapter", dst_node_id=node)
        replies = list(grid.send_and_receive([message], timeout=self.config.server.round_timeout))
        if not replies or replies[0].has_error():
            reason = replies[0].error.reason if replies else "no reply"
            raise RoundFailed(f"could not get the initial adapter from node {node}: {reason}")
        initial = decode_state(replies[0].content)
        self.state = GlobalState(adapter=initial.adapter, extras=initial.extras)

    def _run_round(self, grid: Grid, rnd: int, plan: ClientPlan) -> None:
        t0 = time.perf_counter()
        attempts = 1 if self.private else self.config.server.max_retries + 1
        need = 0 if self.private else self.config.min_replies
        earlier: list[dict[str, Any]] = []  # the drops of the attempts that were retried
        for attempt in range(1, attempts + 1):
            outcome = self._attempt(grid, rnd, plan)
            outcome.dropped = [drop | {"attempt": attempt} for drop in outcome.dropped]
            if outcome.replies.count >= need:
                outcome.dropped = earlier + outcome.dropped  # every attempt's drops are recorded
                break
            earlier += outcome.dropped
            self.console.print(
                f"[yellow]round {rnd} attempt {attempt}: {outcome.replies.count} valid replies, "
                f"need {self.config.min_replies}; retrying[/yellow]",
                soft_wrap=True,
            )
        else:
            raise RoundFailed(
                f"round {rnd} got fewer than {self.config.min_replies} valid replies in "
                f"{attempt} attempts; check the clients' logs or lower server.min_replies"
            )
        aggregation_started = time.perf_counter()
        if outcome.replies.count == 0 and not self.private:  # server.min_replies = 0: no update
            self.strategy.empty_round(rnd)
            state = replace(self.state)
        else:
            state = outcome.replies.aggregate()
        aggregation_seconds = time.perf_counter() - aggregation_started
        state.round = rnd
        state.strategy_state = self.strategy.state_dict()
        self.state = state
        self.limits.previous_norms = outcome.replies.norms
        self.last_clients = [client for client, *_ in outcome.replies.accepted]
        record = RoundRecord(rnd, attempt, aggregation_seconds, self._participation(outcome))
        if isinstance(outcome.replies, RoundReplies) and not self.private:
            record.diagnostics = outcome.replies.diagnostics(state)
        record.strategy = dict(self.strategy.last_metrics)
        if self.evaluator is not None:
            record.evaluation = self.evaluator(self.state, self.init_seed(rnd + 1))
        record.seconds = time.perf_counter() - t0
        row = record.row()
        if self.private:  # the secret stream's advance is saved before anything of the round is
            # released: a crash in between must not redo the round with the same noise on other updates
            save_checkpoint(self.run_dir, self.state, self.rng.getstate())
            self._record(row)
        else:  # the row first: a crash before the checkpoint redoes the round, the row with it
            self._record(row)
            save_checkpoint(self.run_dir, self.state, self.rng.getstate())
        print_round(self.console, row, self.config.run.rounds)

    def _participation(self, outcome: RoundOutcome) -> Participation | None:
        """Who took part in the round and how each fared; None under dp (nothing per client)."""
        if self.private:
            return None
        replies = outcome.replies
        summaries = [self._reply_summary(*accepted) for accepted in replies.accepted]
        for summary in summaries:  # the accuracy of the model each client started from, on its own rows
            if isinstance(replies, RoundReplies) and summary["client"] in replies.client_eval:
                summary["client_eval_accuracy"] = replies.client_eval[summary["client"]]
        return Participation(
            sampled=outcome.sampled,
            aggregated=replies.count,
            dropped=outcome.dropped,
            replies=summaries,
            rejected=replies.rejected,
            update_norms=replies.norms,
            train_loss=replies.train_loss,
            bytes_down=outcome.bytes_down,
            bytes_up=outcome.bytes_up,
        )

    def _attempt(self, grid: Grid, rnd: int, plan: ClientPlan) -> RoundOutcome:
        nodes = self._previous_nodes(grid, rnd) if plan.same_clients else self._sample(grid, rnd=rnd)
        instructions = self._instructions(rnd, self.init_seed(rnd), plan)
        content = encode_train_message(self.state, instructions)
        if self.secure is not None:
            return self._log_drops(rnd, self._secure_attempt(grid, rnd, nodes, content, plan))
        messages = [
            Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for node in nodes
        ]
        outcome = RoundOutcome(
            RoundReplies(self.strategy, rnd, self.state, self.limits, plan),
            sampled=len(nodes),
            bytes_down=record_nbytes(content) * len(nodes),
        )
        unanswered = set(nodes)
        with RoundProgress(self.console, rnd, None if self.private else len(nodes)) as progress:
            for reply in receive(grid, messages, self.config.server.round_timeout):
                node = reply.metadata.src_node_id
                unanswered.discard(node)
                update = self._decode(reply, outcome)
                del reply  # free the reply's bytes before the next one arrives: O(adapter) memory
                reason = outcome.replies.offer(update) if isinstance(update, ClientUpdate) else update
                if reason:
                    outcome.dropped.append(self._drop(node, reason))
                progress.reply()
        for node in sorted(unanswered):
            outcome.dropped.append(self._drop(node, f"no reply within {self.config.server.round_timeout:g}s"))
        for client, reason in outcome.replies.close():
            outcome.dropped.append(self._drop(self.nodes[client], f"invalid update: {reason}"))
        return self._log_drops(rnd, outcome)

    def _secure_attempt(
        self, grid: Grid, rnd: int, nodes: list[int], content: RecordDict, plan: ClientPlan
    ) -> RoundOutcome:
        """An attempt through secure aggregation (``server.secure``): the server sees only the sum."""
        assert self.secure is not None
        attempt = self.secure.attempt(grid, rnd, nodes, content, self.state, plan)
        # secure aggregation counts nodes; name them by client id, as the plain path does
        attempt.replies.accepted = [(self.identities[int(n)], *rest) for n, *rest in attempt.replies.accepted]
        outcome = RoundOutcome(attempt.replies, sampled=len(nodes))
        outcome.bytes_down, outcome.bytes_up = attempt.bytes_down, attempt.bytes_up
        outcome.dropped = [self._drop(node, reason) for node, reason in attempt.dropped]
        return outcome

    def _log_drops(self, rnd: int, outcome: RoundOutcome) -> RoundOutcome:
        if self.private:
            return outcome
        for drop in outcome.dropped:
            who = f"{drop['client']} (node {drop['node']})"
            line = f"[yellow]round {rnd}: dropped {who}: {drop['reason']}[/yellow]"
            self.console.print(line, soft_wrap=True)
        return outcome

    def _reply_summary(self, client: str, num_examples: int, train_loss: float | None) -> dict[str, Any]:
        node = str(self.nodes.get(client, "?"))
        return {"client": client, "node": node, "num_examples": num_examples, "train_loss": train_loss}

    def _decode(self, reply: Message, outcome: RoundOutcome) -> ClientUpdate | str:
        """The update a reply carries, or the reason to drop it."""
        if reply.has_error():
            return client_error(reply)
        outcome.bytes_up += record_nbytes(reply.content)
        return outcome.replies.decode(reply.content, self.identities[reply.metadata.src_node_id])

    def _drop(self, node: int, reason: str) -> dict[str, str]:
        return {"node": str(node), "client": self.identities.get(node, "?"), "reason": reason}

    def _sample(
        self, grid: Grid, count: int | None = None, rnd: int = 0, everyone: bool = False
    ) -> list[int]:
        """``count`` clients, every one with ``everyone``, or ``fraction`` of those connected and
        identified (at least ``min_clients``: nodes still starting, that did not answer
        ``identify`` in time, are asked again until enough have)."""
        need = self.config.server.min_clients
        wait = self.config.server.connect_timeout
        deadline = time.monotonic() + wait
        while True:
            nodes = sorted(grid.get_node_ids())
            self._identify(grid, nodes)
            # one node per client: a client that reconnected is its newest node, the old one is gone
            current = (n for n in nodes if n in self.identities and self.nodes[self.identities[n]] == n)
            known = sorted(current, key=self.identities.__getitem__)
            if len(known) >= need:
                break
            if time.monotonic() > deadline:
                raise RoundFailed(
                    f"only {len(known)} clients connected and identified after {wait:g}s, "
                    f"server.min_clients is {need}; start more clients, lower it, or raise "
                    "server.connect_timeout"
                )
            time.sleep(1.0)
        if everyone:
            return known
        selected = self.strategy.select_clients(rnd, known) if count is None else None
        if selected is not None:
            return selected
        k = count or min(len(known), max(need, math.ceil(self.config.server.fraction * len(known))))
        return self.rng.sample(known, k)

    def _previous_nodes(self, grid: Grid, rnd: int) -> list[int]:
        """The current nodes of the clients whose replies made round ``rnd - 1``'s result (a plan's
        ``same_clients``): every one of them once connected and identified, or those that are when
        ``server.connect_timeout`` has passed."""
        deadline = time.monotonic() + self.config.server.connect_timeout
        while True:
            connected = sorted(grid.get_node_ids())
            self._identify(grid, connected)
            nodes = [self.nodes[c] for c in self.last_clients if self.nodes.get(c) in connected]
            if len(nodes) == len(self.last_clients) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if not nodes:
            raise RoundFailed(
                f"round {rnd} must go to the clients of round {rnd - 1} ({len(self.last_clients)} of them), "
                "and none is connected; restart them and resume the run"
            )
        return nodes

    def _identify(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes seen for the first time for their stable client id (one small query each)."""
        new = [n for n in nodes if n not in self.identities]
        if not new:
            return
        queries = [Message(content=RecordDict(), message_type="query.identify", dst_node_id=n) for n in new]
        for reply in grid.send_and_receive(queries, timeout=self.config.server.round_timeout):
            if not reply.has_error():
                try:
                    client = decode_identity(reply.content)
                except WireError:
                    continue  # a node that cannot say who it is is not sampled
                self.identities[reply.metadata.src_node_id] = client
                self.nodes[client] = reply.metadata.src_node_id

    def _resume(self) -> None:
        if not (self.run_dir / CHECKPOINT_FILE).is_file():
            self.recorder.truncate_after(-1)
            self.console.print(
                f"{self.run_dir} stopped before its first round ended; starting it again", soft_wrap=True
            )
            return
        checkpoint = load_checkpoint(self.run_dir)
        self.state = checkpoint.state
        self.rng.setstate(checkpoint.rng_state)
        self.strategy.load_state_dict(self.state.strategy_state)
        self.recorder.truncate_after(self.state.round)
        last = self.recorder.rounds[-1] if self.recorder.rounds else {}
        self.limits.previous_norms = last.get("update_norms", [])  # the norm screen's starting pool
        self.last_clients = [reply["client"] for reply in last.get("replies", [])]
        self.console.print(f"resuming {self.run_dir} after round {self.state.round}", soft_wrap=True)

    def _finish(self, seconds: float, stopped: str | None) -> dict[str, Any]:
        base = resolve_model(self.config.model.name)
        adapter_dir = export_adapter(self.state, self.run_dir / "adapter", base, self.task.peft_type)
        rounds = [r for r in self.recorder.rounds if r["round"] > 0]
        evals = [r for r in self.recorder.rounds if "eval_loss" in r]
        summary: dict[str, Any] = {
            "rounds": self.state.round,
            "strategy": self.strategy.name,
            "seconds": round(seconds, 2),
            "bytes_up": sum(r.get("bytes_up", 0) for r in rounds),
            "bytes_down": sum(r.get("bytes_down", 0) for r in rounds),
            "clients_dropped": sum(len(r.get("dropped", [])) for r in rounds),
            "replies_rejected": sum(r.get("rejected", 0) for r in rounds),
            "adapter": str(adapter_dir),
            "base_model": base,
            "label_names": self.splits.label_names,
        }
        trained_on = {r["client"]: r["num_examples"] for row in rounds for r in row.get("replies", [])}
        if trained_on:
            summary["examples_trained_on"] = sum(trained_on.values())
        if self.config.run.export_merged:
            labels = list(self.splits.label_names) if self.task.labelled else None
            summary["merged_model"] = str(export_merged(adapter_dir, base, self.run_dir / "merged", labels))
        if stopped:
            summary["stopped"] = stopped
        for key in EVAL_METRICS:
            if evals and key in evals[-1]:
                summary[f"initial_{key}"] = evals[0][key]
                summary[f"final_{key}"] = evals[-1][key]
        if self.task.labelled:
            write_labels(adapter_dir, self.splits.label_names)
        write_card(
            adapter_dir, self.config, summary, self.recorder.rounds[-1] if self.recorder.rounds else {}
        )
        self.recorder.write_summary(summary)
        for tracker in self.trackers:
            tracker.finish(summary, adapter_dir)
        self.recorder.plot()
        print_summary(self.console, self.run_dir, summary)
        return summary
