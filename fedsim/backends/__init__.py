"""Execution backends: where the ClientApps of a simulated federation run."""
