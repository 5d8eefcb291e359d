# Included by _fastpath.pyx: the TUN and UDP worker threads: wait, read a batch,
# handle it under the tables' read lock, send, push up. No GIL, no Python objects.


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
    """Packets at TUN_HEADROOM of their slots; a virtio header, when the TUN
    has one, right before."""
    cdef int count = 0
    cdef int header = VIRTIO_HEADER if s.tun_vnet_header else 0
    cdef ssize_t got
    while count < BATCH:
        got = read(s.tun_fd, _slot(w, count) + TUN_HEADROOM - header,
                   <size_t>(MAX_PACKET + header))
        if got < 0 and errno == EINTR:
            continue
        if got <= 0:
            # EAGAIN: drained. Errors and empty reads end the batch, as in pure.
            break
        if got < header:
            _drop(&w.totals, DROP_TOO_SHORT)
            continue
        w.tun_lengths[count] = <int>got - header
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
        w.segments_used = 0
        pthread_rwlock_rdlock(&s.tables.lock)
        for i in range(count):
            if s.tun_vnet_header:
                _route_from_tun(s, w, _slot(w, i) + TUN_HEADROOM, w.tun_lengths[i])
            else:
                _count_tun_in(w, w.tun_lengths[i])
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
        if w.gro.count:
            _flush_tun_writes(s, w)
        _send_batch(s, w)
        pthread_rwlock_unlock(&s.tables.lock)
        _push_up(s, w)
