"""The Workshop's Evaluate page: suites, scoring, runs through real workers, the SQLite store, compare."""

from __future__ import annotations

import contextlib
import html
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from heddle import Heddle
from heddle.llm import worker_app
from heddle.llm.config import load_worker_config
from heddle.testing import EmbeddedServers, running_worker
from heddle.workshop import Workshop
from heddle.workshop.evalstore import EvalStore
from heddle.workshop.evalsuite import (
    failed_score,
    find_suites,
    input_issues,
    lookup,
    parse_suite,
    same,
    score_output,
)
from heddle.workshop.web import CSP
from tests.conftest import wait_for
from tests.fake_providers import FakeProvider, settings_for
from tests.workshop_support import ROOT, XSS, post, running_workshop, shop, task_name

__all__ = ["shop"]  # a fixture, imported for pytest

ESCAPED_XSS = "&lt;script&gt;window.__heddle_xss = 1&lt;/script&gt;"


# -- helpers -----------------------------------------------------------------------------------------


def gated_app(servers: EmbeddedServers, gate: threading.Event) -> Heddle:
    """An app whose ``hold`` task returns its argument, except "wait", which first waits for the gate."""
    app = Heddle(f"g{uuid.uuid4().hex[:10]}", nats_url=servers.nats_url, valkey_url=servers.valkey_url)

    @app.task
    def hold(value: Any) -> Any:
        if value == "wait":
            gate.wait(60)
        return value

    return app


@contextlib.contextmanager
def evaluating(servers: EmbeddedServers, db: Path) -> Iterator[tuple[Workshop, httpx.Client]]:
    """A Workshop keeping its runs in ``db``, and a client for it."""
    with running_workshop(servers, eval_db=db) as ws, httpx.Client(base_url=ws.url, timeout=10) as client:
        yield ws, client


def offered(client: httpx.Client, app: Heddle, short: str) -> None:
    key = f"task:{app.name}:{task_name(app, short)}"
    wait_for(lambda: html.escape(key) in client.get("/evaluate").text, 10, f"{short} to be offered")


def start(client: httpx.Client, ws: Workshop, suite: dict[str, Any] | str, **form: str) -> int:
    text = suite if isinstance(suite, str) else json.dumps(suite)
    r = post(client, ws, "/evaluate/runs", {"suite": "", "suite_json": text, "timeout_s": "20", **form})
    assert r.status_code == 303, r.text
    return int(r.headers["location"].rsplit("/", 1)[1])


def aimed(suite: dict[str, Any], app: Heddle) -> dict[str, Any]:
    """``suite`` aimed at ``app``'s own task by its full name: the session's servers may have
    other apps' workers with a task of the same short name alive (an ambiguous target is refused)."""
    return {**suite, "target": task_name(app, suite["target"])}


def finished(client: httpx.Client, run_id: int) -> str:
    wait_for(lambda: 'data-state="finished"' in client.get(f"/fragments/eval-run/{run_id}").text, 30,
             f"run {run_id} to finish")
    return client.get(f"/evaluate/runs/{run_id}").text


def row(page: str, case: str) -> str:
    """The table row of one case (rows carry data-case)."""
    return page.split(f'data-case="{html.escape(case)}"', 1)[1].split("</tr>", 1)[0]


SUMS = {"name": "sums", "target": "add", "match": "exact", "cases": [
    {"name": "two and three", "input": [2, 3], "expected": 5},
    {"name": "keywords", "input": {"x": 1, "y": 2}, "expected": 3},
    {"name": "deliberately wrong", "input": [2, 2], "expected": 5},
]}


# -- scoring -------------------------------------------------------------------------------------------


def test_field_match_scores_the_share_of_expected_fields_that_match() -> None:
    s = score_output("field", {"label": "negative", "score": 1}, {"label": "negative", "score": 2, "extra": 0})
    assert s.value == 0.5 and not s.passed
    assert [(c.field, c.ok, c.got) for c in s.checks] == [("label", True, "negative"), ("score", False, 2)]
    assert score_output("field", {"label": "negative"}, {"label": "negative", "other": 1}).passed


def test_dotted_paths_reach_into_nested_objects_and_lists() -> None:
    output = {"address": {"city": "Paris", "zip": "75001"}, "people": ["Ada", "Grace"], "a.b": 7}
    s = score_output("field", {"address.city": "Paris", "people.1": "Grace", "people.5": "x", "a.b": 7}, output)
    assert [c.ok for c in s.checks] == [True, True, False, True]
    assert s.value == 0.75
    assert lookup(output, "address.zip") == (True, "75001")
    assert lookup(output, "address.city.name") == (False, None)
    assert lookup(output, "a.b") == (True, 7)  # a key that exists as written wins


def test_exact_match_is_all_or_nothing_and_booleans_are_not_numbers() -> None:
    assert score_output("exact", {"a": [1, 2]}, {"a": [1, 2]}).value == 1.0
    assert score_output("exact", {"a": [1, 2]}, {"a": [1, 2], "b": 0}).value == 0.0
    assert score_output("exact", 5, 5.0).passed  # JSON numbers
    assert not same(True, 1) and not same(0, False) and same(True, True)
    assert not same("1", 1) and same(None, None) and not same([1], (1, 2))


def test_missing_fields_and_outputs_that_are_not_objects_do_not_match() -> None:
    s = score_output("field", {"label": "x", "confidence": 1}, {"confidence": 1})
    assert s.value == 0.5
    assert [(c.field, c.found) for c in s.checks] == [("label", False), ("confidence", True)]
    assert score_output("field", {"label": "x"}, "just a string").value == 0.0
    assert score_output("field", {"label": None}, {}).value == 0.0  # missing is not null


def test_a_failed_task_scores_zero_with_every_field_unmatched() -> None:
    s = failed_score("field", {"a": 1, "b.c": 2})
    assert s.value == 0.0 and [(c.field, c.ok, c.found) for c in s.checks] == [("a", False, False),
                                                                                 ("b.c", False, False)]
    assert failed_score("exact", 5).value == 0.0


# -- suites --------------------------------------------------------------------------------------------


def test_a_broken_suite_reports_every_problem_with_its_place() -> None:
    text = json.dumps({
        "name": "",
        "match": "fuzzy",
        "case": [],
        "cases": [
            {"name": "no input", "expected": {"label": "x"}},
            {"name": "scalar expected", "input": {"text": "a"}, "expected": "negative"},
            {"name": "no input", "input": {"text": "b"}, "expected": {"label": "y"}},
            {"name": "typo", "input": [1], "expect": {"label": "z"}},
            {"input": "text", "expected": {"a..b": 1}},
            7,
        ],
    })
    suite, issues = parse_suite(text, "evals/broken.json")
    assert suite is None
    said = "\n".join(map(str, issues))
    expected = [
        "evals/broken.json: name: required",
        "evals/broken.json: match: must be one of 'field', 'exact', not 'fuzzy'",
        "evals/broken.json: case: unknown key 'case' (did you mean 'cases'?)",
        'cases[0] "no input".input: required',
        'cases[1] "scalar expected".expected: with match "field" this is a non-empty object',
        'cases[2] "no input": the same name as cases[0]',
        "cases[3] \"typo\".expect: unknown key 'expect' (did you mean 'expected'?)",
        'cases[3] "typo".expected: required',
        'cases[4] "case 5".input: must be an object',
        "cases[4] \"case 5\".expected: field path 'a..b' has an empty part",
        "cases[5]: a case is an object",
    ]
    for part in expected:
        assert part in said, f"{part!r} missing from:\n{said}"
    assert len(issues) == len(expected), said


def test_bad_json_is_reported_with_its_line_and_column_and_duplicate_keys_are_caught() -> None:
    suite, issues = parse_suite('{\n  "name": "x",\n  "cases": [\n    {"input": [1] "expected": 1}\n  ]\n}', "s.json")
    assert suite is None and len(issues) == 1
    assert str(issues[0]) == "s.json:4: invalid JSON at column 19: Expecting ',' delimiter"
    _, issues = parse_suite('{"name": "x", "cases": [{"input": {"text": "a", "text": "b"}, "expected": {"y": 1}}]}')
    assert [str(i) for i in issues] == [
        "pasted suite: cases[0].input: duplicate key 'text' (JSON would keep only the last one); keep one"
    ]
    assert parse_suite("", "s.json")[1][0].message.startswith("empty")
    assert "not a list" in str(parse_suite("[]", "s.json")[1][0])


def test_the_shipped_suites_are_valid_for_their_workers() -> None:
    found = find_suites([ROOT / "configs"])
    assert {f.path.name for f in found} >= {"classifier-sentiment.json", "extractor-entities.json"}
    for f in found:
        assert f.suite is not None and not f.issues, f.issues
        cfg = load_worker_config(ROOT / "configs" / "workers" / f"{f.suite.target}.yaml")
        assert input_issues(f.suite, cfg.name, cfg.input_validator().errors) == []


def test_a_yaml_workers_inputs_are_checked_against_its_input_schema() -> None:
    cfg = load_worker_config(ROOT / "configs" / "workers" / "classifier.yaml")
    suite, _ = parse_suite(json.dumps({"name": "s", "cases": [
        {"name": "empty", "input": {"text": ""}, "expected": {"label": "x"}},
        {"name": "a list", "input": ["text"], "expected": {"label": "x"}},
        {"name": "fine", "input": {"text": "ok"}, "expected": {"label": "x"}},
    ]}))
    assert suite is not None
    said = [str(i) for i in input_issues(suite, "classifier", cfg.input_validator().errors)]
    assert said == [
        'pasted suite: cases[0] "empty".input: does not fit classifier\'s input_schema: '
        "$.text: is 0 characters, shorter than minLength 1",
        'pasted suite: cases[1] "a list".input: the YAML worker classifier takes one input object, not a list',
    ]
    assert input_issues(suite, "add", None) == []  # a Python task takes a list or an object


def test_runs_left_running_by_a_workshop_that_is_gone_are_marked_interrupted(tmp_path: Path) -> None:
    db = tmp_path / "deep" / "evals.sqlite3"
    store = EvalStore(db)
    assert store.runs() == [] and not db.exists()  # reading creates nothing
    run_id = store.create_run(suite_name="s", suite_json="{}", source="x", target="t", worker_type="w", tier="",
                              timeout_s=5, total=2)
    assert store.run(run_id).state == "running"  # type: ignore[union-attr]
    (again,) = EvalStore(db).runs()
    assert again.state == "interrupted" and "Workshop stopped" in again.note


# -- pages, against real servers and workers ----------------------------------------------------------------


def test_a_python_task_suite_runs_through_a_real_worker_and_is_kept_across_restarts(
    heddle_servers: EmbeddedServers, shop: Heddle, tmp_path: Path
) -> None:
    db = tmp_path / "evals.sqlite3"
    with evaluating(heddle_servers, db) as (ws, client):
        offered(client, shop, "add")
        run_id = start(client, ws, aimed(SUMS, shop))
        page = finished(client, run_id)
        assert "3 of 3 cases done" in page and "2 of 3 passed" in page and ">0.67<" in page
        assert "case-pass" in row(page, "two and three") and "case-fail" in row(page, "deliberately wrong")
        failed = start(client, ws, aimed({"name": "errors", "target": "boom", "cases": [
            {"name": "explodes", "input": ["x"], "expected": {"ok": True}}]}, shop))
        page = finished(client, failed)
        assert "builtins.ValueError: bad input x" in row(page, "explodes") and "✗ ok: missing" in page
    store = EvalStore(db)
    run = store.run(run_id)
    assert run is not None
    assert (run.state, run.done, run.passed, run.total) == ("finished", 3, 2, 3)
    assert run.score == pytest.approx(2 / 3) and run.target == task_name(shop, "add") and run.finished_at
    cases = store.cases(run_id)
    assert [(c.name, c.output, c.score) for c in cases] == [
        ("two and three", 5, 1.0), ("keywords", 3, 1.0), ("deliberately wrong", 4, 0.0)]
    assert all(c.task_id and c.latency_s and c.latency_s > 0 and not c.error for c in cases)
    (boom,) = store.cases(failed)
    assert boom.score == 0 and boom.output is None and boom.error.startswith("builtins.ValueError")

    with evaluating(heddle_servers, db) as (_, client):
        listing = client.get("/evaluate").text
        assert f'href="/evaluate/runs/{run_id}"' in listing and f'href="/evaluate/runs/{failed}"' in listing
        page = client.get(f"/evaluate/runs/{run_id}").text
        assert "3 of 3 cases done" in page and "deliberately wrong" in page and "data-watch-eval" not in page


def test_a_yaml_llm_worker_suite_runs_through_a_fake_provider(heddle_servers: EmbeddedServers, tmp_path: Path) -> None:
    with FakeProvider("openai") as provider:
        tier, llm = settings_for(provider, model="fake-8b")
        app = worker_app(ROOT / "configs" / "workers" / "classifier.yaml", tier, llm_settings=llm,
                         nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url)
        for label in ("negative", "negative", "positive"):
            provider.add(provider.reply_json({"label": label}, input_tokens=30, output_tokens=4))
        suite = {"name": "sentiment", "target": "classifier", "cases": [
            {"name": f"complaint {i}", "input": {"text": f"The food was cold ({i})."},
             "expected": {"label": "negative"}} for i in range(3)]}
        with running_worker(app), evaluating(heddle_servers, tmp_path / "e.sqlite3") as (ws, client):
            wait_for(lambda: ws.registry is not None and any(
                w.worker_type == "classifier" for w in ws.registry.workers()), 10, "the classifier to be live")
            bad = {**suite, "cases": [{"name": "empty", "input": {"text": ""}, "expected": {"label": "x"}},
                                      {"name": "typo", "input": {"txt": "a"}, "expected": {"label": "x"}}]}
            r = post(client, ws, "/evaluate/runs", {"suite_json": json.dumps(bad), "tier": tier})
            assert r.status_code == 422
            assert "shorter than minLength 1" in r.text and "unexpected property &#39;txt&#39;" in r.text
            assert provider.requests == []  # nothing was sent
            run_id = start(client, ws, suite, tier=tier)
            page = finished(client, run_id)
        assert provider.violations == []
    assert "2 of 3 passed" in page and "✗ label: got &#34;positive&#34;" in page and "30 / 4" in page
    store = EvalStore(tmp_path / "e.sqlite3")
    cases = store.cases(run_id)
    assert sorted(c.score for c in cases) == [0.0, 1.0, 1.0]
    assert all((c.input_tokens, c.output_tokens) == (30, 4) for c in cases)
    assert store.run(run_id).tier == tier  # type: ignore[union-attr]


def test_the_compare_page_shows_both_runs_and_marks_improved_and_regressed_cases(
    heddle_servers: EmbeddedServers, shop: Heddle, tmp_path: Path
) -> None:
    before = {"name": "sums", "target": "add", "match": "exact", "cases": [
        {"name": "fixed", "input": [2, 2], "expected": 5},
        {"name": "broken", "input": [1, 2], "expected": 3},
        {"name": "steady", "input": [0, 0], "expected": 0},
        {"name": "dropped", "input": [1, 1], "expected": 3},
    ]}
    after = {**before, "cases": [
        {"name": "fixed", "input": [2, 2], "expected": 4},
        {"name": "broken", "input": [1, 2], "expected": 4},
        {"name": "steady", "input": [0, 0], "expected": 0},
        {"name": "added", "input": [5, 5], "expected": 10},
    ]}
    with evaluating(heddle_servers, tmp_path / "e.sqlite3") as (ws, client):
        offered(client, shop, "add")
        a = start(client, ws, aimed(before, shop))
        b = start(client, ws, aimed(after, shop))
        finished(client, a)
        finished(client, b)
        listing = client.get("/evaluate").text
        assert f'name="a" value="{a}"' in listing and f'name="b" value="{b}"' in listing
        page = client.get("/evaluate/compare", params={"a": a, "b": b}).text
        assert f"Run #{a} (A) against run #{b} (B)" in page
        assert "improved" in row(page, "fixed") and "regressed" in row(page, "broken")
        assert "same" in row(page, "steady")
        assert "only in A" in row(page, "dropped") and "only in B" in row(page, "added")
        assert "+0.25" in page and "1 improved, 1 regressed, 1 the same" in page  # 0.50 -> 0.75
        assert "different suites" in page
        assert client.get("/evaluate/compare", params={"a": a}).status_code == 422
        assert client.get("/evaluate/compare", params={"a": a, "b": 999_999}).status_code == 404


def test_a_run_that_times_out_scores_zero_with_its_error_and_a_stopped_workshop_interrupts_the_run(
    heddle_servers: EmbeddedServers, tmp_path: Path
) -> None:
    gate = threading.Event()
    app = gated_app(heddle_servers, gate)
    db = tmp_path / "e.sqlite3"
    suite = {"name": "gated", "target": "hold", "match": "exact", "cases": [
        {"name": "one", "input": [1], "expected": 1},
        {"name": "two", "input": [2], "expected": 2},
        {"name": "waits", "input": ["wait"], "expected": "wait"},
    ]}
    try:
        with running_worker(app):
            with evaluating(heddle_servers, db) as (ws, client):
                offered(client, app, "hold")
                timed = start(client, ws, suite, timeout_s="1")
                page = finished(client, timed)
                assert "no result within 1 s (the task was revoked)" in row(page, "waits")
                assert "2 of 3 passed" in page
                interrupted = start(client, ws, suite)
                wait_for(lambda: "2 of 3 cases done" in client.get(f"/fragments/eval-run/{interrupted}").text,
                         20, "two cases done")
            # The Workshop stopped with one case still waiting.
            run = EvalStore(db).run(interrupted)
            assert run is not None and (run.state, run.done, run.passed) == ("interrupted", 2, 2)
            with evaluating(heddle_servers, db) as (_, client):
                page = client.get(f"/evaluate/runs/{interrupted}").text
                assert "interrupted" in page and "2 of 3 cases done" in page and "not run" in row(page, "waits")
            gate.set()
    finally:
        gate.set()
        app.close()


def test_bad_suites_unknown_targets_and_bad_options_are_all_reported_and_nothing_is_created(
    heddle_servers: EmbeddedServers, shop: Heddle, tmp_path: Path
) -> None:
    db = tmp_path / "e.sqlite3"
    with evaluating(heddle_servers, db) as (ws, client):
        r = post(client, ws, "/evaluate/runs", {"suite_json": '{"name": "x", "cases": [}'})
        assert r.status_code == 422 and "pasted suite:1: invalid JSON at column 25" in r.text
        assert '{"name": "x", "cases": [}</textarea>' in html.unescape(r.text)  # kept for fixing
        r = post(client, ws, "/evaluate/runs", {"suite_json": json.dumps({**SUMS, "target": "nope"}),
                                                "tier": "huge", "timeout_s": "-1"})
        assert r.status_code == 422
        assert "no live worker offers task &#39;nope&#39;: start one with heddle-worker -A" in r.text
        assert "tier must be one of" in r.text and "the timeout is seconds per case" in r.text
        r = post(client, ws, "/evaluate/runs", {"suite_json": json.dumps({**SUMS, "target": "summarizer"})})
        assert r.status_code == 422 and "no live worker of type summarizer" in r.text
        r = post(client, ws, "/evaluate/runs", {"suite_json": json.dumps({k: v for k, v in SUMS.items()
                                                                          if k != "target"})})
        assert r.status_code == 422 and "names no &#34;target&#34;" in r.text
        r = post(client, ws, "/evaluate/runs", {"suite": "/etc/passwd"})
        assert r.status_code == 422 and "choose a suite file found under" in r.text
        assert client.get("/evaluate/runs/12345").status_code == 404
    assert not db.exists()


def test_starting_a_run_needs_the_csrf_token_and_the_same_origin(
    heddle_servers: EmbeddedServers, shop: Heddle, tmp_path: Path
) -> None:
    db = tmp_path / "e.sqlite3"
    data = {"suite_json": json.dumps(SUMS)}
    with evaluating(heddle_servers, db) as (ws, client):
        assert client.post("/evaluate/runs", data=data).status_code == 403
        assert client.post("/evaluate/runs", data={**data, "csrf_token": "forged"}).status_code == 403
        r = client.post("/evaluate/runs", data={**data, "csrf_token": ws.csrf_token},
                        headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-origin" in r.text
    assert not db.exists()


def test_markup_in_suites_inputs_and_outputs_renders_as_text(
    heddle_servers: EmbeddedServers, shop: Heddle, tmp_path: Path
) -> None:
    suite = {"name": XSS, "target": "echo", "match": "exact", "cases": [
        {"name": XSS, "input": [XSS], "expected": XSS},
        {"name": "wrong", "input": [XSS], "expected": {"x": XSS}},
    ]}
    with evaluating(heddle_servers, tmp_path / "e.sqlite3") as (ws, client):
        offered(client, shop, "echo")
        run_id = start(client, ws, suite)
        pages = [finished(client, run_id), client.get(f"/fragments/eval-run/{run_id}").text,
                 client.get("/evaluate").text,
                 client.get("/evaluate/compare", params={"a": run_id, "b": run_id}).text]
        r = post(client, ws, "/evaluate/runs", {"suite_json": json.dumps({**suite, "target": XSS})})
        pages.append(r.text)
    for page in pages:
        assert XSS not in page
        assert ESCAPED_XSS in page


def test_every_evaluate_page_sends_the_content_security_policy(
    heddle_servers: EmbeddedServers, shop: Heddle, tmp_path: Path
) -> None:
    with evaluating(heddle_servers, tmp_path / "e.sqlite3") as (ws, client):
        offered(client, shop, "add")
        run_id = start(client, ws, aimed(SUMS, shop))
        finished(client, run_id)
        for path in ("/evaluate", f"/evaluate/runs/{run_id}", f"/fragments/eval-run/{run_id}",
                     f"/evaluate/compare?a={run_id}&b={run_id}", "/static/evaluate.css"):
            r = client.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-security-policy"] == CSP
            assert r.headers["x-frame-options"] == "DENY"
            if r.headers["content-type"].startswith("text/html"):
                assert "<script>" not in r.text and "style=" not in r.text and "<style" not in r.text
        assert 'href="/static/evaluate.css"' in client.get("/evaluate").text


def test_unreachable_servers_get_a_clear_answer_and_nothing_is_created(
    fresh_servers: EmbeddedServers, tmp_path: Path
) -> None:
    from tests.workshop_support import make_app

    app = make_app(fresh_servers)
    db = tmp_path / "e.sqlite3"
    try:
        with running_worker(app), evaluating(fresh_servers, db) as (ws, client):
            offered(client, app, "add")
            fresh_servers.valkey.stop()
            try:
                r = post(client, ws, "/evaluate/runs", {"suite_json": json.dumps(SUMS)})
                assert r.status_code == 503 and "cannot reach the servers" in r.text and "valkey" in r.text.lower()
            finally:
                fresh_servers.valkey.start()
    finally:
        app.close()
    assert not db.exists()
