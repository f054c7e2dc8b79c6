"""Signatures: a task plus arguments and options, to send now or compose later.

Task graphs (chain, group, chord) build on these; see the task-graph issue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from heddle.results import AsyncResult

if TYPE_CHECKING:
    from heddle.app import Heddle


class Signature:
    """A task invocation that has not been sent yet.

    Args:
        task: Task name.
        args: Positional arguments.
        kwargs: Keyword arguments.
        options: ``apply_async`` options (countdown, eta, task_id, headers, tier).
        immutable: If True, a chain does not pass the previous result to it.
        app: The app to send through.
    """

    def __init__(
        self,
        task: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        immutable: bool = False,
        app: Heddle | None = None,
    ) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options = dict(options or {})
        self.immutable = immutable
        self.app = app

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task}{'!' if self.immutable else ''}({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Signature):
            return NotImplemented
        return (self.task, self.args, self.kwargs, self.options, self.immutable) == (
            other.task,
            other.args,
            other.kwargs,
            other.options,
            other.immutable,
        )

    def set(self, **options: Any) -> Signature:
        """Return a copy with extra ``apply_async`` options."""
        return Signature(self.task, self.args, self.kwargs, {**self.options, **options}, self.immutable, self.app)

    def clone(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Signature:
        """Return a copy with ``args`` prepended (unless immutable) and ``kwargs`` merged."""
        if self.immutable:
            return Signature(self.task, self.args, self.kwargs, self.options, True, self.app)
        return Signature(
            self.task, tuple(args) + self.args, {**self.kwargs, **(kwargs or {})}, self.options, False, self.app
        )

    def _app(self) -> Heddle:
        if self.app is None:
            from heddle.errors import HeddleError

            raise HeddleError(f"signature {self!r} has no app; build it with task.s(...)")
        return self.app

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Send with extra arguments (prepended unless immutable)."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """Send the task; ``options`` override the signature's own."""
        sig = self.clone(args, kwargs)
        app = self._app()
        task = app.tasks.get(sig.task)
        opts = {**sig.options, **options}
        if task is not None:
            return task.apply_async(sig.args, sig.kwargs, **opts)
        return app.send_task(sig.task, sig.args, sig.kwargs, **opts)
