"""Evaluation: BIG-bench-style tasks, generators, scoring, PassUntil and the checkpoint harness."""
