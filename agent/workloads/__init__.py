"""Workloads: the model (:mod:`.model`), where it comes from (:mod:`.source`:
the interface; :mod:`.filesource`: the YAML file; :mod:`.yamlfile`: its
reader)."""

from agent.workloads.model import (
    APP_PROTOCOLS,
    Endpoint,
    Inventory,
    InventoryDiff,
    NamespaceSettings,
    Node,
    Pod,
    Service,
    ServiceIndex,
    ServicePort,
    diff,
    services_doc,
    workload_id,
)
from agent.workloads.source import SourceStatus, WorkloadSource, source_from_config
from agent.workloads.yamlfile import (
    check_against_pods,
    load_inventory,
    load_services,
    parse_inventory,
    parse_services,
    read_services,
)

__all__ = [
    "APP_PROTOCOLS",
    "Endpoint",
    "Inventory",
    "InventoryDiff",
    "NamespaceSettings",
    "Node",
    "Pod",
    "Service",
    "ServiceIndex",
    "ServicePort",
    "diff",
    "services_doc",
    "workload_id",
    "SourceStatus",
    "WorkloadSource",
    "source_from_config",
    "check_against_pods",
    "load_inventory",
    "load_services",
    "parse_inventory",
    "parse_services",
    "read_services",
]
