"""The Redis Streams transport (ACTIVATION_TRANSPORT=streams): tasks and results between hosts.

`keys` names everything in Redis, `scripts` holds the atomic steps in Lua, `client` is the typed
API over them and `connect` builds the Redis client (one server, a Cluster, or Sentinel).
`lease` keeps a lease from the executor's loop, `inbox` turns an entry into a local task file,
`outbox` is the orchestrator's side, `link` a program's lazily connected transport under one
outage rule. The worker tree's side lives in worker/stream_feed.py (the executor is the consumer)
and worker/replica_beat.py (the heartbeat's replica state and consumer pruning).
"""
