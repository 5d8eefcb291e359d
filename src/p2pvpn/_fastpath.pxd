# cython: language_level=3
"""C-level declarations of the compiled data path (p2pvpn._fastpath).

Declared here, rather than only in the .pyx, so that C code (the TUN/UDP worker
threads of this module, or another Cython module that cimports it) can use the
GCM contexts and the IV source directly, without Python objects and without the
GIL.
"""

cimport cython

from p2pvpn._openssl cimport EVP_CIPHER_CTX


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* mutex, const pthread_mutexattr_t* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_trylock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)


cdef extern from "<sys/random.h>" nogil:
    ssize_t getrandom(void* buf, size_t buflen, unsigned int flags)


# Datagram layout (PROTOCOL 3.1): IV(12) | GCM tag(16) | ciphertext.
cdef enum:
    KEY_LEN = 32                 # AES-256
    IV_LEN = 12
    TAG_LEN = 16
    OVERHEAD = 28                # IV_LEN + TAG_LEN
    IV_POOL_COUNT = 256          # IVs drawn per getrandom() refill
    IV_POOL_BYTES = 3072         # IV_POOL_COUNT * IV_LEN


# A pool of random IVs, refilled from getrandom() IV_POOL_COUNT at a time so
# that the per-packet cost is a pointer bump instead of a system call.
#
# NOT thread-safe: each worker thread owns its own IvSource (e.g. embedded in
# its state struct); sharing one between threads needs a lock. Python-level
# callers of this module share one module-level pool that the GIL protects.
#
# A zero-initialised IvSource is valid and empty (remaining == 0), so a
# forgotten initialisation costs a refill, never a predictable IV.
cdef struct IvSource:
    unsigned char buf[IV_POOL_BYTES]
    size_t remaining             # unused bytes at the end of buf

# Return a pointer to 12 fresh random bytes, valid until the next call on the
# same source, or NULL (errno set) when getrandom() fails.
cdef const unsigned char* iv_source_next(IvSource* source) noexcept nogil

# Discard whatever is left in the pool (used in a forked child, which must not
# reuse IVs its parent will also hand out).
cdef void iv_source_reset(IvSource* source) noexcept nogil


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

    # Encrypt `length` bytes of `plaintext` under the 12-byte `iv` and write
    # IV | tag | ciphertext (length + 28 bytes) to `out`. Returns length + 28,
    # or -1 on failure. `iv` may point anywhere (even at `out`); `plaintext`
    # may be `out + 28` (in place) but must not otherwise overlap `out`.
    cdef int seal_into(self, const unsigned char* iv, const unsigned char* plaintext,
                       int length, unsigned char* out) noexcept nogil

    # Decrypt a datagram of `length` bytes into `out` (length - 28 bytes).
    # Returns the plaintext length, or -1 when the datagram is shorter than 28
    # bytes or does not authenticate. On -1, `out` may hold unauthenticated
    # bytes that must be discarded. `out` may be `datagram + 28` (in place)
    # but must not otherwise overlap the datagram.
    cdef int open_into(self, const unsigned char* datagram, int length,
                       unsigned char* out) noexcept nogil

    # Same as above; the caller must hold _seal_lock / _open_lock.
    cdef int _seal_nolock(self, const unsigned char* iv, const unsigned char* plaintext,
                          int length, unsigned char* out) noexcept nogil
    cdef int _open_nolock(self, const unsigned char* datagram, int length,
                          unsigned char* out) noexcept nogil
