"""``heddle`` commands as subprocesses, for examples and demos that show the real CLI."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from heddle.errors import HeddleError


@contextlib.contextmanager
def heddle_process(
    args: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    ready: Sequence[str] = (" consuming ",),
    timeout_s: float = 30.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``heddle ARGS`` in ``cwd`` until the block ends, then SIGTERM it and wait for its drain.

    The block starts once every text in ``ready`` is in the process's output
    (written to ``log_path``); the default is the worker's "consuming" line.

    Raises:
        HeddleError: the process exited early or was not ready within ``timeout_s``
            (the message has its output).
    """
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "heddle", *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            output = log_path.read_text(errors="replace")
            if all(text in output for text in ready):
                break
            if proc.poll() is not None:
                raise HeddleError(f"`heddle {' '.join(args)}` exited early:\n{output}")
            if time.monotonic() > deadline:
                raise HeddleError(f"`heddle {' '.join(args)}` was not ready within {timeout_s:g}s:\n{output}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
