"""What a ClientApp process keeps between messages: bounded caches, cleared at will, and the same
set-up whether a message finds its client cached or not. A fresh ProcessState is a new process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.lru import LruCache
from client.state import ProcessState
from common.backbones import fingerprint
from common.engines import ENGINE_KINDS, FingerprintMismatch
from common.preprocess import PreprocessSpec
from tests.protocol_samples import instructions

RUN = {"dataset": "folder", "class-names": "ok,crack", "server-test-dir": "/nowhere", "num-threads": 1}
TORCH = ENGINE_KINDS["torch"]
PRE = PreprocessSpec(image_size=32)


def _node(partition: int) -> dict[str, int]:
    return {"partition-id": partition, "num-partitions": 8}


def test_an_lru_cache_drops_the_least_recently_used() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.keys() == ["a", "c"] and "b" not in cache and len(cache) == 2
    with pytest.raises(ValueError):
        LruCache(0)


def test_clients_are_cached_per_configs_bounded_and_cleared() -> None:
    state = ProcessState(max_clients=2)
    first = state.client(RUN, _node(0))
    assert state.client(dict(reversed(list(RUN.items()))), _node(0)) is first  # key order does not matter
    state.client(RUN, _node(1))
    state.client(RUN, _node(2))  # evicts node 0, the least recently used
    assert len(state.clients) == 2
    assert state.client(RUN, _node(0)) is not first
    state.verified.put(Path("x"), "ab")
    state.clear()
    assert len(state.clients) == len(state.engines) == len(state.verified) == 0


def test_every_message_sets_up_threads_and_logging_on_a_hit_too(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(f"threads {n}"))
    monkeypatch.setattr("client.state.configure_logging", lambda: calls.append("logging"))
    state = ProcessState()
    torch_run = {**RUN, "engine": "torch"}  # torch runs the backbone: its threads are set
    state.client(torch_run, _node(0))
    state.client(torch_run, _node(0))
    assert calls == ["logging", "threads 1"] * 2
    state.client({**torch_run, "num-threads": 0}, _node(0))  # 0: keep the library's default
    assert calls[-1] == "logging"
    state.client({**RUN, "engine": "onnx"}, _node(0))  # head only on ONNX Runtime: torch is not touched
    assert calls[-1] == "logging"


def test_nodes_of_one_process_share_its_backbone_memory() -> None:
    state = ProcessState()
    one, two = state.client(RUN, _node(0)), state.client(RUN, _node(1))
    assert one.verified is two.verified is state.verified and one.engines is two.engines is state.engines


def _tiny_state() -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "layer.bias": torch.zeros(3)}


def _arrays(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return TORCH.pack(state)


def test_kept_weights_are_verified_once_and_checked_again_by_a_new_process(tmp_path: Path) -> None:
    fp = fingerprint("tiny", _tiny_state(), PRE)
    sent = instructions(backbone_name="tiny", preprocess=PRE, fingerprint=fp, engine_fingerprint=fp)
    state = ProcessState()
    assert state.backbones(tmp_path).held(TORCH, fp) is None
    assert state.backbones(tmp_path).keep(TORCH, _arrays(_tiny_state()), sent) == fp
    path = tmp_path / "backbones" / f"{fp}.pt"
    assert state.verified.get(path) == fp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left

    stored = torch.load(path, weights_only=True)
    stored["state"]["layer.weight"][2, 3] = -1.0  # the file rots on disk
    torch.save(stored, path)
    assert state.backbones(tmp_path).holds(TORCH, fp, fp)  # this process checked it already
    assert not ProcessState().backbones(tmp_path).holds(TORCH, fp, fp)  # a new one finds out
    assert not path.exists()  # and deletes it, so the server sends it again


def test_weights_that_do_not_hash_as_announced_are_not_kept(tmp_path: Path) -> None:
    fp = fingerprint("tiny", _tiny_state(), PRE)
    sent = instructions(backbone_name="tiny", preprocess=PRE, fingerprint=fp, engine_fingerprint=fp)
    received = _tiny_state()
    received["layer.bias"][0] = 1e-6  # one element changed in transit
    state = ProcessState()
    with pytest.raises(FingerprintMismatch, match=fp[:12]):
        state.backbones(tmp_path).keep(TORCH, _arrays(received), sent)
    assert not state.backbones(tmp_path).holds(TORCH, fp, fp)
    assert len(state.verified) == 0


def test_an_unreadable_copy_is_not_held_and_is_deleted(tmp_path: Path) -> None:
    """A cached file that torch cannot read (bit rot, a partial manual copy) is corrupt too."""
    fp = fingerprint("tiny", _tiny_state(), PRE)
    sent = instructions(backbone_name="tiny", preprocess=PRE, fingerprint=fp, engine_fingerprint=fp)
    ProcessState().backbones(tmp_path).keep(TORCH, _arrays(_tiny_state()), sent)
    path = tmp_path / "backbones" / f"{fp}.pt"
    path.write_bytes(path.read_bytes()[:100])
    assert ProcessState().backbones(tmp_path).held(TORCH, fp) is None
    assert not path.exists()


def test_the_state_pickles_as_the_receiving_process_own() -> None:
    """Flower's simulation pickles the ClientApp (its mods hold the state) into worker processes."""
    import pickle

    from client.state import process_state

    assert pickle.loads(pickle.dumps(ProcessState())) is process_state()
