"""Central evaluation of the global state on the held-out split (the server's only model use)."""

from __future__ import annotations

from fedpeft.config import RunConfig
from fedpeft.data import Splits
from fedpeft.lora import AdapterHost
from fedpeft.models import ClassifierSpec, load_classifier, load_tokenizer
from fedpeft.state import GlobalState
from fedpeft.training import encode, evaluate


class CentralEvaluator:
    """Loads the base model once and scores any ``GlobalState`` on the test split."""

    def __init__(self, config: RunConfig, splits: Splits) -> None:
        if splits.test is None:
            raise ValueError("central evaluation needs a held-out split: set data.test_source")
        test = splits.test
        if config.data.test_limit is not None:
            test = test.select(range(min(config.data.test_limit, len(test))))
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
