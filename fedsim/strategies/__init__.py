"""fedsim's own aggregation strategies, each a subclass of a `flwr.serverapp.strategy` class.

Flower's baselines come from `flwr.serverapp.strategy`; `flower.py` subclasses those with
settings only to check them when they are built (see fedsim/conf/strategy/).
"""
