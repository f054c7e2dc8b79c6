"""``heddle worker --config`` / ``WORKER_CONFIG`` + ``MODEL_TIER``: real processes, fake providers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

import heddle
from heddle.settings import LLM_ENV
from tests.conftest import ROOT, wait_for
from tests.fake_providers import FakeProvider, Reply
from tests.test_llm_worker import write_config


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any model backend variables, plus ``extra``."""
    drop = {*LLM_ENV.values(), "WORKER_CONFIG", "MODEL_TIER"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "COLUMNS": "200", **extra}


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heddle", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def serve_one_task(args: list[str], env: dict[str, str], servers, name: str, tmp_path) -> tuple[str, str]:
    """Start ``heddle worker`` with ``args``, send it one task, stop it; return (result label, log)."""
    log = tmp_path / f"{name}.log"
    env = {**env, "NATS_URL": servers.nats_url, "VALKEY_URL": servers.valkey_url}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "heddle", "worker", *args], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        def started() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{log.read_text()}")
            return " consuming " in log.read_text()

        wait_for(started, 30, "the LLM worker to start")
        client = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", nats_url=servers.nats_url, valkey_url=servers.valkey_url)
        result = client.send_task(name, {"text": "I love it"}).get(timeout=30)
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()
    return result["label"], log.read_text()


def test_heddle_worker_with_config_and_tier_serves_a_yaml_worker_on_anthropic(tmp_path, heddle_servers):
    path, name = write_config(tmp_path)
    with FakeProvider("anthropic", api_key="sk-cli") as p:
        p.add(Reply(text='{"label": "positive"}'))
        env = clean_env(ANTHROPIC_API_KEY="sk-cli", ANTHROPIC_BASE_URL=p.url, HEDDLE_STANDARD_MODEL="claude-x")
        label, log = serve_one_task(["--config", str(path), "--tier", "standard"], env, heddle_servers, name,
                                    tmp_path)
        assert p.violations == [] and p.requests[0].body["model"] == "claude-x"
    assert label == "positive"
    assert f"heddle.tasks.{name}.standard" in log
    assert f"durable consumer heddle-{name}-standard" in log
    assert f"claude-x via anthropic at {p.url}/v1/messages" in log


def test_a_yaml_workers_start_up_lines_show_the_retries_and_timeout_of_its_yaml(tmp_path, heddle_servers):
    path, name = write_config(tmp_path, retries=3, timeout_seconds=45)
    with FakeProvider("anthropic", api_key="sk-cli") as p:
        p.add(Reply(text='{"label": "positive"}'))
        env = clean_env(ANTHROPIC_API_KEY="sk-cli", ANTHROPIC_BASE_URL=p.url, HEDDLE_STANDARD_MODEL="claude-x")
        label, log = serve_one_task(["--config", str(path), "--tier", "standard"], env, heddle_servers, name,
                                    tmp_path)
    assert label == "positive"
    assert "retries 3 per model request" in log and "timeout 45s per model request" in log, log
    # The task table's row says the same, not the task-level 0 and "-" (#21 item 13).
    row = next(line for line in log.splitlines() if f"{name} " in line and "heddle.tasks." in line)
    assert "3 per request" in row and "45s per request" in row, row


def test_worker_config_and_model_tier_from_the_environment_start_a_yaml_worker(tmp_path, heddle_servers):
    path, name = write_config(tmp_path, default_model_tier="standard")
    with FakeProvider("ollama") as p:
        p.add(Reply(text='{"label": "neutral"}'))
        env = clean_env(WORKER_CONFIG=str(path), MODEL_TIER="local", OLLAMA_URL=p.url, OLLAMA_MODEL="qwen3:0.6b")
        label, log = serve_one_task(["--quiet"], env, heddle_servers, name, tmp_path)
        assert p.requests[0].body["model"] == "qwen3:0.6b"
    assert label == "neutral"
    assert f"consuming heddle.tasks.{name}.local" in log


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--tier", "local"], {}, "the local tier has no backend: set LM_STUDIO_URL and LM_STUDIO_MODEL"),
        (["--tier", "local"], {"LM_STUDIO_URL": "http://127.0.0.1:1", "LM_STUDIO_MODEL": "m",
                               "OLLAMA_URL": "http://127.0.0.1:2", "OLLAMA_MODEL": "m"},
         "set HEDDLE_LOCAL_BACKEND=lmstudio or HEDDLE_LOCAL_BACKEND=ollama"),
        (["--tier", "frontier"], {"ANTHROPIC_API_KEY": "k"}, "FRONTIER_MODEL is not set"),
        ([], {"MODEL_TIER": "gpu"}, "MODEL_TIER='gpu' is not a tier"),
        (["-A", "tests.apps.crashy"], {}, "give either -A module (Python tasks) or --config FILE"),
    ],
    ids=["local-unset", "local-ambiguous", "frontier-no-model", "bad-model-tier", "both-sources"],
)
def test_a_yaml_worker_that_cannot_start_says_which_variable_to_set(tmp_path, args, env, message):
    path, _ = write_config(tmp_path)
    out = run_cli("worker", "--config", str(path), *args, "--skip-preflight", env=clean_env(**env))
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in " ".join(out.stderr.split())


def test_an_invalid_config_stops_the_worker_with_every_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nsystem_prompt: hi\ninput_schema: {type: object}\noutput_schema: {type: list}\nretries: -2\n"
    )
    out = run_cli("worker", "--config", str(bad), "--skip-preflight", env=clean_env())
    assert out.returncode == 2
    text = " ".join(out.stderr.split())
    assert f"{bad}:4: output_schema" in text and f"{bad}:5: retries: must be from 0 to 10" in text


def test_a_worker_needs_an_app_or_a_config(tmp_path):
    out = run_cli("worker", "--skip-preflight", env=clean_env())
    assert out.returncode == 2
    assert "give -A module[:attribute] (Python tasks) or --config FILE" in " ".join(out.stderr.split())


def test_heddle_devs_llm_worker_lines_show_the_retries_and_timeout_of_each_yaml(tmp_path, monkeypatch):
    import argparse

    from heddle.cli.llm import DevLLM

    for var in (*LLM_ENV.values(), "WORKER_CONFIG", "MODEL_TIER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-dev")
    one, name_one = write_config(tmp_path, retries=4, timeout_seconds=12.5)
    two, name_two = write_config(tmp_path, retries=0, timeout_seconds=90)
    args = argparse.Namespace(config=[str(one), str(two)], tier="standard", local_model=False, concurrency=1, grace=1.0)
    said: list[str] = []
    with DevLLM(args, said.append) as llm:
        main, hosted = llm.split(args, None)
        try:
            assert main.name == name_one and len(hosted) == 1
        finally:
            for app in llm.apps:
                app.close()
    assert f"  llm worker {name_one} on heddle.tasks.{name_one}.standard (4 retries and a 12.5s timeout per model " \
           "request)" in said
    assert f"  llm worker {name_two} on heddle.tasks.{name_two}.standard (0 retries and a 90s timeout per model " \
           "request)" in said


def test_a_yaml_worker_on_a_model_without_structured_outputs_says_so_at_start_and_still_answers(
    tmp_path, heddle_servers
):
    path, name = write_config(tmp_path)
    with FakeProvider("anthropic", api_key="sk-cli", refuse_schema=True) as p:
        p.add(Reply(text='{"label": "positive"}'))
        env = clean_env(ANTHROPIC_API_KEY="sk-cli", ANTHROPIC_BASE_URL=p.url,
                        HEDDLE_STANDARD_MODEL="claude-3-7-sonnet-20250219")
        label, log = serve_one_task(["--config", str(path), "--tier", "standard"], env, heddle_servers, name,
                                    tmp_path)
        assert p.refusals == 0 and "output_config" not in p.requests[0].body
    assert label == "positive"
    said = " ".join(log.split())
    assert f"{name}: tier standard (anthropic, model claude-3-7-sonnet-20250219) cannot take the output schema " \
           "in output_config: model claude-3-7-sonnet-20250219 predates structured outputs" in said, log
    assert said.index("cannot take the output schema") < said.index(" consuming ")
