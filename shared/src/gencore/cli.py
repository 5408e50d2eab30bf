"""Hydra entry points for the packages' console scripts, and ``compose`` for tests and notebooks.

A package's ``cli.py`` is a few lines::

    from pathlib import Path
    from gencore.cli import hydra_app

    CONFIGS = Path(__file__).parent / "configs"
    train = hydra_app(CONFIGS, "train", "gencore.run:train")      # console script <name>-train
    sample = hydra_app(CONFIGS, "sample", "<name>.tasks:sample")  # console script <name>-sample

Tasks are named by ``"module:function"`` and imported when the job runs, so ``--help`` and Hydra's own config errors
answer without importing torch or Lightning.

The package's configs put ``pkg://gencore.configs`` on ``hydra.searchpath`` to get the shared groups.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gencore.paths import eval_dir

OmegaConf.register_new_resolver("eval_dir", eval_dir, replace=True)  # the eval configs' default out_dir

__all__ = [
    "CORE_CONFIGS",
    "TRACEBACK_ENV",
    "check_overrides",
    "compose",
    "help_text",
    "hydra_app",
    "one_line_errors",
    "user_errors",
]

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
        ValueError,  # genlab's ValueErrors name the problem (a shape, a value, a file): the user's to fix
    )


@contextlib.contextmanager
def one_line_errors(name: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """How a console script ends on a :func:`user_errors` exception: ``<name>: error: <message>`` and a hint on
    stderr, ``cleanup()``, exit 1 (the traceback instead with ``GENLAB_TRACEBACK=1``)."""
    try:
        yield
    except user_errors() as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"{name}: error: {err}\n({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        if cleanup is not None:
            cleanup()
        raise SystemExit(1) from None


def _resolve_task(task: str | Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    if callable(task):
        return task
    module, _, attr = str(task).partition(":")
    if not module or not attr:
        raise ValueError(f"hydra_app: task must be a callable or 'module:function', got {task!r}")
    import importlib

    return getattr(importlib.import_module(module), attr)


def _remove_if_only_hydra_wrote() -> None:
    """A job that failed before writing anything leaves no folder: Hydra's own output folder is removed when it holds
    nothing but Hydra's files (``.hydra/``, the job log)."""
    import shutil

    try:
        from hydra.core.hydra_config import HydraConfig

        folder = Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return
    if folder.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def hydra_app(
    config_dir: str | os.PathLike, config_name: str, task: str | Callable[[DictConfig], Any]
) -> Callable[[], None]:
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

        with one_line_errors(Path(sys.argv[0]).name or config_name, cleanup=_remove_if_only_hydra_wrote):
            return sweep_value(cfg, _resolve_task(task)(cfg))

    def main() -> None:
        if any(a in ("--help", "-h") for a in sys.argv[1:]):
            print(help_text(config_dir, config_name, Path(sys.argv[0]).name or config_name))
            raise SystemExit(0)
        problem = check_overrides(config_dir, config_name, sys.argv[1:]) or _check_sample_values(
            config_dir, config_name, sys.argv[1:]
        )
        if problem:
            print(f"{Path(sys.argv[0]).name or config_name}: error: {problem}", file=sys.stderr)
            raise SystemExit(1)
        hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(job)()

    main.job = job  # type: ignore[attr-defined]  # what Hydra runs per job; its return value is the sweep value
    return main


def _header(path: Path) -> list[str]:
    """The leading ``#`` comment block of a YAML file, without the ``# ``."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line[2:] if line.startswith("# ") else line[1:])
    return lines


def _options(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _stages(experiment_dir: Path, name: str, seen: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``stages`` of an experiment YAML, following its ``defaults`` within the experiment folder (no composing)."""
    import yaml

    path = experiment_dir / f"{name}.yaml"
    if name in seen or not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    stages: dict[str, Any] = {}
    for entry in data.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_" and not entry.startswith("/"):
            stages.update(_stages(experiment_dir, entry, seen | {name}))
    stages.update(data.get("stages") or {})
    return {k: v for k, v in stages.items() if v}


def _defaults(path: Path) -> dict[str, Any]:
    """``{group: default option}`` of a primary YAML's ``defaults`` list (``- trainer: cpu``, ``- debug: null``)."""
    import yaml

    entries = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
    return {next(iter(e)).split("@", 1)[0].lstrip("/"): next(iter(e.values())) for e in entries if isinstance(e, dict)}


def _keys_line(path: Path) -> str:
    """``checkpoint=??? num_samples=64 ...``: the top-level values a task YAML sets itself."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    shown = []
    for key, value in data.items():
        if key in ("defaults", "hydra") or isinstance(value, dict):
            continue
        shown.append(f"{key}={'null' if value is None else value}")
    return " ".join(shown)


def help_text(config_dir: str | os.PathLike, config_name: str, prog: str) -> str:
    """``<script> --help``: what the task's YAML says about itself (its header comment), its keys, the recipes with
    the stages each trains first, the config groups it composes (the package's and the shared ones) and the flags;
    read from the config files without composing or importing torch (``--hydra-help`` is Hydra's own help)."""
    import textwrap

    config_dir = Path(config_dir)
    primary = config_dir / f"{config_name}.yaml"
    out = [f"usage: {prog} [key=value ...] [group=option ...] [--cfg job] [-m]", ""]
    out += _header(primary)
    keys = _keys_line(primary)
    if keys:
        out += ["", "keys (key=value; nested ones with --cfg job):"]
        out += textwrap.wrap(keys, 116, initial_indent="  ", subsequent_indent="  ")
    chosen = _defaults(primary)
    groups = list(chosen)
    if "experiment" in groups:
        experiments = config_dir / "experiment"
        staged = {name: _stages(experiments, name) for name in _options(experiments)}
        staged = {k: v for k, v in staged.items() if v}
        if staged:
            out += ["", "stages trained first when not given (into <run_dir>/<stage>; or <stage>=<run or export>):"]
            for name, stages in staged.items():
                parts = [f"{key} <- {spec['command']} experiment={spec['experiment']}" for key, spec in stages.items()]
                out.append(f"  {name}: {'; '.join(parts)}")
    listed = []
    for group in groups:
        for where, root in (("", config_dir), (" (shared)", CORE_CONFIGS)):
            options = _options(root / group) if (root / group).is_dir() else []
            if options and group != "hydra":
                default = f" [default: {chosen[group]}]" if chosen.get(group) else ""
                listed += textwrap.wrap(
                    f"{group}{where}{default}: {', '.join(options)}",
                    116,
                    initial_indent="  ",
                    subsequent_indent="      ",
                )
                break
    if listed:
        out += ["", "config groups (group=option):", *listed]
    out += ["", "flags:"]
    if "debug" in groups:
        out.append("  debug=fast          every stage for a few steps: checks a config end to end")
    out += [
        "  --cfg job           print the composed config and exit (with your overrides)",
        "  -m a=1,2            one run per value (Hydra multirun)",
        "  --hydra-help        Hydra's own help",
        f"  {TRACEBACK_ENV}=1  (environment) full tracebacks instead of one-line errors",
    ]
    return "\n".join(out)


def _known_names(
    config_dir: Path, config_name: str, groups_chosen: Sequence[str] = ()
) -> tuple[DictConfig, set[str], set[str]]:
    """(the config composed with the command line's group choices, its top-level keys, config group names)."""
    try:
        cfg = compose(config_dir, config_name, list(groups_chosen))
    except Exception:  # a bad group option: Hydra says so itself; check against the defaults
        cfg = compose(config_dir, config_name, [])
    groups = {
        p.name for d in (config_dir, CORE_CONFIGS) for p in d.iterdir() if p.is_dir() and not p.name.startswith("_")
    }
    return cfg, set(cfg.keys()), groups | {"hydra"}


def _nested_problem(cfg: DictConfig, name: str, arg: str) -> str | None:
    """``trainer.max_step=3``: the first part of a dotted key the composed config does not have, with a suggestion."""
    import difflib

    from omegaconf import OmegaConf

    node: Any = cfg
    parts = name.split(".")
    for depth, part in enumerate(parts):
        if not OmegaConf.is_dict(node):
            return None  # a list index or a value: Hydra checks the rest
        if part not in node.keys():  # (``in node`` is False for a ??? value)
            where = ".".join(parts[:depth])
            close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1, cutoff=0.6)
            hint = f" (did you mean {where}.{close[0]}?)" if close else f" ({where} has: {', '.join(map(str, node))})"
            return f"{name!r} in {arg!r} is not a config key{hint}; +{name}=... adds a new one"
        node = node[part] if not OmegaConf.is_missing(node, part) else None
    return None


def check_overrides(config_dir: str | os.PathLike, config_name: str, argv: Sequence[str]) -> str | None:
    """A message for command-line overrides that name nothing (``experimnt=foo`` -> did you mean experiment?), and for
    ``+key=value`` additions that look like a misspelling of a key or group (``+experimnt=foo`` would otherwise add
    an unused key and train the default experiment); None when they are fine. Flags (``--help``, ``-m``) and
    ``hydra.*`` overrides are left to Hydra."""
    import difflib

    config_dir = Path(config_dir)
    if any(a.startswith("-") for a in argv):
        return None
    overrides = [a for a in argv if "=" in a]
    if not overrides:
        return None
    chosen = [a for a in overrides if "." not in a.split("=", 1)[0] and not a.startswith(("+", "~"))]
    cfg, keys, groups = _known_names(config_dir, config_name, chosen)
    known = sorted(keys | groups)
    for arg in overrides:
        name = arg.split("=", 1)[0]
        add = name.startswith("+") and not name.startswith("++")
        top = name.lstrip("+~").split(".", 1)[0].split("@", 1)[0]
        if top in keys or top in groups:
            if "." in name and not name.startswith(("+", "~")) and top != "hydra" and top not in groups - keys:
                problem = _nested_problem(cfg, name, arg)
                if problem:
                    return problem
            continue
        close = difflib.get_close_matches(top, known, n=1, cutoff=0.75)
        if add and not close:
            continue  # a deliberate new key
        hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
        what = "adds a key nothing reads" if add else "is not a config key or group"
        return f"{name!r} in {arg!r} {what}{hint}"
    return None


def _check_sample_values(config_dir: Path, config_name: str, argv: Sequence[str]) -> str | None:
    """A sample / eval command's counts and checkpoint path checked on the composed config before the task (and
    torch) is imported; left to the task when the command line is more than plain overrides or does not compose."""
    from omegaconf import OmegaConf

    from gencore.validate import errors_message, sample_config_errors

    if any(a.startswith("-") for a in argv):
        return None
    try:
        cfg = compose(config_dir, config_name, list(argv))
        if "checkpoint" not in cfg.keys():  # (``in`` is False for a ??? value)
            return None
        if OmegaConf.is_missing(cfg, "checkpoint"):
            return "checkpoint: required (checkpoint=<a run folder, its export/ or a .ckpt>)"
        values = {k: cfg.get(k) for k in ("num_samples", "batch_size", "grid_size", "checkpoint")}
    except Exception:  # Hydra reports these itself, with its own message
        return None
    errors = sample_config_errors(values)
    return errors_message(errors) if errors else None


def compose(config_dir: str | os.PathLike, config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config a console script would build for ``overrides`` (without running it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(config_dir).resolve())):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


# the core's own console script (its task is imported when it runs: `--help` stays light)
train_fmnist_features = hydra_app(CORE_CONFIGS, "fmnist_features", "gencore.metrics.train_features:train_and_report")


def gallery_main(argv: Sequence[str] | None = None) -> int:
    """``gencore-gallery`` (``make gallery``): build the page (:mod:`gencore.gallery`), print one line per entry;
    1 when an entry failed or the request was wrong."""
    import argparse
    import logging

    from gencore import gallery

    parser = argparse.ArgumentParser(prog="gencore-gallery", description=gallery.__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gallery", help="output folder (default: outputs/gallery)")
    parser.add_argument("--only", nargs="*", default=None, help="only these packages (import names)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        results = gallery.build(args.out, gallery.discover(args.only), timeout=args.timeout)
    except ValueError as e:
        print(f"gencore-gallery: error: {e}", file=sys.stderr)
        return 1
    width = max(len(f"{r.package}: {r.title}") for r in results)
    for r in results:
        status = "ok" if r.ok else "FAILED"
        print(f"{r.package + ': ' + r.title:{width}s}  {status:6s} {r.seconds:5.0f} s  {r.headline}")
    print(f"gallery: {Path(args.out).resolve() / 'index.html'} ({sum(r.ok for r in results)}/{len(results)} entries)")
    for r in results:
        if not r.ok:
            print(f"\n{r.package}: {r.title} failed: {r.command}\n{r.error}", file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


def gallery_cli() -> None:  # console script
    sys.exit(gallery_main())
