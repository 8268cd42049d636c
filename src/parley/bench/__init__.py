"""`parley bench`: a load generator and the measurements of fan-out, latency, memory and catch-up."""

from parley.bench.command import add_arguments, run

__all__ = ["add_arguments", "run"]
