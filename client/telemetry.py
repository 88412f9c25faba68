"""What a device reports about itself each round: memory high-water mark and CPU temperature.

Numbers only, about the device, never about its data. Peak RSS is the calling process's
high-water mark: in a deployment Flower starts one ClientApp process per message, so it is that
round's peak; in simulation it is the peak of the worker process that hosts the node so far.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from common import protocol

THERMAL_ROOT = Path("/sys/class/thermal")
THERMAL_ROOT_ENV = "EDGESPLIT_THERMAL_ROOT"  # another sysfs-like folder (tests give a board a fake sensor)
# Zone types that mean "the CPU" on common boards: Raspberry Pi (cpu-thermal), Jetson (CPU-therm),
# x86 laptops and servers (x86_pkg_temp), many Arm SoCs (soc-thermal, cpu0-thermal...).
CPU_ZONE_HINTS = ("cpu", "x86_pkg", "soc")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cpu_temperature_c(thermal_root: Path | None = None) -> float | None:
    """Hottest CPU thermal zone in degrees Celsius, or None where the board exposes none."""
    thermal_root = thermal_root or Path(os.environ.get(THERMAL_ROOT_ENV) or THERMAL_ROOT)
    readings = []
    for zone in sorted(thermal_root.glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text().strip().lower()
            if not any(hint in kind for hint in CPU_ZONE_HINTS):
                continue
            readings.append(int((zone / "temp").read_text().strip()) / 1000.0)  # millidegrees
        except (OSError, ValueError):
            continue  # a zone that cannot be read (permissions, sensor off) says nothing
    return max(readings) if readings else None


def process_seconds() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere)."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


def device_metrics() -> dict[str, float]:
    """The per-round device telemetry, as metric values (temperature only where it exists)."""
    metrics = {protocol.PEAK_RSS_MB: round(peak_rss_mb(), 1)}
    age = process_seconds()
    if age is not None:
        metrics[protocol.PROCESS_SECONDS] = round(age, 2)
    temperature = cpu_temperature_c()
    if temperature is not None:
        metrics[protocol.CPU_TEMP_C] = round(temperature, 1)
    return metrics
