"""Complete verification: verdicts for properties (VNN-LIB), attacks that find counterexamples."""
from .verify import Counterexample, Verdict, verify

__all__ = ["Counterexample", "Verdict", "verify"]
