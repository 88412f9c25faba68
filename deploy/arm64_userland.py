"""An emulated ARM64 board on this x86-64 machine: an arm64 Python 3.11 from Debian's own arm64
packages, run by qemu-user, with ``edgesplit[edge]`` installed into it by pip running on aarch64.

One command sets it up, once, in ``~/.cache/edgesplit/arm64`` (or ``$EDGESPLIT_ARM64_DIR``)::

    python -m deploy.arm64_userland          # build it if missing or stale (make setup runs this)
    python -m deploy.arm64_userland --check  # say what is there and what is missing; build nothing

What it makes, and why this way:

- ``sysroot/``: Debian 12's arm64 ``python3.11`` and ``libstdc++6`` with their dependencies,
  fetched by ``apt-get download`` through a private apt configuration (its own package lists in
  the cache, architecture arm64) and unpacked with ``dpkg -x``: no root, and the machine's
  dpkg architectures and package lists stay as they are.
- ``wheels/``: this project's wheel and the aarch64 wheels pip downloads for it
  (``pip download --platform manylinux_2_28_aarch64 ... edgesplit[edge]``).
- ``venv/``: a virtual environment of the emulated Python, into which the emulated Python's own
  pip installs ``edgesplit[edge]`` from ``wheels/`` (no index): the board's install is a real
  ``pip install .[edge]`` on aarch64, which picks aarch64 wheels by its own platform tags.
- ``bin/``: launchers named ``flower-supernode``, ``flower-superexec``, ``flwr-clientapp`` and
  ``python3`` that start the venv's scripts under ``qemu-aarch64``. A SuperNode starts its
  SuperExec and the SuperExec a ClientApp process per message, each by name from ``PATH``; qemu-user
  emulates one process and passes ``execve`` to the kernel, which cannot run an aarch64 file
  without a ``binfmt_misc`` handler. Registering one needs root and a mounted ``binfmt_misc`` and
  changes the whole machine (every aarch64 file would run under it), so instead the board's
  ``PATH`` starts with ``bin/``: every process of the board is an aarch64 Python under qemu,
  started exactly as Flower starts it, and nothing outside the board changes.

qemu-user must be 10 or later: Debian 12's own (7.2) crashes importing ONNX Runtime 1.32 for
aarch64; Debian 12 has 10.0 in bookworm-backports (``make setup`` installs it; the message below
says how). Emulated speed means nothing; the emulated board is for fidelity (does the int8 engine
compute on ARM what it computes on x86?) and for the mixed fleet (``deploy-local --arm-boards``).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ROOT_ENV = "EDGESPLIT_ARM64_DIR"
# Raspberry Pi 5's core: ARMv8.2 with the dot-product instructions (asimddp), no SVE, no i8mm.
# A Pi 4 is "cortex-a72" (no dot product). QEMU_CPU in a board's environment overrides it.
DEFAULT_CPU = "cortex-a76"
MIN_QEMU = (10, 0)
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SOURCES = (
    f"{DEBIAN_MIRROR} bookworm main",
    f"{DEBIAN_MIRROR} bookworm-updates main",
    "http://deb.debian.org/debian-security bookworm-security main",
)
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# python3.11 pulls libc6, libssl3, libffi8 ...; libstdc++6 is for ONNX Runtime's and grpcio's wheels.
DEBIAN_PACKAGES = ("python3.11", "libstdc++6")
PYTHON = "usr/bin/python3.11"
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64")
LAUNCHERS = ("flower-supernode", "flower-superexec", "flwr-clientapp")
SOURCE_PACKAGES = ("common", "client", "server", "deploy", "simulations")

QEMU_HELP = (
    "qemu-user {minimum} or later is needed to run the arm64 userland (Debian 12's own 7.2 crashes "
    "importing ONNX Runtime for aarch64). On Debian 12, as root:\n"
    f"  echo 'deb {DEBIAN_MIRROR} bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list\n"
    "  apt-get update && apt-get install -t bookworm-backports qemu-user\n"
    "(`make setup` does this). Found: {found}."
)


class SetupError(RuntimeError):
    """The emulated board cannot run here; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class Userland:
    """A built arm64 userland: how to run its Python and the board's Flower processes under qemu."""

    root: Path
    qemu: str

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python3.11"

    @property
    def bin_dir(self) -> Path:
        """The launchers a board's ``PATH`` starts with (module docstring)."""
        return self.root / "bin"

    def command(self, *args: str, cpu: str = DEFAULT_CPU) -> list[str]:
        """The emulated Python with ``args``, as one process under qemu-aarch64 -cpu ``cpu``."""
        return [self.qemu, "-cpu", cpu, "-L", str(self.sysroot), str(self.python), *args]

    def board_env(self, cpu: str = DEFAULT_CPU) -> dict[str, str]:
        """What a SuperNode's environment needs to run as this emulated board."""
        return {"PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "QEMU_CPU": cpu}


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".cache" / "edgesplit" / "arm64").expanduser()


# --- qemu --------------------------------------------------------------------------------------------


def qemu_version(qemu: str) -> tuple[int, int] | None:
    try:
        output = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"version (\d+)\.(\d+)", output)
    return (int(found[1]), int(found[2])) if found else None


def find_qemu() -> str:
    """The path of a qemu-aarch64 that runs the userland, or SetupError saying how to install one."""
    qemu = shutil.which("qemu-aarch64")
    version = qemu_version(qemu) if qemu else None
    if qemu is None or version is None or version < MIN_QEMU:
        found = "no qemu-aarch64 on PATH" if qemu is None else f"{qemu} version {version or 'unknown'}"
        minimum = ".".join(map(str, MIN_QEMU))
        raise SetupError(QEMU_HELP.format(minimum=minimum, found=found))
    return qemu


# --- what the userland is made from (its cache key) ---------------------------------------------------


def project_requirements(project: Path = PROJECT_ROOT) -> list[str]:
    """The board install's requirements as pyproject.toml states them: the base and the edge extra."""
    spec = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    return [*spec["dependencies"], *spec["optional-dependencies"]["edge"]]


def board_data_requirements(project: Path = PROJECT_ROOT) -> list[str]:
    """ELPV's images as the server extra pins them: an emulated board of ``deploy-local``'s ELPV split
    reads its partition from them, as the x86 boards do (a real board has its own image folder)."""
    spec = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    return [r for r in spec["optional-dependencies"]["server"] if r.startswith("elpv-dataset")]


def userland_key(project: Path = PROJECT_ROOT) -> str:
    """Changes when anything the userland is made from changes: rebuild then."""
    requirements = [*project_requirements(project), *board_data_requirements(project)]
    parts = [*DEBIAN_SOURCES, *DEBIAN_PACKAGES, *WHEEL_PLATFORMS, *requirements, "cp311"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def existing(root: Path | None = None) -> Userland | None:
    """The userland at ``root`` if it is built for this project's requirements, else None."""
    root = root or default_root()
    stamp = root / "ready"
    if not stamp.is_file() or stamp.read_text().strip() != userland_key():
        return None
    return Userland(root, find_qemu())


def require(root: Path | None = None) -> Userland:
    """The userland, or SetupError naming the one command that makes it (and qemu's state)."""
    qemu = find_qemu()
    root = root or default_root()
    userland = existing(root)
    if userland is None:
        state = "is out of date" if (root / "ready").is_file() else "is missing"
        raise SetupError(
            f"The emulated arm64 userland at {root} {state}. Make it once (2-3 minutes, 700 MB; "
            f"`make setup` does it): {Path(sys.executable).name} -m deploy.arm64_userland"
        )
    return Userland(userland.root, qemu)


# --- building ---------------------------------------------------------------------------------------


def _run(command: Sequence[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode != 0:
        raise SetupError(
            f"{what} failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def fetch_debian_packages(root: Path) -> list[Path]:
    """Debian 12's arm64 python3.11 and libstdc++6 with their dependencies, through an apt
    configuration of its own (lists, status and archives under ``root``): no root, no change to
    the machine's dpkg architectures."""
    if shutil.which("apt-get") is None or not DEBIAN_KEYRING.is_file():
        raise SetupError(
            f"apt-get and {DEBIAN_KEYRING} (package debian-archive-keyring) are needed to fetch the arm64 Python."
        )
    apt = root / "apt"
    for folder in ("lists/partial", "archives/partial", "etc"):
        (apt / folder).mkdir(parents=True, exist_ok=True)
    (apt / "status").write_text("")  # nothing installed: apt fetches the whole dependency closure
    sources = "".join(f"deb [arch=arm64 signed-by={DEBIAN_KEYRING}] {source}\n" for source in DEBIAN_SOURCES)
    (apt / "etc" / "sources.list").write_text(sources)
    options = [
        "-o", "APT::Architecture=arm64",
        "-o", "APT::Architectures::=arm64",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::State::status={apt / 'status'}",
        "-o", f"Dir::Cache::archives={apt / 'archives'}",
        "-o", f"Dir::Etc::SourceList={apt / 'etc' / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", "Debug::NoLocking=1",
    ]  # fmt: skip
    _run(["apt-get", *options, "update"], "apt-get update (arm64 lists)")
    install = ["install", "--download-only", "--no-install-recommends", "-y", "-qq", *DEBIAN_PACKAGES]
    _run(["apt-get", *options, *install], "apt-get download of the arm64 packages")
    return sorted((apt / "archives").glob("*.deb"))


def unpack(debs: list[Path], sysroot: Path) -> None:
    """``dpkg -x`` each package into ``sysroot`` (files only; no maintainer script runs)."""
    shutil.rmtree(sysroot, ignore_errors=True)
    sysroot.mkdir(parents=True)
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(sysroot)], f"dpkg -x {deb.name}")


def download_wheels(wheels: Path, project: Path = PROJECT_ROOT) -> Path:
    """This project's wheel (built from a copy of its sources, so no build/ lands in the checkout)
    and every aarch64 wheel ``edgesplit[edge]`` needs, plus pip's own; returns the project's wheel."""
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="edgesplit-src-") as tmp:
        source = Path(tmp) / "edgesplit"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(project / name, source / name)
        for package in SOURCE_PACKAGES:
            shutil.copytree(project / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
        pip = [sys.executable, "-m", "pip"]
        _run(
            [*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], "pip wheel"
        )
    built = next(wheels.glob("edgesplit-*.whl"))
    platforms = [option for platform in WHEEL_PLATFORMS for option in ("--platform", platform)]
    target = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    requirement = f"edgesplit[edge] @ {built.resolve().as_uri()}"
    _run(
        [
            *pip,
            "download",
            "--quiet",
            *platforms,
            *target,
            "-d",
            str(wheels),
            requirement,
            *board_data_requirements(project),
            "pip",
        ],
        "pip download (aarch64)",
    )
    return built


def install_board(userland: Userland, wheels: Path, cpu: str = DEFAULT_CPU) -> None:
    """A venv of the emulated Python, and ``pip install edgesplit[edge]`` run by that Python from
    ``wheels`` only (its pip, from pip's wheel; no configuration of this machine's pip applies)."""
    shutil.rmtree(userland.venv, ignore_errors=True)
    system_python = [userland.qemu, "-cpu", cpu, "-L", str(userland.sysroot), str(userland.sysroot / PYTHON)]
    _run([*system_python, "-m", "venv", "--without-pip", str(userland.venv)], "venv of the arm64 Python")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "PYTHON"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    pip_wheel = next(wheels.glob("pip-*.whl"))
    wanted = ["edgesplit[edge]", *board_data_requirements()]  # and ELPV's images (board_data_requirements)
    install = ["install", "--quiet", "--no-index", "--find-links", str(wheels), *wanted]
    _run(userland.command(f"{pip_wheel}/pip", *install, cpu=cpu), "pip install edgesplit[edge] on aarch64", env=env)


LAUNCHER = """#!/bin/sh
# Made by deploy/arm64_userland.py: run {script} on the emulated arm64 Python (qemu-aarch64).
# The board's code is what its pip installed and what each run ships: no PYTHONPATH of this machine.
unset PYTHONPATH PYTHONHOME
export QEMU_CPU="${{QEMU_CPU:-{cpu}}}"
exec {qemu} -L {sysroot} {python} {target}"$@"
"""


def write_launchers(userland: Userland) -> None:
    """``bin/``: the Flower commands a board starts by name, and ``python3``, under qemu-aarch64."""
    userland.bin_dir.mkdir(parents=True, exist_ok=True)
    for name in (*LAUNCHERS, "python3"):
        target = "" if name == "python3" else f"{userland.venv / 'bin' / name} "
        text = LAUNCHER.format(
            script=name,
            cpu=DEFAULT_CPU,
            qemu=userland.qemu,
            sysroot=userland.sysroot,
            python=userland.python,
            target=target,
        )
        path = userland.bin_dir / name
        path.write_text(text)
        path.chmod(0o755)


SMOKE = (
    "import platform, flwr, numpy, onnxruntime; "
    "print(platform.machine(), platform.python_version(), onnxruntime.__version__, numpy.__version__)"
)


def smoke_test(userland: Userland) -> str:
    """Import what a board imports under the emulated CPU; a crash here is qemu's (QEMU_HELP)."""
    done = subprocess.run([str(userland.bin_dir / "python3"), "-c", SMOKE], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not done.stdout.startswith("aarch64"):
        version = ".".join(map(str, qemu_version(userland.qemu) or ("unknown",)))
        raise SetupError(
            f"The arm64 Python could not import flwr, numpy and onnxruntime under {userland.qemu} {version} "
            f"(exit {done.returncode}): {done.stderr[-1500:]}\nA qemu older than 10 crashes here."
        )
    return done.stdout.strip()


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two set-ups at once (parallel make) build it once
        yield


def build(root: Path | None = None, force: bool = False, say: bool = True) -> Userland:
    """The userland at ``root``, made if missing or stale (``force``: made again)."""
    qemu, root = find_qemu(), root or default_root()
    with _locked(root):
        ready = None if force else existing(root)
        if ready is not None:
            return ready
        (root / "ready").unlink(missing_ok=True)
        userland = Userland(root, qemu)
        steps = [
            ("Debian arm64 packages", lambda: unpack(fetch_debian_packages(root), userland.sysroot)),
            ("aarch64 wheels", lambda: download_wheels(root / "wheels")),
            (
                "pip install edgesplit[edge] on the emulated aarch64 Python",
                lambda: install_board(userland, root / "wheels"),
            ),
            ("launchers", lambda: write_launchers(userland)),
        ]
        for what, step in steps:
            if say:
                print(f"arm64 userland: {what} ...", flush=True)
            step()
        found = smoke_test(userland)
        (root / "ready").write_text(userland_key() + "\n")
        if say:
            print(f"arm64 userland ready in {root}: {found} (machine, Python, ONNX Runtime, NumPy)", flush=True)
        return userland


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.arm64_userland",
        description="Set up (once, cached) the emulated arm64 userland an ARM board runs in here: "
        "qemu-user, Debian's arm64 Python 3.11 and edgesplit[edge] installed on it.",
    )
    parser.add_argument("--root", type=Path, help=f"where it lives (default ${ROOT_ENV} or ~/.cache/edgesplit/arm64)")
    parser.add_argument(
        "--check", action="store_true", help="say whether it is ready and what is missing; build nothing"
    )
    parser.add_argument("--force", action="store_true", help="make it again even if it is ready")
    parser.add_argument("--qemu", action="store_true", help="only check that qemu-aarch64 is recent enough")
    args = parser.parse_args(argv)
    try:
        if args.qemu:
            print(f"qemu-aarch64 {'.'.join(map(str, qemu_version(find_qemu()) or ()))} is recent enough")
            return 0
        if args.check:
            userland = require(args.root)
            print(
                f"arm64 userland ready: {userland.root} (qemu: {userland.qemu}); board launchers in {userland.bin_dir}"
            )
            return 0
        build(args.root, force=args.force)
        return 0
    except SetupError as error:
        print(f"arm64 userland: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
