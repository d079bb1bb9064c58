"""The watchdog internals that worker/wake/inotify.py subclasses, checked so an upgrade fails here, loudly.

setup.cfg pins watchdog to one exact version because the inotify source reaches past watchdog's
public API (for speed: no move pairing, dispatch on the emitter thread, an overflow hook). Each
test names one private piece it relies on. When you upgrade watchdog, re-check each of them in the
new source, then move the pin and PINNED together.
"""

from __future__ import annotations

import dataclasses
import inspect
from importlib.metadata import version

from watchdog.observers.inotify import InotifyEmitter, InotifyFullEmitter, InotifyObserver, InotifyWatchGroup
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

from activation.worker.wake import inotify as source

PINNED = "7.1.0"


def test_watchdog_is_the_pinned_version() -> None:
    assert version("watchdog") == PINNED, "re-check every test in this file against the new watchdog, then move the pin"


def test_watch_group_is_a_dataclass_with_a_replaceable_move_grouper() -> None:
    fields = {f.name: f for f in dataclasses.fields(InotifyWatchGroup)}
    assert "_move_event_grouper" in fields and fields["_move_event_grouper"].init is False
    # our subclass swaps the grouper for one that never pairs
    ours = {f.name: f for f in dataclasses.fields(source._WatchGroup)}["_move_event_grouper"]
    assert isinstance(ours.default_factory(), source._UnpairedMoves)  # type: ignore[misc]
    assert {"on_queue_overflow"} <= set(vars(InotifyWatchGroup))


def test_move_grouper_pairing_hooks_exist_with_our_signatures() -> None:
    for name in ("_group_moved_to_event", "get_queued_moved_from_event"):
        theirs = inspect.signature(getattr(InotifyMoveEventGrouper, name))
        ours = inspect.signature(getattr(source._UnpairedMoves, name))
        assert list(theirs.parameters) == list(ours.parameters), name


def test_emitter_builds_its_watch_group_in_on_thread_start_from_inotify_fd() -> None:
    code = inspect.getsource(InotifyEmitter.on_thread_start)
    assert "self._inotify = InotifyWatchGroup(" in code and "self._inotify_fd" in code
    assert issubclass(InotifyFullEmitter, InotifyEmitter)
    assert "self._inotify_fd" in inspect.getsource(InotifyEmitter.__init__)


def test_observer_builds_emitters_from_emitter_class_and_kwargs() -> None:
    observer = InotifyObserver(generate_full_events=True)
    try:
        assert observer._emitter_class is InotifyFullEmitter
        assert isinstance(observer._emitter_kwargs, dict)
        assert hasattr(observer._inotify_fd, "name")
    finally:
        observer._inotify_fd.stop()
        observer._inotify_fd.join(2)
