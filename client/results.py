"""What RunInference yields, with Beam's names."""

from __future__ import annotations

from typing import Any, NamedTuple


class PredictionResult(NamedTuple):
    """One example and the model's inference for it, and which model produced it.

    ``model_id`` is the path of the checkpoint that produced the inference, as in Beam.
    """

    example: Any
    inference: Any
    model_id: str | None = None


class ModelMetadata(NamedTuple):
    """A model version: ``model_id`` is its path, ``model_name`` prefixes its metrics."""

    model_id: str
    model_name: str
