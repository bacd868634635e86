"""Which sidecars a fleet-wide client follows: a list of addresses, or ``dns:///name:port`` names.

A fleet of engines (an RL rollout fleet behind a router, several multi-node engines)
has one sidecar per engine. A guard or the CLI follows all of them: ``targets`` is a
list of ``host:port`` addresses and ``dns:///name:port`` names, the latter resolved to
every address behind the name (a Kubernetes headless Service lists one address per
pod) and re-resolved periodically so pods that come and go are followed. gRPC's own
``dns:///`` target would pick one address and balance calls over them; a guard needs
the stream of every sidecar, so the name is resolved here instead.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Sequence

#: Resolves (host, port) to IP address strings; the default uses socket.getaddrinfo.
Resolver = Callable[[str, int], Iterable[str]]

DNS_PREFIX = "dns:///"


def getaddrinfo_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6), as the system resolver gives them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def split_targets(targets: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` as a list of non-empty, distinct targets (order kept)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"a sidecar target must be a string like '127.0.0.1:50151', got {item!r}")
        item = item.strip()
        if item and item not in out:
            out.append(item)
    if not out:
        raise ValueError(
            "no sidecar given: pass an address like '127.0.0.1:50151', a list of them, "
            "or a name like 'dns:///sidecars.ns.svc:50151'"
        )
    return out


def parse_dns(target: str) -> tuple[str, int] | None:
    """(host, port) of a ``dns:///host:port`` target; None for a plain address."""
    if not target.startswith(DNS_PREFIX):
        return None
    rest = target[len(DNS_PREFIX) :]
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ValueError(
            f"a dns target must be 'dns:///NAME:PORT' (e.g. dns:///sidecars.ns.svc:50151), got {target!r}"
        )
    return host, int(port)


def address(ip: str, port: int) -> str:
    """A gRPC target for one resolved address (IPv6 in brackets)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def has_dns(targets: Sequence[str]) -> bool:
    return any(t.startswith(DNS_PREFIX) for t in targets)


def expand(targets: Sequence[str], resolver: Resolver | None = None) -> tuple[list[str], list[str]]:
    """The addresses behind ``targets`` and the errors met resolving them.

    A name that does not resolve contributes no address and one error (the caller logs
    it and tries again at the next resolution); the other targets are still returned.
    """
    resolve = resolver or getaddrinfo_resolver
    out: list[str] = []
    errors: list[str] = []
    for t in targets:
        dns = parse_dns(t)
        if dns is None:
            found = [t]
        else:
            host, port = dns
            try:
                found = [address(ip, port) for ip in resolve(host, port)]
            except OSError as exc:
                errors.append(f"{t}: {exc}")
                continue
        for a in found:
            if a not in out:
                out.append(a)
    return out, errors


__all__ = [
    "DNS_PREFIX",
    "Resolver",
    "address",
    "expand",
    "getaddrinfo_resolver",
    "has_dns",
    "parse_dns",
    "split_targets",
]
