"""flynn_runtime/ordered_writer.py: writes applied in submission order, awaited failures raised,
background failures logged, a full queue drops background writes only."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from flynn_runtime.ordered_writer import OrderedWriter


async def test_order_results_and_failures() -> None:
    w = OrderedWriter("t")
    applied: list[int] = []

    def write(i: int, delay: float, fail: bool = False) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            await asyncio.sleep(delay)
            if fail:
                raise RuntimeError(f"write {i} failed")
            applied.append(i)
            return i

        return run

    slow = w.submit(write(1, 0.05))
    background_failure = w.submit(write(2, 0.0, fail=True))
    awaited = w.submit(write(3, 0.0), awaited=True)
    awaited_failure = w.submit(write(4, 0.0, fail=True), awaited=True)
    assert await awaited == 3
    with pytest.raises(RuntimeError, match="write 4 failed"):
        await awaited_failure
    assert await slow == 1 and await background_failure is None
    assert applied == [1, 3]  # the slow first write was not overtaken
    await w.close()


async def test_full_queue_drops_background_writes_but_never_awaited_ones() -> None:
    w = OrderedWriter("t", max_pending=2)
    gate = asyncio.Event()
    applied: list[str] = []

    def write(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await gate.wait()
            applied.append(name)

        return run

    first = w.submit(write("first"))
    await asyncio.sleep(0)  # the writer picked it up and waits on the gate
    w.submit(write("a"))
    w.submit(write("b"))
    dropped = w.submit(write("dropped"))
    kept = w.submit(write("promise"), awaited=True)
    assert dropped.done() and w.dropped == 1
    gate.set()
    await kept
    await first
    assert applied == ["first", "a", "b", "promise"]
    await w.close()
