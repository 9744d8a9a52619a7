"""`fusionrec serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fusionrec.cli.base import friendly_errors


@friendly_errors
def serve(
    model_uri: Annotated[str | None, typer.Option(help="Model to serve (default: the config's, else "
                                                       "models:/fusionrec@champion, following the alias).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1: this machine only).")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8000).")] = None,
    config: Annotated[Path | None, typer.Option(help="Serve config (default: serve/config.yaml if present).")]
    = None,
    plain: Annotated[bool, typer.Option(help="One process, no Ray: FastAPI + uvicorn (development, benchmarks).")]
    = False,
    proxy: Annotated[str | None, typer.Option(help="What answers HTTP in front of the replicas, on the local Ray "
                                                   "this starts: haproxy (Ray's, shipped with ray[serve] on Linux; "
                                                   "requests go straight to a ranker replica's own port) or python "
                                                   "(Serve's proxy). Default: haproxy where installed. On a cluster "
                                                   "(RAY_ADDRESS) its nodes' environment decides.")] = None,
) -> None:
    """Serve the model over HTTP: POST /predict, POST /recommend, GET /model, GET /healthz, docs at /docs."""
    import signal
    import threading

    if config is None and Path("serve/config.yaml").is_file():
        config = Path("serve/config.yaml")
    elif config is not None and not config.is_file():
        raise FileNotFoundError(f"{config}: no such Serve config")
    if plain:
        import uvicorn

        from fusionrec.registry import CHAMPION_URI
        from fusionrec.serve.api import plain_app

        uvicorn.run(plain_app(model_uri or CHAMPION_URI), host=host or "127.0.0.1",
                    port=port or 8000, log_level="warning")
        return
    from fusionrec.serve import app as serve_app

    if proxy is not None:
        from fusionrec.ops.ray_runtime import choose_serve_proxy

        choose_serve_proxy(proxy)
    try:
        info = serve_app.start(model_uri, host, port, config)
    except KeyboardInterrupt:  # Ctrl-C stops while starting too (the API may answer before start() returns)
        typer.echo("stopping...", err=True)
        serve_app.stop()
        return
    address = f"http://{host or '127.0.0.1'}:{port or 8000}"
    typer.echo(f"serving {info['name'] or 'bundle'} version {info['version']} ({info['model']}) at {address} "
               f"(API docs at {address}/docs); Ctrl-C stops")
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    typer.echo("stopping...", err=True)
    serve_app.stop()
