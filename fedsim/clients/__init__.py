"""Local trainers: what a client does with the arrays it receives."""

from fedsim.clients.base import Trainer, TrainOutput, predict

__all__ = ["TrainOutput", "Trainer", "predict"]
