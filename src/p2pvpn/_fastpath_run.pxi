# Included by _fastpath.pyx: the run state. Buffers and eventfds exist from
# start() to close(); _Core owns the C state and outlives the workers.


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
        free(s.workers[i].segments)
        s.workers[i].segments = NULL
        s.workers[i].segments_used = 0
        _gro_reset(&s.workers[i].gro)
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
        if s.tun_vnet_header and i == ROLE_TUN:
            s.workers[i].segments = <unsigned char*>malloc(SEGMENT_ARENA_BYTES)
        if s.workers[i].slots == NULL or (
                s.tun_vnet_header and i == ROLE_TUN and s.workers[i].segments == NULL):
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
