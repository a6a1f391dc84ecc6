"""An emulation of PyTorch's CUDA caching allocator, for replaying a step's allocate/free sequence.

The rules are those of ``c10/cuda/CUDACachingAllocator.cpp`` with default settings (torch 2.x),
summarised in PHYSICS-REFERENCE §6.3:

- a request rounds up to 512 B (``round_size``); requests ≤ 1 MiB (``kSmallSize``) use the small
  pool, larger ones the large pool;
- a request first takes the best-fitting free block of its pool: the smallest size ≥ request, then
  the lowest address (``get_free_block``, a ``lower_bound`` on (size, ptr));
- a block is split when the remainder is ≥ 512 B (small pool) or > 1 MiB (large pool)
  (``should_split``); unsplit, the whole block counts as allocated;
- with no fitting block a new segment is created (``alloc_block``, one ``cudaMalloc``): 2 MiB
  (``kSmallBuffer``) for small requests, 20 MiB (``kLargeBuffer``) under 10 MiB
  (``kMinLargeAlloc``), else the request rounded up to 2 MiB (``kRoundLarge``);
- a freed block merges only with free neighbours of its own segment (``free_block``);
- segments are never given back (no ``empty_cache`` in a training step), so reserved only grows.

``expandable_segments=True`` (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``) keeps one
segment per pool that grows by mapping pages at its end (2 MiB small, 20 MiB large): neighbouring
free blocks always merge, and a request that does not fit extends the segment's free tail.

Reserved is the sum of segment sizes; allocated the sum of allocated block sizes, as
``torch.cuda.memory_reserved`` / ``memory_allocated`` count them.
"""

from __future__ import annotations

from bisect import bisect_left, insort

K_MIN_BLOCK = 512
K_SMALL_SIZE = 1 << 20
K_SMALL_BUFFER = 2 << 20
K_LARGE_BUFFER = 20 << 20
K_MIN_LARGE_ALLOC = 10 << 20
K_ROUND_LARGE = 2 << 20


def round_size(n: int) -> int:
    """``round_size``: at least 512 B, a multiple of 512 B."""
    return K_MIN_BLOCK if n < K_MIN_BLOCK else -(-n // K_MIN_BLOCK) * K_MIN_BLOCK


def segment_size(n: int) -> int:
    """``get_allocation_size``: the cudaMalloc made for a request with no cached block."""
    if n <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if n < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return -(-n // K_ROUND_LARGE) * K_ROUND_LARGE


def should_split(small: bool, remaining: int) -> bool:
    """``should_split``: small pool ≥ 512 B left over, large pool > 1 MiB left over."""
    return remaining >= K_MIN_BLOCK if small else remaining > K_SMALL_SIZE


class Block:
    """A contiguous piece of one segment, allocated or free."""

    __slots__ = ("addr", "size", "small", "allocated", "prev", "next")

    def __init__(self, addr: int, size: int, small: bool, prev: "Block | None" = None,
                 nxt: "Block | None" = None) -> None:
        self.addr, self.size, self.small, self.allocated = addr, size, small, False
        self.prev, self.next = prev, nxt


#: A free block's sort key is one int, ``size << ADDR_BITS | addr``: ordered as the allocator's
#: (size, ptr) pairs, and cheaper to bisect than tuples (addresses stay below 2**56 here: segments
#: are laid out from 0, and an expandable pool's range starts at 2**50).
ADDR_BITS = 56
ADDR_MASK = (1 << ADDR_BITS) - 1


class Pool:
    """Free blocks of one pool, sorted by (size, address) as the allocator's ``BlockPool``."""

    __slots__ = ("keys", "blocks")

    def __init__(self) -> None:
        self.keys: list[int] = []  # size << ADDR_BITS | addr, sorted
        self.blocks: dict[int, Block] = {}  # addr -> free block

    def add(self, b: Block) -> None:
        insort(self.keys, b.size << ADDR_BITS | b.addr)
        self.blocks[b.addr] = b

    def remove(self, b: Block) -> None:
        del self.keys[bisect_left(self.keys, b.size << ADDR_BITS | b.addr)]
        del self.blocks[b.addr]


class CachingAllocator:
    """Replays malloc/free and tracks allocated, reserved, their peaks and segment births."""

    def __init__(self, expandable_segments: bool = False) -> None:
        self.expandable = expandable_segments
        self.pools = {True: Pool(), False: Pool()}
        self.next_addr = 0
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.largest = 0  # the largest block handed out
        self.phase = ""  # what the replay is doing, recorded with each new segment
        self.segments: list[tuple[int, object]] = []  # (bytes, the request's tag) per cudaMalloc
        self.tails: dict[bool, Block] = {}  # expandable: the last block of each pool's segment

    def malloc(self, nbytes: int, tag: object = "") -> Block:
        """Allocate ``nbytes`` (a tensor's storage); returns the block to pass to :meth:`free`."""
        n = round_size(nbytes)
        small = n <= K_SMALL_SIZE
        pool = self.pools[small]
        keys = pool.keys
        i = bisect_left(keys, n << ADDR_BITS)  # best fit: smallest size >= n, then lowest address
        if i < len(keys):
            b = pool.blocks.pop(keys.pop(i) & ADDR_MASK)
        else:
            b = self._grow(n, small, tag)
        rest = b.size - n
        if should_split(small, rest):
            nxt = b.next
            tail = Block(b.addr + n, rest, small, b, nxt)
            if nxt is not None:
                nxt.prev = tail
            b.next, b.size = tail, n
            if self.expandable and self.tails.get(small) is b:
                self.tails[small] = tail
            insort(keys, rest << ADDR_BITS | tail.addr)
            pool.blocks[tail.addr] = tail
        b.allocated = True
        size = b.size
        if size > self.largest:
            self.largest = size
        self.allocated += size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return b

    def transient(self, nbytes: int, tag: object = "") -> None:
        """Allocate and at once free ``nbytes`` (a temporary consumed by the next op): what
        :meth:`transient_group` does for a group of one, without its overlay. Freeing the piece
        restores the free block it was cut from; only a new segment stays."""
        if nbytes <= 0:
            return
        n = round_size(nbytes)
        small = n <= K_SMALL_SIZE
        keys = self.pools[small].keys
        i = bisect_left(keys, n << ADDR_BITS)
        if i < len(keys):
            size = keys[i] >> ADDR_BITS
        else:
            b = self._grow(n, small, tag)
            self.pools[small].add(b)
            size = b.size
        used = n if should_split(small, size - n) else size
        if used > self.largest:
            self.largest = used
        if self.allocated + used > self.peak_allocated:
            self.peak_allocated = self.allocated + used

    def transient_group(self, sizes: tuple[int, ...], tag: object = "") -> None:
        """Allocate ``sizes`` one after the other, then free them all: exactly that sequence of
        :meth:`malloc` and :meth:`free`, replayed without touching the block structure. Free blocks
        are always maximal runs of their segment, so freeing every piece restores each run; only
        the new segments (when no cached block fits) stay. The pieces are placed on an overlay of
        the free lists: blocks taken, remainders left. Empty pieces take no block."""
        taken: set[int] = set()
        left: dict[bool, list[int]] = {True: [], False: []}
        used_total = 0
        for nbytes in sizes:
            if nbytes <= 0:  # an empty tensor takes no block
                continue
            n = round_size(nbytes)
            small = n <= K_SMALL_SIZE
            keys, extra = self.pools[small].keys, left[small]
            want = n << ADDR_BITS
            i = bisect_left(keys, want)
            while i < len(keys) and keys[i] in taken:
                i += 1
            j = bisect_left(extra, want)
            a = keys[i] if i < len(keys) else None
            b = extra[j] if j < len(extra) else None
            pick = b if a is None else a if b is None or a < b else b
            if pick is None:
                blk = self._grow(n, small, tag)  # a whole free segment (or the grown free tail)
                self.pools[small].add(blk)
                pick = blk.size << ADDR_BITS | blk.addr
                keys = self.pools[small].keys
            if j < len(extra) and extra[j] == pick:
                del extra[j]
            else:
                taken.add(pick)
            size, addr = pick >> ADDR_BITS, pick & ADDR_MASK
            rest = size - n
            if should_split(small, rest):
                insort(extra, rest << ADDR_BITS | (addr + n))
                used = n
            else:
                used = size
            if used > self.largest:
                self.largest = used
            used_total += used
            if self.allocated + used_total > self.peak_allocated:
                self.peak_allocated = self.allocated + used_total

    def free(self, b: Block) -> None:
        """Return a block to its pool, merging with free neighbours of the same segment."""
        b.allocated = False
        self.allocated -= b.size
        pool = self.pools[b.small]
        p = b.prev
        if p is not None and not p.allocated:
            pool.remove(p)
            b.addr, b.size, b.prev = p.addr, p.size + b.size, p.prev
            if p.prev is not None:
                p.prev.next = b
        nx = b.next
        if nx is not None and not nx.allocated:
            pool.remove(nx)
            b.size, b.next = b.size + nx.size, nx.next
            if nx.next is not None:
                nx.next.prev = b
            if self.expandable and self.tails.get(b.small) is nx:
                self.tails[b.small] = b
        pool.add(b)

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``: give back every segment with nothing allocated in it."""
        for small, pool in self.pools.items():
            whole = [b for b in pool.blocks.values() if b.prev is None and b.next is None]
            for b in whole:
                pool.remove(b)
                self.reserved -= b.size
                if self.tails.get(small) is b:
                    del self.tails[small]

    def reset_peaks(self) -> None:
        """``torch.cuda.reset_peak_memory_stats()``: peaks restart from the current levels."""
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def _grow(self, n: int, small: bool, tag: object) -> Block:
        """No cached block fits: a new segment, or (expandable) more pages at the segment's end."""
        if not self.expandable:
            size = segment_size(n)
            b = Block(self.next_addr, size, small)
            self.next_addr += size + K_ROUND_LARGE  # segments are never adjacent
            self._reserve(size, tag)
            return b
        page = K_SMALL_BUFFER if small else K_LARGE_BUFFER
        tail = self.tails.get(small)
        free_tail = tail.size if tail is not None and not tail.allocated else 0
        grow = -(-(n - free_tail) // page) * page
        self._reserve(grow, tag)
        if free_tail:
            self.pools[small].remove(tail)
            tail.size += grow
            return tail
        b = Block(self.next_addr if tail is None else tail.addr + tail.size, grow, small, tail)
        if tail is None:
            self.next_addr += 1 << 50  # each pool's virtual range is its own
        else:
            tail.next = b
        self.tails[small] = b
        return b

    def _reserve(self, size: int, tag: object) -> None:
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.segments.append((size, (self.phase, tag)))
