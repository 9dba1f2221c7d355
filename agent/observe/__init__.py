"""The node's observability views, built by the agent from what the kernel and the proxies report:
flow views (``meshlet flows``), per-pair stats (``meshlet stats``) and the Prometheus endpoint."""
