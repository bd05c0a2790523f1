"""beamlet's runtime: the harness, its SDK workers, and a small pipeline vocabulary.

See docs/runtime.md.
"""

from client.inference import RunInference
from client.keyed import KeyModelPathMapping
from client.results import ModelMetadata
from runtime.errors import CannotStart, PipelineError
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
    "ReadFromJsonLines",
    "ReadFromNpy",
    "ReadFromText",
    "RunInference",
    "RunSummary",
    "SlidingWindows",
    "WatchFilePattern",
    "WindowInto",
    "WindowedResult",
    "WriteToJsonLines",
    "WriteToText",
]
