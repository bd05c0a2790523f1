"""beamlet end to end, on this machine, with nothing to download: ``make demo``.

1. Make a deterministic synthetic dataset: 10 classes in 64 dimensions, each class a
   mixture of three Gaussian clusters (so the classes are not linearly separable).
2. Train a small PyTorch MLP on it for a few seconds and save its state_dict.
3. Run batch inference over the test set with ``RunInference`` and
   ``large_model=True``: the first batch auto-starts a private model server, the model
   is loaded there once, and every batch travels to it over a Unix socket.
4. Show the accuracy (chance is 10%), the throughput and the server's own status.
5. Run the same job in-process (``large_model=False``) and check that every
   prediction is bit-for-bit the same.
6. Stop the server and remove the temporary directory, whatever happened.

The model class is defined at the top level of this file: the client ships it to the
model server by source, since the server cannot import ``__main__``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import torch
from torch import nn
from tqdm import tqdm

from client import PytorchModelHandlerTensor, RunInference, ServerClient
from modelserver.errors import ServerUnavailable

SEED = 2024
N_CLASSES = 10
CLUSTERS_PER_CLASS = 3
DIM = 64
N_TRAIN = 20_000
N_TEST = 10_000
HIDDEN = 256
EPOCHS = 6
TRAIN_BATCH = 256
# A fixed batch size (min == max) makes both runs cut the test set into the same
# batches, so their outputs can be compared bit for bit.
INFER_BATCH = 250
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def make_dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): the same numbers on every machine."""
    g = torch.Generator().manual_seed(SEED)
    centers = torch.randn(N_CLASSES, CLUSTERS_PER_CLASS, DIM, generator=g) * 0.45
    n = N_TRAIN + N_TEST
    labels = torch.randint(N_CLASSES, (n,), generator=g)
    cluster = torch.randint(CLUSTERS_PER_CLASS, (n,), generator=g)
    x = centers[labels, cluster] + torch.randn(n, DIM, generator=g)
    return x[:N_TRAIN], labels[:N_TRAIN], x[N_TRAIN:], labels[N_TRAIN:]


def train(x: torch.Tensor, y: torch.Tensor) -> Classifier:
    torch.manual_seed(SEED)
    model = Classifier(DIM, HIDDEN, N_CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(SEED)
    steps_per_epoch = (len(x) + TRAIN_BATCH - 1) // TRAIN_BATCH
    with tqdm(total=EPOCHS * steps_per_epoch, desc="train", unit=" steps", leave=True) as bar:
        for epoch in range(EPOCHS):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), TRAIN_BATCH):
                idx = order[i : i + TRAIN_BATCH]
                loss = loss_fn(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    return model.eval()


def handler(checkpoint: str, socket_path: str, *, large_model: bool) -> PytorchModelHandlerTensor:
    return PytorchModelHandlerTensor(
        state_dict_path=checkpoint,
        model_class=Classifier,
        model_params={"dim": DIM, "hidden": HIDDEN, "classes": N_CLASSES},
        min_batch_size=INFER_BATCH,
        max_batch_size=INFER_BATCH,
        large_model=large_model,
        socket_path=socket_path,
    )


def infer(examples: list[torch.Tensor], h: PytorchModelHandlerTensor, desc: str) -> tuple[list, float, float]:
    """Run the job; returns (results, seconds to get the model, seconds of inference)."""
    run = RunInference(h)
    started = time.perf_counter()
    results = list(tqdm(examples | run, total=len(examples), desc=desc, unit=" rows", unit_scale=True))
    total = time.perf_counter() - started
    setup = run.metrics.load_model_latency_milli_secs / 1000
    return results, setup, total - setup


def accuracy(results: list, labels: torch.Tensor) -> float:
    predicted = torch.stack([r.inference.argmax() for r in results])
    return (predicted == labels).float().mean().item()


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def stop_server(socket_path: str) -> None:
    """Ask the server on ``socket_path`` to stop and wait until its process is gone."""
    try:
        with ServerClient(socket_path, autostart=False) as client:
            pid = client.status()["pid"]
            client.shutdown()
    except ServerUnavailable:
        return  # never started, or already gone
    try:
        psutil.Process(pid).wait(timeout=15)
        print(f"model server pid {pid} stopped")
    except psutil.NoSuchProcess:
        print(f"model server pid {pid} stopped")
    except psutil.TimeoutExpired:
        print(f"model server pid {pid} did not stop in 15s; killing it", file=sys.stderr)
        psutil.Process(pid).kill()


def main() -> int:
    workdir = tempfile.mkdtemp(prefix="beamlet-demo-")  # private: mode 0700
    socket_path = os.path.join(workdir, "modelserver.sock")
    checkpoint = os.path.join(workdir, "classifier.pt")
    began = time.perf_counter()
    try:
        section(f"data: {N_CLASSES} classes x {CLUSTERS_PER_CLASS} Gaussian clusters in {DIM} dims, seed {SEED}")
        x_train, y_train, x_test, y_test = make_dataset()
        print(f"{len(x_train):,} training rows, {len(x_test):,} test rows; chance accuracy {1 / N_CLASSES:.0%}")

        section(f"train: MLP {DIM}-{HIDDEN}-{HIDDEN}-{N_CLASSES}, {EPOCHS} epochs")
        model = train(x_train, y_train)
        torch.save(model.state_dict(), checkpoint)
        print(f"state_dict saved to {checkpoint}")

        examples = list(x_test)  # one tensor per example, as a reader would yield them

        section(f"inference in the model server (large_model=True, socket {socket_path})")
        remote, setup, seconds = infer(examples, handler(checkpoint, socket_path, large_model=True), "server")
        print(f"server start + model load {setup:.2f}s; then {len(remote):,} rows in {seconds:.2f}s "
              f"= {len(remote) / seconds:,.0f} rows/s")
        print(f"accuracy {accuracy(remote, y_test):.2%} (chance {1 / N_CLASSES:.0%}), model_id {remote[0].model_id}")

        section("python -m modelserver status --socket ...")
        subprocess.run(
            [sys.executable, "-m", "modelserver", "status", "--socket", socket_path], cwd=ROOT, check=True
        )
        with ServerClient(socket_path, autostart=False) as client:
            (served,) = client.status()["models"]
        assert served["rows"] == len(examples), served

        section("the same job in-process (large_model=False)")
        local, setup, seconds = infer(examples, handler(checkpoint, socket_path, large_model=False), "in-process")
        print(f"model load {setup:.2f}s; then {len(local):,} rows in {seconds:.2f}s = {len(local) / seconds:,.0f} rows/s")
        same = sum(torch.equal(a.inference, b.inference) for a, b in zip(remote, local))
        if same != len(examples):
            print(f"MISMATCH: only {same:,} of {len(examples):,} predictions are identical", file=sys.stderr)
            return 1
        print(f"identical: all {same:,} predictions match the server's bit for bit")

        section("clean up")
    finally:
        stop_server(socket_path)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"removed {workdir}; demo took {time.perf_counter() - began:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
