"""Central evaluation of the global state on the held-out split (the server's only model use)."""

from __future__ import annotations

from datasets import Dataset

from fedpeft.config import ConfigError, RunConfig
from fedpeft.data import Splits
from fedpeft.generation import exact_match, generate, get_extractor
from fedpeft.instructions import encode_chats
from fedpeft.lora import AdapterHost
from fedpeft.models import CausalLMSpec, ClassifierSpec, load_causal_lm, load_classifier, load_tokenizer
from fedpeft.state import GlobalState
from fedpeft.tasks import get_task
from fedpeft.training import encode, evaluate, evaluate_lm


def make_evaluator(config: RunConfig, splits: Splits) -> CentralEvaluator | LMEvaluator:
    """The evaluator for ``config.model.task``."""
    return (CentralEvaluator if get_task(config.model.task).labelled else LMEvaluator)(config, splits)


def held_out(config: RunConfig, splits: Splits) -> Dataset:
    """The held-out rows the server scores: the test split, capped at ``data.test_limit``."""
    if splits.test is None:
        raise ConfigError(
            "central evaluation needs a held-out split: set data.test_source or server.evaluate = false"
        )
    limit = config.data.test_limit
    return splits.test if limit is None else splits.test.select(range(min(limit, len(splits.test))))


class CentralEvaluator:
    """Loads the base model once and scores any ``GlobalState`` on the test split."""

    def __init__(self, config: RunConfig, splits: Splits) -> None:
        test = held_out(config, splits)
        spec = ClassifierSpec.from_config(
            config.model.name, len(splits.label_names), config.lora, config.run.seed
        )
        self.host = AdapterHost(load_classifier(spec))
        self.tokenizer = load_tokenizer(config.model.name)
        self.data = encode(test, self.tokenizer, config.model.max_length)
        self.batch_size = config.train.eval_batch_size

    def __call__(self, state: GlobalState, init_seed: int) -> dict[str, float]:
        self.host.load_state(state, init_seed=init_seed)
        scores = evaluate(self.host.model, self.tokenizer, self.data, self.batch_size)
        return {"eval_loss": scores["loss"], "eval_accuracy": scores["accuracy"]}


class LMEvaluator:
    """Held-out response loss and perplexity of a causal LM, and optionally greedy-generation
    exact match (``[eval] generate = true``)."""

    def __init__(self, config: RunConfig, splits: Splits) -> None:
        test = held_out(config, splits)
        self.chats = list(test["messages"])
        self.tokenizer = load_tokenizer(config.model.name)
        self.data = encode_chats(self.chats, self.tokenizer, config.model.max_length)
        self.extract = get_extractor(config.eval.extractor) if config.eval.generate else None
        self.host = AdapterHost(
            load_causal_lm(CausalLMSpec.from_config(config.model, config.lora, config.run.seed))
        )
        self.config = config

    def __call__(self, state: GlobalState, init_seed: int) -> dict[str, float]:
        self.host.load_state(state, init_seed=init_seed)
        batch_size = self.config.train.eval_batch_size
        scores = evaluate_lm(self.host.model, self.tokenizer, self.data, batch_size)
        row = {"eval_loss": scores["loss"], "eval_perplexity": scores["perplexity"]}
        if self.extract is not None:
            predictions = generate(
                self.host.model,
                self.tokenizer,
                self.chats,
                max_new_tokens=self.config.eval.max_new_tokens,
                batch_size=batch_size,
            )
            references = [chat[-1]["content"] for chat in self.chats]
            row["eval_exact_match"] = exact_match(predictions, references, self.extract)
        return row
