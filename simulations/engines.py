"""Backbone engines on this CPU: speed, memory and feature quality, in one run on the same images.

    python -m simulations.engines            # about 8 minutes on 2 cores
    python -m simulations.engines --emulate 0   # without the emulated AVX2 column

EfficientNet-Lite0 at 224 px on all 2,624 ELPV images. The server's engine variants are made as
in a run (int8 calibrated on the server's held-out split). Each engine runs in a fresh process
that imports only what that engine needs (the ONNX engines never import torch), so its peak RSS
is what a board process would need to embed. Per engine:

- images/s at batch 1, 8 (the default embed-batch-size) and 32, on the same 64 preprocessed
  images held in memory (decoding and resizing excluded: they cost the same for every engine);
- the ratio to PyTorch eager (NCHW) at batch 8, measured in this same command;
- achieved GFLOP/s (the model's FLOPs per image, counted by PyTorch, times images/s) and its
  share of this machine's estimated fp32 peak;
- feature agreement with PyTorch (cosine) and the ELPV accuracy of a logistic-regression probe
  on that engine's features (train on the clients' 75%, test on the server's 25%);
- for the int8 candidates against saturation on x86 without VNNI (common/engines.py): the same
  cosine on a few images with the process run under ``qemu-x86_64 -cpu Haswell`` (AVX2 and FMA,
  no AVX-512, so ONNX Runtime dispatches its AVX2 kernels), where qemu-user is installed on an
  x86-64 host. Emulated speed means nothing and is not reported.

The table is labelled with the CPU flags that decide which int8 kernels ONNX Runtime runs.

Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.kinds import EngineName
from deploy.local_simulation import PROJECT_ROOT, run_child

COMMAND = "python -m simulations.engines"
TITLE = "Backbone engines: throughput, memory and probe accuracy on this CPU"
ENGINE_ROWS = {  # row name -> (engine, channels_last, int8 weights, exact int8 kernels)
    "torch eager (NCHW)": (EngineName.TORCH, False, "", True),
    "torch (channels_last)": (EngineName.TORCH, True, "", True),
    "onnx (ONNX Runtime fp32)": (EngineName.ONNX, False, "", True),
    "onnx-int8, exact kernels (the engine on x86 without VNNI)": (EngineName.ONNX_INT8, False, "s8", True),
    "onnx-int8, fast u8s8 kernels (the engine on VNNI, ARM)": (EngineName.ONNX_INT8, False, "s8", False),
    "int8 s7 weights (reduce_range)": (EngineName.ONNX_INT8, False, "s7", True),
    "int8 u8 weights (U8U8)": (EngineName.ONNX_INT8, False, "u8", True),
}
INT8_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddot", "i8mm")
EMULATED_CPU = "Haswell"  # AVX2 + FMA, no AVX-512, no VNNI: the class whose u8s8 kernels saturate
BATCH_SIZES = (1, 8, 32)
REFERENCE_ROW = "torch eager (NCHW)"


def _vm_hwm_mib() -> float:
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def _images_per_second(engine: Any, images: np.ndarray, batch_size: int, min_seconds: float = 2.0) -> float:
    """Steady-state throughput: one warm-up batch, then whole passes until ``min_seconds``."""
    engine(images[:batch_size])
    done, started = 0, time.perf_counter()
    while True:
        for start in range(0, len(images) - batch_size + 1, batch_size):
            engine(images[start : start + batch_size])
            done += batch_size
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


def child(setup: dict[str, Any]) -> dict[str, Any]:
    """One engine in this fresh process: throughput and peak RSS (unless emulated), then the
    features of every image."""
    from common.engines import OnnxEngine

    threads = int(setup["threads"])
    if setup["engine"] == EngineName.TORCH:
        import torch

        from common.backbones import build_backbone
        from common.engines import TorchEngine

        torch.set_num_threads(threads)
        state = torch.load(setup["backbone"], weights_only=True)
        engine: Any = TorchEngine(build_backbone(setup["backbone_name"], state), channels_last=setup["channels_last"])
    else:
        engine = OnnxEngine(Path(setup["model"]), threads, exact_int8=setup["exact"])
    result: dict[str, Any] = {}
    if setup.get("speed", True):
        sample = np.load(setup["sample"])  # anonymous memory: not file-backed pages of the full set
        result["images_per_second"] = {str(b): _images_per_second(engine, sample, b) for b in BATCH_SIZES}
        result["peak_rss_mib"] = _vm_hwm_mib()
    if setup.get("features"):
        images = np.load(setup["images"], mmap_mode="r")
        features = [engine(np.asarray(images[s : s + 8])) for s in range(0, len(images), 8)]
        np.save(setup["features"], np.concatenate(features))
    return result


def int8_flags() -> str:
    """The CPU flags that decide ONNX Runtime's int8 kernels (x86: VNNI or not; ARM: dot products)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flag_line = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", info, re.MULTILINE)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    return " ".join(flag for flag in INT8_FLAGS if flag in flags) or "none of " + " ".join(INT8_FLAGS)


def emulator() -> list[str]:
    """How to run an x86-64 process as an AVX2 CPU without VNNI, or [] where this cannot be done."""
    qemu = shutil.which("qemu-x86_64")
    return [qemu, "-cpu", EMULATED_CPU] if qemu and platform.machine() == "x86_64" else []


def cpu_description() -> tuple[str, float, str]:
    """(model name, estimated fp32 peak GFLOP/s of all cores, how it was estimated)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)$", info, re.MULTILINE)
    flag_line = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", info, re.MULTILINE)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    # fp32 FLOPs per cycle per core with two FMA units: 2 x 2 x (vector width / 32 bit)
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512, 2 FMA units"
    elif {"avx2", "fma"} <= flags:
        per_cycle, isa = 32, "AVX2, 2 FMA units"
    else:
        per_cycle, isa = 16, "128-bit SIMD, 2 FMA units"
    ghz = float(mhz.group(1)) / 1000 if mhz else 2.0
    cores = os.cpu_count() or 1
    int8 = ", AVX-512 VNNI" if "avx512_vnni" in flags else (", AVX-VNNI" if "avx_vnni" in flags else "")
    name = (model.group(1).strip() if model else platform.processor() or platform.machine()) + int8
    return name, cores * ghz * per_cycle, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({isa})"


def gflop_per_image(model: Any, image_size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops()) / 1e9


def plot_engines(results: dict[str, dict[str, Any]], probes: dict[str, float], path: Path) -> None:
    """Images/s per engine and batch size, with each engine's probe accuracy on its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(BATCH_SIZES)
    for offset, batch in enumerate(BATCH_SIZES):
        speeds = [result["images_per_second"][str(batch)] for result in results.values()]
        bars = axes.bar(np.arange(len(results)) + (offset - 1) * width, speeds, width, label=f"batch {batch}")
        if batch == 8:
            for bar, row in zip(bars, results, strict=True):
                label = f"probe {100 * probes[row]:.1f}%" if row in probes else ""
                axes.annotate(label, (bar.get_x() + width / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    axes.set_xticks(np.arange(len(results)), [row.split(" (")[0] for row in results])
    axes.set(ylabel="images / s", title="EfficientNet-Lite0 at 224 px on this CPU (ELPV images)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3, axis="y")
    from simulations.benchmark import save_figure

    save_figure(figure, path)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads per engine")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    parser.add_argument(
        "--emulate", type=int, default=16, help="images per ONNX row under emulated AVX2 (0: none; needs qemu-user)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import onnxruntime
    import torch

    from common.backbones import build_backbone, fingerprint, get_spec, load_backbone_weights, preprocess_for
    from common.data import elpv_split
    from common.engines import int8_kernels_saturate
    from common.export import calibration_images, quantize_int8
    from common.heads import PowerNorm
    from common.kinds import ElpvTask
    from common.logs import quiet_root_logger
    from common.preprocess import decode_image
    from deploy.reference_probe import _fit
    from server.variants import BackboneVariants
    from simulations.benchmark import markdown_table, update_section

    name = "efficientnet_lite0"
    state = load_backbone_weights(name)
    preprocess = preprocess_for(name, 224, 1.0)
    train, test = elpv_split(ElpvTask.FOUR_LEVEL, 0, 0.25, 42)  # the runs' split: clients' 75%, server's 25%
    everything = train.paths + test.paths
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgesplit-engines-") as tmp:
        work = Path(tmp)
        print(f"preprocessing {len(everything)} ELPV images once ...", flush=True)
        images = np.lib.format.open_memmap(
            work / "images.npy", mode="w+", dtype=np.float32, shape=(len(everything), 3, 224, 224)
        )
        for index, path in enumerate(everything):
            images[index] = preprocess(decode_image(Path(path).read_bytes()))
        images.flush()
        sample = np.linspace(0, len(everything) - 1, 64).astype(int)
        np.save(work / "sample.npy", np.asarray(images[sample]))
        emulated = sample[: args.emulate]
        np.save(work / "emulated.npy", np.asarray(images[emulated]))
        del images
        torch.save(state, work / "backbone.pt")
        started = time.perf_counter()
        variants = BackboneVariants(
            work / "engines",
            name,
            state,
            preprocess,
            fingerprint(name, state, preprocess),
            calibration=lambda: calibration_images(test, preprocess),
        )
        fp32 = variants.path(EngineName.ONNX)
        models = {EngineName.ONNX.value: str(fp32), "s8": str(variants.path(EngineName.ONNX_INT8))}
        making_seconds = time.perf_counter() - started
        float_convs = get_spec(name).int8_float_convs  # as the engine's: stem and first block in float
        for weights in ("s7", "u8"):  # the other int8 candidates, calibrated on the same images
            models[weights] = str(work / f"int8-{weights}.onnx")
            calibration = calibration_images(test, preprocess)
            with quiet_root_logger():  # the quantizer logs every rescaled channel
                quantize_int8(fp32, Path(models[weights]), calibration, float_convs, weights=weights)
        sizes = {engine: Path(path).stat().st_size / 1e6 for engine, path in models.items()}
        launcher = emulator() if args.emulate else []
        for index, (row, (engine, channels_last, weights, exact)) in enumerate(ENGINE_ROWS.items()):
            print(f"measuring {row} ...", flush=True)
            features_path = work / f"features-{index}.npy"
            setup = {
                "engine": engine,
                "channels_last": channels_last,
                "exact": exact,
                "threads": args.threads,
                "backbone": str(work / "backbone.pt"),
                "backbone_name": name,
                "model": models.get(weights or engine, ""),
                "sample": str(work / "sample.npy"),
                "images": str(work / "images.npy"),
                # eager NCHW computes the same features as channels_last, only slower
                "features": str(features_path) if row != REFERENCE_ROW else "",
            }
            results[row] = run_child("simulations.engines", setup)
            if row != REFERENCE_ROW:
                results[row]["features"] = np.load(features_path)
            if launcher and engine != EngineName.TORCH:  # torch under emulation: slow, and not the question
                print(f"  ... and under qemu -cpu {EMULATED_CPU} on {len(emulated)} images", flush=True)
                setup.update(speed=False, images=str(work / "emulated.npy"), features=str(features_path))
                run_child("simulations.engines", setup, launcher=launcher)
                results[row]["emulated"] = np.load(features_path)

    flops = gflop_per_image(build_backbone(name, state), 224)
    cpu, peak_gflops, peak_how = cpu_description()
    reference_speed = results[REFERENCE_ROW]["images_per_second"]["8"]
    torch_features = results["torch (channels_last)"]["features"]
    labels = np.asarray(train.labels + test.labels)
    split = len(train)
    norm = PowerNorm()
    rows, probes = [], {}
    for row, result in results.items():
        speeds = result["images_per_second"]
        achieved = speeds["8"] * flops
        features = result.get("features")
        if features is None:
            quality = ["same as channels_last", "same as channels_last"]
        else:
            with torch.no_grad():
                normed = norm(torch.from_numpy(features)).numpy()
            probe = _fit(normed[:split], labels[:split], normed[split:], labels[split:], 4, seed=42)
            probes[row] = probe.accuracy
            cosines = _cosines(features, torch_features)
            quality = [f"{cosines.mean():.4f} / {cosines.min():.4f}", f"{100 * probe.accuracy:.2f}%"]
        if "emulated" in result:
            emulated_cosines = _cosines(result["emulated"], torch_features[emulated])
            quality.append(f"{emulated_cosines.mean():.4f} / {emulated_cosines.min():.4f}")
        elif launcher:
            quality.append("")
        rows.append(
            [
                row,
                *(f"{speeds[str(b)]:.1f}" for b in BATCH_SIZES),
                f"{speeds['8'] / reference_speed:.2f}x",
                f"{achieved:.0f} ({100 * achieved / peak_gflops:.0f}%)",
                f"{result['peak_rss_mib']:.0f}",
                *quality,
            ]
        )
    columns = [
        "engine",
        "img/s b=1",
        "img/s b=8",
        "img/s b=32",
        "vs eager (b=8)",
        "GFLOP/s (of fp32 peak)",
        "peak RSS MiB",
        "cosine to torch mean / min",
        "ELPV probe acc.",
    ]
    if launcher:
        columns.append(f"cosine on AVX2 (emulated, {len(emulated)} images)")
    table = markdown_table(rows, columns)
    print(table)
    plot_path = args.output.parent / "docs" / "engines.png"
    plot_engines(results, probes, plot_path)
    body = (
        f"Command: `{COMMAND}`. Machine: {cpu}, {os.cpu_count()} cores, {platform.machine()}, "
        f"int8-relevant CPU flags: **{int8_flags()}**; "
        f"{args.threads} threads per engine; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}.\n"
        f"EfficientNet-Lite0, 224 px, {flops:.2f} GFLOP per image (PyTorch's FLOP counter). "
        f"Estimated fp32 peak: {peak_gflops:.0f} GFLOP/s = {peak_how}; the int8 engine's "
        "'GFLOP/s' counts the same model FLOPs, done as int8 operations, so it can pass the fp32 peak.\n"
        "Throughput on the same 64 preprocessed images in memory (decode and resize excluded); each engine "
        "in its own fresh process, whose peak RSS is the column (the ONNX engines do not import torch). "
        f"Probe: logistic regression on PowerNorm'd features, trained on the clients' {split} images, "
        f"tested on the server's {len(labels) - split} (the runs' split).\n"
        f"Making the variants on the server (ONNX export, int8 calibration on 64 held-out images): "
        f"{making_seconds:.0f} s, once per backbone. Sizes: ONNX fp32 {sizes['onnx']:.1f} MB, "
        f"int8 {sizes['s8']:.1f} MB (the torch weights: 13.6 MB).\n"
        "The int8 rows are the candidates against saturation on x86 without VNNI (common/engines.py): the "
        "engine's s8 weights with ONNX Runtime's `session.x64quantprecision` (its exact u8u8 kernels), the "
        "same model on the fast u8s8 kernels (exact on VNNI and ARM, saturating on other x86), 7-bit "
        "weights (`reduce_range`) and uint8 weights (U8U8). The engine sets the option only where the fast "
        f"kernels saturate: on this CPU it runs the {'exact' if int8_kernels_saturate() else 'fast'}-kernel "
        "row. "
        + (
            f"The last column runs each ONNX row in `{' '.join(['qemu-x86_64', *launcher[1:]])}` "
            "(AVX2 + FMA, no AVX-512, no VNNI), so ONNX Runtime runs the kernels such a CPU gets.\n\n"
            if launcher
            else "\n\n"
        )
        + f"{table}\n\n"
        f"![images per second per engine](docs/{plot_path.name})\n"
    )
    update_section(args.output, TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
