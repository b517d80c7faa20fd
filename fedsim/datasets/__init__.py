"""Datasets: offline sources, Hugging Face sources, partitioning into clients."""

from fedsim.datasets.base import ArraySplits, check_splits
from fedsim.datasets.federated import ClientData, FederatedData, build_federated_data

__all__ = ["ArraySplits", "ClientData", "FederatedData", "build_federated_data", "check_splits"]
