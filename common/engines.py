"""Backbone engines: the frozen backbone as a function from preprocessed images to features, and
the engine kinds that say how each form of it travels, is kept on a board and is built.

Three kinds run the same backbone:

- ``torch``: PyTorch eager, channels_last (the reference); what travels is the weights;
- ``onnx``: ONNX Runtime, fp32; what travels is the ONNX file;
- ``onnx-int8``: ONNX Runtime, static int8 (QDQ, per-channel weights), calibrated on the server,
  run with ONNX Runtime's exact int8 kernels where its fast ones saturate (``X64_QUANT_PRECISION``).

The server makes every variant from the one backbone it holds (``server/variants.py``), so all
clients of a run share one feature space. A variant's fingerprint covers the backbone's
fingerprint, the engine and the artifact's bytes: a client can check what it received, and
embeddings of different variants never share a cache. A fourth engine is one ``EngineKind``
subclass and one line in ``ENGINE_KINDS``.

No torch import at module level: a head-only board and ``edgesplit predict`` run without torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from common.kinds import EngineChoice, EngineName, kind_values
from common.onnx_wire import MalformedModel, external_data_tensors
from common.private_files import write_private
from common.protocol import ONNX_MODEL

if TYPE_CHECKING:
    from torch import nn

    from common.protocol import Instructions

# ONNX Runtime's fast u8 x s8 int8 kernels on x86 without VNNI (SSE4.1, AVX2, AVX-512 without VNNI)
# add pairs of products in 16 bits (VPMADDUBSW), which saturates: EfficientNet-Lite0's int8 features
# fell to cosine 0.87 (lowest 0.61) to PyTorch on an AVX2 CPU. With this session option ONNX
# Runtime turns every int8 weight tensor that could overflow into uint8 and runs its exact u8 x u8
# kernels instead. It is set only where the fast kernels saturate (``int8_kernels_saturate``):
# on an AVX-512 VNNI CPU, whose u8 x s8 kernels accumulate in 32 bits and are exact already, the
# option computes the same features 2.6x slower (measured), and ARM is exact without it. So every
# CPU class computes the same int8 model without saturation. Measured: BENCHMARKS.md, "Backbone engines".
X64_QUANT_PRECISION = "session.x64quantprecision"


def int8_kernels_saturate() -> bool:
    """Whether ONNX Runtime's u8 x s8 kernels saturate on this CPU: x86 without AVX-512 VNNI.

    The CPU's features as NumPy reads them with CPUID when it loads, so an emulated CPU (qemu
    ``-cpu Haswell``) counts as what it emulates, not as its host. An x86 CPU whose features cannot
    be read counts as saturating: the exact kernels are only slower, never wrong."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False  # ARM and others: ONNX Runtime's int8 kernels widen without saturating
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # NumPy 2, NumPy 1
        try:
            features: dict[str, bool] = importlib.import_module(module).__cpu_features__
        except (ImportError, AttributeError):
            continue
        return not features.get("AVX512VNNI", False)
    return True


# An engine maps a float32 batch (n, 3, h, w) to float32 features (n, feature_dim).
Engine = Callable[[np.ndarray], np.ndarray]


class EngineError(RuntimeError):
    """An engine cannot run here, or its artifact is not what was announced."""


class FingerprintMismatch(EngineError):
    """A backbone artifact does not hash to the fingerprint it was announced with."""


class UnsafeModel(EngineError):
    """An ONNX model that would make ONNX Runtime read data from outside it, or that cannot be read
    to tell."""


class GoldenCheckFailed(EngineError):
    """A device's engine does not compute the server's features of the golden batch closely enough."""

    def __init__(self, message: str, cosine: float) -> None:
        super().__init__(message)
        self.cosine = cosine


# ONNX Runtime also loads its own flatbuffer format, which it recognises by these bytes at offset 4;
# a board takes ONNX protobufs only (and tells ONNX Runtime so).
ORT_FORMAT_MARK = b"ORTM"
LOAD_MODEL_FORMAT = "session.load_model_format"


def checked_onnx(model: bytes) -> bytes:
    """``model`` if it is a self-contained ONNX protobuf; else UnsafeModel naming the problem.

    A tensor's data may lie outside the model: in a file beside it, or at a memory address (ONNX
    Runtime's in-memory tag). Either would make the engine read what is not the model, so any
    such tensor, anywhere in the model, refuses it, before ONNX Runtime sees the bytes."""
    if model[4:8] == ORT_FORMAT_MARK:
        raise UnsafeModel("The model is in ONNX Runtime's own format; a board runs ONNX protobuf models only.")
    try:
        outside = external_data_tensors(model)
    except MalformedModel as error:
        raise UnsafeModel(f"The model is not a readable ONNX protobuf ({error}); it is refused.") from None
    if outside:
        shown = ", ".join(repr(name[:80]) for name in outside[:5]) + (", ..." if len(outside) > 5 else "")
        raise UnsafeModel(
            f"The model keeps the data of {len(outside)} tensor(s) outside itself (external data: {shown}); "
            "a board runs self-contained models only, so it is refused. Export the model with its weights "
            "inside (the server's variants are)."
        )
    return model


class EngineKind:
    """One form of the backbone: what travels, what a board keeps, how it is checked and run."""

    name: ClassVar[EngineName]
    needs: ClassVar[str]  # the module a device must have installed
    install: ClassVar[str]  # how to install it
    # The engine a node falls back to when this one fails its golden check (None: none is safer).
    safer: ClassVar[EngineName | None] = None

    def available(self) -> bool:
        return importlib.util.find_spec(self.needs) is not None

    def require(self) -> None:
        if not self.available():
            raise EngineError(
                f"engine='{self.name}' needs {self.needs}, which is not installed on this device. "
                f"Install it with: {self.install}, or choose another engine."
            )

    def file_name(self, fp: str, cut: int) -> str:
        """The file a board keeps this variant in (unique per backbone, engine and cut)."""
        raise NotImplementedError

    def variant_fingerprint(self, fp: str, artifact: bytes | None) -> str:
        raise NotImplementedError

    def pack(self, artifact: Any) -> dict[str, np.ndarray]:
        """The arrays the backbone record carries for this engine."""
        raise NotImplementedError

    def keep(self, path: Path, arrays: Mapping[str, np.ndarray], instructions: Instructions) -> str:
        """Verify a received variant against the instructions and keep it at ``path``; returns
        its variant fingerprint. Raises FingerprintMismatch for a corrupted transfer."""
        raise NotImplementedError

    def check(self, path: Path, fp: str) -> str:
        """The variant fingerprint of the copy at ``path``. Raises FileNotFoundError when there
        is none and FingerprintMismatch (after removing it) when it is unreadable."""
        raise NotImplementedError

    def load(self, path: Path, cut: int, num_threads: int) -> Engine:
        """The runnable backbone (up to the cut) from a checked copy."""
        raise NotImplementedError


class TorchKind(EngineKind):
    """The weights themselves; a board builds the architecture from timm/torchvision."""

    name, needs, install = EngineName.TORCH, "torch", "pip install 'edgesplit[edge,torch]'"

    def file_name(self, fp: str, cut: int) -> str:
        return f"{fp}.pt"  # whatever the cut: the board builds the prefix from the weights

    def variant_fingerprint(self, fp: str, artifact: bytes | None) -> str:
        return fp  # the torch variant is the backbone itself

    def pack(self, artifact: Any) -> dict[str, np.ndarray]:
        return {name: tensor.detach().cpu().numpy() for name, tensor in artifact.items()}

    def keep(self, path: Path, arrays: Mapping[str, np.ndarray], instructions: Instructions) -> str:
        import torch

        from common.backbones import fingerprint

        state = {name: torch.from_numpy(np.array(value)) for name, value in arrays.items()}
        actual = fingerprint(instructions.backbone_name, state, instructions.preprocess)
        if actual != instructions.fingerprint:
            raise FingerprintMismatch(
                f"Received backbone hashes to {actual[:12]}, but the server announced "
                f"{instructions.fingerprint[:12]}. The transfer was corrupted or the server's registry changed; "
                "the round is refused."
            )
        stored = {"name": instructions.backbone_name, "preprocess": instructions.preprocess.to_json(), "state": state}
        write_private(path, lambda target: torch.save(stored, target))
        return actual

    def check(self, path: Path, fp: str) -> str:
        self._read(path, fp)
        return fp

    def load(self, path: Path, cut: int, num_threads: int) -> Engine:
        import torch

        from common.backbones import build_backbone
        from common.split import split_backbone

        stored = torch.load(path, map_location="cpu", weights_only=True)  # checked already: no second hash
        name, state = stored["name"], stored["state"]
        return TorchEngine(split_backbone(name, build_backbone(name, state), cut)[0])

    @staticmethod
    def _read(path: Path, fp: str) -> tuple[str, dict[str, Any]]:
        """Load and verify; a copy that is unreadable or hashes differently is deleted."""
        import torch

        from common.backbones import fingerprint
        from common.preprocess import PreprocessSpec

        if not path.is_file():
            raise FileNotFoundError(path)
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            name, state = stored["name"], stored["state"]
            matches = fingerprint(name, state, PreprocessSpec.from_json(stored["preprocess"])) == fp
        except Exception as error:  # truncated or foreign file: treat as not held
            path.unlink(missing_ok=True)
            raise FingerprintMismatch(f"Cached backbone {path} is unreadable ({error}) and was removed") from error
        if not matches:
            path.unlink(missing_ok=True)
            raise FingerprintMismatch(
                f"Cached backbone {path} does not match its fingerprint {fp[:12]} and was removed"
            )
        return name, state


class OnnxKind(EngineKind):
    """An ONNX model of the backbone up to the cut, run by ONNX Runtime in fp32."""

    name, needs, install = EngineName.ONNX, "onnxruntime", "pip install 'edgesplit[edge]'"
    safer = EngineName.TORCH  # the reference itself, where a board has it
    server_file: ClassVar[str] = "backbone.onnx"  # in the server's variants folder
    # How the file is made and run, beyond its bytes: a change gives the variant a new fingerprint,
    # so embeddings computed the old way are never reused (they live under the old fingerprint).
    recipe: ClassVar[str] = ""

    def file_name(self, fp: str, cut: int) -> str:
        return f"{fp}.{self.name}.onnx" if cut == 0 else f"{fp}.{self.name}.cut{cut}.onnx"

    def variant_fingerprint(self, fp: str, artifact: bytes | None) -> str:
        if artifact is None:
            raise EngineError(f"engine '{self.name}' needs the artifact's bytes to fingerprint it.")
        tag = f"{fp}|{self.name}|" + (f"{self.recipe}|" if self.recipe else "")
        digest = hashlib.sha256(tag.encode())
        digest.update(artifact)
        return digest.hexdigest()

    def pack(self, artifact: Any) -> dict[str, np.ndarray]:
        return {ONNX_MODEL: np.frombuffer(artifact, dtype=np.uint8)}

    def keep(self, path: Path, arrays: Mapping[str, np.ndarray], instructions: Instructions) -> str:
        if set(arrays) != {ONNX_MODEL}:
            raise FingerprintMismatch(f"An {self.name} backbone record must hold only {ONNX_MODEL!r}.")
        model = np.asarray(arrays[ONNX_MODEL], dtype=np.uint8).tobytes()
        actual = self.variant_fingerprint(instructions.fingerprint, model)
        if actual != instructions.engine_fingerprint:
            raise FingerprintMismatch(
                f"Received {self.name} backbone hashes to {actual[:12]}, but the server announced "
                f"{instructions.engine_fingerprint[:12]}. The transfer was corrupted; the round is refused."
            )
        checked_onnx(model)  # what was announced may still read outside itself: kept only if whole
        write_private(path, lambda target: target.write_bytes(model))
        return actual

    def check(self, path: Path, fp: str) -> str:
        """Whatever its bytes hash to; the caller compares with what it needs."""
        if not path.is_file():
            raise FileNotFoundError(path)
        return self.variant_fingerprint(fp, path.read_bytes())

    def load(self, path: Path, cut: int, num_threads: int) -> Engine:
        self.require()
        return OnnxEngine(path, num_threads)

    def make(self, fp32: Path, target: Path, calibration: Callable[[], np.ndarray], keep_float_convs: int) -> None:
        """Make this variant from the fp32 export (the server's job); fp32 is the export itself."""


class OnnxInt8Kind(OnnxKind):
    """Static int8, calibrated on the server's held-out images (common/export.py)."""

    name = EngineName.ONNX_INT8
    safer = EngineName.ONNX
    server_file = "backbone-int8.onnx"
    recipe = f"qdq-u8s8-per-channel|{X64_QUANT_PRECISION}=1"

    def make(self, fp32: Path, target: Path, calibration: Callable[[], np.ndarray], keep_float_convs: int) -> None:
        from common.export import quantize_int8

        quantize_int8(fp32, target, calibration(), keep_float_convs)


ENGINE_KINDS: dict[str, EngineKind] = {kind.name.value: kind for kind in (TorchKind(), OnnxKind(), OnnxInt8Kind())}
ENGINES = tuple(ENGINE_KINDS)
ONNX_ENGINES = tuple(name for name, kind in ENGINE_KINDS.items() if isinstance(kind, OnnxKind))


def engine_kind(name: str) -> EngineKind:
    try:
        return ENGINE_KINDS[name]
    except KeyError:
        raise EngineError(f"Unknown engine {name!r}; choose one of {kind_values(EngineName)}.") from None


def runtime_tag(kind: EngineKind) -> str:
    """What decides an engine's numerics on this device besides the variant: the machine, the
    runtime's version and the CPU's flags. A golden verdict is kept only while this stays the same."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        runtime = f"{kind.needs} {version(kind.needs)}"
    except PackageNotFoundError:
        runtime = f"{kind.needs} (version unknown)"
    cpuinfo = Path("/proc/cpuinfo")
    flags = ""
    if cpuinfo.is_file():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()}|{runtime}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def onnxruntime_available() -> bool:
    return ENGINE_KINDS[EngineName.ONNX].available()


def resolve_engine(requested: EngineChoice) -> EngineKind:
    """The engine kind a device runs for a requested one.

    ``auto`` picks ``onnx-int8`` wherever ONNX Runtime is installed: on the 2-core x86 machines we
    measured it is 2x ONNX fp32 and over 10x PyTorch eager, with the linear probe within a point
    (BENCHMARKS.md, "Backbone engines"). Without ONNX Runtime (e.g. 32-bit Raspberry Pi OS, which
    has no wheels) it falls back to ``torch``.
    """
    if requested == EngineChoice.AUTO:
        return ENGINE_KINDS[EngineName.ONNX_INT8 if onnxruntime_available() else EngineName.TORCH]
    kind = engine_kind(requested)
    kind.require()
    return kind


class OnnxEngine:
    """An ONNX model in ONNX Runtime on the CPU.

    ``num_threads`` 0 keeps ONNX Runtime's default of one intra-op thread per physical core. One
    inference runs at a time (sequential execution, one inter-op thread): on a board with a few
    cores, parallelism inside each convolution is what pays.
    """

    def __init__(self, model: bytes | str | Path, num_threads: int = 0, exact_int8: bool | None = None) -> None:
        """``exact_int8``: ONNX Runtime's exact int8 kernels, by default where the fast ones
        saturate (``int8_kernels_saturate``); forced on or off only to measure either."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if int8_kernels_saturate() if exact_int8 is None else exact_int8:
            options.add_session_config_entry(X64_QUANT_PRECISION, "1")
        if num_threads:
            options.intra_op_num_threads = num_threads
        options.add_session_config_entry(LOAD_MODEL_FORMAT, "ONNX")
        # The bytes checked are the bytes run: a file is read once, and ONNX Runtime gets no path
        # to resolve anything beside it.
        source = checked_onnx(model if isinstance(model, bytes) else Path(model).read_bytes())
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ONNX Runtime raises its own exception types
            raise EngineError(f"ONNX Runtime cannot load the model: {error}") from error
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: np.ndarray) -> list[Any]:
        """Every output of the model, in order."""
        return list(self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}))


class TorchEngine:
    """A PyTorch module in eager mode, channels_last by default (about 2x NCHW on x86 CPUs)."""

    def __init__(self, model: nn.Module, channels_last: bool = True) -> None:
        import torch

        self.channels_last = channels_last
        self.model = model.eval().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            return np.asarray(self.model(inputs).float().numpy(), dtype=np.float32)
