"""What each process the runtime starts does at its beginning and at its end: die with
its parent, carry a name that ps and top show, and end without Python's teardown once its
work is done (a forked child must not run its parent's atexit handlers or finalizers)."""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def die_with_parent(parent: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux only). With
    ``parent`` (its pid before the fork): False when it has died already, before the
    request could cover it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    return parent is None or os.getppid() == parent


def set_process_name(name: str) -> None:
    """Name this process (its main thread) for ps and top, 15 characters at most."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def exit_now(code: int) -> NoReturn:
    """End this process with ``code`` once its work is done and written: run its atexit
    handlers (logging's among them), flush the standard streams, and skip the teardown of
    every module and object, which takes half a second once torch is imported."""
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def run_then_exit(body: Callable[[], int], failed: int) -> NoReturn:
    """Run ``body`` as the whole of this forked process, then exit with the code it returns
    (``failed``, its traceback on stderr, if it raises), flushing the standard streams but
    running nothing of the parent's: no atexit handler, no finalizer."""
    code = failed
    try:
        code = body()
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
