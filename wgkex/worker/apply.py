"""Installing a batch of keys, in the pool's keys lane: peers, then /128 routes and FDB entries.

:func:`apply_batch` takes ``domain -> keys`` (the batch the
:class:`~wgkex.worker.peers.KeyApplier` collected on the reactor) and does per
domain, in chunks of at most :data:`CHUNK` keys: one ``add_peers``, one
``replace_routes`` and one ``append_fdb`` for the keys whose peer is in. The
chunks form a two-stage pipeline: while rtnetlink installs the routes and FDB
entries of chunk *n*, the lane's WireGuard thread adds the peers of chunk
*n + 1* (wireguard-go and the kernel each keep a CPU busy; in sequence a burst
would cost their sum).

Every key ends either applied or failed with a :class:`KeyFailure`; what
happens to a failed key next is the retry policy of :mod:`wgkex.worker.retry`
(this module's part of it: a WireGuard call whose outcome is unknown is
bisected, so one bad key never sinks the others). One domain's trouble never
stops another's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from wgkex.keys import lladdr
from wgkex.worker.backend import BackendError, InterfaceMissing, PeersFailed, WireGuard
from wgkex.worker.domains import Interfaces
from wgkex.worker.pool import Backends

#: Keys per step of the apply pipeline: small enough that the steps overlap
#: well (wireguard-go takes about 80 µs per new peer), large enough that a
#: UAPI transaction and a netlink send carry many keys.
CHUNK = 256


@dataclass(frozen=True)
class KeyFailure:
    """Why one key could not be installed."""

    reason: str  # one of metrics.FAILURE_REASONS
    message: str


@dataclass
class DomainResult:
    """What became of one domain's keys in a batch."""

    applied: list[str] = field(default_factory=list)
    failed: dict[str, KeyFailure] = field(default_factory=dict)


def _add_peers(
    wg: WireGuard, iface: str, keys: Sequence[str], addresses: Mapping[str, str], failed: dict[str, KeyFailure]
) -> list[str]:
    """Add ``keys`` as peers; returns those that are in.

    :class:`PeersFailed` names the refused keys. After any other error the outcome is
    unknown (retrying is safe): the batch is bisected, so one bad key costs about
    ``2 log2(n)`` extra calls and never sinks the others.
    """
    if not keys:
        return []
    try:
        wg.add_peers(iface, [(k, addresses[k] + "/128") for k in keys])
        return list(keys)
    except InterfaceMissing as exc:
        for key in keys:
            failed[key] = KeyFailure("interface_missing", str(exc) or f"interface {iface} is missing")
        return []
    except PeersFailed as exc:
        # The backend knows exactly which peers it refused; all others are in.
        for key, why in exc.failed.items():
            failed[key] = KeyFailure("wireguard", why)
        return [k for k in keys if k not in exc.failed]
    except Exception as exc:
        reason = "wireguard" if isinstance(exc, BackendError) else "internal"
        if len(keys) == 1:
            failed[keys[0]] = KeyFailure(reason, f"{type(exc).__name__}: {exc}")
            return []
    middle = len(keys) // 2
    return _add_peers(wg, iface, keys[:middle], addresses, failed) + _add_peers(
        wg, iface, keys[middle:], addresses, failed
    )


def _rtnl_step(
    step: Callable[[list[str]], Mapping[str, str]],
    reason: str,
    keys: list[str],
    addresses: Mapping[str, str],
    failed: dict[str, KeyFailure],
) -> list[str]:
    """Run one rtnetlink step for ``keys``; returns the keys it did not fail."""
    if not keys:
        return []
    try:
        failures = step([addresses[k] for k in keys])
    except InterfaceMissing as exc:
        for key in keys:
            failed[key] = KeyFailure("interface_missing", str(exc))
        return []
    except Exception as exc:
        why = reason if isinstance(exc, BackendError) else "internal"
        for key in keys:
            failed[key] = KeyFailure(why, f"{type(exc).__name__}: {exc}")
        return []
    ok = []
    for key in keys:
        problem = failures.get(addresses[key])
        if problem is None:
            ok.append(key)
        else:
            failed[key] = KeyFailure(reason, problem)
    return ok


def apply_domain(
    backends: Backends, ifaces: Interfaces, keys: Sequence[str], chunk: int = CHUNK
) -> DomainResult:
    """Install ``keys`` on one domain: peers, then routes and FDB entries for the keys whose peer is in.

    Chunk by chunk; the peers of the next chunk are added (in the WireGuard
    thread) while the routes and FDB entries of this one are installed. Returns
    only once nothing it started is still running.
    """
    result = DomainResult()
    addresses = {k: lladdr(k) for k in keys}
    chunks = [list(keys[i : i + chunk]) for i in range(0, len(keys), max(1, chunk))]

    def add_peers(part: list[str]) -> Callable[[WireGuard], tuple[list[str], dict[str, KeyFailure]]]:
        def add(wireguard: WireGuard) -> tuple[list[str], dict[str, KeyFailure]]:
            failed: dict[str, KeyFailure] = {}  # its own: the job thread writes result.failed meanwhile
            return _add_peers(wireguard, ifaces.wg, part, addresses, failed), failed

        return add

    adding: Future[tuple[list[str], dict[str, KeyFailure]]] | None = None
    if chunks:
        adding = backends.start_wireguard(add_peers(chunks[0]))
    try:
        for n in range(len(chunks)):
            assert adding is not None
            with_peer, failed = adding.result()
            adding = backends.start_wireguard(add_peers(chunks[n + 1])) if n + 1 < len(chunks) else None
            result.failed.update(failed)
            routed = _rtnl_step(
                lambda addrs: backends.rtnl.replace_routes(ifaces.wg, addrs),
                "route",
                with_peer,
                addresses,
                result.failed,
            )
            # The FDB entry is independent of the route: add it for every key whose peer is in.
            with_fdb = set(
                _rtnl_step(
                    lambda addrs: backends.rtnl.append_fdb(ifaces.vx, ifaces.wg, addrs),
                    "fdb",
                    with_peer,
                    addresses,
                    result.failed,
                )
            )
            result.applied.extend(k for k in routed if k in with_fdb)
    finally:
        if adding is not None:
            # Something failed here: still let the started step end before the job does.
            try:
                adding.result()
            except BaseException:
                pass
    return result


def apply_batch(
    backends: Backends, batch: Mapping[str, Sequence[str]], interfaces: Mapping[str, Interfaces]
) -> dict[str, DomainResult]:
    """Apply a batch (domain -> keys) in the pool thread; one domain's trouble never stops another."""
    results: dict[str, DomainResult] = {}
    for domain, keys in batch.items():
        try:
            results[domain] = apply_domain(backends, interfaces[domain], keys)
        except Exception as exc:  # a bug, not a kernel refusal: still isolate it to this domain
            results[domain] = DomainResult(
                failed={k: KeyFailure("internal", f"{type(exc).__name__}: {exc}") for k in keys}
            )
    return results


__all__ = ["CHUNK", "DomainResult", "KeyFailure", "apply_batch", "apply_domain"]
