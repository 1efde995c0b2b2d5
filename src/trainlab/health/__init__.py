"""Health of a run: preflight checks, live detectors and the statistics they rest on.

`trainlab.health.Watch` (health/watch.py) runs the detectors in one's own training loop; it is
imported on first use, so importing trainlab.health.<module> stays as light as that module."""


def __getattr__(name: str):
    if name in ("Watch", "WatchError"):
        from trainlab.health import watch

        return getattr(watch, name)
    raise AttributeError(f"module 'trainlab.health' has no attribute {name!r}")
