"""A settings file (HEDDLE_SETTINGS or settings_file=): what it sets, what overrides it, its errors (#20 item 1)."""

from __future__ import annotations

import asyncio
import os
import textwrap
import uuid
from pathlib import Path

import pytest

import heddle
from heddle.broker import Broker
from heddle.errors import ConfigError, ConfigFileError
from heddle.names import DLQ_STREAM, GOALS_STREAM, STREAMS_STREAM, TASKS_STREAM
from heddle.settings import Settings
from heddle.testing import EmbeddedServers
from heddle.testing.cluster import EmbeddedNatsCluster

_ENV = ("NATS_URL", "VALKEY_URL", "HEDDLE_STREAM_REPLICAS", "HEDDLE_SETTINGS", "NATS_USER", "NATS_PASSWORD",
        "HEDDLE_DIRECT_ROUTING", "VALKEY_SENTINELS")


@pytest.fixture(autouse=True)
def no_settings_in_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no heddle dev session file in sight


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"heddle-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_a_settings_file_sets_what_it_names_and_leaves_the_rest_at_their_defaults(tmp_path):
    path = _file(tmp_path, """
        nats_url: nats://10.0.0.1:4222,nats://10.0.0.2:4222
        stream_replicas: 3
        ack_wait_s: 60
        direct_routing: false
        valkey_sentinels: [10.0.0.5:26379, 10.0.0.6:26379]
        valkey_sentinel_master: heddle
        health_port: null
        nats_user: worker
        nats_password: s3cret-in-file
    """)
    s = Settings.load(settings_file=path)
    assert s.nats_url == "nats://10.0.0.1:4222,nats://10.0.0.2:4222"
    assert s.stream_replicas == 3
    assert s.ack_wait_s == 60.0
    assert s.direct_routing is False
    assert s.valkey_sentinels == ("10.0.0.5:26379", "10.0.0.6:26379")
    assert s.nats_auth.user == "worker" and s.nats_auth.password == "s3cret-in-file"
    assert s.max_deliver == Settings().max_deliver
    assert "s3cret-in-file" not in repr(s)


def test_heddle_settings_names_the_file_for_every_process(tmp_path, monkeypatch):
    monkeypatch.setenv("HEDDLE_SETTINGS", _file(tmp_path, "stream_replicas: 3\n"))
    assert heddle.Heddle("from-env").settings.stream_replicas == 3


def test_environment_variables_override_the_file_and_arguments_override_both(tmp_path, monkeypatch):
    path = _file(tmp_path, """
        stream_replicas: 3
        nats_url: nats://10.0.0.1:4222
        nats_user: from-file
        nats_password: file-password
    """)
    monkeypatch.setenv("HEDDLE_STREAM_REPLICAS", "2")
    monkeypatch.setenv("NATS_PASSWORD", "env-password")
    s = Settings.load(settings_file=path)
    assert s.stream_replicas == 2
    assert s.nats_auth.user == "from-file" and s.nats_auth.password == "env-password"
    assert s.nats_url == "nats://10.0.0.1:4222"
    assert Settings.load(settings_file=path, stream_replicas=1, nats_url="nats://127.0.0.1:1").stream_replicas == 1


def test_every_problem_in_a_settings_file_is_reported_with_its_line(tmp_path):
    path = _file(tmp_path, """
        stream_replica: 3
        ack_wait_s: soon
        direct_routing: maybe
        nats_password: 12345
        valkey_sentinels: 26379
        nats_url: [nats://worker:hunter2@10.0.0.1:4222]
    """)
    with pytest.raises(ConfigFileError) as err:
        Settings.load(settings_file=path)
    text = str(err.value)
    assert "6 error(s) in the settings file" in text, text
    assert f"{path}:2: unknown key 'stream_replica' (did you mean 'stream_replicas'?)" in text, text
    assert f"{path}:3: ack_wait_s must be a number" in text and "'soon'" in text, text
    assert f"{path}:4: direct_routing must be true or false" in text, text
    assert f"{path}:5: nats_password must be a string, got int" in text, text
    assert "12345" not in text  # a password's value is never shown, even a wrong one
    assert f"{path}:6: valkey_sentinels must be a list of strings" in text, text
    assert f"{path}:7: nats_url must be a string, got a list" in text, text
    assert "hunter2" not in text  # nor a password inside a URL of the wrong type


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("- stream_replicas\n", "a settings file is a mapping"),
        ("stream_replicas: [3\n", "invalid YAML"),
    ],
)
def test_a_settings_file_that_is_no_mapping_of_settings_says_so(tmp_path, text, said):
    with pytest.raises(ConfigFileError, match=said):
        Settings.load(settings_file=_file(tmp_path, text))


def test_a_missing_settings_file_names_its_path(tmp_path, monkeypatch):
    missing = str(tmp_path / "nowhere.yaml")
    monkeypatch.setenv("HEDDLE_SETTINGS", missing)
    with pytest.raises(ConfigFileError, match=r"nowhere\.yaml"):
        Settings.load()


def test_a_value_the_settings_refuse_is_refused_from_a_file_too(tmp_path):
    with pytest.raises(ConfigError, match="stream_replicas"):
        Settings.load(settings_file=_file(tmp_path, "stream_replicas: 9\n"))


def test_stream_replicas_from_a_settings_file_reach_every_stream_on_a_cluster(tmp_path):
    with EmbeddedNatsCluster(3) as cluster:
        path = _file(tmp_path, f"nats_url: {cluster.url}\nstream_replicas: 3\n")

        async def replicas() -> dict[str, int]:
            broker = Broker(Settings.load(settings_file=path))
            await broker.connect()
            try:
                await broker.ensure_streams()
                return {name: (await broker.stream_info(name)).config.num_replicas or 1
                        for name in (TASKS_STREAM, DLQ_STREAM, GOALS_STREAM, STREAMS_STREAM)}
            finally:
                await broker.close()

        assert asyncio.run(replicas()) == dict.fromkeys((TASKS_STREAM, DLQ_STREAM, GOALS_STREAM, STREAMS_STREAM), 3)


def test_a_worker_and_a_client_configured_by_the_file_alone_run_a_task(tmp_path, spawn_worker):
    with EmbeddedServers() as servers:
        path = _file(tmp_path, f"nats_url: {servers.nats_url}\nvalkey_url: {servers.valkey_url}\n")
        name = f"sf{uuid.uuid4().hex[:8]}"
        # No NATS_URL or VALKEY_URL anywhere: the worker finds its servers in the file.
        env = {"HEDDLE_SETTINGS": path, "HEDDLE_TEST_APP": name, "HEDDLE_TEST_LOG": str(tmp_path / "log"),
               "NATS_URL": "", "VALKEY_URL": ""}
        spawn_worker("tests.apps.crashy", env)
        os.environ["HEDDLE_SETTINGS"] = path
        try:
            client = heddle.Heddle(name)
            try:
                assert client.send_task("tests.apps.crashy.sleepy", (7, 0)).get(timeout=30) == 7
            finally:
                client.close()
        finally:
            del os.environ["HEDDLE_SETTINGS"]


def test_every_setting_can_come_from_a_settings_file(tmp_path):
    from dataclasses import fields

    from heddle.settings import AUTH_SETTINGS

    names = [f.name for f in fields(Settings) if f.name not in ("extra", "nats_auth", "valkey_auth")]
    text = "".join(f"{name}: {{}}\n" for name in [*names, *AUTH_SETTINGS])
    with pytest.raises(ConfigFileError) as err:  # every value is of the wrong type, so each key is checked
        Settings.load(settings_file=_file(tmp_path, text))
    assert "unknown key" not in str(err.value), str(err.value)
    assert f"{len(names) + len(AUTH_SETTINGS)} error(s)" in str(err.value)
