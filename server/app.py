"""Flower ServerApp: reads the run config once and hands over to plain-Python code."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.logs import configure_logging
from server.core import ServerRun
from server.strategy import from_record, make_strategy, to_record

app = ServerApp()
log = logging.getLogger(__name__)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Prepare the backbone and test split, run the strategy, write the summary."""
    configure_logging()
    config = RunConfig.from_flower(context.run_config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    run = ServerRun.prepare(config, flower_run_id=context.run_id)
    strategy = make_strategy(config, run)
    instructions = ConfigRecord(run.instructions())
    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(run.initial_head()),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=instructions,
        evaluate_config=ConfigRecord(run.instructions()),
        evaluate_fn=strategy.end_round,
    )
    final = result.arrays if result.arrays is not None and len(result.arrays) else None
    run.finish(from_record(final) if isinstance(final, ArrayRecord) else run.initial_head())
    run.run_log.close()
