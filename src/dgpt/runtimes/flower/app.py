"""The Flower App directory that `flwr run` builds and ships to the SuperLink: a pyproject.toml naming dgpt's
ServerApp and ClientApp (installed with dgpt on every machine) and the server's config path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dgpt.config import Config, dump_config
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
serverapp = "dgpt.runtimes.flower.server:app"
clientapp = "dgpt.runtimes.flower.client:app"

[tool.flwr.app.config]
config = {config}
work = "{work}"
action = "{action}"
"""


def require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise DgptError(INSTALL) from None


def write_flower_app(config: Config, finetune: bool = False, evaluate: bool = False) -> Path:
    """RUN/flower_app/pyproject.toml for `flwr run`, pre-training or fine-tuning (DSFT); the ServerApp reads the
    resolved config, RUN/config.toml, on the SuperLink's machine (the app itself, which every SuperNode receives,
    holds no more than that path, the work and the action). `evaluate`: RUN/flower_eval_app, whose run has every
    SuperNode validate the newest checkpoint on its own data and keep it in its run directory."""
    require_flower()
    if config.federation.runtime != "flower":
        raise DgptError(f"federation.runtime is {config.federation.runtime!r}; set it to 'flower' for `dgpt flower-app`")
    if finetune and config.finetune.shared_head:
        raise DgptError("finetune.shared_head: on the flower runtime each oracle's head stays on its SuperNode; set it to false")
    run = RunDir(config.run_dir)
    write_text(run.config, dump_config(config))
    folder = run.flower_eval_app if evaluate else run.flower_app
    app = _APP.format(config=json.dumps(str(run.config.resolve())), work="finetune" if finetune else "pretrain",
                      action="evaluate" if evaluate else "train")
    write_text(folder / "pyproject.toml", app)
    logger.info(f"wrote {folder}; launch it on the SuperLink: flwr run {folder} CONNECTION --stream (CONNECTION: the "
                "[superlink.NAME] of $FLWR_HOME/config.toml; README, \"Two organisations on Flower\"). Flower's simulation "
                f"engine on this machine instead: flwr run {folder} local --federation-config num-supernodes={len(config.oracles)}")
    return folder
