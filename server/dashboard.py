"""``edgesplit dashboard RUN_DIR``: a live, read-only web view of one run folder.

Starlette and uvicorn (already installed with Flower) serve three things: the page and its
script (``server/static/``, no third-party JavaScript, nothing loaded from the internet), the
run's state as JSON (``/api/state``, from ``server/runview.py``; the browser polls it every two
seconds with ``If-None-Match``, so an unchanged run costs a 304), and files inside the run folder
(``/run/...``: the report, its plots), with any path that leaves the folder refused.

It binds to 127.0.0.1 unless told otherwise (``--host`` with ``--allow-remote``).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.runview import RunView

STATIC = Path(__file__).parent / "static"
NO_STORE = {"Cache-Control": "no-cache"}


class DashboardError(ValueError):
    """The dashboard cannot start as asked; the message says why and what to do."""


def make_app(run_dir: Path) -> Starlette:
    """The dashboard of one run folder (which may not exist yet: it shows 'waiting')."""
    run_dir = run_dir.resolve()
    view = RunView(run_dir)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "dashboard.html", headers=NO_STORE)

    async def state(request: Request) -> Response:
        view.refresh()
        tag = f'"{view.version}"'
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers={"ETag": tag, **NO_STORE})
        return JSONResponse(view.state(), headers={"ETag": tag, **NO_STORE})

    async def run_file(request: Request) -> Response:
        relative = request.path_params["path"]
        target = (run_dir / relative).resolve()
        if not target.is_relative_to(run_dir):
            return PlainTextResponse("outside the run folder", status_code=403)
        if not target.is_file():
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(target, headers=NO_STORE)

    routes = [
        Route("/", index),
        Route("/api/state", state),
        Route("/run/{path:path}", run_file),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]  # GET and HEAD only: the dashboard changes nothing
    return Starlette(routes=routes)


def check_host(host: str, allow_remote: bool) -> None:
    """Loopback only, unless the operator says otherwise: the page shows the run's config,
    client ids and failure reasons."""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise DashboardError(f"Cannot resolve --host {host!r}: {error}.") from error
    if not allow_remote and not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise DashboardError(
            f"--host {host!r} is not a loopback address: anyone who can reach it could read this run. "
            "Use the default 127.0.0.1 (and an SSH tunnel from elsewhere), or add --allow-remote."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgesplit dashboard", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the run folder (runs/<run-id>), finished or in progress")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    args = parser.parse_args(argv)
    try:
        check_host(args.host, args.allow_remote)
    except DashboardError as error:
        print(f"edgesplit dashboard: {error}", file=sys.stderr)
        return 2
    if not args.run_dir.exists():
        print(f"edgesplit dashboard: {args.run_dir} does not exist yet; waiting for the run to create it.")
    import uvicorn

    print(f"edgesplit dashboard: http://{args.host}:{args.port}/ (run folder {args.run_dir.resolve()})", flush=True)
    uvicorn.run(make_app(args.run_dir), host=args.host, port=args.port, log_level="warning")
    return 0
