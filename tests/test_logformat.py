"""``--log-format json``: one JSON object a line, from the formatter, through the server's
non-blocking log pump, and from real ``serve`` and ``runtime run`` processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import datetime

import pytest

from client import autostart
from modelserver import logformat, serverlog
from tests.conftest import ROOT, RunningServer, server_env, wait_for_server

KEYS = {"time", "level", "logger", "message", "process", "thread"}

JOB = """
import logging
import torch
from client import PytorchModelHandlerTensor
from runtime import Create, Map, RunInference, WriteToJsonLines
from tests.models import MLP


def row(i):
    if i == 0:
        logging.getLogger("beamlet.job").warning("first row")  # in a worker
    return torch.zeros(8)


def build_pipeline(input, output):
    handler = PytorchModelHandlerTensor({ckpt!r}, MLP, {{}}, large_model=True)
    return (
        Create(range(20)) | Map(row) | RunInference(handler) | Map(lambda r: r.inference.tolist())
        | WriteToJsonLines(output)
    )
"""


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as JSON (a line that is not fails the test), each with the
    keys every record has and a UTC ISO 8601 time."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)
        assert KEYS <= set(record), record
        assert record["time"].endswith("Z")
        datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        records.append(record)
    return records


def test_a_json_line_has_the_records_fields_its_traceback_and_its_plain_extras():
    logger = logging.getLogger("beamlet.test")
    try:
        raise ValueError("bad\nrow")
    except ValueError:
        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "row %d failed", (7,), sys.exc_info(),
            extra={"model": "m1", "rows": 3, "ratio": float("nan"), "spec": {"not": "plain"}},
        )  # fmt: skip
    line = logformat.JsonFormatter().format(record)
    assert "\n" not in line
    (out,) = json_lines(line)
    assert out["level"] == "ERROR" and out["logger"] == "beamlet.test" and out["message"] == "row 7 failed"
    assert out["process"] == os.getpid() and out["thread"] == "MainThread"
    assert out["exc_info"].startswith("Traceback") and "ValueError: bad\nrow" in out["exc_info"]
    assert (out["model"], out["rows"], out["ratio"]) == ("m1", 3, "nan")
    assert "spec" not in out and "args" not in out and "msg" not in out


def test_the_server_log_pump_writes_json_lines_with_the_traceback_apart_from_the_message():
    read, write = os.pipe()
    logger = logging.getLogger("beamlet.test.pump")
    logger.propagate = False
    pump = serverlog.LogPump(write, logger=logger, formatter=logformat.JsonFormatter())
    try:
        logger.info("hello %s", "there")
        try:
            {}["missing"]
        except KeyError:
            logger.exception("lookup failed")
    finally:
        assert pump.close(timeout=5.0)
        logger.propagate = True
    os.close(write)
    with os.fdopen(read) as f:
        hello, failed = json_lines(f.read())
    assert hello["message"] == "hello there" and "exc_info" not in hello
    assert failed["message"] == "lookup failed" and "KeyError: 'missing'" in failed["exc_info"]


def test_serve_with_log_format_json_writes_only_json_lines_to_stderr(private_dir):
    path = os.path.join(private_dir, "ms.sock")
    err = os.path.join(private_dir, "stderr")
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelserver", "serve", "--socket", path, "--log-format", "json",
             "--log-level", "INFO"],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=server_env(), cwd=ROOT,
        )  # fmt: skip
    server = RunningServer(path, proc)
    try:
        wait_for_server(path, proc)
    finally:
        assert server.stop() == 0
    with open(err) as f:
        records = json_lines(f.read())
    messages = [r["message"] for r in records]
    assert any("listening on" in m for m in messages) and messages[-1] == "model server stopped"
    assert {r["process"] for r in records} == {proc.pid}


def test_runtime_run_with_log_format_json_logs_json_and_so_do_its_exec_workers_and_its_server(
    private_dir, sock_path, ckpt
):
    job = os.path.join(private_dir, "job.py")
    with open(job, "w") as f:
        f.write(JOB.format(ckpt=ckpt))
    out = os.path.join(private_dir, "out.jsonl")
    run = subprocess.run(
        [sys.executable, "-m", "runtime", "run", job, "--output", out, "--workers", "1", "--threads", "1",
         "--no-progress", "--log-level", "INFO", "--log-format", "json", "--exec-workers"],
        env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = json_lines(run.stderr)
    (harness,) = {r["process"] for r in records if r["logger"] == "beamlet.harness"}
    # an exec'd worker (python -m runtime.worker) learnt the format from its environment
    (worker,) = [r for r in records if r["logger"] == "beamlet.job"]
    assert worker["message"] == "first row" and worker["process"] != harness
    with open(autostart.log_path(sock_path)) as f:
        server = json_lines(f.read())
    assert server[0]["message"] == f"starting a model server for {sock_path}"
    assert any("listening on" in r["message"] for r in server)


@pytest.fixture
def ckpt(private_dir: str) -> str:
    from tests.models import make_checkpoint

    path = os.path.join(private_dir, "mlp.pt")
    make_checkpoint(path)
    return path


def test_the_format_comes_from_the_flag_or_the_environment_and_a_wrong_one_is_refused(monkeypatch, capsys):
    from modelserver.__main__ import build_parser

    monkeypatch.delenv(logformat.LOG_FORMAT_ENV, raising=False)
    assert build_parser().parse_args(["serve"]).log_format == "text"
    assert build_parser().parse_args(["serve", "--log-format", "JSON"]).log_format == "json"
    monkeypatch.setenv(logformat.LOG_FORMAT_ENV, "json")
    assert build_parser().parse_args(["serve"]).log_format == "json"
    monkeypatch.setenv(logformat.LOG_FORMAT_ENV, "xml")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])
    assert "log format is one of text, json, not 'xml'" in capsys.readouterr().err
