"""IP address helpers shared by the workload model (pods by IP, services by VIP)."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalize_ip(ip: str | IPAddress) -> IPAddress | None:
    """The address ``ip`` denotes, in the form the inventory keys addresses by;
    None when ``ip`` is not an address.

    - Text is stripped of surrounding blanks; IPv6 text is normalised
      (``FD00:0::1`` is ``fd00::1``).
    - IPv4-mapped IPv6 (``::ffff:10.0.0.1``, as dual-stack sockets report
      IPv4 peers) becomes the IPv4 address.
    - A ``%scope`` zone index is dropped from IPv6 addresses
      (``fe80::1%eth0`` is ``fe80::1``): pods and VIPs are keyed without one,
      and sockets report link-local peers with it.  Zones exist only for IPv6
      (RFC 4007), so IPv4 text with a ``%`` (``10.0.0.1%eth0``) is *not* an
      address and gives None, as do an empty zone (``fe80::1%``) and any other
      text the standard library's ``ipaddress`` refuses.
    """
    if isinstance(ip, str):
        try:
            ip = ipaddress.ip_address(ip.strip())
        except ValueError:
            return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id:
            return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip
