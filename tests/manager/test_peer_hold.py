"""Pages held for a peer's `get` by a transport thread (PeerPages.hold, the allocator's `hold`), with
no trip to the loop: the bytes a send reads stay as they were until the send lets them go, whatever
the loop does to the page meanwhile; a page that is not READY in DRAM, or not this one, is never held."""

from __future__ import annotations

import concurrent.futures

from polarkvd.keys import page_keys
from polarkvd.manager import Manager
from polarkvd.tiers.dram import SlabAllocator
from tests.conftest import TEST_NS, chain_tokens, make_manager, manager_store, page_bytes_for

PB = TEST_NS.page_bytes


def chain(session, seed: int, pages: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    return [bytes(k) for k in page_keys(session.ns.digest, chain_tokens(seed, pages), TEST_NS.page_tokens)]


def on_thread(fn, *args):  # type: ignore[no-untyped-def]
    """Run on another thread, as the transport does."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(fn, *args).result()


def room(m: Manager) -> int:
    return m.allocator.capacity // m.allocator.slab_bytes * (m.allocator.slab_bytes // PB)


def test_a_held_page_keeps_its_bytes_while_the_loop_evicts_it() -> None:
    """A page held for a send is evicted by pressure (the loop does not wait for sends): it leaves
    the index at once, but its slot is not handed to a new page until the hold ends, so the send
    reads the page's own bytes; after the release the slot is reused."""
    m, _ = make_manager(8)
    s = m.attach(TEST_NS, "a")
    keys = chain(s, 1, 1)
    manager_store(m, s, keys)
    held = on_thread(m.peers.hold, s.ns.digest, keys[0])
    assert held is not None and bytes(held.view) == page_bytes_for(keys[0], PB).tobytes()
    for i in range(room(m) * 2):  # every slot turned over twice
        manager_store(m, s, chain(s, 100 + i, 1))
    assert keys[0] not in m.index  # evicted meanwhile
    assert bytes(held.view) == page_bytes_for(keys[0], PB).tobytes()  # its bytes never overwritten
    used = m.allocator.used_bytes
    held.release()
    assert m.allocator.used_bytes == used - s.ns.slot_bytes  # the slot was freed at the release
    manager_store(m, s, chain(s, 999, 1))
    assert bytes(held.view) != page_bytes_for(keys[0], PB).tobytes()  # and is reused now


def test_only_ready_dram_pages_of_the_namespace_are_held() -> None:
    m, _ = make_manager(8)
    s = m.attach(TEST_NS, "a")
    keys = chain(s, 2, 3)
    manager_store(m, s, keys[:2])
    m.reserve(s, keys[2:], keys[1])  # reserved, not committed
    assert on_thread(m.peers.hold, bytes(16), keys[0]) is None  # another namespace's digest
    assert on_thread(m.peers.hold, s.ns.digest, keys[2]) is None  # not READY
    assert on_thread(m.peers.hold, s.ns.digest, chain(s, 3, 1)[0]) is None  # not here
    got = [on_thread(m.peers.hold, s.ns.digest, k) for k in keys[:2]]
    assert all(g is not None for g in got)
    for g in got:
        g.release()  # type: ignore[union-attr]


def test_the_allocator_holds_a_slot_only_for_its_owner() -> None:
    """`hold` succeeds only while the slot holds that owner (a page moved or replaced is not held);
    a held slot freed twice over by its holds comes back once, after the last."""
    a = SlabAllocator(4 << 20, 1 << 20)
    page, other = object(), object()
    off = a.alloc(PB)
    assert off is not None
    a.claim(off, page)
    assert not a.hold(off, other)
    assert a.hold(off, page) and a.hold(off, page)
    a.free(off, PB)
    assert a.alloc(PB) != off  # not handed out while held
    a.unhold(off)
    assert off not in a._classes[PB].free
    a.unhold(off)
    assert off in a._classes[PB].free  # freed at the last release
    assert not a.hold(off, page)  # a free slot holds nobody
