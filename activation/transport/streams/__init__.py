"""The Redis Streams transport (ACTIVATION_TRANSPORT=streams): tasks and results between hosts.

`keys` names everything in Redis, `scripts` holds the atomic steps in Lua, `client` is the typed
API over them and `connect` builds the Redis client (one server, a Cluster, or Sentinel).
`lease` keeps a lease from the executor's loop, `inbox` turns an entry into a local task file,
`outbox` is the orchestrator's side. Not wired into the worker tree or the orchestrator yet.
"""
