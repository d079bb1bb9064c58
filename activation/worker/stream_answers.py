"""What the streams side (stream_feed.py) answers the executor besides a lease or a verdict, and
the idle executor's block on the stream: plain values, so that the executor in files mode names
them without importing redis (and asyncio with it: about 9 MB of every idle executor).
"""

IDLE_BLOCK = 0.25  # seconds an idle executor blocks on the stream: how soon it notices SIGTERM
NOT_STREAMED = "not_streamed"  # a task that never was on the stream: the spool's own rules apply
PUT_BACK = "put_back"  # not to run now (a predecessor's delivery, or Redis is away): put it back
DROPPED = "dropped"  # its lease is gone: the local copy was dropped, nothing runs
DEAD_LETTERED = "dead"  # the entry went to the stream's dead letter (client.DEAD)
