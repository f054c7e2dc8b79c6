"""Every way to log in to nats-server and valkey-server, against real servers that require it.

Each NATS mode (credentials in the URL, NATS_USER/NATS_PASSWORD, NATS_TOKEN, an
nkey seed file, a JWT .creds file, TLS with NATS_TLS_CA and tls:// URLs, mutual
TLS) and each Valkey mode (requirepass, an ACL user, TLS and mutual TLS) runs a
task end to end (client, router, worker) with the right secret; a wrong one
fails fast, says "authorization failed for nats://host:port", names the
variable to fix, and never prints the secret.

Test certificates come from the ``openssl`` command (the ``cryptography`` package
is not a dependency); nkeys, JWTs and .creds files are made here with ``nkeys``,
the library nats-py signs with, so no ``nsc`` is needed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nkeys
import pytest

import heddle
from heddle.broker import Broker
from heddle.errors import BackendError, BrokerError, ConfigError
from heddle.health import start_health_server
from heddle.settings import AUTH_SETTINGS, Settings
from heddle.store import ResultBackend
from heddle.testing import EmbeddedNats, EmbeddedValkey, running_worker
from heddle.testing.servers import TLSFiles
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl command makes the test certificates"
)

# Distinctive secrets: each must never appear in any message.
PASSWORD = "natsPw-3c1e7f2a"
TOKEN = "natsTok-8d4b2e6f"
VALKEY_PASSWORD = "valkeyPw-5a9d0c3b"
ACL_PASSWORD = "aclPw-71e4b8d2"
WRONG = "wrongSecret-6f2c9a1d"
SECRETS = (PASSWORD, TOKEN, VALKEY_PASSWORD, ACL_PASSWORD, WRONG)

ENV_VARS = ["NATS_URL", "VALKEY_URL", "HEDDLE_HEALTH_HOST", "HEDDLE_HEALTH_PORT",
            *(var for _, _, var in AUTH_SETTINGS.values())]


def assert_no_secret(text: str, where: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} printed in {where}:\n{text}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NATS_*, VALKEY_* or HEDDLE_HEALTH_* from the outer environment."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


# -- test certificates, nkeys, JWTs -------------------------------------------------------


def make_tls(directory: Path) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate it signed,
    plus another CA and a client certificate of its own (a stranger's). Returns name -> path."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    def key(name: str) -> None:
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", f"{name}.key")

    for ca in ("ca", "other-ca"):
        key(ca)
        openssl("req", "-x509", "-new", "-key", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                "-subj", f"/CN=heddle test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, ca, usage in (("server", "ca", "serverAuth"), ("client", "ca", "clientAuth"),
                            ("stranger", "other-ca", "clientAuth")):
        key(name)
        openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=heddle test {name}")
        (directory / f"{name}.ext").write_text(
            f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
        )
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {p.name: str(p) for p in directory.iterdir()}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_tls(tmp_path_factory.mktemp("tls"))


def new_nkey(prefix: int) -> tuple[bytes, str]:
    """A fresh nkey: (seed, public key)."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed)).public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def nats_jwt(issuer_seed: bytes, subject: str, name: str, claims: dict[str, Any]) -> str:
    """A NATS v2 JWT (the format nsc writes), signed with ``issuer_seed``."""
    kp = nkeys.from_seed(bytearray(issuer_seed))
    body: dict[str, Any] = {"iat": int(time.time()), "iss": kp.public_key.decode(), "name": name,
                            "sub": subject, "nats": {**claims, "version": 2}}
    body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()).decode()
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body).encode())
    return f"{head}.{payload}.{_b64(kp.sign(f'{head}.{payload}'.encode()))}"


_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
              "conn": -1, "leaf": -1}


def operator_mode() -> tuple[str, str]:
    """nats-server config for operator (JWT) mode with one JetStream account, and a user's .creds text."""
    op_seed, op_pub = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    _, sys_pub = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    acc_seed, acc_pub = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user_pub = new_nkey(nkeys.PREFIX_BYTE_USER)
    op_jwt = nats_jwt(op_seed, op_pub, "heddle-test", {"type": "operator", "system_account": sys_pub})
    sys_jwt = nats_jwt(op_seed, sys_pub, "SYS", {"type": "account", "limits": _UNLIMITED})
    acc_jwt = nats_jwt(op_seed, acc_pub, "HEDDLE", {
        "type": "account",
        "limits": {**_UNLIMITED, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1},
    })
    user_jwt = nats_jwt(acc_seed, user_pub, "heddle", {"type": "user", "pub": {}, "sub": {},
                                                         "subs": -1, "data": -1, "payload": -1})
    config = (
        f"operator: {op_jwt}\nsystem_account: {sys_pub}\nresolver: MEMORY\n"
        f"resolver_preload: {{\n  {sys_pub}: {sys_jwt}\n  {acc_pub}: {acc_jwt}\n}}\n"
    )
    creds = (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return config, creds


def tls_block(tls: dict[str, str], verify: bool) -> str:
    block = f'cert_file: "{tls["server.pem"]}", key_file: "{tls["server.key"]}", timeout: 2'
    if verify:
        block += f', ca_file: "{tls["ca.pem"]}", verify: true'
    return f"tls {{ {block} }}\n"


# -- servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valkey() -> Iterator[EmbeddedValkey]:
    """A plain valkey-server for the NATS tests."""
    with EmbeddedValkey("127.0.0.1", None, None) as server:
        yield server


def round_trip(valkey_url: str, **settings: Any) -> None:
    """A task sent by a client, routed and run by a worker, all with ``settings``, comes back."""
    app = heddle.Heddle(f"auth{uuid.uuid4().hex[:10]}", valkey_url=valkey_url, connect_timeout_s=3, **settings)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    try:
        with running_worker(app, concurrency=2, grace_s=1):
            assert add.delay(2, 3).get(timeout=20) == 5
    finally:
        app.close()


async def _connect_nats(**settings: Any) -> None:
    broker = Broker(Settings.load(connect_timeout_s=2, **settings), "auth-test")
    try:
        await broker.connect()
        await broker.account_info()
    finally:
        await broker.close()


def refused_nats(**settings: Any) -> str:
    """The text of the error a connection with ``settings`` fails with, within 15 s."""
    started = time.monotonic()
    with pytest.raises(BrokerError) as caught:
        asyncio.run(asyncio.wait_for(_connect_nats(**settings), 15))
    assert time.monotonic() - started < 15
    text = str(caught.value)
    assert_no_secret(text + repr(caught.value), "the BrokerError")
    return text


# -- NATS: each way to log in ----------------------------------------------------------


def test_credentials_in_the_url_log_in_and_a_wrong_password_there_names_nats_url(valkey):
    with EmbeddedNats("127.0.0.1", None, None, config=f'authorization {{ user: heddle, password: "{PASSWORD}" }}') as n:
        round_trip(valkey.url, nats_url=f"nats://heddle:{PASSWORD}@127.0.0.1:{n.port}")
        text = refused_nats(nats_url=f"nats://heddle:{WRONG}@127.0.0.1:{n.port}")
    assert f"authorization failed for nats://127.0.0.1:{n.port}" in text
    assert f"NATS_URL=nats://heddle:***@127.0.0.1:{n.port}" in text


def test_nats_user_and_nats_password_from_the_environment_log_in_every_actor(valkey, monkeypatch):
    with EmbeddedNats("127.0.0.1", None, None, config=f'authorization {{ user: heddle, password: "{PASSWORD}" }}') as n:
        monkeypatch.setenv("NATS_URL", n.url)
        monkeypatch.setenv("NATS_USER", "heddle")
        monkeypatch.setenv("NATS_PASSWORD", PASSWORD)
        round_trip(valkey.url)
        assert "password=***" in repr(Settings.load()) and PASSWORD not in repr(Settings.load())
        monkeypatch.setenv("NATS_PASSWORD", WRONG)
        text = refused_nats()
    assert f"authorization failed for nats://127.0.0.1:{n.port}" in text
    assert "Fix NATS_PASSWORD (or NATS_USER=heddle)" in text


def test_a_token_given_to_heddle_logs_in(valkey):
    with EmbeddedNats("127.0.0.1", None, None, config=f'authorization {{ token: "{TOKEN}" }}') as n:
        round_trip(valkey.url, nats_url=n.url, nats_token=TOKEN)
        text = refused_nats(nats_url=n.url, nats_token=WRONG)
        unset = refused_nats(nats_url=n.url)
    assert "Fix NATS_TOKEN" in text
    assert "No credentials are set" in unset and "NATS_TOKEN" in unset


def test_an_nkey_seed_file_logs_in_a_client_a_worker_and_heddle_preflight(valkey, tmp_path, monkeypatch):
    seed, public = new_nkey(nkeys.PREFIX_BYTE_USER)
    (tmp_path / "user.nk").write_bytes(seed)
    (tmp_path / "other.nk").write_bytes(new_nkey(nkeys.PREFIX_BYTE_USER)[0])
    with EmbeddedNats("127.0.0.1", None, None, config=f"authorization {{ users = [ {{ nkey: {public} }} ] }}") as n:
        monkeypatch.setenv("NATS_NKEY", str(tmp_path / "user.nk"))
        round_trip(valkey.url, nats_url=n.url)
        env = {**os.environ, "NATS_URL": n.url, "NATS_NKEY": str(tmp_path / "user.nk")}
        out = subprocess.run([sys.executable, "-m", "heddle", "preflight", "--no-valkey", "--timeout", "3"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "ok   JetStream" in out.stdout
        text = refused_nats(nats_url=n.url, nats_nkey=str(tmp_path / "other.nk"))
    assert f"Fix NATS_NKEY={tmp_path / 'other.nk'}" in text
    assert seed.decode() not in text


def test_a_jwt_creds_file_logs_in_to_an_operator_mode_server(valkey, tmp_path):
    config, creds = operator_mode()
    _, foreign = operator_mode()  # a user of another operator
    (tmp_path / "user.creds").write_text(creds)
    (tmp_path / "foreign.creds").write_text(foreign)
    with EmbeddedNats("127.0.0.1", None, None, config=config) as n:
        round_trip(valkey.url, nats_url=n.url, nats_creds=str(tmp_path / "user.creds"))
        text = refused_nats(nats_url=n.url, nats_creds=str(tmp_path / "foreign.creds"))
    assert f"authorization failed for nats://127.0.0.1:{n.port}" in text
    assert f"Fix NATS_CREDS={tmp_path / 'foreign.creds'}" in text
    assert "SU" not in text.split("(")[0]  # no seed


def test_a_tls_url_with_nats_tls_ca_verifies_the_server_and_without_it_says_to_set_it(valkey, tls):
    with EmbeddedNats("127.0.0.1", None, None, config=tls_block(tls, verify=False)) as n:
        url = f"tls://127.0.0.1:{n.port}"
        round_trip(valkey.url, nats_url=url, nats_tls_ca=tls["ca.pem"])
        unknown = refused_nats(nats_url=url)
        wrong_ca = refused_nats(nats_url=url, nats_tls_ca=tls["other-ca.pem"])
    assert f"TLS failed for tls://127.0.0.1:{n.port}" in unknown and "set NATS_TLS_CA" in unknown
    assert f"NATS_TLS_CA={tls['other-ca.pem']}" in wrong_ca


def test_mutual_tls_logs_in_with_nats_tls_cert_and_key_and_refuses_a_missing_or_foreign_certificate(valkey, tls):
    with EmbeddedNats("127.0.0.1", None, None, config=tls_block(tls, verify=True)) as n:
        ca = {"nats_url": n.url, "nats_tls_ca": tls["ca.pem"]}
        round_trip(valkey.url, **ca, nats_tls_cert=tls["client.pem"], nats_tls_key=tls["client.key"])
        missing = refused_nats(**ca)
        foreign = refused_nats(**ca, nats_tls_cert=tls["stranger.pem"], nats_tls_key=tls["stranger.key"])
    assert "set NATS_TLS_CERT and NATS_TLS_KEY" in missing
    assert f"refused the client certificate NATS_TLS_CERT={tls['stranger.pem']}" in foreign


def test_a_tls_url_to_a_server_without_tls_is_refused_rather_than_sent_in_plain_text():
    with EmbeddedNats("127.0.0.1", None, None) as n:
        text = refused_nats(nats_url=f"tls://127.0.0.1:{n.port}")
    assert "does not use TLS" in text


def test_a_password_is_never_sent_to_a_server_that_does_not_use_tls_when_tls_is_asked_for():
    """A fake server greets without TLS and records every byte: the password must not be among them."""
    received = bytearray()

    async def main() -> str:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b'INFO {"server_id":"fake","version":"2.10.0","proto":1,"max_payload":1048576,'
                         b'"headers":true,"auth_required":true}\r\n')
            await writer.drain()
            with contextlib.suppress(Exception):
                while data := await reader.read(4096):
                    received.extend(data)
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(BrokerError) as caught:
                await asyncio.wait_for(_connect_nats(nats_url=f"tls://127.0.0.1:{port}", nats_user="heddle",
                                                     nats_password=PASSWORD), 15)
            return str(caught.value)
        finally:
            server.close()

    text = asyncio.run(main())
    assert "does not use TLS" in text
    assert PASSWORD.encode() not in bytes(received)


@pytest.mark.parametrize("mode", ["url", "password", "token", "nkey", "creds"])
def test_a_wrong_secret_fails_fast_naming_the_server_and_the_variable_and_never_the_secret(mode, tmp_path):
    if mode == "creds":
        config, _ = operator_mode()
        _, creds = operator_mode()
        (tmp_path / "wrong.creds").write_text(creds)
    elif mode == "nkey":
        _, public = new_nkey(nkeys.PREFIX_BYTE_USER)
        wrong_seed, _ = new_nkey(nkeys.PREFIX_BYTE_USER)
        (tmp_path / "wrong.nk").write_bytes(wrong_seed)
        config = f"authorization {{ users = [ {{ nkey: {public} }} ] }}"
    elif mode == "token":
        config = f'authorization {{ token: "{TOKEN}" }}'
    else:
        config = f'authorization {{ user: heddle, password: "{PASSWORD}" }}'
    with EmbeddedNats("127.0.0.1", None, None, config=config) as n:
        settings: dict[str, Any] = {
            "url": {"nats_url": f"nats://heddle:{WRONG}@127.0.0.1:{n.port}"},
            "password": {"nats_url": n.url, "nats_user": "heddle", "nats_password": WRONG},
            "token": {"nats_url": n.url, "nats_token": WRONG},
            "nkey": {"nats_url": n.url, "nats_nkey": str(tmp_path / "wrong.nk")},
            "creds": {"nats_url": n.url, "nats_creds": str(tmp_path / "wrong.creds")},
        }[mode]
        text = refused_nats(**settings)
    variable = {"url": "NATS_URL", "password": "NATS_PASSWORD", "token": "NATS_TOKEN", "nkey": "NATS_NKEY",
                "creds": "NATS_CREDS"}[mode]
    assert f"authorization failed for nats://127.0.0.1:{n.port}" in text
    assert f"Fix {variable}" in text or f"in {variable}=" in text


def test_credentials_given_twice_or_half_given_are_config_errors_naming_the_variables():
    cases = {
        "NATS_URL carries credentials": dict(nats_url="nats://u:p@h:4222", nats_token=TOKEN),
        "NATS_PASSWORD is set without NATS_USER": dict(nats_password=PASSWORD),
        "NATS_TOKEN and NATS_NKEY are all set": dict(nats_token=TOKEN, nats_nkey="/x.nk"),
        "NATS_TLS_CERT is set without NATS_TLS_KEY": dict(nats_tls_cert="/c.pem"),
        "VALKEY_URL carries a password and VALKEY_PASSWORD": dict(valkey_url="valkey://:pw@h/0",
                                                                  valkey_password=VALKEY_PASSWORD),
        "VALKEY_URL is valkey://, which is plain text": dict(valkey_tls_ca="/ca.pem"),
    }
    for said, settings in cases.items():
        with pytest.raises(ConfigError, match=said):
            Settings.load(**settings)


def test_a_missing_tls_or_nkey_file_is_named_before_any_connection(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"NATS_TLS_CA={tmp_path}/nope.pem does not exist")):
        asyncio.run(_connect_nats(nats_url="tls://127.0.0.1:1", nats_tls_ca=str(tmp_path / "nope.pem")))
    with pytest.raises(ConfigError, match=r"NATS_NKEY=.*does not exist"):
        asyncio.run(_connect_nats(nats_url="nats://127.0.0.1:1", nats_nkey=str(tmp_path / "nope.nk")))


# -- Valkey ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nats() -> Iterator[EmbeddedNats]:
    """A plain nats-server for the Valkey tests."""
    with EmbeddedNats("127.0.0.1", None, None) as server:
        yield server


async def _connect_valkey(**settings: Any) -> None:
    backend = ResultBackend(Settings.load(connect_timeout_s=2, **settings))
    try:
        await backend.connect()
    finally:
        await backend.close()


def refused_valkey(**settings: Any) -> str:
    with pytest.raises(BackendError) as caught:
        asyncio.run(asyncio.wait_for(_connect_valkey(**settings), 15))
    text = str(caught.value)
    assert_no_secret(text + repr(caught.value), "the BackendError")
    return text


def test_valkey_password_from_the_environment_logs_in_and_a_wrong_one_names_it(nats, monkeypatch):
    with EmbeddedValkey("127.0.0.1", None, None, password=VALKEY_PASSWORD) as v:
        monkeypatch.setenv("VALKEY_PASSWORD", VALKEY_PASSWORD)
        round_trip(v.url, nats_url=nats.url)
        monkeypatch.setenv("VALKEY_PASSWORD", WRONG)
        text = refused_valkey(valkey_url=v.url)
        monkeypatch.delenv("VALKEY_PASSWORD")
        unset = refused_valkey(valkey_url=v.url)
    assert f"authorization failed for valkey://127.0.0.1:{v.port}" in text and "Fix VALKEY_PASSWORD" in text
    assert "No password is set" in unset and "VALKEY_PASSWORD" in unset


def test_a_valkey_acl_user_logs_in_from_valkey_username_or_the_url(nats):
    # The ACL user docs/security.md recommends: Heddle's keys only, no admin commands.
    users = [f"heddle on >{ACL_PASSWORD} ~heddle:* &* +@all -@admin -@dangerous +script|load +info", "default off"]
    with EmbeddedValkey("127.0.0.1", None, None, users=users) as v:
        round_trip(v.url, nats_url=nats.url, valkey_username="heddle", valkey_password=ACL_PASSWORD)
        round_trip(f"valkey://heddle:{ACL_PASSWORD}@127.0.0.1:{v.port}/0", nats_url=nats.url)
        text = refused_valkey(valkey_url=v.url, valkey_username="heddle", valkey_password=WRONG)
    assert "Fix VALKEY_PASSWORD (or VALKEY_USERNAME=heddle)" in text


def test_valkey_over_mutual_tls_with_valkey_tls_files_and_clear_errors_for_each_wrong_file(nats, tls):
    files = TLSFiles(tls["server.pem"], tls["server.key"], client_ca=tls["ca.pem"])
    with EmbeddedValkey("127.0.0.1", None, None, password=VALKEY_PASSWORD, tls=files) as v:
        assert v.url.startswith("valkeys://")
        good = {"valkey_url": v.url, "valkey_password": VALKEY_PASSWORD, "valkey_tls_ca": tls["ca.pem"],
                "valkey_tls_cert": tls["client.pem"], "valkey_tls_key": tls["client.key"]}
        round_trip(nats_url=nats.url, **good)

        async def on_the_lane() -> int:
            # The claim and store scripts take the lane (heddle.valkeylane): over TLS too.
            backend = ResultBackend(heddle.Heddle("lane", nats_url=nats.url, **good).settings)
            await backend.connect()
            try:
                claims = await backend.claim_many([uuid.uuid4().hex], "w")
                assert claims[0].token and backend.lane is not None
                return backend.lane.answered
            finally:
                await backend.close()

        assert asyncio.run(on_the_lane()) == 1
        wrong_ca = refused_valkey(**{**good, "valkey_tls_ca": tls["other-ca.pem"]})
        no_cert = refused_valkey(valkey_url=v.url, valkey_password=VALKEY_PASSWORD, valkey_tls_ca=tls["ca.pem"])
        foreign = refused_valkey(**{**good, "valkey_tls_cert": tls["stranger.pem"],
                                    "valkey_tls_key": tls["stranger.key"]})
        wrong_password = refused_valkey(**{**good, "valkey_password": WRONG})
    assert f"TLS failed for valkeys://127.0.0.1:{v.tls_port}" in wrong_ca
    assert f"VALKEY_TLS_CA={tls['other-ca.pem']}" in wrong_ca
    assert "set VALKEY_TLS_CERT and VALKEY_TLS_KEY" in no_cert
    assert f"VALKEY_TLS_CERT={tls['stranger.pem']}" in foreign
    assert "Fix VALKEY_PASSWORD" in wrong_password


# -- the health server's address --------------------------------------------------------


class _Idle:
    ready = asyncio.Event()
    last_tick = time.monotonic()


def test_the_health_server_listens_only_on_heddle_health_host(monkeypatch):
    monkeypatch.setenv("HEDDLE_HEALTH_HOST", "127.0.0.2")

    async def main() -> tuple[str, bool, bool]:
        server = await start_health_server([_Idle()], Settings.load(health_port=0))
        assert server is not None
        try:
            def reachable(host: str) -> bool:
                conn = http.client.HTTPConnection(host, server.port, timeout=3)
                try:
                    conn.request("GET", "/metrics")
                    return conn.getresponse().status == 200
                except OSError:
                    return False
                finally:
                    conn.close()

            on_host = await asyncio.to_thread(reachable, "127.0.0.2")
            elsewhere = await asyncio.to_thread(reachable, "127.0.0.1")
            return server.host, on_host, elsewhere
        finally:
            await server.stop()

    host, on_host, elsewhere = asyncio.run(main())
    assert (host, on_host, elsewhere) == ("127.0.0.2", True, False)


def test_heddle_healthcheck_probes_the_address_heddle_health_host_names(monkeypatch):
    monkeypatch.setenv("HEDDLE_HEALTH_HOST", "127.0.0.2")
    actor = _Idle()
    actor.last_tick = time.monotonic()  # live now (the class's tick is from import time)
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(start_health_server([actor], Settings.load(health_port=0)))
    assert server is not None
    try:
        env = {k: v for k, v in os.environ.items() if k != "HEDDLE_HEALTH_PORT"}
        out = subprocess.run([sys.executable, "-m", "heddle", "healthcheck", "--port", str(server.port)],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        loop.run_until_complete(server.stop())
        loop.close()
