"""Tasks: a Python function plus options, callable remotely with ``delay``/``apply_async``."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, overload

import msgspec

from heddle import names
from heddle.arguments import ArgumentTypes
from heddle.errors import ConfigError, HeddleError, TaskOptionError
from heddle.graphs.canvas import Signature, xmap, xstarmap
from heddle.limits import key_value
from heddle.results import AsyncResult
from heddle.send import check_priority, send, unknown_options_error

if TYPE_CHECKING:
    from heddle.connections import Client

P = ParamSpec("P")
R = TypeVar("R")

class TaskDecorator(Protocol):
    """What ``@app.task(...)`` with options returns: turns a function into a typed Task."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    def __call__(self, fn: Any, /) -> Any: ...


TASK_OPTIONS = frozenset(
    {
        "name",
        "retries",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "retry_delay",
        "autoretry_for",
        "timeout",
        "tier",
        "expires",
        "concurrency_limit",
        "concurrency_key",
        "priority",
    }
)
# Deliveries kept in reserve above a task's retries for crash redeliveries and
# countdown deferrals, so that retries never run into JetStream's MaxDeliver.
_DELIVERY_RESERVE = 4



class TaskOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Validated options of one task.

    Attributes:
        retries: Retries after the first attempt (0 = none).
        retry_backoff: False for a fixed ``retry_delay``; True (1 s base) or a
            number of seconds for exponential backoff.
        retry_backoff_max: Cap on one backoff delay, in seconds.
        retry_jitter: Randomise backoff delays (between half and all of the delay).
        retry_delay: Fixed delay between retries when ``retry_backoff`` is off.
        autoretry_for: Exception types that trigger a retry (default: any Exception).
        timeout: Hard time limit in seconds; the task is cancelled and fails with TaskTimeout.
        tier: Model tier requested for this task (``local``, ``standard``, ``frontier``).
        expires: Seconds after sending by which a worker must have started the task;
            later, it never runs and ends ``REVOKED`` with :class:`~heddle.TaskExpired`.
        concurrency_limit: Most runs at once across every worker (:mod:`heddle.limits`):
            per value of the ``concurrency_key`` argument, or for the whole task.
        concurrency_key: Name of the parameter whose value the limit counts by.
        priority: Default priority of its sends, 0 (lowest) to 9 (highest); None: 5.
    """

    retries: int = 0
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    retry_delay: float = 1.0
    autoretry_for: tuple[type[BaseException], ...] = (Exception,)
    timeout: float | None = None
    tier: str | None = None
    expires: float | None = None
    concurrency_limit: int | None = None
    concurrency_key: str | None = None
    priority: int | None = None

    def backoff_s(self, retry_number: int) -> float:
        """Delay before retry ``retry_number`` (0 for the first retry)."""
        if self.retry_backoff is False:
            return self.retry_delay
        base = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        delay: float = min(self.retry_backoff_max, base * (2**retry_number))
        if self.retry_jitter:
            delay = delay / 2 + random.uniform(0, delay / 2)
        return delay


def _validate_options(where: str, options: dict[str, Any], max_deliver: int | None) -> TaskOptions:
    unknown = set(options) - TASK_OPTIONS
    if unknown:
        raise unknown_options_error("option", unknown, TASK_OPTIONS, where)
    opts = {k: v for k, v in options.items() if k != "name"}
    retries = opts.get("retries", 0)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise TaskOptionError(f"retries for {where} must be an int >= 0, got {retries!r}")
    if max_deliver is not None and retries >= max_deliver:
        # Every attempt is one JetStream delivery; keep a few spare for crash
        # redeliveries and countdown deferrals.
        need = retries + _DELIVERY_RESERVE
        raise TaskOptionError(
            f"retries={retries} for {where} needs more deliveries than max_deliver={max_deliver}; "
            f"lower retries or create the app with Heddle(..., max_deliver={need})"
        )
    rb = opts.get("retry_backoff", False)
    if not isinstance(rb, bool | int | float) or (not isinstance(rb, bool) and rb <= 0):
        raise TaskOptionError(
            f"retry_backoff for {where} must be True/False or a positive number of seconds, got {rb!r}"
        )
    for key in ("retry_backoff_max", "retry_delay"):
        v = opts.get(key)
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or v < 0):
            raise TaskOptionError(f"{key} for {where} must be seconds >= 0, got {v!r}")
    timeout = opts.get("timeout")
    if timeout is not None and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0
    ):
        raise TaskOptionError(f"timeout for {where} must be seconds > 0, got {timeout!r}")
    expires = opts.get("expires")
    if expires is not None and (
        not isinstance(expires, int | float) or isinstance(expires, bool) or not 0 < expires < float("inf")
    ):
        raise TaskOptionError(f"expires for {where} must be seconds > 0 (from sending), got {expires!r}")
    try:
        check_priority(opts.get("priority"), where)
    except TypeError as exc:
        raise TaskOptionError(str(exc)) from None
    limit = opts.get("concurrency_limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise TaskOptionError(f"concurrency_limit for {where} must be an int >= 1, got {limit!r}")
    ckey = opts.get("concurrency_key")
    if ckey is not None and (not isinstance(ckey, str) or limit is None):
        raise TaskOptionError(
            f"concurrency_key for {where} must be the name of a parameter and needs concurrency_limit, "
            f"e.g. @app.task(concurrency_limit=2, concurrency_key='tenant'); got {ckey!r}"
            + ("" if limit is not None else " without concurrency_limit")
        )
    tier = opts.get("tier")
    if tier is not None and tier not in names.TIERS:
        raise TaskOptionError(f"tier for {where} must be one of {', '.join(names.TIERS)}, got {tier!r}")
    art = opts.get("autoretry_for")
    if art is not None:
        if isinstance(art, type):
            art = (art,)
        if not isinstance(art, tuple | list) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in art
        ):
            raise TaskOptionError(
                f"autoretry_for for {where} must be exception types, e.g. (ConnectionError,), got {art!r}"
            )
        opts["autoretry_for"] = tuple(art)
    return TaskOptions(**opts)


class Task(Generic[P, R]):
    """A function that can run on a worker. Created by ``@app.task`` or ``@heddle.task``.

    Calling the task object runs the function here, in this process; ``delay``
    and ``apply_async`` send it to a worker and return an :class:`AsyncResult`.
    """

    def __init__(self, fn: Callable[P, Any], *, app: Client | None = None, **options: Any) -> None:
        if not callable(fn):
            raise TaskOptionError(f"@task must decorate a function, got {fn!r}")
        self.fn = fn
        name = options.get("name") or f"{fn.__module__}.{fn.__qualname__}"
        if not isinstance(name, str):
            raise TaskOptionError(f"task name must be a string, got {name!r}")
        self.name: str = name
        where = f"task {self.name!r}"
        self.options = _validate_options(
            where, options, app.settings.max_deliver if app is not None else None
        )
        self.is_async = inspect.iscoroutinefunction(fn)
        try:
            self.signature = inspect.signature(fn, eval_str=True)
        except Exception:  # annotations naming things not importable here: keep them as text
            self.signature = inspect.signature(fn)
        # Positional parameter names, for errors that name the argument that failed.
        self._positional = tuple(
            p.name for p in self.signature.parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        )
        # For a function whose parameters are all positional-capable (no *args, **kwargs or
        # keyword-only ones), the range of positional argument counts it takes: a send
        # with only positional arguments checks its count against it, which is what
        # Signature.bind would find, at a fraction of its cost. None: bind checks.
        params = self.signature.parameters
        self._arity: tuple[int, int] | None = None
        if len(self._positional) == len(params):
            required = sum(p.default is inspect.Parameter.empty for p in params.values())
            self._arity = (required, len(params))
        key = self.options.concurrency_key
        if key is not None and key not in self.signature.parameters:
            raise TaskOptionError(
                f"concurrency_key {key!r} for {where} is not one of its parameters "
                f"({', '.join(self.signature.parameters) or 'it takes none'})"
            )
        # Type hints, checked at every send and converted to on the worker (None: no hints).
        self.arguments = ArgumentTypes.of(self.name, self.signature)
        self._app = app
        self._shared = app is None
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", self.name)
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def concurrency_value(self, args: list[Any], kwargs: dict[str, Any]) -> str | None:
        """Which concurrency slots a call counts against: the key argument's value, ``*``, or None (no limit)."""
        if self.options.concurrency_limit is None:
            return None
        key = self.options.concurrency_key
        if key is None:
            return "*"
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return "*"  # arguments that do not fit fail when called; count them together meanwhile
        bound.apply_defaults()
        return key_value(bound.arguments.get(key))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run the function locally, in this process."""
        return self.fn(*args, **kwargs)

    @property
    def app(self) -> Client:
        """The app this task sends through (for shared tasks: the last app that adopted it)."""
        if self._app is None:
            raise HeddleError(
                f"shared task {self.name!r} is not bound to an app; include its module in the app "
                f"that sends it: app.include({self.fn.__module__!r}) (heddle worker -A does this for "
                f"the module it loads)"
            )
        return self._app

    @property
    def is_shared(self) -> bool:
        """True for a ``@heddle.task`` task (bound by ``app.include``), False for ``@app.task``."""
        return self._shared

    def bind_shared(self, app: Client) -> None:
        """Bind a shared (``@heddle.task``) task to ``app``; it sends through that app from now on.

        Raises:
            ConfigError: It is already bound to another app (a shared task belongs to
                one app; include its module in one app only, or declare it with ``@app.task``).
        """
        if not self._shared:
            return
        if self._app is not None and self._app is not app:
            raise ConfigError(
                f"shared task {self.name!r} is already included by app {self._app.name!r}; a shared task "
                f"belongs to one app: include {self.fn.__module__!r} in one app only, or declare the task "
                f"with @app.task"
            )
        self._app = app

    # -- sending -------------------------------------------------------------------

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task with these arguments; shortcut for ``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | float | None = None,
        task_id: str | None = None,
        headers: dict[str, str] | None = None,
        tier: str | None = None,
        expires: datetime | float | None = None,
        priority: int | None = None,
        budget_usd: float | None = None,
    ) -> AsyncResult[R]:
        """Send the task to a worker.

        Args:
            args: Positional arguments (msgspec-encodable).
            kwargs: Keyword arguments (msgspec-encodable).
            countdown: Run no earlier than this many seconds from now.
            eta: Run no earlier than this time (aware datetime or epoch seconds).
            task_id: Caller-chosen id; a repeat within the dedup window is dropped
                and a task whose result is stored never runs twice.
            headers: Extra string headers carried with the message.
            tier: Model tier for this call, overriding the task's option.
            expires: Seconds from now, or an aware datetime, by which a worker must
                have started the task; later it never runs and ends ``REVOKED``
                (``get()`` raises :class:`~heddle.TaskExpired`). Default: the task's option.
            priority: 0 (lowest) to 9 (highest), default the task's option, else 5.
                Priorities 7-9 start before queued default ones, 0-3 after them
                (:mod:`heddle.bands`).
            budget_usd: What the task's model calls (``heddle.llm.complete``) may cost in
                all, in US dollars; the call that would pass it is not made and the task
                fails with :class:`~heddle.errors.BudgetExceeded`.

        Returns:
            An :class:`AsyncResult`. From sync code the message is stored by
            JetStream before this returns; from async code the publish runs on
            the caller's loop and ``await result.aget()`` (or ``result.sent()``)
            waits for it.

        Raises:
            TypeError: The arguments do not fit the function's signature.
            ArgumentTypeError: An argument does not fit its parameter's type hint
                (a TypeError too); the message names the parameter and the type.
            EncodeError: An argument cannot be encoded; the message names it.
        """
        if not isinstance(args, tuple | list) or not isinstance(kwargs, dict | None):
            short = self.name.rpartition(".")[2]
            raise TypeError(
                f"{short}.apply_async(args, kwargs) takes the positional arguments as one tuple or list and "
                f"the keyword arguments as one dict, e.g. {short}.apply_async((1, 2)) or {short}.delay(1, 2); "
                f"got args of type {type(args).__name__}"
                + (f" and kwargs of type {type(kwargs).__name__}" if kwargs is not None else "")
            )
        kwargs = dict(kwargs or {})
        args = tuple(args)
        arity = self._arity
        try:
            if kwargs or arity is None or not arity[0] <= len(args) <= arity[1]:
                self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"bad arguments for task {self.name!r} with signature {self.signature}: {exc}"
            ) from None
        if self.arguments is not None:
            self.arguments.check(args, kwargs)
        return send(
            self.app,
            self.name,
            args,
            kwargs,
            countdown=countdown,
            eta=eta,
            task_id=task_id,
            headers=headers,
            tier=tier or self.options.tier,
            expires=expires if expires is not None else self.options.expires,
            priority=priority if priority is not None else self.options.priority,
            arg_names=self._positional,
            budget_usd=budget_usd,
        )

    async def aapply_async(self, *a: Any, **kw: Any) -> AsyncResult[R]:
        """Like :meth:`apply_async`, but returns once JetStream has stored the message."""
        result = self.apply_async(*a, **kw)
        await result.sent()
        return result

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature: this task with (partial) arguments, for later or for task graphs."""
        return Signature(task=self.name, args=tuple(args), kwargs=kwargs, app=self.app)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: in a chain it ignores the previous task's result."""
        return Signature(task=self.name, args=tuple(args), kwargs=kwargs, immutable=True, app=self.app)

    def map(self, items: Iterable[Any] | None = None) -> xmap:
        """A graph node calling this task once per element of ``items``, results in order.

        Without ``items``, inside a chain, the elements are those of the previous result.
        """
        return xmap(self.s(), items)

    def starmap(self, items: Iterable[Any] | None = None) -> xstarmap:
        """Like :meth:`map`, but each element is the list of arguments of one call."""
        return xstarmap(self.s(), items)


@overload
def shared_task(fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
@overload
def shared_task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def shared_task(**options: Any) -> TaskDecorator: ...


def shared_task(fn: Any = None, /, **options: Any) -> Any:
    """Declare a shared task: a task of a module that does not name its app.

    It belongs to the one app that includes its module: ``app.include("shop.tasks")``,
    or the app ``heddle worker -A shop.tasks`` loads (which includes the module it
    loads). There is no process-wide registry: until an app includes it, sending it
    raises an error that says how to bind it.
    """

    def decorate(f: Any) -> Any:
        return Task(f, app=None, **options)

    return decorate(fn) if fn is not None else decorate
