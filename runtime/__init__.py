"""beamlet's runtime: the harness, its SDK workers, and a small pipeline vocabulary.

See docs/runtime.md.
"""

from client.inference import RunInference
from client.keyed import KeyModelPathMapping
from client.results import ModelMetadata
from runtime.errors import CannotStart, PipelineError
from runtime.filesources import ReadFromDirectory, ReadFromJsonLinesTail, ReadFromTextTail, TailPosition
from runtime.harness import BundleResult, Harness
from runtime.pipeline import (
    Collect,
    Create,
    Filter,
    FlatMap,
    Map,
    Pipeline,
    ReadFromJsonLines,
    ReadFromNpy,
    ReadFromText,
    WriteToJsonLines,
    WriteToText,
)
from runtime.streams import ReadFromRedisStream, WriteToRedisStream
from runtime.summary import RunSummary
from runtime.watch import FileInfo, FileStore, LocalFiles, WatchFilePattern
from runtime.windows import (
    CombinePerKey,
    CountPerKey,
    FixedWindows,
    GlobalWindows,
    HarnessSteps,
    IntervalWindow,
    SlidingWindows,
    WindowedResult,
    WindowInto,
)

__all__ = [
    "BundleResult",
    "CannotStart",
    "Collect",
    "CombinePerKey",
    "CountPerKey",
    "Create",
    "FileInfo",
    "FileStore",
    "Filter",
    "FixedWindows",
    "FlatMap",
    "GlobalWindows",
    "Harness",
    "HarnessSteps",
    "IntervalWindow",
    "KeyModelPathMapping",
    "LocalFiles",
    "Map",
    "ModelMetadata",
    "Pipeline",
    "PipelineError",
    "ReadFromDirectory",
    "ReadFromJsonLines",
    "ReadFromJsonLinesTail",
    "ReadFromNpy",
    "ReadFromRedisStream",
    "ReadFromText",
    "ReadFromTextTail",
    "RunInference",
    "RunSummary",
    "SlidingWindows",
    "TailPosition",
    "WatchFilePattern",
    "WindowInto",
    "WindowedResult",
    "WriteToJsonLines",
    "WriteToRedisStream",
    "WriteToText",
]
