"""Resource hints (Beam's names and syntax) and the machine's devices: hints checked before
a run starts, and the CUDA_VISIBLE_DEVICES each SDK worker gets. On a CPU machine: an
accelerator hint must fail, a min_ram above the RAM must fail, a min_ram it has passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest
import torch

from client import KeyedModelHandler, KeyModelMapping, PytorchModelHandlerTensor
from client.resources import Accelerator, ResourceHints, parse_size
from runtime import CannotStart, Collect, Create, Harness, Map, RunInference
from runtime.devices import (
    Machine,
    check_hints,
    cuda_visible_devices,
    matches,
    unmet,
    visible_gpus,
    visible_indices,
    worker_gpus,
)
from runtime.pipeline import InferenceStep
from tests.conftest import ROOT, server_env
from tests.models import MLP, make_checkpoint

GiB = 1 << 30


@pytest.fixture
def ckpt(private_dir):
    path = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(path)
    return path


# -- parsing, as Beam parses ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["8GiB", "8 GiB", "1.5GB", "512MiB", "100KB", "3B", "2TiB", 12345])
def test_sizes_parse_as_beam_parses_them(value):
    from apache_beam.transforms.resources import ResourceHint

    assert parse_size(value) == int(ResourceHint._parse_storage_size_str(value))


@pytest.mark.parametrize("value", ["8", "8gib", "GiB", "eight GiB", 1.5, None])
def test_sizes_beam_refuses_are_refused(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_accelerator_spec_parses_type_count_and_options():
    a = Accelerator.parse("type:nvidia-tesla-t4;count:2;install-nvidia-driver")
    assert (a.type, a.count, a.options) == ("nvidia-tesla-t4", 2, ("install-nvidia-driver",))
    assert Accelerator.parse("type:NVIDIA-L4").count == 1
    for bad in ("count:1", "type:nvidia-l4;count:0", "type:nvidia-l4;count:x", ""):
        with pytest.raises(ValueError):
            Accelerator.parse(bad)


def test_with_resource_hints_returns_the_transform_and_keeps_beams_form(ckpt):
    from apache_beam.transforms.resources import parse_resource_hints

    transform = RunInference(PytorchModelHandlerTensor(ckpt, MLP, {}))
    hints = {"accelerator": "type:nvidia-h100;count:1", "min_ram": "8GiB"}
    assert transform.with_resource_hints(**hints) is transform
    assert transform.resource_hints.min_ram == 8 * GiB
    assert transform.resource_hints.accelerator == Accelerator.parse("type:nvidia-h100;count:1")
    assert transform.get_resource_hints() == parse_resource_hints(hints)
    transform.with_resource_hints(minRam="1GB")  # Beam's other spelling; replaces the value
    assert transform.resource_hints.min_ram == 10**9 and transform.resource_hints.accelerator is not None


def test_unknown_or_unsupported_hints_and_bad_values_are_refused(ckpt):
    transform = RunInference(PytorchModelHandlerTensor(ckpt, MLP, {}))
    with pytest.raises(ValueError, match="Unknown resource hint: gpus"):
        transform.with_resource_hints(gpus=1)
    with pytest.raises(ValueError, match="cpu_count is not supported"):
        transform.with_resource_hints(cpu_count=4)
    with pytest.raises(ValueError, match="min_ram has invalid value"):
        transform.with_resource_hints(min_ram="lots")
    assert not transform.resource_hints


# -- the machine against the hints (pure) -----------------------------------------------------


@pytest.mark.parametrize(
    "hint,name,ok",
    [
        ("nvidia-tesla-t4", "Tesla T4", True),
        ("nvidia-l4", "NVIDIA L4", True),
        ("nvidia-h100", "NVIDIA H100 80GB HBM3", True),
        ("nvidia-h100-80gb", "NVIDIA H100 80GB HBM3", True),
        ("nvidia-h100-mega-80gb", "NVIDIA H100 80GB HBM3", True),
        ("nvidia-h200-141gb", "NVIDIA H200", True),  # the name states no size: not compared
        ("nvidia-tesla-a100", "NVIDIA A100-SXM4-40GB", True),
        ("nvidia-a100-80gb", "NVIDIA A100-SXM4-40GB", False),
        ("nvidia-h100", "NVIDIA H200", False),
        ("nvidia-tesla-t4", "NVIDIA L4", False),
        ("nvidia-l4", "NVIDIA L40S", False),
    ],
)
def test_accelerator_types_match_nvml_names_loosely(hint, name, ok):
    assert matches(hint, name) is ok


def test_unmet_names_the_hint_and_what_the_machine_has():
    machine = Machine(16 * GiB, ("NVIDIA L4", "NVIDIA A100-SXM4-40GB"))
    assert unmet(ResourceHints().updated(min_ram="16GiB", accelerator="type:nvidia-l4"), machine) is None
    message = unmet(ResourceHints().updated(min_ram="32GiB"), machine)
    assert message is not None and "min_ram='32GiB'" in message and str(16 * GiB) in message
    message = unmet(ResourceHints().updated(accelerator="type:nvidia-l4;count:2"), machine)
    assert message is not None and "1 of this machine's 2 visible GPUs" in message and "NVIDIA L4" in message
    message = unmet(ResourceHints().updated(accelerator="type:nvidia-l4"), Machine(GiB, ()))
    assert message is not None and "no visible GPU" in message and "\n" not in message


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_indices(4, {}) == [0, 1, 2, 3]
    assert visible_indices(4, {"CUDA_VISIBLE_DEVICES": "2,0"}) == [2, 0]
    assert visible_indices(4, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_indices(2, {"CUDA_VISIBLE_DEVICES": "GPU-8f1e"}) == [0, 1]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1, 3"}) == ["1", "3"]


# -- CUDA_VISIBLE_DEVICES for in-process GPU workers ---------------------------------------------


def test_cuda_visible_devices_round_robin():
    assert cuda_visible_devices(5, ["0", "1"]) == ["0", "1", "0", "1", "0"]
    assert cuda_visible_devices(2, ["0", "1", "2", "3"]) == ["0", "1"]
    assert cuda_visible_devices(3, ["GPU-a"]) == ["GPU-a"] * 3
    assert cuda_visible_devices(4, []) == []
    with pytest.raises(ValueError):
        cuda_visible_devices(-1, ["0"])


def test_only_in_process_gpu_models_narrow_the_workers(ckpt):
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}

    def steps(**kw):
        return [InferenceStep(RunInference(PytorchModelHandlerTensor(ckpt, MLP, {}, **kw)))]

    assert worker_gpus(steps(device="GPU"), 3, env) == ["0", "1", "0"]
    assert worker_gpus(steps(device="CPU"), 3, env) == []
    assert worker_gpus(steps(device="GPU", large_model=True), 3, env) == []  # the server's
    assert worker_gpus(steps(device="cuda:1"), 3, env) == []  # pinned: every GPU stays visible
    assert worker_gpus(steps(device="GPU"), 3, {"CUDA_VISIBLE_DEVICES": ""}) == []
    keyed = KeyedModelHandler(
        [
            KeyModelMapping(["a"], PytorchModelHandlerTensor(ckpt, MLP, {}, device="GPU")),
            KeyModelMapping(["b"], PytorchModelHandlerTensor(ckpt, MLP, {}, device="CPU")),
        ]
    )
    assert worker_gpus([InferenceStep(RunInference(keyed))], 2, env) == ["0", "1"]


# -- the harness: hints fail the run before any worker starts -------------------------------


def _pipeline(path: str, sink: Collect, hints: dict, **handler_args):
    transform = RunInference(PytorchModelHandlerTensor(path, MLP, {}, **handler_args))
    return (
        Create(range(40))
        | Map(lambda i: torch.randn(8, generator=torch.Generator().manual_seed(i)))
        | transform.with_resource_hints(**hints)
        | Map(lambda r: (os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")))
        | sink
    )


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize(
    "hints,match",
    [
        ({"accelerator": "type:nvidia-tesla-t4;count:1"}, "accelerator='type:nvidia-tesla-t4;count:1'"),
        ({"min_ram": f"{psutil.virtual_memory().total * 2}B"}, "min_ram="),
    ],
)
def test_a_hint_the_machine_cannot_meet_fails_before_any_worker_starts(ckpt, hints, match):
    if "accelerator" in hints and torch.cuda.is_available():
        pytest.skip("this machine has a GPU (a T4 hint may be met)")
    before = _children()
    sink = Collect()
    with pytest.raises(CannotStart, match=match) as err:
        Harness(workers=2, threads=1, progress=False).run(_pipeline(ckpt, sink, hints))
    assert "RunInference(PytorchModelHandlerTensor)" in str(err.value) and "\n" not in str(err.value)
    assert _children() == before and sink.values == []


def test_a_min_ram_the_machine_has_passes_and_cpu_workers_get_no_cuda_variable(ckpt, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sink = Collect()
    summary = Harness(workers=2, threads=1, bundle_size=8, progress=False).run(
        _pipeline(ckpt, sink, {"min_ram": "64MiB"})
    )
    assert summary.outputs == 40 and {gpu for _, gpu in sink.values} == {None}


def test_in_process_gpu_workers_get_a_gpu_each_round_robin(ckpt, monkeypatch):
    # two visible GPUs as CUDA_VISIBLE_DEVICES names them; without CUDA the model itself
    # falls back to the CPU, so the run completes on this machine too
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    sink = Collect()
    harness = Harness(workers=2, threads=1, bundle_size=4, progress=False)
    summary = harness.run(_pipeline(ckpt, sink, {}, device="GPU"))
    assert summary.outputs == 40
    by_worker = {pid: {gpu for p, gpu in sink.values if p == pid} for pid, _ in sink.values}
    assert all(len(gpus) == 1 for gpus in by_worker.values())  # one GPU per worker, kept
    seen = [gpu for gpus in by_worker.values() for gpu in gpus]
    assert set(seen) <= {"0", "1"} and len(set(seen)) == len(seen)  # and no two share one


def test_check_hints_reads_the_machine_only_for_hinted_steps(ckpt):
    step = InferenceStep(RunInference(PytorchModelHandlerTensor(ckpt, MLP, {})))
    check_hints([step], Machine(0, ()))  # no hints: nothing to meet
    step.transform.with_resource_hints(min_ram="1GiB")
    with pytest.raises(CannotStart, match="min_ram"):
        check_hints([step], Machine(GiB - 1, ()))
    check_hints([step], Machine(GiB, ()))


# -- the CLI -----------------------------------------------------------------------------------

JOB = """
import torch
from runtime import Create, Map, RunInference, WriteToJsonLines
from client import PytorchModelHandlerTensor
from tests.models import MLP

def build_pipeline(input, output):
    return (
        Create(range(10))
        | Map(lambda i: torch.zeros(8))
        | RunInference(PytorchModelHandlerTensor({ckpt!r}, MLP, {{}}))
        | Map(lambda r: r.inference.tolist())
        | WriteToJsonLines(output)
    )
"""


def _cli(private_dir: str, ckpt: str, *flags: str) -> subprocess.CompletedProcess[str]:
    job = os.path.join(private_dir, "job.py")
    with open(job, "w") as f:
        f.write(JOB.format(ckpt=ckpt))
    out = os.path.join(private_dir, "out.jsonl")
    return subprocess.run(
        [sys.executable, "-m", "runtime", "run", job, "--output", out, "--workers", "1", "--json", *flags],
        env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_hints_apply_to_every_step(private_dir, ckpt):
    if not torch.cuda.is_available():
        run = _cli(private_dir, ckpt, "--accelerator", "type:nvidia-l4;count:1")
        assert run.returncode == 1
        assert run.stderr.strip().splitlines()[-1].startswith("runtime: cannot start: RunInference(")
        assert "no visible GPU" in run.stderr
    too_much = f"{psutil.virtual_memory().total // GiB + 1}GiB"
    run = _cli(private_dir, ckpt, "--min-ram", too_much)
    assert run.returncode == 1 and f"min_ram='{too_much}'" in run.stderr
    assert not os.path.exists(os.path.join(private_dir, "out.jsonl"))
    run = _cli(private_dir, ckpt, "--min-ram", "8 MiB")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["outputs"] == 10
    run = _cli(private_dir, ckpt, "--min-ram", "eight")
    assert run.returncode == 2 and "min_ram has invalid value" in run.stderr
