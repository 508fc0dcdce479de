"""The paged KV cache's allocator (rollout/pages.py): page reuse after rows finish, a group sharing its
prompt's pages, a probe's copy on write at its first divergent page, rollback, running out of pages with
a clear error and nothing changed, and random workloads whose every row reads back its own tokens."""

import numpy as np
import pytest

from rexrag_jax.rollout.pages import NO_PAGE, PagesExhausted, PageTable, pages_for


class Store:
    """A stand-in for the device cache: token ids in pages, written and copied as the engine would."""

    def __init__(self, pages: PageTable):
        self.pages = pages
        self.data = np.full((pages.num_pages, pages.page_size), -1, np.int64)
        self.expected = {}

    def append(self, row, tokens):
        start = int(self.pages.lengths[row])
        for src, dst in self.pages.extend(row, start + len(tokens)):
            self.data[dst] = self.data[src]
        for i, token in enumerate(tokens):
            page, offset = self.pages.slot(row, start + i)
            self.data[page, offset] = token
        self.expected[row] = self.expected.get(row, [])[:start] + list(tokens)

    def read(self, row):
        return [int(self.data[self.pages.slot(row, i)]) for i in range(self.pages.lengths[row])]


def test_pages_are_reused_after_rows_finish():
    pages = PageTable(num_pages=6, page_size=4, rows=3, max_pages=4)
    pages.extend(0, 9)  # 3 pages
    pages.extend(1, 4)  # 1 page
    assert pages.free_pages == 2 and pages.row_pages(0) == [0, 1, 2] and pages.row_pages(1) == [3]
    pages.release(0)
    assert pages.free_pages == 5 and (pages.table[0] == NO_PAGE).all()
    pages.extend(2, 16)  # 4 pages: the ones row 0 gave back among them
    assert set(pages.row_pages(2)) >= {0, 1, 2} and pages.free_pages == 1
    pages.check()


def test_a_group_shares_its_prompt_and_copies_only_the_page_it_writes():
    pages = PageTable(num_pages=32, page_size=4, rows=5, max_pages=8)
    store = Store(pages)
    store.append(0, list(range(100, 110)))  # a 10-token prompt: pages 0, 1 full, page 2 half
    pages.share(0, [1, 2, 3, 4])
    for r in range(1, 5):
        store.expected[r] = list(store.expected[0])
    assert pages.free_pages == 32 - 3 and (pages.refcount[:3] == 5).all()
    for r in range(5):  # each row samples its own continuation
        store.append(r, [r] * 5)
    full = pages.row_pages(0)[:2]
    assert all(pages.row_pages(r)[:2] == full for r in range(5))  # full prompt pages stay shared
    assert (pages.refcount[full] == 5).all()
    assert len({pages.row_pages(r)[2] for r in range(5)}) == 5  # the half page: one copy per row
    assert all(store.read(r) == store.expected[r] for r in range(5))
    pages.check()


def test_a_probe_shares_its_source_prefix_and_diverges_on_a_copy():
    pages = PageTable(num_pages=16, page_size=4, rows=2, max_pages=8)
    store = Store(pages)
    store.append(0, list(range(23)))
    pages.share(0, [1], length=13)  # a probe branching after its source's first 13 tokens
    store.expected[1] = store.expected[0][:13]
    store.append(1, [-5, -6, -7])  # the exploratory prompt
    assert pages.row_pages(1)[:3] == pages.row_pages(0)[:3]  # untouched prefix pages shared
    assert pages.row_pages(1)[3] != pages.row_pages(0)[3]  # the divergent page was copied
    assert store.read(0) == list(range(23)) and store.read(1) == list(range(13)) + [-5, -6, -7]
    pages.release(0)  # the source finishes first: the probe keeps the prefix
    assert store.read(1) == list(range(13)) + [-5, -6, -7]
    pages.check()


def test_rollback_frees_whole_pages_past_the_new_end():
    pages = PageTable(num_pages=8, page_size=4, rows=1, max_pages=8)
    pages.extend(0, 17)
    assert pages.free_pages == 3
    assert pages.extend(0, 6) == [] and pages.free_pages == 6 and pages.lengths[0] == 6
    pages.check()


def test_running_out_of_pages_is_a_clear_error_and_changes_nothing():
    pages = PageTable(num_pages=4, page_size=4, rows=3, max_pages=4)
    pages.extend(0, 8)
    pages.share(0, [1])
    before = (pages.table.copy(), pages.lengths.copy(), pages.refcount.copy(), pages.free_pages)
    with pytest.raises(PagesExhausted, match=r"row 2 growing to 13 tokens: needs 4 free pages of 4 tokens, 2 of 4"):
        pages.extend(2, 13)
    after = (pages.table, pages.lengths, pages.refcount, pages.free_pages)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    with pytest.raises(ValueError, match="more than max_pages=4"):
        pages.extend(2, 17)
    with pytest.raises(ValueError, match="num_pages=0 must be >= 1"):
        PageTable(num_pages=0, page_size=4, rows=1, max_pages=1)
    pages.release(0)
    pages.release(1)
    pages.extend(2, 13)  # fits once the others have finished
    pages.check()


def test_random_workloads_never_corrupt_a_row():
    rng = np.random.default_rng(0)
    seen = {"copies": 0, "exhausted": 0}
    for trial in range(20):
        rows, page_size = 6, int(rng.integers(1, 6))
        pages = PageTable(num_pages=int(rng.integers(6, 24)), page_size=page_size, rows=rows, max_pages=12)
        store = Store(pages)
        for _ in range(100):
            row = int(rng.integers(rows))
            op = rng.choice(["append", "share", "rollback", "release"], p=[0.5, 0.25, 0.15, 0.1])
            try:
                if op == "append":
                    room = pages.max_pages * page_size - int(pages.lengths[row])
                    shared = int(sum(pages.refcount[p] > 1 for p in pages.row_pages(row)))
                    store.append(row, rng.integers(0, 1000, int(rng.integers(0, min(room, 9) + 1))).tolist())
                    seen["copies"] += shared - int(sum(pages.refcount[p] > 1 for p in pages.row_pages(row)))
                elif op == "share":
                    targets = [r for r in range(rows) if r != row and rng.random() < 0.4]
                    length = int(rng.integers(0, pages.lengths[row] + 1))
                    pages.share(row, targets, length)
                    for t in targets:
                        store.expected[t] = store.expected.get(row, [])[:length]
                elif op == "rollback":
                    length = int(rng.integers(0, pages.lengths[row] + 1))
                    pages.extend(row, length)
                    store.expected[row] = store.expected.get(row, [])[:length]
                else:
                    pages.release(row)
                    store.expected[row] = []
            except PagesExhausted:
                seen["exhausted"] += 1  # nothing changed: the checks below still hold
            pages.check()
            for r in range(rows):
                assert store.read(r) == store.expected.get(r, []), (trial, r)
                assert len(pages.row_pages(r)) == pages_for(pages.lengths[r], page_size)
    assert seen["copies"] > 50 and seen["exhausted"] > 20, seen  # the workloads did share, copy and run out
