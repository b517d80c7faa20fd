"""Differential privacy with an accountant: central (user-level) DP through Flower's
clipping wrappers, local (sample-level) DP-SGD through Opacus, and the epsilon spent
(`accounting`, on Google's dp-accounting) in every round's metrics."""
