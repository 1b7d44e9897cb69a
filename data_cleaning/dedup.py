"""Exact and near-duplicate detection that keeps memory flat in corpus size.

Per record only fixed-size numbers are kept, and on disk: a 64-bit exact hash, the MinHash signature and
its LSH band hashes. Duplicates are then found column by column with numpy (sort, find equal runs), so
RAM grows by a few bytes per record, not by the records. The MinHash permutation parameters and the LSH
band/row split for the threshold come from datasketch; shingles are word n-grams hashed with CRC32, and
signatures are computed for a whole batch at once with numpy.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+")


def exact_key(kind: str, joined: str) -> int:
    """64-bit hash of the record's case- and whitespace-folded text (what 'exact duplicate' means)."""
    folded = " ".join(joined.casefold().split())
    return int.from_bytes(hashlib.blake2b(f"{kind}\x00{folded}".encode(), digest_size=8).digest(), "little")


class MinHasher:
    """Batch MinHash signatures and LSH band hashes for a Jaccard threshold."""

    def __init__(self, threshold: float, num_perm: int, shingle: int, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self.num_perm, self.shingle = num_perm, shingle
        self._word_hash: dict[str, int] = {}
        a, b = MinHash(num_perm=num_perm, seed=seed).permutations
        # 32-bit affine permutations (a odd: a bijection on 32-bit hashes); 8x faster than datasketch's
        # 61-bit modular arithmetic, and the shingle hashes they permute are already well mixed
        self.a, self.b = (a.astype(np.uint32) | np.uint32(1)), b.astype(np.uint32)
        # weigh false negatives above false positives: every candidate pair is verified afterwards
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.2, 0.8))
        self.bands, self.rows = lsh.b, lsh.r
        rng = np.random.RandomState(seed)
        # odd 64-bit multipliers: a band hash is a wrapping dot product of its rows with these
        self.row_mix = (rng.randint(1, 1 << 62, size=self.rows, dtype=np.int64).astype(np.uint64) << np.uint64(1)) | np.uint64(1)
        self.win_mix = (rng.randint(1, 1 << 62, size=shingle, dtype=np.int64).astype(np.uint64) << np.uint64(1)) | np.uint64(1)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures of word-shingle sets."""
        n = self.shingle
        padded: list[int] = []
        record_pos = np.empty(len(texts), dtype=np.int64)  # where each record starts in `padded`
        windows = np.empty(len(texts), dtype=np.int64)  # how many shingles it has (at least one)
        cache = self._word_hash
        if len(cache) > 200_000:
            cache.clear()  # bounded: memory must not grow with the corpus
        for i, text in enumerate(texts):
            words = [cache.get(w) or cache.setdefault(w, zlib.crc32(w.encode()) + 1)
                     for w in _WORD.findall(text.casefold())]
            record_pos[i] = len(padded)
            windows[i] = max(1, len(words) - n + 1)
            padded.extend(words)
            padded.extend([0] * (n - 1 + (0 if words else 1)))
        arr = np.asarray(padded, dtype=np.uint64)
        offsets = np.concatenate(([0], np.cumsum(windows)[:-1]))
        # shingle start positions: record_pos[r] + 0..windows[r]-1, for every record r
        idx = np.repeat(record_pos - offsets, windows) + np.arange(int(windows.sum()))
        with np.errstate(over="ignore"):
            sh = arr[idx] * self.win_mix[0]
            for k in range(1, n):
                sh += arr[idx + k] * self.win_mix[k]
            sh = (sh >> np.uint64(32)).astype(np.uint32)  # a well-mixed 32-bit shingle hash
            # (num_perm, shingles): the reduction runs along contiguous memory
            phv = self.a[:, None] * sh[None, :] + self.b[:, None]
        return np.ascontiguousarray(np.minimum.reduceat(phv, offsets, axis=1).T)

    def band_hashes(self, sigs: np.ndarray) -> np.ndarray:
        """(rows, bands) uint64: records sharing any band hash are near-duplicate candidates."""
        used = sigs[:, : self.bands * self.rows].astype(np.uint64).reshape(len(sigs), self.bands, self.rows)
        with np.errstate(over="ignore"):
            return (used * self.row_mix).sum(axis=2, dtype=np.uint64)


# Fixed-size reads instead of memory maps: mapped pages would count as resident memory and grow with the corpus.
_CHUNK_ROWS = 65_536


def _read_column(path: Path, n: int, width: int, j: int) -> np.ndarray:
    """Column j of an (n, width) uint64 file, read in fixed-size blocks."""
    col = np.empty(n, dtype=np.uint64)
    with open(path, "rb") as f:
        for start in range(0, n, _CHUNK_ROWS):
            rows = min(_CHUNK_ROWS, n - start)
            block = np.fromfile(f, dtype=np.uint64, count=rows * width).reshape(rows, width)
            col[start:start + rows] = block[:, j]
    return col


def _read_rows(f, rows: np.ndarray, width: int) -> np.ndarray:
    """Rows of an (n, width) uint32 file, by index (positioned reads, sorted for locality)."""
    out = np.empty((len(rows), width), dtype=np.uint32)
    row_bytes = width * 4
    for k in np.argsort(rows, kind="stable"):
        f.seek(int(rows[k]) * row_bytes)
        out[k] = np.frombuffer(f.read(row_bytes), dtype=np.uint32)
    return out


@dataclass
class Clusters:
    """Duplicate clusters: representative index -> member indices (representative excluded)."""

    members: dict[int, list[int]] = field(default_factory=dict)

    def top(self, k: int) -> list[tuple[int, list[int]]]:
        return sorted(self.members.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:k]


def exact_duplicates(keys: np.ndarray) -> tuple[np.ndarray, Clusters]:
    """Mask of records equal to an earlier one, and the clusters (first occurrence represents)."""
    n = len(keys)
    dup = np.zeros(n, dtype=bool)
    clusters = Clusters()
    if n == 0:
        return dup, clusters
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rep = first[inverse.reshape(-1)]
    dup = rep != np.arange(n)
    for i in np.flatnonzero(dup):
        clusters.members.setdefault(int(rep[i]), []).append(int(i))
    return dup, clusters


def near_duplicates(bands_path: Path, sigs_path: Path, n: int, hasher: MinHasher, alive: np.ndarray,
                    threshold: float) -> tuple[np.ndarray, Clusters, int]:
    """Mask of near-duplicates among `alive` records, their clusters, and how many candidate pairs were checked.

    Candidates share an LSH band; a pair counts only when its estimated Jaccard (share of equal signature
    slots) reaches the threshold. Verified pairs are joined transitively (union-find); the earliest record
    of a cluster is kept.
    """
    dup = np.zeros(n, dtype=bool)
    clusters = Clusters()
    if n == 0 or not alive.any():
        return dup, clusters, 0
    idx = np.flatnonzero(alive)
    pair_codes = []
    for j in range(hasher.bands):
        col = _read_column(bands_path, n, hasher.bands, j)[idx]
        order = np.lexsort((idx, col))
        sorted_col, sorted_idx = col[order], idx[order]
        same = sorted_col[1:] == sorted_col[:-1]
        if not same.any():
            continue
        # run starts: each member is paired with its run's first record and with its predecessor
        run_id = np.cumsum(np.concatenate(([True], ~same)))
        run_first = sorted_idx[np.concatenate(([0], np.flatnonzero(~same) + 1))][run_id - 1]
        later = sorted_idx[1:][same]
        prev = sorted_idx[:-1][same]
        first = run_first[1:][same]
        for a in (first, prev):
            pair_codes.append(a.astype(np.uint64) * np.uint64(n) + later.astype(np.uint64))
    if not pair_codes:
        return dup, clusters, 0
    codes = np.unique(np.concatenate(pair_codes))
    a_all, b_all = (codes // np.uint64(n)).astype(np.int64), (codes % np.uint64(n)).astype(np.int64)
    keep = a_all != b_all
    a_all, b_all = a_all[keep], b_all[keep]
    verified = []
    with open(sigs_path, "rb") as sig_file:
        for s in range(0, len(a_all), 20_000):
            a, b = a_all[s:s + 20_000], b_all[s:s + 20_000]
            rows = _read_rows(sig_file, np.concatenate((a, b)), hasher.num_perm)
            jacc = (rows[:len(a)] == rows[len(a):]).mean(axis=1)
            ok = jacc >= threshold
            verified.extend(zip(a[ok].tolist(), b[ok].tolist()))
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in verified:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the earliest record stays the representative
    for x in list(parent):
        r = find(x)
        if r != x:
            dup[x] = True
            clusters.members.setdefault(r, []).append(x)
    for members in clusters.members.values():
        members.sort()
    return dup, clusters, len(a_all)
