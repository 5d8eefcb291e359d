# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled data path of p2pvpn.

AES-256-GCM for Candy datagrams (PROTOCOL 3.1):

    IV(12) | GCM tag(16) | ciphertext, no associated data, random 96-bit IV

with OpenSSL EVP contexts keyed once per key and reused for every datagram,
plus batch seal/open that run the crypto loop with the GIL released.

FastDataPlane, the DataPlane interface of p2pvpn.dataplane.base: a TUN worker
and a UDP worker thread move packets in batches (read/sendmmsg,
recvmmsg/write) without the GIL and without a Python object per packet; what
the control plane must see goes up through a queue drained on the event loop.
"""

import asyncio
import logging
import os
import socket
import threading
from ipaddress import IPv4Address

cimport cython

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
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
from libc.string cimport memcpy, memmove, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec
from posix.unistd cimport close, read, write

from p2pvpn._openssl cimport (
    ERR_clear_error,
    EVP_aes_256_gcm,
    EVP_CIPHER_CTX,
    EVP_CIPHER_CTX_ctrl,
    EVP_CIPHER_CTX_free,
    EVP_CIPHER_CTX_new,
    EVP_CTRL_GCM_GET_TAG,
    EVP_CTRL_GCM_SET_IVLEN,
    EVP_CTRL_GCM_SET_TAG,
    EVP_DecryptFinal_ex,
    EVP_DecryptInit_ex,
    EVP_DecryptUpdate,
    EVP_EncryptFinal_ex,
    EVP_EncryptInit_ex,
    EVP_EncryptUpdate,
)
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
    counter_add,
    counter_read,
    eventfd,
    flag_get,
    flag_increment,
    flag_set,
    cmsghdr,
    htons,
    mmsghdr,
    msghdr,
    ntohl,
    ntohs,
    poll,
    pollfd,
    pthread_rwlock_init,
    pthread_rwlock_destroy,
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
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
)

from p2pvpn.dataplane.base import (
    BATCH_SIZE,
    MAX_DATAGRAM,
    MAX_PEER_COUNTERS,
    REPLAY_BUCKET_LIMIT,
    REPLAY_WINDOW_SECONDS,
    DataPlaneStats,
    DropReason,
    PeerCounters,
)

__all__ = ["FastDataPlane", "GcmContext", "open_batch", "seal_batch"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Random IVs
# ---------------------------------------------------------------------------

cdef int _iv_source_refill(IvSource* source) noexcept nogil:
    """Fill the whole pool from getrandom(); 0 on success, -1 (errno set) on error."""
    cdef size_t filled = 0
    cdef ssize_t got
    # Empty until completely refilled, so a failure never hands out stale bytes.
    source.remaining = 0
    while filled < IV_POOL_BYTES:
        # Flags 0: the urandom source. It only blocks before the kernel's pool
        # is initialised early at boot, which is what we want for IVs. Requests
        # over 256 bytes can be cut short by a signal, hence the loop.
        got = getrandom(source.buf + filled, IV_POOL_BYTES - filled, 0)
        if got < 0:
            if errno == EINTR:
                continue
            return -1
        filled += <size_t>got
    source.remaining = IV_POOL_BYTES
    return 0


cdef const unsigned char* iv_source_next(IvSource* source) noexcept nogil:
    cdef const unsigned char* iv
    if source.remaining < <size_t>IV_LEN:
        if _iv_source_refill(source) < 0:
            return NULL
    iv = source.buf + (IV_POOL_BYTES - source.remaining)
    source.remaining -= IV_LEN
    return iv


cdef void iv_source_reset(IvSource* source) noexcept nogil:
    source.remaining = 0


# The pool used by the Python-level API (GcmContext.seal, seal_batch). Only
# touched with the GIL held, which is what serialises access to it; callers
# copy the IV out before they release the GIL.
cdef IvSource _python_ivs


def _reset_python_ivs_in_child() -> None:
    # After fork() the child has a copy of the parent's pool: both would hand
    # out the same IVs, under the same keys. Start the child with an empty one.
    iv_source_reset(&_python_ivs)


os.register_at_fork(after_in_child=_reset_python_ivs_in_child)


cdef int _take_iv(object iv, unsigned char* dest) except -1:
    """Copy the caller's 12-byte IV, or a fresh random one when iv is None, to dest."""
    cdef Py_buffer view
    cdef const unsigned char* fresh
    cdef int error
    if iv is None:
        fresh = iv_source_next(&_python_ivs)
        if fresh == NULL:
            error = errno
            raise OSError(error, f"getrandom() failed: {os.strerror(error)}")
        memcpy(dest, fresh, IV_LEN)
        return 0
    PyObject_GetBuffer(iv, &view, PyBUF_SIMPLE)
    try:
        if view.len != IV_LEN:
            raise ValueError(f"iv must be {IV_LEN} bytes, got {view.len}")
        memcpy(dest, view.buf, IV_LEN)
    finally:
        PyBuffer_Release(&view)
    return 0


# ---------------------------------------------------------------------------
# AES-256-GCM context
# ---------------------------------------------------------------------------

cdef EVP_CIPHER_CTX* _new_evp_context(const unsigned char* key, bint sealing) except NULL:
    """An EVP context set up for AES-256-GCM with a 12-byte IV and keyed with key.

    This is the only place the key schedule is computed; per datagram the
    context is re-initialised with just the IV.
    """
    cdef EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new()
    cdef bint ok
    if ctx == NULL:
        raise MemoryError("EVP_CIPHER_CTX_new failed")
    # The IV length must be set after choosing the cipher and before the first
    # IV. 12 is GCM's default; set it anyway so it does not rely on that.
    if sealing:
        ok = (EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1
              and EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, IV_LEN, NULL) == 1
              and EVP_EncryptInit_ex(ctx, NULL, NULL, key, NULL) == 1)
    else:
        ok = (EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1
              and EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, IV_LEN, NULL) == 1
              and EVP_DecryptInit_ex(ctx, NULL, NULL, key, NULL) == 1)
    if not ok:
        EVP_CIPHER_CTX_free(ctx)
        ERR_clear_error()
        raise RuntimeError("OpenSSL could not set up an AES-256-GCM context")
    return ctx


# The GCM primitives on a bare EVP context, so that code holding a context
# outside a GcmContext (the data plane's per-peer, per-worker contexts) shares
# them. The caller owns the context exclusively for the duration of the call.

cdef int _gcm_seal(EVP_CIPHER_CTX* ctx, const unsigned char* iv, const unsigned char* plaintext,
                   int length, unsigned char* out) noexcept nogil:
    cdef int ciphertext_len = 0
    cdef int final_len = 0
    if length < 0 or length > INT_MAX - OVERHEAD:
        return -1
    # IV first: copying it before anything else is written to out makes
    # iv == out (or any overlap with the IV field) safe. The context is then
    # re-initialised from the copy.
    memmove(out, iv, IV_LEN)
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, out) != 1
            or EVP_EncryptUpdate(ctx, out + OVERHEAD, &ciphertext_len, plaintext, length) != 1
            # GCM writes nothing here; it completes the tag.
            or EVP_EncryptFinal_ex(ctx, out + OVERHEAD + ciphertext_len, &final_len) != 1
            or EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, out + IV_LEN) != 1):
        ERR_clear_error()
        return -1
    return OVERHEAD + ciphertext_len + final_len


cdef int _gcm_open(EVP_CIPHER_CTX* ctx, const unsigned char* datagram, int length,
                   unsigned char* out) noexcept nogil:
    cdef int plaintext_len = 0
    cdef int final_len = 0
    if length < OVERHEAD:
        return -1
    # The expected tag is handed over before decrypting, so the context has
    # its own copy of the IV and the tag before anything is written to out.
    # (OpenSSL's ctrl takes a non-const pointer; it only reads the tag.)
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, datagram) != 1
            or EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN,
                                   <void*>(datagram + IV_LEN)) != 1
            or EVP_DecryptUpdate(ctx, out, &plaintext_len, datagram + OVERHEAD,
                                 length - OVERHEAD) != 1
            # Fails when the tag does not verify.
            or EVP_DecryptFinal_ex(ctx, out + plaintext_len, &final_len) != 1):
        ERR_clear_error()
        return -1
    return plaintext_len + final_len


cdef inline void _lock_holding_gil(pthread_mutex_t* lock) noexcept:
    """Take a context's mutex from code that holds the GIL.

    Uncontended (the usual case) this is one trylock. If a batch in another
    thread holds the mutex, wait for it without the GIL: that thread needs
    the GIL back to finish, and everyone else can keep running meanwhile.
    """
    if pthread_mutex_trylock(lock) != 0:
        with nogil:
            pthread_mutex_lock(lock)


@cython.final
cdef class GcmContext:
    """AES-256-GCM sealing and opening of Candy datagrams under one key.

    GcmContext(key) needs a 32-byte key. seal() returns IV | tag | ciphertext
    with a random IV (or the given one); open() returns the plaintext and
    raises ValueError when the datagram is too short or does not authenticate.
    Safe to use from several threads: each direction has its own lock.
    """

    def __cinit__(self, key):
        cdef Py_buffer view
        PyObject_GetBuffer(key, &view, PyBUF_SIMPLE)
        try:
            if view.len != KEY_LEN:
                raise ValueError(f"AES-256-GCM key must be {KEY_LEN} bytes, got {view.len}")
            self._seal_ctx = _new_evp_context(<const unsigned char*>view.buf, True)
            self._open_ctx = _new_evp_context(<const unsigned char*>view.buf, False)
        finally:
            PyBuffer_Release(&view)
        pthread_mutex_init(&self._seal_lock, NULL)
        pthread_mutex_init(&self._open_lock, NULL)
        self._locks_initialised = True

    def __dealloc__(self):
        # EVP_CIPHER_CTX_free wipes the key schedule and accepts NULL (a
        # constructor that failed half way).
        EVP_CIPHER_CTX_free(self._seal_ctx)
        EVP_CIPHER_CTX_free(self._open_ctx)
        self._seal_ctx = NULL
        self._open_ctx = NULL
        if self._locks_initialised:
            pthread_mutex_destroy(&self._seal_lock)
            pthread_mutex_destroy(&self._open_lock)
            self._locks_initialised = False

    # -- C level: no Python objects, callable without the GIL ---------------

    cdef int _seal_nolock(self, const unsigned char* iv, const unsigned char* plaintext,
                          int length, unsigned char* out) noexcept nogil:
        return _gcm_seal(self._seal_ctx, iv, plaintext, length, out)

    cdef int _open_nolock(self, const unsigned char* datagram, int length,
                          unsigned char* out) noexcept nogil:
        return _gcm_open(self._open_ctx, datagram, length, out)

    cdef int seal_into(self, const unsigned char* iv, const unsigned char* plaintext,
                       int length, unsigned char* out) noexcept nogil:
        cdef int written
        pthread_mutex_lock(&self._seal_lock)
        written = self._seal_nolock(iv, plaintext, length, out)
        pthread_mutex_unlock(&self._seal_lock)
        return written

    cdef int open_into(self, const unsigned char* datagram, int length,
                       unsigned char* out) noexcept nogil:
        cdef int written
        pthread_mutex_lock(&self._open_lock)
        written = self._open_nolock(datagram, length, out)
        pthread_mutex_unlock(&self._open_lock)
        return written

    # -- Python level --------------------------------------------------------

    def seal(self, plaintext, iv=None):
        """Encrypt plaintext; return IV(12) | tag(16) | ciphertext.

        iv: 12 bytes, or None (the normal case) for a fresh random IV.
        """
        cdef unsigned char iv_bytes[IV_LEN]
        cdef Py_buffer view
        cdef int written
        cdef bytes out
        _take_iv(iv, iv_bytes)
        PyObject_GetBuffer(plaintext, &view, PyBUF_SIMPLE)
        try:
            if view.len > INT_MAX - OVERHEAD:
                raise ValueError(f"plaintext too long: {view.len} bytes")
            # The datagram is written straight into the bytes object we return.
            out = PyBytes_FromStringAndSize(NULL, view.len + OVERHEAD)
            _lock_holding_gil(&self._seal_lock)
            written = self._seal_nolock(iv_bytes, <const unsigned char*>view.buf,
                                        <int>view.len, <unsigned char*>PyBytes_AS_STRING(out))
            pthread_mutex_unlock(&self._seal_lock)
        finally:
            PyBuffer_Release(&view)
        if written < 0:
            raise RuntimeError("OpenSSL AES-GCM encryption failed")
        return out

    def open(self, datagram):
        """Decrypt a datagram IV(12) | tag(16) | ciphertext; return the plaintext.

        Raises ValueError("datagram too short ...") below 28 bytes and
        ValueError("authentication failed") when the tag does not verify.
        """
        cdef Py_buffer view
        cdef int written
        cdef bytes out
        PyObject_GetBuffer(datagram, &view, PyBUF_SIMPLE)
        try:
            if view.len < OVERHEAD:
                raise ValueError(
                    f"datagram too short: {view.len} bytes, at least {OVERHEAD} needed")
            if view.len > INT_MAX:
                raise ValueError(f"datagram too long: {view.len} bytes")
            out = PyBytes_FromStringAndSize(NULL, view.len - OVERHEAD)
            _lock_holding_gil(&self._open_lock)
            written = self._open_nolock(<const unsigned char*>view.buf, <int>view.len,
                                        <unsigned char*>PyBytes_AS_STRING(out))
            pthread_mutex_unlock(&self._open_lock)
        finally:
            PyBuffer_Release(&view)
        if written < 0:
            # out holds unauthenticated bytes; it is dropped here.
            raise ValueError("authentication failed")
        return out


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------

cdef struct _Item:
    Py_ssize_t offset       # where this input starts in _Batch.data
    int length              # input length in bytes
    unsigned char* out      # buffer of the preallocated result bytes, or NULL: skip
    int result              # bytes written by the crypto call, or -1


@cython.final
cdef class _Batch:
    """The inputs of one batch call, copied into one contiguous C buffer.

    The crypto loop then reads only C memory, so it runs without the GIL, and
    no other thread can change an input while it is being read.
    """
    cdef unsigned char* data
    cdef _Item* items
    cdef Py_ssize_t count

    def __dealloc__(self):
        PyMem_Free(self.data)
        PyMem_Free(self.items)


cdef _Batch _gather(object buffers, Py_ssize_t headroom, Py_ssize_t max_length, str what):
    """Copy each bytes-like of buffers into a _Batch, each preceded by headroom
    free bytes (the IV's place when sealing)."""
    cdef _Batch batch = _Batch.__new__(_Batch)
    cdef Py_ssize_t count = len(buffers)
    cdef Py_buffer* views
    cdef Py_ssize_t acquired = 0
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t i
    batch.count = count
    if count == 0:
        return batch
    batch.items = <_Item*>PyMem_Calloc(<size_t>count, sizeof(_Item))
    views = <Py_buffer*>PyMem_Calloc(<size_t>count, sizeof(Py_buffer))
    if batch.items == NULL or views == NULL:
        PyMem_Free(views)
        raise MemoryError()
    try:
        # First hold a view of every input: that gives the total size for a
        # single allocation, and the views keep the inputs from being resized
        # until they are copied.
        for i in range(count):
            PyObject_GetBuffer(buffers[i], &views[i], PyBUF_SIMPLE)
            acquired += 1
            if views[i].len > max_length:
                raise ValueError(f"{what} {i} too long: {views[i].len} bytes")
            total += headroom
            batch.items[i].offset = total
            batch.items[i].length = <int>views[i].len
            batch.items[i].result = -1
            total += views[i].len
        batch.data = <unsigned char*>PyMem_Malloc(<size_t>(total if total > 0 else 1))
        if batch.data == NULL:
            raise MemoryError()
        for i in range(count):
            memcpy(batch.data + batch.items[i].offset, views[i].buf, <size_t>views[i].len)
    finally:
        for i in range(acquired):
            PyBuffer_Release(&views[i])
        PyMem_Free(views)
    return batch


def seal_batch(GcmContext context not None, plaintexts, ivs=None):
    """Seal every plaintext; return the datagrams in the same order.

    ivs: None (random IVs) or 12 * len(plaintexts) bytes, the IVs in order
    (for deterministic tests). The crypto loop runs without the GIL.
    """
    cdef _Batch batch = _gather(plaintexts, IV_LEN, INT_MAX - OVERHEAD, "plaintext")
    cdef Py_ssize_t count = batch.count
    cdef Py_ssize_t i
    cdef Py_buffer iv_view
    cdef const unsigned char* iv
    cdef _Item* item
    cdef bint failed = False
    cdef int error
    cdef bytes datagram
    cdef list datagrams = []

    # The IVs go into the headroom in front of each plaintext.
    if ivs is None:
        for i in range(count):
            iv = iv_source_next(&_python_ivs)
            if iv == NULL:
                error = errno
                raise OSError(error, f"getrandom() failed: {os.strerror(error)}")
            memcpy(batch.data + batch.items[i].offset - IV_LEN, iv, IV_LEN)
    else:
        PyObject_GetBuffer(ivs, &iv_view, PyBUF_SIMPLE)
        try:
            if iv_view.len != count * IV_LEN:
                raise ValueError(f"ivs must be {count * IV_LEN} bytes ({IV_LEN} per "
                                 f"plaintext), got {iv_view.len}")
            for i in range(count):
                memcpy(batch.data + batch.items[i].offset - IV_LEN,
                       <const unsigned char*>iv_view.buf + i * IV_LEN, IV_LEN)
        finally:
            PyBuffer_Release(&iv_view)

    # Results are written directly into preallocated bytes objects: nothing
    # else references them yet, so filling them without the GIL is safe, and
    # it saves copying out of a scratch buffer afterwards.
    for i in range(count):
        datagram = PyBytes_FromStringAndSize(NULL, batch.items[i].length + OVERHEAD)
        batch.items[i].out = <unsigned char*>PyBytes_AS_STRING(datagram)
        datagrams.append(datagram)

    with nogil:
        pthread_mutex_lock(&context._seal_lock)
        for i in range(count):
            item = &batch.items[i]
            item.result = context._seal_nolock(batch.data + item.offset - IV_LEN,
                                               batch.data + item.offset, item.length, item.out)
            if item.result < 0:
                failed = True
        pthread_mutex_unlock(&context._seal_lock)

    if failed:
        raise RuntimeError("OpenSSL AES-GCM encryption failed")
    return datagrams


def open_batch(GcmContext context not None, datagrams):
    """Open every datagram; return the plaintexts in the same order, with None
    for each datagram that is too short or does not authenticate.

    The crypto loop runs without the GIL.
    """
    cdef _Batch batch = _gather(datagrams, 0, INT_MAX, "datagram")
    cdef Py_ssize_t count = batch.count
    cdef Py_ssize_t i
    cdef _Item* item
    cdef bytes plaintext
    cdef list plaintexts = []

    for i in range(count):
        item = &batch.items[i]
        if item.length < OVERHEAD:
            plaintexts.append(None)        # item.out stays NULL: skipped below
        else:
            # GCM plaintext is exactly as long as the ciphertext.
            plaintext = PyBytes_FromStringAndSize(NULL, item.length - OVERHEAD)
            item.out = <unsigned char*>PyBytes_AS_STRING(plaintext)
            plaintexts.append(plaintext)

    with nogil:
        pthread_mutex_lock(&context._open_lock)
        for i in range(count):
            item = &batch.items[i]
            if item.out != NULL:
                item.result = context._open_nolock(batch.data + item.offset, item.length,
                                                   item.out)
        pthread_mutex_unlock(&context._open_lock)

    # Drop the (unauthenticated) output of every datagram that failed.
    for i in range(count):
        if batch.items[i].result < 0:
            plaintexts[i] = None
    return plaintexts


# ===========================================================================
# The data plane (FastDataPlane): the DataPlane interface of
# p2pvpn.dataplane.base with two worker threads that run without the GIL.
# dataplane/pure.py is the reference; every drop, counter and upward event
# here mirrors it.
# ===========================================================================

cdef enum:
    BATCH = 64                   # p2pvpn.dataplane.base.BATCH_SIZE (checked at import)
    MAX_DATAGRAM_LEN = 65564     # p2pvpn.dataplane.base.MAX_DATAGRAM (checked at import)
    PEER_COUNTER_LIMIT = 16384   # p2pvpn.dataplane.base.MAX_PEER_COUNTERS (checked at import)
    MAX_PACKET = 65535           # largest IPv4 packet, and what one TUN read asks for
    IPV4_HEADER = 20
    IPPROTO_IPIP_ = 4
    FORWARD_TYPE = 1
    # A TUN packet is read this far into its slot, leaving room to prepend an
    # IPIP header, the FORWARD type byte and IV|tag, so it is sealed in place.
    TUN_HEADROOM = 64            # >= IPV4_HEADER + 1 + OVERHEAD
    SLOT_BYTES = 65600           # >= TUN_HEADROOM + MAX_PACKET and >= MAX_DATAGRAM_LEN
    # Two arenas of this size hold what waits for the event loop; a burst of
    # ~3000 full-size relay packets fits before anything is dropped.
    UP_ARENA_BYTES = 4194304
    SEND_WAIT_MS = 100           # one wait for a full socket send buffer
    SEND_WAITS = 3               # waits per batch before dropping what is left
    # UDP generic segmentation offload (UDP_SEGMENT): a run of same-size
    # datagrams to one peer leaves as one message. Kernels before 6.2 take
    # at most 64 segments; an IPv4 UDP payload is at most 65507 bytes.
    MAX_GSO_SEGMENTS = 64
    MAX_GSO_BYTES = 65507
    GSO_CONTROL_WORDS = 4        # uint64_t words >= CMSG_SPACE(sizeof(uint16_t))
    IPV4_TTL = 8                 # offsets in the IPv4 header
    IPV4_PROTOCOL = 9
    IPV4_CHECKSUM = 10
    # The replay record (p2pvpn.dataplane.replay is the reference): three
    # buckets of half a window each, linear-probing sets of 32-bit IV tags.
    REPLAY_BUCKETS = 3
    REPLAY_MIN_SLOTS = 1024
    REPLAY_TABLES = 8            # 1024 slots times 4**7 holds REPLAY_LIMIT
    REPLAY_LIMIT = 1048576       # p2pvpn.dataplane.base.REPLAY_BUCKET_LIMIT (checked at import)
    STUN_HEADER = 20
    STUN_BINDING_RESPONSE = 0x0101

cdef enum:  # worker roles
    ROLE_TUN = 0
    ROLE_UDP = 1
    N_WORKERS = 2

cdef enum:  # kinds of upward items
    UP_STUN = 0
    UP_CONTROL = 1
    UP_RELAY = 2

# Indexes of Totals.drops; _DROP_KEYS below gives their DropReason names.
cdef enum:
    DROP_TOO_SHORT = 0
    DROP_AUTHENTICATION
    DROP_MALFORMED
    DROP_NOT_IPV4
    DROP_SEND_FAILED
    DROP_TUN_WRITE_FAILED
    DROP_UNKNOWN_TYPE
    DROP_LOOP
    DROP_QUEUE_FULL
    DROP_REPLAY
    DROP_TRANSIT
    DROP_TTL_EXPIRED
    DROP_IPIP_SOURCE
    N_DROPS


# u32 -> u32 open-addressing hash map (linear probing, backward-shift
# deletion): peer index, client-relay routes, counter index.
cdef struct U32Map:
    uint32_t* keys
    uint32_t* values
    unsigned char* used
    size_t capacity              # 0 or a power of two
    size_t count


# One table of IV tags (_hash_tag); 0 marks a free slot.
cdef struct IvTable:
    uint32_t* slots
    size_t capacity              # a power of two
    size_t count


# The IVs of one bucket of time: normally one table, more while traffic grows.
cdef struct IvBucket:
    IvTable tables[REPLAY_TABLES]
    int table_count
    size_t count                 # in all its tables
    int64_t number               # which bucket of time it holds; -1: none


# Only the UDP worker opens datagrams, so only it touches the record: no lock.
cdef struct ReplayRecord:
    IvBucket buckets[REPLAY_BUCKETS]
    uint64_t seed                # random: which tag an IV gets is unguessable
    uint64_t bucket_ns           # length of a bucket
    int64_t now                  # the current bucket, set once per batch


# Each set of counters has exactly one writing thread (a worker, or the event
# loop thread for the Python-level calls); stats() sums them.
cdef struct Totals:
    uint64_t tun_packets_in
    uint64_t tun_bytes_in
    uint64_t tun_packets_out
    uint64_t tun_bytes_out
    uint64_t relay_packets_out
    uint64_t relay_bytes_out
    uint64_t relay_packets_in
    uint64_t relay_bytes_in
    uint64_t drops[N_DROPS]


cdef struct PeerTraffic:
    uint32_t ip
    uint64_t packets_out
    uint64_t bytes_out
    uint64_t packets_in
    uint64_t bytes_in


# One worker's per-peer counters. The worker looks entries up without a lock
# (it is the only writer); it takes the mutex only to add one, which may move
# the array, and stats() takes it while copying the entries out.
cdef struct CounterTable:
    pthread_mutex_t lock
    U32Map index                 # ip -> position in entries
    PeerTraffic* entries
    size_t count
    size_t capacity


cdef struct Peer:
    uint32_t ip
    sockaddr_in address
    # One sealing context per worker, so the two never contend for one.
    EVP_CIPHER_CTX* seal[N_WORKERS]


cdef struct SysRoute:
    uint32_t network
    uint32_t mask
    uint32_t nexthop


# Everything the workers route by. Workers hold the read lock for a whole
# batch; the Python setters take the write lock, so once a setter returns no
# batch still uses what it replaced (drop_peer's guarantee).
cdef struct Tables:
    pthread_rwlock_t lock
    U32Map peer_index            # ip -> position in peers
    Peer* peers
    size_t peer_count
    size_t peer_capacity
    U32Map routes                # destination -> next hop
    SysRoute* sysroutes
    size_t sysroute_count
    bint has_stun
    sockaddr_in stun


# Something for the event loop, found during a batch; points into the
# worker's slots until the batch is pushed.
cdef struct UpItem:
    const unsigned char* data
    int length
    int kind
    uint32_t addr                # network order; 0 for relay packets
    uint16_t port                # network order


# Header of one item in an arena; the data follows, records 8-byte aligned.
cdef struct UpRecord:
    uint32_t length
    uint32_t addr
    uint16_t port
    uint8_t kind


cdef struct UpArena:
    unsigned char* data
    size_t used


# Producers append to the active arena; the event loop swaps the two under
# the mutex and unpacks the one it took without it. `signalled` saves an
# eventfd write per batch while the loop has not drained yet.
cdef struct UpQueue:
    pthread_mutex_t lock
    UpArena arenas[2]
    int active
    bint signalled


# Counted once sendmmsg confirms the datagram left.
cdef struct Outgoing:
    uint32_t destination
    int length


cdef struct Worker:
    int role
    IvSource ivs
    Totals totals
    CounterTable counters
    unsigned char* slots         # BATCH slots of SLOT_BYTES
    int tun_lengths[BATCH]
    mmsghdr rx[BATCH]
    iovec rx_iov[BATCH]
    sockaddr_in rx_from[BATCH]
    uint64_t rx_control[BATCH * GSO_CONTROL_WORDS]   # UDP_GRO segment sizes
    mmsghdr tx[BATCH]
    iovec tx_iov[BATCH]
    sockaddr_in tx_to[BATCH]
    # The same batch as UDP GSO messages: message i carries the
    # gso[i].msg_hdr.msg_iovlen tx entries from gso_first[i] on.
    mmsghdr gso[BATCH]
    int gso_first[BATCH]
    uint64_t gso_control[BATCH * GSO_CONTROL_WORDS]
    Outgoing outgoing[BATCH]
    int tx_count
    UpItem pending[BATCH]
    int pending_count


cdef struct Shared:
    int tun_fd
    int udp_fd
    int stop_fd                  # eventfd: readable once close() wants the workers gone
    int up_fd                    # eventfd: readable when the up queue has something
    uint32_t own_ip              # host order, like every ip in the tables
    int stop
    int ready                    # workers that have entered their loop
    int failed[N_WORKERS]        # errno (or -1) of a worker that gave up on its fd
    int udp_segmentation         # 1 while sends use UDP GSO; off for good once refused
    bint running                 # buffers and eventfds exist (start() .. close())
    bint relaying                # route FORWARDs for other addresses (route > 0)
    ReplayRecord replay
    EVP_CIPHER_CTX* open_ctx     # own key; only the UDP worker opens
    Tables tables
    UpQueue up
    Worker workers[N_WORKERS]
    Totals python_totals         # write_tun, send_control, send_stun (GIL held)


# ---------------------------------------------------------------------------
# U32Map
# ---------------------------------------------------------------------------

cdef inline size_t _map_home(uint32_t key, size_t capacity) noexcept nogil:
    # murmur3's finaliser: tun ips differ in their low bits only, which a
    # plain mask would put in neighbouring slots.
    key ^= key >> 16
    key *= <uint32_t>0x85EBCA6B
    key ^= key >> 13
    key *= <uint32_t>0xC2B2AE35
    key ^= key >> 16
    return key & (capacity - 1)


cdef Py_ssize_t _map_locate(const U32Map* m, uint32_t key) noexcept nogil:
    cdef size_t i
    if m.capacity == 0:
        return -1
    i = _map_home(key, m.capacity)
    # The load factor stays below 3/4, so an empty slot ends every probe.
    while m.used[i]:
        if m.keys[i] == key:
            return <Py_ssize_t>i
        i = (i + 1) & (m.capacity - 1)
    return -1


cdef bint map_find(const U32Map* m, uint32_t key, uint32_t* value) noexcept nogil:
    cdef Py_ssize_t i = _map_locate(m, key)
    if i < 0:
        return False
    value[0] = m.values[i]
    return True


cdef void _map_place(U32Map* m, uint32_t key, uint32_t value) noexcept nogil:
    cdef size_t i = _map_home(key, m.capacity)
    while m.used[i]:
        i = (i + 1) & (m.capacity - 1)
    m.used[i] = 1
    m.keys[i] = key
    m.values[i] = value


cdef int _map_resize(U32Map* m, size_t capacity) noexcept nogil:
    cdef U32Map old = m[0]
    cdef size_t i
    m.keys = <uint32_t*>malloc(capacity * sizeof(uint32_t))
    m.values = <uint32_t*>malloc(capacity * sizeof(uint32_t))
    m.used = <unsigned char*>calloc(capacity, 1)
    if m.keys == NULL or m.values == NULL or m.used == NULL:
        free(m.keys)
        free(m.values)
        free(m.used)
        m[0] = old
        return -1
    m.capacity = capacity
    for i in range(old.capacity):
        if old.used[i]:
            _map_place(m, old.keys[i], old.values[i])
    free(old.keys)
    free(old.values)
    free(old.used)
    return 0


cdef int map_put(U32Map* m, uint32_t key, uint32_t value) noexcept nogil:
    """Insert or overwrite; -1 when out of memory (overwriting never fails)."""
    cdef Py_ssize_t i = _map_locate(m, key)
    if i >= 0:
        m.values[i] = value
        return 0
    if (m.count + 1) * 4 > m.capacity * 3:
        if _map_resize(m, m.capacity * 2 if m.capacity else 16) < 0:
            return -1
    _map_place(m, key, value)
    m.count += 1
    return 0


cdef bint map_remove(U32Map* m, uint32_t key, uint32_t* value) noexcept nogil:
    cdef Py_ssize_t found = _map_locate(m, key)
    cdef size_t i, j, home
    cdef size_t mask = m.capacity - 1
    if found < 0:
        return False
    i = j = <size_t>found
    value[0] = m.values[i]
    # Backward-shift deletion: pull later entries of the probe run into the
    # hole unless that would put them before their home slot.
    while True:
        j = (j + 1) & mask
        if not m.used[j]:
            break
        home = _map_home(m.keys[j], m.capacity)
        if (home <= i or home > j) if j > i else (home <= i and home > j):
            m.keys[i] = m.keys[j]
            m.values[i] = m.values[j]
            i = j
    m.used[i] = 0
    m.count -= 1
    return True


cdef void map_free(U32Map* m) noexcept nogil:
    free(m.keys)
    free(m.values)
    free(m.used)
    memset(m, 0, sizeof(U32Map))


# ---------------------------------------------------------------------------
# Replay record (UDP worker only)
# ---------------------------------------------------------------------------

cdef inline uint64_t _mix64(uint64_t value) noexcept nogil:
    # splitmix64's finaliser.
    value ^= value >> 30
    value *= <uint64_t>0xBF58476D1CE4E5B9
    value ^= value >> 27
    value *= <uint64_t>0x94D049BB133111EB
    value ^= value >> 31
    return value


cdef inline uint64_t _iv_hash(const unsigned char* iv, uint64_t seed) noexcept nogil:
    """The IV's 96 bits mixed with the secret seed into 64: the low bits pick
    a slot, the high 32 are the tag kept there. The seed keeps both out of a
    sender's control."""
    cdef uint64_t head
    cdef uint32_t tail
    memcpy(&head, iv, 8)
    memcpy(&tail, iv + 8, 4)
    return _mix64(head ^ seed ^ (<uint64_t>tail * <uint64_t>0x9E3779B97F4A7C15))


cdef inline uint32_t _hash_tag(uint64_t hash) noexcept nogil:
    # Four bytes a slot keep the record small (it grows with the packet
    # rate). A fresh IV matches a tag only where its slot's probe run holds
    # an equal one: odds of a few in 10**9 per datagram, a datagram dropped
    # every few minutes at 10 Gbit/s, none to speak of below.
    cdef uint32_t tag = <uint32_t>(hash >> 32)
    return tag if tag != 0 else 1


cdef bint _table_contains(const IvTable* table, uint64_t hash, uint32_t tag) noexcept nogil:
    cdef size_t mask = table.capacity - 1
    cdef size_t i = <size_t>hash & mask
    # The load stays at or below 3/4: a free slot ends every probe.
    while table.slots[i] != 0:
        if table.slots[i] == tag:
            return True
        i = (i + 1) & mask
    return False


cdef void _table_place(IvTable* table, uint64_t hash, uint32_t tag) noexcept nogil:
    cdef size_t mask = table.capacity - 1
    cdef size_t i = <size_t>hash & mask
    while table.slots[i] != 0:
        i = (i + 1) & mask
    table.slots[i] = tag
    table.count += 1


cdef bint _bucket_contains(const IvBucket* bucket, uint64_t hash, uint32_t tag) noexcept nogil:
    cdef int i
    for i in range(bucket.table_count):
        if _table_contains(&bucket.tables[i], hash, tag):
            return True
    return False


cdef int _bucket_add_table(IvBucket* bucket, size_t capacity) noexcept nogil:
    cdef IvTable* table
    if bucket.table_count == REPLAY_TABLES:
        return -1
    table = &bucket.tables[bucket.table_count]
    table.slots = <uint32_t*>calloc(capacity, sizeof(uint32_t))
    if table.slots == NULL:
        return -1
    table.capacity = capacity
    table.count = 0
    bucket.table_count += 1
    return 0


cdef void _bucket_place(IvBucket* bucket, uint64_t hash, uint32_t tag) noexcept nogil:
    """Record a tag; a full last table gets a larger one after it.

    Tags keep no more of the hash than their slot needs, so a table cannot be
    rehashed into a bigger one; lookups try each table of the bucket instead.
    At steady traffic there is one: _bucket_reuse sizes it from the last span.
    """
    cdef IvTable* last
    if bucket.count >= REPLAY_LIMIT:
        return
    last = &bucket.tables[bucket.table_count - 1] if bucket.table_count else NULL
    if last == NULL or (last.count + 1) * 4 > last.capacity * 3:
        # Four times larger: a ramp from idle to full rate adds few tables.
        if _bucket_add_table(bucket, last.capacity * 4 if last != NULL
                             else REPLAY_MIN_SLOTS) < 0:
            return
        last = &bucket.tables[bucket.table_count - 1]
    _table_place(last, hash, tag)
    bucket.count += 1


cdef void _bucket_clear(IvBucket* bucket) noexcept nogil:
    cdef int i
    for i in range(bucket.table_count):
        free(bucket.tables[i].slots)
        bucket.tables[i].slots = NULL
        bucket.tables[i].capacity = bucket.tables[i].count = 0
    bucket.table_count = 0
    bucket.count = 0


cdef void _bucket_reuse(IvBucket* bucket, int64_t number) noexcept nogil:
    """Empty a bucket for a new span of time, with one table sized for the
    traffic of the span it last held (at most 3/4 full at that rate)."""
    cdef size_t capacity = REPLAY_MIN_SLOTS
    while capacity * 3 < bucket.count * 4:
        capacity *= 2
    if bucket.table_count == 1 and bucket.tables[0].capacity == capacity:
        memset(bucket.tables[0].slots, 0, capacity * sizeof(uint32_t))
        bucket.tables[0].count = 0
        bucket.count = 0
    else:
        _bucket_clear(bucket)
        _bucket_add_table(bucket, capacity)  # on failure, the next place retries
    bucket.number = number


cdef extern from *:
    void __builtin_prefetch(const void* address) nogil


cdef uint64_t replay_prefetch(const ReplayRecord* record, const unsigned char* iv) noexcept nogil:
    """The IV's hash for replay_seen, whose slots start loading now.

    Called before the datagram is decrypted, so the cache misses of the
    lookups (one per bucket, in tables too large for the cache at high
    rates) overlap with AES-GCM instead of following it.
    """
    cdef uint64_t hash = _iv_hash(iv, record.seed)
    cdef const IvBucket* bucket
    cdef int i, j
    for i in range(REPLAY_BUCKETS):
        bucket = &record.buckets[i]
        if bucket.number > record.now - REPLAY_BUCKETS:
            for j in range(bucket.table_count):
                __builtin_prefetch(&bucket.tables[j].slots[
                    <size_t>hash & (bucket.tables[j].capacity - 1)])
    return hash


cdef void replay_set_time(ReplayRecord* record) noexcept nogil:
    """Take the clock once per batch."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    record.now = <int64_t>((<uint64_t>now.tv_sec * <uint64_t>1000000000
                            + <uint64_t>now.tv_nsec) // record.bucket_ns)


cdef bint replay_seen(ReplayRecord* record, uint64_t hash) noexcept nogil:
    """dataplane.replay.ReplayWindow.seen for the IV of `hash` (replay_prefetch):
    True for an IV seen within the window, else it is recorded (unless its
    bucket is full or memory is short)."""
    cdef uint32_t tag = _hash_tag(hash)
    cdef IvBucket* bucket
    cdef IvBucket* current = &record.buckets[record.now % REPLAY_BUCKETS]
    cdef int i
    if current.number != record.now:
        _bucket_reuse(current, record.now)
    for i in range(REPLAY_BUCKETS):
        bucket = &record.buckets[i]
        # A bucket left from longer ago holds nothing of the window.
        if bucket.number > record.now - REPLAY_BUCKETS and _bucket_contains(bucket, hash, tag):
            return True
    _bucket_place(current, hash, tag)
    return False


cdef void replay_init(ReplayRecord* record, uint64_t bucket_ns, uint64_t seed) noexcept nogil:
    cdef int i
    memset(record, 0, sizeof(ReplayRecord))
    for i in range(REPLAY_BUCKETS):
        record.buckets[i].number = -1
    record.bucket_ns = bucket_ns if bucket_ns else 1
    record.seed = seed


cdef void replay_free(ReplayRecord* record) noexcept nogil:
    cdef int i
    for i in range(REPLAY_BUCKETS):
        _bucket_clear(&record.buckets[i])
        record.buckets[i].number = -1


# ---------------------------------------------------------------------------
# Tables (writers hold the write lock, workers the read lock)
# ---------------------------------------------------------------------------

cdef Peer* _find_peer(const Tables* t, uint32_t ip) noexcept nogil:
    cdef uint32_t position
    if map_find(&t.peer_index, ip, &position):
        return &t.peers[position]
    return NULL


cdef int _tables_set_peer(Tables* t, const Peer* peer, Peer* replaced) noexcept nogil:
    """1: replaced (old entry copied to `replaced`), 0: added, -1: out of memory."""
    cdef Peer* existing = _find_peer(t, peer.ip)
    cdef Peer* grown
    cdef size_t capacity
    if existing != NULL:
        replaced[0] = existing[0]
        existing[0] = peer[0]
        return 1
    if t.peer_count == t.peer_capacity:
        capacity = t.peer_capacity * 2 if t.peer_capacity else 8
        grown = <Peer*>realloc(t.peers, capacity * sizeof(Peer))
        if grown == NULL:
            return -1
        t.peers = grown
        t.peer_capacity = capacity
    if map_put(&t.peer_index, peer.ip, <uint32_t>t.peer_count) < 0:
        return -1
    t.peers[t.peer_count] = peer[0]
    t.peer_count += 1
    return 0


cdef bint _tables_drop_peer(Tables* t, uint32_t ip, Peer* removed) noexcept nogil:
    cdef uint32_t position
    cdef size_t last
    if not map_remove(&t.peer_index, ip, &position):
        return False
    removed[0] = t.peers[position]
    last = t.peer_count - 1
    if position != last:
        # Keep the array dense: the last peer moves into the hole.
        t.peers[position] = t.peers[last]
        map_put(&t.peer_index, t.peers[position].ip, position)
    t.peer_count = last
    return True


cdef void _free_seal_contexts(EVP_CIPHER_CTX** contexts) noexcept nogil:
    cdef int role
    for role in range(N_WORKERS):
        EVP_CIPHER_CTX_free(contexts[role])
        contexts[role] = NULL


cdef void _tables_free(Tables* t) noexcept nogil:
    cdef size_t i
    for i in range(t.peer_count):
        _free_seal_contexts(t.peers[i].seal)
    free(t.peers)
    free(t.sysroutes)
    t.peers = NULL
    t.sysroutes = NULL
    t.peer_count = t.peer_capacity = t.sysroute_count = 0
    map_free(&t.peer_index)
    map_free(&t.routes)


cdef bint _sysroute_for(const Tables* t, uint32_t destination, uint32_t* nexthop) noexcept nogil:
    cdef size_t i
    for i in range(t.sysroute_count):
        if (destination & t.sysroutes[i].mask) == t.sysroutes[i].network:
            nexthop[0] = t.sysroutes[i].nexthop
            return True
    return False


# ---------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------

cdef inline void _drop(Totals* totals, int reason) noexcept nogil:
    counter_add(&totals.drops[reason], 1)


cdef PeerTraffic* _add_peer_traffic(CounterTable* table, uint32_t ip) noexcept nogil:
    cdef PeerTraffic* entries
    cdef PeerTraffic* entry = NULL
    cdef size_t capacity
    if table.count >= PEER_COUNTER_LIMIT:
        return NULL              # not counted (see MAX_PEER_COUNTERS)
    pthread_mutex_lock(&table.lock)
    if table.count == table.capacity:
        capacity = table.capacity * 2 if table.capacity else 16
        entries = <PeerTraffic*>realloc(table.entries, capacity * sizeof(PeerTraffic))
        if entries != NULL:
            table.entries = entries
            table.capacity = capacity
    if table.count < table.capacity and map_put(&table.index, ip, <uint32_t>table.count) == 0:
        entry = &table.entries[table.count]
        memset(entry, 0, sizeof(PeerTraffic))
        entry.ip = ip
        table.count += 1
    pthread_mutex_unlock(&table.lock)
    return entry


cdef PeerTraffic* _peer_traffic(Worker* w, uint32_t ip) noexcept nogil:
    """This worker's counters for `ip`, created on first use; NULL if out of memory."""
    cdef uint32_t position
    if map_find(&w.counters.index, ip, &position):
        return &w.counters.entries[position]
    return _add_peer_traffic(&w.counters, ip)


cdef void _count_sent(Worker* w, int first, int count) noexcept nogil:
    cdef int i
    cdef PeerTraffic* traffic
    for i in range(first, first + count):
        traffic = _peer_traffic(w, w.outgoing[i].destination)
        if traffic != NULL:
            counter_add(&traffic.packets_out, 1)
            counter_add(&traffic.bytes_out, <uint64_t>w.outgoing[i].length)


# ---------------------------------------------------------------------------
# IPv4 helpers
# ---------------------------------------------------------------------------

cdef inline uint32_t _load_be32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _store_be16(unsigned char* p, uint32_t value) noexcept nogil:
    p[0] = (value >> 8) & 0xFF
    p[1] = value & 0xFF


cdef inline void _store_be32(unsigned char* p, uint32_t value) noexcept nogil:
    _store_be16(p, value >> 16)
    _store_be16(p + 2, value & 0xFFFF)


cdef inline bint _is_ipv4(const unsigned char* packet, int length) noexcept nogil:
    return length >= IPV4_HEADER and (packet[0] >> 4) == 4


cdef void _write_ipip_header(unsigned char* header, int total_length, uint32_t source,
                             uint32_t destination) noexcept nogil:
    """wire.ipv4.encapsulate_ipip's header: TOS, id, flags 0; TTL 64; checksum."""
    cdef uint32_t checksum = 0
    cdef int i
    memset(header, 0, IPV4_HEADER)
    header[0] = 0x45
    _store_be16(header + 2, <uint32_t>total_length)
    header[8] = 64
    header[9] = IPPROTO_IPIP_
    _store_be32(header + 12, source)
    _store_be32(header + 16, destination)
    for i in range(0, IPV4_HEADER, 2):
        checksum += (<uint32_t>header[i] << 8) | header[i + 1]
    while checksum > 0xFFFF:
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
    _store_be16(header + 10, ~checksum & 0xFFFF)


cdef bint _unwrap_ipip(const unsigned char** packet, int* length) noexcept nogil:
    """wire.ipv4.decapsulate_ipip on an IPIP packet: False where it raises."""
    cdef const unsigned char* p = packet[0]
    cdef int header_length = (p[0] & 0x0F) * 4
    cdef int total_length = (<int>p[2] << 8) | p[3]
    if (p[0] >> 4) != 4 or header_length < IPV4_HEADER:
        return False
    if total_length < header_length or total_length > length[0]:
        return False
    packet[0] = p + header_length
    length[0] = total_length - header_length
    return True


cdef bint _decrement_ttl(unsigned char* packet) noexcept nogil:
    """wire.ipv4.decrement_ttl in place (RFC 1624 eqn. 3); False when the TTL runs out."""
    cdef uint32_t ttl = packet[IPV4_TTL]
    cdef uint32_t old_word, new_word, total
    if ttl <= 1:
        return False
    old_word = (ttl << 8) | packet[IPV4_PROTOCOL]
    new_word = old_word - 0x0100
    total = ((~((<uint32_t>packet[IPV4_CHECKSUM] << 8) | packet[IPV4_CHECKSUM + 1])) & 0xFFFF)
    total += (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    packet[IPV4_TTL] = <unsigned char>(ttl - 1)
    _store_be16(packet + IPV4_CHECKSUM, ~total & 0xFFFF)
    return True


cdef bint _looks_like_binding_response(const unsigned char* data, int length) noexcept nogil:
    """wire.stun.looks_like_binding_response."""
    if length < STUN_HEADER:
        return False
    return (((<uint32_t>data[0] << 8) | data[1]) == STUN_BINDING_RESPONSE
            and _load_be32(data + 4) == 0x2112A442
            and STUN_HEADER + (((<int>data[2]) << 8) | data[3]) <= length)


cdef inline bint _same_address(const sockaddr_in* a, const sockaddr_in* b) noexcept nogil:
    return a.sin_addr.s_addr == b.sin_addr.s_addr and a.sin_port == b.sin_port


# ---------------------------------------------------------------------------
# Packet path (workers; _deliver also serves write_tun)
# ---------------------------------------------------------------------------

cdef bint _may_wrap(const Tables* t, uint32_t outer_source, const unsigned char* inner,
                    int length) noexcept nogil:
    """pure._may_wrap: a peer's own packets, or ones from a network that our
    sdwan routes put behind it; anything else would let a peer inject packets
    from any address into our TUN."""
    cdef uint32_t inner_source, nexthop
    if length < IPV4_HEADER:
        return False
    inner_source = _load_be32(inner + 12)
    return inner_source == outer_source or (
        _sysroute_for(t, inner_source, &nexthop) and nexthop == outer_source)


cdef void _deliver(int tun_fd, Totals* totals, const unsigned char* packet, int length,
                   const Tables* from_peer) noexcept nogil:
    """pure._deliver: unwrap IPIP, write one packet to TUN.

    from_peer: the tables (read lock held) for a packet that came over UDP,
    whose IPIP must pass _may_wrap; NULL for one from the server.
    """
    cdef ssize_t written
    cdef uint32_t outer_source
    if length >= IPV4_HEADER and packet[IPV4_PROTOCOL] == IPPROTO_IPIP_:
        outer_source = _load_be32(packet + 12)
        if not _unwrap_ipip(&packet, &length):
            _drop(totals, DROP_MALFORMED)
            return
        if from_peer != NULL and not _may_wrap(from_peer, outer_source, packet, length):
            _drop(totals, DROP_IPIP_SOURCE)
            return
    while True:
        written = write(tun_fd, packet, <size_t>length)
        if written >= 0 or errno != EINTR:
            break
    if written < 0:
        _drop(totals, DROP_TUN_WRITE_FAILED)
        return
    counter_add(&totals.tun_packets_out, 1)
    counter_add(&totals.tun_bytes_out, <uint64_t>length)


cdef void _queue_up(Shared* s, Worker* w, int kind, const unsigned char* data, int length,
                    const sockaddr_in* source) noexcept nogil:
    """Add an item for the event loop; a full `pending` is pushed up first.

    The check lives here, not in the callers, because one recvmmsg entry can
    add many items (a UDP_GRO run holds up to 64 datagrams, and more than one
    entry's worth arrive per batch): no caller can know there is room.
    """
    cdef UpItem* item
    if w.pending_count >= BATCH:
        _push_up(s, w)
    item = &w.pending[w.pending_count]
    item.data = data
    item.length = length
    item.kind = kind
    item.addr = source.sin_addr.s_addr if source != NULL else 0
    item.port = source.sin_port if source != NULL else 0
    w.pending_count += 1


cdef bint _queue_sealed(Shared* s, Worker* w, const Peer* peer, unsigned char* packet,
                        int length, uint32_t destination) noexcept nogil:
    """Seal FORWARD(packet) for `peer` in place and add it to the batch's sendmmsg.

    `packet` has 1 + OVERHEAD bytes of its slot in front of it: the type
    byte goes right before it and the datagram starts OVERHEAD earlier. A
    full batch is sent first (see _queue_up for why the check is here); what
    it sends points into slots that stay valid until the next receive.
    """
    cdef unsigned char* datagram = packet - 1 - OVERHEAD
    cdef const unsigned char* iv
    cdef int i
    cdef int sealed
    if w.tx_count >= BATCH:
        _send_batch(s, w)
    i = w.tx_count
    iv = iv_source_next(&w.ivs)
    if iv == NULL:
        return False
    (packet - 1)[0] = FORWARD_TYPE
    sealed = _gcm_seal(peer.seal[w.role], iv, packet - 1, length + 1, datagram)
    if sealed < 0:
        return False
    w.tx_iov[i].iov_base = datagram
    w.tx_iov[i].iov_len = <size_t>sealed
    w.tx_to[i] = peer.address
    w.tx[i].msg_hdr.msg_name = &w.tx_to[i]
    w.tx[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
    w.tx[i].msg_hdr.msg_iov = &w.tx_iov[i]
    w.tx[i].msg_hdr.msg_iovlen = 1
    w.outgoing[i].destination = destination
    w.outgoing[i].length = length
    w.tx_count = i + 1
    return True


cdef void _route_packet(Shared* s, Worker* w, unsigned char* packet, int length,
                        const sockaddr_in* came_from) noexcept nogil:
    """pure._route (PROTOCOL 4, "Sending an IP packet"); caller holds the read lock.

    came_from is NULL for packets read from TUN, else the UDP source of the
    FORWARD being relayed. TUN packets have TUN_HEADROOM in front of them,
    relayed ones 1 + OVERHEAD (they are never IPIP-wrapped).
    """
    cdef uint32_t destination, next_hop
    cdef Peer* peer
    if not _is_ipv4(packet, length):
        _drop(&w.totals, DROP_NOT_IPV4)
        return
    destination = _load_be32(packet + 16)
    if (came_from == NULL and s.tables.sysroute_count
            and _sysroute_for(&s.tables, destination, &next_hop)):
        if length + IPV4_HEADER > MAX_PACKET:
            _drop(&w.totals, DROP_MALFORMED)      # pure: encapsulate_ipip raises
            return
        packet -= IPV4_HEADER
        length += IPV4_HEADER
        _write_ipip_header(packet, length, s.own_ip, next_hop)
        destination = next_hop
    if not map_find(&s.tables.routes, destination, &next_hop):
        next_hop = destination
    peer = _find_peer(&s.tables, next_hop)
    if peer == NULL:
        _queue_up(s, w, UP_RELAY, packet, length, NULL)
    elif came_from != NULL and _same_address(&peer.address, came_from):
        _drop(&w.totals, DROP_LOOP)
    elif not _queue_sealed(s, w, peer, packet, length, destination):
        _drop(&w.totals, DROP_SEND_FAILED)


cdef bint _wait_writable(Shared* s) noexcept nogil:
    cdef pollfd fds[2]
    fds[0].fd = s.udp_fd
    fds[0].events = POLLOUT
    fds[0].revents = 0
    fds[1].fd = s.stop_fd
    fds[1].events = POLLIN
    fds[1].revents = 0
    if poll(fds, 2, SEND_WAIT_MS) <= 0 or fds[1].revents:
        return False
    return (fds[0].revents & POLLOUT) != 0


cdef int _send_each(Shared* s, Worker* w, int done) noexcept nogil:
    """Send tx[done:] one datagram per message; returns tx_count (all sent or dropped)."""
    cdef int waits = 0
    cdef int sent
    while done < w.tx_count:
        sent = sendmmsg(s.udp_fd, &w.tx[done], <unsigned int>(w.tx_count - done),
                        MSG_DONTWAIT)
        if sent > 0:
            _count_sent(w, done, sent)
            done += sent
        elif errno == EINTR:
            continue
        elif errno == EAGAIN and waits < SEND_WAITS and _wait_writable(s):
            waits += 1
        else:
            # sendmmsg reports an error only for the first message of the
            # call: that one is dropped, like pure's failed sendto.
            _drop(&w.totals, DROP_SEND_FAILED)
            done += 1
    return done


cdef void _set_segment_size(mmsghdr* message, uint64_t* control,
                            uint16_t segment) noexcept nogil:
    cdef cmsghdr* header
    message.msg_hdr.msg_control = control
    message.msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
    header = CMSG_FIRSTHDR(&message.msg_hdr)
    header.cmsg_level = SOL_UDP
    header.cmsg_type = UDP_SEGMENT
    header.cmsg_len = CMSG_LEN(sizeof(uint16_t))
    memcpy(CMSG_DATA(header), &segment, sizeof(uint16_t))


cdef int _coalesce(Worker* w) noexcept nogil:
    """Group the batch into UDP GSO messages; returns how many.

    A message is a run of datagrams to one address, all as long as its first
    but the last, which may be shorter: the kernel carries it as one skb and
    cuts it back into these datagrams at the end of the path (the receiving
    socket, or the NIC), so the receiver sees the same datagrams as without.
    """
    cdef int count = 0
    cdef int first = 0
    cdef int end
    cdef size_t segment, total, length
    cdef mmsghdr* message
    while first < w.tx_count:
        segment = total = w.tx_iov[first].iov_len
        end = first + 1
        while end < w.tx_count and end - first < MAX_GSO_SEGMENTS:
            length = w.tx_iov[end].iov_len
            if (length > segment or total + length > MAX_GSO_BYTES
                    or not _same_address(&w.tx_to[end], &w.tx_to[first])):
                break
            total += length
            end += 1
            if length < segment:
                break
        message = &w.gso[count]
        message.msg_hdr.msg_name = &w.tx_to[first]
        message.msg_hdr.msg_namelen = sizeof(sockaddr_in)
        message.msg_hdr.msg_iov = &w.tx_iov[first]
        message.msg_hdr.msg_iovlen = <size_t>(end - first)
        if end - first > 1:
            _set_segment_size(message, &w.gso_control[count * GSO_CONTROL_WORDS],
                              <uint16_t>segment)
        else:
            message.msg_hdr.msg_control = NULL
            message.msg_hdr.msg_controllen = 0
        w.gso_first[count] = first
        count += 1
        first = end
    return count


cdef inline bint _segmentation_refused(int error) noexcept nogil:
    # EIO: the route's device has no checksum offload, or IPsec is on the
    # path; EINVAL/EMSGSIZE: a segment is over the path MTU; the others: a
    # kernel without UDP_SEGMENT.
    return (error == EIO or error == EINVAL or error == EMSGSIZE
            or error == ENOPROTOOPT or error == EOPNOTSUPP)


cdef int _send_segmented(Shared* s, Worker* w) noexcept nogil:
    """Send the batch as UDP GSO messages; returns the tx entries dealt with.

    When the kernel refuses segmentation it is switched off for good and the
    rest is left to _send_each, so nothing is lost by trying.
    """
    cdef int messages = _coalesce(w)
    cdef int done = 0
    cdef int waits = 0
    cdef int sent, i
    cdef int carried
    cdef uint64_t one = 1
    while done < messages:
        sent = sendmmsg(s.udp_fd, &w.gso[done], <unsigned int>(messages - done),
                        MSG_DONTWAIT)
        if sent > 0:
            for i in range(done, done + sent):
                _count_sent(w, w.gso_first[i], <int>w.gso[i].msg_hdr.msg_iovlen)
            done += sent
            continue
        if errno == EINTR:
            continue
        if errno == EAGAIN and waits < SEND_WAITS and _wait_writable(s):
            waits += 1
            continue
        carried = <int>w.gso[done].msg_hdr.msg_iovlen
        if carried > 1 and _segmentation_refused(errno):
            flag_set(&s.udp_segmentation, 0)
            write(s.up_fd, &one, sizeof(one))   # the loop logs it
            return w.gso_first[done]
        for i in range(carried):
            _drop(&w.totals, DROP_SEND_FAILED)
        done += 1
    return w.tx_count


cdef void _send_batch(Shared* s, Worker* w) noexcept nogil:
    """One sendmmsg for the batch (more only after a partial send or an error)."""
    cdef int done = 0
    if w.tx_count > 1 and flag_get(&s.udp_segmentation):
        done = _send_segmented(s, w)
    if done < w.tx_count:
        _send_each(s, w, done)
    w.tx_count = 0


cdef bint _arena_append(UpArena* arena, const UpItem* item) noexcept nogil:
    cdef size_t size = (sizeof(UpRecord) + <size_t>item.length + 7) & ~(<size_t>7)
    cdef UpRecord* record
    if arena.used + size > UP_ARENA_BYTES:
        return False
    record = <UpRecord*>(arena.data + arena.used)
    record.length = <uint32_t>item.length
    record.addr = item.addr
    record.port = item.port
    record.kind = <uint8_t>item.kind
    memcpy(arena.data + arena.used + sizeof(UpRecord), item.data, <size_t>item.length)
    arena.used += size
    return True


cdef void _push_up(Shared* s, Worker* w) noexcept nogil:
    """Hand the batch's upward items to the event loop: one mutex, at most one wakeup."""
    cdef UpArena* arena
    cdef UpItem* item
    cdef bint wake = False
    cdef uint64_t one = 1
    cdef int i
    if w.pending_count == 0:
        return
    pthread_mutex_lock(&s.up.lock)
    arena = &s.up.arenas[s.up.active]
    for i in range(w.pending_count):
        item = &w.pending[i]
        if not _arena_append(arena, item):
            # Never wait for the loop: a full queue means it is far behind.
            _drop(&w.totals, DROP_QUEUE_FULL)
        elif item.kind == UP_RELAY:
            counter_add(&w.totals.relay_packets_out, 1)
            counter_add(&w.totals.relay_bytes_out, <uint64_t>item.length)
    if arena.used and not s.up.signalled:
        s.up.signalled = wake = True
    pthread_mutex_unlock(&s.up.lock)
    w.pending_count = 0
    if wake:
        write(s.up_fd, &one, sizeof(one))


cdef int _wait_readable(int fd, int stop_fd, bint errors_are_fatal) noexcept nogil:
    """1: fd has something to read; 0: stop requested; -1: fd is unusable."""
    cdef pollfd fds[2]
    fds[0].fd = fd
    fds[0].events = POLLIN
    fds[1].fd = stop_fd
    fds[1].events = POLLIN
    while True:
        fds[0].revents = 0
        fds[1].revents = 0
        if poll(fds, 2, -1) < 0:
            if errno == EINTR:
                continue
            return -1
        if fds[1].revents:
            return 0
        # Before POLLIN: a hung-up socket also reports POLLIN, and its empty
        # reads would spin.
        if fds[0].revents & (POLLNVAL | POLLHUP):
            set_errno(EBADF if fds[0].revents & POLLNVAL else EPIPE)
            return -1
        if fds[0].revents & POLLIN:
            return 1
        if fds[0].revents & POLLERR:
            # On the UDP socket a pending ICMP error, which the next receive
            # clears; on TUN the device is gone, and retrying would spin.
            if errors_are_fatal:
                set_errno(EIO)
                return -1
            return 1


# -- TUN worker ---------------------------------------------------------------

cdef inline unsigned char* _slot(Worker* w, int i) noexcept nogil:
    return w.slots + <size_t>i * SLOT_BYTES


cdef int _read_tun_batch(Shared* s, Worker* w) noexcept nogil:
    cdef int count = 0
    cdef ssize_t got
    while count < BATCH:
        got = read(s.tun_fd, _slot(w, count) + TUN_HEADROOM, MAX_PACKET)
        if got < 0 and errno == EINTR:
            continue
        if got <= 0:
            # EAGAIN: drained. Errors and empty reads end the batch, as in pure.
            break
        w.tun_lengths[count] = <int>got
        counter_add(&w.totals.tun_packets_in, 1)
        counter_add(&w.totals.tun_bytes_in, <uint64_t>got)
        count += 1
    return count


cdef void _report_failure(Shared* s, int role) noexcept nogil:
    """The worker's fd is unusable: tell the loop (it logs) rather than stop silently."""
    cdef uint64_t one = 1
    flag_set(&s.failed[role], errno if errno else -1)
    write(s.up_fd, &one, sizeof(one))


cdef void _tun_loop(Shared* s) noexcept nogil:
    cdef Worker* w = &s.workers[ROLE_TUN]
    cdef int count, i, ready
    while not flag_get(&s.stop):
        ready = _wait_readable(s.tun_fd, s.stop_fd, True)
        if ready < 0:
            _report_failure(s, ROLE_TUN)
        if ready <= 0:
            break
        count = _read_tun_batch(s, w)
        if count == 0:
            continue
        pthread_rwlock_rdlock(&s.tables.lock)
        for i in range(count):
            _route_packet(s, w, _slot(w, i) + TUN_HEADROOM, w.tun_lengths[i], NULL)
        _send_batch(s, w)
        pthread_rwlock_unlock(&s.tables.lock)
        _push_up(s, w)


# -- UDP worker ---------------------------------------------------------------

cdef int _receive_batch(Shared* s, Worker* w) noexcept nogil:
    cdef int i, count
    for i in range(BATCH):
        # The kernel overwrites both with what it filled in.
        w.rx[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        w.rx[i].msg_hdr.msg_controllen = GSO_CONTROL_WORDS * sizeof(uint64_t)
    while True:
        count = recvmmsg(s.udp_fd, w.rx, BATCH, MSG_DONTWAIT, NULL)
        if count >= 0 or errno != EINTR:
            # Other errors (an ICMP error surfacing) are consumed by the call.
            return count if count > 0 else 0


cdef void _handle_forward(Shared* s, Worker* w, unsigned char* packet, int length,
                          const sockaddr_in* source) noexcept nogil:
    cdef PeerTraffic* traffic
    if not _is_ipv4(packet, length):
        _drop(&w.totals, DROP_NOT_IPV4)
        return
    traffic = _peer_traffic(w, _load_be32(packet + 12))
    if traffic != NULL:
        counter_add(&traffic.packets_in, 1)
        counter_add(&traffic.bytes_in, <uint64_t>length)
    if _load_be32(packet + 16) == s.own_ip:
        _deliver(s.tun_fd, &w.totals, packet, length, &s.tables)
    elif not s.relaying:
        _drop(&w.totals, DROP_TRANSIT)
    elif not _decrement_ttl(packet):
        _drop(&w.totals, DROP_TTL_EXPIRED)
    else:
        _route_packet(s, w, packet, length, source)


cdef void _handle_datagram(Shared* s, Worker* w, unsigned char* datagram, int length,
                           const sockaddr_in* source) noexcept nogil:
    """pure._on_datagram; the plaintext is opened in place, at datagram + OVERHEAD."""
    cdef unsigned char* plaintext = datagram + OVERHEAD
    cdef int plaintext_length
    cdef uint64_t iv_hash
    if (s.tables.has_stun and _same_address(&s.tables.stun, source)
            and _looks_like_binding_response(datagram, length)):
        _queue_up(s, w, UP_STUN, datagram, length, source)
        return
    if length < OVERHEAD:
        _drop(&w.totals, DROP_TOO_SHORT)
        return
    iv_hash = replay_prefetch(&s.replay, datagram)
    plaintext_length = _gcm_open(s.open_ctx, datagram, length, plaintext)
    if plaintext_length < 0:
        _drop(&w.totals, DROP_AUTHENTICATION)
    # Before anything of the plaintext is used; after authentication, so that
    # junk cannot fill the record. Its IV was hashed before opening.
    elif replay_seen(&s.replay, iv_hash):
        _drop(&w.totals, DROP_REPLAY)
    elif plaintext_length == 0:
        _drop(&w.totals, DROP_MALFORMED)
    elif plaintext[0] != FORWARD_TYPE:
        _queue_up(s, w, UP_CONTROL, plaintext, plaintext_length, source)
    else:
        _handle_forward(s, w, plaintext + 1, plaintext_length - 1, source)


cdef int _received_segment_size(msghdr* message) noexcept nogil:
    """The UDP_GRO segment size of a coalesced receive, or 0 for one datagram."""
    cdef cmsghdr* header
    cdef int segment = 0
    if message.msg_controllen < CMSG_LEN(sizeof(int)):
        return 0
    header = CMSG_FIRSTHDR(message)
    if (header != NULL and header.cmsg_level == SOL_UDP and header.cmsg_type == UDP_GRO
            and header.cmsg_len >= CMSG_LEN(sizeof(int))):
        memcpy(&segment, CMSG_DATA(header), sizeof(int))
    return segment if segment > 0 else 0


cdef void _handle_received(Shared* s, Worker* w, int i) noexcept nogil:
    """One recvmmsg entry: a datagram, or with UDP_GRO a run of them from one
    source, all `segment` bytes long but the last; each is handled alone."""
    cdef unsigned char* data = _slot(w, i)
    cdef int length = <int>w.rx[i].msg_len
    cdef int segment = _received_segment_size(&w.rx[i].msg_hdr)
    cdef int offset = 0
    if segment == 0 or segment >= length:
        _handle_datagram(s, w, data, length, &w.rx_from[i])
        return
    while offset < length:
        _handle_datagram(s, w, data + offset, min(segment, length - offset), &w.rx_from[i])
        offset += segment


cdef void _udp_loop(Shared* s) noexcept nogil:
    cdef Worker* w = &s.workers[ROLE_UDP]
    cdef int count, i, ready
    while not flag_get(&s.stop):
        ready = _wait_readable(s.udp_fd, s.stop_fd, False)
        if ready < 0:
            _report_failure(s, ROLE_UDP)
        if ready <= 0:
            break
        count = _receive_batch(s, w)
        if count == 0:
            continue
        replay_set_time(&s.replay)
        pthread_rwlock_rdlock(&s.tables.lock)
        for i in range(count):
            _handle_received(s, w, i)
        _send_batch(s, w)
        pthread_rwlock_unlock(&s.tables.lock)
        _push_up(s, w)


# ---------------------------------------------------------------------------
# Run state: buffers and eventfds exist from start() to close()
# ---------------------------------------------------------------------------

cdef void _setup_receive(Worker* w) noexcept nogil:
    cdef int i
    for i in range(BATCH):
        w.rx_iov[i].iov_base = _slot(w, i)
        w.rx_iov[i].iov_len = MAX_DATAGRAM_LEN
        w.rx[i].msg_hdr.msg_name = &w.rx_from[i]
        w.rx[i].msg_hdr.msg_iov = &w.rx_iov[i]
        w.rx[i].msg_hdr.msg_iovlen = 1
        w.rx[i].msg_hdr.msg_control = &w.rx_control[i * GSO_CONTROL_WORDS]


cdef void _close_run(Shared* s) noexcept nogil:
    """Free what _open_run made; only once no worker runs."""
    cdef int i
    if s.stop_fd >= 0:
        close(s.stop_fd)
    if s.up_fd >= 0:
        close(s.up_fd)
    s.stop_fd = s.up_fd = -1
    for i in range(N_WORKERS):
        free(s.workers[i].slots)
        s.workers[i].slots = NULL
        s.workers[i].tx_count = s.workers[i].pending_count = 0
    for i in range(2):
        free(s.up.arenas[i].data)
        s.up.arenas[i].data = NULL
        s.up.arenas[i].used = 0
    s.up.active = 0
    s.up.signalled = False
    replay_free(&s.replay)
    s.running = False


cdef int _open_run(Shared* s) noexcept nogil:
    """Eventfds and buffers for the workers; -1 (errno set) on failure."""
    cdef int i
    s.stop = 0
    s.ready = 0
    s.running = True
    for i in range(N_WORKERS):
        s.failed[i] = 0
        # A forked child restarting an inherited plane must not hand out the
        # IVs its parent's workers still hold.
        iv_source_reset(&s.workers[i].ivs)
    s.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    s.up_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    if s.stop_fd < 0 or s.up_fd < 0:
        _close_run(s)
        return -1
    for i in range(N_WORKERS):
        # Untouched pages of these big blocks are never faulted in.
        s.workers[i].slots = <unsigned char*>malloc(<size_t>BATCH * SLOT_BYTES)
        if s.workers[i].slots == NULL:
            _close_run(s)
            set_errno(ENOMEM)
            return -1
        _setup_receive(&s.workers[i])
    for i in range(2):
        s.up.arenas[i].data = <unsigned char*>malloc(UP_ARENA_BYTES)
        if s.up.arenas[i].data == NULL:
            _close_run(s)
            set_errno(ENOMEM)
            return -1
    return 0


def _set_receive_offload(udp_socket, on):
    """UDP_GRO (Linux >= 5.0); False where the kernel does not know it."""
    try:
        udp_socket.setsockopt(SOL_UDP, UDP_GRO, 1 if on else 0)
    except OSError:
        return False
    return True


def _kernel_segments_udp(udp_socket):
    """Linux >= 4.18 knows UDP_SEGMENT; an older one would ignore the control
    message and send a whole run as one datagram, so ask first."""
    try:
        udp_socket.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


cdef void _request_stop(Shared* s) noexcept nogil:
    cdef uint64_t one = 1
    flag_set(&s.stop, 1)
    if s.stop_fd >= 0:
        write(s.stop_fd, &one, sizeof(one))


@cython.final
cdef class _Core:
    """Owns the C state. The worker threads hold a reference too, so it lives
    until the last of them has left its loop, even if the data plane object
    goes away without close()."""

    cdef Shared* s

    def __cinit__(self):
        cdef pthread_rwlockattr_t attr
        cdef int i
        self.s = <Shared*>calloc(1, sizeof(Shared))
        if self.s == NULL:
            raise MemoryError()
        self.s.stop_fd = self.s.up_fd = -1
        pthread_rwlockattr_init(&attr)
        rwlockattr_prefer_writers(&attr)
        pthread_rwlock_init(&self.s.tables.lock, &attr)
        pthread_rwlockattr_destroy(&attr)
        pthread_mutex_init(&self.s.up.lock, NULL)
        for i in range(N_WORKERS):
            self.s.workers[i].role = i
            pthread_mutex_init(&self.s.workers[i].counters.lock, NULL)

    def __dealloc__(self):
        cdef Shared* s = self.s
        cdef int i
        if s == NULL:
            return
        _close_run(s)
        replay_free(&s.replay)
        _tables_free(&s.tables)
        for i in range(N_WORKERS):
            free(s.workers[i].counters.entries)
            map_free(&s.workers[i].counters.index)
            pthread_mutex_destroy(&s.workers[i].counters.lock)
        EVP_CIPHER_CTX_free(s.open_ctx)
        pthread_rwlock_destroy(&s.tables.lock)
        pthread_mutex_destroy(&s.up.lock)
        # The IV pools and peer addresses go with it; key schedules were wiped
        # by EVP_CIPHER_CTX_free.
        memset(s, 0, sizeof(Shared))
        free(s)
        self.s = NULL


def _worker_main(_Core core, int role):
    """Body of a worker thread: its whole loop runs without the GIL."""
    cdef Shared* s = core.s
    with nogil:
        flag_increment(&s.ready)
        if role == ROLE_TUN:
            _tun_loop(s)
        else:
            _udp_loop(s)


# ---------------------------------------------------------------------------
# Python side (event loop thread, GIL held)
# ---------------------------------------------------------------------------

cdef int _wait_workers_ready(Shared* s) noexcept nogil:
    """Wait (up to 10 s) until every worker is inside its loop; -1 on timeout.

    A new thread needs the GIL once to start its target; without this wait a
    busy event loop thread could keep it for a whole switch interval (5 ms)
    while packets pile up unread.
    """
    cdef int waited_ms = 0
    while flag_get(&s.ready) < N_WORKERS:
        if waited_ms >= 10000:
            return -1
        poll(NULL, 0, 1)
        waited_ms += 1
    return 0


cdef inline void _write_lock_holding_gil(pthread_rwlock_t* lock) noexcept:
    """Like _lock_holding_gil: wait for the workers' batches without the GIL."""
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
            contexts[role] = _new_evp_context(<const unsigned char*>view.buf, True)
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
    _lock_holding_gil(&table.lock)
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


cdef object _endpoint(uint32_t addr, uint16_t port):
    """(host, port) as the socket module gives it, from network-order fields."""
    cdef uint32_t value = ntohl(addr)
    return (f"{value >> 24}.{(value >> 16) & 0xFF}.{(value >> 8) & 0xFF}.{value & 0xFF}",
            ntohs(port))


cdef tuple _unpack_arena(const UpArena* arena):
    """The arena's records as (stun, control, relay) lists, in arrival order."""
    cdef list stun = []
    cdef list control = []
    cdef list relay = []
    cdef size_t offset = 0
    cdef const UpRecord* record
    cdef uint32_t last_addr = 0
    cdef uint16_t last_port = 0
    cdef object source = None
    cdef bytes data
    while offset < arena.used:
        record = <const UpRecord*>(arena.data + offset)
        data = PyBytes_FromStringAndSize(<const char*>(arena.data + offset + sizeof(UpRecord)),
                                         record.length)
        offset += (sizeof(UpRecord) + record.length + 7) & ~(<size_t>7)
        if record.kind == UP_RELAY:
            relay.append(data)
            continue
        # A batch usually comes from one or two endpoints: reuse the tuple.
        if source is None or record.addr != last_addr or record.port != last_port:
            source = _endpoint(record.addr, record.port)
            last_addr = record.addr
            last_port = record.port
        (stun if record.kind == UP_STUN else control).append((data, source))
    return stun, control, relay


_DROP_KEYS = (
    DropReason.TOO_SHORT,
    DropReason.AUTHENTICATION,
    DropReason.MALFORMED,
    DropReason.NOT_IPV4,
    DropReason.SEND_FAILED,
    DropReason.TUN_WRITE_FAILED,
    DropReason.UNKNOWN_TYPE,
    DropReason.LOOP,
    DropReason.QUEUE_FULL,
    DropReason.REPLAY,
    DropReason.TRANSIT,
    DropReason.TTL_EXPIRED,
    DropReason.IPIP_SOURCE,
)

if (BATCH_SIZE != BATCH or MAX_DATAGRAM != MAX_DATAGRAM_LEN
        or MAX_PEER_COUNTERS != PEER_COUNTER_LIMIT or REPLAY_BUCKET_LIMIT != REPLAY_LIMIT
        or len(_DROP_KEYS) != N_DROPS):
    raise ImportError("p2pvpn._fastpath was built against another p2pvpn.dataplane.base")

# pure.py's bound on cached control-message ciphers.
_CONTROL_CONTEXT_CACHE = 256


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

    def __init__(self, tun_fd, udp_socket, tun_ip, key, events, *, relaying=False,
                 replay_window=REPLAY_WINDOW_SECONDS, udp_offload=True):
        cdef Py_buffer view
        cdef Shared* s
        cdef uint64_t seed
        if not replay_window > 0:
            raise ValueError(f"replay window must be > 0 seconds, got {replay_window}")
        if udp_socket.family != socket.AF_INET:
            raise ValueError("the fast data plane needs an AF_INET UDP socket")
        self._core = _Core()
        self._tun_fd = tun_fd
        self._udp = udp_socket
        self._events = events
        self._threads = []
        self._control_contexts = {}
        self._try_offload = udp_offload
        s = self._core.s
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
            s.open_ctx = _new_evp_context(<const unsigned char*>view.buf, False)
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
        logger.info("fast data plane: UDP segmentation offload %s, receive offload %s",
                    "on" if s.udp_segmentation else "off",
                    "on" if self._receive_offload else "off")
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
            if len(self._control_contexts) >= _CONTROL_CONTEXT_CACHE:
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
                _deliver(self._tun_fd, &s.python_totals, <const unsigned char*>view.buf,
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
        _lock_holding_gil(&s.up.lock)
        arena = &s.up.arenas[s.up.active]
        s.up.active ^= 1
        s.up.signalled = False
        pthread_mutex_unlock(&s.up.lock)
        try:
            stun, control, relay = _unpack_arena(arena)
        finally:
            arena.used = 0
        # pure.py's order for one UDP batch.
        if stun:
            self._events.on_stun_datagrams(stun)
        if control:
            self._events.on_control_datagrams(control)
        if relay:
            self._events.on_relay_packets(relay)

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
