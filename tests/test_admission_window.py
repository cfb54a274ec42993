"""The idle batcher's admission window (batcher/admission_window.py): a burst is gathered into one
first step, a lone request pays about one gap, and a process stall never splits a burst.

The window is a matter of timers and arrival times, so the tests run it on an event loop with a
virtual clock: time only moves when every task is waiting (straight to the next timer), and a stall
is a jump of the clock. The counts below are then exact on any box, however loaded."""
import asyncio
import selectors

import pytest

from batcher import admission_window
from batcher.admission_window import AdmissionWindow

GAP = 0.01


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """loop.time() is virtual; an idle loop jumps the clock to its next timer instead of sleeping."""

    def __init__(self):
        super().__init__(selectors.DefaultSelector())
        self.now = 1000.0
        real_select = self._selector.select

        def select(timeout=None):
            ready = real_select(0)          # never block: there is no real I/O in these tests
            if not ready and timeout:
                self.now += timeout
            return ready
        self._selector.select = select

    def time(self) -> float:
        return self.now

    def stall(self, seconds: float) -> None:
        """The process was descheduled: the clock moved on while nothing ran."""
        self.now += seconds


@pytest.fixture
def loop(monkeypatch):
    lp = VirtualClockLoop()
    # the window reads time.perf_counter() to tell a stall from loop jitter: the same virtual clock
    monkeypatch.setattr(admission_window, "time", type("VirtualTime", (), {"perf_counter": staticmethod(lp.time)}))
    yield lp
    lp.close()


def test_a_lone_request_pays_one_gap(loop):
    async def scenario():
        t0 = loop.time()
        waited = await AdmissionWindow(GAP).gather(asyncio.Event())
        return waited, loop.time() - t0

    waited, took = loop.run_until_complete(scenario())
    assert waited == 1
    assert took == pytest.approx(GAP)     # one gap, not a second one


def test_arrivals_closer_than_the_gap_extend_the_window_up_to_the_cap(loop):
    async def scenario(arrivals: int, max_windows: int = 10):
        wake = asyncio.Event()
        for i in range(1, arrivals + 1):
            loop.call_later(i * GAP * 0.4, wake.set)
        t0 = loop.time()
        waited = await AdmissionWindow(GAP, max_windows=max_windows).gather(wake)
        return waited, loop.time() - t0

    # two arrivals 0.4 gap apart, each inside the open window; then one quiet gap closes it
    waited, took = loop.run_until_complete(scenario(2))
    assert waited == 3 and took == pytest.approx(2 * 0.4 * GAP + GAP)
    # a stream that never pauses is cut at max_windows
    assert loop.run_until_complete(scenario(20, max_windows=4))[0] == 4


def test_an_arrival_after_the_window_closed_is_not_waited_for(loop):
    async def scenario():
        wake = asyncio.Event()
        loop.call_later(1.5 * GAP, wake.set)
        t0 = loop.time()
        return await AdmissionWindow(GAP).gather(wake), loop.time() - t0

    waited, took = loop.run_until_complete(scenario())
    assert waited == 1 and took == pytest.approx(GAP)


@pytest.mark.parametrize("read_after", ["two loop turns", "a tenth of a gap"])
def test_a_stall_past_the_gap_does_not_split_the_burst(loop, read_after):
    """The process is descheduled past the gap; the arrivals that came meanwhile are read from the
    socket only after the window's overdue timer has been handled (two loop turns later, or - the
    window has already looked and seen nothing - a tenth of a gap later). The window must still take
    them in."""
    async def scenario():
        wake = asyncio.Event()
        delivered = []

        def deliver():
            delivered.append(loop.time())
            wake.set()

        def stall():
            loop.stall(3 * GAP)                               # descheduled: the timer is now overdue
            if read_after == "two loop turns":
                loop.call_soon(lambda: loop.call_soon(deliver))
            else:
                loop.call_later(GAP / 10, deliver)

        loop.call_later(GAP / 4, stall)
        waited = await AdmissionWindow(GAP).gather(wake)
        return waited, delivered

    waited, delivered = loop.run_until_complete(scenario())
    assert delivered, "the arrival was never delivered"
    assert waited == 2, "the window closed on the overdue timer and split the burst"


def test_a_late_timer_alone_gets_one_more_gap_and_then_closes(loop):
    """A stall with nothing arriving: one extra gap (the arrivals might still be in the socket), no more."""
    async def scenario():
        loop.call_later(GAP / 4, lambda: loop.stall(3 * GAP))
        t0 = loop.time()
        return await AdmissionWindow(GAP).gather(asyncio.Event()), loop.time() - t0

    waited, took = loop.run_until_complete(scenario())
    # the timer fired 3 gaps late (at 3.25 gaps), then one more gap
    assert waited == 1 and took == pytest.approx(3.25 * GAP + GAP)


def test_a_zero_gap_disables_the_window(loop):
    async def scenario():
        return await AdmissionWindow(0.0).gather(asyncio.Event())

    assert loop.run_until_complete(scenario()) == 0
