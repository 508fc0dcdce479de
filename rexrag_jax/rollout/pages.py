"""Host-side bookkeeping of a paged KV cache: which fixed-size pages hold which row's tokens.

Why: a contiguous cache reserves `rows x max_context` slots, although most trajectories end far shorter
and the G rows of a group start from the same prompt. With pages, a row holds only the pages its tokens
fill; the rows of a group share their prompt's pages, and a probe shares its source row's prefix up to
the page where it diverges (copy on write). This module is the allocator: plain numpy, no device state.
The device side reads the cache through `table` (`[rows, max_pages]` page ids, `NO_PAGE` past a row's
pages); every method that needs page contents moved returns the copies `(from_page, to_page)` for the
caller to apply before writing.

Invariants (checked by `check`): a page is free or referenced; its reference count is the number of
(row, slot) entries of `table` holding it; a row's pages are exactly the first `pages_for(length)` slots.
Failures (`PagesExhausted`, bad arguments) raise before anything changes.
"""

from __future__ import annotations

import numpy as np

NO_PAGE = -1


class PagesExhausted(RuntimeError):
    """Not enough free pages: the caller waits for rows to finish (`release`) or uses fewer rows."""


def pages_for(length: int, page_size: int) -> int:
    """Pages that hold `length` tokens."""
    return -(-int(length) // page_size)


class PageTable:
    """Pages of `page_size` token slots, `num_pages` in all, shared by `rows` rows of at most `max_pages`."""

    def __init__(self, num_pages: int, page_size: int, rows: int, max_pages: int):
        for name, value in (
            ("num_pages", num_pages),
            ("page_size", page_size),
            ("rows", rows),
            ("max_pages", max_pages),
        ):
            if int(value) < 1:
                raise ValueError(f"PageTable: {name}={value} must be >= 1")
        self.page_size, self.max_pages = int(page_size), int(max_pages)
        self.table = np.full((rows, max_pages), NO_PAGE, np.int32)
        self.lengths = np.zeros(rows, np.int64)  # tokens each row's pages hold
        self.refcount = np.zeros(num_pages, np.int32)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: the lowest ids are handed out first

    # ------------------------------------------------------------------ queries

    @property
    def num_pages(self) -> int:
        return len(self.refcount)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def row_pages(self, row: int) -> list[int]:
        return self.table[row, : pages_for(self.lengths[row], self.page_size)].tolist()

    def slot(self, row: int, position: int) -> tuple[int, int]:
        """(page, offset) of token `position` of `row`."""
        if not 0 <= position < self.lengths[row]:
            raise IndexError(f"row {row}: position {position} outside its {self.lengths[row]} tokens")
        return int(self.table[row, position // self.page_size]), position % self.page_size

    # ------------------------------------------------------------------ changes

    def _take(self, count: int, why: str) -> list[int]:
        if count > len(self._free):
            raise PagesExhausted(
                f"{why}: needs {count} free pages of {self.page_size} tokens, {len(self._free)} of {self.num_pages} "
                "are free; wait for rows to finish or use fewer rows (nothing was changed)"
            )
        pages = [self._free.pop() for _ in range(count)]
        self.refcount[pages] = 1
        return pages

    def _drop(self, pages) -> None:
        for page in pages:
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                self._free.append(int(page))

    def _check_row(self, row: int) -> None:
        if not 0 <= row < len(self.lengths):
            raise IndexError(f"row {row} outside [0, {len(self.lengths)})")

    def extend(self, row: int, length: int) -> list[tuple[int, int]]:
        """Make `row` hold `length` tokens, for writing positions from its current length (or, with a
        smaller `length`, roll it back). Returns the page copies to apply first: a shared page that will be
        written (the row's last, partly filled one) becomes the row's own copy."""
        self._check_row(row)
        length = int(length)
        need = pages_for(length, self.page_size)
        if need > self.max_pages:
            raise ValueError(f"row {row}: {length} tokens need {need} pages, more than max_pages={self.max_pages}")
        have = pages_for(self.lengths[row], self.page_size)
        if need <= have and length <= self.lengths[row]:  # a rollback: drop the pages past the new end
            self._drop(self.table[row, need:have])
            self.table[row, need:have] = NO_PAGE
            self.lengths[row] = length
            return []
        first_written = int(self.lengths[row]) // self.page_size  # the page the next token lands in
        shared = [i for i in range(first_written, min(have, need)) if self.refcount[self.table[row, i]] > 1]
        new = self._take(max(need - have, 0) + len(shared), f"row {row} growing to {length} tokens")
        copies = []
        for i in shared:
            page = new.pop()
            copies.append((int(self.table[row, i]), page))
            self._drop([self.table[row, i]])
            self.table[row, i] = page
        self.table[row, have:need] = new
        self.lengths[row] = length
        return copies

    def share(self, source: int, targets, length: int | None = None) -> None:
        """`targets` hold the first `length` tokens of `source` (default all of them) in its pages, without
        copying: the G rows of a group after one prefill of their prompt, or a probe branching off its
        source row. Writes past `length` then copy the shared last page first (`extend`)."""
        self._check_row(source)
        length = int(self.lengths[source] if length is None else length)
        if not 0 <= length <= self.lengths[source]:
            raise ValueError(f"share: row {source} holds {self.lengths[source]} tokens, not {length}")
        pages = self.table[source, : pages_for(length, self.page_size)]
        for target in targets:
            self._check_row(target)
            if target == source:
                raise ValueError(f"share: row {source} cannot share with itself")
        for target in targets:
            self.release(target)
            self.table[target, : len(pages)] = pages
            self.refcount[pages] += 1
            self.lengths[target] = length

    def release(self, row: int) -> None:
        """A finished row gives its pages back (a shared page is freed with its last holder)."""
        self._check_row(row)
        self._drop(self.row_pages(row))
        self.table[row] = NO_PAGE
        self.lengths[row] = 0

    def check(self) -> None:
        """Assert the invariants (tests; cheap enough for a debug run)."""
        counts = np.zeros_like(self.refcount)
        for row in range(len(self.lengths)):
            n = pages_for(self.lengths[row], self.page_size)
            assert (self.table[row, :n] >= 0).all() and (self.table[row, n:] == NO_PAGE).all(), row
            np.add.at(counts, self.table[row, :n], 1)
        assert (counts == self.refcount).all(), "reference counts disagree with the table"
        free = set(self._free)
        assert len(free) == len(self._free) and free == set(np.flatnonzero(counts == 0).tolist())


class ShardedPages:
    """One `PageTable` per row shard of the mesh: a row's pages live on its own device (rows are split into
    `shards` contiguous blocks, as a NamedSharding splits them), so reading and writing them needs no
    communication. Tables hold page ids within the shard; sharing is possible only inside a shard."""

    def __init__(self, rows: int, shards: int, pages_per_shard: int, page_size: int, max_pages: int):
        if rows % shards:
            raise ValueError(f"ShardedPages: {rows} rows do not split into {shards} shards")
        self.rows_per_shard = rows // shards
        self.tables = [PageTable(pages_per_shard, page_size, self.rows_per_shard, max_pages) for _ in range(shards)]

    def shard_of(self, row: int) -> int:
        return row // self.rows_per_shard

    def local(self, row: int) -> tuple[PageTable, int]:
        """The row's shard allocator and its index there."""
        return self.tables[row // self.rows_per_shard], row % self.rows_per_shard

    def length(self, row: int) -> int:
        """Tokens the row's pages hold (its allocation)."""
        table, local = self.local(row)
        return int(table.lengths[local])

    def extend(self, row: int, length: int) -> list[tuple[int, int, int]]:
        """`PageTable.extend` for `row`; the copies to apply first as (shard, from_page, to_page)."""
        table, local = self.local(row)
        return [(self.shard_of(row), a, b) for a, b in table.extend(local, length)]

    def share(self, source: int, targets, length: int | None = None) -> None:
        table, local = self.local(source)
        others = [t for t in targets if self.shard_of(t) != self.shard_of(source)]
        if others:
            raise ValueError(f"share: rows {others} are not in row {source}'s shard (pages never cross devices)")
        table.share(local, [self.local(t)[1] for t in targets], length)

    def release(self, row: int) -> None:
        table, local = self.local(row)
        table.release(local)

    def table(self) -> np.ndarray:
        """`[rows, max_pages]` page ids within each row's shard, for the device."""
        return np.concatenate([t.table for t in self.tables])

    def check(self) -> None:
        for t in self.tables:
            t.check()
