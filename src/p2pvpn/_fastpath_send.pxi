# Included by _fastpath.pyx: the way out of a batch. Sealed datagrams leave in
# one sendmmsg (as UDP GSO runs where the kernel takes them); what the event
# loop must see goes into the upward queue, which the loop unpacks.


# -- sendmmsg and UDP GSO -------------------------------------------------------

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


# -- The upward queue: workers append, the event loop unpacks --------------------

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
