"""A task's type hints: arguments checked at the call site, converted on the worker (#21 item 6)."""

from __future__ import annotations

import dataclasses
import enum
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

import heddle


class Point(msgspec.Struct):
    x: int
    y: int


@dataclasses.dataclass
class Order:
    number: int
    placed: datetime


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


def test_an_argument_that_does_not_fit_its_hint_fails_at_the_call_site_naming_the_parameter(heddle_app):
    @heddle_app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(heddle.ArgumentTypeError, match=r"argument 'x' of task '.*add' must be int") as info:
        add.delay("a", "b")
    assert isinstance(info.value, TypeError)  # callers catching TypeError still catch it
    with pytest.raises(heddle.ArgumentTypeError, match=r"argument 'y' .* must be int"):
        add.apply_async((1,), {"y": "2"})


def test_a_nested_mismatch_names_the_path_inside_the_argument(heddle_app):
    @heddle_app.task
    def total(items: list[int], where: Point) -> int:
        return sum(items)

    with pytest.raises(heddle.ArgumentTypeError, match=r"argument 'items'.*list\[int\].*at `items\[2\]`"):
        total.delay([1, 2, "three"], Point(0, 0))
    with pytest.raises(heddle.ArgumentTypeError, match=r"argument 'where'.*at `where.y`"):
        total.delay([1], {"x": 1, "y": "no"})


def test_the_worker_passes_the_declared_types_to_the_function(heddle_app, heddle_worker):
    @heddle_app.task
    def describe(when: datetime, at: Point, order: Order, colour: Colour, key: uuid.UUID,
                 pair: tuple[int, int], tags: set[str], ratio: float) -> dict[str, str]:
        return {
            "when": type(when).__name__, "at": type(at).__name__, "order": type(order).__name__,
            "placed": type(order.placed).__name__, "colour": type(colour).__name__,
            "key": type(key).__name__, "pair": type(pair).__name__, "tags": type(tags).__name__,
            "ratio": type(ratio).__name__,
        }

    naive = datetime(2026, 12, 6, 9, 30)  # msgpack carries a naive datetime as text
    got = describe.delay(
        naive, Point(1, 2), Order(7, naive), Colour.RED, uuid.uuid4(), (1, 2), {"a"}, 2
    ).get(timeout=10)
    assert got == {
        "when": "datetime", "at": "Point", "order": "Order", "placed": "datetime", "colour": "Colour",
        "key": "UUID", "pair": "tuple", "tags": "set", "ratio": "float",
    }


def test_a_dict_for_a_struct_or_dataclass_parameter_arrives_as_an_instance(heddle_app, heddle_worker):
    @heddle_app.task
    async def shift(at: Point, order: Order, dx: int = 1) -> list[Any]:
        return [at.x + dx, at.y, order.number, order.placed.year]

    placed = datetime(2025, 1, 2, tzinfo=UTC)
    got = shift.delay({"x": 1, "y": 2}, {"number": 3, "placed": placed}, dx=10).get(timeout=10)
    assert got == [11, 2, 3, 2025]


def test_unannotated_and_any_parameters_stay_as_they_are(heddle_app, heddle_worker):
    @heddle_app.task
    def kinds(a, b: Any, *rest, **extra) -> list[str]:  # type: ignore[no-untyped-def]
        return [type(a).__name__, type(b).__name__, *(type(r).__name__ for r in rest),
                *(type(v).__name__ for v in extra.values())]

    assert heddle_app.tasks[kinds.name].arguments is None  # nothing to do per call
    got = kinds.delay("2026-12-06T09:30:00", {"x": 1}, [1], k="7").get(timeout=10)
    assert got == ["str", "dict", "list", "str"]


def test_hinted_star_args_and_star_kwargs_are_converted_per_item(heddle_app, heddle_worker):
    @heddle_app.task
    def spread(first: int, *rest: Colour, **named: Point) -> list[str]:
        return [type(first).__name__, *(r.value for r in rest), *(f"{k}={p.x}" for k, p in named.items())]

    assert spread.delay(1, Colour.BLUE, Colour.RED, home=Point(3, 4)).get(timeout=10) == [
        "int", "blue", "red", "home=3"
    ]
    with pytest.raises(heddle.ArgumentTypeError, match=r"argument '\*rest' .* must be Colour"):
        spread.delay(1, "green")


def test_a_wrong_argument_from_the_bus_fails_once_with_the_parameter_named(heddle_app, heddle_worker):
    @heddle_app.task(retries=3)
    def square(x: int) -> int:
        return x * x

    # send_task bypasses the call-site check, as a client of another language would.
    r = heddle_app.send_task(square.name, args=("seven",))
    with pytest.raises(heddle.TaskError) as info:
        r.get(timeout=10)
    assert info.value.type_name == "heddle.errors.ArgumentTypeError"
    assert "argument 'x'" in info.value.remote_message and "must be int" in info.value.remote_message
    assert r.record is not None and r.record.retries == 0  # a wrong argument is not retried


def test_a_value_that_converts_on_the_wire_is_lenient_on_the_worker(heddle_app, heddle_worker):
    @heddle_app.task
    def stamp(when: datetime, n: int) -> list[Any]:
        return [when.year, n + 1]

    # A client without the task's code sends plain data: text for a datetime, text for an int.
    r = heddle_app.send_task(stamp.name, args=("2027-03-04T05:06:07Z", "41"))
    assert r.get(timeout=10) == [2027, 42]
