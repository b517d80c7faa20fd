"""What the server's reply check costs next to aggregating the same replies.

Every train reply is checked (`fedsim.reply_check.reply_problem`: records, keys,
shapes, dtypes, finite values, sample count) before a strategy sees it. This
times the check for one W1 round (20 replies of the W1 MLP, 40-100-100-10)
against Flower's FedAvg aggregating those replies, in one process.

    python scripts/bench_reply_check.py [--clients 20] [--repeat 200]
"""

from __future__ import annotations

import argparse
import logging
import time

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsim.models import MLP
from fedsim.reply_check import reply_problem, same_arrays_problem


def w1_round(clients: int) -> tuple[ArrayRecord, list[Message]]:
    """The global arrays and `clients` replies with the W1 model's arrays."""
    sent = ArrayRecord(MLP([40], 10, hidden=[100, 100]).state_dict())
    replies = []
    for node in range(1, clients + 1):
        content = RecordDict({
            "arrays": ArrayRecord(MLP([40], 10, hidden=[100, 100]).state_dict()),
            "metrics": MetricRecord({"num-examples": 40, "train_loss": 0.3}),
        })
        reply = Message(content, dst_node_id=node, message_type="train")
        reply.metadata.__dict__["_src_node_id"] = node
        replies.append(reply)
    return sent, replies


def seconds_per_round(work, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        work()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every aggregation
    sent, replies = w1_round(args.clients)
    strategy = FedAvg()

    def check() -> None:
        arrays = {key: array.numpy() for key, array in sent.items()}
        for reply in replies:
            reply_problem(reply.content, arrays, "num-examples", 10**6, same_arrays_problem)

    def aggregate() -> None:
        strategy.aggregate_train(1, replies)

    check_s = seconds_per_round(check, args.repeat)
    aggregate_s = seconds_per_round(aggregate, args.repeat)
    print(f"{args.clients} replies of the W1 MLP, mean of {args.repeat} rounds")
    print(f"reply check   {check_s * 1e3:7.2f} ms a round ({check_s / args.clients * 1e6:.0f} us "
          "a reply)")
    print(f"FedAvg        {aggregate_s * 1e3:7.2f} ms a round")
    print(f"check / aggregation: {check_s / aggregate_s:.2f}x")


if __name__ == "__main__":
    main()
