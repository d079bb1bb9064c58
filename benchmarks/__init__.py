"""`make bench`: activation latency, burst throughput and idle cost of a real worker tree."""
