"""The default encoders' architectures without their weights (configs and the tokenizer), for a
lent GPU machine where the weights do not fit beside Ray; benchmarks/gpu_machine.sh gives them
random weights there.

    .venv/bin/python benchmarks/gpu_models.py .gpu/models
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from fusionrec.config import state_folder
from fusionrec.encoders.base import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, resolve_model


def main(out: Path) -> None:
    for name, alias in (("minilm", DEFAULT_TEXT_MODEL), ("dinov2", DEFAULT_IMAGE_MODEL)):
        source, target = Path(resolve_model(alias, state_folder() / "models")), out / name
        target.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if file.is_file() and file.suffix not in (".safetensors", ".bin", ".onnx"):
                shutil.copy(file, target / file.name)
        typer.echo(f"{target}: {sorted(f.name for f in target.iterdir())}")


if __name__ == "__main__":
    typer.run(main)
