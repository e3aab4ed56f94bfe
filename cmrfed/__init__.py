"""cmrfed: federated, parameter-efficient fine-tuning of the CineMA cine CMR foundation model.

Stages (each a function of its input files and options to its output files):
``synth`` -> ``prepare`` -> ``federate`` -> ``evaluate`` -> ``compare``; ``demo`` runs them all.
"""

__version__ = "0.1.0"
