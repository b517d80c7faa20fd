"""A stock Flower app, written only from Flower's documented Message-API idioms.

It imports nothing from fedsim: it stands for the ClientApp a user brings (the kind
Flower's PyTorch quickstart writes), with its own model, data loading and training
loop. It reads `lr` from the train message's config and `local-epochs` /
`batch-size` from the run config, and its data partition from the node config.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the name every PyTorch tutorial uses
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.datasets import load_digits
from torch import nn


class Net(nn.Module):
    """A small CNN for 8x8 digit images, built with no arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def load_data(partition_id: int, num_partitions: int):
    """This node's IID share of scikit-learn's digits: 80% to train, 20% to test."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    share = np.array_split(np.random.default_rng(42).permutation(len(y)), num_partitions)
    part = torch.from_numpy(share[partition_id])
    cut = int(0.8 * len(part))
    return (x[part[:cut]], y[part[:cut]]), (x[part[cut:]], y[part[cut:]])


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    (x, y), _ = load_data(context.node_config["partition-id"],
                          context.node_config["num-partitions"])
    lr = msg.content["config"]["lr"]
    epochs = int(context.run_config["local-epochs"])
    batch_size = int(context.run_config["batch-size"])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(batch_size):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": total / batches, "num-examples": len(y)}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, (x, y) = load_data(context.node_config["partition-id"],
                          context.node_config["num-partitions"])
    model.eval()
    with torch.no_grad():
        logits = model(x)
    metrics = {"eval_loss": F.cross_entropy(logits, y).item(),
               "eval_acc": (logits.argmax(1) == y).float().mean().item(),
               "num-examples": len(y)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
