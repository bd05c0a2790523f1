"""Resource hints, as in Beam: what a step needs of the machine it runs on.

``RunInference(handler).with_resource_hints(accelerator="type:nvidia-tesla-t4;count:1",
min_ram="8GiB")`` takes Beam's hint names (``apache_beam.transforms.resources``:
``accelerator``; ``min_ram``, also spelled ``minRam``) and Beam's value syntax: a size is a
number and a unit (``B``, ``KB``/``MB``/``GB``/``TB``/``PB`` in powers of 10,
``KiB``/``MiB``/``GiB``/``TiB``/``PiB`` in powers of 2) or a plain int of bytes; an
accelerator is Dataflow's ``type:<name>;count:<n>`` followed by options such as
``install-nvidia-driver`` (kept, not acted on here). Beam's other hints (``cpu_count``,
``max_active_bundles_per_worker``) are refused with an error that says so, not ignored.

Here the hints are data; the harness checks them against the machine before a run
starts (``runtime.devices``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["Accelerator", "ResourceHints", "parse_size"]

# Beam's URNs (apache_beam.portability.common_urns.resource_hints), for get_resource_hints()
ACCELERATOR_URN = "beam:resources:accelerator:v1"
MIN_RAM_URN = "beam:resources:min_ram_bytes:v1"

_UNITS = {
    "PiB": 2**50,
    "TiB": 2**40,
    "GiB": 2**30,
    "MiB": 2**20,
    "KiB": 2**10,
    "PB": 10**15,
    "TB": 10**12,
    "GB": 10**9,
    "MB": 10**6,
    "KB": 10**3,
    "B": 1,
}
_NAMES = {"accelerator": "accelerator", "min_ram": "min_ram", "minRam": "min_ram"}
_BEAM_ONLY = (
    "cpu_count",
    "cpuCount",
    "max_active_bundles_per_worker",
    "MaxActiveBundlesPerWorker",
    "max_active_bundle_per_worker",
    "MaxActiveBundlePerWorker",
)


def parse_size(value: str | int) -> int:
    """Bytes in a size as Beam writes it ("8GiB", "1.5 GB", "512MiB", or an int of bytes).
    ValueError for anything else, as Beam's parser raises."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"a size must be a string or an integer, got {value!r}")
    if isinstance(value, int):
        return value
    text = value.strip().replace(" ", "")
    match = re.fullmatch(r"(.*?)(\D+)", text)
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"{value!r} is not a size: a number and one of {', '.join(_UNITS)}")
    try:
        return round(float(match.group(1)) * _UNITS[match.group(2)])
    except ValueError:
        raise ValueError(f"{value!r} is not a size: a number and one of {', '.join(_UNITS)}") from None


@dataclass(frozen=True)
class Accelerator:
    """An ``accelerator`` hint: ``count`` devices of ``type`` (Beam's type names, such as
    ``nvidia-tesla-t4`` or ``nvidia-h100-80gb``), and any options after them."""

    spec: str
    type: str
    count: int = 1
    options: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Accelerator:
        if not isinstance(spec, str):
            raise ValueError(
                f"an accelerator hint is a string such as 'type:nvidia-tesla-t4;count:1', got {spec!r}"
            )
        fields: dict[str, str] = {}
        options: list[str] = []
        for part in (p.strip() for p in spec.split(";")):
            if not part:
                continue
            key, sep, value = part.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
            else:
                options.append(part)
        kind = fields.pop("type", "")
        if not kind:
            raise ValueError(f"accelerator hint {spec!r} names no type ('type:nvidia-tesla-t4;count:1')")
        count_text = fields.pop("count", "1")
        if not count_text.isdigit() or int(count_text) < 1:
            raise ValueError(
                f"accelerator hint {spec!r}: count must be a positive integer, got {count_text!r}"
            )
        options += [f"{k}:{v}" for k, v in fields.items()]
        return cls(spec, kind.lower(), int(count_text), tuple(options))


@dataclass(frozen=True)
class ResourceHints:
    """A step's hints: ``min_ram`` in bytes, ``accelerator``; None where not given."""

    min_ram: int | None = None
    min_ram_spec: str | None = None  # as the user wrote it, for messages
    accelerator: Accelerator | None = None

    def __bool__(self) -> bool:
        return self.min_ram is not None or self.accelerator is not None

    def updated(self, **hints: Any) -> ResourceHints:
        """These hints with ``hints`` (Beam's names) set, each replacing its earlier value.
        ValueError for an unknown hint or a value that does not parse, as in Beam."""
        out = self
        for name, value in hints.items():
            canonical = _NAMES.get(name)
            if canonical is None:
                if name in _BEAM_ONLY:
                    raise ValueError(
                        f"resource hint {name} is not supported here (beamlet checks accelerator and min_ram)"
                    )
                raise ValueError(f"Unknown resource hint: {name}.")
            try:
                if canonical == "min_ram":
                    out = replace(out, min_ram=parse_size(value), min_ram_spec=str(value))
                else:
                    out = replace(out, accelerator=Accelerator.parse(value))
            except ValueError as exc:
                raise ValueError(f"Resource hint {name} has invalid value {value!r}: {exc}") from None
        return out

    def to_beam(self) -> dict[str, bytes]:
        """The hints as Beam's ``PTransform.get_resource_hints()`` gives them: URN -> bytes."""
        out: dict[str, bytes] = {}
        if self.accelerator is not None:
            out[ACCELERATOR_URN] = self.accelerator.spec.encode("ascii")
        if self.min_ram is not None:
            out[MIN_RAM_URN] = str(self.min_ram).encode("ascii")
        return out
