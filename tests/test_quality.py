"""The code passes its own linters: ruff and mypy run as part of the suite."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_ruff_finds_nothing():
    dirs = [d for d in ("src", "tests", "examples", "benchmarks") if (ROOT / d).is_dir()]
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *dirs],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_finds_nothing_in_the_package():
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_import_contracts_hold():
    # pyproject.toml [tool.importlinter]: the layers, and only broker/store import nats-py and valkey.
    out = subprocess.run([sys.executable, "-m", "importlinter.cli", "--no-cache"], cwd=ROOT, capture_output=True,
                         text=True)
    if "No module named importlinter.cli" in out.stderr:
        out = subprocess.run([str(ROOT / ".venv" / "bin" / "lint-imports"), "--no-cache"], cwd=ROOT,
                             capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_import_cycles_between_top_level_units_with_every_import_counted():
    # Function-level and TYPE_CHECKING imports included: a cycle hidden in a function is still one.
    import grimp

    graph = grimp.build_graph("heddle", exclude_type_checking_imports=False)

    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        if not module.startswith("heddle.") or unit(module) == "heddle.__main__":
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("heddle.") and unit(imported) != unit(module):
                edges.setdefault(unit(module), set()).add(unit(imported))
    cycles = [(a, b) for a, outs in edges.items() for b in outs if a in _reachable(edges, b)]
    assert not cycles, cycles


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in edges.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_module_is_over_800_lines():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in (ROOT / "src").rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > 800}


def test_heddle_exports_exactly_its_all():
    import inspect

    import heddle

    public = {n for n in dir(heddle) if not n.startswith("_") and not inspect.ismodule(getattr(heddle, n))}
    assert public == set(heddle.__all__) - {"__version__"}


# Exceptions used only as signals inside one mechanism, never raised to a caller.
_INTERNAL_SIGNALS = {
    "heddle.configfile.YAMLLimitError",  # PyYAML's composer must see its own error type; reported as ConfigIssue
    "heddle.graphs.run.NodeFailure",  # a node failed: turned into the goal's FAILURE record
    "heddle.llm.backends.base.AttemptFailed",  # one HTTP attempt failed: retried or turned into LLMBackendError
    "heddle.llm.extract.NoJSONFound",  # the model's text held no JSON: turned into LLMOutputError
    "heddle.llm.backends.http.StreamFailed",  # an error event in a streamed reply: turned into AttemptFailed
    "heddle.valkeylane.LaneDown",  # the lane cannot answer: the request goes through the pool instead
    "heddle.natsclient.PlainTextServer",  # nats-py's error callback must see its own type: turned into BrokerError
}


def test_every_error_heddle_defines_is_a_heddle_error():
    import importlib
    import inspect
    import pkgutil

    import heddle
    from heddle.errors import HeddleError

    outside = []
    for info in pkgutil.walk_packages(heddle.__path__, "heddle."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__
                    and not name.startswith("_") and not issubclass(obj, HeddleError)):
                outside.append(f"{module.__name__}.{name}")
    assert set(outside) == _INTERNAL_SIGNALS
