"""A replica process of the streams transport for the tests, without a worker tree.

It does what a wired worker will do with the core: take one entry when free, "run" it for
``--work`` seconds while the loop drives a LeaseKeeper (as the executor's supervise loop will),
complete it, and on SIGTERM hand a running task back. One line per event on stdout.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import redis

from activation.errors import StreamsError
from activation.transport.streams.client import Delivery, StreamsTransport
from activation.transport.streams.lease import LeaseKeeper

stopping = False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--worker", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--work", type=float, default=0.0)
    args = parser.parse_args()

    def stop(signum: int, frame: object) -> None:
        global stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    client = redis.Redis.from_url(args.url, decode_responses=True, socket_timeout=10)
    transport = StreamsTransport(client, args.worker, consumer=args.consumer, lease=args.lease)
    say("ready", args.consumer)
    while not stopping:
        sent = time.monotonic()
        try:
            delivery = transport.receive(0.2)
        except StreamsError as exc:  # Redis away: back off and ask again, as a worker would
            say("redis_error", str(exc).replace(" ", "_")[:60])
            time.sleep(0.1)
            continue
        if delivery is None:
            continue
        say("took", delivery.task_id, delivery.attempt)
        keeper = LeaseKeeper(lambda d=delivery: transport.renew(d), args.lease, held_since=sent)
        finish = time.monotonic() + args.work
        outcome = "ran"
        while time.monotonic() < finish:
            if keeper.should_abort():
                outcome = "lost"
                break
            if stopping:
                outcome = "handed_back" if transport.hand_back(delivery).ok else "lost"
                break
            time.sleep(0.01)
        if outcome == "ran":
            result = {"task_id": delivery.task_id, "status": "completed", "by": args.consumer}
            outcome = complete(transport, delivery, result)
        say(outcome, delivery.task_id, delivery.attempt)
    return 0


def complete(transport: StreamsTransport, delivery: Delivery, result: dict[str, str]) -> str:
    """Send the completion until Redis answers: it is idempotent, so a lost answer is no harm."""
    while True:
        try:
            return transport.complete(delivery, result).status
        except StreamsError:
            time.sleep(0.1)


def say(*words: object) -> None:
    print(" ".join(str(w) for w in words), flush=True)


if __name__ == "__main__":
    sys.exit(main())
