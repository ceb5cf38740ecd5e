"""``KIVI_LOG``: turn on the ``kivi_compile`` logger from the environment, like ``TORCH_LOGS``.

The backend logs under the ``kivi_compile`` logger: one warning per attention site it leaves
unrewritten (per backend, not per step) and, at debug level, each site it rewrites. Python shows
warnings by default; ``KIVI_LOG=debug`` (or ``info``, ``warning``, ``error``) sets the logger's level
and sends its records to stderr, without touching the rest of the program's logging.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "kivi_compile"
ENV_VAR = "KIVI_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _StderrHandler(logging.StreamHandler):
    """The handler ``KIVI_LOG`` attaches; its own class so a second configuration replaces it."""


def configure_logging(level: str) -> logging.Logger:
    """Set the ``kivi_compile`` logger to ``level`` (a ``LEVELS`` name) and log to stderr.

    Records stop propagating to the root logger, so they print once even when the program has its
    own handlers (as ``TORCH_LOGS`` does for torch's loggers). Raises ``ValueError`` for an
    unknown level.
    """
    try:
        numeric = LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"{ENV_VAR}={level!r}: must be one of {', '.join(LEVELS)}") from None
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(numeric)
    logger.propagate = False
    return logger


def configure_from_env() -> None:
    """Apply ``KIVI_LOG`` if it is set; an unknown value is reported, never fatal to the import."""
    level = os.environ.get(ENV_VAR)
    if not level:
        return
    try:
        configure_logging(level)
    except ValueError as error:
        configure_logging("warning")
        logging.getLogger(LOGGER_NAME).warning("%s; using 'warning'", error)
