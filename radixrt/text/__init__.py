"""Text side of the router: incremental detokenization and stop strings."""

from radixrt.text.detokenizer import DetokStep, IncrementalDetokenizer, StopMatcher

__all__ = ["DetokStep", "IncrementalDetokenizer", "StopMatcher"]
