"""Compatibility names: the service model lives in :mod:`agent.workloads.model`
and the ``services:`` reader in :mod:`agent.workloads.yamlfile`.  New code
imports from those (or from :mod:`agent.workloads`)."""

from agent.workloads.model import (
    APP_PROTOCOLS,
    Endpoint,
    Service,
    ServiceIndex,
    ServicePort,
    services_doc,
)
from agent.workloads.yamlfile import (
    check_against_pods,
    load_services,
    parse_services,
    read_services,
)

__all__ = [
    "APP_PROTOCOLS",
    "ServicePort",
    "Service",
    "Endpoint",
    "ServiceIndex",
    "read_services",
    "parse_services",
    "load_services",
    "check_against_pods",
    "services_doc",
]
