"""The end of `make demo`: start the service, ask it for a known user's and a new user's
recommendations over HTTP, print both answers, shut it down.

    python -m fusionrec.serve.demo [--user-id u00001] [--text "..."] [--port 8000] [--config serve/config.yaml]
                                   [--verbose]
"""

from __future__ import annotations

import json
from pathlib import Path

import requests
import typer

from fusionrec.verbosity import configure as configure_output


def main(user_id: str = "u00001", text: str = "I love flowing linen dresses in soft colours for summer",
         port: int = 8000, config: Path | None = Path("serve/config.yaml"), k: int = 5, verbose: bool = False) -> None:
    configure_output(verbose)  # as `fusionrec --verbose`
    from fusionrec.serve import app as serve_app

    info = serve_app.start(port=port, config=config if config and config.is_file() else None)
    base = f"http://127.0.0.1:{port}"
    try:
        typer.echo(f"serving fusionrec version {info['version']} at {base}")
        for label, body in ((f"known user {user_id}", {"user_id": user_id, "k": k}),
                            (f"new user who wrote {text!r}", {"user": {"text": text}, "k": k})):
            response = requests.post(f"{base}/recommend", json=body, timeout=120)
            typer.echo(f"POST /recommend {json.dumps(body)}  ({label}) -> {response.status_code}")
            typer.echo(f"  {json.dumps(response.json())}")
    finally:
        serve_app.stop()
        typer.echo("service stopped")


if __name__ == "__main__":
    typer.run(main)
