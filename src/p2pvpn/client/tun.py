"""The TUN device: ``/dev/net/tun`` with ``TUNSETIFF``, configured over netlink.

The device is created non-persistent: it disappears as soon as its file
descriptor is closed, so a crashed client leaves nothing behind except in the
rare case of a persistent device of the same name (see `TunDevice.remove_stale`).

With offloads (``TunDevice.open(..., offload=True)``) the device is opened with
``IFF_VNET_HDR``: every packet read or written carries a virtio-net header
(`p2pvpn.wire.virtio`), and ``TUNSETOFFLOAD`` lets the kernel hand over TCP (and
UDP) super-packets with checksums left to finish. Only the compiled data plane
speaks that format.

Netlink calls go through pyroute2's synchronous ``IPRoute``. pyroute2 0.9 runs
that API on an asyncio loop of its own and fails with "This event loop is
already running" when called from a thread whose loop is running, so when a
loop is running in the calling thread the call is made on a short-lived helper
thread (a few milliseconds, the caller waits for it).
"""

import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from p2pvpn.client import _pyroute2
from p2pvpn.wire.virtio import TUN_F_CSUM, TUN_F_TSO4, TUN_F_USO4, TUN_F_USO6

if TYPE_CHECKING:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
else:
    IPRoute, NetlinkError = _pyroute2.load()

logger = logging.getLogger(__name__)

# Importing pyroute2 resets its logger to NOTSET, so with a DEBUG root logger
# (p2pvpn run -v) every netlink message would be logged. Keep it to warnings.
logging.getLogger("pyroute2").setLevel(logging.WARNING)

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16
"""Kernel buffer size for an interface name, including the terminating NUL."""
MAX_NAME_LENGTH = IFNAMSIZ - 1

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_PERSIST = 0x0800
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
_PLAIN_FLAGS = IFF_TUN | IFF_NO_PI
# What TUNSETOFFLOAD is asked for: all three, and where the kernel refuses that
# (USO came with Linux 6.2; an older one refuses the whole set), TCP's alone.
# USO is asked for as USO4|USO6: Linux refuses either alone. IPv6 packets that
# this lets through are dropped by the data plane like any IPv6 packet.
_TCP_OFFLOAD_FLAGS = TUN_F_CSUM | TUN_F_TSO4
_TCP_OFFLOADS = ("csum", "tso4")
_ALL_OFFLOAD_FLAGS = _TCP_OFFLOAD_FLAGS | TUN_F_USO4 | TUN_F_USO6
_ALL_OFFLOADS = (*_TCP_OFFLOADS, "uso4")
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags, padding to 40 bytes

_MAIN_TABLE = 254
_NEEDS_ROOT = "p2pvpn run needs root or CAP_NET_ADMIN"

_T = TypeVar("_T")


class TunError(OSError):
    """The TUN device could not be created or configured.

    ``str(error)`` is a complete, human-readable message that says what is
    missing; ``error.errno`` keeps the underlying errno when there is one.
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


def validate_name(name: str) -> None:
    """Raise `ValueError` unless ``name`` is a valid Linux interface name."""
    encoded = name.encode("utf-8", "surrogateescape")
    if not encoded:
        raise ValueError("TUN device name must not be empty")
    if len(encoded) > MAX_NAME_LENGTH:
        raise ValueError(
            f"TUN device name {name!r} is {len(encoded)} bytes long; "
            f"Linux allows at most {MAX_NAME_LENGTH}"
        )
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise ValueError(
            f"TUN device name {name!r} is invalid (no '/', ':' or whitespace, not '.' or '..')"
        )


def _netlink(func: Callable[[IPRoute], _T]) -> _T:
    """Run ``func`` with a fresh ``IPRoute``; safe to call from a running event loop."""

    def call() -> _T:
        with IPRoute() as ipr:
            return func(ipr)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return call()

    result: list[_T] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=worker, name="p2pvpn-netlink", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _netlink_or_fail(action: str, func: Callable[[IPRoute], _T]) -> _T:
    """`_netlink`, with a netlink or OS failure raised as ``TunError("cannot {action}: ...")``.

    A `TunError` that ``func`` raises itself already says what went wrong and passes through.
    """
    try:
        return _netlink(func)
    except TunError:
        raise
    except (NetlinkError, OSError) as exc:
        raise TunError(f"cannot {action}: {_describe(exc)}", _netlink_errno(exc)) from exc


def _netlink_errno(exc: BaseException) -> int | None:
    if isinstance(exc, NetlinkError):
        code = exc.code
        return code if isinstance(code, int) else None
    if isinstance(exc, OSError):
        return exc.errno
    return None


def _describe(exc: BaseException) -> str:
    code = _netlink_errno(exc)
    return os.strerror(code) if code else str(exc)


def _link_index(ipr: IPRoute, name: str) -> int | None:
    indices: list[int] = ipr.link_lookup(ifname=name)
    return indices[0] if indices else None


def _link_kind(ipr: IPRoute, index: int) -> str | None:
    links = ipr.link("get", index=index)
    if not links:
        return None
    kind = links[0].get(("linkinfo", "kind"))
    return kind if isinstance(kind, str) else None


def _routes_to(ipr: IPRoute, network: IPv4Network) -> list[Any]:
    routes: list[Any] = []
    for route in ipr.route("dump", family=socket.AF_INET, table=_MAIN_TABLE):
        dst = route.get("dst") or "0.0.0.0"
        if route["dst_len"] == network.prefixlen and dst == str(network.network_address):
            routes.append(route)
    return routes


def read_lan_facts(exclude: str) -> tuple[tuple[IPv4Address, ...], tuple[IPv4Network, ...]]:
    """This host's default gateways and the subnets of its interfaces but ``exclude`` and lo.

    Blocking (netlink): call it off the event loop, e.g. with ``asyncio.to_thread``.
    """

    def read(ipr: IPRoute) -> tuple[tuple[IPv4Address, ...], tuple[IPv4Network, ...]]:
        skipped = _link_index(ipr, exclude)
        subnets: dict[IPv4Network, None] = {}
        for message in ipr.get_addr(family=socket.AF_INET):
            address = message.get("IFA_ADDRESS") or message.get("IFA_LOCAL")
            if message["index"] == skipped or not address:
                continue
            network = IPv4Interface(f"{address}/{message['prefixlen']}").network
            if not network.is_loopback:
                subnets[network] = None
        gateways: dict[IPv4Address, None] = {}
        for route in ipr.route("dump", family=socket.AF_INET, table=_MAIN_TABLE):
            gateway = route.get("RTA_GATEWAY")
            if route["dst_len"] == 0 and gateway:
                gateways[IPv4Address(gateway)] = None
        return tuple(gateways), tuple(subnets)

    return _netlink_or_fail("read the routing table", read)


def _is_persistent(name: str) -> bool:
    """Whether the TUN device has IFF_PERSIST; unknown (no sysfs) counts as persistent."""
    try:
        flags = int(Path(f"/sys/class/net/{name}/tun_flags").read_text(), 16)
    except (OSError, ValueError):
        return True
    return bool(flags & IFF_PERSIST)


class TunDevice:
    """An open, non-persistent TUN device (``IFF_TUN | IFF_NO_PI``, non-blocking fd).

    ``fd`` is read and written directly by the data plane with ``os.read`` /
    ``os.write``, one IPv4 packet per call. ``offloads`` names the TUNSETOFFLOAD
    flags the kernel took (``"csum"``, ``"tso4"``, ``"uso4"``); when it is not
    empty, the device was opened with ``IFF_VNET_HDR`` and every packet on the fd
    is a virtio-net header followed by the IPv4 packet.
    """

    def __init__(self, name: str, fd: int, index: int, offloads: tuple[str, ...] = ()) -> None:
        self.name = name
        self.fd = fd
        self.index = index
        self.offloads = offloads
        self.address: IPv4Interface | None = None
        self.mtu: int | None = None
        self._routes: list[IPv4Network] = []
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"<TunDevice {self.name} index={self.index} {state} address={self.address}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def routes(self) -> tuple[IPv4Network, ...]:
        """The routes this object added and has not removed yet."""
        return tuple(self._routes)

    def fileno(self) -> int:
        return self.fd

    @classmethod
    def open(cls, name: str, mtu: int, *, offload: bool = False) -> Self:
        """Create the device ``name`` (``%d`` templates like ``tun%d`` allowed) with ``mtu``.

        With ``offload`` the device carries a virtio-net header on every packet and
        takes the offloads the kernel accepts (`offloads`); where it takes none, the
        device is opened plain instead, with a warning.
        """
        validate_name(name)
        _check_mtu(mtu)
        if offload:
            fd, actual, offloads = _create_offloaded(name)
        else:
            (fd, actual), offloads = _create(name, _PLAIN_FLAGS), ()
        try:
            device = cls(actual, fd, socket.if_nametoindex(actual), offloads)
            device._set_mtu(mtu)
        except BaseException:
            os.close(fd)
            raise
        logger.debug("opened TUN device %s (index %d, fd %d)", device.name, device.index, fd)
        if offloads:
            logger.info(
                "TUN device %s: offloads %s (virtio-net header on every packet)",
                device.name,
                "+".join(offloads),
            )
        return device

    def _set_mtu(self, mtu: int) -> None:
        _netlink_or_fail(
            f"set MTU {mtu} on {self.name}",
            lambda ipr: ipr.link("set", index=self.index, mtu=mtu),
        )
        self.mtu = mtu

    def configure(self, address: IPv4Interface, mtu: int) -> None:
        """Give the device ``address`` (replacing one set before), set ``mtu``, bring it up."""
        self._check_open()
        _check_mtu(mtu)
        previous = self.address

        def apply(ipr: IPRoute) -> None:
            ipr.link("set", index=self.index, mtu=mtu)
            if previous is not None and previous != address:
                _delete_address(ipr, self.index, previous)
            try:
                ipr.addr(
                    "add",
                    index=self.index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                )
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            ipr.link("set", index=self.index, state="up")

        _netlink_or_fail(f"configure {self.name} with {address}, MTU {mtu}", apply)
        self.address = address
        self.mtu = mtu
        logger.info("TUN device %s up: address %s, MTU %d", self.name, address, mtu)

    def add_route(self, network: IPv4Network) -> None:
        """Route ``network`` through the device. Adding a route that exists is not an error."""
        self._check_open()
        network = IPv4Network(network)
        dst, dst_len = str(network.network_address), network.prefixlen

        def add(ipr: IPRoute) -> bool:
            try:
                ipr.route("add", dst=dst, dst_len=dst_len, oif=self.index, table=_MAIN_TABLE)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
                if any(r.get("oif") == self.index for r in _routes_to(ipr, network)):
                    return False
                raise TunError(
                    f"cannot add route {network} via {self.name}: "
                    "a route to it already exists via another device",
                    errno.EEXIST,
                ) from exc
            return True

        if _netlink_or_fail(f"add route {network} via {self.name}", add):
            if network not in self._routes:
                self._routes.append(network)
            logger.info("route %s via %s added", network, self.name)
        else:
            logger.debug("route %s via %s already present", network, self.name)

    def remove_route(self, network: IPv4Network) -> None:
        """Remove the route to ``network`` via the device. Removing a missing route is fine."""
        self._check_open()
        network = IPv4Network(network)
        if network in self._routes:
            self._routes.remove(network)
        if _netlink_or_fail(
            f"remove route {network} via {self.name}",
            lambda ipr: _delete_route(ipr, self.index, network),
        ):
            logger.info("route %s via %s removed", network, self.name)

    def close(self) -> None:
        """Remove the routes added here and the address, then close the fd. Idempotent.

        Closing the fd deletes the (non-persistent) device. Netlink failures are
        logged, never raised: the fd is always closed.
        """
        if self._closed:
            return
        self._closed = True
        routes, self._routes = self._routes, []
        address = self.address

        def cleanup(ipr: IPRoute) -> None:
            for network in routes:
                try:
                    if _delete_route(ipr, self.index, network):
                        logger.info("route %s via %s removed", network, self.name)
                except NetlinkError as exc:
                    logger.warning(
                        "cannot remove route %s via %s: %s", network, self.name, _describe(exc)
                    )
            if address is not None:
                try:
                    _delete_address(ipr, self.index, address)
                except NetlinkError as exc:
                    logger.warning(
                        "cannot remove address %s from %s: %s", address, self.name, _describe(exc)
                    )

        try:
            if routes or address is not None:
                _netlink(cleanup)
        except Exception as exc:
            logger.warning("cannot clean up %s: %s", self.name, _describe(exc))
        finally:
            os.close(self.fd)
        logger.info("TUN device %s closed", self.name)

    @staticmethod
    def remove_stale(name: str) -> bool:
        """Delete a TUN device ``name`` left behind (for instance by a killed process).

        Returns True when a device was deleted. Refuses (`TunError`) to delete an
        interface of that name that is not a TUN device.
        """
        validate_name(name)

        def remove(ipr: IPRoute) -> bool:
            index = _link_index(ipr, name)
            if index is None:
                return False
            kind = _link_kind(ipr, index)
            if kind != "tun":
                raise TunError(
                    f"interface {name} exists and is not a TUN device "
                    f"(kind {kind or 'unknown'}); refusing to delete it",
                    errno.EEXIST,
                )
            if not _is_persistent(name):
                # A non-persistent TUN device lives only while a process holds
                # it open: it belongs to a running client, not a dead one.
                raise TunError(
                    f"TUN device {name} is in use by a running process "
                    "(another p2pvpn client with this name?)",
                    errno.EBUSY,
                )
            logger.warning("deleting stale TUN device %s (index %d)", name, index)
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
                return False
            return True

        return _netlink_or_fail(f"delete stale interface {name}", remove)

    def _check_open(self) -> None:
        if self._closed:
            raise TunError(f"TUN device {self.name} is closed", errno.EBADF)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_mtu(mtu: int) -> None:
    if not 68 <= mtu <= 65535:
        raise ValueError(f"MTU {mtu} is out of range (68..65535)")


def _create(name: str, flags: int) -> tuple[int, str]:
    """Open the TUN node and attach a device with ``flags``: (fd, the device's name)."""
    fd = _open_tun_node()
    try:
        return fd, _attach(fd, name, flags)
    except BaseException:
        os.close(fd)
        raise


def _create_offloaded(name: str) -> tuple[int, str, tuple[str, ...]]:
    """`_create` with ``IFF_VNET_HDR`` and offloads; plain when the kernel takes none."""
    fd, actual = _create(name, _PLAIN_FLAGS | IFF_VNET_HDR)
    try:
        return fd, actual, _enable_offloads(fd, actual)
    except OSError as exc:
        # Non-persistent: the device goes with its fd, and IFF_VNET_HDR cannot be
        # dropped from an attached fd, so the plain device is a new one.
        os.close(fd)
        logger.warning(
            "TUN device %s refuses offloads (TUNSETOFFLOAD: %s); opening it without them",
            actual,
            _describe_errno(exc),
        )
    except BaseException:
        os.close(fd)
        raise
    fd, actual = _create(name, _PLAIN_FLAGS)
    return fd, actual, ()


def _enable_offloads(fd: int, name: str) -> tuple[str, ...]:
    """Ask for the best offload set the kernel takes; its names. OSError when none."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, _ALL_OFFLOAD_FLAGS)
        return _ALL_OFFLOADS
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        logger.debug("TUN device %s refuses USO4 (%s); trying csum+tso4", name, exc.strerror)
    fcntl.ioctl(fd, TUNSETOFFLOAD, _TCP_OFFLOAD_FLAGS)
    return _TCP_OFFLOADS


def _open_tun_node() -> int:
    try:
        return os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise TunError(
            f"cannot open {TUN_PATH}: No such file or directory "
            "(the tun kernel module is missing: modprobe tun, or create the node "
            "with mknod /dev/net/tun c 10 200)",
            exc.errno,
        ) from exc
    except PermissionError as exc:
        raise TunError(
            f"cannot open {TUN_PATH}: Permission denied ({_NEEDS_ROOT})", exc.errno
        ) from exc
    except OSError as exc:
        raise TunError(f"cannot open {TUN_PATH}: {_describe(exc)}", exc.errno) from exc


def _attach(fd: int, name: str, flags: int) -> str:
    """TUNSETIFF: create (or take) the device ``name`` on ``fd``; the name it got."""
    request = _IFREQ.pack(name.encode("utf-8", "surrogateescape"), flags)
    try:
        answer = fcntl.ioctl(fd, TUNSETIFF, request)
    except PermissionError as exc:
        raise TunError(
            f"cannot create TUN device {name}: Operation not permitted ({_NEEDS_ROOT})",
            exc.errno,
        ) from exc
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EBUSY:
            hint = " (a device of that name exists and is in use by another process)"
        elif exc.errno == errno.EINVAL:
            hint = " (a non-TUN interface of that name probably exists)"
        raise TunError(
            f"cannot create TUN device {name}: {_describe(exc)}{hint}", exc.errno
        ) from exc
    actual: bytes = _IFREQ.unpack(answer)[0]
    return actual.rstrip(b"\0").decode("utf-8", "surrogateescape")


def _describe_errno(exc: OSError) -> str:
    """``Invalid argument (EINVAL)``: the message and the errno's name."""
    if exc.errno is None:
        return str(exc)
    return f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, str(exc.errno))})"


def _delete_route(ipr: IPRoute, index: int, network: IPv4Network) -> bool:
    try:
        ipr.route(
            "del",
            dst=str(network.network_address),
            dst_len=network.prefixlen,
            oif=index,
            table=_MAIN_TABLE,
        )
    except NetlinkError as exc:
        if exc.code in (errno.ESRCH, errno.ENODEV):
            return False
        raise
    return True


def _delete_address(ipr: IPRoute, index: int, address: IPv4Interface) -> None:
    try:
        ipr.addr("del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
    except NetlinkError as exc:
        if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
            raise
