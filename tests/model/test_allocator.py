"""The caching-allocator emulation follows CUDACachingAllocator.cpp's rules, one rule per test."""

from __future__ import annotations

import pytest

from vramplan.model.allocator import CachingAllocator, round_size, segment_size

MiB = 2**20


def test_requests_round_up_to_512_bytes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    a = CachingAllocator()
    a.malloc(1000)
    assert a.allocated == 1024


@pytest.mark.parametrize("request_bytes,segment", [
    (4096, 2 * MiB),  # small pool: 2 MiB segments
    (MiB, 2 * MiB),  # 1 MiB is still small
    (MiB + 512, 20 * MiB),  # 1-10 MiB: 20 MiB segments
    (10 * MiB - 512, 20 * MiB),
    (10 * MiB, 10 * MiB),  # from 10 MiB: the request rounded to 2 MiB
    (11 * MiB, 12 * MiB),
])
def test_segment_sizes(request_bytes, segment):
    assert segment_size(round_size(request_bytes)) == segment
    a = CachingAllocator()
    a.malloc(request_bytes)
    assert a.reserved == segment


def test_small_and_large_pools_never_share_a_segment():
    a = CachingAllocator()
    a.malloc(4096)  # small segment of 2 MiB with ~2 MiB free
    a.malloc(MiB + 512)  # does not fit in the small segment's rest: its own 20 MiB segment
    assert a.reserved == 22 * MiB


def test_best_fit_takes_the_smallest_free_block_that_fits():
    a = CachingAllocator()
    big, mid = a.malloc(100 * MiB), a.malloc(40 * MiB)
    a.free(big)
    a.free(mid)
    b = a.malloc(30 * MiB)  # fits both; the 40 MiB block is the best fit
    assert b.size == 30 * MiB and a.reserved == 140 * MiB
    assert b.addr == mid.addr


def test_large_blocks_split_only_when_more_than_1_mib_is_left():
    a = CachingAllocator()
    blk = a.malloc(20 * MiB)
    a.free(blk)
    b = a.malloc(19 * MiB + 512 * 1024)  # 0.5 MiB would be left: not split, whole block used
    assert b.size == 20 * MiB and a.allocated == 20 * MiB
    a.free(b)
    c = a.malloc(18 * MiB)  # 2 MiB left: split
    assert c.size == 18 * MiB and a.allocated == 18 * MiB


def test_freed_neighbours_merge_within_a_segment_only():
    a = CachingAllocator()
    x, y = a.malloc(30 * MiB), a.malloc(30 * MiB)  # two segments
    a.free(x)
    a.free(y)
    # 60 MiB free, but in two 30 MiB segments: a 50 MiB request needs a new segment
    a.malloc(50 * MiB)
    assert a.reserved == 110 * MiB
    b = CachingAllocator()
    whole = b.malloc(60 * MiB)
    b.free(whole)
    p, q = b.malloc(30 * MiB), b.malloc(30 * MiB)  # both carved from the one segment
    b.free(p)
    b.free(q)
    b.malloc(50 * MiB)  # the halves merged back: no new segment
    assert b.reserved == 60 * MiB


def test_a_live_block_pins_its_segment_so_a_bigger_request_needs_a_new_one():
    a = CachingAllocator()
    seg = a.malloc(100 * MiB)
    a.free(seg)
    a.malloc(10 * MiB)  # carved from the 100 MiB segment, leaves 90 MiB free in it
    a.malloc(95 * MiB)  # its own segment, 95 MiB rounded up to 2 MiB
    assert a.reserved == (100 + 96) * MiB


def test_reserved_never_shrinks_without_empty_cache():
    a = CachingAllocator()
    blk = a.malloc(64 * MiB)
    a.free(blk)
    assert a.reserved == 64 * MiB and a.allocated == 0
    a.empty_cache()
    assert a.reserved == 0


def test_empty_cache_keeps_segments_with_a_live_block():
    a = CachingAllocator()
    keep, gone = a.malloc(64 * MiB), a.malloc(32 * MiB)
    a.free(gone)
    a.empty_cache()
    assert a.reserved == 64 * MiB and keep.allocated


def test_transient_equals_malloc_then_free():
    one, two = CachingAllocator(), CachingAllocator()
    for alloc in (one, two):
        alloc.free(alloc.malloc(50 * MiB))
        alloc.malloc(7 * MiB)
    one.transient(30 * MiB)
    two.free(two.malloc(30 * MiB))
    one.transient(80 * MiB)
    two.free(two.malloc(80 * MiB))
    assert (one.reserved, one.allocated, one.peak_allocated) == \
        (two.reserved, two.allocated, two.peak_allocated)
    assert sorted(one.pools[False].keys) == sorted(two.pools[False].keys)


def test_expandable_segments_merge_across_what_would_be_separate_segments():
    plain, exp = CachingAllocator(), CachingAllocator(expandable_segments=True)
    for a in (plain, exp):
        x, y = a.malloc(30 * MiB), a.malloc(30 * MiB)
        a.free(x)
        a.free(y)
        a.malloc(50 * MiB)
    assert plain.reserved == 110 * MiB
    assert exp.reserved == 60 * MiB  # one growing range: the two 30 MiB pages runs merged


def test_expandable_segments_grow_in_20_mib_pages_for_the_large_pool():
    a = CachingAllocator(expandable_segments=True)
    a.malloc(30 * MiB)
    assert a.reserved == 40 * MiB
    a.malloc(5 * MiB)  # fits in the 10 MiB left of the last page
    assert a.reserved == 40 * MiB
