"""The static report of a run: ``report.html`` and PNG plots in the run folder, readable with no
server at all. Written at the end of every run, from the same view of the run folder as the
dashboard (``server/run_folder_view.py``); ``edgesplit report RUN_DIR`` writes it again, e.g. for a
run folder copied from another machine.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import Any

from server.run_folder_view import RunView

PLOTS = {"metrics": "report-metrics.png", "traffic": "report-traffic.png", "confusion": "report-confusion.png"}
CURVES_PLOT = "report-precision-recall.png"  # where the run reports operating points (ELPV, operating-classes)


def write_report(run_dir: Path) -> Path:
    """Write ``report.html`` and its plots into ``run_dir``; returns the report's path."""
    state = RunView(run_dir).state()
    _plot_metrics(state, run_dir / PLOTS["metrics"])
    _plot_traffic(state, run_dir / PLOTS["traffic"])
    _plot_confusion(state, run_dir / PLOTS["confusion"])
    if state.get("operating_points"):
        _plot_precision_recall(state, run_dir / CURVES_PLOT)
    path = run_dir / "report.html"
    temporary = path.with_name(".report.html.tmp")
    temporary.write_text(_html(state))
    temporary.replace(path)
    return path


def _figure(width: float = 9, height: float = 3.4) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def _plot_metrics(state: dict[str, Any], path: Path) -> None:
    plt, figure, axes = _figure()
    rounds = [r["round"] for r in state["rounds"]]
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("balanced_accuracy", "balanced accuracy")):
        axes.plot(rounds, [r.get(key) for r in state["rounds"]], marker="o", ms=3, label=label)
    axes.set(xlabel="round", ylabel="held-out score", ylim=(0, 1), title="Global head on the server's held-out split")
    loss_axes = axes.twinx()
    loss_axes.plot(rounds, [r["loss"] for r in state["rounds"]], color="grey", ls="--", label="loss")
    loss_axes.set_ylabel("loss")
    figure.legend(loc="lower left", bbox_to_anchor=(0.08, 0.2), fontsize=8)
    axes.grid(alpha=0.3)
    _whole_rounds(axes)
    _save(plt, figure, path)


def _plot_traffic(state: dict[str, Any], path: Path) -> None:
    plt, figure, axes = _figure()
    rounds = [r["round"] for r in state["rounds"]]
    axes.semilogy(rounds, [max(r["bytes_down"] or 1, 1) for r in state["rounds"]], marker="o", ms=3, label="down")
    axes.semilogy(rounds, [max(r["bytes_up"] or 1, 1) for r in state["rounds"]], marker="s", ms=3, label="up")
    failed = [(r["round"], r["clients_failed"] + (r["clients_rejected"] or 0)) for r in state["rounds"]]
    axes.set(xlabel="round", ylabel="bytes, all clients", title="Traffic per round (failed or rejected clients in red)")
    for server_round, count in failed:
        if count:
            axes.axvline(server_round, color="red", alpha=0.3)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3, which="both")
    _whole_rounds(axes)
    _save(plt, figure, path)


def _plot_confusion(state: dict[str, Any], path: Path) -> None:
    matrix, classes = state["confusion_matrix"], state["classes"]
    plt, figure, axes = _figure(4.8, 4.2)
    if matrix:
        axes.imshow(matrix, cmap="Blues")
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                axes.text(j, i, str(count), ha="center", va="center", fontsize=9)
        axes.set_xticks(range(len(classes)), classes)
        axes.set_yticks(range(len(classes)), classes)
    axes.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix, round {state['matrix_round']}")
    _save(plt, figure, path)


def _plot_precision_recall(state: dict[str, Any], path: Path) -> None:
    """The final head's precision-recall curve of each detector, its operating point marked."""
    plt, figure, axes = _figure(5.6, 4.2)
    for point in state["operating_points"]:
        curve = point["curve"]
        (line,) = axes.plot(curve["recall"], curve["precision"], label=point["name"])
        if point["recall"] > 0:
            axes.plot([point["recall"]], [point["precision"]], "o", color=line.get_color())
    target = state["operating_points"][0]["target_precision"]
    axes.axhline(target, color="grey", ls=":", lw=1)
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Final head, held-out images")
    axes.legend(fontsize=8, loc="lower left")
    axes.grid(alpha=0.3)
    _save(plt, figure, path)


def _whole_rounds(axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(plt: Any, figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


CLIENT_COLUMNS = (
    "node",
    "board",
    "engine",
    "samples",
    "rounds_joined",
    "train_seconds",
    "embed_seconds",
    "bytes_up",
    "bytes_down",
    "peak_rss_mb",
    "cpu_temp_c",
    "failures",
    "rejected",
    "last_problem",
)


def _facts(state: dict[str, Any]) -> list[tuple[str, Any]]:
    """The run's facts at the top of the report: what ran, and how well the final head scores (as
    plain text: ``_html`` escapes it)."""
    final = state.get("final") or {}
    scores = (_format(final.get(key, float("nan")), ".4f") for key in ("accuracy", "macro_f1", "balanced_accuracy"))
    recalls = zip(state["classes"], final.get("per_class_recall", []), strict=False)
    facts = [
        ("run folder", state["run_dir"]),
        ("status", state["status"]),
        ("backbone", f"{state['backbone'].get('name', '')} (engine {state['backbone'].get('engine', '')})"),
        ("fingerprint", state["backbone"].get("fingerprint", "")),
        ("final model", state.get("model_dir") or "not exported"),
        ("final accuracy / macro-F1 / balanced accuracy", " / ".join(scores)),
        ("final per-class recall", ", ".join(f"{name} {_format(recall, '.3f')}" for name, recall in recalls)),
        *(
            (
                f"recall at precision {_format(p['target_precision'], '.2f')}",
                f"{p['name']}: {_format(p['recall'], '.3f')} (precision {_format(p['precision'], '.3f')}, "
                f"threshold {_format(p['threshold'], '.3f')})",
            )
            for p in state.get("operating_points", [])
        ),
    ]
    privacy = state.get("privacy")
    if privacy:
        facts.append(
            (
                "privacy (DP)",
                f"epsilon {_format(privacy['epsilon'], '.3f')} at delta {_format(privacy['delta'], 'g')} after round "
                f"{privacy['round']} (noise multiplier {_format(privacy['noise_multiplier'], 'g')}, clipping norm "
                f"{_format(privacy['clipping_norm'], 'g')})",
            )
        )
    secure = state.get("secure_sums") or {}
    sums = [
        f"{s.get('phase')} (round {s.get('round')}): "
        + (f"no sum: {s['no_sum']}" if s.get("no_sum") else f"{s.get('boards')} boards, {s.get('dropped', 0)} dropped")
        for s in secure.get("sums", [])
    ]
    facts.append(
        ("secure sums", "; ".join(sums) if secure.get("used") else "no: each board's reply is read in the clear")
    )
    return facts


def _format(value: Any, spec: str) -> str:
    """A number as ``spec`` formats it; anything else (a run folder may come from anywhere) as it is."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return format(value, spec) if is_number else str(value)


def _html(state: dict[str, Any]) -> str:
    def escape(value: Any) -> str:  # every field, numbers too: a run folder may come from anywhere
        return html.escape(str(value))

    facts = _facts(state)
    privacy = state.get("privacy")
    columns = CLIENT_COLUMNS
    rows = "".join(
        "<tr>" + "".join(f"<td>{escape(client[c])}</td>" for c in columns) + "</tr>" for client in state["clients"]
    )
    rounds = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape(_number(r.get(k)))}</td>"
            for k in ("round", "accuracy", "macro_f1", "balanced_accuracy", "loss", "seconds")
        )
        + "".join(f"<td>{escape(r[k])}</td>" for k in ("clients_ok", "clients_failed", "clients_rejected"))
        + (f"<td>{escape(_number(r['dp_epsilon']))}</td>" if privacy else "")
        + "</tr>"
        for r in state["rounds"]
    )
    problems = "".join(
        f"<li>round {escape(p['round'])} node {escape(p['node'])} {escape(p['phase'])}: {escape(p['reason'])}</li>"
        for p in state["problems"]
    )
    curves = f'<img src="{CURVES_PLOT}" alt="precision-recall curves">' if state.get("operating_points") else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgesplit report</title>
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:20px;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}
dt{{font-weight:bold}}pre{{background:#f6f6f6;padding:8px}}</style>
</head><body>
<h1>edgesplit run report</h1>
<dl>{"".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts)}</dl>
<img src="{PLOTS["metrics"]}" alt="accuracy, macro-F1 and loss per round">
<img src="{PLOTS["traffic"]}" alt="bytes per round">
<img src="{PLOTS["confusion"]}" alt="confusion matrix">
{curves}
<h2>Rounds</h2>
<table><tr><th>round</th><th>accuracy</th><th>macro-F1</th><th>balanced accuracy</th>
<th>loss</th><th>seconds</th><th>ok</th><th>failed</th>
<th>rejected</th>{"<th>epsilon</th>" if privacy else ""}</tr>{rounds}</table>
<h2>Clients (failures first)</h2>
<table><tr>{"".join(f"<th>{c}</th>" for c in columns)}</tr>{rows}</table>
<h2>Failures and rejected updates</h2><ul>{problems or "<li>none</li>"}</ul>
<h2>Run config</h2><pre>{escape(json.dumps(state["config"], indent=2))}</pre>
</body></html>
"""


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgesplit report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the run folder (runs/<run-id>)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "events.jsonl").is_file():
        print(f"edgesplit report: {args.run_dir} holds no events.jsonl; is it a run folder?", file=sys.stderr)
        return 2
    print(write_report(args.run_dir))
    return 0
