"""The Flower App directory that `flwr run` builds and ships to the SuperLink: a pyproject.toml naming dgpt's
ServerApp and ClientApp (installed with dgpt on every machine) and the server's config path."""

from __future__ import annotations

import logging
from pathlib import Path

from dgpt.config import Config
from dgpt.errors import DgptError
from dgpt.fileio import write_text
from dgpt.rundir import RunDir

logger = logging.getLogger(__name__)
INSTALL = 'the flower runtime needs Flower: pip install -e ".[flower]"'

_APP = """[project]
name = "dgpt-flower"
version = "1.0.0"
description = "dgpt: one GPT trained across oracles that keep their text"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "dgpt"

[tool.flwr.app.components]
serverapp = "dgpt.runtimes.flower_server:app"
clientapp = "dgpt.runtimes.flower_client:app"

[tool.flwr.app.config]
config = {config}
"""


def require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise DgptError(INSTALL) from None


def write_flower_app(config: Config, config_path: str | Path) -> Path:
    """RUN/flower_app/pyproject.toml for `flwr run` (the ServerApp reads `config_path` on the SuperLink's machine)."""
    require_flower()
    if config.federation.runtime != "flower":
        raise DgptError(f"{config_path}: federation.runtime is {config.federation.runtime!r}; set it to 'flower'")
    app = RunDir(config.run_dir).flower_app
    quoted = '"' + str(Path(config_path).resolve()).replace("\\", "\\\\").replace('"', '\\"') + '"'
    write_text(app / "pyproject.toml", _APP.format(config=quoted))
    logger.info(f"wrote {app}; start it with: flwr run {app} SUPERLINK_CONNECTION --stream")
    return app
