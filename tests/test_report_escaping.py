"""report.html is a file anyone may open in a browser: every field a board or a user supplied
(a SuperNode's name, its engine, failure reasons, data notes, class names, the run config, the
run folder's name, the numbers of a run folder copied from elsewhere) is written escaped."""

from __future__ import annotations

import json
from pathlib import Path

from server.report import _html as report_html
from server.run_folder import RunLog
from server.run_folder_view import RunView

SCRIPT = "<script>alert(1)</script>"


def _hostile_run_folder(root: Path) -> Path:
    """A run folder whose every free-text field, and some numeric ones, holds markup."""
    run_dir = root / f"run{SCRIPT.replace('/', '')}"
    log = RunLog(run_dir)
    classes = [f"ok{SCRIPT}", "crack"]
    run_config = {"num-server-rounds": 2, "dp-clipping-norm": 1.0, "dp-delta": SCRIPT, "class-names": SCRIPT}
    log.write_config(
        {"run_config": run_config, "classes": classes, "backbone": {"name": SCRIPT, "fingerprint": SCRIPT}}
    )
    log.board_names[1] = f"board{SCRIPT}"
    log.event("run-start", backbone=SCRIPT, fingerprint=SCRIPT, engine=SCRIPT)
    log.event("client-reply", round=1, phase="train", node=1, engine=SCRIPT, notes=SCRIPT, metrics={})
    log.event("client-failed", round=1, phase=SCRIPT, node=1, reason=SCRIPT)
    log.event("client-rejected", round=1, phase="train", node=2, reason=SCRIPT)
    numbers = {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.0, "seconds": 0.1, "bytes_down": 1, "bytes_up": 1}
    crafted = {"clients_ok": SCRIPT, "clients_failed": SCRIPT, "clients_rejected": SCRIPT, "dp_epsilon": SCRIPT}
    log.event("round-end", round=1, **numbers, **crafted)
    log.event("dp-release", round=1, epsilon=1.5, delta=SCRIPT)
    log.event("run-end", stopped=SCRIPT)
    log.close()
    point = {"name": SCRIPT, "target_precision": 0.9, "recall": 0.5, "precision": 0.9, "threshold": 0.3}
    summary = {"model_dir": SCRIPT, "final": {"accuracy": 0.5}, "operating_points": [point | {"curve": {}}]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_every_field_of_the_report_is_escaped(tmp_path: Path) -> None:
    page = report_html(RunView(_hostile_run_folder(tmp_path)).state())
    assert "&lt;script&gt;" in page  # the fields are there ...
    assert "<script" not in page.lower()  # ... as text, never as markup
