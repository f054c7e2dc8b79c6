"""Evaluation runs kept in SQLite, so they outlive the Workshop and can be compared later.

Two tables: ``runs`` (one row per run: the suite as JSON, target, tier, state,
progress and score) and ``case_results`` (one row per finished case: input,
expected, output, per-field checks, score, error, latency, tokens). A case is
written the moment it finishes, together with the run's progress and score, in
one transaction, so a Workshop that stops mid-run loses nothing that was done.

Each call opens its own short-lived connection: they are cheap for SQLite, safe
from any thread (the Workshop calls in through ``asyncio.to_thread``), and leave
no handle to close. The file and its directory are created on the first write;
reading a database that does not exist yet finds no runs. One Workshop per
database file: a Workshop that opens it marks runs it finds still running as
interrupted (their Workshop is gone).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CaseResult", "EvalStore", "Run"]

RUNNING, FINISHED, INTERRUPTED = "running", "finished", "interrupted"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    suite_name  TEXT NOT NULL,
    suite_json  TEXT NOT NULL,
    source      TEXT NOT NULL,
    target      TEXT NOT NULL,
    worker_type TEXT NOT NULL,
    tier        TEXT NOT NULL DEFAULT '',
    timeout_s   REAL NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    state       TEXT NOT NULL,
    note        TEXT NOT NULL DEFAULT '',
    total       INTEGER NOT NULL,
    done        INTEGER NOT NULL DEFAULT 0,
    passed      INTEGER NOT NULL DEFAULT 0,
    score       REAL
);
CREATE TABLE IF NOT EXISTS case_results (
    run_id        INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    name          TEXT NOT NULL,
    match         TEXT NOT NULL,
    input_json    TEXT NOT NULL,
    expected_json TEXT NOT NULL,
    output_json   TEXT,
    checks_json   TEXT NOT NULL DEFAULT '[]',
    score         REAL NOT NULL,
    error         TEXT NOT NULL DEFAULT '',
    task_id       TEXT NOT NULL DEFAULT '',
    latency_s     REAL,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    finished_at   REAL NOT NULL,
    PRIMARY KEY (run_id, idx)
);
"""


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=repr)


@dataclass(frozen=True)
class Run:
    """One evaluation run as stored; ``score`` is the mean over the cases done so far."""

    id: int
    suite_name: str
    suite_json: str
    source: str
    target: str
    worker_type: str
    tier: str
    timeout_s: float
    started_at: float
    finished_at: float | None
    state: str
    note: str
    total: int
    done: int
    passed: int
    score: float | None

    @property
    def running(self) -> bool:
        """Still sending cases."""
        return self.state == RUNNING

    @property
    def suite(self) -> dict[str, Any]:
        """The suite this run used, as it was then."""
        data = json.loads(self.suite_json)
        return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class CaseResult:
    """One case's outcome. ``output`` is None when the task gave none (failed, timed out)."""

    index: int
    name: str
    match: str
    input: Any
    expected: Any
    output: Any
    checks: list[dict[str, Any]]
    score: float
    error: str = ""
    task_id: str = ""
    latency_s: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finished_at: float = 0.0

    @property
    def passed(self) -> bool:
        """A case passes at score 1."""
        return self.score >= 1.0


class EvalStore:
    """Runs and case results in one SQLite file.

    Args:
        path: The database file (created with its directory on the first write).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ready = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<EvalStore {self.path}>"

    def _prepare(self) -> None:
        # Once per store, under a lock: a second sweep racing the first could mark a run
        # this Workshop has just started as interrupted.
        with self._lock:
            if self._ready:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10)
            try:
                db.execute("PRAGMA journal_mode = WAL")  # the pages read while a run writes
                db.executescript(_SCHEMA)
                # Runs left "running" belong to a Workshop that is gone (one Workshop per file).
                db.execute("UPDATE runs SET state = ?, note = ? WHERE state = ?",
                           (INTERRUPTED, "interrupted: its Workshop stopped before the run finished", RUNNING))
                db.commit()
            finally:
                db.close()
            self._ready = True

    @contextlib.contextmanager
    def _db(self, write: bool) -> Iterator[sqlite3.Connection | None]:
        if not write and not self._ready and not self.path.exists():
            yield None  # nothing stored yet; reading creates nothing
            return
        self._prepare()
        db = sqlite3.connect(self.path, timeout=10)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys = ON")
            with db:  # one transaction, committed on success
                yield db
        finally:
            db.close()

    def create_run(self, *, suite_name: str, suite_json: str, source: str, target: str, worker_type: str,
                   tier: str, timeout_s: float, total: int) -> int:
        """Store a new running run; returns its id."""
        with self._db(write=True) as db:
            assert db is not None
            cur = db.execute(
                "INSERT INTO runs (suite_name, suite_json, source, target, worker_type, tier, timeout_s, "
                "started_at, state, total) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (suite_name, suite_json, source, target, worker_type, tier, timeout_s, time.time(), RUNNING, total),
            )
            return int(cur.lastrowid or 0)

    def add_case(self, run_id: int, case: CaseResult) -> None:
        """Store one finished case and bring the run's progress and score up to date."""
        with self._db(write=True) as db:
            assert db is not None
            db.execute(
                "INSERT OR REPLACE INTO case_results (run_id, idx, name, match, input_json, expected_json, "
                "output_json, checks_json, score, error, task_id, latency_s, input_tokens, output_tokens, "
                "finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, case.index, case.name, case.match, _dump(case.input), _dump(case.expected),
                 None if case.output is None else _dump(case.output), _dump(case.checks), case.score,
                 case.error, case.task_id, case.latency_s, case.input_tokens, case.output_tokens,
                 case.finished_at or time.time()),
            )
            db.execute(
                "UPDATE runs SET done = (SELECT COUNT(*) FROM case_results WHERE run_id = :id), "
                "passed = (SELECT COUNT(*) FROM case_results WHERE run_id = :id AND score >= 1.0), "
                "score = (SELECT AVG(score) FROM case_results WHERE run_id = :id) WHERE id = :id",
                {"id": run_id},
            )

    def finish_run(self, run_id: int, state: str, note: str = "") -> None:
        """Mark a run finished or interrupted (its score stays the mean of the cases done)."""
        with self._db(write=True) as db:
            assert db is not None
            db.execute("UPDATE runs SET state = ?, note = ?, finished_at = ? WHERE id = ?",
                       (state, note, time.time(), run_id))

    def run(self, run_id: int) -> Run | None:
        """One run, or None."""
        with self._db(write=False) as db:
            if db is None:
                return None
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            return None if row is None else Run(**dict(row))

    def runs(self, limit: int = 200) -> list[Run]:
        """The newest runs first."""
        with self._db(write=False) as db:
            if db is None:
                return []
            rows = db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            return [Run(**dict(r)) for r in rows]

    def cases(self, run_id: int) -> list[CaseResult]:
        """A run's finished cases, in suite order."""
        with self._db(write=False) as db:
            if db is None:
                return []
            rows = db.execute("SELECT * FROM case_results WHERE run_id = ? ORDER BY idx", (run_id,)).fetchall()
        return [
            CaseResult(
                index=r["idx"], name=r["name"], match=r["match"], input=json.loads(r["input_json"]),
                expected=json.loads(r["expected_json"]),
                output=None if r["output_json"] is None else json.loads(r["output_json"]),
                checks=json.loads(r["checks_json"]), score=r["score"], error=r["error"], task_id=r["task_id"],
                latency_s=r["latency_s"], input_tokens=r["input_tokens"], output_tokens=r["output_tokens"],
                finished_at=r["finished_at"],
            )
            for r in rows
        ]
