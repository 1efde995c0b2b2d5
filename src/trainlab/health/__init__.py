"""Health of a run: preflight checks, live detectors and the statistics they rest on."""
