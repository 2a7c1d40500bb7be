"""ecgtwin ServerApp: the three stages in order, each for its rounds, with checkpoints and resume.

Flower's Strategy.start has no checkpoint/resume, so the ServerApp runs its own loop (server.loop) and
uses the strategy objects of flwr.serverapp.strategy only to aggregate.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.loop import run_federation


def make_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; `run_config` fills in keys the context lacks (flwr.simulation.run_simulation gives the
    apps an empty run config)."""
    app = ServerApp()
    defaults = dict(run_config or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, {**defaults, **dict(context.run_config)}, flower_run_id=context.run_id)

    return app


app = make_app()
