"""The bottom of the chip run's heap, held while the simulator sets up (sim/chip_rom.py): the
simulator's long-lived objects then sit above the heap the firmware gets, as on a pile where the
firmware has the heap to itself (README, "How the chip time is modelled").

MicroPython's allocator takes the first run of free blocks long enough, scanning up from the
lowest free block; so holding every free block below a point, one object() a block, sends all
that is allocated meanwhile above it, holes included (4 KB chunks left the holes between the
start-up's objects free: ~21 KB of the simulator's objects went there, below the firmware's).
One block each: the collector is conservative, and a stale pointer left in a frame keeps what it
points to alive (a 4 KB chunk stayed so in a trial); release() checks that nothing did.
"""
import gc

BLOCK = 16  # the collector's block on 32 bits: an object() takes one
_SLACK = 1024  # the list itself, its iterator: what release() may leave


def hold(room):
    """Every free block from the heap's bottom up to `room` bytes below its top: (the list
    holding them, the bytes it holds); ([], 0) in a heap with no more than `room` free."""
    gc.collect()  # the start-up's garbage: its holes are held too
    n = (gc.mem_free() - room) // (BLOCK + 4)  # an object() and its slot in the list
    if n <= 0:
        return [], 0
    start = gc.mem_alloc()
    held = [None] * n
    for i in range(n):  # first fit: each in the lowest free block
        held[i] = object()
    return held, gc.mem_alloc() - start


def release(held, held_bytes):
    """Free what hold() held; RuntimeError if some of it stayed."""
    gc.collect()
    before = gc.mem_alloc()
    held.clear()
    gc.collect()
    kept = held_bytes - (before - gc.mem_alloc())
    if kept > _SLACK:
        raise RuntimeError("heap_hold: %d B of the heap held below the simulator stayed" % kept)
