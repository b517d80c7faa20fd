"""`evaluation.finetune_epochs`: every client's evaluated model scored again after a local
fine-tune, for any trainer that says which weights it evaluates."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.base import predict
from fedsim.config import compose
from fedsim.datasets.federated import build_federated_data
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.metrics import classification_metrics
from fedsim.runtime import build_trainer, initial_model, preflight
from tests.conftest import TINY, read_metrics

PERSONALIZED = {
    "fedper": [], "lg_fedavg": [], "fedrep": [], "fedbn": ["model=resmlp"], "ditto": [],
    "apfl": [], "pfedme": ["client.personal_steps=2"], "perfedavg": [], "fedbabu": [],
}


@pytest.mark.parametrize("method", list(PERSONALIZED))
def test_evaluated_weights_are_the_model_a_trainer_scores(tmp_path, method):
    """After a round of training (the client has its personal state), the model loaded with
    `evaluated_weights` scores exactly the accuracy the trainer's own evaluation reports:
    the fine-tune starts from the client's own model, not from the global one."""
    cfg = compose([*TINY, f"method={method}", *PERSONALIZED[method],
                   f"output_dir={tmp_path}"])
    data = build_federated_data(cfg)
    trainer = build_trainer(cfg, data)
    arrays = ArrayRecord(initial_model(cfg, data).state_dict())
    client = data.client(1)
    config = ConfigRecord({"server-round": 1})
    state = trainer.train(arrays, config, client, RecordDict()).state
    own = trainer.evaluate(arrays, ConfigRecord({"server-round": 2}), client, state)
    weights = trainer.evaluated_weights(arrays, ConfigRecord({"server-round": 2}), client, state)
    model = initial_model(cfg, data)
    model.load_state_dict({**model.state_dict(), **{k: v.cpu() for k, v in weights.items()}})
    scored = classification_metrics(predict(model, client.x_test), client.y_test)
    assert scored["accuracy"] == pytest.approx(own["accuracy"], abs=1e-12)


def test_finetuning_at_evaluation_leaves_training_untouched(tiny_cfg):
    """Same path, same seed for training: the server's model is bit-identical with and
    without the evaluation fine-tune; the fine-tuned scores come in addition."""
    plain = tiny_cfg("num_rounds=3")
    tuned = tiny_cfg("num_rounds=3", "evaluation.finetune_epochs=2")
    run_experiment(plain)
    run_experiment(tuned)
    rows = read_metrics(tuned.output_dir)
    assert [r.get("server/loss") for r in read_metrics(plain.output_dir)] == \
        [r.get("server/loss") for r in rows]
    evaluated = [r for r in rows if r["round"] >= 1]
    assert all(0 <= r["client_eval/mean-finetuned-accuracy"] <= 1 for r in evaluated)
    assert all("client_eval/mean-accuracy" in r for r in evaluated)


def test_finetuning_changes_the_weights_it_scores(tmp_path):
    cfg = compose([*TINY, f"output_dir={tmp_path}", "client.lr=0.5"])
    data = build_federated_data(cfg)
    trainer = build_trainer(cfg, data)
    arrays = ArrayRecord(initial_model(cfg, data).state_dict())
    client = data.client(0)
    config = ConfigRecord({"server-round": 1})
    before = trainer.evaluate(arrays, config, client, RecordDict())
    after = trainer.finetuned_metrics(arrays, config, client, RecordDict(), epochs=5)
    assert after["finetuned-loss"] != before["loss"]
    assert set(after) == {f"finetuned-{k}" for k in before if k != "num-examples"}
    reloaded = trainer.load_model(arrays).state_dict()  # the trainer's own model untouched
    assert all(torch.equal(reloaded[k], v) for k, v in arrays.to_torch_state_dict().items())


@pytest.mark.parametrize("overrides", [
    ["evaluation.finetune_epochs=-1"],
    ["evaluation.finetune_epochs=2", "method=fedloge"],
    ["evaluation.finetune_epochs=2", "method=frl"],
])
def test_finetuning_is_refused_where_it_cannot_work(tiny_cfg, overrides):
    with pytest.raises(ConfigError, match=r"^evaluation\.finetune_epochs must be"):
        preflight(tiny_cfg(*overrides))
