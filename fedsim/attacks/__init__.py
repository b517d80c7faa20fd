"""Poisoning attacks on federated training (see `fedsim.attacks.base`)."""
