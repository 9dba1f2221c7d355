"""Compatibility names: the inventory model lives in :mod:`agent.workloads.model`
and the YAML file reader in :mod:`agent.workloads.yamlfile`.  New code imports
from those (or from :mod:`agent.workloads`)."""

from agent.workloads.model import Inventory, InventoryDiff, NamespaceSettings, Node, Pod, diff
from agent.workloads.yamlfile import load_inventory, parse_inventory

__all__ = [
    "Node",
    "Pod",
    "NamespaceSettings",
    "Inventory",
    "InventoryDiff",
    "load_inventory",
    "parse_inventory",
    "diff",
]
