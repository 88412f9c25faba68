"""``edgesplit dashboard RUN_DIR``: a live, read-only web view of one run folder.

Starlette and uvicorn (already installed with Flower) serve three things: the page and its
script (``server/static/``, no third-party JavaScript, nothing loaded from the internet), the
run's state as JSON (``/api/state``, from ``server/run_folder_view.py``; the browser polls it every two
seconds with ``If-None-Match``, so an unchanged run costs a 304), and files inside the run folder
(``/run/...``: the report, its plots), with any path that leaves the folder refused.

It binds to 127.0.0.1 unless told otherwise (``--host`` with ``--allow-remote``), and answers
only requests whose ``Host`` header names it as it was bound (``HostGuard``): a page on another
site that points its own name at 127.0.0.1 (DNS rebinding) gets 421, not the run.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from server.run_folder_view import RunView

STATIC = Path(__file__).parent / "static"
NO_STORE = {"Cache-Control": "no-cache"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_PORT = 8050


class DashboardError(ValueError):
    """The dashboard cannot start as asked; the message says why and what to do."""


def host_name_and_port(header: str) -> tuple[str, int | None]:
    """A ``Host`` header as (name, port): ``[::1]:8050`` -> ("::1", 8050), ``localhost`` -> ("localhost", None)."""
    header = header.strip().lower()
    if header.startswith("["):
        name, _, rest = header[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        name, _, port = header.partition(":") if header.count(":") == 1 else (header, "", "")
    return name, int(port) if port.isdigit() else None


class HostGuard:
    """Answers 421 to a request whose ``Host`` is not one of ``names`` (at ``port``, if it
    names one). A browser sends the name it resolved, so a rebinding attacker's page shows its
    own name here, whatever address that name now points at."""

    def __init__(self, app: ASGIApp, names: frozenset[str], port: int | None) -> None:
        self.app, self.names, self.port = app, names, port

    def allows(self, header: str) -> bool:
        name, port = host_name_and_port(header)
        return name in self.names and (port is None or self.port is None or port == self.port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allows(Headers(scope=scope).get("host", "")):
            refusal = PlainTextResponse(
                "This dashboard answers only to the host names it was started for (see --allow-host).", 421
            )
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def make_app(
    run_dir: Path, host: str = "127.0.0.1", port: int | None = DEFAULT_PORT, allowed_hosts: tuple[str, ...] = ()
) -> Starlette:
    """The dashboard of one run folder (which may not exist yet: it shows 'waiting'), answering
    to the loopback names, the ``host`` it is bound to and ``allowed_hosts``, at ``port``."""
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
    names = frozenset(name.lower().strip("[]") for name in (*LOOPBACK_NAMES, host, *allowed_hosts))
    return Starlette(routes=routes, middleware=[Middleware(HostGuard, names=names, port=port)])


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
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        help="another name browsers reach it by (e.g. the machine's DNS name with --allow-remote); repeatable",
    )
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
    app = make_app(args.run_dir, args.host, args.port, tuple(args.allow_host))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
