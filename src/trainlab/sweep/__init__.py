"""Sweeps: a grid of runs, K at a time, and a report that draws the conclusion (see spec.py,
runner.py, report.py)."""
