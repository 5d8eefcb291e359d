# Included by _fastpath.pyx: the replay record of the UDP worker, the C twin of
# p2pvpn.dataplane.replay.ReplayWindow.


cdef inline uint64_t _mix64(uint64_t value) noexcept nogil:
    # splitmix64's finaliser.
    value ^= value >> 30
    value *= <uint64_t>0xBF58476D1CE4E5B9
    value ^= value >> 27
    value *= <uint64_t>0x94D049BB133111EB
    value ^= value >> 31
    return value


cdef inline uint64_t _iv_hash(const unsigned char* iv, uint64_t seed) noexcept nogil:
    """The IV's 96 bits mixed with the secret seed into 64: the low bits pick
    a slot, the high 32 are the tag kept there. The seed keeps both out of a
    sender's control."""
    cdef uint64_t head
    cdef uint32_t tail
    memcpy(&head, iv, 8)
    memcpy(&tail, iv + 8, 4)
    return _mix64(head ^ seed ^ (<uint64_t>tail * <uint64_t>0x9E3779B97F4A7C15))


cdef inline uint32_t _hash_tag(uint64_t hash) noexcept nogil:
    # Four bytes a slot keep the record small (it grows with the packet
    # rate). A fresh IV matches a tag only where its slot's probe run holds
    # an equal one: odds of a few in 10**9 per datagram, a datagram dropped
    # every few minutes at 10 Gbit/s, none to speak of below.
    cdef uint32_t tag = <uint32_t>(hash >> 32)
    return tag if tag != 0 else 1


cdef bint _table_contains(const IvTable* table, uint64_t hash, uint32_t tag) noexcept nogil:
    cdef size_t mask = table.capacity - 1
    cdef size_t i = <size_t>hash & mask
    # The load stays at or below 3/4: a free slot ends every probe.
    while table.slots[i] != 0:
        if table.slots[i] == tag:
            return True
        i = (i + 1) & mask
    return False


cdef void _table_place(IvTable* table, uint64_t hash, uint32_t tag) noexcept nogil:
    cdef size_t mask = table.capacity - 1
    cdef size_t i = <size_t>hash & mask
    while table.slots[i] != 0:
        i = (i + 1) & mask
    table.slots[i] = tag
    table.count += 1


cdef bint _bucket_contains(const IvBucket* bucket, uint64_t hash, uint32_t tag) noexcept nogil:
    cdef int i
    for i in range(bucket.table_count):
        if _table_contains(&bucket.tables[i], hash, tag):
            return True
    return False


cdef int _bucket_add_table(IvBucket* bucket, size_t capacity) noexcept nogil:
    cdef IvTable* table
    if bucket.table_count == REPLAY_TABLES:
        return -1
    table = &bucket.tables[bucket.table_count]
    table.slots = <uint32_t*>calloc(capacity, sizeof(uint32_t))
    if table.slots == NULL:
        return -1
    table.capacity = capacity
    table.count = 0
    bucket.table_count += 1
    return 0


cdef void _bucket_place(IvBucket* bucket, uint64_t hash, uint32_t tag) noexcept nogil:
    """Record a tag; a full last table gets a larger one after it.

    Tags keep no more of the hash than their slot needs, so a table cannot be
    rehashed into a bigger one; lookups try each table of the bucket instead.
    At steady traffic there is one: _bucket_reuse sizes it from the last span.
    """
    cdef IvTable* last
    if bucket.count >= REPLAY_LIMIT:
        return
    last = &bucket.tables[bucket.table_count - 1] if bucket.table_count else NULL
    if last == NULL or (last.count + 1) * 4 > last.capacity * 3:
        # Four times larger: a ramp from idle to full rate adds few tables.
        if _bucket_add_table(bucket, last.capacity * 4 if last != NULL
                             else REPLAY_MIN_SLOTS) < 0:
            return
        last = &bucket.tables[bucket.table_count - 1]
    _table_place(last, hash, tag)
    bucket.count += 1


cdef void _bucket_clear(IvBucket* bucket) noexcept nogil:
    cdef int i
    for i in range(bucket.table_count):
        free(bucket.tables[i].slots)
        bucket.tables[i].slots = NULL
        bucket.tables[i].capacity = bucket.tables[i].count = 0
    bucket.table_count = 0
    bucket.count = 0


cdef void _bucket_reuse(IvBucket* bucket, int64_t number) noexcept nogil:
    """Empty a bucket for a new span of time, with one table sized for the
    traffic of the span it last held (at most 3/4 full at that rate)."""
    cdef size_t capacity = REPLAY_MIN_SLOTS
    while capacity * 3 < bucket.count * 4:
        capacity *= 2
    if bucket.table_count == 1 and bucket.tables[0].capacity == capacity:
        memset(bucket.tables[0].slots, 0, capacity * sizeof(uint32_t))
        bucket.tables[0].count = 0
        bucket.count = 0
    else:
        _bucket_clear(bucket)
        _bucket_add_table(bucket, capacity)  # on failure, the next place retries
    bucket.number = number


cdef extern from *:
    void __builtin_prefetch(const void* address) nogil


cdef uint64_t replay_prefetch(const ReplayRecord* record, const unsigned char* iv) noexcept nogil:
    """The IV's hash for replay_seen, whose slots start loading now.

    Called before the datagram is decrypted, so the cache misses of the
    lookups (one per bucket, in tables too large for the cache at high
    rates) overlap with AES-GCM instead of following it.
    """
    cdef uint64_t hash = _iv_hash(iv, record.seed)
    cdef const IvBucket* bucket
    cdef int i, j
    for i in range(REPLAY_BUCKETS):
        bucket = &record.buckets[i]
        if bucket.number > record.now - REPLAY_BUCKETS:
            for j in range(bucket.table_count):
                __builtin_prefetch(&bucket.tables[j].slots[
                    <size_t>hash & (bucket.tables[j].capacity - 1)])
    return hash


cdef void replay_set_time(ReplayRecord* record) noexcept nogil:
    """Take the clock once per batch."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    record.now = <int64_t>((<uint64_t>now.tv_sec * <uint64_t>1000000000
                            + <uint64_t>now.tv_nsec) // record.bucket_ns)


cdef bint replay_seen(ReplayRecord* record, uint64_t hash) noexcept nogil:
    """dataplane.replay.ReplayWindow.seen for the IV of `hash` (replay_prefetch):
    True for an IV seen within the window, else it is recorded (unless its
    bucket is full or memory is short)."""
    cdef uint32_t tag = _hash_tag(hash)
    cdef IvBucket* bucket
    cdef IvBucket* current = &record.buckets[record.now % REPLAY_BUCKETS]
    cdef int i
    if current.number != record.now:
        _bucket_reuse(current, record.now)
    for i in range(REPLAY_BUCKETS):
        bucket = &record.buckets[i]
        # A bucket left from longer ago holds nothing of the window.
        if bucket.number > record.now - REPLAY_BUCKETS and _bucket_contains(bucket, hash, tag):
            return True
    _bucket_place(current, hash, tag)
    return False


cdef void replay_init(ReplayRecord* record, uint64_t bucket_ns, uint64_t seed) noexcept nogil:
    cdef int i
    memset(record, 0, sizeof(ReplayRecord))
    for i in range(REPLAY_BUCKETS):
        record.buckets[i].number = -1
    record.bucket_ns = bucket_ns if bucket_ns else 1
    record.seed = seed


cdef void replay_free(ReplayRecord* record) noexcept nogil:
    cdef int i
    for i in range(REPLAY_BUCKETS):
        _bucket_clear(&record.buckets[i])
        record.buckets[i].number = -1
