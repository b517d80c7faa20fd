"""fedsim's own aggregation strategies, each a subclass of a `flwr.serverapp.strategy` class.

Flower's baselines are used directly from `flwr.serverapp.strategy` (see fedsim/conf/strategy/).
"""
