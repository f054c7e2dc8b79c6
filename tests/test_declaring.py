"""Declaring tasks and apps: options, names, errors at declaration and call time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import heddle
from heddle.settings import Settings


def test_a_task_is_named_after_its_module_and_qualname():
    app = heddle.Heddle("naming")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert add.name == f"{__name__}.test_a_task_is_named_after_its_module_and_qualname.<locals>.add"
    assert app.tasks[add.name] is add
    assert add(2, 3) == 5  # calling the task object runs it here


def test_a_custom_name_is_used():
    app = heddle.Heddle("naming2")

    @app.task(name="shop.add")
    def add(x: int, y: int) -> int:
        return x + y

    assert add.name == "shop.add"
    assert "shop.add" in app.tasks


def test_a_duplicate_task_name_fails_at_declaration_with_the_fix():
    app = heddle.Heddle("dups")

    @app.task(name="same")
    def one() -> None: ...

    with pytest.raises(heddle.DuplicateTaskError, match=r"already used by .*name='\.\.\.'"):

        @app.task(name="same")
        def two() -> None: ...


def test_an_unknown_option_fails_with_a_suggestion():
    app = heddle.Heddle("opts")
    with pytest.raises(heddle.TaskOptionError, match=r"'retry' \(did you mean 'retries'\?\)"):

        @app.task(retry=3)
        def f() -> None: ...


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "retries .* must be an int >= 0"),
        ({"retries": "3"}, "retries .* must be an int >= 0"),
        ({"timeout": 0}, "timeout .* must be seconds > 0"),
        ({"tier": "huge"}, "tier .* must be one of local, standard, frontier"),
        ({"autoretry_for": ("nope",)}, "autoretry_for .* must be exception types"),
        ({"retry_backoff": -2}, "retry_backoff .* positive number"),
        ({"retries": 50}, r"max_deliver=30.*Heddle\(\.\.\., max_deliver=54\)"),
    ],
)
def test_invalid_option_values_fail_at_declaration(options, message):
    app = heddle.Heddle("badopts")
    with pytest.raises(heddle.TaskOptionError, match=message):
        app.task(**options)(lambda: None)


def test_backoff_is_exponential_capped_and_jittered():
    app = heddle.Heddle("backoff")

    @app.task(retries=10, retry_backoff=2, retry_backoff_max=20, retry_jitter=False)
    def f() -> None: ...

    assert [f.options.backoff_s(n) for n in range(5)] == [2, 4, 8, 16, 20]

    @app.task(retries=3, retry_backoff=True)
    def g() -> None: ...

    delays = [g.options.backoff_s(3) for _ in range(50)]
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 1

    @app.task(retries=3, retry_delay=0.25)
    def h() -> None: ...

    assert h.options.backoff_s(2) == 0.25


def test_wrong_arguments_fail_at_the_call_site():
    app = heddle.Heddle("args")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match=r"bad arguments for task .*add.*\(x: int, y: int\)"):
        add.delay(1, 2, 3)
    with pytest.raises(TypeError, match="missing a required argument: 'y'"):
        add.delay(1)
    # Celery's habit of passing the arguments to apply_async one by one.
    with pytest.raises(TypeError, match=r"add.apply_async\(args, kwargs\) takes the positional arguments as one "
                                        r"tuple or list .* add.apply_async\(\(1, 2\)\) or add.delay\(1, 2\); "
                                        r"got args of type int and kwargs of type int"):
        add.apply_async(1, 2)


def _one(a, /): ...
def _two_with_default(a, b=1): ...
def _none(): ...
def _star(a, *rest): ...
def _keyword_only(a, *, b): ...
def _kwargs(a, **more): ...


@pytest.mark.parametrize("fn", [_one, _two_with_default, _none, _star, _keyword_only, _kwargs])
def test_a_send_takes_exactly_the_positional_argument_counts_the_function_takes(fn):
    """The call-site count check agrees with ``inspect.Signature.bind`` for every count."""
    import inspect

    app = heddle.Heddle("arity")
    task = app.task(fn)
    for n in range(5):
        args = tuple(range(n))
        try:
            inspect.signature(fn).bind(*args)
            fits = True
        except TypeError:
            fits = False
        # An out-of-range priority fails after the argument check, before anything is sent.
        with pytest.raises(TypeError) as raised:
            task.apply_async(args, priority=99)
        assert ("bad arguments for task" in str(raised.value)) is not fits, (fn.__name__, n, str(raised.value))


def test_an_unencodable_argument_raises_encode_error_naming_it():
    app = heddle.Heddle("enc")

    @app.task
    def store(path: str, data: object = None) -> None: ...

    class Opaque:
        pass

    with pytest.raises(heddle.EncodeError, match=r"argument 'data' of task .*store.* \(Opaque\)"):
        store.delay("a", data=Opaque())
    # Positional too: the parameter's name, not its index.
    with pytest.raises(heddle.EncodeError, match=r"argument 'data' of task .*store.* \(object\)"):
        store.apply_async(("a", object()))


def test_countdown_and_eta_together_are_rejected():
    app = heddle.Heddle("eta")

    @app.task
    def f() -> None: ...

    with pytest.raises(TypeError, match="countdown= or eta="):
        f.apply_async(countdown=1, eta=5.0)
    with pytest.raises(TypeError, match="tier must be one of"):
        f.apply_async(tier="mega")


def test_send_task_rejects_unknown_options():
    app = heddle.Heddle("sendtask")
    with pytest.raises(heddle.TaskOptionError, match=r"'count_down' \(did you mean 'countdown'\?\)"):
        app.send_task("x.y", count_down=3)


def test_a_shared_task_belongs_to_the_one_app_that_includes_its_module():
    import importlib

    import tests.apps.shared as shared

    shared = importlib.reload(shared)  # fresh, unbound task objects for this test
    with pytest.raises(heddle.HeddleError, match=r"not bound to an app; .*app.include\('tests.apps.shared'\)"):
        shared.shout.delay("x")
    other = heddle.Heddle("bystander")  # an app that does not include the module gets nothing
    assert shared.shout.name not in other.tasks
    app = heddle.Heddle("includer")
    assert {t.name for t in app.include("tests.apps.shared")} == {shared.shout.name, "shared.whisper"}
    assert shared.shout.app is app and app.tasks["shared.whisper"] is shared.whisper
    assert app.include(shared) == [shared.shout, shared.whisper]  # including twice is harmless
    with pytest.raises(heddle.ConfigError, match=r"already included by app 'includer'; a shared task belongs to one"):
        heddle.Heddle("second").include(shared)
    with pytest.raises(heddle.ConfigError, match=r"cannot include 'no\.such\.module'"):
        app.include("no.such.module")


def test_signatures_carry_arguments_and_immutability():
    app = heddle.Heddle("sigs")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    s = add.s(2)
    assert s.task == add.name and s.args == (2,) and not s.immutable
    assert s.clone((1,)).args == (1, 2)
    si = add.si(2, 2)
    assert si.immutable and si.clone((99,)).args == (2, 2)
    assert repr(si).endswith("!(2, 2)")


def test_settings_come_from_arguments_then_environment(monkeypatch):
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1111")
    monkeypatch.setenv("VALKEY_URL", "valkey://127.0.0.1:2222/0")
    assert heddle.Heddle("envapp").settings.nats_url == "nats://127.0.0.1:1111"
    app = heddle.Heddle("argapp", nats_url="nats://127.0.0.1:3333")
    assert app.settings.nats_url == "nats://127.0.0.1:3333"
    assert app.settings.valkey_url == "valkey://127.0.0.1:2222/0"
    with pytest.raises(heddle.ConfigError, match="unknown setting"):
        Settings.load(nats=1)
    with pytest.raises(heddle.ConfigError, match="max_deliver must be >= 2"):
        heddle.Heddle("md", max_deliver=1)
    with pytest.raises(heddle.ConfigError, match="may only contain"):
        heddle.Heddle("bad.name")


def test_the_public_api_is_curated():
    expected = {
        "ArgumentTypeError", "AsyncResult", "BackendError", "BackendUnavailable", "BrokerError", "BrokerUnavailable",
        "ConfigError", "DecodeError", "DuplicateTaskError", "EncodeError", "FAILURE", "Heddle",
        "HeddleError", "PENDING", "RETRY", "REVOKED", "ResultTimeout", "STARTED", "SUCCESS",
        "ServerStartError", "Settings", "Signature", "Task", "TaskError", "TaskIdError", "TaskOptionError",
        "MessageTooLarge",
        "TaskOptions", "TaskRevoked", "TaskTimeout", "Worker", "__version__", "task", "Retry", "TaskExpired",
        "TaskContext", "current_task",
        "GraphResult", "Pipeline", "chain", "chord", "group",
    }
    assert set(heddle.__all__) == expected
    for name in heddle.__all__:
        assert hasattr(heddle, name), name


def test_every_error_is_a_heddle_error():
    for name in heddle.errors.__all__:
        assert issubclass(getattr(heddle.errors, name), heddle.HeddleError)


def test_the_package_ships_py_typed():
    assert (Path(heddle.__file__).parent / "py.typed").exists()


def test_a_type_checker_catches_wrong_argument_types(tmp_path):
    src = tmp_path / "typed_use.py"
    src.write_text(
        textwrap.dedent(
            """
            import heddle
            app = heddle.Heddle("typed")

            @app.task(retries=1)
            def add(x: int, y: int) -> int:
                return x + y

            @app.task
            async def shout(text: str) -> str:
                return text.upper()

            add.delay("x", 2)
            shout.delay(3)
            n: int = add.delay(1, 2).get()
            s: str = shout.delay("a").get()
            bad: str = add.delay(1, 2).get()
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--hide-error-context", str(src)],
        capture_output=True,
        text=True,
    )
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 3, out.stdout
    assert any(":13:" in e and 'type "str"; expected "int"' in e for e in errors), out.stdout
    assert any(":14:" in e and 'type "int"; expected "str"' in e for e in errors), out.stdout
    assert any(":17:" in e and 'has type "int", variable has type "str"' in e for e in errors)


def test_the_app_that_dash_a_loads_includes_the_shared_tasks_of_its_module(tmp_path, monkeypatch):
    from heddle.runtime import load_app

    (tmp_path / "shopmix.py").write_text(
        "import heddle\n"
        "app = heddle.Heddle('shopmix')\n"
        "@app.task\n"
        "def add(x: int, y: int) -> int:\n"
        "    return x + y\n"
        "@heddle.task\n"
        "def slow_echo(text: str) -> str:\n"
        "    return text\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    app = load_app("shopmix")
    assert sorted(app.tasks) == ["shopmix.add", "shopmix.slow_echo"]
    assert app.tasks["shopmix.slow_echo"].app is app
