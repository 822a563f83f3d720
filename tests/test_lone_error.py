"""lone_error: a nursery's single failure reaches the caller as itself, under any trio."""

from __future__ import annotations

import pytest
import trio

from pyvmm.common.lone_error import lone_error


class Boom(Exception):
    pass


async def _fail_in_a_nursery(n: int) -> None:
    async def fail() -> None:
        raise Boom("one line")

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(fail)


def test_a_lone_failure_is_raised_as_itself() -> None:
    with pytest.raises(Boom, match="one line"), lone_error():
        trio.run(_fail_in_a_nursery, 1)


def test_two_failures_stay_a_group() -> None:
    with pytest.raises(BaseExceptionGroup) as info, lone_error():
        trio.run(_fail_in_a_nursery, 2)
    assert [type(e) for e in info.value.exceptions] == [Boom, Boom]


def test_a_nested_group_of_one_is_unwrapped() -> None:
    with pytest.raises(Boom), lone_error():
        raise ExceptionGroup("outer", [ExceptionGroup("inner", [Boom("deep")])])
