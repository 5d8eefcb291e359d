# cython: language_level=3
"""C-level interface of p2pvpn._gcm: AES-256-GCM for Candy datagrams.

Datagram layout (PROTOCOL 3.1): IV(12) | GCM tag(16) | ciphertext, no
associated data. Another Cython module (the data plane, p2pvpn._fastpath)
cimports this file. The per-datagram primitives (gcm_seal, gcm_open,
iv_source_next) are defined inline here, so they compile into the caller and
its packet loops make plain C calls, as fast as within one module; the rest is
reached through Cython's C-API table, without Python objects or the GIL.
"""

cimport cython

from libc.limits cimport INT_MAX
from libc.string cimport memmove

from p2pvpn._openssl cimport (
    ERR_clear_error,
    EVP_CIPHER_CTX,
    EVP_CIPHER_CTX_ctrl,
    EVP_CTRL_GCM_GET_TAG,
    EVP_CTRL_GCM_SET_TAG,
    EVP_DecryptFinal_ex,
    EVP_DecryptInit_ex,
    EVP_DecryptUpdate,
    EVP_EncryptFinal_ex,
    EVP_EncryptInit_ex,
    EVP_EncryptUpdate,
)
from p2pvpn._posix cimport pthread_mutex_lock, pthread_mutex_t, pthread_mutex_trylock


# Datagram layout (PROTOCOL 3.1), checked against p2pvpn.wire.crypto at import.
cdef enum:
    KEY_LEN = 32                 # AES-256; wire.crypto.KEY_SIZE
    IV_LEN = 12                  # wire.crypto.IV_SIZE
    TAG_LEN = 16                 # wire.crypto.TAG_SIZE
    OVERHEAD = 28                # IV_LEN + TAG_LEN; wire.crypto.OVERHEAD
    IV_POOL_COUNT = 256          # IVs drawn per getrandom() refill
    IV_POOL_BYTES = 3072         # IV_POOL_COUNT * IV_LEN


# A pool of random IVs, refilled from getrandom() IV_POOL_COUNT at a time so
# that the per-packet cost is a pointer bump instead of a system call.
#
# NOT thread-safe: each worker thread owns its own IvSource (e.g. embedded in
# its state struct); sharing one between threads needs a lock. Python-level
# callers of _gcm share one module-level pool that the GIL protects.
#
# A zero-initialised IvSource is valid and empty (remaining == 0), so a
# forgotten initialisation costs a refill, never a predictable IV.
cdef struct IvSource:
    unsigned char buf[IV_POOL_BYTES]
    size_t remaining             # unused bytes at the end of buf


# Fill the whole pool from getrandom(); 0 on success, -1 (errno set) on error.
cdef int iv_source_refill(IvSource* source) noexcept nogil


# A pointer to 12 fresh random bytes, valid until the next call on the same
# source, or NULL (errno set) when getrandom() fails.
cdef inline const unsigned char* iv_source_next(IvSource* source) noexcept nogil:
    cdef const unsigned char* iv
    if source.remaining < <size_t>IV_LEN:
        if iv_source_refill(source) < 0:
            return NULL
    iv = source.buf + (IV_POOL_BYTES - source.remaining)
    source.remaining -= IV_LEN
    return iv


# Discard whatever is left in the pool (used in a forked child, which must not
# reuse IVs its parent will also hand out).
cdef inline void iv_source_reset(IvSource* source) noexcept nogil:
    source.remaining = 0


# An EVP context set up for AES-256-GCM with a 12-byte IV and keyed with the
# KEY_LEN bytes at `key`, for sealing or for opening. The only place the key
# schedule is computed; per datagram the context is re-initialised with just
# the IV. Free it with EVP_CIPHER_CTX_free.
cdef EVP_CIPHER_CTX* new_evp_context(const unsigned char* key, bint sealing) except NULL


# The GCM primitives on a bare EVP context, so that code holding a context
# outside a GcmContext (the data plane's per-peer, per-worker contexts) shares
# them. The caller owns the context exclusively for the duration of the call.

# Encrypt `length` bytes of `plaintext` under the 12-byte `iv` and write
# IV | tag | ciphertext (length + 28 bytes) to `out`. Returns length + 28, or
# -1 on failure. `iv` may point anywhere (even at `out`); `plaintext` may be
# `out + 28` (in place) but must not otherwise overlap `out`.
cdef inline int gcm_seal(EVP_CIPHER_CTX* ctx, const unsigned char* iv,
                         const unsigned char* plaintext, int length,
                         unsigned char* out) noexcept nogil:
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


# Decrypt a datagram of `length` bytes into `out` (length - 28 bytes). Returns
# the plaintext length, or -1 when the datagram is shorter than 28 bytes or
# does not authenticate. On -1, `out` may hold unauthenticated bytes that must
# be discarded. `out` may be `datagram + 28` (in place) but must not otherwise
# overlap the datagram.
cdef inline int gcm_open(EVP_CIPHER_CTX* ctx, const unsigned char* datagram, int length,
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


# Take a mutex from code that holds the GIL. Uncontended (the usual case) this
# is one trylock. If a batch in another thread holds the mutex, wait for it
# without the GIL: that thread may need the GIL back to finish, and everyone
# else can keep running meanwhile.
cdef inline void lock_holding_gil(pthread_mutex_t* lock) noexcept:
    if pthread_mutex_trylock(lock) != 0:
        with nogil:
            pthread_mutex_lock(lock)


# Raise ImportError naming every entry of `pairs`, (name, compiled value,
# Python value), whose two values differ: `module` was built against other
# sources than the Python code it runs with.
cdef int require_same_constants(str module, tuple pairs) except -1


@cython.final
cdef class GcmContext:
    # AES-256-GCM for one key: one EVP context for sealing and one for opening,
    # each keyed once at construction; per datagram only the IV is set.
    #
    # An EVP context holds per-message state, so each one has a mutex. The
    # public C methods (seal_into/open_into) take it themselves; code that
    # handles a whole batch may take _seal_lock/_open_lock once and call the
    # _nolock variants in its loop.
    cdef EVP_CIPHER_CTX* _seal_ctx
    cdef EVP_CIPHER_CTX* _open_ctx
    cdef pthread_mutex_t _seal_lock
    cdef pthread_mutex_t _open_lock
    cdef bint _locks_initialised

    # gcm_seal under _seal_lock; `iv` may be anywhere, as there.
    cdef int seal_into(self, const unsigned char* iv, const unsigned char* plaintext,
                       int length, unsigned char* out) noexcept nogil

    # gcm_open under _open_lock.
    cdef int open_into(self, const unsigned char* datagram, int length,
                       unsigned char* out) noexcept nogil

    # Same as above; the caller must hold _seal_lock / _open_lock.
    cdef int _seal_nolock(self, const unsigned char* iv, const unsigned char* plaintext,
                          int length, unsigned char* out) noexcept nogil
    cdef int _open_nolock(self, const unsigned char* datagram, int length,
                          unsigned char* out) noexcept nogil
