"""The environment of the processes a run starts: its workers and its model server.

``child_env`` is the one place where runtime builds a child's environment: the child
must import beamlet from wherever this process found it (a checkout or a virtualenv),
whatever its working directory, so the checkout's root goes first on ``PYTHONPATH``.
``DETERMINISTIC_ENV`` is how a deterministic run tells everything it starts to be so
(``BEAMLET_DETERMINISTIC=1``): the model server then merges no requests from different
callers into one batch, and RunInference fixes its batch sizes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

DETERMINISTIC_ENV = "BEAMLET_DETERMINISTIC"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child that imports beamlet, with ``extra`` set."""
    env = dict(os.environ)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


@contextmanager
def overlay(extra: Mapping[str, str]) -> Iterator[None]:
    """Set ``extra`` in this process's environment for the length of the block, for a
    child started by code that takes no environment of its own (``client.autostart``)."""
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
