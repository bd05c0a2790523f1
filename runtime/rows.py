"""Bundles and results as columns: rows of one shape travel as one array.

A bundle read from a ``.npy`` file is already one array; a bundle of separate arrays
(or tensors) of one shape and dtype, and a list of maps or NamedTuples (PredictionResult)
whose fields are such arrays, are packed into one array per field before they go on the
control channel, and unpacked into views of it at the other end. One array costs one
descriptor and one buffer on the wire; a row each costs a descriptor each, and Python
work per row on both sides.

The packed form, which takes the place of a list in a control message::

    {"packed": n, "array": A}                        # rows A[0], ..., A[n-1]
    {"packed": n, "columns": {field: A or list}}     # maps {field: A[i] or list[i]}

Unpacked rows are views of the array (``A[i, ...]``: a 0-d array or tensor for scalars,
as each row was); a NamedTuple arrives as a map, as it does unpacked.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

MIN_ROWS = 2


def pack(rows: Sequence[Any] | np.ndarray) -> Any:
    """``rows`` as the control channel carries them: packed when it pays, else a list."""
    if isinstance(rows, np.ndarray) or _is_tensor(rows):
        if getattr(rows, "ndim", 0) >= 1:
            return {"packed": len(rows), "array": rows}
        return list(rows)
    rows = rows if isinstance(rows, list) else list(rows)
    if len(rows) < MIN_ROWS:
        return rows
    stacked = _stack(rows)
    if stacked is not None:
        return {"packed": len(rows), "array": stacked}
    fields = _fields(rows)
    if fields is None:
        return rows
    columns: dict[str, Any] = {}
    any_array = False
    for name, column in fields.items():
        stacked = _stack(column)
        any_array = any_array or stacked is not None
        columns[name] = stacked if stacked is not None else column
    return {"packed": len(rows), "columns": columns} if any_array else rows


def unpack(value: Any) -> list[Any]:
    """The rows of a control message's list field, packed or not."""
    if isinstance(value, list):
        return value
    if not isinstance(value, dict) or "packed" not in value:
        raise TypeError(f"expected a list of rows or a packed form, got {type(value).__name__}")
    n = value["packed"]
    if not isinstance(n, int) or n < 0:
        raise TypeError(f"a packed form's row count must be a count, got {n!r}")
    if "array" in value:
        return _rows_of(value["array"], n, "array")
    columns = value.get("columns")
    if not isinstance(columns, dict):
        raise TypeError("a packed form needs an 'array' or a map of 'columns'")
    cols = {
        k: _rows_of(c, n, k) if not isinstance(c, list) else _checked(c, n, k) for k, c in columns.items()
    }
    return [{k: c[i] for k, c in cols.items()} for i in range(n)]


def _rows_of(array: Any, n: int, name: str) -> list[Any]:
    if not (isinstance(array, np.ndarray) or _is_tensor(array)) or array.ndim < 1 or len(array) != n:
        raise TypeError(f"packed {name!r} is not an array of {n} rows")
    return [array[i, ...] for i in range(n)]


def _checked(column: list[Any], n: int, name: str) -> list[Any]:
    if len(column) != n:
        raise TypeError(f"packed column {name!r} has {len(column)} rows, not {n}")
    return column


def _fields(rows: list[Any]) -> dict[str, list[Any]] | None:
    """Columns of rows that are all maps with the same str keys, or all NamedTuples of
    one type; None otherwise."""
    first = rows[0]
    if type(first) is dict:
        keys = tuple(first)
        if not all(isinstance(k, str) for k in keys):
            return None
        if not all(type(r) is dict and tuple(r) == keys for r in rows):
            return None
        return {k: [r[k] for r in rows] for k in keys}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        kind = type(first)
        if not all(type(r) is kind for r in rows):
            return None
        return {k: [getattr(r, k) for r in rows] for k in first._fields}
    return None


def _stack(values: list[Any]) -> Any:
    """One array of the values when they are all numpy arrays (or all tensors) of one
    shape and dtype; None otherwise."""
    first = values[0]
    if type(first) is np.ndarray:
        if first.dtype.hasobject:
            return None
        shape, dtype = first.shape, first.dtype
        if all(type(v) is np.ndarray and v.shape == shape and v.dtype == dtype for v in values):
            return np.stack(values)
        return None
    if _is_tensor(first):
        import torch

        shape, dtype, device = first.shape, first.dtype, first.device
        if first.layout != torch.strided:
            return None
        if all(
            type(v) is type(first) and v.shape == shape and v.dtype == dtype and v.device == device
            for v in values
        ):
            with torch.no_grad():
                return torch.stack(values)
    return None


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)
