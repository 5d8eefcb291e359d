# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled data plane of p2pvpn: FastDataPlane.

The DataPlane interface of p2pvpn.dataplane.base, with two worker threads
that run without the GIL: a TUN worker and a UDP worker move packets in
batches (read/sendmmsg, recvmmsg/write) without a Python object per packet;
what the control plane must see goes up through a queue drained on the event
loop. dataplane/pure.py is the reference; every drop, counter and upward
event here mirrors it. AES-256-GCM comes from p2pvpn._gcm (cimported).

This file is the Python-facing side; the C layers are included below, one
file per job, and the shared structs are declared in _fastpath.pxd.
"""

import asyncio
import logging
import os
import socket
import threading
from ipaddress import IPv4Address

cimport cython

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport (
    EAGAIN,
    EBADF,
    EINTR,
    EINVAL,
    EIO,
    EMSGSIZE,
    ENOMEM,
    ENOPROTOOPT,
    EOPNOTSUPP,
    EPIPE,
    errno,
)
from libc.limits cimport INT_MAX
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec, writev
from posix.unistd cimport close, read, write

from p2pvpn._gcm cimport (
    KEY_LEN,
    OVERHEAD,
    GcmContext,
    gcm_open,
    gcm_seal,
    iv_source_next,
    iv_source_reset,
    lock_holding_gil,
    new_evp_context,
    require_same_constants,
)
from p2pvpn._openssl cimport EVP_CIPHER_CTX, EVP_CIPHER_CTX_free
from p2pvpn._posix cimport (
    AF_INET,
    CMSG_DATA,
    CMSG_FIRSTHDR,
    CMSG_LEN,
    CMSG_SPACE,
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    MSG_DONTWAIT,
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLNVAL,
    POLLOUT,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    cmsghdr,
    counter_add,
    counter_read,
    eventfd,
    flag_get,
    flag_increment,
    flag_set,
    htons,
    mmsghdr,
    msghdr,
    ntohl,
    ntohs,
    poll,
    pollfd,
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_unlock,
    pthread_rwlock_destroy,
    pthread_rwlock_init,
    pthread_rwlock_rdlock,
    pthread_rwlock_t,
    pthread_rwlock_trywrlock,
    pthread_rwlock_unlock,
    pthread_rwlock_wrlock,
    pthread_rwlockattr_destroy,
    pthread_rwlockattr_init,
    pthread_rwlockattr_t,
    recvmmsg,
    rwlockattr_prefer_writers,
    sendmmsg,
    set_errno,
    sockaddr_in,
)

from p2pvpn.dataplane import base as _base
from p2pvpn.dataplane import replay as _replay
from p2pvpn.dataplane.base import (
    CONTROL_CIPHER_CACHE,
    REPLAY_WINDOW_SECONDS,
    DataPlaneStats,
    DropReason,
    PeerCounters,
    hand_up_udp_batch,
)
from p2pvpn.wire import ipv4 as _ipv4
from p2pvpn.wire import stun as _stun
from p2pvpn.wire import virtio as _virtio

__all__ = ["FastDataPlane", "coalesce_tun_packets", "segment_tun_packet"]

logger = logging.getLogger(__name__)


include "_fastpath_tables.pxi"
include "_fastpath_replay.pxi"
include "_fastpath_packets.pxi"
include "_fastpath_send.pxi"
include "_fastpath_offload.pxi"
include "_fastpath_workers.pxi"
include "_fastpath_run.pxi"


# ---------------------------------------------------------------------------
# Python side (event loop thread, GIL held)
# ---------------------------------------------------------------------------

cdef inline void _write_lock_holding_gil(pthread_rwlock_t* lock) noexcept:
    """_gcm.lock_holding_gil for the tables' rwlock: wait for the workers' batches
    without the GIL."""
    if pthread_rwlock_trywrlock(lock) != 0:
        with nogil:
            pthread_rwlock_wrlock(lock)


cdef uint32_t _ip_value(object address) except? 0xFFFFFFFF:
    """Host-order value of an IPv4Address (ints pass too)."""
    return <uint32_t>int(address)


cdef int _fill_sockaddr(object address, sockaddr_in* out) except -1:
    """A UDP endpoint (host, port) as sendto() would resolve it."""
    cdef bytes packed
    host, port = address
    if not 0 <= port <= 0xFFFF:
        raise OverflowError("port must be 0-65535.")
    packed = socket.inet_aton(socket.gethostbyname(host))
    memset(out, 0, sizeof(sockaddr_in))
    out.sin_family = AF_INET
    out.sin_port = htons(<uint16_t>port)
    memcpy(&out.sin_addr.s_addr, PyBytes_AS_STRING(packed), 4)
    return 0


cdef int _new_seal_contexts(object key, EVP_CIPHER_CTX** contexts) except -1:
    cdef Py_buffer view
    cdef int role
    PyObject_GetBuffer(key, &view, PyBUF_SIMPLE)
    try:
        if view.len != KEY_LEN:
            raise ValueError(f"AES-256-GCM key must be {KEY_LEN} bytes, got {view.len}")
        for role in range(N_WORKERS):
            contexts[role] = new_evp_context(<const unsigned char*>view.buf, True)
    except BaseException:
        _free_seal_contexts(contexts)
        raise
    finally:
        PyBuffer_Release(&view)
    return 0


cdef void _sum_totals(Shared* s, Totals* total) noexcept nogil:
    cdef Totals* parts[N_WORKERS + 1]
    cdef Totals* part
    cdef int i, reason
    memset(total, 0, sizeof(Totals))
    parts[0] = &s.workers[ROLE_TUN].totals
    parts[1] = &s.workers[ROLE_UDP].totals
    parts[2] = &s.python_totals
    for i in range(N_WORKERS + 1):
        part = parts[i]
        total.tun_packets_in += counter_read(&part.tun_packets_in)
        total.tun_bytes_in += counter_read(&part.tun_bytes_in)
        total.tun_packets_out += counter_read(&part.tun_packets_out)
        total.tun_bytes_out += counter_read(&part.tun_bytes_out)
        total.relay_packets_out += counter_read(&part.relay_packets_out)
        total.relay_bytes_out += counter_read(&part.relay_bytes_out)
        total.relay_packets_in += counter_read(&part.relay_packets_in)
        total.relay_bytes_in += counter_read(&part.relay_bytes_in)
        for reason in range(N_DROPS):
            total.drops[reason] += counter_read(&part.drops[reason])


cdef dict _peer_stats(CounterTable* table, dict into):
    """Add one worker's per-peer counters to `into` (IPv4Address -> PeerCounters)."""
    cdef PeerTraffic* copy
    cdef PeerTraffic* entry
    cdef size_t count, i
    lock_holding_gil(&table.lock)
    count = table.count
    copy = <PeerTraffic*>malloc((count if count else 1) * sizeof(PeerTraffic))
    if copy != NULL:
        for i in range(count):
            copy[i].ip = table.entries[i].ip
            copy[i].packets_out = counter_read(&table.entries[i].packets_out)
            copy[i].bytes_out = counter_read(&table.entries[i].bytes_out)
            copy[i].packets_in = counter_read(&table.entries[i].packets_in)
            copy[i].bytes_in = counter_read(&table.entries[i].bytes_in)
    pthread_mutex_unlock(&table.lock)
    if copy == NULL:
        raise MemoryError()
    try:
        for i in range(count):
            entry = &copy[i]
            address = IPv4Address(entry.ip)
            counters = into.get(address)
            if counters is None:
                counters = into[address] = PeerCounters()
            counters.packets_out += entry.packets_out
            counters.bytes_out += entry.bytes_out
            counters.packets_in += entry.packets_in
            counters.bytes_in += entry.bytes_in
    finally:
        free(copy)
    return into


# DropReason of each Totals.drops index (the DROP_ enum of _fastpath.pxd).
_DROP_KEYS = (
    DropReason.TOO_SHORT,
    DropReason.AUTHENTICATION,
    DropReason.MALFORMED,
    DropReason.NOT_IPV4,
    DropReason.SEND_FAILED,
    DropReason.TUN_WRITE_FAILED,
    DropReason.LOOP,
    DropReason.QUEUE_FULL,
    DropReason.REPLAY,
    DropReason.TRANSIT,
    DropReason.TTL_EXPIRED,
    DropReason.IPIP_SOURCE,
)

require_same_constants("p2pvpn._fastpath", (
    ("p2pvpn.dataplane.base.BATCH_SIZE", BATCH, _base.BATCH_SIZE),
    ("p2pvpn.dataplane.base.MAX_DATAGRAM", MAX_DATAGRAM_LEN, _base.MAX_DATAGRAM),
    ("p2pvpn.dataplane.base.MAX_PEER_COUNTERS", PEER_COUNTER_LIMIT, _base.MAX_PEER_COUNTERS),
    ("p2pvpn.dataplane.base.REPLAY_BUCKET_LIMIT", REPLAY_LIMIT, _base.REPLAY_BUCKET_LIMIT),
    ("p2pvpn.dataplane.base.FORWARD_TYPE", FORWARD_TYPE, _base.FORWARD_TYPE),
    ("len(p2pvpn.dataplane.base.DropReason)", N_DROPS, len(DropReason)),
    ("the distinct reasons in _DROP_KEYS", N_DROPS, len(set(_DROP_KEYS))),
    ("p2pvpn.dataplane.replay.REPLAY_BUCKETS", REPLAY_BUCKETS, _replay.REPLAY_BUCKETS),
    ("p2pvpn.wire.ipv4.MAX_TOTAL_LENGTH", MAX_PACKET, _ipv4.MAX_TOTAL_LENGTH),
    ("p2pvpn.wire.ipv4.MIN_HEADER_LENGTH", IPV4_HEADER, _ipv4.MIN_HEADER_LENGTH),
    ("p2pvpn.wire.ipv4.IPPROTO_IPIP", IPPROTO_IPIP_, _ipv4.IPPROTO_IPIP),
    ("p2pvpn.wire.ipv4.DEFAULT_TTL", IPIP_TTL, _ipv4.DEFAULT_TTL),
    ("8 + p2pvpn.wire.stun.TRANSACTION_ID_SIZE", STUN_HEADER, 8 + _stun.TRANSACTION_ID_SIZE),
    ("p2pvpn.wire.stun.BINDING_SUCCESS_RESPONSE", STUN_BINDING_RESPONSE,
     _stun.BINDING_SUCCESS_RESPONSE),
    ("p2pvpn.wire.stun.MAGIC_COOKIE", STUN_MAGIC_COOKIE, _stun.MAGIC_COOKIE),
    ("p2pvpn.wire.virtio.HEADER_LENGTH", VIRTIO_HEADER, _virtio.HEADER_LENGTH),
    ("sizeof(VirtioHeader)", VIRTIO_HEADER, sizeof(VirtioHeader)),
    ("p2pvpn.wire.virtio.NEEDS_CSUM", VIRTIO_NEEDS_CSUM, _virtio.NEEDS_CSUM),
    ("p2pvpn.wire.virtio.GSO_NONE", VIRTIO_GSO_NONE, _virtio.GSO_NONE),
    ("p2pvpn.wire.virtio.GSO_TCPV4", VIRTIO_GSO_TCPV4, _virtio.GSO_TCPV4),
    ("p2pvpn.wire.virtio.GSO_UDP_L4", VIRTIO_GSO_UDP_L4, _virtio.GSO_UDP_L4),
    ("p2pvpn.wire.virtio.GSO_ECN", VIRTIO_GSO_ECN, _virtio.GSO_ECN),
))

# What FastDataPlane(tun_offloads=...) may name: TUNSETOFFLOAD flags the TUN took.
TUN_OFFLOAD_NAMES = ("csum", "tso4", "uso4")


@cython.final
@cython.no_gc_clear
cdef class FastDataPlane:
    """The DataPlane interface (p2pvpn.dataplane.base) with GIL-free workers.

    FastDataPlane(tun_fd, udp_socket, tun_ip, key, events): like PureDataPlane.
    start() runs a TUN worker and a UDP worker thread; what they hand up is
    delivered on the event loop through an eventfd. The fds are not closed.
    """

    # no_gc_clear: __dealloc__ needs _core to stop workers still running.
    cdef _Core _core
    cdef int _tun_fd
    cdef object _udp
    cdef object _events
    cdef object _loop
    cdef list _threads
    cdef dict _control_contexts
    cdef bint _try_offload
    cdef bint _receive_offload
    cdef bint _segmentation_reported
    cdef tuple _tun_offloads

    def __init__(self, tun_fd, udp_socket, tun_ip, key, events, *, relaying=False,
                 replay_window=REPLAY_WINDOW_SECONDS, udp_offload=True, tun_offloads=()):
        cdef Py_buffer view
        cdef Shared* s
        cdef uint64_t seed
        if not replay_window > 0:
            raise ValueError(f"replay window must be > 0 seconds, got {replay_window}")
        if udp_socket.family != socket.AF_INET:
            raise ValueError("the fast data plane needs an AF_INET UDP socket")
        tun_offloads = tuple(tun_offloads)
        for name in tun_offloads:
            if name not in TUN_OFFLOAD_NAMES:
                raise ValueError(f"unknown TUN offload {name!r} (known: "
                                 f"{', '.join(TUN_OFFLOAD_NAMES)})")
        self._core = _Core()
        self._tun_fd = tun_fd
        self._udp = udp_socket
        self._events = events
        self._threads = []
        self._control_contexts = {}
        self._try_offload = udp_offload
        self._tun_offloads = tun_offloads
        s = self._core.s
        # Any offload means the fd was opened with IFF_VNET_HDR.
        s.tun_vnet_header = bool(tun_offloads)
        s.tun_fd = tun_fd
        s.udp_fd = udp_socket.fileno()
        s.own_ip = _ip_value(tun_ip)
        s.relaying = bool(relaying)
        seed = int.from_bytes(os.urandom(8), "little")
        # Buckets of half a window (dataplane.replay.ReplayWindow).
        replay_init(&s.replay, <uint64_t>(replay_window * 1e9 / 2), seed)
        PyObject_GetBuffer(key, &view, PyBUF_SIMPLE)
        try:
            if view.len != KEY_LEN:
                raise ValueError(f"AES-256-GCM key must be {KEY_LEN} bytes, got {view.len}")
            s.open_ctx = new_evp_context(<const unsigned char*>view.buf, False)
        finally:
            PyBuffer_Release(&view)

    def __dealloc__(self):
        # Never closed: the workers (which hold the core) are told to stop and
        # the core frees everything when the last one is gone.
        if self._core is not None and self._core.s.running:
            _request_stop(self._core.s)

    @property
    def implementation(self):
        return "fast"

    @property
    def udp_segmentation(self):
        """Whether sends use UDP GSO now (off if the kernel refused it once)."""
        return bool(flag_get(&self._core.s.udp_segmentation))

    @property
    def udp_receive_offload(self):
        """Whether the socket hands runs of datagrams up coalesced (UDP_GRO)."""
        return self._receive_offload

    @property
    def udp_offloads(self):
        """The kernel UDP offloads in use now, for status and metrics."""
        offloads = []
        if self.udp_segmentation:
            offloads.append("gso")
        if self.udp_receive_offload:
            offloads.append("gro")
        return tuple(offloads)

    @property
    def tun_offloads(self):
        """The TUN offloads in use ("csum", "tso4", "uso4"); empty without."""
        return self._tun_offloads

    # -- lifecycle --------------------------------------------------------

    def start(self):
        """Start the workers (call on the event loop thread)."""
        cdef Shared* s = self._core.s
        cdef int ready
        loop = asyncio.get_running_loop()
        if self._loop is not None:
            return
        self._udp.setblocking(False)
        os.set_blocking(self._tun_fd, False)
        if _open_run(s) < 0:
            error = errno
            raise OSError(error, f"data plane setup failed: {os.strerror(error)}")
        flag_set(&s.udp_segmentation, self._try_offload and _kernel_segments_udp(self._udp))
        self._segmentation_reported = s.udp_segmentation
        self._receive_offload = self._try_offload and _set_receive_offload(self._udp, True)
        logger.info("fast data plane: UDP segmentation offload %s, receive offload %s, "
                    "TUN offloads %s",
                    "on" if s.udp_segmentation else "off",
                    "on" if self._receive_offload else "off",
                    "+".join(self._tun_offloads) or "off")
        self._loop = loop
        try:
            loop.add_reader(s.up_fd, self._drain_up_queue)
            for role, name in ((ROLE_TUN, "tun"), (ROLE_UDP, "udp")):
                thread = threading.Thread(target=_worker_main, args=(self._core, role),
                                          name=f"p2pvpn-fast-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
            with nogil:
                ready = _wait_workers_ready(s)
            if ready < 0:
                raise RuntimeError("the data plane's worker threads did not start")
        except BaseException:
            self.close()
            raise

    def close(self):
        """Stop and join the workers; idempotent. The given fds stay open."""
        cdef Shared* s = self._core.s
        loop = self._loop
        if loop is None:
            return
        self._loop = None
        _request_stop(s)
        for thread in self._threads:
            thread.join()
        self._threads = []
        try:
            loop.remove_reader(s.up_fd)
        except RuntimeError:
            pass                     # the loop is already closed
        _close_run(s)
        if self._receive_offload and self._udp.fileno() >= 0:
            # The socket is the caller's: leave it as it came, for a reader
            # that does not expect coalesced datagrams.
            _set_receive_offload(self._udp, False)
            self._receive_offload = False

    # -- tables -------------------------------------------------------------

    def set_peer(self, tun_ip, address, key):
        cdef Shared* s = self._core.s
        cdef Peer peer
        cdef Peer replaced
        cdef int result
        memset(&peer, 0, sizeof(Peer))
        peer.ip = _ip_value(tun_ip)
        _fill_sockaddr(address, &peer.address)
        _new_seal_contexts(key, peer.seal)
        _write_lock_holding_gil(&s.tables.lock)
        result = _tables_set_peer(&s.tables, &peer, &replaced)
        pthread_rwlock_unlock(&s.tables.lock)
        # Contexts are freed only here: after the write lock, no batch uses them.
        if result < 0:
            _free_seal_contexts(peer.seal)
            raise MemoryError()
        if result == 1:
            _free_seal_contexts(replaced.seal)

    def drop_peer(self, tun_ip):
        cdef Shared* s = self._core.s
        cdef Peer removed
        cdef uint32_t ip = _ip_value(tun_ip)
        cdef bint found
        _write_lock_holding_gil(&s.tables.lock)
        found = _tables_drop_peer(&s.tables, ip, &removed)
        pthread_rwlock_unlock(&s.tables.lock)
        if found:
            _free_seal_contexts(removed.seal)

    def set_route(self, destination, next_hop):
        cdef Shared* s = self._core.s
        cdef uint32_t key = _ip_value(destination)
        cdef uint32_t value = _ip_value(next_hop)
        cdef int result
        _write_lock_holding_gil(&s.tables.lock)
        result = map_put(&s.tables.routes, key, value)
        pthread_rwlock_unlock(&s.tables.lock)
        if result < 0:
            raise MemoryError()

    def drop_route(self, destination):
        cdef Shared* s = self._core.s
        cdef uint32_t key = _ip_value(destination)
        cdef uint32_t ignored
        _write_lock_holding_gil(&s.tables.lock)
        map_remove(&s.tables.routes, key, &ignored)
        pthread_rwlock_unlock(&s.tables.lock)

    def set_sysroutes(self, routes):
        cdef Shared* s = self._core.s
        cdef list entries = [(_ip_value(network.network_address), _ip_value(network.netmask),
                              _ip_value(nexthop)) for network, nexthop in routes]
        cdef size_t count = len(entries)
        cdef SysRoute* table = <SysRoute*>malloc((count if count else 1) * sizeof(SysRoute))
        cdef SysRoute* old
        cdef size_t i
        if table == NULL:
            raise MemoryError()
        for i in range(count):
            # Already converted: nothing here can raise.
            table[i].network = entries[i][0]
            table[i].mask = entries[i][1]
            table[i].nexthop = entries[i][2]
        _write_lock_holding_gil(&s.tables.lock)
        old = s.tables.sysroutes
        s.tables.sysroutes = table
        s.tables.sysroute_count = count
        pthread_rwlock_unlock(&s.tables.lock)
        free(old)

    def set_forwarded_wrap(self, network):
        cdef Shared* s = self._core.s
        cdef uint32_t address = 0
        cdef uint32_t mask = 0
        if network is not None:
            address = _ip_value(network.network_address)
            mask = _ip_value(network.netmask)
        _write_lock_holding_gil(&s.tables.lock)
        s.tables.has_forwarded_wrap = network is not None
        s.tables.wrap_network = address
        s.tables.wrap_mask = mask
        pthread_rwlock_unlock(&s.tables.lock)

    def set_stun_server(self, address):
        cdef Shared* s = self._core.s
        cdef sockaddr_in stun
        if address is not None:
            _fill_sockaddr(address, &stun)
        _write_lock_holding_gil(&s.tables.lock)
        s.tables.has_stun = address is not None
        if address is not None:
            s.tables.stun = stun
        pthread_rwlock_unlock(&s.tables.lock)

    # -- sending (low rate: Python objects are fine) ---------------------------

    def send_control(self, address, key, plaintext):
        context = self._control_contexts.get(key)
        if context is None:
            if len(self._control_contexts) >= CONTROL_CIPHER_CACHE:
                self._control_contexts.clear()
            context = self._control_contexts[key] = GcmContext(key)
        self._sendto((<GcmContext>context).seal(plaintext), address)

    def send_stun(self, address, data):
        self._sendto(data, address)

    def write_tun(self, packet):
        cdef Shared* s = self._core.s
        cdef Py_buffer view
        PyObject_GetBuffer(packet, &view, PyBUF_SIMPLE)
        try:
            counter_add(&s.python_totals.relay_packets_in, 1)
            counter_add(&s.python_totals.relay_bytes_in, <uint64_t>view.len)
            if view.len > INT_MAX:
                _drop(&s.python_totals, DROP_TUN_WRITE_FAILED)
            else:
                # From the server: IPIP is unwrapped whoever sent it (PROTOCOL 2.5).
                _deliver(self._tun_fd, s.tun_vnet_header, &s.python_totals,
                         <const unsigned char*>view.buf,
                         <int>view.len, NULL)
        finally:
            PyBuffer_Release(&view)

    cdef bint _sendto(self, object datagram, object address):
        try:
            self._udp.sendto(datagram, address)
        except OSError:
            _drop(&self._core.s.python_totals, DROP_SEND_FAILED)
            return False
        return True

    # -- upward and stats ---------------------------------------------------

    def _drain_up_queue(self):
        """loop.add_reader callback: hand everything queued to the events object."""
        cdef Shared* s = self._core.s
        cdef UpArena* arena
        cdef uint64_t value
        if not s.running:
            return
        # Cleared before the swap: a push after it signals again.
        read(s.up_fd, &value, sizeof(value))
        self._log_failed_workers()
        if self._segmentation_reported and not flag_get(&s.udp_segmentation):
            self._segmentation_reported = False
            logger.warning(
                "UDP segmentation offload turned off: the kernel refused it on this "
                "socket (no checksum offload on the way out, IPsec, or a path MTU "
                "below the datagram size); sending one datagram per packet from now on")
        lock_holding_gil(&s.up.lock)
        arena = &s.up.arenas[s.up.active]
        s.up.active ^= 1
        s.up.signalled = False
        pthread_mutex_unlock(&s.up.lock)
        try:
            stun, control, relay = _unpack_arena(arena)
        finally:
            arena.used = 0
        hand_up_udp_batch(self._events, stun, control, relay)

    cdef void _log_failed_workers(self):
        cdef Shared* s = self._core.s
        cdef int role, error
        for role in range(N_WORKERS):
            error = flag_get(&s.failed[role])
            if error:
                s.failed[role] = 0
                name = "TUN device" if role == ROLE_TUN else "UDP socket"
                reason = os.strerror(error) if error > 0 else "unknown error"
                logger.warning("data plane: stopped using the %s: %s", name, reason)

    def stats(self):
        cdef Shared* s = self._core.s
        cdef Totals total
        cdef dict peers = {}
        cdef int role
        # Per peer first: every packet counted as sent was counted as read
        # before, so this order never shows more sent than read.
        for role in range(N_WORKERS):
            _peer_stats(&s.workers[role].counters, peers)
        _sum_totals(s, &total)
        return DataPlaneStats(
            implementation="fast",
            tun_packets_in=total.tun_packets_in,
            tun_bytes_in=total.tun_bytes_in,
            tun_packets_out=total.tun_packets_out,
            tun_bytes_out=total.tun_bytes_out,
            relay_packets_out=total.relay_packets_out,
            relay_bytes_out=total.relay_bytes_out,
            relay_packets_in=total.relay_packets_in,
            relay_bytes_in=total.relay_bytes_in,
            peers=peers,
            drops={_DROP_KEYS[reason]: total.drops[reason]
                   for reason in range(N_DROPS) if total.drops[reason]},
        )
