"""Local trainers: what a client does with the arrays it receives."""

from fedsim.clients.base import Trainer, TrainOutput, evaluate_model

__all__ = ["TrainOutput", "Trainer", "evaluate_model"]
