"""Logging for the stage entry points: one call configures the root logger; modules use `logging.getLogger(__name__)`.

Lines go to stderr as `LEVEL name: message` (DVC shows them as the stage runs), once each: the root logger holds
the only handler. tqdm bars stay on for interactive terminals and are switched off when stderr is not a TTY (CI,
`dvc repro > log`), so no escape codes reach log files: the stages pass `progress_enabled()` to every bar, and
`setup_logging` turns off the bars of the libraries we call (MLflow's "Downloading artifacts", env
`MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`, read at each download) unless the user set that variable.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["progress_enabled", "setup_logging"]

_FORMAT = "%(levelname)s %(name)s: %(message)s"


def _main_module_name(record: logging.LogRecord) -> bool:
    """Under `python -m pipelines.<stage>` the stage's module logger is `__main__`: show its real name."""
    if record.name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        record.name = spec.name if spec is not None else record.name
    return True


_PROJECT_LOGGERS = ("pipelines", "ctm_core", "__main__")


def setup_logging(level: int | str | None = None) -> None:
    """Configure the root logger once per process: the project's loggers (`pipelines.*`, `ctm_core.*`, the stage's
    `__main__`) at `level` (env `CTM_LOG_LEVEL` overrides it, default INFO), every other library at WARNING, so a
    library's INFO chatter (e.g. Ray Train's per-report "Reporting training result" in each worker, which logs
    under a file-path logger name outside Ray's own `ray` logger) does not reach the stage's log."""
    level = os.environ.get("CTM_LOG_LEVEL") or level or logging.INFO
    logging.basicConfig(level=logging.WARNING, format=_FORMAT, stream=sys.stderr, force=True)
    for name in _PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_main_module_name)
    if not progress_enabled():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def progress_enabled() -> bool:
    """True when progress bars should be drawn: stderr is a terminal and `CTM_PROGRESS` is not `0`."""
    env = os.environ.get("CTM_PROGRESS")
    if env is not None:
        return env not in ("0", "false", "no")
    return sys.stderr.isatty()
