"""fedsim: federated-learning simulation on Flower's Message API."""

__version__ = "0.1.0"
