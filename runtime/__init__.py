"""beamlet's runtime: the harness, its SDK workers, and a small pipeline vocabulary.

See docs/runtime.md.
"""

from client.inference import RunInference
from runtime.harness import BundleResult, Harness, PipelineError
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

__all__ = [
    "BundleResult",
    "Collect",
    "Create",
    "Filter",
    "FlatMap",
    "Harness",
    "Map",
    "Pipeline",
    "PipelineError",
    "ReadFromJsonLines",
    "ReadFromNpy",
    "ReadFromText",
    "RunInference",
    "RunSummary",
    "WriteToJsonLines",
    "WriteToText",
]
