"""Declarative initialisation, applied once per unique tensor.

``initialize(model, {"Linear.weight": "kaiming_uniform(nonlinearity=relu)", "bias": "zeros"})``
"""

from adaptnet.init._rules import InitReport, InitRow, init_report, initialize
from adaptnet.init._schemes import SCHEMES, Scheme, parse_scheme

__all__ = ["SCHEMES", "InitReport", "InitRow", "Scheme", "init_report", "initialize",
           "parse_scheme"]
