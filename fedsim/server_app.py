"""The fedsim ServerApp: reads the fedsim config from `run_config` and runs the strategy."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.config import from_run_config
from fedsim.server import run_server


def make_server_app(config_json: str | None = None) -> ServerApp:
    """A ServerApp for the config in `run_config` (or `config_json` when it has none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, from_run_config(context.run_config, config_json))

    return app


app = make_server_app()
