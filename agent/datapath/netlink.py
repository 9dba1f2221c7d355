"""Interface lookups through netlink (pyroute2), for the datapath only."""

from __future__ import annotations


def route_oif(ip: str) -> tuple[int, str] | None:
    """(ifindex, ifname) of the interface the kernel would route ``ip`` out of,
    in the caller's network namespace; None when there is no route."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=ip)
        except Exception:  # noqa: BLE001 - NetlinkError (no route, unreachable) or any other: no route
            return None
        if not routes:
            return None
        oif = routes[0].get_attr("RTA_OIF")
        if oif is None:
            return None
        links = ipr.get_links(oif)
        name = links[0].get_attr("IFLA_IFNAME") if links else str(oif)
        return oif, name


def ifindex_alive(ifindex: int, name: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            links = ipr.get_links(ifindex)
        except Exception:  # noqa: BLE001 - NetlinkError (no such link) or any other: not alive
            return False
        return bool(links) and links[0].get_attr("IFLA_IFNAME") == name
