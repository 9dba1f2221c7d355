"""meshlet: an eBPF-accelerated, sidecarless service mesh node agent."""

__version__ = "0.1.0"
