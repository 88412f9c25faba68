"""The ``edgesplit`` command. Each subcommand lives in the module that owns the work and is
imported only when called, so ``edgesplit credentials`` does not load torch."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "simulate": ("deploy.simulate", "run a simulated federation on this machine (the main job)"),
    "credentials": ("server.credentials", "make the CA, the SuperLink certificate and board key pairs"),
    "deploy-local": ("deploy.local_fleet", "start SuperLink + N SuperNodes here, TLS and auth on"),
    "dashboard": ("server.dashboard", "a live, read-only web view of a run folder (127.0.0.1 by default)"),
    "report": ("server.report", "write a run folder's static report.html (PNG plots) again"),
    "predict": ("client.predict", "classify a folder of images with an exported model (ONNX Runtime, no torch)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: edgesplit <command> [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"edgesplit: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    return int(module.main(args[1:]))


if __name__ == "__main__":
    sys.exit(main())
