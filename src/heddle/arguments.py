"""A task's arguments, checked and converted against its type hints.

An :class:`ArgumentTypes` is built once per task, when it is declared, from the
function's signature. It does two jobs:

- **At the call site** (:meth:`ArgumentTypes.check`), strictly: with
  ``add(x: int, y: int)``, ``add.delay("a", "b")`` raises
  :class:`~heddle.errors.ArgumentTypeError` naming ``x`` and ``int`` before
  anything is sent, instead of a worker returning ``"ab"``.
- **On the worker** (:meth:`ArgumentTypes.convert`), leniently: the wire
  (msgpack) brings back plain data, so the worker turns it into the declared
  types before calling the function. A ``datetime`` parameter gets a
  ``datetime``, a ``msgspec.Struct`` or dataclass parameter an instance, an
  ``Enum``/``UUID``/``Decimal``/``tuple``/``set`` parameter one of those.

Parameters without a hint, hinted ``Any``, hinted with a string that did not
resolve, or hinted with a type msgspec cannot build (an arbitrary class, a
union of two dataclasses) are passed through unchanged, as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from heddle.errors import ArgumentTypeError

__all__ = ["ArgumentTypes"]

_POSITIONAL: Final = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_BY_NAME: Final = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _keep(_type: type, value: Any) -> Any:
    # A type msgspec cannot build itself (an arbitrary class inside a hint, such
    # as list[MyClass]): leave the value as it is rather than refuse it.
    return value


def _convertible(hint: Any) -> bool:
    """True when ``hint`` is a type msgspec can check and build values of."""
    if hint is inspect.Parameter.empty or hint is Any or isinstance(hint, str):
        return False
    try:
        info = msgspec.inspect.type_info(hint)
    except (TypeError, ValueError):  # e.g. a union of two dict-like types
        return False
    return not isinstance(info, msgspec.inspect.CustomType)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else repr(hint).replace("typing.", "")


class ArgumentTypes:
    """The type hints of one task's parameters, ready to check and convert arguments.

    Build it with :meth:`of`, which returns None when no parameter has a hint
    worth checking (then nothing is done per call).
    """

    __slots__ = ("_by_name", "_named", "_positional", "_var_keyword", "_var_positional", "task")

    def __init__(
        self,
        task: str,
        positional: Sequence[tuple[str, Any] | None],
        by_name: dict[str, Any],
        var_positional: tuple[str, Any] | None,
        var_keyword: tuple[str, Any] | None,
        named: frozenset[str] = frozenset(),
    ) -> None:
        self.task = task
        self._named = named  # every parameter a keyword can name, hinted or not
        self._positional = tuple(positional)
        self._by_name = by_name
        self._var_positional = var_positional
        self._var_keyword = var_keyword

    @classmethod
    def of(cls, task: str, signature: inspect.Signature) -> ArgumentTypes | None:
        """The checkable hints of ``signature``, or None if it has none."""
        positional: list[tuple[str, Any] | None] = []
        by_name: dict[str, Any] = {}
        var_positional = var_keyword = None
        for p in signature.parameters.values():
            hint = p.annotation if _convertible(p.annotation) else None
            if p.kind in _POSITIONAL:
                positional.append((p.name, hint) if hint is not None else None)
            if p.kind in _BY_NAME and hint is not None:
                by_name[p.name] = hint
            if p.kind is inspect.Parameter.VAR_POSITIONAL and hint is not None:
                var_positional = (f"*{p.name}", hint)
            if p.kind is inspect.Parameter.VAR_KEYWORD and hint is not None:
                var_keyword = (f"**{p.name}", hint)
        if not (by_name or var_positional or var_keyword or any(positional)):
            return None
        named = frozenset(p.name for p in signature.parameters.values() if p.kind in _BY_NAME)
        return cls(task, positional, by_name, var_positional, var_keyword, named)

    def __repr__(self) -> str:
        hints = [f"{n}: {_type_name(h)}" for n, h in self._hints()]
        return f"<ArgumentTypes {self.task} ({', '.join(hints)})>"

    def _hints(self) -> list[tuple[str, Any]]:
        seen = [h for h in self._positional if h is not None]
        seen += [(n, h) for n, h in self._by_name.items() if (n, h) not in seen]
        seen += [h for h in (self._var_positional, self._var_keyword) if h is not None]
        return seen

    def check(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Refuse, strictly, an argument that does not match its parameter's hint.

        Only what a type checker would also refuse fails here: ``1`` fits
        ``float``, a dict fits a ``Struct`` or dataclass with those fields, but
        ``"2"`` does not fit ``int``.

        Raises:
            ArgumentTypeError: The first argument that does not fit, by name.
        """
        self._walk(args, kwargs, strict=True)

    def convert(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """The arguments as the function declares them, from the plain data a message carries.

        Raises:
            ArgumentTypeError: An argument cannot become its parameter's type.
        """
        return self._walk(args, kwargs, strict=False)

    def _walk(
        self, args: Sequence[Any], kwargs: dict[str, Any], strict: bool
    ) -> tuple[list[Any], dict[str, Any]]:
        out_args = list(args)
        n = len(self._positional)
        for i, value in enumerate(args):
            slot = self._positional[i] if i < n else self._var_positional
            if slot is not None:
                out_args[i] = self._one(slot[0], slot[1], value, strict)
        out_kwargs = dict(kwargs)
        for name, value in kwargs.items():
            hint = self._by_name.get(name)
            if hint is not None:
                out_kwargs[name] = self._one(name, hint, value, strict)
            elif self._var_keyword is not None and name not in self._named:
                out_kwargs[name] = self._one(name, self._var_keyword[1], value, strict)
        return out_args, out_kwargs

    def _one(self, name: str, hint: Any, value: Any, strict: bool) -> Any:
        try:
            return msgspec.convert(value, hint, strict=strict, dec_hook=_keep)
        except msgspec.ValidationError as exc:
            # The value itself is left out: arguments may carry secrets.
            # msgspec names a nested position from `$`, the argument itself.
            why = str(exc).replace("`$", f"`{name.lstrip('*')}")
            raise ArgumentTypeError(
                f"argument {name!r} of task {self.task!r} must be {_type_name(hint)}: {why}"
            ) from None
