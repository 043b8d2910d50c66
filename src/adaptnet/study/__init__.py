"""Studies from a script: train models side by side and compare them in one table
(:func:`compare_models`, also ``adaptnet.compare``), and time them side by side
(:func:`time_together`: interleaved rounds, medians)."""

from adaptnet.study._compare import Comparison, compare_models
from adaptnet.study._timing import headline, time_inference, time_together

__all__ = ["Comparison", "compare_models", "headline", "time_inference", "time_together"]
