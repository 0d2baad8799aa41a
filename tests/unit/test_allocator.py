"""PageAllocator reference counting and SequencePages (per-request page tables)."""

from __future__ import annotations

import numpy as np
import pytest

from radixrt.cache import PageAllocator, SequencePages
from radixrt.cache.native import make_page_allocator
from tests.fixtures.radix_backends import BACKENDS


def test_alloc_hands_out_pages_1_to_n_never_scratch_page() -> None:
    alloc = PageAllocator(5)
    pages = alloc.alloc(5)
    assert pages is not None and sorted(pages) == [1, 2, 3, 4, 5]
    assert all(alloc.refcount(p) == 1 for p in pages)
    assert (alloc.num_free, alloc.num_used, alloc.num_total) == (0, 5, 5)


def test_alloc_is_all_or_nothing() -> None:
    alloc = PageAllocator(4)
    assert alloc.alloc(3) is not None
    assert alloc.alloc(2) is None
    assert alloc.num_free == 1, "a failed alloc must not take pages"
    assert alloc.alloc(0) == []


def test_page_freed_only_when_last_reference_dropped() -> None:
    alloc = PageAllocator(4)
    pages = alloc.alloc(2)
    assert pages is not None
    alloc.incref(pages)  # a second holder (e.g. the tree)
    assert alloc.decref(pages) == 0
    assert alloc.num_free == 2
    assert alloc.decref(pages) == 2
    assert alloc.num_free == 4
    assert sorted(alloc.alloc(4) or []) == [1, 2, 3, 4], "freed pages are reusable"


def test_double_free_and_incref_of_free_page_name_the_page() -> None:
    alloc = PageAllocator(4)
    pages = alloc.alloc(2)
    assert pages is not None
    alloc.decref(pages)
    with pytest.raises(AssertionError, match=f"page {pages[0]}"):
        alloc.decref([pages[0]])
    with pytest.raises(AssertionError, match="incref of free page 3"):
        alloc.incref([3])
    with pytest.raises(AssertionError, match="page 0 out of range"):
        alloc.incref([0])
    assert alloc.num_free == 4, "failed calls leave the allocator unchanged"


def test_decref_listing_a_page_twice() -> None:
    alloc = PageAllocator(3)
    (p,) = alloc.alloc(1) or []
    alloc.incref([p])
    assert alloc.decref([p, p]) == 1
    assert alloc.num_free == 3
    (q,) = alloc.alloc(1) or []
    with pytest.raises(AssertionError, match=f"page {q} below zero"):
        alloc.decref([q, q])
    assert alloc.refcount(q) == 1, "an over-decref is rolled back"


def test_ensure_capacity_allocates_on_demand_only() -> None:
    alloc = PageAllocator(10)
    seq = SequencePages(page_size=4)
    assert seq.ensure_capacity(5, alloc)
    assert seq.num_pages == 2 and seq.num_tokens == 5 and seq.wasted_slots == 3
    assert seq.ensure_capacity(8, alloc) and seq.num_pages == 2, "page 2 still had room"
    assert seq.wasted_slots == 0
    assert seq.ensure_capacity(9, alloc) and seq.num_pages == 3 and seq.wasted_slots == 3
    assert alloc.num_free == 7


def test_ensure_capacity_failure_allocates_nothing() -> None:
    alloc = PageAllocator(3)
    seq = SequencePages(page_size=2)
    assert seq.ensure_capacity(3, alloc)
    before = (list(seq.pages), seq.num_tokens, alloc.num_free)
    assert not seq.ensure_capacity(20, alloc)
    assert (list(seq.pages), seq.num_tokens, alloc.num_free) == before


def test_slots_map_positions_to_page_offsets() -> None:
    alloc = PageAllocator(8)
    alloc.alloc(3)  # make the sequence's pages non-contiguous with position
    seq = SequencePages(page_size=4)
    assert seq.ensure_capacity(10, alloc)
    p = seq.pages.tolist()
    want = [p[i // 4] * 4 + i % 4 for i in range(10)]
    assert seq.slots(0, 10) == want
    assert [seq.slot(i) for i in range(10)] == want
    assert seq.slots(3, 6) == want[3:6]
    assert seq.slot_array(0, 10).dtype == np.int64
    with pytest.raises(AssertionError, match="outside reserved"):
        seq.slot(12)


def test_replace_prefix_pages_frees_duplicates() -> None:
    alloc = PageAllocator(8)
    tree_pages = alloc.alloc(2) or []  # pages "the tree" holds for the same tokens
    seq = SequencePages(page_size=2)
    assert seq.ensure_capacity(5, alloc)  # 3 pages: first 2 duplicate the tree's
    dups = seq.pages[:2].tolist()  # a copy: pages is a live view
    assert seq.replace_prefix_pages(tree_pages, alloc) == 2
    assert seq.pages[:2].tolist() == tree_pages
    assert all(alloc.refcount(p) == 0 for p in dups), "duplicates go back to the free list"
    assert all(alloc.refcount(p) == 2 for p in tree_pages), "tree + this sequence"
    assert seq.replace_prefix_pages(tree_pages, alloc) == 0, "same pages: nothing changes"
    assert all(alloc.refcount(p) == 2 for p in tree_pages)


def test_adopt_prefix_and_release() -> None:
    alloc = PageAllocator(6)
    shared = alloc.alloc(2) or []
    seq = SequencePages(page_size=16)
    seq.adopt_prefix(shared, alloc)
    assert seq.num_tokens == 32 and seq.wasted_slots == 0
    assert seq.ensure_capacity(33, alloc) and seq.num_pages == 3 and seq.wasted_slots == 15
    assert seq.release(alloc) == 1, "only the private page is freed; shared ones have a holder"
    assert seq.pages.tolist() == [] and seq.num_tokens == 0
    assert [alloc.refcount(p) for p in shared] == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_pages_are_an_int32_array_that_grows_in_place(backend: str) -> None:
    alloc = make_page_allocator(64, backend)
    seq = SequencePages(page_size=1)
    got: list[int] = []
    for total in range(1, 40):  # one page per token: many appends, a few buffer growths
        assert seq.ensure_capacity(total, alloc)
        got.append(int(seq.pages[-1]))
        assert seq.pages.dtype == np.int32 and seq.pages.tolist() == got
    assert got == list(range(1, 40)), "the allocator's order, page for page"
    assert seq.release(alloc) == 39 and seq.num_pages == 0 and alloc.num_free == 64


def test_adopted_prefix_is_a_copy_not_a_view_of_the_parent() -> None:
    """A fork adopts a slice of the parent's pages; swapping the child's pages later (its
    commit deduplicating against the tree) must not touch the parent's."""
    alloc = PageAllocator(16)
    parent = SequencePages(page_size=2)
    assert parent.ensure_capacity(6, alloc)
    before = parent.pages.tolist()
    child = SequencePages(page_size=2)
    child.adopt_prefix(parent.pages[:2], alloc)
    child.append_pages(alloc.alloc(1) or [])
    tree = alloc.alloc(2) or []
    assert child.replace_prefix_pages(tree, alloc) == 0, "the parent still holds the old pages"
    assert child.pages[:2].tolist() == tree
    assert parent.pages.tolist() == before, "the parent's pages changed under it"
    assert [alloc.refcount(p) for p in before[:2]] == [1, 1]


def test_pages_setter_takes_a_list() -> None:
    seq = SequencePages(page_size=4)
    seq.pages = [7, 3, 9]  # given pages (a one-off batch), no allocator
    assert seq.pages.dtype == np.int32 and seq.pages.tolist() == [7, 3, 9]
    assert seq.num_pages == 3 and seq.slot(5) == 3 * 4 + 1
