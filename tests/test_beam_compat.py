"""Apache Beam's own PyTorch RunInference tests, run against beamlet's handlers.

How it works: the source of Beam's ``apache_beam/ml/inference/pytorch_inference_test.py``
(from the installed apache-beam) is read, and only its imports of ``pytorch_inference``
are rewritten to ``tests.beam_compat_shim``, whose handlers are Beam ModelHandlers that
wrap beamlet's (``client.beam.BeamletModelHandler`` around ``client.PytorchModelHandler*``).
The rewritten source is compiled twice, into two modules, and each of its TestCase
classes is exposed here twice: ``InProcess_<Class>`` (every test's own ``large_model``)
and ``LargeModel_<Class>`` (the shim forces ``large_model=True``, so the models live in
a model server). Every test gets its own model-server socket (``BEAMLET_SOCKET``); any
server started for it is stopped and reaped when it ends, and the test fails if one is
left.

EXCEPTIONS lists the only tests not expected to pass, each with the reason: tests that
assert Beam's internals (a private function mocked, the type of Beam's
multi_process_shared proxy, exact log text, a private attribute) are strict xfails,
each pinned to the failure it documents (failing any other way is an ordinary failure,
passing is XPASS(strict)); tests that cannot run here are skipped. A key
``<Class>.<test>`` applies to both runs, ``<Variant>_<Class>.<test>`` to one. Everything
else must pass.
"""

from __future__ import annotations

import functools
import importlib.util
import linecache
import os
import re
import sys
import types
import unittest
import warnings
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

pytest.importorskip("apache_beam")
pytest.importorskip("torch")

from client.serverclient import shared_client  # noqa: E402
from tests import beam_compat_shim  # noqa: E402  (an ImportError here must fail, not skip)
from tests.conftest import kill_servers, server_processes  # noqa: E402

XFAIL, SKIP = "xfail", "skip"

EXCEPTIONS: dict[str, tuple[str, str, str]] = {
    # (kind, why, for XFAIL: a regex the failure "<ExceptionType>: <message>" must match;
    #  a test failing in any other way is an ordinary failure, so no beamlet bug hides here)
    # -- asserts Beam internals ----------------------------------------------------------
    "PytorchInferenceTestWithMocks.test_load_model_args_tensor": (
        XFAIL,
        "mocks Beam's private pytorch_inference._load_model and asserts Beam's handler "
        "called it; beamlet loads through modelserver.loaders, never through that function",
        r"^AssertionError: expected call not found\..*Actual: not called",
    ),
    "PytorchInferenceTestWithMocks.test_load_model_args_keyed_tensor": (
        XFAIL,
        "mocks Beam's private pytorch_inference._load_model and asserts Beam's handler "
        "called it; beamlet loads through modelserver.loaders, never through that function",
        r"^AssertionError: expected call not found\..*Actual: not called",
    ),
    "PytorchRunInferencePipelineTest.test_pipeline_local_model_large": (
        XFAIL,
        "its inference_fn requires the model to be Beam's multi_process_shared proxy "
        "('multi_process_shared' in str(type(model))); beamlet's large model is a RemoteModel",
        r"^Exception: Loaded model of type .*RemoteModel.*expecting multi_process_shared_model",
    ),
    "PytorchRunInferencePipelineTest.test_pipeline_local_model_extra_inference_args_large": (
        XFAIL,
        "its inference_fn requires the model to be Beam's multi_process_shared proxy "
        "('multi_process_shared' in str(type(model))); beamlet's large model is a RemoteModel",
        r"^Exception: Loaded model of type .*RemoteModel.*expecting multi_process_shared_model",
    ),
    "PytorchRunInferencePipelineTest.test_gpu_auto_convert_to_cpu": (
        XFAIL,
        "asserts Beam's private handler attribute _device == torch.device('cuda') and the "
        "exact text of Beam's root-logger lines ('INFO:root:Device is set to CUDA', ...)",
        r"^AttributeError: .* has no attribute '_device'"
        r"|^AssertionError: .*device\(type='cuda'\)"
        r"|^AssertionError: '(INFO:root:Device is set to CUDA|WARNING:root:Model handler specified)",
    ),
    "LargeModel_PytorchRunInferencePipelineTest.test_load_torch_script_model": (
        XFAIL,
        "asserts load_model() returns a torch.jit.ScriptModule; with large_model=True the "
        "loaded model is a proxy (beamlet's RemoteModel, as Beam's own would be its "
        "multi_process_shared proxy)",
        r"^AssertionError: False is not true$",
    ),
    # -- differs on purpose (docs/beam.md, "Where beamlet differs from Beam") -------------
    "PytorchRunInferencePipelineTest.test_invalid_input_type": (
        XFAIL,
        "expects numpy rows to be refused ('expected Tensor as element'); beamlet's tensor "
        "handlers take numpy rows as tensors (torch.as_tensor, no copy): its ReadFromNpy "
        "source yields them",
        r"^AssertionError: Exception not raised",
    ),
    # -- cannot run here -----------------------------------------------------------------
    "PytorchRunInferencePipelineTest.test_pipeline_gcs_model": (
        SKIP,
        "reads gs://apache-beam-ml/...: needs the GCP extra and network access",
        "",
    ),
    "PytorchRunInferencePipelineTest.test_pipeline_gcs_model_control_batching": (
        SKIP,
        "reads gs://apache-beam-ml/...: needs the GCP extra and network access",
        "",
    ),
}

VARIANTS = {"InProcess": None, "LargeModel": True}  # -> beam_compat_shim.LARGE_MODEL

_spec = importlib.util.find_spec("apache_beam.ml.inference")
assert _spec is not None and _spec.origin is not None
BEAM_TEST_FILE = os.path.join(os.path.dirname(_spec.origin), "pytorch_inference_test.py")

# (old line prefix, new line prefix, how many lines of Beam's file it must rewrite)
IMPORT_REWRITES = [
    ("from apache_beam.ml.inference.pytorch_inference import ", "from tests.beam_compat_shim import ", 6),
    (
        "from apache_beam.ml.inference import pytorch_inference",
        "from tests import beam_compat_shim as pytorch_inference",
        1,
    ),
]


def rewritten_source() -> str:
    """Beam's test file with only its pytorch_inference imports pointed at the shim."""
    with open(BEAM_TEST_FILE) as f:
        lines = f.read().splitlines(keepends=True)
    hits = [0] * len(IMPORT_REWRITES)
    out = []
    for line in lines:
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        for i, (old, new, _count) in enumerate(IMPORT_REWRITES):
            if body.startswith(old) and (body[len(old) :].strip() == "" or old.endswith(" ")):
                line = indent + new + body[len(old) :]
                hits[i] += 1
                break
        out.append(line)
    source = "".join(out)
    for (old, _new, count), hit in zip(IMPORT_REWRITES, hits):
        if hit != count:
            raise RuntimeError(f"{BEAM_TEST_FILE}: expected {count} line(s) starting {old!r}, found {hit}")
    if "pytorch_inference import" in source.replace("from tests.beam_compat_shim import", ""):
        raise RuntimeError(f"{BEAM_TEST_FILE}: an import of pytorch_inference was left unrewritten")
    return source


def compile_variant(variant: str, source: str) -> types.ModuleType:
    """The rewritten file as a module of its own. It is registered in sys.modules (Beam
    pickles its model classes by reference), and its source is registered in linecache
    under a name outside site-packages, so beamlet's model server is sent the classes by
    value (``modelserver.userclass``), as for any user's own module."""
    name = f"tests._beam_pytorch_inference_test_{variant}"
    filename = f"<beam_compat {variant}: pytorch_inference_test.py>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    module = types.ModuleType(name, f"{BEAM_TEST_FILE}, imports rewritten to tests.beam_compat_shim")
    module.__file__ = filename
    sys.modules[name] = module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)  # its uses_pytorch mark
        try:
            exec(compile(source, filename, "exec"), module.__dict__)
        except unittest.SkipTest as exc:  # its "PyTorch dependencies are not installed"
            raise RuntimeError(f"Beam's test file refused to load against the shim: {exc}") from exc
    return module


class DocumentedFailure(AssertionError):
    """A test of EXCEPTIONS failed in the documented way (the only failure its xfail takes)."""


def _expected_failure(fn: Any, why: str, failure: str) -> Any:
    """``fn`` as a strict xfail that only a failure matching ``failure`` satisfies: any
    other failure is reported as a failure, and a pass as XPASS(strict)."""
    pattern = re.compile(failure, re.DOTALL)

    @functools.wraps(fn)
    def test(self: unittest.TestCase) -> None:
        try:
            fn(self)
        except Exception as exc:
            if isinstance(exc, unittest.SkipTest) or not pattern.search(f"{type(exc).__name__}: {exc}"):
                raise
            raise DocumentedFailure(f"{type(exc).__name__}: {exc}") from exc

    return pytest.mark.xfail(reason=why, strict=True, raises=DocumentedFailure)(test)


def _expose(variant: str, module: types.ModuleType) -> list[str]:
    """Subclass each TestCase of ``module`` here as ``<variant>_<Class>``; apply EXCEPTIONS."""
    names = []
    for cls_name, cls in sorted(vars(module).items()):
        if not (
            isinstance(cls, type) and issubclass(cls, unittest.TestCase) and cls.__module__ == module.__name__
        ):
            continue
        exposed = f"{variant}_{cls_name}"
        attrs: dict[str, Any] = {"__module__": __name__, "BEAMLET_LARGE_MODEL": VARIANTS[variant]}
        for test in unittest.TestLoader().getTestCaseNames(cls):
            exception = EXCEPTIONS.get(f"{exposed}.{test}") or EXCEPTIONS.get(f"{cls_name}.{test}")
            if exception is None:
                continue
            kind, why, failure = exception
            fn = getattr(cls, test)
            attrs[test] = _expected_failure(fn, why, failure) if kind == XFAIL else unittest.skip(why)(fn)
        globals()[exposed] = type(exposed, (cls,), attrs)
        names += [f"{exposed}.{t}" for t in unittest.TestLoader().getTestCaseNames(cls)]
    return names


_SOURCE = rewritten_source()
ALL_TESTS: list[str] = []
for _variant in VARIANTS:
    ALL_TESTS += _expose(_variant, compile_variant(_variant, _SOURCE))


@pytest.fixture(autouse=True)
def beamlet_variant(
    request: pytest.FixtureRequest, sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The variant's LARGE_MODEL; a model-server socket of the test's own; afterwards,
    every server on it stopped and reaped, and the environment as it was."""
    monkeypatch.setattr(beam_compat_shim, "LARGE_MODEL", getattr(request.cls, "BEAMLET_LARGE_MODEL", None))
    monkeypatch.setenv("BEAMLET_SERVER_IDLE_TIMEOUT", str(beam_compat_shim.SERVER_IDLE_TIMEOUT))
    environ = dict(os.environ)
    children_before = {p.pid for p in psutil.Process().children()}
    try:
        yield
    finally:
        for key in set(os.environ) - set(environ):  # e.g. FOO, set by the env_vars tests
            del os.environ[key]
        shared_client(sock_path).close()
        kill_servers(sock_path)
        left = _pids(server_processes(sock_path), zombie=False)
        new_children = [p for p in psutil.Process().children() if p.pid not in children_before]
        zombies = _pids(new_children, zombie=True)
        assert not left, f"model server(s) {left} still running on {sock_path}"
        assert not zombies, f"unreaped child process(es) {zombies}"


def _pids(procs: list[psutil.Process], *, zombie: bool) -> list[int]:
    """The pids of ``procs`` that are (zombie=True) or are not (False) zombies, now."""
    found = []
    for p in procs:
        try:
            if (p.status() == psutil.STATUS_ZOMBIE) == zombie:
                found.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_exceptions_name_real_tests() -> None:
    """Every EXCEPTIONS key names a test of Beam's file, so the list cannot go stale; every
    xfail says which failure it expects."""
    known = set(ALL_TESTS) | {name.split("_", 1)[1] for name in ALL_TESTS}
    assert sorted(set(EXCEPTIONS) - known) == []
    assert [name for name, (kind, _why, failure) in EXCEPTIONS.items() if kind == XFAIL and not failure] == []
