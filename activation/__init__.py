"""activation: wake AI-agent workers the moment a task arrives, and lose no task on the way."""

__version__ = "0.1.0"
