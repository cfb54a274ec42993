"""common/waiting.py: a Pulse wakes waiters when it fires (not on a timer); wait_set ends early."""
from __future__ import annotations

import asyncio

from common.waiting import Pulse, wait_set


def test_wait_for_rechecks_on_each_fire_and_returns_when_the_condition_holds():
    async def main():
        pulse, state = Pulse(), {"n": 0}
        waiter = asyncio.ensure_future(pulse.wait_for(lambda: state["n"] >= 2, timeout=3600))
        for n in (1, 2):
            await asyncio.sleep(0)
            assert not waiter.done()
            state["n"] = n
            pulse.fire()
        assert await asyncio.wait_for(waiter, 5.0) is True
        assert await pulse.wait_for(lambda: True, timeout=0) is True       # already true: no wait
        assert await pulse.wait_for(lambda: False, timeout=0.01) is False  # never true: the timeout answers
    asyncio.run(main())


def test_wait_set_is_cut_short_by_the_event():
    async def main():
        stop = asyncio.Event()
        waiter = asyncio.ensure_future(wait_set(stop, 3600))
        await asyncio.sleep(0)
        stop.set()
        assert await asyncio.wait_for(waiter, 5.0) is True
        assert await wait_set(asyncio.Event(), 0.01) is False
    asyncio.run(main())


def test_a_child_exit_is_an_event():
    """proc.Child.exited(): the pool's load and drain waits end when a replica's process dies."""
    import subprocess
    import sys

    from common.proc import Child

    async def main():
        p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(3)"], stdin=subprocess.PIPE)
        child = Child("reader", p)
        exited = asyncio.ensure_future(child.exited())
        await asyncio.sleep(0)
        assert not exited.done() and child.alive()
        p.stdin.close()                     # it reads to the end of its input, then exits with 3
        assert await asyncio.wait_for(exited, 30.0) == 3
        assert await child.exited() == 3    # reaped already: answers at once
    asyncio.run(main())
