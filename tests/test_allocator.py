"""The caching-allocator replay (peftplan/engine/allocator.py) on hand-built timelines.

Each expected number follows from a rule of c10/cuda/CUDACachingAllocator.cpp (torch 2.13), named in
the test: round_size, get_pool, get_allocation_size, get_free_block, should_split /
alloc_found_block, free_block / try_merge_blocks, alloc_block + release_cached_blocks,
garbage_collect_cached_blocks, and the expandable-segment path (try_allocate_expandable_block).
"""

import pytest

from peftplan.engine.alloc_conf import AllocConf, AllocConfError, allocation_size, parse_alloc_conf, round_size
from peftplan.engine.allocator import AllocatorReplay, replay

MiB = 2**20
DEFAULT = AllocConf()


def timeline(*steps):
    """('a', name, bytes) allocates, ('f', name) frees: the replay's integer events."""
    events, handle = [], {}
    for step in steps:
        if step[0] == "a":
            handle[step[1]] = len(events)
            events.append(step[2])
        else:
            events.append(~handle.pop(step[1]))
    return events


def test_round_size_512_and_power2_divisions():
    # round_size: below kMinBlockSize -> 512; else a multiple of 512
    assert [round_size(n, DEFAULT) for n in (1, 512, 513, 4096)] == [512, 512, 1024, 4096]
    # roundup_power2_next_division: 1.2 MiB with 4 divisions of [1 MiB, 2 MiB) -> 1.25 MiB
    conf = parse_alloc_conf("roundup_power2_divisions:4")
    assert round_size(1258291, conf) == 1310720
    assert round_size(2 * MiB, conf) == 2 * MiB  # a power of 2 stays
    assert round_size(1536, conf) == 1536  # not above kMinBlockSize x divisions: plain 512 rounding
    listed = parse_alloc_conf("roundup_power2_divisions:[2:8,>:2]")
    assert listed.divisions_for(1 * MiB) == 8 and listed.divisions_for(2 * MiB) == 8
    assert listed.divisions_for(3 * MiB) == 8 and listed.divisions_for(64 * MiB) == 2


def test_allocation_size_per_pool():
    # get_allocation_size: small -> kSmallBuffer, < kMinLargeAlloc -> 20 MiB, else 2 MiB multiples
    assert allocation_size(1 * MiB, DEFAULT) == 2 * MiB
    assert allocation_size(1 * MiB + 512, DEFAULT) == 20 * MiB
    assert allocation_size(10 * MiB - 512, DEFAULT) == 20 * MiB
    assert allocation_size(10 * MiB, DEFAULT) == 10 * MiB
    assert allocation_size(10 * MiB + 1, DEFAULT) == 12 * MiB


def test_small_pool_packs_4096_blocks_of_512_in_one_segment():
    # get_pool (<= kSmallSize), should_split (small pool: remainder >= kMinBlockSize)
    r = replay([512] * 4096)
    assert (r.peak_reserved_bytes, r.segments_at_peak) == (2 * MiB, 1)
    r = replay([512] * 4097)
    assert (r.peak_reserved_bytes, r.segments_at_peak) == (4 * MiB, 2)
    r = replay([1 * MiB, 1 * MiB + 512])  # the second one is large: its own 20 MiB segment
    assert (r.peak_reserved_bytes, r.small_pool_reserved_bytes, r.large_pool_reserved_bytes) == \
        (22 * MiB, 2 * MiB, 20 * MiB)


def test_large_block_with_at_most_1mib_spare_is_handed_out_whole():
    # should_split (large pool): split only if remainder > kSmallSize; allocated counts block->size
    r = replay([15 * MiB])  # segment 16 MiB, 1 MiB spare: not split
    assert (r.peak_reserved_bytes, r.peak_allocated_bytes, r.peak_requested_bytes) == (16 * MiB, 16 * MiB, 15 * MiB)
    assert r.unsplit_slack_bytes == 1 * MiB
    r = replay([12 * MiB + MiB // 2])  # segment 14 MiB, 1.5 MiB spare: split
    assert (r.peak_reserved_bytes, r.peak_allocated_bytes) == (14 * MiB, 12 * MiB + MiB // 2)
    # 1-10 MiB requests share a 20 MiB segment
    r = replay([4 * MiB] * 5)
    assert (r.peak_reserved_bytes, r.segments_at_peak) == (20 * MiB, 1)
    r = replay([4 * MiB] * 6)
    assert (r.peak_reserved_bytes, r.segments_at_peak) == (40 * MiB, 2)


def test_best_fit_takes_the_smallest_cached_block():
    # get_free_block: lower_bound on (size, ptr) = the smallest cached block that fits
    ev = timeline(("a", "A", 30 * MiB), ("a", "B", 50 * MiB), ("f", "A"), ("f", "B"),
                  ("a", "C", 25 * MiB), ("a", "D", 45 * MiB))
    r = replay(ev)
    assert (r.peak_reserved_bytes, r.segments_at_peak) == (80 * MiB, 2)  # first-fit would need a 3rd segment


def test_blocks_of_different_segments_never_merge():
    # free_block / try_merge_blocks merge prev/next of the same segment only
    ev = timeline(("a", "A", 12 * MiB), ("a", "B", 12 * MiB), ("f", "A"), ("f", "B"), ("a", "C", 20 * MiB))
    r = replay(ev)
    assert (r.peak_reserved_bytes, r.segments_at_peak) == (44 * MiB, 3)
    # inside one segment they do: three 4 MiB blocks freed merge back into the 20 MiB block
    ev = timeline(("a", "A", 4 * MiB), ("a", "B", 4 * MiB), ("a", "C", 4 * MiB), ("f", "B"), ("f", "A"),
                  ("f", "C"), ("a", "D", 18 * MiB))
    r = replay(ev)
    assert (r.peak_reserved_bytes, r.segments_at_peak) == (20 * MiB, 1)


def test_freed_blocks_are_cached_and_reused():
    ev = timeline(("a", "A", 12 * MiB), ("f", "A"), ("a", "B", 11 * MiB))
    r = replay(ev)  # 11 MiB takes the cached 12 MiB block whole (1 MiB spare: not split)
    assert (r.peak_reserved_bytes, r.final_reserved_bytes, r.peak_allocated_bytes) == (12 * MiB, 12 * MiB, 12 * MiB)
    r = replay(timeline(("a", "A", 12 * MiB), ("f", "A")))
    assert r.final_reserved_bytes == 12 * MiB  # freeing never returns a segment to the driver


def test_max_split_size_oversize_blocks():
    # get_free_block: below max_split_size never takes an oversize block; at or above it, only one
    # smaller than request + max_non_split_rounding (20 MiB)
    conf = parse_alloc_conf("max_split_size_mb:128")
    base = [("a", "A", 200 * MiB), ("f", "A")]
    assert replay(timeline(*base, ("a", "B", 50 * MiB)), conf).peak_reserved_bytes == 250 * MiB
    assert replay(timeline(*base, ("a", "B", 190 * MiB)), conf).peak_reserved_bytes == 200 * MiB
    assert replay(timeline(*base, ("a", "B", 170 * MiB)), conf).peak_reserved_bytes == 370 * MiB
    # without it the 50 MiB request splits the cached 200 MiB block
    assert replay(timeline(*base, ("a", "B", 50 * MiB))).peak_reserved_bytes == 200 * MiB


def test_expandable_segments_grow_by_pages():
    # try_allocate_expandable_block / map_block: 20 MiB pages (large pool), splitting always
    conf = parse_alloc_conf("expandable_segments:True")
    r = replay([12 * MiB] * 3, conf)  # 12 -> map 20; 12 -> tail 8 + one page; 12 -> from the 16 MiB tail
    assert (r.peak_reserved_bytes, r.segments_at_peak, r.peak_allocated_bytes) == (40 * MiB, 1, 36 * MiB)
    # the default allocator needs three 12 MiB segments for the same
    assert replay([12 * MiB] * 3).peak_reserved_bytes == 36 * MiB
    # expandable: 1-10 MiB requests no longer waste the rest of a 20 MiB segment each, across pools too
    r = replay([1 * MiB + 512, 512], conf)
    assert (r.large_pool_reserved_bytes, r.small_pool_reserved_bytes) == (20 * MiB, 2 * MiB)


def test_cache_flush_and_retry_under_a_limit():
    # malloc: alloc_block fails -> release_cached_blocks -> retry; OOM only if that fails too
    ev = timeline(("a", "A", 30 * MiB), ("f", "A"), ("a", "B", 35 * MiB))
    assert replay(ev).peak_reserved_bytes == 66 * MiB
    r = replay(ev, limit_bytes=40 * MiB)
    assert (r.alloc_retries, r.out_of_memory, r.final_reserved_bytes) == (1, False, 36 * MiB)
    r = replay(timeline(("a", "A", 30 * MiB), ("a", "B", 35 * MiB)), limit_bytes=40 * MiB)
    assert r.out_of_memory
    # a cached block that is split (part of it alive) cannot be released
    ev = timeline(("a", "A", 4 * MiB), ("a", "B", 4 * MiB), ("f", "A"), ("a", "C", 30 * MiB))
    assert replay(ev, limit_bytes=40 * MiB).out_of_memory


def test_garbage_collection_needs_a_memory_fraction():
    # garbage_collect_cached_blocks runs only with set_fraction (per_process_memory_fraction)
    ev = timeline(("a", "A", 40 * MiB), ("f", "A"), ("a", "B", 60 * MiB), ("f", "B"), ("a", "C", 70 * MiB))
    inert = replay(ev, parse_alloc_conf("garbage_collection_threshold:0.5"), limit_bytes=200 * MiB)
    assert (inert.peak_reserved_bytes, inert.alloc_retries) == (170 * MiB, 0)
    gc = replay(ev, parse_alloc_conf("per_process_memory_fraction:0.5,garbage_collection_threshold:0.5"),
                limit_bytes=200 * MiB)  # allowed 100 MiB; gc at 50 MiB frees the aged cached blocks
    assert gc.reserved_limit_bytes == 100 * MiB
    assert (gc.final_reserved_bytes, gc.alloc_retries, gc.out_of_memory) == (70 * MiB, 0, False)
    flush = replay(ev, parse_alloc_conf("per_process_memory_fraction:0.5"), limit_bytes=200 * MiB)
    assert (flush.final_reserved_bytes, flush.alloc_retries) == (70 * MiB, 1)  # no gc: the OOM path flushes


@pytest.mark.parametrize("text, message", [
    ("expandable_segments:yes", "True or False"),
    ("max_split_size_mb:19", ">= 20"),
    ("max_non_split_rounding_mb:10", ">= 20"),
    ("roundup_power2_divisions:0", "powers of 2"),
    ("max_split_size_mb:abc", "whole number"),
    ("garbage_collection_threshold:1.5", "(0, 1)"),
    ("roundup_power2_divisions:3", "powers of 2"),
    ("roundup_power2_divisions:[3:4]", "powers of 2"),
    ("foo:1", "unknown key"),
    ("expandable_segments", "key:value"),
    ("backend:cudaMallocAsync", "backend:native"),
])
def test_bad_alloc_conf_is_one_line(text, message):
    with pytest.raises(AllocConfError) as exc:
        parse_alloc_conf(text)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_alloc_conf_parses_what_torch_accepts():
    assert parse_alloc_conf("max_split_size_mb:20").max_split_size == 20 * MiB  # parseMaxSplitSize: >= 20
    assert parse_alloc_conf("roundup_power2_divisions:[256:0,>:4]").divisions_for(256 * MiB) == 0
    c = parse_alloc_conf(" expandable_segments:True, max_split_size_mb:128,garbage_collection_threshold:0.6,"
                         "pinned_use_background_threads:True,max_non_split_rounding_mb:64,backend:native")
    assert c.expandable_segments and c.max_split_size == 128 * MiB and c.max_non_split_rounding == 64 * MiB
    assert c.garbage_collection_threshold == 0.6
    assert parse_alloc_conf("") == AllocConf()


def _timeline(model="llama3.2-1b", method="lora", **training):
    from peftplan.catalog import load_model
    from peftplan.engine.step import simulate_step
    from peftplan.estimate import build_tuned
    from peftplan.training import Training

    t = Training(**{"micro_batch": 2, "seq_len": 256, **training})
    tuned, _ = build_tuned(load_model(model), method, None, t)
    return simulate_step(tuned, t.with_(grad_ckpt=t.grad_ckpt or tuned.forces_grad_ckpt))


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_engine_timeline_is_well_formed_and_replays_to_its_peak(method):
    mem = _timeline(method=method)
    live: set[int] = set()
    for i, ev in enumerate(mem.events):
        if ev >= 0:
            assert ev % 512 == 0
            live.add(i)
        else:
            live.remove(~ev)  # every free names a live allocation, once
    r = replay(mem.events)
    assert r.peak_requested_bytes == mem.peak.bytes  # the replay's allocated peak is the engine's
    assert r.peak_reserved_bytes >= r.peak_allocated_bytes >= mem.peak.bytes


@pytest.mark.parametrize("conf", ["", "max_split_size_mb:64", "roundup_power2_divisions:[64:8,>:1]"])
def test_inlined_default_path_equals_the_general_one(conf):
    mem = _timeline(method="qlora")
    c = parse_alloc_conf(conf)
    fast = AllocatorReplay(c).run(mem.events)
    general = AllocatorReplay(c).run(mem.events, generic=True)
    assert fast == general


def test_expandable_segments_bring_reserved_near_allocated():
    mem = _timeline(method="full")
    default = replay(mem.events)
    expandable = replay(mem.events, parse_alloc_conf("expandable_segments:True"))
    assert expandable.peak_reserved_bytes < default.peak_reserved_bytes
    assert expandable.segments_at_peak <= 2  # one per pool
    assert expandable.unsplit_slack_bytes == 0  # always split
