"""beamlet end to end, on this machine, with nothing to download: ``make demo``.

1. Make a deterministic synthetic dataset: 10 classes in 64 dimensions, each class a
   mixture of three Gaussian clusters (so the classes are not linearly separable).
2. Train a small PyTorch MLP on it for a few seconds and save its state_dict as
   ``classifier.pt`` in a private temporary directory; write the test rows beside it as
   ``test.npy`` (float32) and keep their labels in memory.
3. Run the main job, the pipeline in ``examples/classify.py``, through the harness::

       python -m runtime run examples/classify.py --input DIR/test.npy \\
           --output DIR/predictions.jsonl --workers 2 --threads 2 --socket DIR/modelserver.sock

   The harness starts a model server on that socket (the handler has
   ``large_model=True``), two SDK-worker processes of two threads each, cuts the rows
   into bundles, and writes one ``{"label", "model_id"}`` line per row; it shows a
   progress bar and a summary, and stops its workers and the server at the end.
4. Read the predictions, print the accuracy (chance is 10%), and check that every label
   is the one the same model gives in this process.
5. Check that nothing of the run is left (no process, no socket), then remove the
   directory, whatever happened.

``python -m examples.demo --keep`` keeps the directory, so you can run the command
yourself.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import torch
from torch import nn
from tqdm import tqdm

from client import PytorchModelHandlerTensor, RunInference, ServerClient
from examples.classify import BATCH, CHECKPOINT, DIM, HIDDEN, MODEL_PARAMS, N_CLASSES, Classifier
from modelserver.errors import ServerUnavailable

SEED = 2024
CLUSTERS_PER_CLASS = 3
N_TRAIN = 20_000
N_TEST = 10_000
EPOCHS = 10
SPREAD = 0.5  # how far apart the cluster centres lie, in units of the noise
TRAIN_BATCH = 256
WORKERS = 2
THREADS = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = "examples/classify.py"  # relative to ROOT, where the command runs
# What the run may leave in its directory: our inputs, its output, the server's log.
EXPECTED_FILES = {"test.npy", CHECKPOINT, "predictions.jsonl", "modelserver.log"}


def make_dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): the same numbers on every run."""
    g = torch.Generator().manual_seed(SEED)
    centers = torch.randn(N_CLASSES, CLUSTERS_PER_CLASS, DIM, generator=g) * SPREAD
    n = N_TRAIN + N_TEST
    labels = torch.randint(N_CLASSES, (n,), generator=g)
    cluster = torch.randint(CLUSTERS_PER_CLASS, (n,), generator=g)
    x = centers[labels, cluster] + torch.randn(n, DIM, generator=g)
    return x[:N_TRAIN], labels[:N_TRAIN], x[N_TRAIN:], labels[N_TRAIN:]


def train(x: torch.Tensor, y: torch.Tensor) -> Classifier:
    """A few seconds of Adam. On one thread: the result does not depend on the number of
    cores, and other processes competing for the cores slow it down much less."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, y)
    finally:
        torch.set_num_threads(threads)


def _train(x: torch.Tensor, y: torch.Tensor) -> Classifier:
    torch.manual_seed(SEED)
    model = Classifier(**MODEL_PARAMS)
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


def in_process_labels(checkpoint: str, x: torch.Tensor) -> list[int]:
    """The same model, loaded from the same checkpoint by the same handler configuration
    but kept in this process (large_model=False), in batches of the same size."""
    handler = PytorchModelHandlerTensor(
        state_dict_path=checkpoint,
        model_class=Classifier,
        model_params=MODEL_PARAMS,
        min_batch_size=BATCH,
        max_batch_size=BATCH,
    )
    return [int(r.inference.argmax()) for r in list(x) | RunInference(handler)]


def read_predictions(path: str) -> tuple[list[int], set[str]]:
    labels, model_ids = [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            labels.append(row["label"])
            model_ids.add(row["model_id"])
    return labels, model_ids


def run_harness(cmd: list[str], workdir: str) -> int:
    """Run the harness with this terminal, so its progress bar and summary show. Its
    temporary files (the control socket's run directory) go into ``workdir`` too, so the
    check afterwards sees anything it leaves behind. On Ctrl-C (which the harness gets
    as well) give it time to stop its workers and its model server."""
    env = dict(os.environ, TMPDIR=workdir)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        print("waiting for the harness to stop its workers and model server", file=sys.stderr)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def processes_using(workdir: str) -> list[psutil.Process]:
    """Live processes whose command line names a path in ``workdir`` (the model server
    has ``--socket DIR/...``, a worker ``--control DIR/...``)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(workdir in arg for arg in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def leftovers(workdir: str, socket_path: str) -> list[str]:
    """What the run should have cleaned up and did not."""
    problems = [f"process {p.pid} still running: {shlex.join(p.cmdline())}" for p in processes_using(workdir)]
    if os.path.exists(socket_path):
        problems.append(f"the socket {socket_path} still exists")
    extra = sorted(set(os.listdir(workdir)) - EXPECTED_FILES)
    if extra:
        problems.append(f"left in {workdir}: {', '.join(extra)}")
    return problems


def force_cleanup(workdir: str, socket_path: str) -> None:
    """After a failure: stop a model server still on our socket, kill what else remains."""
    try:
        with ServerClient(socket_path, autostart=False) as client:
            client.shutdown()
    except (ServerUnavailable, OSError):
        pass
    procs = processes_using(workdir)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        print(f"killing pid {p.pid}, still running after the demo", file=sys.stderr)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _python() -> str:
    """This interpreter as the reader would type it: ``.venv/bin/python`` in a checkout."""
    exe = sys.executable
    return os.path.relpath(exe, ROOT) if exe.startswith(ROOT + os.sep) else exe


def section(title: str) -> None:
    print(f"\n== {title}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description="beamlet end to end")
    parser.add_argument("--keep", action="store_true", help="keep the directory with the data and model")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # prints stay between the bars
    began = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="beamlet-demo-")  # private: mode 0700
    socket_path = os.path.join(workdir, "modelserver.sock")
    checkpoint = os.path.join(workdir, CHECKPOINT)
    test_npy = os.path.join(workdir, "test.npy")
    predictions = os.path.join(workdir, "predictions.jsonl")
    chance = f"chance {1 / N_CLASSES:.0%}"
    cmd = [
        _python(), "-m", "runtime", "run", PIPELINE, "--input", test_npy, "--output", predictions,
        "--workers", str(WORKERS), "--threads", str(THREADS), "--socket", socket_path,
    ]  # fmt: skip
    ok = False
    try:
        section(f"data: {N_CLASSES} classes x {CLUSTERS_PER_CLASS} Gaussian clusters in {DIM} dims")
        x_train, y_train, x_test, y_test = make_dataset()
        print(f"{len(x_train):,} training rows, {len(x_test):,} test rows, seed {SEED}; {chance}")

        section(f"train: MLP {DIM}-{HIDDEN}-{HIDDEN}-{N_CLASSES}, {EPOCHS} epochs")
        torch.save(train(x_train, y_train).state_dict(), checkpoint)
        np.save(test_npy, x_test.numpy().astype(np.float32))
        print(f"state_dict saved to {checkpoint}")
        print(f"{len(x_test):,} test rows saved to {test_npy}; their labels stay in this process")

        section(f"the main job: {WORKERS} SDK workers x {THREADS} threads, the model in a model server")
        print(f"$ {shlex.join(cmd)}")
        started = time.perf_counter()
        code = run_harness([sys.executable, *cmd[1:]], workdir)
        seconds = time.perf_counter() - started
        if code != 0:
            print(f"FAILED: the harness exited with code {code}", file=sys.stderr)
            return 1
        print(f"the command took {seconds:.1f}s, starting the workers and the model server included")

        section("the predictions")
        labels, model_ids = read_predictions(predictions)
        if len(labels) != len(y_test):
            print(f"FAILED: {len(labels):,} predictions for {len(y_test):,} rows", file=sys.stderr)
            return 1
        correct = sum(int(a == b) for a, b in zip(labels, y_test.tolist()))
        print(f"{len(labels):,} lines in {predictions}, model_id {', '.join(sorted(model_ids))}")
        print(f"accuracy {correct / len(labels):.2%} ({correct:,} of {len(labels):,} right; {chance})")
        local = in_process_labels(checkpoint, x_test)
        same = sum(int(a == b) for a, b in zip(labels, local))
        if same != len(labels):
            print(
                f"MISMATCH: only {same:,} of {len(labels):,} labels match the in-process model's",
                file=sys.stderr,
            )
            return 1
        print(f"identical: all {same:,} labels match the same model run in this process")

        section("clean up")
        problems = leftovers(workdir, socket_path)
        for problem in problems:
            print(f"LEFT BEHIND: {problem}", file=sys.stderr)
        if problems:
            return 1
        print("the harness stopped its workers and the model server; the socket is gone")
        ok = True
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if not ok:
            force_cleanup(workdir, socket_path)
        if args.keep:
            print(f"kept {workdir}; run the job again with:\n  {shlex.join(cmd)}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not args.keep:
        print(f"removed {workdir} (python -m examples.demo --keep keeps it, to run the command yourself)")
    print(f"the demo took {time.perf_counter() - began:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
