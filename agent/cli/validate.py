"""Offline checks of the node's input files: ``meshlet inventory validate``
and ``meshlet config validate`` (policy files: :mod:`.policy`)."""

from __future__ import annotations

import json
import sys

import click

from .common import OUTPUT, die, echo_json, load_config


@click.group()
def inventory() -> None:
    """Node inventory files (pods, nodes, namespaces)."""


@inventory.command("validate")
@click.argument("path", type=click.Path(dir_okay=False))
@OUTPUT
def inventory_validate(path, output) -> None:
    """Check an inventory file offline; errors name file:line:column and field."""
    from ..workloads.yamlfile import load_inventory
    from ..yamlsrc import SourceError

    try:
        inv = load_inventory(path)
    except SourceError as e:
        if output == "json":
            echo_json({"valid": False, "errors": [str(p) for p in e.errors]}, indent=None)
            sys.exit(1)
        die(str(e))
    except OSError as e:
        die(f"cannot read {path}: {e.strerror}")
    if output == "json":
        counts = {"nodes": len(inv.nodes), "pods": len(inv.pods)}
        if inv.services:
            counts["services"] = len(inv.services)
        echo_json({"valid": True, **counts}, indent=None)
    else:
        more = f", {len(inv.services)} services" if inv.services else ""
        click.echo(f"{path}: valid ({len(inv.nodes)} nodes, {len(inv.pods)} pods{more})")


@click.group()
def config() -> None:
    """Agent config files."""


@config.command("validate")
@click.argument("path", type=click.Path(dir_okay=False))
@OUTPUT
def config_validate(path, output) -> None:
    """Check an agent config offline and print it with defaults filled in."""
    cfg = load_config(path)
    d = cfg.to_dict()
    if output == "json":
        echo_json(d, default=str)
    else:
        click.echo(f"{path}: valid")
        import yaml

        click.echo(yaml.safe_dump(json.loads(json.dumps(d, default=str)), sort_keys=False))


COMMANDS = [inventory, config]
