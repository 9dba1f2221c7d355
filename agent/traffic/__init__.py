"""Traffic management core (#5): pure, sans-IO, the clock is passed in.

- :mod:`.policy` -- TrafficPolicy resources (model, defaults, loader);
- :mod:`.outcome` -- what one attempt to an endpoint ended with;
- :mod:`.lb` -- power-of-two-choices load balancing;
- :mod:`.retry` -- per-request retry decisions and the per-service retry budget;
- :mod:`.breaker` -- per-service limits (connections, pending, requests);
- :mod:`.outlier` -- per-endpoint outlier ejection.

Nothing here opens a socket, starts a task or reads the time: the proxy's
asyncio shell feeds events (with ``now`` from its monotonic clock) and acts
on the decisions.
"""
