"""Runnable examples of beamlet. ``make demo`` runs ``python -m examples.demo``."""
