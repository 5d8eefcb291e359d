# Included by _fastpath.pyx: TUN offloads (a TUN opened with IFF_VNET_HDR and
# TUNSETOFFLOAD). The kernel hands us TCP and UDP super-packets of up to 64 KB
# and takes them back; the wire carries what a Candy peer expects, one IPv4
# packet of at most MTU per FORWARD. So super-packets are cut before sealing,
# and the TCP segments of one received batch are joined again before the TUN
# write. Pure functions over buffers: the workers do the I/O, and the test
# entry points at the end drive the same code without a device.
#
# The rules follow the kernel's (tcp_gso_segment, tcp_gro_receive) as
# wireguard-go's tun/offload_linux.go applies them in user space.


# ---------------------------------------------------------------------------
# Internet checksum (RFC 1071)
# ---------------------------------------------------------------------------
# Summed in native byte order: the one's complement sum does not depend on
# it, and a folded native sum stored with memcpy is the checksum in network
# order (RFC 1071, 2.(B)).

cdef inline uint64_t _checksum_add(const unsigned char* data, size_t length,
                                   uint64_t total) noexcept nogil:
    cdef uint64_t word
    cdef uint16_t half = 0
    cdef unsigned char tail[2]
    while length >= 8:
        memcpy(&word, data, 8)
        # Two 32-bit halves into 64 bits: no carry is lost below 2**32 words.
        total += (word & <uint64_t>0xFFFFFFFFU) + (word >> 32)
        data += 8
        length -= 8
    while length >= 2:
        memcpy(&half, data, 2)
        total += half
        data += 2
        length -= 2
    if length:
        tail[0] = data[0]
        tail[1] = 0
        memcpy(&half, tail, 2)
        total += half
    return total


cdef inline uint16_t _checksum_fold(uint64_t total) noexcept nogil:
    total = (total & <uint64_t>0xFFFFFFFFU) + (total >> 32)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return <uint16_t>total


cdef inline uint64_t _pseudo_header_sum(const unsigned char* ip, int protocol,
                                        int transport_length) noexcept nogil:
    """Source, destination, protocol and length: what TCP and UDP checksums cover
    besides their own bytes."""
    return (_checksum_add(ip + 12, 8, 0) + htons(<uint16_t>protocol)
            + htons(<uint16_t>transport_length))


cdef inline void _store_checksum(unsigned char* field, uint16_t folded_sum,
                                 bint zero_as_ones) noexcept nogil:
    """The complement. zero_as_ones: 0 goes out as 0xFFFF (the same in one's
    complement), where a zero would mean "no checksum" (UDP) or where the
    kernel writes it so (skb_checksum_help); elsewhere as the kernel, 0."""
    cdef uint16_t value = <uint16_t>(~folded_sum)
    if value == 0 and zero_as_ones:
        value = 0xFFFF
    memcpy(field, &value, 2)


cdef inline void _set_ipv4_checksum(unsigned char* ip, int header_length) noexcept nogil:
    ip[IPV4_CHECKSUM] = ip[IPV4_CHECKSUM + 1] = 0
    _store_checksum(ip + IPV4_CHECKSUM,
                    _checksum_fold(_checksum_add(ip, <size_t>header_length, 0)), False)


cdef inline uint16_t _load_be16(const unsigned char* p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


# ---------------------------------------------------------------------------
# Segmentation (TUN worker): a super-packet from the TUN, cut before sealing
# ---------------------------------------------------------------------------

# Negative results of _plan_segments; OFFLOAD_ERRORS (below) says each in words.
cdef enum:
    PLAN_TOO_SHORT = 1
    PLAN_NOT_IPV4
    PLAN_BAD_LENGTH
    PLAN_CHECKSUM_OUTSIDE
    PLAN_GSO_TYPE
    PLAN_FRAGMENT
    PLAN_TRANSPORT_HEADER
    PLAN_SEGMENT_SIZE


cdef int _plan_plain(const VirtioHeader* header, int length, SegmentPlan* plan) noexcept nogil:
    """A packet that is not GSO: sealed as it is, its checksum completed first
    when the header says the kernel left it partial."""
    plan.count = 1
    plan.is_gso = False
    if header.flags & VIRTIO_NEEDS_CSUM and (
            <int>header.checksum_start + <int>header.checksum_offset + 2 > length):
        return -PLAN_CHECKSUM_OUTSIDE
    return 0


cdef int _plan_segments(const VirtioHeader* header, const unsigned char* packet, int length,
                        SegmentPlan* plan) noexcept nogil:
    """How a packet read from the TUN becomes the packets we seal; 0, or
    -PLAN_* for one the plane drops as malformed."""
    cdef int gso_type = header.gso_type & ~VIRTIO_GSO_ECN
    memset(plan, 0, sizeof(SegmentPlan))
    if gso_type == VIRTIO_GSO_NONE:
        return _plan_plain(header, length, plan)
    if length < IPV4_HEADER:
        return -PLAN_TOO_SHORT
    if (packet[0] >> 4) != 4:
        return -PLAN_NOT_IPV4
    plan.ip_header = (packet[0] & 0x0F) * 4
    if plan.ip_header < IPV4_HEADER or plan.ip_header > length or _load_be16(packet + 2) != length:
        return -PLAN_BAD_LENGTH
    if gso_type == VIRTIO_GSO_TCPV4:
        plan.protocol = IPPROTO_TCP_
    elif gso_type == VIRTIO_GSO_UDP_L4:
        plan.protocol = IPPROTO_UDP_
    else:
        return -PLAN_GSO_TYPE
    if packet[IPV4_PROTOCOL] != plan.protocol:
        return -PLAN_GSO_TYPE
    if _load_be16(packet + 6) & 0x3FFF:
        return -PLAN_FRAGMENT
    if plan.protocol == IPPROTO_TCP_:
        if plan.ip_header + 20 > length:
            return -PLAN_TRANSPORT_HEADER
        plan.headers = plan.ip_header + (packet[plan.ip_header + 12] >> 4) * 4
        if plan.headers < plan.ip_header + 20 or plan.headers > length:
            return -PLAN_TRANSPORT_HEADER
    else:
        plan.headers = plan.ip_header + 8
        if plan.headers > length:
            return -PLAN_TRANSPORT_HEADER
    if header.segment_size == 0:
        return -PLAN_SEGMENT_SIZE
    plan.segment_size = header.segment_size
    plan.payload = length - plan.headers
    plan.count = (plan.payload + plan.segment_size - 1) // plan.segment_size
    if plan.count < 1:
        plan.count = 1
    plan.is_gso = True
    return 0


cdef void _complete_checksum(const VirtioHeader* header, unsigned char* packet,
                             int length) noexcept nogil:
    """NEEDS_CSUM on a single packet: the field holds the pseudo-header sum, and
    the sum from checksum_start to the end finishes it (skb_checksum_help)."""
    cdef int start = header.checksum_start
    _store_checksum(packet + start + header.checksum_offset,
                    _checksum_fold(_checksum_add(packet + start, <size_t>(length - start), 0)),
                    True)


cdef int _write_segment(const SegmentPlan* plan, const unsigned char* packet, int index,
                        unsigned char* out) noexcept nogil:
    """Segment `index` of a GSO packet into `out` (room for headers +
    segment_size); returns its length. Checksums are computed in full, so
    what the kernel left partial does not matter."""
    cdef int offset = index * plan.segment_size
    cdef int size = min(plan.segment_size, plan.payload - offset)
    cdef int total = plan.headers + size
    cdef int transport_length = total - plan.ip_header
    cdef unsigned char* transport = out + plan.ip_header
    cdef unsigned char* checksum_field
    memcpy(out, packet, <size_t>plan.headers)
    memcpy(out + plan.headers, packet + plan.headers + offset, <size_t>size)
    _store_be16(out + 2, <uint32_t>total)
    _store_be16(out + 4, (_load_be16(packet + 4) + <uint32_t>index) & 0xFFFF)
    _set_ipv4_checksum(out, plan.ip_header)
    if plan.protocol == IPPROTO_TCP_:
        _store_be32(transport + 4, _load_be32(transport + 4) + <uint32_t>offset)
        if index != plan.count - 1:
            transport[13] &= ~(TCP_FIN | TCP_PSH)
        if index != 0:
            transport[13] &= ~TCP_CWR
        checksum_field = transport + 16
    else:
        _store_be16(transport + 4, <uint32_t>transport_length)
        checksum_field = transport + 6
    checksum_field[0] = checksum_field[1] = 0
    _store_checksum(checksum_field, _checksum_fold(
        _pseudo_header_sum(out, plan.protocol, transport_length)
        + _checksum_add(transport, <size_t>transport_length, 0)),
        plan.protocol == IPPROTO_UDP_)
    return total


# ---------------------------------------------------------------------------
# Coalescing (UDP worker): opened TCP segments, joined for one TUN write
# ---------------------------------------------------------------------------

cdef int _coalescible_headers(const unsigned char* p, int length) noexcept nogil:
    """IP + TCP header bytes of a segment that may join a run, else 0: IPv4
    without options, not a fragment, flags ACK or ACK|PSH, some payload,
    checksums valid (a bad one must reach the inner stack, which drops it;
    a coalesced write is trusted as checksummed)."""
    cdef int headers
    if length < 41 or p[0] != 0x45 or p[IPV4_PROTOCOL] != IPPROTO_TCP_:
        return 0
    if _load_be16(p + 2) != length or _load_be16(p + 6) & 0x3FFF:
        return 0
    if p[32] & 0x0F or (p[33] & ~TCP_PSH) != TCP_ACK:
        return 0
    headers = IPV4_HEADER + (p[32] >> 4) * 4
    if headers < 40 or headers >= length:
        return 0
    if _checksum_fold(_checksum_add(p, IPV4_HEADER, 0)) != 0xFFFF:
        return 0
    if _checksum_fold(_pseudo_header_sum(p, IPPROTO_TCP_, length - IPV4_HEADER)
                      + _checksum_add(p + IPV4_HEADER, <size_t>(length - IPV4_HEADER), 0)) != 0xFFFF:
        return 0
    return headers


cdef inline bint _same_flow(const unsigned char* a, const unsigned char* b) noexcept nogil:
    # Addresses (12..19) and ports (20..23).
    return memcmp(a + 12, b + 12, 12) == 0


cdef bint _tcp_flow_key(const unsigned char* p, int length, unsigned char* key) noexcept nogil:
    """The addresses and ports (12 bytes, laid out as in a packet without IP
    options) of a well-formed TCP/IPv4 packet; False for anything else."""
    cdef int ip_header, tcp_header
    if length < IPV4_HEADER or (p[0] >> 4) != 4 or p[IPV4_PROTOCOL] != IPPROTO_TCP_:
        return False
    ip_header = (p[0] & 0x0F) * 4
    if ip_header < IPV4_HEADER or _load_be16(p + 2) != length or ip_header + 20 > length:
        return False
    tcp_header = (p[ip_header + 12] >> 4) * 4
    if tcp_header < 20 or ip_header + tcp_header > length:
        return False
    memcpy(key, p + 12, 8)
    memcpy(key + 8, p + ip_header, 4)
    return True


cdef void _end_run_of(GroState* g, const unsigned char* packet, int length) noexcept nogil:
    """A TCP packet that cannot join (RST, SYN, FIN, out of order...) ends its
    flow's open run, so that what comes after it is not written before it."""
    cdef unsigned char key[12]
    cdef int slot
    if not _tcp_flow_key(packet, length, key):
        return
    for slot in range(g.flow_count):
        if memcmp(g.writes[g.flows[slot]].packet + 12, key, 12) == 0:
            g.writes[g.flows[slot]].open = False
            _forget_flow(g, slot)
            return


cdef bint _may_join(const TunWrite* head, const unsigned char* p, int headers,
                    int payload) noexcept nogil:
    """Whether segment `p` continues the open run of its flow (tcp_gro_receive)."""
    cdef const unsigned char* first = head.packet
    return (head.open
            and headers == head.headers
            and payload <= head.segment_size
            and head.count < GRO_MAX_SEGMENTS
            and head.headers + head.payload + payload <= MAX_PACKET
            and _load_be32(p + 24) == head.next_sequence
            and _load_be16(p + 4) == head.next_id
            and p[1] == first[1] and p[IPV4_TTL] == first[IPV4_TTL]
            and (p[6] & 0xE0) == (first[6] & 0xE0)
            and memcmp(p + 28, first + 28, 4) == 0                 # ACK number
            and memcmp(p + 40, first + 40, <size_t>(headers - 40)) == 0)   # options


cdef void _forget_flow(GroState* g, int slot) noexcept nogil:
    g.flow_count -= 1
    g.flows[slot] = g.flows[g.flow_count]
    if g.next_eviction >= g.flow_count:
        g.next_eviction = 0


cdef void _remember_flow(GroState* g, int index) noexcept nogil:
    if g.flow_count < GRO_FLOWS:
        g.flows[g.flow_count] = index
        g.flow_count += 1
        return
    # Full: the oldest-placed slot in turn gives way; its run is written as it is.
    g.writes[g.flows[g.next_eviction]].open = False
    g.flows[g.next_eviction] = index
    g.next_eviction = (g.next_eviction + 1) % GRO_FLOWS


cdef void _join_run(GroState* g, int slot, TunWrite* head, int index, int payload) noexcept nogil:
    cdef const unsigned char* p = g.writes[index].packet
    g.writes[head.last].next = index
    head.last = index
    head.count += 1
    head.payload += payload
    head.next_sequence += <uint32_t>payload
    head.next_id = <uint16_t>(head.next_id + 1)
    g.writes[index].count = 0
    if p[33] & TCP_PSH:
        head.push = True
    # A short segment or PSH ends the run, as in the kernel.
    if payload < head.segment_size or head.push or head.count >= GRO_MAX_SEGMENTS:
        head.open = False
        _forget_flow(g, slot)


cdef void _gro_add(GroState* g, unsigned char* packet, int length) noexcept nogil:
    """Hold an opened packet for the batch's TUN writes (room checked by the caller)."""
    cdef int index = g.count
    cdef TunWrite* item = &g.writes[index]
    cdef int headers = _coalescible_headers(packet, length)
    cdef int payload, slot
    cdef TunWrite* head
    g.count += 1
    memset(item, 0, sizeof(TunWrite))
    item.packet = packet
    item.length = length
    item.next = -1
    item.last = index
    item.count = 1
    if headers == 0:
        _end_run_of(g, packet, length)
        return
    payload = length - headers
    for slot in range(g.flow_count):
        head = &g.writes[g.flows[slot]]
        if not _same_flow(head.packet, packet):
            continue
        if _may_join(head, packet, headers, payload):
            _join_run(g, slot, head, index, payload)
            return
        # The flow goes on in a new run: the old one is written as it is.
        head.open = False
        _forget_flow(g, slot)
        break
    item.headers = headers
    item.payload = payload
    item.segment_size = payload
    item.next_sequence = _load_be32(packet + 24) + <uint32_t>payload
    item.next_id = <uint16_t>(_load_be16(packet + 4) + 1)
    item.open = not (packet[33] & TCP_PSH)
    if item.open:
        _remember_flow(g, index)


cdef int _gro_vector(GroState* g, int index, VirtioHeader* header, iovec* vector) noexcept nogil:
    """The writev of write `index`: the virtio header, the packet and, for a
    run, its members' payloads; 0 for a member (its head writes it).

    A run's head becomes the super-packet's header: total length, IP
    checksum, PSH, and the TCP checksum field left partial for the kernel
    (the pseudo-header sum, not inverted, as virtio's NEEDS_CSUM wants)."""
    cdef TunWrite* item = &g.writes[index]
    cdef unsigned char* p = item.packet
    cdef int count = 2
    cdef int member, total
    cdef uint16_t partial
    memset(header, 0, sizeof(VirtioHeader))
    vector[0].iov_base = header
    vector[0].iov_len = VIRTIO_HEADER
    vector[1].iov_base = p
    vector[1].iov_len = <size_t>item.length
    if item.count == 0:
        return 0
    if item.count == 1:
        return 2
    total = item.headers + item.payload
    _store_be16(p + 2, <uint32_t>total)
    _set_ipv4_checksum(p, IPV4_HEADER)
    if item.push:
        p[33] |= TCP_PSH
    partial = _checksum_fold(_pseudo_header_sum(p, IPPROTO_TCP_, total - IPV4_HEADER))
    memcpy(p + 36, &partial, 2)
    header.flags = VIRTIO_NEEDS_CSUM
    header.gso_type = VIRTIO_GSO_TCPV4
    header.header_length = <uint16_t>item.headers
    header.segment_size = <uint16_t>item.segment_size
    header.checksum_start = IPV4_HEADER
    header.checksum_offset = 16
    member = item.next
    while member >= 0:
        vector[count].iov_base = g.writes[member].packet + item.headers
        vector[count].iov_len = <size_t>(g.writes[member].length - item.headers)
        count += 1
        member = g.writes[member].next
    return count


cdef inline void _gro_reset(GroState* g) noexcept nogil:
    g.count = 0
    g.flow_count = 0
    g.next_eviction = 0


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------

cdef unsigned char* _segment_space(Shared* s, Worker* w, int length) noexcept nogil:
    """Room for one segment with TUN_HEADROOM before it (for IPIP, the type byte
    and IV|tag, as a TUN slot has). A full arena is emptied by sending and
    pushing up everything that points into it."""
    cdef size_t need = (TUN_HEADROOM + <size_t>length + 63) & ~(<size_t>63)
    cdef unsigned char* space
    if w.segments_used + need > SEGMENT_ARENA_BYTES:
        _send_batch(s, w)
        _push_up(s, w)
        w.segments_used = 0
    space = w.segments + w.segments_used + TUN_HEADROOM
    w.segments_used += need
    return space


cdef void _route_from_tun(Shared* s, Worker* w, unsigned char* packet, int length) noexcept nogil:
    """A packet read from a TUN with a virtio header: route it, or its segments."""
    cdef VirtioHeader header
    cdef SegmentPlan plan
    cdef unsigned char* segment
    cdef int index, segment_length
    cdef int planned
    memcpy(&header, packet - VIRTIO_HEADER, VIRTIO_HEADER)
    planned = _plan_segments(&header, packet, length, &plan)
    if planned < 0:
        _count_tun_in(w, length)
        # An IPv6 super-packet (USO comes for both or neither) is dropped as
        # any IPv6 packet is.
        _drop(&w.totals, DROP_NOT_IPV4 if planned == -PLAN_NOT_IPV4 else DROP_MALFORMED)
        return
    if not plan.is_gso:
        if header.flags & VIRTIO_NEEDS_CSUM:
            _complete_checksum(&header, packet, length)
        _count_tun_in(w, length)
        _route_packet(s, w, packet, length, NULL)
        return
    for index in range(plan.count):
        segment = _segment_space(s, w, plan.headers + plan.segment_size)
        segment_length = _write_segment(&plan, packet, index, segment)
        _count_tun_in(w, segment_length)
        _route_packet(s, w, segment, segment_length, NULL)


cdef inline void _count_tun_in(Worker* w, int length) noexcept nogil:
    counter_add(&w.totals.tun_packets_in, 1)
    counter_add(&w.totals.tun_bytes_in, <uint64_t>length)


cdef void _flush_tun_writes(Shared* s, Worker* w) noexcept nogil:
    """Write the batch's held packets to the TUN, runs as one super-packet each."""
    cdef GroState* g = &w.gro
    cdef VirtioHeader header
    cdef iovec vector[GRO_MAX_VECTOR + 1]
    cdef ssize_t written
    cdef int index, parts, packets
    for index in range(g.count):
        parts = _gro_vector(g, index, &header, vector)
        if parts == 0:
            continue
        packets = g.writes[index].count
        while True:
            written = writev(s.tun_fd, vector, parts)
            if written >= 0 or errno != EINTR:
                break
        if written < 0:
            counter_add(&w.totals.drops[DROP_TUN_WRITE_FAILED], <uint64_t>packets)
            continue
        counter_add(&w.totals.tun_packets_out, <uint64_t>packets)
        # Counted as the packets that came over the wire, headers and all.
        counter_add(&w.totals.tun_bytes_out,
                    <uint64_t>(written - VIRTIO_HEADER
                               + (packets - 1) * g.writes[index].headers))
    _gro_reset(g)


cdef void _hold_for_tun(Shared* s, Worker* w, unsigned char* packet, int length) noexcept nogil:
    if w.gro.count >= TUN_WRITES:
        _flush_tun_writes(s, w)
    _gro_add(&w.gro, packet, length)


# ---------------------------------------------------------------------------
# Entry points for the tests (GIL held; the same code, no device)
# ---------------------------------------------------------------------------

OFFLOAD_ERRORS = {
    PLAN_TOO_SHORT: "shorter than an IPv4 header",
    PLAN_NOT_IPV4: "not IPv4",
    PLAN_BAD_LENGTH: "IPv4 header length or total length does not match the packet",
    PLAN_CHECKSUM_OUTSIDE: "checksum_start + checksum_offset lies outside the packet",
    PLAN_GSO_TYPE: "gso_type is not TCPV4 or UDP_L4 or does not match the IP protocol",
    PLAN_FRAGMENT: "a GSO packet is an IP fragment",
    PLAN_TRANSPORT_HEADER: "the TCP/UDP header does not fit the packet",
    PLAN_SEGMENT_SIZE: "segment_size is 0",
}


def segment_tun_packet(data):
    """virtio-net header + IPv4 packet, as the TUN hands it over -> the IPv4
    packets the plane seals, one per FORWARD. ValueError where the plane drops
    the packet as malformed."""
    cdef bytes whole = bytes(data)
    cdef VirtioHeader header
    cdef SegmentPlan plan
    cdef bytearray packet
    cdef unsigned char* out
    cdef int result, index, length
    cdef list segments = []
    if len(whole) < VIRTIO_HEADER:
        raise ValueError(f"shorter than the {VIRTIO_HEADER}-byte virtio-net header")
    if len(whole) - VIRTIO_HEADER > MAX_PACKET:
        raise ValueError(f"longer than {MAX_PACKET} bytes after the virtio-net header")
    memcpy(&header, PyBytes_AS_STRING(whole), VIRTIO_HEADER)
    packet = bytearray(whole[VIRTIO_HEADER:])
    length = len(packet)
    result = _plan_segments(&header, <unsigned char*>PyByteArray_AS_STRING(packet), length, &plan)
    if result < 0:
        raise ValueError(OFFLOAD_ERRORS[-result])
    if not plan.is_gso:
        if header.flags & VIRTIO_NEEDS_CSUM:
            _complete_checksum(&header, <unsigned char*>PyByteArray_AS_STRING(packet), length)
        return [bytes(packet)]
    out = <unsigned char*>malloc(<size_t>(plan.headers + plan.segment_size))
    if out == NULL:
        raise MemoryError()
    try:
        for index in range(plan.count):
            length = _write_segment(&plan, <unsigned char*>PyByteArray_AS_STRING(packet),
                                    index, out)
            segments.append(PyBytes_FromStringAndSize(<char*>out, length))
    finally:
        free(out)
    return segments


cdef list _gro_collect(GroState* g):
    cdef list writes = []
    cdef VirtioHeader header
    cdef iovec vector[GRO_MAX_VECTOR + 1]
    cdef int index, parts, part
    for index in range(g.count):
        parts = _gro_vector(g, index, &header, vector)
        if parts:
            writes.append(b"".join([
                PyBytes_FromStringAndSize(<char*>vector[part].iov_base,
                                          <Py_ssize_t>vector[part].iov_len)
                for part in range(parts)]))
    _gro_reset(g)
    return writes


def coalesce_tun_packets(packets):
    """The IPv4 packets one received batch opened, in order -> what the plane
    writes to the TUN: virtio-net header + packet, TCP runs coalesced."""
    cdef list copies = [bytearray(original) for original in packets]
    cdef list writes = []
    cdef GroState* g = <GroState*>calloc(1, sizeof(GroState))
    cdef bytearray packet
    if g == NULL:
        raise MemoryError()
    try:
        for packet in copies:
            if len(packet) > MAX_PACKET:
                raise ValueError(f"a packet longer than {MAX_PACKET} bytes")
            if g.count >= TUN_WRITES:
                writes.extend(_gro_collect(g))
            _gro_add(g, <unsigned char*>PyByteArray_AS_STRING(packet), <int>len(packet))
        writes.extend(_gro_collect(g))
    finally:
        free(g)
    return writes
