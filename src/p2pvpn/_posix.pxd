# cython: language_level=3
"""C declarations of the Linux/POSIX calls of the compiled modules (_gcm, _fastpath).

Kept apart from the code (uvloop's style) so the .pyx reads as logic. Every
declaration is ``nogil``: the workers call them with the GIL released. The
``*mmsg`` calls need _GNU_SOURCE, which Python.h (included first) defines.
"""

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    enum:
        AF_INET
        MSG_DONTWAIT

    cmsghdr* CMSG_FIRSTHDR(msghdr* message)
    unsigned char* CMSG_DATA(cmsghdr* header)
    size_t CMSG_LEN(size_t length)
    size_t CMSG_SPACE(size_t length)

    int recvmmsg(int fd, mmsghdr* messages, unsigned int count, int flags, void* timeout)
    int sendmmsg(int fd, mmsghdr* messages, unsigned int count, int flags)


cdef extern from "<netinet/udp.h>" nogil:
    enum:
        SOL_UDP
        UDP_SEGMENT                      # Linux 4.18: UDP generic segmentation offload
        UDP_GRO                          # Linux 5.0: receive runs of datagrams coalesced


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr                  # network byte order

    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port                # network byte order
        in_addr sin_addr

    uint32_t htonl(uint32_t value)
    uint32_t ntohl(uint32_t value)
    uint16_t htons(uint16_t value)
    uint16_t ntohs(uint16_t value)


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents

    ctypedef unsigned long nfds_t

    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL

    int poll(pollfd* fds, nfds_t count, int timeout_ms)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

    int eventfd(unsigned int initial, int flags)


cdef extern from "<sys/random.h>" nogil:
    ssize_t getrandom(void* buf, size_t buflen, unsigned int flags)


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

    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass

    int pthread_rwlockattr_init(pthread_rwlockattr_t* attr)
    int pthread_rwlockattr_destroy(pthread_rwlockattr_t* attr)
    int pthread_rwlock_init(pthread_rwlock_t* lock, const pthread_rwlockattr_t* attr)
    int pthread_rwlock_destroy(pthread_rwlock_t* lock)
    int pthread_rwlock_rdlock(pthread_rwlock_t* lock)
    int pthread_rwlock_wrlock(pthread_rwlock_t* lock)
    int pthread_rwlock_trywrlock(pthread_rwlock_t* lock)
    int pthread_rwlock_unlock(pthread_rwlock_t* lock)


# errno and pthreads come from <errno.h> and <pthread.h>, which Python.h includes.
#
# Relaxed atomics for counters that have exactly one writing thread: the
# writer does a plain load + add + store (no lock prefix), and a reader in
# another thread (stats()) never sees a torn 64-bit value. The stop flag uses
# release/acquire so a worker that sees it also sees what close() did before.
cdef extern from *:
    """
    static inline void p2pvpn_counter_add(uint64_t *counter, uint64_t value) {
        __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + value,
                         __ATOMIC_RELAXED);
    }
    static inline uint64_t p2pvpn_counter_read(const uint64_t *counter) {
        return __atomic_load_n(counter, __ATOMIC_RELAXED);
    }
    static inline void p2pvpn_flag_set(int *flag, int value) {
        __atomic_store_n(flag, value, __ATOMIC_RELEASE);
    }
    static inline int p2pvpn_flag_get(const int *flag) {
        return __atomic_load_n(flag, __ATOMIC_ACQUIRE);
    }
    static inline void p2pvpn_flag_increment(int *flag) {
        __atomic_fetch_add(flag, 1, __ATOMIC_RELEASE);
    }
    static inline void p2pvpn_set_errno(int value) {
        errno = value;
    }
    /* A waiting writer blocks new readers, so a Python setter is not starved
       by two workers whose read sections overlap. A glibc extension: with
       another libc a setter may have to wait until both workers are between
       batches at the same time. */
    static inline void p2pvpn_rwlockattr_prefer_writers(pthread_rwlockattr_t *attr) {
    #ifdef __GLIBC__
        pthread_rwlockattr_setkind_np(attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    #else
        (void)attr;
    #endif
    }
    """
    void counter_add "p2pvpn_counter_add"(uint64_t* counter, uint64_t value) nogil
    uint64_t counter_read "p2pvpn_counter_read"(const uint64_t* counter) nogil
    void flag_set "p2pvpn_flag_set"(int* flag, int value) nogil
    int flag_get "p2pvpn_flag_get"(const int* flag) nogil
    void flag_increment "p2pvpn_flag_increment"(int* flag) nogil
    # Cython makes `errno = x` in a function a new local variable.
    void set_errno "p2pvpn_set_errno"(int value) nogil
    void rwlockattr_prefer_writers "p2pvpn_rwlockattr_prefer_writers"(
        pthread_rwlockattr_t* attr) nogil
