"""Evaluation as in the G-OPD paper (placeholder, filled below)."""
