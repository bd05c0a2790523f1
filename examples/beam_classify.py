"""The demo's classifier as an Apache Beam pipeline: RunInference with BeamletModelHandler.

Locally, with nothing to download (trains the demo's model for a few seconds, then runs
on Beam's DirectRunner with two SDK-worker processes that share one model server)::

    python -m examples.beam_classify

On a runner of your own, with a checkpoint and rows that every worker can read (see
docs/beam.md for Dataflow, Flink and Spark)::

    python -m examples.beam_classify --model /data/classifier.pt --input /data/test.npy \\
        --output /data/predictions --runner FlinkRunner ...

``--model`` is a ``state_dict`` of ``examples.classify.Classifier``; ``--input`` a .npy of
float32 rows of 64 features; each output line is ``{"row": i, "label": ..., "model_id":
...}``. Arguments this script does not know are Beam's pipeline options. Needs the
``beam`` extra (``pip install 'beamlet[beam]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

import numpy as np

from client import PytorchModelHandlerTensor
from examples.classify import BATCH, MODEL_PARAMS, Classifier


class ReadRow:
    """``i`` -> ``(i, row i)`` of the .npy file, opened once per SDK worker."""

    def __init__(self, path: str):
        self.path = path
        self._rows: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_rows": None}

    def __call__(self, i: int) -> tuple[int, Any]:
        import torch

        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        return i, torch.from_numpy(np.array(self._rows[i]))


def to_line(keyed: tuple[int, Any]) -> str:
    i, result = keyed
    return json.dumps({"row": i, "label": int(result.inference.argmax()), "model_id": result.model_id})


def run(
    model: str,
    rows: str,
    output: str,
    beam_args: list[str],
    socket_path: str | None = None,
    server_idle_timeout: float | None = None,
) -> Any:
    """Build and run the pipeline; returns Beam's PipelineResult once it has finished.
    The model server a worker starts exits ``server_idle_timeout`` seconds after the
    last worker on its machine leaves (default: BeamletModelHandler's, 10 s)."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from client.beam import DEFAULT_SERVER_IDLE_TIMEOUT, BeamletModelHandler

    if server_idle_timeout is None:
        server_idle_timeout = DEFAULT_SERVER_IDLE_TIMEOUT
    handler = BeamletModelHandler(
        PytorchModelHandlerTensor(
            state_dict_path=model,
            model_class=Classifier,
            model_params=MODEL_PARAMS,
            max_batch_size=BATCH,
            large_model=True,  # one copy per VM, in the model server
            socket_path=socket_path,
        ),
        server_idle_timeout=server_idle_timeout,
    )
    n = len(np.load(rows, mmap_mode="r"))
    options = PipelineOptions(beam_args)
    p = beam.Pipeline(options=options)
    _ = (
        p
        | "rows" >> beam.Create(range(n))
        | beam.Reshuffle()
        | beam.Map(ReadRow(rows))
        # Beam's own KeyedModelHandler carries the row number through; BeamletModelHandler
        # is a Beam ModelHandler like any other.
        | RunInference(KeyedModelHandler(handler))
        | beam.Map(to_line)
        | beam.io.WriteToText(output, file_name_suffix=".jsonl")
    )
    result = p.run()
    result.wait_until_finish()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.beam_classify", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", help="a state_dict of examples.classify.Classifier (default: train one)")
    parser.add_argument("--input", help="a .npy of float32 rows (default: the demo's test rows)")
    parser.add_argument("--output", help="output prefix (default: beside the input)")
    args, beam_args = parser.parse_known_args(argv)
    if not beam_args:
        beam_args = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    if bool(args.model) != bool(args.input):
        parser.error("give both --model and --input, or neither (to train the demo's model)")
    if args.model:
        run(
            args.model, args.input, args.output or os.path.splitext(args.input)[0] + "-predictions", beam_args
        )
        return 0
    from examples import demo

    with tempfile.TemporaryDirectory(prefix="bl-beam-") as workdir:
        os.chmod(workdir, 0o700)
        x_train, y_train, x_test, y_test = demo.make_dataset()
        model = demo.train(x_train, y_train)
        import torch

        ckpt, rows = os.path.join(workdir, "classifier.pt"), os.path.join(workdir, "test.npy")
        torch.save(model.state_dict(), ckpt)
        np.save(rows, x_test.numpy())
        output = args.output or os.path.join(workdir, "predictions")
        run(ckpt, rows, output, beam_args, os.path.join(workdir, "ms.sock"), server_idle_timeout=1.0)
        labels: dict[int, int] = {}
        directory, base = os.path.split(output)
        for name in os.listdir(directory):
            if name.startswith(base):
                with open(os.path.join(directory, name)) as f:
                    labels.update((r["row"], r["label"]) for r in map(json.loads, f))
        correct = sum(labels[i] == int(y) for i, y in enumerate(y_test))
        print(f"{len(labels):,} predictions, accuracy {correct / len(y_test):.1%} (chance is 10%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
