"""The idle batcher's admission window (batcher/admission_window.py): a burst is gathered into one
first step, a lone request pays about one gap, and a process stall never splits a burst."""
import asyncio
import time

from batcher.admission_window import AdmissionWindow

GAP = 0.01


def run(coro):
    return asyncio.run(coro)


def test_a_lone_request_pays_one_gap():
    async def scenario():
        wake = asyncio.Event()
        t0 = time.perf_counter()
        waited = await AdmissionWindow(GAP).gather(wake)
        return waited, time.perf_counter() - t0

    waited, took = run(scenario())
    assert waited == 1
    assert GAP <= took < GAP + 0.5   # generous: only "it does not wait for a second gap or more"


def test_arrivals_closer_than_the_gap_extend_the_window_up_to_the_cap():
    async def scenario(arrivals: int):
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        for i in range(1, arrivals + 1):
            loop.call_later(i * GAP * 0.4, wake.set)
        return await AdmissionWindow(GAP, max_windows=4).gather(wake)

    assert run(scenario(2)) == 3     # two arrivals, then one quiet gap
    assert run(scenario(20)) == 4    # a stream that never pauses is cut at max_windows


def test_a_stall_past_the_gap_does_not_split_the_burst():
    """The process is descheduled past the gap; the arrivals that came meanwhile are delivered only
    after the window's timer has fired. The window must still take them in."""
    async def scenario():
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        delivered = []

        def deliver():
            delivered.append(time.perf_counter())
            wake.set()

        def stall():
            time.sleep(3 * GAP)                               # descheduled: the timer is now overdue
            loop.call_soon(lambda: loop.call_soon(deliver))    # the socket's arrivals, read after it

        loop.call_later(GAP / 4, stall)
        waited = await AdmissionWindow(GAP).gather(wake)
        return waited, delivered

    waited, delivered = run(scenario())
    assert delivered, "the arrival was never delivered"
    assert waited >= 2, "the window closed on the overdue timer and split the burst"


def test_a_zero_gap_disables_the_window():
    async def scenario():
        return await AdmissionWindow(0.0).gather(asyncio.Event())

    assert run(scenario()) == 0
