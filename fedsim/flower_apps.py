"""A Flower ClientApp of the user's own (`client_app=module:attribute`), loaded by name.

fedsim's simulated nodes then run that app instead of fedsim's trainers; fedsim's
ClientApp hands each message to it (`fedsim.client_app`). The module is imported
as Python imports any module: from the installed packages, or from the working
directory, which a run puts on the import path of every process it starts
(`fedsim.experiment.importable_working_directory`).
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from flwr.clientapp import ClientApp

from fedsim.errors import ConfigError

FIELD = "client_app"


@lru_cache(maxsize=4)
def load_client_app(spec: str) -> ClientApp:
    """The ClientApp named by `module:attribute`, or a `ConfigError` saying what is wrong."""
    module_name, colon, attribute = str(spec).partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"{FIELD} must be module:attribute naming a Flower ClientApp, e.g. "
                          f"task:app (got {spec!r})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{FIELD}: cannot import '{module_name}' ({err}); it must be "
                          "importable from the working directory or an installed package"
                          ) from None
    app = module
    for part in attribute.split("."):
        if not hasattr(app, part):
            raise ConfigError(f"{FIELD}: '{module_name}' has no attribute '{attribute}'")
        app = getattr(app, part)
    if not isinstance(app, ClientApp):
        raise ConfigError(f"{FIELD}: {spec} is a {type(app).__name__}, not a "
                          "flwr.clientapp.ClientApp")
    return app


def clients_description(cfg) -> str:
    """What the run's clients are, for the summary: fedsim's trainer or a foreign app."""
    if cfg.get(FIELD):
        return f"ClientApp {cfg[FIELD]}"
    return f"fedsim trainer {cfg.client._target_}"
