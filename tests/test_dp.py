"""Differential privacy on the head updates: the board's clipping, the server's noise, the budget
from Flower's accountant, the screen in a DP run, the config rules, and a DP federation in
process (a stand-in grid; the real runtime runs DP in test_flower_variants.py)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from dp_accounting.privacy_accountant import NeighboringRelation
from flwr.app import Context, Message, MessageType, RecordDict

from client.dp_clipping import dp_clipping
from client.state import ProcessState
from common.clipping import clip_update
from common.config import ConfigError, RunConfig
from common.flower_glue import act_as, from_array_record, to_array_record, to_config_record
from common.protocol import ARRAYS, BACKBONE, CONFIG
from server.checkpoint import Checkpoint, CheckpointError, count_releases
from server.dp import epsilon_spent, noise_std, private_head
from server.nodes import RunStopped
from server.outcome import privacy_summary
from server.report import _html as report_html
from server.run_folder import RunLog
from server.run_folder_view import RunView
from server.validation import update_bounds
from tests.protocol_samples import instructions
from tests.test_rounds import ClientsGrid, _strategy, honest

START = {"weight": np.zeros((2, 3), np.float32), "bias": np.ones(2, np.float32)}


def _norm(arrays: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((arrays[k].astype(np.float64) - start[k]) ** 2) for k in start)))


@pytest.fixture(autouse=True)
def node_identity() -> None:
    act_as(1)


# --- clipping on the board -------------------------------------------------------------------------


def test_clipping_bounds_the_update_norm_and_keeps_its_direction() -> None:
    # Prepare: an update of norm 10 over two arrays
    rng = np.random.default_rng(0)
    step = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in START.items()}
    scale = 10.0 / _norm({k: START[k] + step[k] for k in START}, START)
    trained = {k: START[k] + scale * step[k] for k in START}

    # Execute
    clipped = clip_update(trained, START, 0.5)
    small = clip_update(clipped, START, 2.0)

    # Assert
    assert _norm(clipped, START) == pytest.approx(0.5, rel=1e-5)
    for name in START:
        assert clipped[name].dtype == np.float32
        np.testing.assert_allclose(clipped[name] - START[name], (trained[name] - START[name]) * 0.05, atol=1e-6)
    assert all(np.array_equal(small[k], clipped[k]) for k in START)  # within the norm: as it was
    assert all(np.array_equal(clip_update(START, START, 0.5)[k], START[k]) for k in START)  # no update


def _train_message(norm: float, with_backbone: bool) -> Message:
    content = RecordDict(
        {ARRAYS: to_array_record(START), CONFIG: to_config_record(instructions(dp_clipping_norm=norm))}
    )
    if with_backbone:  # a node that lacks the backbone gets it beside the head (Flower's own mod refuses this)
        content[BACKBONE] = to_array_record({"model.onnx": np.zeros(16, np.uint8)})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _trained_reply(msg: Message, context: Context) -> Message:
    far = {"weight": np.full((2, 3), 3.0, np.float32), "bias": np.full(2, -2.0, np.float32)}
    return Message(content=RecordDict({ARRAYS: to_array_record(far)}), reply_to=msg)


@pytest.mark.parametrize("with_backbone", [False, True])
def test_the_mod_clips_a_train_reply_to_the_norm_of_the_boards_own_run_config(with_backbone: bool) -> None:
    # Prepare: the instructions name another norm than the run the board agreed to; the mod takes the run's
    mod = dp_clipping(ProcessState())
    dp_run = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"dp-clipping-norm": 0.25})
    plain_run = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    # Execute
    clipped = mod(_train_message(5.0, with_backbone), dp_run, _trained_reply)
    plain = mod(_train_message(0.25, with_backbone), plain_run, _trained_reply)

    # Assert
    assert _norm(from_array_record(clipped.content.array_records[ARRAYS]), START) == pytest.approx(0.25, rel=1e-5)
    assert _norm(from_array_record(plain.content.array_records[ARRAYS]), START) > 5  # DP off: untouched


# --- noise and budget on the server ----------------------------------------------------------------


def test_noise_std_matches_the_formula_and_the_denominator_is_the_nodes_sampled() -> None:
    # Prepare: 2 of 4 sampled nodes accepted; their clipped mean moved every weight by 0.4
    start = {"w": np.zeros(200_000, np.float32)}
    mean = {"w": np.full(200_000, 0.4, np.float32)}
    z, clip, sampled = 1.5, 0.5, 4

    # Execute
    released = private_head(start, mean, 2, sampled, z, clip, rng=np.random.default_rng(1))["w"]

    # Assert: the sum of the two updates over the 4 sampled (0.2), plus N(0, (z C / 4)^2)
    assert noise_std(z, clip, sampled) == pytest.approx(z * clip / sampled)
    assert released.dtype == np.float32
    assert float(np.mean(released)) == pytest.approx(0.2, abs=0.003)
    assert float(np.std(released)) == pytest.approx(z * clip / sampled, rel=0.01)
    with pytest.raises(ValueError, match="between 1 and the nodes sampled"):
        private_head(start, mean, 5, sampled, z, clip)


def _dp_accounting_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Google's accountant called directly: what Flower's must agree with."""
    accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


def test_epsilon_comes_from_the_accountant_grows_with_rounds_and_shrinks_with_noise() -> None:
    # Execute
    by_rounds = [epsilon_spent([1.0] * rounds, 1e-5) for rounds in (1, 10, 30)]
    by_noise = [epsilon_spent([z] * 30, 1e-5) for z in (0.7, 1.0, 2.0, 4.0)]

    # Assert
    assert epsilon_spent([], 1e-5) == 0.0
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 3
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert by_noise[1] == pytest.approx(_dp_accounting_epsilon(1.0, 30, 1e-5), rel=1e-9)
    assert epsilon_spent([1.0] * 30, 1e-3) < by_noise[1]  # a looser delta, a smaller epsilon
    # rounds with different noise compose, in any order
    assert epsilon_spent([1.0, 2.0, 1.0], 1e-5) == pytest.approx(epsilon_spent([2.0, 1.0, 1.0], 1e-5))
    assert epsilon_spent([1.0] * 2, 1e-5) < epsilon_spent([1.0, 2.0, 1.0], 1e-5) < epsilon_spent([1.0] * 3, 1e-5)


# --- screening in a DP run ------------------------------------------------------------------------------


def test_a_clipped_update_passes_the_screen_and_an_unclipped_one_does_not() -> None:
    # Prepare: five clipped updates (one at the norm, in float32's rounding) and one that was not clipped
    norms = {1: 0.01, 2: 0.001, 3: 0.5 * (1 + 1e-6), 4: 0.001, 5: 0.002, 6: 0.9, 7: 0.001}

    # Execute
    dp = update_bounds(norms, max_norm=50.0, max_ratio=100.0, clipping_norm=0.5)
    plain = update_bounds(norms, max_norm=50.0, max_ratio=100.0)

    # Assert
    assert set(dp) == {6} and "dp-clipping-norm=0.5" in dp[6]
    # without DP the ratio to the median (0.002) flags 3 and 6; in a DP run one node's norm does
    # not decide another's fate (the noise is not calibrated to that)
    assert set(plain) == {3, 6}


# --- the config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"dp-noise-multiplier": 0.0}, "clipping without noise"),
        ({"strategy": "fedmedian"}, "not 'fedmedian'"),
        ({"strategy": "krum", "min-clients": 5}, "not 'krum'"),
        ({"strategy": "fedadam"}, "not 'fedadam'"),
        ({"head-init": "ncm"}, "class sums"),
        ({"head-init": "fed3r"}, "Gram matrix"),
        ({"head-init": "lda"}, "without noise"),
        ({"max-update-norm": 0.5}, "must not exceed max-update-norm"),
    ],
)
def test_dp_settings_that_cannot_hold_are_refused_with_the_reason(settings: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        RunConfig.from_flower({"dp-clipping-norm": 1.0, **settings})


def test_dp_keys_are_checked_and_off_by_default() -> None:
    assert not RunConfig().dp
    config = RunConfig.from_flower({"dp-clipping-norm": 1.0, "strategy": "fedprox", "max-update-norm": 0.0})
    assert config.dp and config.dp_noise_multiplier == 1.0 and config.dp_delta == 1e-5
    for key, value in (("dp-delta", 0.0), ("dp-delta", 0.5), ("dp-clipping-norm", -1.0)):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flower({key: value})


# --- a DP federation in process ---------------------------------------------------------------------------


def test_a_dp_run_refuses_the_unclipped_update_noises_once_per_round_and_reports_the_budget(tmp_path: Path) -> None:
    """Five nodes; node 5 sends a update of norm 5.7 (it does not clip). The stand-in's honest nodes move
    the head by about 0.2, within the clipping norm. A tiny noise multiplier makes the released head
    checkable: the accepted updates summed over the five nodes sampled."""

    # Prepare
    def scaled(node: int, server_round: int, start: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        return {k: start[k] + 2.0 for k in start}, 50  # norm about 5.7: under max-update-norm, over the clip

    grid = ClientsGrid([1, 2, 3, 4, 5], {5: scaled})
    settings = {"num-server-rounds": 3, "fraction-evaluate": 0.0, "dp-clipping-norm": 1.0, "dp-noise-multiplier": 1e-3}
    loop = _strategy(tmp_path / "run", **settings)
    heads: list[dict[str, np.ndarray]] = []  # each round's start, as the DP release gets it
    privacy = loop.strategy.privacy
    assert privacy is not None
    original = privacy.released

    def watched(server_round: int, start: Mapping[str, np.ndarray], *rest: Any, **named: Any) -> dict[str, np.ndarray]:
        heads.append(dict(start))
        return original(server_round, start, *rest, **named)

    privacy.released = watched  # type: ignore[method-assign]

    # Execute
    final = loop.run_rounds(grid)  # type: ignore[arg-type]

    # Assert
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    releases = [e for e in events if e["event"] == "dp-release"]
    assert [(e["round"], e["accepted"], e["sampled"]) for e in releases] == [(1, 4, 5), (2, 4, 5), (3, 4, 5)]
    rejected = [e for e in events if e["event"] == "client-rejected"]
    assert {e["node"] for e in rejected} == {5} and all("dp-clipping-norm" in e["reason"] for e in rejected)
    records = loop.run.rounds
    assert [r.dp_noise_multiplier for r in records] == [1e-3] * 3
    assert [r.dp_epsilon for r in records] == pytest.approx([epsilon_spent([1e-3] * n, 1e-5) for n in (1, 2, 3)])
    # round 3's head: its start plus the four honest updates over five nodes (the noise is ~1e-4)
    start = heads[-1]
    steps = [honest(node, 3, start)[0] for node in (1, 2, 3, 4)]
    expected = {k: start[k] + sum(step[k] - start[k] for step in steps) / 5 for k in start}
    for name in expected:
        np.testing.assert_allclose(final[name], expected[name], atol=2e-3)


def test_a_resumed_dp_run_counts_the_checkpointed_releases_in_its_budget(tmp_path: Path) -> None:
    # Prepare: two noised rounds, then the server dies
    settings = {"fraction-evaluate": 0.0, "dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.8}
    _strategy(tmp_path / "run", **settings, **{"num-server-rounds": 2}).run_rounds(ClientsGrid([1, 2, 3]))  # type: ignore[arg-type]

    # Execute: the run resumed to round 4
    resumed = _strategy(tmp_path / "run", resume=True, **settings, **{"num-server-rounds": 4})
    resumed.run_rounds(ClientsGrid([1, 2, 3]))  # type: ignore[arg-type]

    # Assert: rounds 3 and 4 spend on top of rounds 1 and 2
    epsilons = [r.dp_epsilon for r in resumed.run.rounds]
    assert epsilons == pytest.approx([epsilon_spent([0.8] * n, 1e-5) for n in (1, 2, 3, 4)])


def test_a_checkpoint_with_fewer_round_records_than_releases_does_not_reset_the_budget(tmp_path: Path) -> None:
    # Prepare: three noised rounds, then a checkpoint that kept only the first round's record
    settings = {"fraction-evaluate": 0.0, "dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.8}
    _strategy(tmp_path / "run", **settings, **{"num-server-rounds": 3}).run_rounds(ClientsGrid([1, 2, 3]))  # type: ignore[arg-type]
    checkpoint = Checkpoint.load(tmp_path / "run")
    assert checkpoint.dp_releases == [0.8] * 3  # kept explicitly, beside the records
    checkpoint.rounds = checkpoint.rounds[:1]
    checkpoint.save(tmp_path / "run")

    # Execute: the run resumed to round 5
    resumed = _strategy(tmp_path / "run", resume=True, **settings, **{"num-server-rounds": 5})
    resumed.run_rounds(ClientsGrid([1, 2, 3]))  # type: ignore[arg-type]

    # Assert: rounds 4 and 5 spend on top of all three releases, not of the one record
    epsilons = [r.dp_epsilon for r in resumed.run.rounds[-2:]]
    assert epsilons == pytest.approx([epsilon_spent([0.8] * n, 1e-5) for n in (4, 5)])


def test_a_checkpoint_whose_releases_cannot_cover_its_rounds_is_refused(tmp_path: Path) -> None:
    settings = {"fraction-evaluate": 0.0, "dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.8}
    _strategy(tmp_path / "run", **settings, **{"num-server-rounds": 2}).run_rounds(ClientsGrid([1, 2, 3]))  # type: ignore[arg-type]
    checkpoint = Checkpoint.load(tmp_path / "run")
    checkpoint.dp_releases, checkpoint.rounds = [], checkpoint.rounds[:1]  # as a checkpoint that lost them
    checkpoint.save(tmp_path / "run")
    with pytest.raises(CheckpointError, match="counts 1 DP release"):
        _strategy(tmp_path / "run", resume=True, **settings, **{"num-server-rounds": 4})


class LeavingGrid(ClientsGrid):
    """Its nodes answer round 2's training, then all disconnect: the run stops before round 2's
    evaluation, after round 2's head was released."""

    def get_node_ids(self) -> list[int]:
        return [] if any(server_round == 2 for server_round, _ in self.trained) else list(self.nodes)


def test_a_release_before_the_run_stops_counts_in_the_summary_and_on_resume(tmp_path: Path) -> None:
    # Prepare
    settings = {"dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.8, "node-wait-timeout": 1, "num-server-rounds": 3}
    loop = _strategy(tmp_path / "run", **settings)
    loop.run.run_log.write_config({"run_config": loop.run.config.to_flower()})  # as ServerRun.prepare does

    # Execute: round 2 releases its head, then the nodes leave; the run stops (and finish writes that head)
    with pytest.raises(RunStopped, match="node-wait-timeout"):
        loop.run_rounds(LeavingGrid([1, 2, 3]))  # type: ignore[arg-type]
    summary = privacy_summary(loop.run.config, loop.run.rounds, loop.run.dp_releases)
    count_releases(tmp_path / "run", loop.run.dp_releases)  # as finish does

    # Assert: the summary's budget counts both releases, though only round 1 was recorded
    assert [r.round for r in loop.run.rounds] == [1]
    assert summary is not None and summary["releases"] == 2
    assert summary["epsilon"] == pytest.approx(epsilon_spent([0.8] * 2, 1e-5))
    assert RunView(tmp_path / "run").state()["privacy"]["epsilon"] == pytest.approx(summary["epsilon"])  # the report's
    # and the resumed run, which redoes round 2 from round 1's checkpoint, counts the released head too
    resumed = _strategy(tmp_path / "run", resume=True, **settings)
    resumed.run_rounds(ClientsGrid([1, 2, 3]))  # type: ignore[arg-type]
    assert [r.dp_epsilon for r in resumed.run.rounds] == pytest.approx(
        [epsilon_spent([0.8] * n, 1e-5) for n in (1, 3, 4)]
    )


# --- what a reader of the run folder sees ------------------------------------------------------------


def test_the_dashboard_state_and_the_report_show_the_budget(tmp_path: Path) -> None:
    # Prepare: a DP run folder after two rounds, and one without DP
    dp_config = {"num-server-rounds": 3, "dp-clipping-norm": 0.5, "dp-noise-multiplier": 1.0, "dp-delta": 1e-5}
    folders = {}
    for name, run_config in (("dp", dp_config), ("plain", {"num-server-rounds": 3})):
        log = RunLog(tmp_path / name)
        log.write_config({"run_config": run_config, "classes": ["ok", "crack"], "backbone": {"name": "b"}})
        log.event("run-start", backbone="b", fingerprint="f" * 64, engine="onnx-int8")
        for server_round, epsilon in ((1, 2.5), (2, 3.75)):
            fields = {"round": server_round, "accuracy": 0.5, "macro_f1": 0.4, "loss": 1.0, "seconds": 0.1}
            fields |= {"clients_ok": 2, "clients_failed": 0, "clients_rejected": 0, "bytes_down": 1, "bytes_up": 1}
            log.event("round-end", **fields, dp_epsilon=epsilon if name == "dp" else float("nan"))
        folders[name] = tmp_path / name

    # Execute
    dp_state, plain_state = (RunView(folders[name]).state() for name in ("dp", "plain"))

    # Assert
    assert dp_state["privacy"] == {
        "epsilon": 3.75,
        "delta": 1e-5,
        "round": 2,
        "noise_multiplier": 1.0,
        "clipping_norm": 0.5,
    }
    assert [r["dp_epsilon"] for r in dp_state["rounds"]] == [2.5, 3.75]
    assert plain_state["privacy"] is None
    page = report_html(dp_state)
    assert "epsilon 3.750 at delta 1e-05 after round 2" in page and "<th>epsilon</th>" in page
    assert "epsilon" not in report_html(plain_state).split("<h2>Run config</h2>")[0]
