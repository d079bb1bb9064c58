"""The orchestrator: dispatch policy, recovery of orphans, the admin HTTP API."""
