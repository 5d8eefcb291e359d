# cython: language_level=3
"""C-level state of the compiled data plane (p2pvpn._fastpath).

The constants and structs that the worker threads share with the event loop
side; the code that uses them is in _fastpath.pyx and the .pxi files it
includes. Kept here, apart from the code, as uvloop keeps its declarations.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec

from p2pvpn._gcm cimport IvSource
from p2pvpn._openssl cimport EVP_CIPHER_CTX
from p2pvpn._posix cimport mmsghdr, pthread_mutex_t, pthread_rwlock_t, sockaddr_in


# Shared with the Python side, which defines each of them: compared with it at
# import (_fastpath.pyx), so a stale build fails loudly instead of misbehaving.
cdef enum:
    BATCH = 64                   # dataplane.base.BATCH_SIZE
    MAX_DATAGRAM_LEN = 65564     # dataplane.base.MAX_DATAGRAM
    PEER_COUNTER_LIMIT = 16384   # dataplane.base.MAX_PEER_COUNTERS
    REPLAY_LIMIT = 1048576       # dataplane.base.REPLAY_BUCKET_LIMIT
    REPLAY_BUCKETS = 3           # dataplane.replay.REPLAY_BUCKETS
    FORWARD_TYPE = 1             # dataplane.base.FORWARD_TYPE
    MAX_PACKET = 65535           # wire.ipv4.MAX_TOTAL_LENGTH; also what one TUN read asks for
    IPV4_HEADER = 20             # wire.ipv4.MIN_HEADER_LENGTH
    IPPROTO_IPIP_ = 4            # wire.ipv4.IPPROTO_IPIP
    IPIP_TTL = 64                # wire.ipv4.DEFAULT_TTL, the TTL of an IPIP header we write
    STUN_HEADER = 20             # 8 + wire.stun.TRANSACTION_ID_SIZE
    STUN_BINDING_RESPONSE = 0x0101   # wire.stun.BINDING_SUCCESS_RESPONSE
    STUN_MAGIC_COOKIE = 0x2112A442   # wire.stun.MAGIC_COOKIE

cdef enum:
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
    # The replay record (p2pvpn.dataplane.replay is the reference): buckets
    # of half a window each, linear-probing sets of 32-bit IV tags.
    REPLAY_MIN_SLOTS = 1024
    REPLAY_TABLES = 8            # 1024 slots times 4**7 holds REPLAY_LIMIT

cdef enum:
    # TUN offloads (IFF_VNET_HDR): wire.virtio is the reference for these.
    VIRTIO_HEADER = 10           # wire.virtio.HEADER_LENGTH
    VIRTIO_NEEDS_CSUM = 1        # wire.virtio.NEEDS_CSUM
    VIRTIO_GSO_NONE = 0          # wire.virtio.GSO_NONE
    VIRTIO_GSO_TCPV4 = 1         # wire.virtio.GSO_TCPV4
    VIRTIO_GSO_UDP_L4 = 5        # wire.virtio.GSO_UDP_L4
    VIRTIO_GSO_ECN = 0x80        # wire.virtio.GSO_ECN
    IPPROTO_TCP_ = 6
    IPPROTO_UDP_ = 17
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    TCP_CWR = 0x80
    # Segments cut from super-packets wait here, each with TUN_HEADROOM in
    # front, until their batch is sent: room for four 64 KB super-packets.
    SEGMENT_ARENA_BYTES = 524288
    # Opened packets held back for coalescing before the TUN writes; a full
    # table is written out early. A run is at most 64 segments, as in the
    # kernel's GRO, and one writev takes the virtio header, the first
    # segment and the payloads of the others.
    TUN_WRITES = 1024
    GRO_FLOWS = 16
    GRO_MAX_SEGMENTS = 64
    GRO_MAX_VECTOR = GRO_MAX_SEGMENTS + 1

cdef enum:  # worker roles
    ROLE_TUN = 0
    ROLE_UDP = 1
    N_WORKERS = 2

cdef enum:  # kinds of upward items
    UP_STUN = 0
    UP_CONTROL = 1
    UP_RELAY = 2

# Indexes of Totals.drops; _DROP_KEYS in _fastpath.pyx gives their DropReason names.
cdef enum:
    DROP_TOO_SHORT = 0
    DROP_AUTHENTICATION
    DROP_MALFORMED
    DROP_NOT_IPV4
    DROP_SEND_FAILED
    DROP_TUN_WRITE_FAILED
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
    # Exit node (set_forwarded_wrap): packets from outside the VPN network to a
    # member are IPIP-wrapped toward it. Off while has_forwarded_wrap is 0.
    bint has_forwarded_wrap
    uint32_t wrap_network
    uint32_t wrap_mask
    bint has_stun
    sockaddr_in stun


# The virtio-net header in front of every packet of a TUN with IFF_VNET_HDR
# (native byte order; no padding: 1 + 1 + 4 * 2 = VIRTIO_HEADER bytes).
cdef struct VirtioHeader:
    uint8_t flags
    uint8_t gso_type
    uint16_t header_length
    uint16_t segment_size
    uint16_t checksum_start
    uint16_t checksum_offset


# How a packet read from the TUN is cut into the packets that get sealed.
cdef struct SegmentPlan:
    int protocol                 # IPPROTO_TCP_ or IPPROTO_UDP_
    int ip_header                # bytes
    int headers                  # IP + TCP/UDP header bytes, copied into each segment
    int payload                  # bytes after the headers
    int segment_size             # payload bytes per segment (the last may be shorter)
    int count                    # segments; 1 for a packet that is not GSO
    bint is_gso


# One packet waiting to be written to the TUN: alone, as the head of a run of
# one TCP flow's segments (the writev carries them all), or as a member of a
# run (count == 0: its head writes it).
cdef struct TunWrite:
    unsigned char* packet
    int length
    int headers                  # head of a coalescible run: IP + TCP header bytes
    int next                     # the next member of the run; -1
    int last                     # head: its last member (itself when alone)
    int count                    # head: segments in the run; 0 for a member
    int payload                  # head: payload bytes of the run
    int segment_size             # head: the first segment's payload; 0: never joined
    uint32_t next_sequence       # head: the sequence number that may join next
    uint16_t next_id             # head: the IP ID that may join next
    bint open                    # head: more segments may join
    bint push                    # head: a member had PSH


# The writes of one received batch; flows[] holds the heads of open runs.
cdef struct GroState:
    TunWrite writes[TUN_WRITES]
    int count
    int flows[GRO_FLOWS]
    int flow_count
    int next_eviction


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
    unsigned char* segments      # TUN worker: SEGMENT_ARENA_BYTES for cut super-packets
    size_t segments_used
    GroState gro                 # UDP worker: opened packets before their TUN writes


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
    bint tun_vnet_header         # the TUN fd carries a virtio-net header (TUN offloads)
    ReplayRecord replay
    EVP_CIPHER_CTX* open_ctx     # own key; only the UDP worker opens
    Tables tables
    UpQueue up
    Worker workers[N_WORKERS]
    Totals python_totals         # write_tun, send_control, send_stun (GIL held)
