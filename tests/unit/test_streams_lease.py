"""LeaseKeeper: when it renews and when it says abort, on a stepped clock with a stub renewal."""

from __future__ import annotations

import pytest

from activation.errors import StreamsError
from activation.transport.streams.client import REFUSED, RENEWED, Verdict
from activation.transport.streams.lease import LeaseKeeper


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Renewals:
    """A stub of StreamsTransport.renew: answers from a script of verdicts or errors."""

    def __init__(self, *answers: Verdict | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> Verdict:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else Verdict(RENEWED)
        if isinstance(answer, Exception):
            raise answer
        return answer


def keeper(renew: Renewals, clock: Clock, lease: float = 120.0, margin: float = 0.0) -> LeaseKeeper:
    return LeaseKeeper(renew, lease, held_since=clock.now, margin=margin, clock=clock, task_id="t1")


def test_it_renews_every_quarter_lease_and_never_before():
    clock, renew = Clock(), Renewals()
    lease = keeper(renew, clock)
    clock.now += 29.9
    assert lease.should_abort() is False and renew.calls == 0
    clock.now += 0.1
    assert lease.should_abort() is False and renew.calls == 1
    clock.now += 29.9
    assert lease.should_abort() is False and renew.calls == 1
    clock.now += 0.1
    assert lease.should_abort() is False and renew.calls == 2 and lease.renewals == 2


def test_a_refused_renewal_says_abort_and_stays_lost():
    clock = Clock()
    renew = Renewals(Verdict(REFUSED, "b holds it at delivery 2", "not_holder"))
    lease = keeper(renew, clock)
    clock.now += 30
    assert lease.should_abort() is True
    assert lease.lost is not None and "not_holder" in lease.lost
    clock.now += 1
    assert lease.should_abort() is True and renew.calls == 1


def test_a_stalled_executor_says_abort_on_waking_without_trying_to_renew():
    clock, renew = Clock(), Renewals()
    lease = keeper(renew, clock)
    clock.now += 121  # SIGSTOP past the lease: no call happened in between
    assert lease.should_abort() is True and renew.calls == 0
    assert "no renewal confirmed" in (lease.lost or "")


def test_redis_unreachable_is_retried_until_the_lease_runs_out():
    clock = Clock()
    renew = Renewals(*[StreamsError("connection refused")] * 100)
    lease = keeper(renew, clock)
    aborted = False
    while not aborted and clock.now < 1000 + 200:
        clock.now += 1
        aborted = lease.should_abort()
    assert aborted and clock.now == pytest.approx(1000 + 120)
    assert renew.calls > 1  # retried, more often than once a quarter lease


def test_a_renewal_that_comes_back_restarts_the_lease_from_when_it_was_sent():
    clock = Clock()
    renew = Renewals(StreamsError("timeout"), Verdict(RENEWED))
    lease = keeper(renew, clock)
    clock.now += 30
    assert lease.should_abort() is False  # failed: retry soon
    clock.now += 7.5
    assert lease.should_abort() is False and lease.confirmed_at == clock.now
    clock.now += 119
    assert lease.should_abort() is False  # renewed again on the way, well inside the lease


def test_the_margin_gives_up_earlier_by_the_kill_grace():
    clock = Clock()
    renew = Renewals(*[StreamsError("down")] * 100)
    lease = keeper(renew, clock, lease=20, margin=5)
    clock.now += 14.9
    assert lease.should_abort() is False
    clock.now += 0.1
    assert lease.should_abort() is True


def test_a_margin_as_long_as_the_lease_is_refused():
    with pytest.raises(ValueError, match="margin"):
        LeaseKeeper(Renewals(), 10, held_since=0, margin=10)
