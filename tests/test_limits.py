"""The gate's rate limits charge what a request costs, however large."""

from __future__ import annotations

import asyncio

from asyncgen.limits import Gate


async def test_tpm_charges_requests_larger_than_the_bucket_in_full() -> None:
    gate = Gate(8, tpm=60_000)  # 1 000 tokens per second, a bucket of one second
    loop = asyncio.get_running_loop()
    start = loop.time()
    await gate.wait_rate(1_300)  # a full bucket plus 0.3 s of budget
    await gate.wait_rate(1)
    assert loop.time() - start >= 0.25


async def test_rpm_paces_after_one_second_of_budget() -> None:
    gate = Gate(8, rpm=1_200)  # 20 per second
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(25):
        await gate.wait_rate(1)
    assert loop.time() - start >= 0.2  # 20 at once, the other 5 paced at 50 ms


async def test_concurrency_slots() -> None:
    gate = Gate(2)
    await gate.acquire_slot()
    await gate.acquire_slot()
    third = asyncio.ensure_future(gate.acquire_slot())
    await asyncio.sleep(0.01)
    assert not third.done()
    gate.release_slot()
    await asyncio.wait_for(third, 1)
