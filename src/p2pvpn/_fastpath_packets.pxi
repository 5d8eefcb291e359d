# Included by _fastpath.pyx: what happens to one packet or datagram. IPv4
# helpers, then the packet path of dataplane/pure.py in C: route and seal a
# packet from TUN or a relayed FORWARD, open a datagram, deliver to TUN.


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
    """wire.ipv4.encapsulate_ipip's header: TOS, id, flags 0; TTL IPIP_TTL; checksum."""
    cdef uint32_t checksum = 0
    cdef int i
    memset(header, 0, IPV4_HEADER)
    header[0] = 0x45
    _store_be16(header + 2, <uint32_t>total_length)
    header[IPV4_TTL] = IPIP_TTL
    header[IPV4_PROTOCOL] = IPPROTO_IPIP_
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
            and _load_be32(data + 4) == STUN_MAGIC_COOKIE
            and STUN_HEADER + (((<int>data[2]) << 8) | data[3]) <= length)


cdef inline bint _same_address(const sockaddr_in* a, const sockaddr_in* b) noexcept nogil:
    return a.sin_addr.s_addr == b.sin_addr.s_addr and a.sin_port == b.sin_port


# ---------------------------------------------------------------------------
# Packet path (workers; _deliver also serves write_tun)
# ---------------------------------------------------------------------------

cdef bint _forwarded_wrap_for(const Tables* t, uint32_t own_ip, const unsigned char* packet,
                              uint32_t* member) noexcept nogil:
    """pure._wrap_nexthop's exit-node case: a packet from outside the VPN network
    to one of its members (not us) goes to that member wrapped; caller holds
    the read lock."""
    cdef uint32_t source, destination
    if not t.has_forwarded_wrap:
        return False
    source = _load_be32(packet + 12)
    destination = _load_be32(packet + 16)
    if destination == own_ip or (destination & t.wrap_mask) != t.wrap_network:
        return False
    if (source & t.wrap_mask) == t.wrap_network:
        return False
    member[0] = destination
    return True


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


cdef bint _unwrap_for_delivery(Totals* totals, const unsigned char** packet, int* length,
                               const Tables* from_peer) noexcept nogil:
    """pure._deliver's IPIP step: unwrap, and check a peer's wrapping; False
    (counted) for a packet that must not reach TUN.

    from_peer: the tables (read lock held) for a packet that came over UDP,
    whose IPIP must pass _may_wrap; NULL for one from the server.
    """
    cdef uint32_t outer_source
    if length[0] >= IPV4_HEADER and packet[0][IPV4_PROTOCOL] == IPPROTO_IPIP_:
        outer_source = _load_be32(packet[0] + 12)
        if not _unwrap_ipip(packet, length):
            _drop(totals, DROP_MALFORMED)
            return False
        if from_peer != NULL and not _may_wrap(from_peer, outer_source, packet[0], length[0]):
            _drop(totals, DROP_IPIP_SOURCE)
            return False
    return True


cdef void _deliver(int tun_fd, bint vnet_header, Totals* totals, const unsigned char* packet,
                   int length, const Tables* from_peer) noexcept nogil:
    """pure._deliver: unwrap IPIP, write one packet to TUN (behind an all-zero
    virtio header when the TUN has offloads: a finished, single packet)."""
    cdef ssize_t written
    cdef VirtioHeader header
    cdef iovec vector[2]
    if not _unwrap_for_delivery(totals, &packet, &length, from_peer):
        return
    memset(&header, 0, sizeof(VirtioHeader))
    vector[0].iov_base = &header
    vector[0].iov_len = VIRTIO_HEADER
    vector[1].iov_base = <void*>packet
    vector[1].iov_len = <size_t>length
    while True:
        if vnet_header:
            written = writev(tun_fd, vector, 2)
        else:
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
    sealed = gcm_seal(peer.seal[w.role], iv, packet - 1, length + 1, datagram)
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
    if came_from == NULL and (
            _forwarded_wrap_for(&s.tables, s.own_ip, packet, &next_hop)
            or (s.tables.sysroute_count and _sysroute_for(&s.tables, destination, &next_hop))):
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


# -- Opening (UDP worker) ------------------------------------------------------

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
        if not s.tun_vnet_header:
            _deliver(s.tun_fd, False, &w.totals, packet, length, &s.tables)
        elif _unwrap_for_delivery(&w.totals, <const unsigned char**>&packet, &length, &s.tables):
            # Held for the batch's TUN writes, where a TCP flow's segments join.
            _hold_for_tun(s, w, packet, length)
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
    plaintext_length = gcm_open(s.open_ctx, datagram, length, plaintext)
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
