# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""AES-256-GCM for Candy datagrams (PROTOCOL 3.1), on OpenSSL's libcrypto.

    IV(12) | GCM tag(16) | ciphertext, no associated data, random 96-bit IV

GcmContext keeps one EVP context per direction, keyed once and reused for
every datagram; seal_batch/open_batch run their crypto loop with the GIL
released. The data plane (p2pvpn._fastpath) cimports the C level of this
module (_gcm.pxd).
"""

import os

cimport cython

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.errno cimport EINTR, errno
from libc.limits cimport INT_MAX
from libc.string cimport memcpy

from p2pvpn._openssl cimport (
    ERR_clear_error,
    EVP_aes_256_gcm,
    EVP_CIPHER_CTX,
    EVP_CIPHER_CTX_ctrl,
    EVP_CIPHER_CTX_free,
    EVP_CIPHER_CTX_new,
    EVP_CTRL_GCM_SET_IVLEN,
    EVP_DecryptInit_ex,
    EVP_EncryptInit_ex,
)
from p2pvpn._posix cimport (
    getrandom,
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_unlock,
)

from p2pvpn.wire import crypto as _wire_crypto

__all__ = ["GcmContext", "open_batch", "seal_batch"]


cdef int require_same_constants(str module, tuple pairs) except -1:
    cdef list wrong = [f"{name} is {compiled} in {module} but {python} in Python"
                       for name, compiled, python in pairs if compiled != python]
    if wrong:
        raise ImportError(f"{module} was built from other sources than the Python code "
                          f"it runs with (rebuild it): {'; '.join(wrong)}")
    return 0


require_same_constants("p2pvpn._gcm", (
    ("p2pvpn.wire.crypto.KEY_SIZE", KEY_LEN, _wire_crypto.KEY_SIZE),
    ("p2pvpn.wire.crypto.IV_SIZE", IV_LEN, _wire_crypto.IV_SIZE),
    ("p2pvpn.wire.crypto.TAG_SIZE", TAG_LEN, _wire_crypto.TAG_SIZE),
    ("p2pvpn.wire.crypto.OVERHEAD", OVERHEAD, _wire_crypto.OVERHEAD),
))


# ---------------------------------------------------------------------------
# Random IVs
# ---------------------------------------------------------------------------

cdef int iv_source_refill(IvSource* source) noexcept nogil:
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

cdef EVP_CIPHER_CTX* new_evp_context(const unsigned char* key, bint sealing) except NULL:
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
            self._seal_ctx = new_evp_context(<const unsigned char*>view.buf, True)
            self._open_ctx = new_evp_context(<const unsigned char*>view.buf, False)
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
        return gcm_seal(self._seal_ctx, iv, plaintext, length, out)

    cdef int _open_nolock(self, const unsigned char* datagram, int length,
                          unsigned char* out) noexcept nogil:
        return gcm_open(self._open_ctx, datagram, length, out)

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
            lock_holding_gil(&self._seal_lock)
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
            lock_holding_gil(&self._open_lock)
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
