"""A model of PyTorch's CUDA caching allocator: from a trace of allocations to `reserved` bytes.

`torch.cuda.max_memory_allocated` counts the blocks held by live tensors at the peak (each request
rounded up, sometimes to a whole larger block); `torch.cuda.max_memory_reserved` counts what the
allocator holds from the driver, which is what the card must have. The two differ by the
allocator's segment sizes, splitting and caching. This module
replays a sequence of allocations and frees under the rules of the allocator in
c10/cuda/CUDACachingAllocator.cpp (PyTorch's default CUDA allocator), so a trace taken on CPU
gives the `reserved` bytes a GPU run of the same trace would show.

    alloc = CachingAllocator()
    alloc.malloc("x", 5 * 2**20)       # a 5 MiB tensor: one 20 MiB segment
    alloc.free("x")                    # cached, still reserved
    replay([("alloc", "x", 12 * 2**20), ("free", "x")])["max_reserved"]   # 12 MiB

What is modelled, each rule beside the code it drives: rounding of request sizes, the small and
the large pool, segment sizes, best-fit search, splitting, coalescing, the release of cached
segments and retry when a new segment would pass `capacity`, and expandable segments
(``expandable_segments=True``: one segment per pool that grows by mapping pages).

Left out, because a single-stream trace does not exercise them or they are off by default:
several streams and `record_stream` (blocks are reused only on their stream, after events);
CUDA graph private pools; `garbage_collection_threshold`; `max_split_size_mb` (and
release_available_cached_blocks, which acts only with it); `roundup_power2_divisions`;
free-memory callbacks; switching expandable segments on or off mid-run. `capacity` stands for the
device's memory (or a memory fraction); the CUDA context and memory allocated outside the
allocator are not counted, and neither is anything the trace does not contain (cuBLAS workspaces,
NCCL buffers).
"""
from __future__ import annotations

import bisect
import numbers
from typing import Hashable, Iterable

SOURCE = "c10/cuda/CUDACachingAllocator.cpp"

# The allocator's size constants (their names in SOURCE).
MIN_BLOCK = 512  # kMinBlockSize: every block is a multiple of 512 bytes
SMALL_SIZE = 1 << 20  # kSmallSize: requests up to 1 MiB go to the small pool
SMALL_BUFFER = 2 << 20  # kSmallBuffer: the small pool's segments are 2 MiB
LARGE_BUFFER = 20 << 20  # kLargeBuffer: segments for large requests under kMinLargeAlloc
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge: larger requests get a segment rounded up to 2 MiB

# An expandable segment reserves address space for 9/8 of the device's memory (the
# ExpandableSegment constructor and find_expandable_block); without a `capacity` we take 1 TiB.
_ADDRESS_SPACE = 1 << 40


def round_size(nbytes: int) -> int:
    """The block size a request of nbytes takes (round_size: up to a multiple of 512, at least
    512; the roundup_power2_divisions option is off by default and not modelled)."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """Bytes of the new segment (cudaMalloc) made for a rounded request that fits no cached block
    (get_allocation_size)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class _Segment:
    """An expandable segment: a range of address space mapped page by page (ExpandableSegment)."""
    __slots__ = ("base", "page", "size")

    def __init__(self, base: int, page: int, size: int):
        self.base, self.page, self.size = base, page, size


class _Block:
    """A range of a segment: allocated, free (cached) or, in an expandable segment, unmapped.
    prev/next link the blocks of one segment in address order (Block in SOURCE)."""
    __slots__ = ("addr", "size", "small", "segment", "prev", "next", "allocated", "mapped")

    def __init__(self, addr: int, size: int, small: bool, segment: _Segment | None = None,
                 mapped: bool = True):
        self.addr, self.size, self.small, self.segment = addr, size, small, segment
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.allocated = False
        self.mapped = mapped

    def splice(self, before: _Block | None, after: _Block | None) -> None:
        """Put this block between two neighbours (Block::splice)."""
        if before is not None:
            before.next = self
        if after is not None:
            after.prev = self
        self.prev, self.next = before, after


class _Pool:
    """The free blocks of one pool, ordered by (size, address) as BlockComparatorSize orders
    BlockPool::blocks, and its unmapped blocks ordered by address (BlockPool::unmapped)."""

    def __init__(self, small: bool):
        self.small = small
        self.free_keys: list[tuple[int, int]] = []
        self.free: dict[int, _Block] = {}
        self.unmapped_addrs: list[int] = []
        self.unmapped: dict[int, _Block] = {}

    def add(self, block: _Block) -> None:
        if block.mapped:
            bisect.insort(self.free_keys, (block.size, block.addr))
            self.free[block.addr] = block
        else:
            bisect.insort(self.unmapped_addrs, block.addr)
            self.unmapped[block.addr] = block

    def remove(self, block: _Block) -> None:
        if block.mapped:
            keys = self.free_keys
            del keys[bisect.bisect_left(keys, (block.size, block.addr))]
            del self.free[block.addr]
        else:
            del self.unmapped_addrs[bisect.bisect_left(self.unmapped_addrs, block.addr)]
            del self.unmapped[block.addr]


class CachingAllocator:
    """One device's caching allocator on a single stream.

    `malloc(key, nbytes)` and `free(key)` take any hashable key naming a tensor storage.
    `allocated`, `reserved`, `max_allocated` and `max_reserved` (bytes) follow
    `torch.cuda.memory_allocated`, `memory_reserved` and their `max_` peaks. With `capacity`
    (bytes), a segment that would take reserved past it is refused as by the driver; the
    allocator then frees its cached segments and retries, and raises MemoryError if that fails.
    """

    def __init__(self, expandable_segments: bool = False, capacity: int | None = None):
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                     or capacity < 0):
            raise ValueError(f"capacity must be a number of bytes >= 0 or None, got {capacity!r}")
        self.expandable_segments = bool(expandable_segments)
        self.capacity = capacity
        self.allocated = 0
        self.reserved = 0
        self.max_allocated = 0
        self.max_reserved = 0
        self._live: dict[Hashable, _Block | None] = {}
        self._pools = {True: _Pool(True), False: _Pool(False)}
        self._next_addr = 1 << 32  # where the next segment's address range starts
        space = _ADDRESS_SPACE if capacity is None else capacity + capacity // 8
        self._address_space = max(space, LARGE_BUFFER)

    # ---- the public operations ----------------------------------------------------------------
    def malloc(self, key: Hashable, nbytes: int) -> None:
        """Allocate nbytes for key (DeviceCachingAllocator::malloc)."""
        if key in self._live:
            raise ValueError(f"malloc of {key!r}: the key is already allocated (free it first)")
        if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral) or nbytes < 0:
            raise ValueError(f"malloc of {key!r}: nbytes must be an int >= 0, got {nbytes!r}")
        nbytes = int(nbytes)
        if nbytes == 0:
            # NativeCachingAllocator::allocate hands out a null pointer for 0 bytes: no block
            self._live[key] = None
            return
        size = round_size(nbytes)
        pool = self._pools[size <= SMALL_SIZE]  # get_pool: small pool up to kSmallSize
        block = self._get_free_block(pool, size)
        if block is None:
            # a new segment; if the device refuses it, free every cached unsplit segment and
            # retry once (malloc: alloc_block, then release_cached_blocks and alloc_block again)
            block = self._alloc_block(pool, size)
            if block is None:
                self._release_cached_blocks()
                block = self._alloc_block(pool, size)
            if block is None:
                raise MemoryError(
                    f"out of memory allocating {key!r}: tried to allocate {segment_size(size)} "
                    f"bytes ({nbytes} requested) with capacity {self.capacity} bytes, "
                    f"{self.reserved} reserved and {self.allocated} allocated")
        block = self._alloc_found_block(pool, block, size)
        self._live[key] = block
        self.allocated += block.size
        self.max_allocated = max(self.max_allocated, self.allocated)

    def free(self, key: Hashable) -> None:
        """Free key's block; it stays reserved, cached for reuse (DeviceCachingAllocator::free)."""
        try:
            block = self._live.pop(key)
        except KeyError:
            raise ValueError(f"free of {key!r}: the key is not allocated") from None
        if block is not None:
            self.allocated -= block.size
            self._free_block(block)

    def empty_cache(self) -> None:
        """Give cached memory back to the driver, as `torch.cuda.empty_cache()` does
        (emptyCache -> release_cached_blocks): free unsplit segments, unmap free pages."""
        self._release_cached_blocks()

    def segments(self) -> list[int]:
        """Sizes of the segments held now, in address order; an expandable segment counts once per
        contiguous mapped range, as `torch.cuda.memory_snapshot()` reports it. Sums to reserved."""
        blocks = [b for b in self._live.values() if b is not None]
        for pool in self._pools.values():
            blocks += pool.free.values()
        heads = sorted((b for b in blocks if b.prev is None or not b.prev.mapped),
                       key=lambda b: b.addr)
        sizes = []
        for block in heads:
            total = 0
            while block is not None and block.mapped:
                total += block.size
                block = block.next
            sizes.append(total)
        return sizes

    # ---- finding and splitting a block --------------------------------------------------------
    def _get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        """Best fit: the smallest cached block of at least size, the lowest address among equals
        (get_free_block: lower_bound in the pool ordered by BlockComparatorSize)."""
        keys = pool.free_keys
        i = bisect.bisect_left(keys, (size, -1))
        if i == len(keys):
            return None
        if self.expandable_segments:
            # A free block followed by unmapped space counts as the size it could grow to, so a
            # larger block elsewhere may be preferred to the end of the segment (get_free_block).
            def growable(j: int) -> int:
                b = pool.free[keys[j][1]]
                return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)
            while i + 1 < len(keys) and growable(i + 1) < growable(i):
                i += 1
        block = pool.free[keys[i][1]]
        pool.remove(block)
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        """should_split: the small pool (and any pool with expandable segments) keeps a remainder
        of at least kMinBlockSize; the large pool only one of more than kSmallSize, so a large
        request may take up to 1 MiB more than it asked for."""
        remaining = block.size - size
        if block.small or self.expandable_segments:
            return remaining >= MIN_BLOCK
        return remaining > SMALL_SIZE

    def _alloc_found_block(self, pool: _Pool, block: _Block, size: int) -> _Block:
        """Hand out the front of block, putting the rest back in the pool (alloc_found_block)."""
        if self._should_split(block, size):
            front = _Block(block.addr, size, block.small, block.segment)
            front.splice(block.prev, block)
            block.addr += size
            block.size -= size
            pool.add(block)
            block = front
        block.allocated = True
        return block

    def _free_block(self, block: _Block) -> None:
        """Merge a freed block with free neighbours of its segment and cache it (free_block)."""
        block.allocated = False
        pool = self._pools[block.small]
        for neighbour in (block.prev, block.next):
            self._try_merge(block, neighbour, pool)
        pool.add(block)

    def _try_merge(self, dst: _Block, src: _Block | None, pool: _Pool) -> None:
        """Absorb src into dst if src is free and mapped alike (try_merge_blocks)."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        pool.remove(src)
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size

    # ---- segments: cudaMalloc, or pages of an expandable segment ------------------------------
    def _grow(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.max_reserved = max(self.max_reserved, self.reserved)

    def _alloc_block(self, pool: _Pool, size: int) -> _Block | None:
        """A new segment for a request no cached block fits; None when it would pass capacity
        (alloc_block: cudaMalloc of get_allocation_size, or try_allocate_expandable_block)."""
        if self.expandable_segments:
            return self._alloc_expandable(pool, size)
        nbytes = segment_size(size)
        if self.capacity is not None and self.reserved + nbytes > self.capacity:
            return None
        block = _Block(self._next_addr, nbytes, pool.small)
        self._next_addr += nbytes
        self._grow(nbytes)
        return block

    def _find_expandable_block(self, pool: _Pool, size: int) -> _Block:
        """The lowest-addressed run of free and unmapped blocks with room for size, starting with
        a free block just before unmapped space; a new segment if there is none
        (find_expandable_block). The pages of a segment are 2 MiB in the small pool and 20 MiB in
        the large one (kSmallBuffer, kLargeBuffer)."""
        for addr in pool.unmapped_addrs:
            start = pool.unmapped[addr]
            if start.prev is not None and not start.prev.allocated:
                start = start.prev
            room, b = 0, start
            while room < size and b is not None and not b.allocated:
                room += b.size
                b = b.next
            if room >= size:
                return start
        page = SMALL_BUFFER if pool.small else LARGE_BUFFER
        segment = _Segment(self._next_addr, page, -(-self._address_space // page) * page)
        self._next_addr += segment.size
        block = _Block(segment.base, segment.size, pool.small, segment, mapped=False)
        pool.add(block)
        return block

    def _map_block(self, block: _Block, size: int) -> bool:
        """Map whole pages over the first size bytes of an unmapped block, splitting off the rest,
        and merge the new memory with free neighbours; False if the pages would pass capacity
        (map_block, ExpandableSegment::map)."""
        segment = block.segment
        nbytes = -(-size // segment.page) * segment.page  # blocks start on a page boundary
        if self.capacity is not None and self.reserved + nbytes > self.capacity:
            return False
        pool = self._pools[block.small]
        pool.remove(block)
        block.mapped = True
        if nbytes < block.size:
            rest = _Block(block.addr + nbytes, block.size - nbytes, block.small, segment,
                          mapped=False)
            rest.splice(block, block.next)
            pool.add(rest)
            block.size = nbytes
        self._try_merge(block, block.prev, pool)
        self._try_merge(block, block.next, pool)
        pool.add(block)
        self._grow(nbytes)
        return True

    def _alloc_expandable(self, pool: _Pool, size: int) -> _Block | None:
        """Map just enough pages to hold size, reusing free memory at the end of the mapped part
        (try_allocate_expandable_block). Pages mapped before a failure stay mapped and cached."""
        block = self._find_expandable_block(pool, size)
        if not block.mapped and not self._map_block(block, min(block.size, size)):
            return None
        while block.size < size:  # a free block followed by unmapped space
            after = block.next
            if not self._map_block(after, min(size - block.size, after.size)):
                return None
            block = after  # map_block merged the free block into it
        pool.remove(block)
        return block

    # ---- giving memory back -------------------------------------------------------------------
    def _release_cached_blocks(self) -> None:
        """Free every cached segment that is not split, and unmap the whole free pages of
        expandable segments, dropping a segment once nothing of it is mapped
        (release_cached_blocks -> release_blocks, release_block, unmap_block)."""
        for small in (False, True):  # the large pool first, as in release_cached_blocks
            pool = self._pools[small]
            to_unmap = []
            for block in list(pool.free.values()):
                if block.segment is not None:
                    to_unmap.append(block)
                elif block.prev is None and block.next is None:  # a whole cudaMalloc: cudaFree
                    pool.remove(block)
                    self.reserved -= block.size
            for block in to_unmap:
                self._unmap_block(block, pool)
                if block.prev is None and block.next is None and not block.mapped:
                    pool.remove(block)  # release_expandable_segment

    def _unmap_block(self, block: _Block, pool: _Pool) -> None:
        """Unmap the pages that lie wholly inside a free block; the partial pages at its ends stay
        mapped as free blocks (unmap_block, ExpandableSegment::unmap)."""
        segment = block.segment
        page, base = segment.page, segment.base
        first = -(-(block.addr - base) // page)
        last = (block.addr + block.size - base) // page
        if first >= last:
            return
        pool.remove(block)
        start, nbytes = base + first * page, (last - first) * page
        before = start - block.addr
        after = block.size - before - nbytes
        if before > 0:
            head = _Block(block.addr, before, block.small, segment)
            head.splice(block.prev, block)
            pool.add(head)
        if after > 0:
            tail = _Block(start + nbytes, after, block.small, segment)
            tail.splice(block, block.next)
            pool.add(tail)
        block.addr, block.size, block.mapped = start, nbytes, False
        self._try_merge(block, block.prev, pool)
        self._try_merge(block, block.next, pool)
        pool.add(block)
        self.reserved -= nbytes


def replay(events: Iterable[tuple], expandable_segments: bool = False,
           capacity: int | None = None) -> dict:
    """Run a trace through a fresh `CachingAllocator` and report its bytes.

    events: ("alloc", key, nbytes) and ("free", key) tuples in program order. Returns
    {"max_allocated", "max_reserved", "allocated", "reserved": bytes, "segments": the sizes of
    the segments held at the end (`CachingAllocator.segments`), "rules": the constants and
    settings the replay used, with the source file they come from}.
    """
    alloc = CachingAllocator(expandable_segments=expandable_segments, capacity=capacity)
    for event in events:
        event = tuple(event)
        if len(event) == 3 and event[0] == "alloc":
            alloc.malloc(event[1], event[2])
        elif len(event) == 2 and event[0] == "free":
            alloc.free(event[1])
        else:
            raise ValueError(f"event {event!r}: expected ('alloc', key, nbytes) or ('free', key)")
    return {
        "max_allocated": alloc.max_allocated,
        "max_reserved": alloc.max_reserved,
        "allocated": alloc.allocated,
        "reserved": alloc.reserved,
        "segments": alloc.segments(),
        "rules": {
            "source": SOURCE, "expandable_segments": alloc.expandable_segments,
            "capacity": capacity, "kMinBlockSize": MIN_BLOCK, "kSmallSize": SMALL_SIZE,
            "kSmallBuffer": SMALL_BUFFER, "kLargeBuffer": LARGE_BUFFER,
            "kMinLargeAlloc": MIN_LARGE_ALLOC, "kRoundLarge": ROUND_LARGE,
        },
    }
