"""Resume for bounded runs (``--checkpoint DIR``): after the harness is SIGKILLed, the same
command continues from the first uncommitted bundle and the output equals a clean run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from runtime import CannotStart, Collect, Create, Harness, Map, WriteToJsonLines
from tests.conftest import ROOT, server_env

JOB = """
import time
from runtime import Map, ReadFromNpy, WriteToJsonLines


def work(row):
    time.sleep(0.004)
    return [float(v) * 3 for v in row]


def build_pipeline(input, output):
    return ReadFromNpy(input) | Map(work) | WriteToJsonLines(output)
"""


def cli(job: str, inp: str, out: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "runtime",
        "run",
        job,
        "--input",
        inp,
        "--output",
        out,
        "--workers",
        "2",
        "--threads",
        "2",
        "--bundle-size",
        "20",
        "--no-progress",
        "--json",
        *extra,
    ]


@pytest.fixture
def job(private_dir):
    path = os.path.join(private_dir, "job.py")
    with open(path, "w") as f:
        f.write(JOB)
    inp = os.path.join(private_dir, "in.npy")
    np.save(inp, np.arange(1500 * 4, dtype=np.float32).reshape(1500, 4) // 4)
    return path, inp


def run_to_the_end(path: str, inp: str, out: str, ckpt: str) -> subprocess.CompletedProcess[str]:
    command = cli(path, inp, out, "--checkpoint", ckpt)
    return subprocess.run(command, env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)


def committed(ckpt_dir: str) -> int:
    try:
        with open(os.path.join(ckpt_dir, "checkpoint.json")) as f:
            return json.load(f)["committed"]
    except (FileNotFoundError, ValueError):
        return 0


def test_a_killed_run_resumes_from_its_checkpoint_and_equals_a_clean_run(job, private_dir):
    path, inp = job
    clean = os.path.join(private_dir, "clean.jsonl")
    subprocess.run(cli(path, inp, clean), env=server_env(), cwd=ROOT, check=True, capture_output=True)
    out, ckpt = os.path.join(private_dir, "out.jsonl"), os.path.join(private_dir, "ckpt")
    resumed_at = []
    for kill_after in (5, 30):  # killed twice, each time further on
        proc = subprocess.Popen(
            cli(path, inp, out, "--checkpoint", ckpt),
            env=server_env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while committed(ckpt) < kill_after:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        resumed_at.append(committed(ckpt))
        assert not os.path.exists(out) and os.path.exists(out + ".partial")
    run = run_to_the_end(path, inp, out, ckpt)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["resumed_bundles"] >= resumed_at[-1] >= 30
    assert "resuming from the checkpoint" in run.stderr
    with open(out) as a, open(clean) as b:
        assert a.read() == b.read()  # row for row
    assert not os.path.exists(os.path.join(ckpt, "checkpoint.json"))  # a completed run removes it


def test_a_checkpoint_of_another_job_is_refused(job, private_dir):
    path, inp = job
    out, ckpt = os.path.join(private_dir, "out.jsonl"), os.path.join(private_dir, "ckpt")
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, "checkpoint.json"), "w") as f:
        json.dump({"version": 1, "job": {"input": {}}, "committed": 3, "position": [10, 0]}, f)
    run = run_to_the_end(path, inp, out, ckpt)
    assert run.returncode == 1 and "another job" in run.stderr


def test_only_bounded_runs_into_files_can_be_checkpointed(private_dir):
    ckpt = os.path.join(private_dir, "ckpt")
    with pytest.raises(CannotStart, match="file sink"):
        Harness(workers=1, threads=1, checkpoint=ckpt, progress=False).run(Create([1]) | Map(str) | Collect())
    out = os.path.join(private_dir, "o.jsonl")
    summary = Harness(workers=1, threads=1, checkpoint=ckpt, progress=False).run(
        Create(range(5)) | Map(str) | WriteToJsonLines(out)
    )
    assert summary.outputs == 5 and not os.path.exists(os.path.join(ckpt, "checkpoint.json"))
