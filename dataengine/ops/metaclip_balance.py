"""`metaclip_balance`: MetaCLIP's curation, so head concepts stop crowding out the tail.

Each caption is matched against an entry list (MetaCLIP's metadata: WordNet synsets and Wikipedia
titles; ours is any list, one entry per line) by substring on word boundaries: an entry matches when
its words appear, in order and adjacent, among the caption's words (lowercased). Rows matching no entry
are rejected (`metaclip:no_entry`) unless `keep_unmatched`. Then, over every matched row of the run
(a barrier), an entry matched more than `t` times keeps each of its rows with probability t / count;
a row survives when any of its entries keeps it, so tail entries (count <= t) keep all their rows. The
draw is a hash of (seed, uid, entry): the same rows on every rerun, on any number of workers. A row
sampled out is rejected as `metaclip:over_cap:<entry>`, naming its most frequent entry.

Without an entry list, every word of a caption is an entry: the same balancing over caption unigrams,
as Llama 3's image-text pipeline resamples by caption n-gram frequency (rows of only frequent words are
sampled down, a rare word keeps its row).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from dataengine.core import columns as C
from dataengine.ops.base import Op, OpConfig, register_op

_WORD = re.compile(r"\w+")


class MetaclipBalanceConfig(OpConfig):
    """Entry list, the cap `t`, and which text is matched."""

    op: Literal["metaclip_balance"] = "metaclip_balance"
    entries: list[str] | None = Field(default=None, description="Entries to match (inline). Neither this nor "
                                      "entries_file: every caption word is an entry (n-gram balancing).")
    entries_file: str | None = Field(default=None, description="Entries, one per line (.txt) or a JSON list "
                                                               "(.json, as MetaCLIP's metadata.json).")
    t: int = Field(default=20_000, gt=0, description="Matches an entry keeps at most, in expectation (MetaCLIP: "
                                                     "20k for 400M pairs, 170k for 2.5B).")
    text_column: str = Field(default=C.CAPTION, description="The caption matched (e.g. caption_best after CapFilt).")
    keep_unmatched: bool = Field(default=False, description="Keep rows matching no entry (MetaCLIP drops them).")
    seed: int = Field(default=0, description="Seed of the per-(row, entry) draws.")
    batch_size: int = Field(default=4096, gt=0)

    @model_validator(mode="after")
    def _one_entry_source(self) -> "MetaclipBalanceConfig":
        if self.entries is not None and self.entries_file is not None:
            raise ValueError("give the entry list as entries (inline) or entries_file, not both")
        if self.entries is not None and not any(e.strip() for e in self.entries):
            raise ValueError("entries: the list has no non-empty entry")
        return self


def load_entries(config: MetaclipBalanceConfig) -> list[str] | None:
    """The entry list, stripped, empty lines dropped (None: every word is an entry); a missing or
    malformed file is named in the error."""
    if config.entries is None and config.entries_file is None:
        return None
    if config.entries is not None:
        return [e.strip() for e in config.entries if e.strip()]
    path = Path(config.entries_file or "").expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"metaclip_balance: entries_file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"metaclip_balance: entries_file {path} is not JSON ({e})") from None
        if not isinstance(loaded, list) or not all(isinstance(e, str) for e in loaded):
            raise ValueError(f"metaclip_balance: entries_file {path} must hold a JSON list of strings")
        return [e.strip() for e in loaded if e.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


class EntryMatcher:
    """Entries as word tuples by length: a caption's n-grams are looked up, O(words x longest entry).
    No entries (None): each distinct word of the caption is its own entry."""

    def __init__(self, entries: list[str] | None) -> None:
        self.every_word = entries is None
        self.by_length: dict[int, dict[tuple[str, ...], str]] = {}
        for entry in entries or []:
            words = tuple(_WORD.findall(entry.lower()))
            if words:
                self.by_length.setdefault(len(words), {}).setdefault(words, entry)

    def __call__(self, text: str | None) -> list[str]:
        """The entries `text` matches, in order of first appearance, each once."""
        if not text:
            return []
        words = _WORD.findall(text.lower())
        if self.every_word:
            return list(dict.fromkeys(words))
        found: dict[str, None] = {}
        for start in range(len(words)):
            for n, table in self.by_length.items():
                entry = table.get(tuple(words[start:start + n])) if start + n <= len(words) else None
                if entry is not None:
                    found.setdefault(entry)
        return list(found)


def draw(seed: int, uid: str, entry: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, uid, entry)."""
    digest = hashlib.blake2b(f"{seed}\x1f{uid}\x1f{entry}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


@register_op
class MetaclipBalance(Op[MetaclipBalanceConfig]):
    """Match entries in the stream; balance over all matched rows after the barrier."""

    Config = MetaclipBalanceConfig

    def __init__(self, config: MetaclipBalanceConfig) -> None:
        super().__init__(config)
        self.match = EntryMatcher(load_entries(config))

    def process(self, batch: pa.Table) -> pa.Table:
        config = self.config
        if config.text_column not in batch.column_names:
            raise ValueError(f"metaclip_balance: text_column {config.text_column!r} is not a column of the rows "
                             f"(they have {', '.join(batch.column_names)})")
        matched = [self.match(text) for text in batch.column(config.text_column).to_pylist()]
        reasons = [None if m or config.keep_unmatched else "metaclip:no_entry" for m in matched]
        return pa.table({C.METACLIP_ENTRIES: pa.array(matched, pa.list_(pa.string())),
                         C.REJECT_REASON: pa.array(reasons, pa.string())})

    @classmethod
    def is_barrier(cls, config: MetaclipBalanceConfig) -> bool:
        return True

    @classmethod
    def decision_columns(cls, config: MetaclipBalanceConfig) -> list[str]:
        return [C.METACLIP_ENTRIES]

    @classmethod
    def decide(cls, config: MetaclipBalanceConfig, scores: pa.Table) -> dict[str, Any]:
        """Counts per entry over the alive rows, then each row's draws against t / count."""
        entries = scores.column(C.METACLIP_ENTRIES)
        counts: dict[str, int] = {}
        if scores.num_rows:
            flat = pc.list_flatten(entries)
            if len(flat):
                tally = pc.value_counts(flat)
                counts = dict(zip(tally.field("values").to_pylist(), tally.field("counts").to_pylist()))
        head = {entry: n for entry, n in counts.items() if n > config.t}
        rejected: dict[str, str] = {}
        for uid, matched in zip(scores.column(C.UID).to_pylist(), entries.to_pylist()):
            if not matched or not any(e in head for e in matched):
                continue  # no entry (kept by keep_unmatched) or a tail entry: kept
            if not any(e not in head or draw(config.seed, uid, e) < config.t / head[e] for e in matched):
                rejected[uid] = f"metaclip:over_cap:{max(matched, key=lambda e: (head.get(e, 0), e))}"
        return {"rows": scores.num_rows, "entries_matched": len(counts), "head_entries": len(head),
                "t": config.t, "rejected": rejected,
                "largest": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:20])}

    @classmethod
    def apply_decision(cls, config: MetaclipBalanceConfig, batch: pa.Table, decision: dict[str, Any]) -> pa.Table:
        rejected = decision["rejected"]
        return pa.table({C.REJECT_REASON: pa.array([rejected.get(u) for u in batch.column(C.UID).to_pylist()],
                                                   pa.string())})
