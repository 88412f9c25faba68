"""Flower ServerApp: reads the run config once and hands over to plain-Python code."""

from __future__ import annotations

import logging

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.logs import configure_logging
from server.edgesplit_strategy import EdgeSplitStrategy
from server.nodes import PromptGrid, RunStopped
from server.outcome import finish
from server.round_loop import RoundLoop
from server.server_run import ServerRun

app = ServerApp()
log = logging.getLogger(__name__)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Prepare the backbone and test split, run the rounds, write the summary."""
    configure_logging()
    config = RunConfig.from_flower(context.run_config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    run = ServerRun.prepare(config, flower_run_id=context.run_id)
    rounds = RoundLoop(EdgeSplitStrategy.for_run(run), run)
    try:
        finish(run, rounds.run_rounds(PromptGrid(grid, on_event=run.run_log.event)))
    except RunStopped as stop:
        # Record what was reached (summary, report, checkpoint stay), then fail the Flower run.
        log.error("%s", stop)
        finish(run, rounds.global_head, stopped=str(stop))
        raise
    finally:
        run.run_log.close()
