"""A small pipeline vocabulary, Beam style: read -> Map/FlatMap/Filter/RunInference -> write.

    pipeline = (
        ReadFromJsonLines("in.jsonl")
        | Map(parse)
        | RunInference(handler).with_exception_handling()
        | Map(format_result)
        | WriteToJsonLines("out.jsonl")
    )
    Harness(workers=2, threads=4).run(pipeline)

Steps are plain objects holding the user's functions and handlers as written; a forked
SDK worker inherits them, and ``python -m runtime.worker`` imports them from the
pipeline's module. ``process_bundle`` is how a worker runs the steps over one bundle:
element-wise steps map each element, RunInference batches the bundle's elements.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from client.inference import InferenceMetrics, RunInference, models
from runtime.errors import CannotStart

if TYPE_CHECKING:
    from runtime.windows import HarnessSteps


class Step:
    """One stage applied to every element of a bundle."""

    label: str = "step"

    def process(self, elements: list[Any], out: BundleOutput) -> list[Any]:
        raise NotImplementedError

    def setup(self) -> None:
        """Runs once in each worker before its first bundle."""

    def __or__(self, other: Any) -> Pipeline:
        return Pipeline.of(self) | other

    def __ror__(self, other: Any) -> Any:
        if isinstance(other, (Source, Pipeline)):
            return Pipeline.of(other) | self
        return NotImplemented


class Map(Step):
    def __init__(self, fn: Callable[[Any], Any], label: str | None = None):
        self.fn = fn
        self.label = label or f"Map({_name(fn)})"

    def process(self, elements: list[Any], out: BundleOutput) -> list[Any]:
        return [self.fn(x) for x in elements]


class FlatMap(Step):
    def __init__(self, fn: Callable[[Any], Iterable[Any]], label: str | None = None):
        self.fn = fn
        self.label = label or f"FlatMap({_name(fn)})"

    def process(self, elements: list[Any], out: BundleOutput) -> list[Any]:
        return [y for x in elements for y in self.fn(x)]


class Filter(Step):
    def __init__(self, fn: Callable[[Any], bool], label: str | None = None):
        self.fn = fn
        self.label = label or f"Filter({_name(fn)})"

    def process(self, elements: list[Any], out: BundleOutput) -> list[Any]:
        return [x for x in elements if self.fn(x)]


class InferenceStep(Step):
    """RunInference inside a pipeline: batches each bundle's elements."""

    def __init__(self, transform: RunInference):
        self.transform = transform
        self.label = f"RunInference({type(transform.handler).__name__})"
        self.setup_metrics: InferenceMetrics | None = None

    def setup(self) -> None:
        self.setup_metrics = InferenceMetrics()
        models.get(self.transform.handler, self.setup_metrics)

    def process(self, elements: list[Any], out: BundleOutput) -> list[Any]:
        name = self.transform.model_name  # after a named model update, metrics go under it
        label = f"{self.label} [{name}]" if name else self.label
        metrics = out.metrics.setdefault(label, InferenceMetrics(model_name=name))
        setup, self.setup_metrics = self.setup_metrics, None
        if setup is not None:  # the model load, reported once with the first bundle
            metrics.merge(setup)
        results, failed = self.transform.process_bundle(elements, metrics)
        for example, error in failed:
            out.dead_letters.append({"step": self.label, "element": example, "error": error})
        return results


def as_step(obj: Any) -> Step:
    if isinstance(obj, Step):
        return obj
    if isinstance(obj, RunInference):
        return InferenceStep(obj)
    if callable(obj):
        return Map(obj)
    raise TypeError(f"{obj!r} is not a pipeline step (Map, FlatMap, Filter, RunInference)")


@dataclass
class BundleOutput:
    """What one bundle produced: outputs in input order, dead letters beside them, and
    each RunInference step's metrics by its label."""

    outputs: list[Any] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, InferenceMetrics] = field(default_factory=dict)


def process_bundle(steps: list[Step], elements: list[Any]) -> BundleOutput:
    """Apply the steps to one bundle, in order."""
    out = BundleOutput()
    for step in steps:
        elements = step.process(elements, out)
    out.outputs = elements
    return out


# -- sources and sinks -----------------------------------------------------------------
@dataclass
class SourceBundle:
    """A bundle as a source hands it to the harness: its ``elements``; ``ack``, what the
    source needs back once the bundle is committed (``Source.ack``; None: nothing); and
    ``arrived``, the ``time.time()`` its first element reached the source (end-to-end
    latency, and the default event time of its elements). An unbounded source yields one
    with no elements when nothing arrived within ``max_wait``, so that its reader can
    notice a stop."""

    elements: Sequence[Any] | np.ndarray
    ack: Any = None
    arrived: float | None = None


class Source:
    """Where elements come from. ``read()`` yields them; ``describe()`` names it.

    A bounded source ends; an ``unbounded`` one (a stream, a followed file) runs until the
    run is stopped (SIGINT/SIGTERM, ``Harness.request_stop``). The harness takes bundles
    from ``bundles()`` on a reader thread of its own, a bounded window ahead of what is
    committed, and calls ``ack`` for each bundle that carries an ack once the sink has
    committed it (``Sink.commit``)."""

    unbounded: bool = False

    def read(self) -> Iterator[Any]:
        raise NotImplementedError

    def ack(self, acks: list[Any]) -> None:
        """The bundles that carried ``acks`` are committed (written by the sink, in input
        order). Called from the harness loop, in commit order."""

    def close(self) -> None:
        """The run is over: release connections and files."""

    def bundles(
        self, size: int, max_wait: float | None = None
    ) -> Iterator[Sequence[Any] | np.ndarray | SourceBundle]:
        """The elements cut into bundles of ``size`` (the last may be short), by count
        alone, so the same bounded input is cut the same way in every run. A source whose
        elements are rows of one array yields each bundle as one array. An unbounded
        source also closes a bundle ``max_wait`` seconds after its first element arrived,
        full or not, and yields ``SourceBundle`` (with its ``ack`` and ``arrived``)."""
        it = iter(self.read())
        while bundle := list(itertools.islice(it, size)):
            yield bundle

    def check(self) -> None:
        """Raise CannotStart, in one line, if ``read()`` cannot work (a missing file).
        The harness calls it before it starts any process."""

    def count(self) -> int | None:
        """The number of elements, when known cheaply (for the progress bar)."""
        return None

    def __or__(self, other: Any) -> Pipeline:
        return Pipeline.of(self) | other


class _FileSource(Source):
    def __init__(self, path: str):
        self.path = path

    def check(self) -> None:
        if not os.path.exists(self.path):
            raise CannotStart(f"the input {self.path} does not exist")
        if os.path.isdir(self.path):
            raise CannotStart(f"the input {self.path} is a directory, not a file")
        try:
            open(self.path, "rb").close()
        except OSError as exc:
            raise CannotStart(f"cannot read the input {self.path}: {exc.strerror}") from None


class ReadFromText(_FileSource):
    """One element per line, without the newline."""

    def read(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")


class ReadFromJsonLines(_FileSource):
    """One JSON value per line; blank lines are skipped."""

    def read(self) -> Iterator[Any]:
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{self.path}:{n}: not JSON: {exc}") from None


class ReadFromNpy(_FileSource):
    """The rows of a .npy array (memory-mapped, so a large file is not read at once)."""

    def check(self) -> None:
        super().check()
        try:
            np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CannotStart(f"the input {self.path} is not a .npy array: {exc}") from None

    def read(self) -> Iterator[np.ndarray]:
        arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        for i in range(arr.shape[0]):
            yield np.array(arr[i])

    def bundles(self, size: int, max_wait: float | None = None) -> Iterator[np.ndarray]:
        """Each bundle one slice of the array, read at once: it travels to a worker as one
        buffer and its rows are views of it there (``runtime.rows``)."""
        arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        for start in range(0, arr.shape[0], size):
            yield np.array(arr[start : start + size])

    def count(self) -> int | None:
        return int(np.load(self.path, mmap_mode="r", allow_pickle=False).shape[0])


class Create(Source):
    """Elements from an in-memory iterable (Beam's Create)."""

    def __init__(self, values: Iterable[Any]):
        self.values = values

    def read(self) -> Iterator[Any]:
        return iter(self.values)

    def count(self) -> int | None:
        return len(self.values) if hasattr(self.values, "__len__") else None  # type: ignore[arg-type]


class Sink:
    """Where committed outputs go, in input order, each bundle once, and the dead letters
    committed with them. ``write_dead_letters`` keeps them in ``dead_letters`` unless a
    sink overrides it (the file sinks write them to a file as they come, so a long run's
    memory does not grow with them)."""

    dead_letters: list[dict[str, Any]]

    def check(self) -> None:
        """Raise CannotStart, in one line, if the sink cannot work (an output directory
        that does not exist or cannot be written). Called before any process starts."""

    def open(self) -> None:
        pass

    def write(self, elements: list[Any]) -> None:
        raise NotImplementedError

    def write_dead_letters(self, dead_letters: list[dict[str, Any]]) -> None:
        """The dead letters of one committed bundle, committed with its outputs."""
        if "dead_letters" not in self.__dict__:
            self.dead_letters = []
        self.dead_letters.extend(dead_letters)

    def commit(
        self, outputs: list[Any], dead_letters: list[dict[str, Any]], acks: list[Any], source: Source | None
    ) -> None:
        """Commit one bundle: write its outputs and dead letters, make them durable
        (``flush``), then acknowledge its input (``source.ack(acks)``). A sink that writes
        where its source reads (``WriteToRedisStream`` after ``ReadFromRedisStream`` on one
        server) does all of it in one transaction instead: exactly once, end to end."""
        self.write(outputs)
        self.write_dead_letters(dead_letters)
        if acks and source is not None:
            self.flush()
            source.ack(acks)

    def flush(self) -> None:
        """Make what was written so far durable (before the input is acknowledged)."""

    def close(self) -> None:
        pass


class WriteToJsonLines(Sink):
    """One JSON value per line; tensors and arrays become lists. Dead letters go to
    ``<path>.dead_letters.jsonl`` (``dead_letters_path``) as they are committed, one JSON
    map a line; that file exists only if the run has dead letters. Both are written to a
    temporary file (``.partial``) and renamed into place on close, so a failed run leaves
    no half file."""

    def __init__(self, path: str):
        self.path = path
        self.dead_letters_path = path + ".dead_letters.jsonl"
        self._f: Any = None
        self._dead: Any = None

    def check(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(self.path):
            raise CannotStart(f"the output {self.path} is a directory")
        if not os.path.isdir(directory):
            what = "is not a directory" if os.path.exists(directory) else "does not exist"
            raise CannotStart(f"the output directory {directory} {what}")
        try:  # os.access says yes to root on a read-only mount; a real file tells the truth
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".beamlet-check-"):
                pass
        except OSError as exc:
            raise CannotStart(f"cannot write in the output directory {directory}: {exc.strerror}") from None

    def open(self) -> None:
        self._f = open(self.path + ".partial", "w", encoding="utf-8")

    def position(self) -> tuple[int, int]:
        """Bytes written so far to the output and to the dead letters (after ``flush``):
        what ``resume`` takes back."""
        return (
            self._f.tell() if self._f is not None else 0,
            self._dead.tell() if self._dead is not None else 0,
        )

    def resume(self, position: tuple[int, int]) -> None:
        """Open the partial files of an interrupted run instead of new ones, cut back to
        ``position`` (what was written after the last recorded commit goes); CannotStart
        when they are shorter than that (not the files that checkpoint was taken of)."""
        for path, size in ((self.path, position[0]), (self.dead_letters_path, position[1])):
            partial = path + ".partial"
            have = os.path.getsize(partial) if os.path.exists(partial) else -1
            if size and have < size:
                raise CannotStart(
                    f"cannot resume: {partial} holds {max(have, 0)} bytes, the checkpoint recorded {size}"
                )
        self._f = _reopen(self.path + ".partial", position[0])
        if position[1]:
            self._dead = _reopen(self.dead_letters_path + ".partial", position[1])

    def write(self, elements: list[Any]) -> None:
        for e in elements:
            self._f.write(json.dumps(to_jsonable(e)) + "\n")

    def flush(self) -> None:
        """Hand what was written to the operating system: a killed process loses none of it."""
        for f in (self._f, self._dead):
            if f is not None:
                f.flush()

    def write_dead_letters(self, dead_letters: list[dict[str, Any]]) -> None:
        if not dead_letters:
            return
        if self._dead is None:
            self._dead = open(self.dead_letters_path + ".partial", "w", encoding="utf-8")
        for d in dead_letters:
            self._dead.write(json.dumps(to_jsonable(d)) + "\n")
        self._dead.flush()  # committed: on disk now, not in a buffer until the end

    def close(self) -> None:
        for f, path in ((self._f, self.path), (self._dead, self.dead_letters_path)):
            if f is not None:
                f.close()
                os.replace(path + ".partial", path)
        self._f = self._dead = None

    def abort(self, keep: bool = False) -> None:
        """The run did not complete: remove the partial files rather than leave half an
        output (``keep``: leave them, for a checkpointed run to resume)."""
        for f, path in ((self._f, self.path), (self._dead, self.dead_letters_path)):
            if f is not None:
                f.close()
            if keep:
                continue
            try:
                os.unlink(path + ".partial")
            except FileNotFoundError:
                pass
        self._f = self._dead = None


class WriteToText(WriteToJsonLines):
    """One line per element, ``str(element)``."""

    def write(self, elements: list[Any]) -> None:
        for e in elements:
            self._f.write(f"{e}\n")


class Collect(Sink):
    """Keeps the outputs in memory (``.values``), and the dead letters
    (``.dead_letters``), for tests and embedding."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.dead_letters: list[dict[str, Any]] = []

    def write(self, elements: list[Any]) -> None:
        self.values.extend(elements)


def _reopen(path: str, size: int) -> Any:
    """``path`` opened for appending after its first ``size`` bytes (created if missing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, size)
    f = open(fd, "a", encoding="utf-8")
    return f


def to_jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: to_jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


@dataclass
class Pipeline:
    """A source, steps, and a sink. Build it with ``|``."""

    source: Source | None = None
    steps: list[Step] = field(default_factory=list)
    sink: Sink | None = None

    @classmethod
    def of(cls, obj: Any) -> Pipeline:
        if isinstance(obj, Pipeline):
            return obj
        if isinstance(obj, Source):
            return cls(source=obj)
        return cls(steps=[as_step(obj)])

    def __or__(self, other: Any) -> Pipeline:
        if self.sink is not None:
            raise ValueError("nothing can follow a write step")
        if isinstance(other, Sink):
            return Pipeline(self.source, list(self.steps), other)
        if isinstance(other, Source):
            raise ValueError("a read step can only start a pipeline")
        return Pipeline(self.source, [*self.steps, as_step(other)], None)

    def describe(self) -> str:
        parts = [type(self.source).__name__ if self.source else "(bundles)"]
        parts += [s.label for s in self.steps]
        parts.append(type(self.sink).__name__ if self.sink else "(results)")
        return " | ".join(parts)

    def split(self) -> tuple[list[Step], HarnessSteps]:
        """The steps for the workers, and those for the harness: a grouping step
        (``CountPerKey``, ``CombinePerKey``) holds state across bundles, so it and the
        steps after it run once, in the harness, at commit (runtime/windows.py)."""
        from runtime.windows import split_steps  # windows.py builds on this module

        return split_steps(self.steps)

    def inference_steps(self) -> list[InferenceStep]:
        return [s for s in self.steps if isinstance(s, InferenceStep)]

    def needs_model_server(self) -> bool:
        return any(s.transform.handler.share_model_across_processes() for s in self.inference_steps())


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
