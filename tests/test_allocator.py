"""The caching-allocator model: hand-worked cases of each rule, bad input, and invariants."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minift.memory.allocator import CachingAllocator, replay, round_size, segment_size

KiB, MiB = 2**10, 2**20


def _alloc(*sizes, expandable=False, capacity=None):
    a = CachingAllocator(expandable_segments=expandable, capacity=capacity)
    for i, size in enumerate(sizes):
        a.malloc(i, size)
    return a


# ---- sizes ----------------------------------------------------------------------------------
def test_rounding_and_segment_sizes():
    assert [round_size(n) for n in (1, 511, 512, 513, 1000)] == [512, 512, 512, 1024, 1024]
    assert segment_size(512) == segment_size(MiB) == 2 * MiB  # small pool: 2 MiB segments
    assert segment_size(MiB + 512) == segment_size(10 * MiB - 512) == 20 * MiB
    assert segment_size(10 * MiB) == 10 * MiB
    assert segment_size(11 * MiB + 512) == 12 * MiB  # rounded up to 2 MiB


def test_one_byte_takes_a_512_byte_block_in_a_2_mib_segment():
    out = replay([("alloc", "x", 1)])
    assert (out["allocated"], out["reserved"], out["segments"]) == (512, 2 * MiB, [2 * MiB])


def test_small_requests_share_a_segment_until_it_is_full():
    a = _alloc(*[256 * KiB] * 8)
    assert (a.allocated, a.reserved) == (2 * MiB, 2 * MiB)
    a.malloc("one more", 1)
    assert a.segments() == [2 * MiB, 2 * MiB]


def test_a_zero_byte_tensor_takes_no_block():
    a = _alloc(0)
    assert (a.allocated, a.reserved) == (0, 0)
    a.free(0)


@pytest.mark.parametrize("nbytes,segment,block", [
    (5 * MiB, 20 * MiB, 5 * MiB), (MiB + 1, 20 * MiB, MiB + 512), (12 * MiB, 12 * MiB, 12 * MiB),
    (11 * MiB + 1, 12 * MiB, 12 * MiB),  # the 1 MiB - 512 remainder is too small to split off
])
def test_large_segment_sizes(nbytes, segment, block):
    out = replay([("alloc", "x", nbytes)])
    assert out["segments"] == [segment] and out["reserved"] == segment
    assert out["allocated"] == block


def test_a_large_block_keeps_a_remainder_of_1_mib_or_less():
    # 19.5 MiB in a 20 MiB segment: a 0.5 MiB remainder is not split off (should_split)
    a = _alloc(19 * MiB + 512 * KiB)
    assert (a.allocated, a.reserved) == (20 * MiB, 20 * MiB)
    a = _alloc(8 * MiB, 8 * MiB, 3 * MiB + 512 * KiB)  # the last 4 MiB block is taken whole
    assert (a.allocated, a.reserved) == (20 * MiB, 20 * MiB)


# ---- reuse, splitting, coalescing -----------------------------------------------------------
def test_split_and_reuse_a_cached_segment():
    a = _alloc(5 * MiB)
    a.free(0)
    assert (a.allocated, a.reserved) == (0, 20 * MiB)  # freed but cached
    a.malloc("p", 8 * MiB)
    a.malloc("q", 8 * MiB)
    assert (a.allocated, a.reserved, a.segments()) == (16 * MiB, 20 * MiB, [20 * MiB])


def test_best_fit_takes_the_smallest_block_that_fits():
    a = _alloc(12 * MiB, 16 * MiB, 14 * MiB)  # three exact segments
    a.free(0), a.free(1), a.free(2)
    a.malloc("x", 13 * MiB)  # fits 14 and 16: takes the 14 MiB block, whole (1 MiB remainder)
    assert a.allocated == 14 * MiB and a.reserved == 42 * MiB
    a.malloc("y", 15 * MiB)
    assert a.allocated == 30 * MiB and a.reserved == 42 * MiB


def test_adjacent_freed_blocks_coalesce_for_a_bigger_request():
    a = _alloc(6 * MiB, 6 * MiB, 7 * MiB)  # 6 + 6 + 8 (7 MiB and the 1 MiB tail) = 20 MiB
    assert (a.allocated, a.reserved) == (20 * MiB, 20 * MiB)
    a.free(0)
    a.free(1)  # merges with the free block before it: 12 MiB
    a.malloc("big", 11 * MiB)
    assert (a.allocated, a.reserved, a.segments()) == (20 * MiB, 20 * MiB, [20 * MiB])


def test_fragmented_free_space_forces_a_new_segment():
    a = _alloc(6 * MiB, 6 * MiB, 7 * MiB)
    a.free(0)
    a.free(2)  # 6 MiB and 8 MiB free, not adjacent
    a.malloc("x", 9 * MiB)
    assert a.segments() == [20 * MiB, 20 * MiB] and a.max_reserved == 40 * MiB
    assert a.allocated == 6 * MiB + 9 * MiB


def test_pools_do_not_share_blocks():
    a = _alloc(5 * MiB)
    a.free(0)
    a.malloc("small", 4 * KiB)  # the cached 20 MiB block is in the large pool
    assert a.segments() == [20 * MiB, 2 * MiB]


def test_empty_cache_frees_unsplit_segments_only():
    a = _alloc(5 * MiB, 16 * MiB, 1)  # 16 MiB does not fit the 15 MiB left: its own segment
    assert a.segments() == [20 * MiB, 16 * MiB, 2 * MiB]
    a.free(1)
    a.free(2)
    a.empty_cache()
    assert a.segments() == [20 * MiB] and a.reserved == 20 * MiB  # the 5 MiB block holds it
    assert a.max_reserved == 38 * MiB


# ---- expandable segments ------------------------------------------------------------------------
def test_expandable_segment_grows_by_just_enough_pages():
    a = _alloc(5 * MiB, expandable=True)
    assert a.segments() == [20 * MiB]
    a.malloc("y", 30 * MiB)  # 15 MiB free at the end plus one more 20 MiB page
    assert (a.reserved, a.segments()) == (40 * MiB, [40 * MiB])
    assert _alloc(5 * MiB, 30 * MiB).reserved == 50 * MiB  # without: a second segment
    # but a lone large tensor takes whole 20 MiB pages where cudaMalloc would round to 2 MiB
    assert _alloc(22 * MiB, expandable=True).reserved == 40 * MiB
    assert _alloc(22 * MiB).reserved == 22 * MiB


def test_expandable_pages_stay_mapped_until_empty_cache():
    a = _alloc(5 * MiB, 30 * MiB, 1, expandable=True)
    assert a.segments() == [40 * MiB, 2 * MiB]  # the small pool: 2 MiB pages, its own segment
    for key in range(3):
        a.free(key)
    assert (a.allocated, a.reserved) == (0, 42 * MiB)
    a.empty_cache()
    assert (a.reserved, a.segments(), a.max_reserved) == (0, [], 42 * MiB)


def test_empty_cache_unmaps_whole_free_pages_around_live_blocks():
    a = _alloc(30 * MiB, 5 * MiB, expandable=True)  # 35 MiB live in two 20 MiB pages
    a.free(0)  # [0, 30 MiB) free: page 0 wholly, page 1 up to the 5 MiB block
    a.empty_cache()
    assert a.segments() == [20 * MiB] and a.allocated == 5 * MiB
    a.malloc("z", 25 * MiB)  # refills the hole at the start before growing past the end
    assert a.segments() == [40 * MiB] and a.reserved == 40 * MiB


def test_expandable_splits_small_remainders():
    a = _alloc(19 * MiB + 512 * KiB, expandable=True)  # any remainder >= 512 bytes is split off
    assert (a.allocated, a.reserved) == (19 * MiB + 512 * KiB, 20 * MiB)


def test_expandable_reserves_no_more_on_a_fragmenting_sequence():
    # a growing batch: each step's tensor is a little larger than the one cached before it,
    # next to a weight that stays alive
    events = [("alloc", "weight", 4 * MiB)]
    for step, size in enumerate((22, 24, 26, 28)):
        events += [("alloc", step, size * MiB), ("free", step)]
    plain, grown = replay(events), replay(events, expandable_segments=True)
    assert plain["segments"] == [20 * MiB, 22 * MiB, 24 * MiB, 26 * MiB, 28 * MiB]
    assert plain["max_reserved"] == 120 * MiB
    # one segment: the 16 MiB after the weight and one more page hold every step
    assert grown["segments"] == [40 * MiB] and grown["max_reserved"] == 40 * MiB
    assert plain["max_allocated"] == grown["max_allocated"] == 32 * MiB
    assert grown["rules"]["expandable_segments"] and not plain["rules"]["expandable_segments"]


# ---- capacity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("expandable", [False, True])
def test_capacity_frees_the_cache_then_raises(expandable):
    a = _alloc(12 * MiB, capacity=60 * MiB, expandable=expandable)
    a.free(0)  # 12 MiB cached (a 20 MiB page with expandable segments)
    a.malloc("big", 50 * MiB)  # a 50 MiB segment once the 12 MiB one is released; or 2 more pages
    assert a.allocated == 50 * MiB and a.reserved <= 60 * MiB
    with pytest.raises(MemoryError, match=r"'more'.*12582912 bytes"):
        a.malloc("more", 12 * MiB)
    assert a.allocated == 50 * MiB
    with pytest.raises(ValueError, match="'more'"):
        a.free("more")  # the failed request left nothing behind


def test_capacity_keeps_split_segments():
    a = _alloc(5 * MiB, 5 * MiB, capacity=30 * MiB)
    a.free(0)  # its segment is split by the live key 1: it cannot be released
    with pytest.raises(MemoryError, match="16777216 bytes"):
        a.malloc("x", 16 * MiB)
    assert a.reserved == 20 * MiB


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_input_names_the_key():
    a = _alloc(100)
    with pytest.raises(ValueError, match="'ghost'"):
        a.free("ghost")
    with pytest.raises(ValueError, match=r"\('w', 3\)"):
        a.malloc(("w", 3), -1)
    with pytest.raises(ValueError, match="'x'"):
        a.malloc("x", 1.5)
    with pytest.raises(ValueError, match="0.*already allocated"):
        a.malloc(0, 10)
    a.free(0)
    with pytest.raises(ValueError, match="0.*not allocated"):
        a.free(0)
    with pytest.raises(ValueError, match="event"):
        replay([("alloc", "x")])
    with pytest.raises(ValueError, match="capacity"):
        CachingAllocator(capacity=-1)


# ---- invariants -------------------------------------------------------------------------------
def _check_blocks(a):
    """The segments' blocks tile their address ranges, and no two free mapped blocks touch."""
    blocks = [b for b in a._live.values() if b is not None]
    for pool in a._pools.values():
        blocks += list(pool.free.values()) + list(pool.unmapped.values())
    assert sum(b.size for b in blocks if b.allocated) == a.allocated
    for b in blocks:
        if b.next is not None:
            assert b.next.prev is b and b.next.addr == b.addr + b.size
            assert b.allocated or b.next.allocated or b.mapped != b.next.mapped


_SIZES = st.one_of(st.integers(0, 2 * MiB), st.integers(MiB, 64 * MiB))
_OPS = st.lists(st.tuples(st.sampled_from("aaaffe"), _SIZES, st.integers(0, 10**6)), max_size=60)


@settings(max_examples=50, deadline=None)
@given(ops=_OPS, expandable=st.booleans(),
       capacity=st.one_of(st.none(), st.integers(0, 160).map(lambda m: m * MiB)))
def test_invariants(ops, expandable, capacity):
    a = CachingAllocator(expandable_segments=expandable, capacity=capacity)
    live, peaks = [], (0, 0)
    for n, (op, size, pick) in enumerate(ops):
        if op == "e":
            a.empty_cache()
        elif op == "a" or not live:
            try:
                a.malloc(n, size)
                live.append(n)
            except MemoryError:
                assert capacity is not None
        else:
            a.free(live.pop(pick % len(live)))
        assert a.allocated <= a.reserved == sum(a.segments())
        assert capacity is None or a.reserved <= capacity
        assert a.max_allocated >= max(peaks[0], a.allocated)
        assert a.max_reserved >= max(peaks[1], a.reserved)
        peaks = (a.max_allocated, a.max_reserved)
        _check_blocks(a)
    for key in live:
        a.free(key)
    assert a.allocated == 0 and a.reserved == sum(a.segments())
    a.empty_cache()
    assert a.reserved == 0 and a.segments() == []
