"""Everything a ClientApp process keeps between messages, in one object.

Flower's simulation runs each node's messages in a pool of worker processes and reuses them
across messages and across nodes, so a process that already built a client, checked a backbone
file or built an engine can reuse it: that is what makes a second round cheap. A deployed
SuperNode starts one process per message, so there every cache starts empty and the results
must not depend on them. Each cache is bounded, so a worker that serves many nodes does not grow
without limit.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.backbone_cache import BackboneCache, BuiltEngines, VerifiedFiles
from client.edge_client import EdgeClient
from client.lru import LruCache
from common.config import NodeConfig, RunConfig
from common.kinds import EngineName
from common.logs import configure_logging

ConfigKey = tuple[tuple[str, Any], ...]  # a Flower config as a hashable, ordered tuple
ClientKey = tuple[ConfigKey, ConfigKey]  # (run config, node config)


def frozen(config: Mapping[str, Any]) -> ConfigKey:
    return tuple(sorted(config.items()))


class ProcessState:
    """A ClientApp process's caches.

    clients
        One ``EdgeClient`` per (run config, node config): its configs validated once, its local
        data listed once and its embeddings kept in memory between rounds.
    engines
        Built backbone engines by (variant fingerprint, cut): building one (reading and
        checking an ONNX file, or building a torch model) takes seconds; nodes of one run share it.
    verified
        Backbone files by path, with the variant fingerprint their bytes hashed to: hashing
        megabytes on every message is not free. Each node still needs its own verified copy.

    Parameters
    ----------
    max_clients, max_engines, max_verified
        How many entries each cache keeps (least recently used dropped first).
    """

    def __init__(self, max_clients: int = 16, max_engines: int = 4, max_verified: int = 64) -> None:
        self.clients: LruCache[ClientKey, EdgeClient] = LruCache(max_clients)
        self.engines: BuiltEngines = LruCache(max_engines)
        self.verified: VerifiedFiles = LruCache(max_verified)

    def __reduce__(self) -> tuple[Any, ...]:
        # Flower's simulation pickles the ClientApp, its mods included, into each worker process;
        # there it must be that process's own state, not a copy of this one (locks do not pickle).
        return (process_state, ())

    def client(self, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> EdgeClient:
        """This node's client, set up for a message: the same on a cache hit and a miss."""
        client = self.clients.get_or_make(
            (frozen(run_config), frozen(node_config)),
            lambda: EdgeClient(
                RunConfig.from_flower(dict(run_config)),
                NodeConfig.from_flower(dict(node_config)),
                verified=self.verified,
                engines=self.engines,
            ),
        )
        configure_logging()
        if client.config.num_threads > 0 and runs_torch(client):
            import torch

            torch.set_num_threads(client.config.num_threads)
        return client

    def backbones(self, directory: Path) -> BackboneCache:
        """A device folder's backbone cache with this process's memory of it."""
        return BackboneCache(directory, self.verified, self.engines)

    def clear(self) -> None:
        """Forget everything, as a freshly started process would."""
        self.clients.clear()
        self.engines.clear()
        self.verified.clear()


def runs_torch(client: EdgeClient) -> bool:
    """Whether this node's work runs in torch (a later cut's tail, the torch engine) and torch is
    installed: a head-only process on an ONNX engine never imports it."""
    needed = client.config.cut > 0 or client.engine.name == EngineName.TORCH
    return needed and importlib.util.find_spec("torch") is not None


_PROCESS_STATE: ProcessState | None = None


def process_state() -> ProcessState:
    """This process's state, made on first use: what the ClientApp owns."""
    global _PROCESS_STATE
    if _PROCESS_STATE is None:
        _PROCESS_STATE = ProcessState()
    return _PROCESS_STATE
