"""RunConfig / NodeConfig: parsing, type checks, ranges, cross-key rules, learning-rate schedule."""

from __future__ import annotations

import ast
import itertools
import json
import math
import re
import typing
from dataclasses import fields
from enum import StrEnum

import pytest

from client.edge_client import EdgeClient
from common.config import ConfigError, NodeConfig, RunConfig
from common.kinds import (
    ClassBalance,
    DatasetKind,
    ElpvTask,
    EngineChoice,
    HeadInit,
    HeadKind,
    LrSchedule,
    Partitioner,
    StrategyName,
)
from tests.conftest import REPO_ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _pyproject_run_config() -> dict[str, object]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


# --- RunConfig.from_flower ------------------------------------------------------------------------


def test_pyproject_defaults_parse_to_the_dataclass_defaults():
    # Prepare
    table = _pyproject_run_config()

    # Execute
    parsed = RunConfig.from_flower(table)

    # Assert
    assert parsed == RunConfig()
    assert RunConfig().to_flower() == table


def test_auto_views_are_the_eight_symmetries_for_elpv_and_the_image_alone_for_folders():
    import dataclasses

    from common.views import VIEW_SETS

    assert RunConfig().views == "auto" and RunConfig().view_names() == VIEW_SETS["dihedral"]
    assert len(VIEW_SETS["dihedral"]) == 8 and VIEW_SETS["dihedral"][0] == "identity"
    assert dataclasses.replace(RunConfig(), dataset="folder").view_names() == ("identity",)


def test_empty_flower_config_gives_defaults():
    # Execute
    parsed = RunConfig.from_flower({})

    # Assert
    assert parsed == RunConfig()
    assert parsed.num_server_rounds == 30
    assert parsed.learning_rate == 0.01


def test_known_keys_are_applied():
    # Execute
    parsed = RunConfig.from_flower({"num-server-rounds": 10, "head": "mlp", "strategy": "fedprox"})

    # Assert
    assert parsed.num_server_rounds == 10
    assert parsed.head == "mlp"
    assert parsed.strategy == "fedprox"
    assert parsed.learning_rate == RunConfig().learning_rate


def test_unknown_key_is_an_error_naming_the_key():
    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower({"num-rounds": 3})

    # Assert
    assert "num-rounds" in str(caught.value)
    assert "num-server-rounds" in str(caught.value)  # the known keys are listed


def test_wrong_type_names_the_key_and_the_types():
    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower({"num-server-rounds": "ten"})

    # Assert
    message = str(caught.value)
    assert "'num-server-rounds'" in message
    assert "int" in message
    assert "str" in message
    assert "'ten'" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("learning-rate", True),  # a bool is not a number here
        ("local-epochs", True),
        ("local-epochs", 2.5),
        ("head", 3),
    ],
)
def test_other_wrong_types_are_errors(key, value):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower({key: value})

    assert f"'{key}'" in str(caught.value)


def test_int_is_accepted_for_a_float_key():
    # Execute
    parsed = RunConfig.from_flower({"learning-rate": 1, "round-timeout": 30})

    # Assert
    assert parsed.learning_rate == 1.0
    assert isinstance(parsed.learning_rate, float)
    assert isinstance(parsed.round_timeout, float)


def test_integral_float_is_accepted_for_an_int_key():
    parsed = RunConfig.from_flower({"local-epochs": 3.0})

    assert parsed.local_epochs == 3
    assert isinstance(parsed.local_epochs, int)


def test_out_of_range_value_lists_the_allowed_range():
    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower({"learning-rate": -1})

    # Assert
    message = str(caught.value)
    assert "'learning-rate'" in message
    assert "[0.0, 10.0]" in message
    assert "-1" in message


def test_bad_choice_lists_the_allowed_values():
    # Execute
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower({"strategy": "fedsgd"})

    # Assert
    message = str(caught.value)
    assert "'strategy'" in message
    assert "'fedsgd'" in message
    for allowed in ("fedavg", "fedadam", "fedprox"):
        assert allowed in message


def test_unknown_backbone_lists_the_registered_ones():
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower({"backbone": "vgg16"})

    for name in ("efficientnet_lite0", "mobilenet_v3_large", "resnet18"):
        assert name in str(caught.value)


def test_folder_dataset_without_class_names_is_an_error():
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower({"dataset": "folder", "server-test-dir": "/data/test"})

    assert "class-names" in str(caught.value)


def test_folder_dataset_without_server_test_dir_is_an_error():
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower({"dataset": "folder", "class-names": "ok,crack"})

    assert "server-test-dir" in str(caught.value)


def test_folder_dataset_with_both_parses_and_orders_classes():
    # Execute
    parsed = RunConfig.from_flower(
        {"dataset": "folder", "class-names": " ok, crack ,finger,", "server-test-dir": "/data/test"}
    )

    # Assert
    assert parsed.classes() == ("ok", "crack", "finger")


@pytest.mark.parametrize(
    ("names", "complaint"),
    [
        ("ok,../x", "plain folder names"),
        ("ok,/etc", "plain folder names"),
        ("ok,crack,ok", "more than once"),
        ("ok", "at least two"),
    ],
)
def test_class_names_must_be_distinct_plain_folder_names(names: str, complaint: str):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower({"dataset": "folder", "class-names": names, "server-test-dir": "/data/test"})

    assert complaint in str(caught.value)


def test_pathological_with_more_classes_per_client_than_classes_is_an_error():
    # binary ELPV has 2 classes
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower({"partitioner": "pathological", "elpv-task": "binary", "classes-per-client": 3})

    assert "classes-per-client" in str(caught.value)


# --- learning-rate schedule -----------------------------------------------------------------------


def test_cosine_schedule_starts_at_the_learning_rate_and_decreases():
    # Prepare
    config = RunConfig(learning_rate=0.1, num_server_rounds=4, lr_schedule="cosine")

    # Execute
    rates = [config.learning_rate_at(r) for r in (1, 2, 3, 4)]

    # Assert: 0.1 * 0.5 * (1 + cos(pi * (r - 1) / 4))
    assert rates[0] == pytest.approx(0.1)
    assert rates[1] == pytest.approx(0.05 * (1 + math.sqrt(0.5)))
    assert rates[2] == pytest.approx(0.05)
    assert rates[3] == pytest.approx(0.05 * (1 - math.sqrt(0.5)))
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert rates[3] > 0


def test_constant_schedule_is_constant():
    config = RunConfig(learning_rate=0.02, num_server_rounds=5, lr_schedule="constant")

    rates = [config.learning_rate_at(r) for r in range(1, 6)]

    assert rates == [0.02] * 5


# --- NodeConfig.from_flower -----------------------------------------------------------------------


def test_node_config_parses_a_valid_config():
    # Execute
    node = NodeConfig.from_flower({"partition-id": 2, "num-partitions": 5, "data-dir": "/d", "cache-dir": "/c"})

    # Assert
    assert node == NodeConfig(partition_id=2, num_partitions=5, data_dir="/d", cache_dir="/c")


def test_node_config_empty_is_all_none():
    assert NodeConfig.from_flower({}) == NodeConfig()


def test_node_config_unknown_key_is_an_error():
    with pytest.raises(ConfigError) as caught:
        NodeConfig.from_flower({"partition": 1})

    assert "'partition'" in str(caught.value)


@pytest.mark.parametrize("value", [-1, True, "1", 1.5])
def test_node_config_partition_id_must_be_a_non_negative_int(value):
    with pytest.raises(ConfigError) as caught:
        NodeConfig.from_flower({"partition-id": value, "num-partitions": 4})

    assert "partition-id" in str(caught.value)


@pytest.mark.parametrize("partition_id", [4, 5])
def test_node_config_partition_id_must_be_below_num_partitions(partition_id):
    with pytest.raises(ConfigError) as caught:
        NodeConfig.from_flower({"partition-id": partition_id, "num-partitions": 4})

    assert "num-partitions" in str(caught.value)


def test_node_config_path_must_be_a_string():
    with pytest.raises(ConfigError) as caught:
        NodeConfig.from_flower({"data-dir": 3})

    assert "data-dir" in str(caught.value)


def test_node_config_engine_overrides_the_runs_and_is_checked():
    node = NodeConfig.from_flower({"engine": "torch"})
    client = EdgeClient(RunConfig(engine="onnx"), node)
    assert client.engine.name == "torch"
    assert EdgeClient(RunConfig(engine="onnx"), NodeConfig()).engine.name == "onnx"
    with pytest.raises(ConfigError, match="'engine' must be one of"):
        NodeConfig.from_flower({"engine": "tensorrt"})
    with pytest.raises(ConfigError, match="'engine' must be one of"):
        RunConfig.from_flower({"engine": "int8"})


def test_fault_clients_parse_by_partition_and_bad_entries_name_the_key():
    config = RunConfig.from_flower({"fault-clients": "3:nan-update, 5:label-flip"})
    assert config.faults() == {3: "nan-update", 5: "label-flip"}
    for bad in ("3:explode", "x:crash", "3"):
        with pytest.raises(ConfigError, match=r"'fault-clients'.*nan-update"):
            RunConfig.from_flower({"fault-clients": bad})


def test_krum_needs_enough_clients_for_its_assumption():
    with pytest.raises(ConfigError, match="min-clients >= 5"):
        RunConfig.from_flower({"strategy": "krum", "krum-malicious": 1, "min-clients": 4})
    assert RunConfig.from_flower({"strategy": "krum", "krum-malicious": 1, "min-clients": 5}).strategy == "krum"


@pytest.mark.parametrize(
    "key, value",
    [
        ("trim-beta", 0.5),
        ("round-retries", -1),
        ("node-wait-timeout", 0),
        ("fault-dropout", 1.5),
        ("max-update-ratio", -1),
    ],
)
def test_new_reliability_keys_are_range_checked(key, value):
    with pytest.raises(ConfigError, match=f"'{key}' must be in"):
        RunConfig.from_flower({key: value})


def test_node_config_min_examples_is_the_boards_own_floor():
    assert NodeConfig.from_flower({"min-examples": 8}).min_examples == 8
    assert NodeConfig.from_flower({}).min_examples is None  # the default floor (5) applies
    for value in (1, 0, True, 2.5, "5"):
        with pytest.raises(ConfigError, match="'min-examples' must be an int in \\[2"):
            NodeConfig.from_flower({"min-examples": value})


@pytest.mark.parametrize("name", ["../x", "..", "/etc", "a/b", "a\\b", "C:x", "."])
def test_class_names_must_be_plain_folder_names(name):
    """The run config comes from the server; a board joins each class name to its data folder."""
    settings = {"dataset": "folder", "class-names": f"ok,{name}", "server-test-dir": "/data/test"}
    with pytest.raises(ConfigError, match="plain folder name"):
        RunConfig.from_flower(settings)


def test_a_traversing_class_name_never_reaches_the_disk(tmp_path):
    from common.data import DataError, scan_image_folder

    (tmp_path / "data" / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="plain folder name"):
        scan_image_folder(tmp_path / "data", ("ok", "../outside"))
    with pytest.raises(DataError, match="plain folder name"):
        scan_image_folder(tmp_path / "data", ("ok", str(tmp_path / "outside")))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num-server-rounds": 0}, "num-server-rounds=0 keeps the initial head"),
        ({"operating-classes": "p0,cracked"}, "'operating-classes' names ['cracked']"),
    ],
)
def test_fed3r_and_class_balance_rules(config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flower(config)
    assert message in str(caught.value)
    for init in ("fed3r", "lda"):
        allowed = RunConfig.from_flower({"head-init": init, "class-balance": "logit-adjusted", "num-server-rounds": 0})
        assert allowed.head_init == init and allowed.num_server_rounds == 0
    for shrinkage in (0.0, 1.5):
        with pytest.raises(ConfigError, match="lda-shrinkage"):
            RunConfig.from_flower({"lda-shrinkage": shrinkage})


# --- kinds: each enum-typed key is parsed once into its member, and its error lists the enum's values -----

KIND_KEYS: dict[str, type[StrEnum]] = {
    f.name.replace("_", "-"): kind
    for f in fields(RunConfig)
    if isinstance(kind := typing.get_type_hints(RunConfig)[f.name], type) and issubclass(kind, StrEnum)
}
# What another key must say for a kind's value to be consistent (a folder dataset names its classes ...).
NEEDS = {
    ("dataset", "folder"): {"class-names": "a,b", "server-test-dir": "held-out"},
    ("strategy", "krum"): {"min-clients": 5},
    ("strategy", "multikrum"): {"min-clients": 5},
}


def _listed_choices(message: str) -> list[str]:
    match = re.search(r"must be one of (\[.*?\])", message)
    assert match, message
    return ast.literal_eval(match.group(1))


def test_every_closed_choice_of_the_run_config_is_an_enum() -> None:
    assert {
        "strategy": StrategyName,
        "head": HeadKind,
        "head-init": HeadInit,
        "class-balance": ClassBalance,
        "lr-schedule": LrSchedule,
        "engine": EngineChoice,
        "dataset": DatasetKind,
        "elpv-task": ElpvTask,
        "partitioner": Partitioner,
    } == KIND_KEYS


@pytest.mark.parametrize(("key", "kind"), KIND_KEYS.items(), ids=list(KIND_KEYS))
def test_a_kind_key_parses_into_its_member_and_refuses_others_listing_its_values(key, kind) -> None:
    for member in kind:
        config = RunConfig.from_flower({key: member.value, **NEEDS.get((key, member.value), {})})
        parsed = getattr(config, key.replace("-", "_"))
        assert parsed is member and type(parsed) is kind
        assert type(config.to_flower()[key]) is str and config.to_flower()[key] == member.value
    for bad in ("no-such-kind", next(iter(kind)).name, 3):  # a member's Python name is not its value
        with pytest.raises(ConfigError) as caught:
            RunConfig.from_flower({key: bad})
        message = str(caught.value)
        assert f"'{key}'" in message and repr(bad) in message
        assert _listed_choices(message) == [member.value for member in kind]  # the plain values, in order


def test_the_config_as_json_holds_plain_strings() -> None:
    config = RunConfig.from_flower({"head": "mlp", "head-init": "lda", "class-balance": "logit-adjusted"})
    document = config.to_flower()
    assert json.loads(json.dumps(document)) == document
    assert json.dumps({"head": config.head}) == '{"head": "mlp"}'  # a member serialises as its value too
    assert RunConfig.from_flower(json.loads(json.dumps(document))) == config


def test_node_config_engine_is_parsed_into_its_kind() -> None:
    assert NodeConfig.from_flower({"engine": "onnx-int8"}).engine is EngineChoice.ONNX_INT8
    with pytest.raises(ConfigError) as caught:
        NodeConfig.from_flower({"engine": "tensorrt"})
    assert _listed_choices(str(caught.value)) == ["auto", "torch", "onnx", "onnx-int8"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("dirichlet-min-partition-size", -1), ("dirichlet-max-retries", -1), ("dirichlet-max-retries", 1001)],
)
def test_dirichlet_floor_and_retries_are_range_checked(key, value):
    with pytest.raises(ConfigError, match=f"'{key}' must be in"):
        RunConfig.from_flower({key: value})


def test_a_dirichlet_floor_too_high_for_the_clients_stops_the_run_naming_the_key():
    from common.config import check_simulated_split
    from common.data import DataError

    config = RunConfig.from_flower({"dirichlet-min-partition-size": 20})
    check_simulated_split(config, 98)  # 1,968 training images: 98 clients can have 20 each
    with pytest.raises(DataError) as caught:
        check_simulated_split(config, 100)
    assert "dirichlet-min-partition-size" in str(caught.value) and "at most 19" in str(caught.value)
