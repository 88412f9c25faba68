"""Flower ServerApp: reads the run config once and hands over to plain-Python code."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.logs import configure_logging
from server.core import ServerRun
from server.strategy import from_record, make_strategy, to_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Prepare the backbone and test split, run the strategy, write the summary."""
    configure_logging()
    config = RunConfig.from_flower(context.run_config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    run = ServerRun.prepare(config, flower_run_id=context.run_id)
    strategy = make_strategy(config, run)
    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(run.initial_head()),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord(run.instructions()),
        evaluate_config=ConfigRecord(run.instructions()),
        evaluate_fn=strategy.end_round,
    )
    # No accepted update in any round leaves Flower's result empty: report the initial head then.
    run.finish(from_record(result.arrays) if result.arrays else run.initial_head())
    run.run_log.close()
