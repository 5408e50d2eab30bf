"""Hydra entry points for the packages' console scripts, and ``compose`` for tests and notebooks.

A package's ``cli.py`` is a few lines::

    from pathlib import Path
    from gencore import run
    from gencore.cli import hydra_app

    CONFIGS = Path(__file__).parent / "configs"
    train = hydra_app(CONFIGS, "train", run.train)      # console script <name>-train
    sample = hydra_app(CONFIGS, "sample", run.sample)   # console script <name>-sample

The package's configs put ``pkg://gencore.configs`` on ``hydra.searchpath`` to get the shared groups.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

__all__ = ["CORE_CONFIGS", "TRACEBACK_ENV", "compose", "hydra_app", "user_errors"]

CORE_CONFIGS = Path(__file__).parent / "configs"


TRACEBACK_ENV = "GENLAB_TRACEBACK"


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong" (a config value, a path, a file, a busy run folder, a diverged
    run): a console script prints their message in one line and exits 1; ``GENLAB_TRACEBACK=1`` shows the
    traceback instead."""
    from gencore.data import DataReadError
    from gencore.guards import NonFiniteError, RunLockedError
    from gencore.io import CheckpointError, MissingWeightsError
    from gencore.validate import ConfigError

    return (
        ConfigError,
        CheckpointError,
        MissingWeightsError,
        FileNotFoundError,
        RunLockedError,
        NonFiniteError,
        DataReadError,
    )


def hydra_app(config_dir: str | os.PathLike, config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A console-script entry point: ``task(cfg)`` under ``@hydra.main`` with configs from ``config_dir``. Each Hydra
    job returns the task's value (``gencore.run.sweep_value``: the number named by ``optimized_metric`` when the config
    sets one), which is what a sweeper (Optuna, Nevergrad) optimises in ``--multirun``; ``main.job`` is that
    function."""
    import hydra

    config_dir = Path(config_dir).resolve()
    if not (config_dir / f"{config_name}.yaml").is_file():
        raise ValueError(f"hydra_app: {config_dir / config_name}.yaml does not exist")

    def job(cfg: DictConfig) -> Any:
        from gencore.run import sweep_value

        try:
            return sweep_value(cfg, task(cfg))
        except user_errors() as err:
            if os.environ.get(TRACEBACK_ENV):
                raise
            name = Path(sys.argv[0]).name or config_name
            print(f"{name}: error: {err}\n({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
            raise SystemExit(1) from None

    def main() -> None:
        hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(job)()

    main.job = job  # type: ignore[attr-defined]  # what Hydra runs per job; its return value is the sweep value
    return main


def compose(config_dir: str | os.PathLike, config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config a console script would build for ``overrides`` (without running it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(config_dir).resolve())):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
