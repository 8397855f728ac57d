"""Forwarded headers behind trusted proxies: which address in ``X-Forwarded-For`` is the client.

The rule: a forwarded header counts only when the immediate peer (``REMOTE_ADDR``) is a trusted
proxy, and the client is the right-most address in the chain that is not a trusted proxy (each
trusted proxy appends the address it saw; everything left of the first untrusted one is the
client's to forge).

django-ipware parses the header tokens (ports, brackets, RFC 7239 ``for=``, IPv4-mapped IPv6,
addresses no client can have); the walk is ours, because ipware's ``proxy_trusted_ips`` means
something else: it matches the *last N hops of the header* against N entries in order and never
looks at ``REMOTE_ADDR``. So a client connecting directly with ``X-Forwarded-For: <forged>,
<proxy>`` was believed, and a single nginx (which sends the client alone, its own address being
``REMOTE_ADDR``) was never believed.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from typing import TypeAlias

from python_ipware.modern.parsers import (
    TIER_REJECT,
    forwarded_for,
    ip_tier,
    parse_ip,
    split_unquoted,
    unwrap_ipv4_network,
)

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=16)
def trusted_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """``TRUSTED_PROXY_IPS`` as networks: each entry an address or a CIDR network.

    :raises ValueError: an entry is neither (ipware's text prefixes such as ``"10.0."`` are
        refused: write ``"10.0.0.0/16"``, which says the same without ambiguity).
    """
    networks: list[Network] = []
    for entry in entries:
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"{entry!r} is not an IP address or a CIDR network (such as '10.0.0.0/8')"
            ) from None
        # An IPv4-mapped entry ("::ffff:10.0.0.1") matches the IPv4 hop ipware unwraps it to.
        networks.append(unwrap_ipv4_network(network))
    return tuple(networks)


def peer_address(remote_addr: object) -> Address | None:
    """``REMOTE_ADDR`` as an address, or ``None`` when it is not one a client can have."""
    if not isinstance(remote_addr, str):
        return None
    return _client_address(remote_addr)


def _client_address(token: str) -> Address | None:
    ip = parse_ip(token)
    if ip is None or ip_tier(ip) == TIER_REJECT:
        return None
    return ip


def _is_trusted(ip: Address, networks: Sequence[Network]) -> bool:
    # ``in`` does not compare versions by itself.
    return any(ip.version == network.version and ip in network for network in networks)


def forwarded_client(
    peer: Address, header: str | None, networks: Sequence[Network]
) -> Address | None:
    """The client of a request from ``peer`` carrying the forwarded chain ``header``.

    ``None`` means: believe the peer itself (it is no trusted proxy, there is no header, or a
    hop a trusted proxy wrote is not an address). When every hop is a trusted proxy, the
    left-most is the client (an internal host calling through the proxy). Linear in the header.
    """
    if not header or not _is_trusted(peer, networks):
        return None
    hop: Address | None = None
    for token in reversed(split_unquoted(header, ",")):
        # RFC 7239 elements carry the address in "for="; plain tokens are the address.
        hop = _client_address(forwarded_for(token) if "=" in token else token)
        if hop is None:
            return None
        if not _is_trusted(hop, networks):
            return hop
    return hop


def first_header(meta: dict[str, object], names: Iterable[str]) -> str | None:
    """The value of the first of ``names`` (``request.META`` keys) the request carries."""
    for name in names:
        value = meta.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None
