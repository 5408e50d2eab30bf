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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

__all__ = ["CORE_CONFIGS", "compose", "hydra_app"]

CORE_CONFIGS = Path(__file__).parent / "configs"


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

        return sweep_value(cfg, task(cfg))

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
