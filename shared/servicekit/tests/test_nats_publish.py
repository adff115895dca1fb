"""NatsBus.publish sends events in windows and awaits their acknowledgements together: what the
stream then holds, what a failure in the middle of a window reports, and how windows are cut."""

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from servicekit.events import Event
from servicekit.events.bus import BusUnavailable
from servicekit.events.envelope import event_from_message
from servicekit.events.nats_bus import PUBLISH_WINDOW, NatsBus, _windows
from servicekit.events.testing import drop_bus, make_bus, nats_reachable

needs_nats = pytest.mark.skipif(not nats_reachable(), reason="no NATS server at ALLIANCE_TEST_NATS_URL")


def _event(seq: int, resource: str, payload: bytes = b"{}") -> Event:
    return Event(id=str(uuid.uuid4()), seq=seq, service="referral", kind="resource", type="update",
                 occurred_at=seq, resource_type="Patient", resource_id=resource, version_id=seq, payload=payload)


@pytest_asyncio.fixture
async def bus() -> AsyncIterator[NatsBus]:
    found = make_bus("nats")
    assert isinstance(found, NatsBus)
    await found.start("referral")
    yield found
    await found.stop("referral")
    await drop_bus(found)


async def _stored(bus: NatsBus) -> list[int]:
    """The outbox sequence numbers of the stream's messages, in the stream's order."""
    import nats

    client = await nats.connect(bus.url)
    try:
        js = client.jetstream()
        last = (await js.stream_info(bus.stream)).state.last_seq
        return [event_from_message((raw := await js.get_msg(bus.stream, n)).headers, raw.data or b"").seq
                for n in range(1, last + 1)]
    finally:
        await client.close()


def test_windows_hold_one_event_per_resource_and_at_most_the_window() -> None:
    events = [_event(1, "a"), _event(2, "b"), _event(3, "a"), _event(4, "c"), _event(5, "b"), _event(6, "b")]
    assert [[e.seq for e in window] for window in _windows(events)] == [[1, 2], [3, 4, 5], [6]]
    many = [_event(n, f"p{n}") for n in range(PUBLISH_WINDOW * 2 + 1)]
    assert [len(window) for window in _windows(many)] == [PUBLISH_WINDOW, PUBLISH_WINDOW, 1]


@needs_nats
async def test_a_thousand_events_are_stored_once_each_in_outbox_order(bus: NatsBus) -> None:
    events = [_event(n, f"p{n % 7}") for n in range(1, 1001)]
    await bus.publish(events)
    assert await _stored(bus) == list(range(1, 1001))


@needs_nats
async def test_an_event_refused_inside_a_window_reports_those_acknowledged_before_it(bus: NatsBus) -> None:
    too_large = b"x" * (2 * 1024 * 1024)  # above the server's max_payload: the client refuses it
    events = [_event(1, "a"), _event(2, "b"), _event(3, "c", too_large), _event(4, "d")]
    with pytest.raises(BusUnavailable) as refused:
        await bus.publish(events)
    assert refused.value.accepted == 2
    assert await _stored(bus) == [1, 2]  # nothing after the refused one was sent
    await bus.publish([events[3]])  # the next publish goes on
    assert await _stored(bus) == [1, 2, 4]
