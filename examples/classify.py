"""The demo's pipeline: classify the rows of a .npy file with the model in the model server.

Run it with the harness (``make demo`` does, after training the model)::

    python -m runtime run examples/classify.py --input DIR/test.npy \\
        --output DIR/predictions.jsonl --workers 2 --threads 2

``DIR/classifier.pt`` must be beside the input: a ``state_dict`` of ``Classifier`` below
(``examples/demo.py`` trains one). Each output line is ``{"label": ..., "model_id": ...}``,
one per input row, in input order.

The harness imports this file to build the pipeline and forks its SDK workers from a
process that has it imported (with ``--exec-workers`` each worker,
``python -m runtime.worker``, imports it again); ``large_model=True`` makes the harness
start a model server, which loads the model once for all workers and gets
``Classifier`` by source. ``Classifier`` is at the top level so that works.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from client import PredictionResult, PytorchModelHandlerTensor
from runtime import Map, Pipeline, ReadFromNpy, RunInference, WriteToJsonLines

DIM = 64
HIDDEN = 256
N_CLASSES = 10
# A fixed batch size equal to the harness's bundle size (256 by default): each bundle is
# one forward pass, so the demo can compare the server's answers with its own exactly.
BATCH = 256
CHECKPOINT = "classifier.pt"


class Classifier(nn.Module):
    """A small MLP: DIM features in, one logit per class out."""

    def __init__(self, dim: int, hidden: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODEL_PARAMS = {"dim": DIM, "hidden": HIDDEN, "classes": N_CLASSES}


def to_label(result: PredictionResult) -> dict[str, Any]:
    """A PredictionResult (the row, its 10 logits, the model id) -> the predicted class."""
    return {"label": int(result.inference.argmax()), "model_id": result.model_id}


def build_pipeline(input: str, output: str) -> Pipeline:
    if not input or not output:
        raise ValueError("classify.py needs --input (a .npy of float32 rows) and --output (a .jsonl)")
    handler = PytorchModelHandlerTensor(
        state_dict_path=os.path.join(os.path.dirname(input), CHECKPOINT),
        model_class=Classifier,
        model_params=MODEL_PARAMS,
        min_batch_size=BATCH,
        max_batch_size=BATCH,
        large_model=True,
    )
    return ReadFromNpy(input) | RunInference(handler) | Map(to_label) | WriteToJsonLines(output)
