"""The worker tree: listener and its wake sources, the work queue, executor and agent tree, heartbeat."""
