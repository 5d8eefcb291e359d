# Included by _fastpath.pyx: what the workers route and count by. A u32 -> u32
# hash map, the peer / route / sysroute tables (writers hold the write lock,
# workers the read lock) and the per-peer traffic counters.


# ---------------------------------------------------------------------------
# U32Map
# ---------------------------------------------------------------------------

cdef inline size_t _map_home(uint32_t key, size_t capacity) noexcept nogil:
    # murmur3's finaliser: tun ips differ in their low bits only, which a
    # plain mask would put in neighbouring slots.
    key ^= key >> 16
    key *= <uint32_t>0x85EBCA6B
    key ^= key >> 13
    key *= <uint32_t>0xC2B2AE35
    key ^= key >> 16
    return key & (capacity - 1)


cdef Py_ssize_t _map_locate(const U32Map* m, uint32_t key) noexcept nogil:
    cdef size_t i
    if m.capacity == 0:
        return -1
    i = _map_home(key, m.capacity)
    # The load factor stays below 3/4, so an empty slot ends every probe.
    while m.used[i]:
        if m.keys[i] == key:
            return <Py_ssize_t>i
        i = (i + 1) & (m.capacity - 1)
    return -1


cdef bint map_find(const U32Map* m, uint32_t key, uint32_t* value) noexcept nogil:
    cdef Py_ssize_t i = _map_locate(m, key)
    if i < 0:
        return False
    value[0] = m.values[i]
    return True


cdef void _map_place(U32Map* m, uint32_t key, uint32_t value) noexcept nogil:
    cdef size_t i = _map_home(key, m.capacity)
    while m.used[i]:
        i = (i + 1) & (m.capacity - 1)
    m.used[i] = 1
    m.keys[i] = key
    m.values[i] = value


cdef int _map_resize(U32Map* m, size_t capacity) noexcept nogil:
    cdef U32Map old = m[0]
    cdef size_t i
    m.keys = <uint32_t*>malloc(capacity * sizeof(uint32_t))
    m.values = <uint32_t*>malloc(capacity * sizeof(uint32_t))
    m.used = <unsigned char*>calloc(capacity, 1)
    if m.keys == NULL or m.values == NULL or m.used == NULL:
        free(m.keys)
        free(m.values)
        free(m.used)
        m[0] = old
        return -1
    m.capacity = capacity
    for i in range(old.capacity):
        if old.used[i]:
            _map_place(m, old.keys[i], old.values[i])
    free(old.keys)
    free(old.values)
    free(old.used)
    return 0


cdef int map_put(U32Map* m, uint32_t key, uint32_t value) noexcept nogil:
    """Insert or overwrite; -1 when out of memory (overwriting never fails)."""
    cdef Py_ssize_t i = _map_locate(m, key)
    if i >= 0:
        m.values[i] = value
        return 0
    if (m.count + 1) * 4 > m.capacity * 3:
        if _map_resize(m, m.capacity * 2 if m.capacity else 16) < 0:
            return -1
    _map_place(m, key, value)
    m.count += 1
    return 0


cdef bint map_remove(U32Map* m, uint32_t key, uint32_t* value) noexcept nogil:
    cdef Py_ssize_t found = _map_locate(m, key)
    cdef size_t i, j, home
    cdef size_t mask = m.capacity - 1
    if found < 0:
        return False
    i = j = <size_t>found
    value[0] = m.values[i]
    # Backward-shift deletion: pull later entries of the probe run into the
    # hole unless that would put them before their home slot.
    while True:
        j = (j + 1) & mask
        if not m.used[j]:
            break
        home = _map_home(m.keys[j], m.capacity)
        if (home <= i or home > j) if j > i else (home <= i and home > j):
            m.keys[i] = m.keys[j]
            m.values[i] = m.values[j]
            i = j
    m.used[i] = 0
    m.count -= 1
    return True


cdef void map_free(U32Map* m) noexcept nogil:
    free(m.keys)
    free(m.values)
    free(m.used)
    memset(m, 0, sizeof(U32Map))


# ---------------------------------------------------------------------------
# Tables (writers hold the write lock, workers the read lock)
# ---------------------------------------------------------------------------

cdef Peer* _find_peer(const Tables* t, uint32_t ip) noexcept nogil:
    cdef uint32_t position
    if map_find(&t.peer_index, ip, &position):
        return &t.peers[position]
    return NULL


cdef int _tables_set_peer(Tables* t, const Peer* peer, Peer* replaced) noexcept nogil:
    """1: replaced (old entry copied to `replaced`), 0: added, -1: out of memory."""
    cdef Peer* existing = _find_peer(t, peer.ip)
    cdef Peer* grown
    cdef size_t capacity
    if existing != NULL:
        replaced[0] = existing[0]
        existing[0] = peer[0]
        return 1
    if t.peer_count == t.peer_capacity:
        capacity = t.peer_capacity * 2 if t.peer_capacity else 8
        grown = <Peer*>realloc(t.peers, capacity * sizeof(Peer))
        if grown == NULL:
            return -1
        t.peers = grown
        t.peer_capacity = capacity
    if map_put(&t.peer_index, peer.ip, <uint32_t>t.peer_count) < 0:
        return -1
    t.peers[t.peer_count] = peer[0]
    t.peer_count += 1
    return 0


cdef bint _tables_drop_peer(Tables* t, uint32_t ip, Peer* removed) noexcept nogil:
    cdef uint32_t position
    cdef size_t last
    if not map_remove(&t.peer_index, ip, &position):
        return False
    removed[0] = t.peers[position]
    last = t.peer_count - 1
    if position != last:
        # Keep the array dense: the last peer moves into the hole.
        t.peers[position] = t.peers[last]
        map_put(&t.peer_index, t.peers[position].ip, position)
    t.peer_count = last
    return True


cdef void _free_seal_contexts(EVP_CIPHER_CTX** contexts) noexcept nogil:
    cdef int role
    for role in range(N_WORKERS):
        EVP_CIPHER_CTX_free(contexts[role])
        contexts[role] = NULL


cdef void _tables_free(Tables* t) noexcept nogil:
    cdef size_t i
    for i in range(t.peer_count):
        _free_seal_contexts(t.peers[i].seal)
    free(t.peers)
    free(t.sysroutes)
    t.peers = NULL
    t.sysroutes = NULL
    t.peer_count = t.peer_capacity = t.sysroute_count = 0
    map_free(&t.peer_index)
    map_free(&t.routes)


cdef bint _sysroute_for(const Tables* t, uint32_t destination, uint32_t* nexthop) noexcept nogil:
    cdef size_t i
    for i in range(t.sysroute_count):
        if (destination & t.sysroutes[i].mask) == t.sysroutes[i].network:
            nexthop[0] = t.sysroutes[i].nexthop
            return True
    return False


# ---------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------

cdef inline void _drop(Totals* totals, int reason) noexcept nogil:
    counter_add(&totals.drops[reason], 1)


cdef PeerTraffic* _add_peer_traffic(CounterTable* table, uint32_t ip) noexcept nogil:
    cdef PeerTraffic* entries
    cdef PeerTraffic* entry = NULL
    cdef size_t capacity
    if table.count >= PEER_COUNTER_LIMIT:
        return NULL              # not counted (see MAX_PEER_COUNTERS)
    pthread_mutex_lock(&table.lock)
    if table.count == table.capacity:
        capacity = table.capacity * 2 if table.capacity else 16
        entries = <PeerTraffic*>realloc(table.entries, capacity * sizeof(PeerTraffic))
        if entries != NULL:
            table.entries = entries
            table.capacity = capacity
    if table.count < table.capacity and map_put(&table.index, ip, <uint32_t>table.count) == 0:
        entry = &table.entries[table.count]
        memset(entry, 0, sizeof(PeerTraffic))
        entry.ip = ip
        table.count += 1
    pthread_mutex_unlock(&table.lock)
    return entry


cdef PeerTraffic* _peer_traffic(Worker* w, uint32_t ip) noexcept nogil:
    """This worker's counters for `ip`, created on first use; NULL if out of memory."""
    cdef uint32_t position
    if map_find(&w.counters.index, ip, &position):
        return &w.counters.entries[position]
    return _add_peer_traffic(&w.counters, ip)


cdef void _count_sent(Worker* w, int first, int count) noexcept nogil:
    cdef int i
    cdef PeerTraffic* traffic
    for i in range(first, first + count):
        traffic = _peer_traffic(w, w.outgoing[i].destination)
        if traffic != NULL:
            counter_add(&traffic.packets_out, 1)
            counter_add(&traffic.bytes_out, <uint64_t>w.outgoing[i].length)
