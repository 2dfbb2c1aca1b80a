"""The prefix store: each distinct prompt prefix prefilled once into a row of a fixed-shape
key/value store, least recently used rows making room, kept until the weights change.

`PrefixStoreRows` is a mixin of `Sampler`: it uses the sampler's shapes, state, placement
(`_put`, `_zeros`), compiled programs (`_compile`, `_prefill_fn`) and `stats`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from gradual_jax.sampling.kernels import PrefixStore


class PrefixStoreRows:
    """`_store_or_new`, `_store_rows` and `_preload`."""

    def _store_or_new(self) -> PrefixStore:
        """The store of the current shapes (zeros, and an empty index, when there is none)."""
        if self._store is None:
            sh, cfg = self.shapes, self.config
            kv = (sh.store_rows, sh.prefix_width, cfg.num_kv_heads, cfg.head_dim)
            z = lambda shape, dt: self._zeros(shape, dt, rows=False)  # noqa: E731
            self._store = PrefixStore(keys=self._kv_buffers(kv, z), values=self._kv_buffers(kv, z),
                                      mask=z(kv[:2], bool))
            self._store_index.clear()
        return self._store

    def _store_rows(self, prefixes: Sequence[tuple[int, ...]],
                    held: Collection[tuple[int, ...]] = ()) -> dict[tuple[int, ...], int]:
        """Store rows holding `prefixes`, prefilling the missing ones (least recently used rows
        neither among `prefixes` nor `held`, the prefixes decode slots are reading, make room;
        together they must fit the store)."""
        sh = self.shapes
        store = self._store_or_new()
        index = self._store_index
        missing = list(dict.fromkeys(p for p in prefixes if p not in index))
        keep = set(prefixes).union(held)
        for start in range(0, len(missing), sh.prefill_rows):
            part = missing[start:start + sh.prefill_rows]
            rows = []
            for p in part:
                used = set(index.values())
                row = next((r for r in range(sh.store_rows) if r not in used), None)
                if row is None:
                    victim = next(k for k in index if k not in keep)
                    row = index.pop(victim)
                index[p] = row
                rows.append(row)
            ids = np.zeros((sh.prefill_rows, sh.prefix_width), np.int32)
            length = np.zeros(sh.prefill_rows, np.int32)
            dest = np.full(sh.prefill_rows, sh.store_rows, np.int32)
            for i, (p, row) in enumerate(zip(part, rows)):
                ids[i, :len(p)] = p
                length[i], dest[i] = len(p), row
            args = (self.state, store, self._put(ids), self._put(length), self._put(dest))
            store = self._compile("prefill", self._prefill_fn, args, {}, (1,))(*args)
            self.stats.prefixes += len(part)
            self.stats.prefill_tokens += ids.size
        self._store = store
        for p in prefixes:
            index.move_to_end(p)
        return {p: index[p] for p in prefixes}

    def _preload(self, prefixes: Sequence[tuple[int, ...]]) -> None:
        """Prefill the first of `prefixes` (in order of use) that the store can hold, all in
        full prefill calls, before a call's work asks for them one insert at a time."""
        distinct = list(dict.fromkeys(prefixes))[:self.shapes.store_rows]
        if distinct:
            self._store_rows(distinct)
