"""The runtime's errors: why a run cannot complete, or cannot even start."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """The run cannot complete: a worker cannot boot, a bundle keeps failing, a crash loop."""


class CannotStart(PipelineError):
    """The run cannot start: its source or sink cannot work (a missing input, an output
    directory that cannot be written). Found before any process starts; one line."""
