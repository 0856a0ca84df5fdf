"""Dataset loaders: MovieLens 100K, LC-Rec/P5 JSON and the project's own generic format, into `Item`s and
`Interaction`s, with errors that name the file, the line, the field and the fix.

Every loader takes `strict`: strict (the default) raises `LoadError` at the first bad row; lenient
(`strict=False`) keeps the good rows, returns every bad one in `Dataset.rejected`, adds a summary line to
`Dataset.warnings` and, when `report_path` is given, writes all of them there as JSONL. Nothing is dropped
silently. Items are checked before events, and an event whose item was rejected or is unknown is rejected too.
Problems with a whole file (it is missing, it is not a JSON document, a CSV header is wrong) raise in both
modes, since no row of such a file could be trusted.

Generic format
--------------
A folder with ``items.jsonl`` (or ``items.csv``) and, optionally, ``events.jsonl`` (or ``events.csv``);
``docs/data-format.md`` has the same text with a worked example. Files are UTF-8; blank lines are skipped;
line numbers in errors are physical lines, counting a CSV header as line 1.

``items.jsonl``: one JSON object per line with the fields of `Item`:

- ``id`` (required): a string, or an integer that becomes its decimal string.
- ``title`` (required): non-blank text.
- ``category``: the path from root to leaf, as a list ``["Office", "Pens"]`` or a string ``"Office > Pens"``.
- ``brand``, ``description``: text. ``price``: a number >= 0. ``in_stock``: true or false.
- ``attributes``: an object of string keys; values that are not strings are converted with ``str()``.
- ``created_at``: ISO 8601, e.g. ``"2024-03-01T12:00:00Z"``; a time without an offset is taken as UTC.

``events.jsonl``: one JSON object per line with the fields of `Interaction`:

- ``user_id``, ``item_id`` (required): strings or integers; ``item_id`` must be an item of ``items.jsonl``.
- ``type``: one of ``view``, ``cart``, ``purchase``, ``rating`` (default ``view``).
- ``value``: a number (the rating, or a quantity), or null.
- ``timestamp``: ISO 8601 (no offset = UTC) or unix seconds as a number.
- ``position``: an integer >= 0, the order within the user's history.
- ``event_id``: the source's own id of the event (the store keeps one event per id); optional.
- ``recommendation_id``: the served recommendation the event came from (attribution); optional.

Each event needs a timestamp or a position.

``items.csv`` / ``events.csv``: a header row with the same names, then one row per item or event.
``category`` is written ``A > B > C``, ``attributes`` as a JSON object (``{"colour": "red"}``),
``in_stock`` as true/false (also 1/0, yes/no). An empty cell means the field is missing.

Any other field is an error (the data types forbid extras): put shop-specific facts under ``attributes``.
An item is built with only the fields its row gives (a missing key, null or an empty cell is "not given"), so
the store's merge keeps the others (`Item.model_fields_set`). `stream_dataset` reads the generic format row by
row for files of any size; `load_dataset` collects the same rows into lists.
`write_generic` writes this format (JSONL or CSV), deterministically, and `load_dataset` reads it back.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from retrieval.persist import atomic_write_text, parse_json
from retrieval.text import collect_cuts
from retrieval.types import Interaction, InteractionType, Item

__all__ = [
    "Dataset",
    "LoadError",
    "RejectedRow",
    "load_dataset",
    "load_generic",
    "load_lcrec",
    "load_movielens",
    "write_generic",
]

FORMATS = ("auto", "movielens", "lcrec", "generic")

# The genre order of ml-100k's u.genre; used only when a copy lacks that file.
MOVIELENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

_ITEM_FIELDS = tuple(Item.model_fields)
_EVENT_FIELDS = tuple(Interaction.model_fields)
_TYPES = ", ".join(t.value for t in InteractionType)
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {m: i for i, m in enumerate(_MONTH_NAMES, start=1)}
_BOOL_TEXT = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


# ----------------------------------------------------------------------------------------------------
# Results and errors
# ----------------------------------------------------------------------------------------------------


class LoadError(ValueError):
    """A row or file that cannot be loaded: which file, which line (1-based), which field, why, the fix."""

    def __init__(self, file: str, line: int | None, field: str | None, problem: str, fix: str) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.problem}. Fix: {self.fix}"

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the error picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.file, self.line, self.field, self.problem, self.fix))


@dataclass
class RejectedRow:
    """One row that lenient loading set aside, with the raw text so it can be fixed and reloaded."""

    file: str
    line: int | None
    field: str | None
    problem: str
    raw: str
    fix: str = ""


@dataclass
class Dataset:
    """What a loader returns: the good items and interactions, what was rejected, and any warnings."""

    name: str
    items: list[Item]
    interactions: list[Interaction]
    rejected: list[RejectedRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        """Counts of distinct users, items and interactions."""
        return {
            "users": len({ev.user_id for ev in self.interactions}),
            "items": len(self.items),
            "interactions": len(self.interactions),
        }


class DatasetStream:
    """A dataset read lazily, for inputs too large to hold: iterate `items()` to its end, then `events()`.

    What stays in memory: one row at a time, the item ids (each event's item is checked against them) and the
    user ids (for `summary()`); `rejected` grows with the bad rows only. `warnings`, `rejected` and the lenient
    report are complete once `events()` is exhausted. `load_dataset` is this, collected into lists.
    """

    def __init__(
        self,
        name: str,
        items: Iterable[Item],
        events: Iterable[Interaction],
        rejected: list[RejectedRow],
        warnings: list[str],
    ) -> None:
        self.name = name
        self.rejected = rejected
        self.warnings = warnings
        self._items, self._events = items, events
        self._n_items = self._n_events = 0
        self._users: set[str] = set()
        self._items_done = False

    @classmethod
    def of(cls, ds: Dataset) -> DatasetStream:
        """A loaded dataset, streamed (the whole-file formats: MovieLens, LC-Rec)."""
        return cls(ds.name, ds.items, ds.interactions, ds.rejected, ds.warnings)

    def items(self) -> Iterator[Item]:
        for it in self._items:
            self._n_items += 1
            yield it
        self._items_done = True

    def events(self) -> Iterator[Interaction]:
        if not self._items_done:  # events are checked against the items read so far
            raise RuntimeError("iterate DatasetStream.items() to its end before events()")
        for ev in self._events:
            self._n_events += 1
            self._users.add(ev.user_id)
            yield ev

    @property
    def items_done(self) -> bool:
        """Whether `items()` has been read to its end."""
        return self._items_done

    def summary(self) -> dict[str, int]:
        """Counts of distinct users, items and interactions read so far, keyed like `Dataset.summary()`."""
        return {"users": len(self._users), "items": self._n_items, "interactions": self._n_events}


class _BadValue(Exception):
    """A field-level problem found while converting one row; the loader adds file and line."""

    def __init__(self, field: str | None, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem
        self.fix = fix


class _Rejects:
    """Strict: raise at the first bad row. Lenient: collect every bad row."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.rows: list[RejectedRow] = []

    def add(self, file: str, line: int | None, bad: _BadValue, raw: str) -> None:
        if self.strict:
            raise LoadError(file, line, bad.field, bad.problem, bad.fix)
        self.rows.append(RejectedRow(file, line, bad.field, bad.problem, raw, bad.fix))


def _show(value: Any, limit: int = 60) -> str:
    """repr() of a bad value, cut short so one error stays one readable line."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def load_dataset(
    path: str | Path, *, strict: bool = True, report_path: Path | None = None, fmt: str = "auto"
) -> Dataset:
    """Load a dataset folder (see `_load_dataset`); text fields cut to their length caps are reported in the
    warnings (retrieval/text.py), never cut silently."""
    with collect_cuts() as cuts:
        ds = _load_dataset(path, strict=strict, report_path=report_path, fmt=fmt)
    ds.warnings.extend(cuts.warnings(str(path)))
    return ds


def _load_dataset(
    path: str | Path, *, strict: bool = True, report_path: Path | None = None, fmt: str = "auto"
) -> Dataset:
    """Load a dataset folder, detecting its layout unless `fmt` names it ("movielens", "lcrec", "generic").

    Detection order: MovieLens 100K (``u.data`` + ``u.item``), LC-Rec/P5 (``<name>.item.json`` +
    ``<name>.inter.json``), generic (``items.jsonl`` or ``items.csv``). A path to a single items file loads it
    as the generic format without events, with a warning saying so; a path to an events file, or to one file of
    a MovieLens or LC-Rec folder, is an error pointing at the folder.
    """
    layout = _detect(path, fmt)
    kw: dict[str, Any] = {"strict": strict, "report_path": report_path}
    if layout.kind == "movielens":
        return load_movielens(layout.root, **kw)
    if layout.kind == "lcrec":
        return load_lcrec(layout.root, **kw)
    ds = load_generic(layout.root, layout.events, **kw)
    ds.warnings[:0] = layout.warnings
    return ds


def stream_dataset(
    path: str | Path, *, strict: bool = True, report_path: Path | None = None, fmt: str = "auto"
) -> DatasetStream:
    """`load_dataset`, lazily: the generic format is read row by row as `items()` and then `events()` are
    iterated, so memory does not grow with the files (what `shoprec ingest` uses). MovieLens and LC-Rec are
    whole-file formats of bounded size: they are loaded, then streamed. Length cuts of catalog text are
    recorded by whoever iterates, inside `retrieval.text.collect_cuts()`."""
    layout = _detect(path, fmt)
    kw: dict[str, Any] = {"strict": strict, "report_path": report_path}
    if layout.kind == "movielens":
        return DatasetStream.of(load_movielens(layout.root, **kw))
    if layout.kind == "lcrec":
        return DatasetStream.of(load_lcrec(layout.root, **kw))
    stream = stream_generic(layout.root, layout.events, **kw)
    stream.warnings[:0] = layout.warnings
    return stream


@dataclass
class _Layout:
    kind: str  # movielens | lcrec | generic
    root: Path  # the folder, or for generic the items file
    events: Path | None = None
    warnings: list[str] = field(default_factory=list)


def _detect(path: str | Path, fmt: str) -> _Layout:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    root = Path(path)
    if not root.exists():
        raise LoadError(str(root), None, None, "does not exist", "check the path (relative to the cwd)")
    if root.is_file():
        return _single_file(root)
    if fmt in ("auto", "movielens") and ((root / "u.data").is_file() and (root / "u.item").is_file()):
        return _Layout("movielens", root)
    if fmt in ("auto", "lcrec") and _lcrec_pair(root) is not None:
        return _Layout("lcrec", root)
    if fmt in ("auto", "generic"):
        items_path, events_path = _generic_pair(root)
        if items_path is not None:
            return _Layout("generic", items_path, events_path)
    looked_for = {
        "movielens": "MovieLens 100K (u.data + u.item)",
        "lcrec": "LC-Rec/P5 JSON (<name>.item.json + <name>.inter.json)",
        "generic": "generic (items.jsonl or items.csv, optional events.jsonl or events.csv)",
    }
    wanted = looked_for.values() if fmt == "auto" else [looked_for[fmt]]
    raise LoadError(
        str(root),
        None,
        None,
        f"no known dataset layout found; looked for: {'; '.join(wanted)}",
        "point at a folder with one of these layouts, or convert the data to the generic format"
        " described in docs/data-format.md",
    )


def _single_file(path: Path) -> _Layout:
    """A file given instead of a folder: an items file loads (items only, said in a warning); anything that
    cannot stand alone is an error naming the folder to give instead."""
    name, folder = path.name, path.parent
    part_of = None
    if name in ("u.data", "u.item", "u.genre"):
        part_of = "MovieLens 100K"
    elif name.endswith((".item.json", ".inter.json")):
        part_of = "LC-Rec/P5 JSON"
    if part_of is not None:
        raise LoadError(
            str(path), None, None, f"is one file of a {part_of} dataset", f"give its folder: shoprec ingest {folder}"
        )
    if path.stem == "events" or _looks_like_events(path):
        raise LoadError(
            str(path),
            None,
            None,
            "is an events file; events are loaded together with the items they name",
            f"give the folder holding items.jsonl (or items.csv) and this file: shoprec ingest {folder}",
        )
    siblings = [folder / f"events.{ext}" for ext in ("jsonl", "csv") if (folder / f"events.{ext}").is_file()]
    also = f"; {siblings[0]} was not loaded: give the folder to load it too" if siblings else ""
    warning = f"{path} is a file, not a folder: loaded it as an items file, without events{also}"
    return _Layout("generic", path, None, [warning])


def _looks_like_events(path: Path) -> bool:
    """Whether the first row names a user_id (an events row) and no title (an item's)."""
    for _, text, bad in _decoded_lines(path):
        if bad is not None or not text.strip():
            continue
        if path.suffix.lower() == ".csv":
            header = {c.strip() for c in next(csv.reader([text]), [])}
            return "user_id" in header and "title" not in header
        try:
            row = parse_json(text)
        except json.JSONDecodeError:
            return False
        return isinstance(row, dict) and "user_id" in row and "title" not in row
    return False


def _finish(
    name: str,
    items: list[Item],
    events: list[Interaction],
    rejects: _Rejects,
    warnings: list[str],
    report_path: Path | None,
) -> Dataset:
    """Summarise what was rejected, write the report, and build the Dataset."""
    _summarise(rejects, warnings, report_path)
    return Dataset(name, items, events, rejects.rows, warnings)


def _summarise(rejects: _Rejects, warnings: list[str], report_path: Path | None) -> None:
    """One warning per file with rejected rows, and the lenient report written."""
    per_file = Counter(r.file for r in rejects.rows)
    for file, n in per_file.items():
        where = f"; details in {report_path}" if report_path is not None else "; see Dataset.rejected"
        warnings.append(f"{file}: rejected {n} row{'s' if n != 1 else ''}{where}")
    if report_path is not None and not rejects.strict:
        _write_report(Path(report_path), rejects.rows)


def _write_report(path: Path, rows: Sequence[RejectedRow]) -> None:
    lines = [json.dumps(asdict(r), ensure_ascii=False, sort_keys=True) + "\n" for r in rows]
    atomic_write_text(path, "".join(lines))


# ----------------------------------------------------------------------------------------------------
# Generic format: reading rows
# ----------------------------------------------------------------------------------------------------


def _generic_pair(root: Path) -> tuple[Path | None, Path | None]:
    def one(stem: str) -> Path | None:
        found = [root / f"{stem}.{ext}" for ext in ("jsonl", "csv") if (root / f"{stem}.{ext}").is_file()]
        if len(found) > 1:
            raise LoadError(
                str(root),
                None,
                None,
                f"has both {stem}.jsonl and {stem}.csv, so which one to load is ambiguous",
                "remove one of them, or call load_generic() with explicit paths",
            )
        return found[0] if found else None

    return one("items"), one("events")


@dataclass
class _Row:
    line: int
    raw: str
    values: dict[str, Any]
    text: bool  # True for CSV: every value is a string still to be parsed


def _decoded_lines(path: Path) -> Iterator[tuple[int, str, _BadValue | None]]:
    """(line number, text, problem) for each physical line; the problem is None unless it is not UTF-8.

    Streams: one line in memory at a time, whatever the file's size."""
    with path.open("rb") as f:
        lines = (raw for chunk in f for raw in chunk.splitlines(keepends=True))  # also splits a lone '\r'
        yield from _decode(path, lines)


def _decode(path: Path, lines: Iterator[bytes]) -> Iterator[tuple[int, str, _BadValue | None]]:
    for lineno, raw in enumerate(lines, start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Excel writes one): skip it
            raw = raw[3:]
        try:
            yield lineno, raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            name = path.name
            bad = _BadValue(
                None,
                f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); use UTF-8",
                f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {name} > {name}.utf8 && "
                f"mv {name}.utf8 {name}",
            )
            yield lineno, raw.decode("utf-8", errors="backslashreplace"), bad


def _jsonl_rows(path: Path, rejects: _Rejects) -> Iterator[_Row]:
    name = path.name
    for lineno, text, not_utf8 in _decoded_lines(path):
        raw = text.rstrip("\r\n")
        if not_utf8 is not None:
            rejects.add(name, lineno, not_utf8, raw)
            continue
        if not raw.strip():
            continue
        try:
            obj = parse_json(raw)  # absurd nesting is a JSONDecodeError too, not a RecursionError
        except json.JSONDecodeError as e:
            fix = 'write one complete JSON object per line, e.g. {"id": "sku-1", "title": "Blue pen"}'
            bad = _BadValue(None, f"is not valid JSON ({e.msg} at column {e.colno})", fix)
            rejects.add(name, lineno, bad, raw)
            continue
        if not isinstance(obj, dict):
            fix = "write one JSON object ({...}) per line, not a list or a bare value"
            bad = _BadValue(None, f"is a JSON {type(obj).__name__}, not an object", fix)
            rejects.add(name, lineno, bad, raw)
            continue
        yield _Row(lineno, raw, obj, text=False)


def _csv_rows(
    path: Path,
    rejects: _Rejects,
    allowed: Sequence[str],
    required: Sequence[str],
) -> Iterator[_Row]:
    name = path.name
    # The physical lines of the record being read (a quoted cell may span several): csv.reader pulls lines
    # one at a time, so this holds one record, never the file.
    record: list[tuple[int, str, _BadValue | None]] = []

    def feed() -> Iterator[str]:
        for line in _decoded_lines(path):
            record.append(line)
            yield line[1]

    header: list[str] | None = None
    for cells in csv.reader(feed()):
        lines, record[:] = list(record), []
        start = lines[0][0] if lines else 0
        raw = "".join(text for _, text, _ in lines).rstrip("\r\n")
        undecodable = [(n, bad) for n, _, bad in lines if bad is not None]
        if undecodable:
            lineno, bad = undecodable[0]
            if header is None:  # no row can be read without the header
                raise LoadError(name, lineno, None, "(the header) " + bad.problem, bad.fix)
            rejects.add(name, lineno, bad, raw)
            continue
        if not cells or all(not c.strip() for c in cells):
            continue  # blank line
        if header is None:
            header = [c.strip() for c in cells]
            _check_header(name, start, header, allowed, required)
            continue
        if len(cells) != len(header):
            bad = _BadValue(
                None,
                f"has {len(cells)} cells but the header has {len(header)}",
                "quote cells that contain commas, and give every row one cell per header column",
            )
            rejects.add(name, start, bad, raw)
            continue
        values = {k: v for k, v in zip(header, cells, strict=True) if v.strip() != ""}  # empty cell = missing
        yield _Row(start, raw, values, text=True)


def _check_header(
    name: str,
    line: int,
    header: list[str],
    allowed: Sequence[str],
    required: Sequence[str],
) -> None:
    seen: set[str] = set()
    for col in header:
        if col in seen:
            raise LoadError(name, line, col, "is a duplicate header column", "keep one column of each name")
        seen.add(col)
        if col not in allowed:
            raise LoadError(
                name,
                line,
                col,
                f"is an unexpected column; allowed columns: {', '.join(allowed)}",
                "rename or remove the column (put shop-specific facts in the attributes column as JSON)",
            )
    for col in required:
        if col not in seen:
            raise LoadError(name, line, col, "is a required column and is missing", f"add a '{col}' column")


def _rows(path: Path, rejects: _Rejects, allowed: Sequence[str], required: Sequence[str]) -> Iterator[_Row]:
    if not path.is_file():
        raise LoadError(str(path), None, None, "does not exist", "check the path")
    if path.suffix.lower() == ".csv":
        return _csv_rows(path, rejects, allowed, required)
    return _jsonl_rows(path, rejects)


# ----------------------------------------------------------------------------------------------------
# Generic format: converting fields
# ----------------------------------------------------------------------------------------------------


def _check_fields(values: dict[str, Any], allowed: Sequence[str], required: Sequence[str], kind: str) -> None:
    for key in values:
        if key not in allowed:
            hint = ', or move it under "attributes"' if kind == "item" else ""
            raise _BadValue(
                key, f"is not a field of an {kind} (allowed: {', '.join(allowed)})", f"remove the field{hint}"
            )
    for key in required:
        if values.get(key) is None:
            raise _BadValue(key, f"is missing; every {kind} needs one", f'add "{key}" to the row')


def _id(v: Any, text: bool, key: str) -> str:
    if isinstance(v, bool) or not isinstance(v, str | int):
        fix = 'write the id as a string, e.g. "17"'
        raise _BadValue(key, f"must be a string or an integer, got {_show(v)}", fix)
    s = str(v).strip()
    if not s:
        raise _BadValue(key, "is blank", "give every row a non-empty id")
    return s


def _str(v: Any, text: bool, key: str) -> str:
    if not isinstance(v, str):
        raise _BadValue(key, f"must be a string, got {_show(v)}", "quote the value")
    return v


def _title(v: Any, text: bool, key: str) -> str:
    s = _str(v, text, key).strip()
    if not s:
        raise _BadValue(key, "is blank; every item needs a non-empty title", "write the product's name there")
    return s


def _category(v: Any, text: bool, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        parts = [p.strip() for p in v.split(">")] if v.strip() else []
    elif isinstance(v, list) and all(isinstance(p, str) for p in v):
        parts = [p.strip() for p in v]
    else:
        raise _BadValue(
            key,
            f"must be a list of strings or a string 'A > B > C', got {_show(v)}",
            'write e.g. "Office > Pens" or ["Office", "Pens"]',
        )
    if any(not p for p in parts):
        raise _BadValue(key, f"has an empty level in {_show(v)}", "remove the empty level (look for '> >')")
    return tuple(parts)


def _number(v: Any, text: bool, key: str, fix: str, minimum: float | None = None) -> float:
    n: float | None = None
    if text and isinstance(v, str):
        try:
            n = float(v)
        except ValueError:
            n = None
    elif isinstance(v, int | float) and not isinstance(v, bool):
        n = float(v)
    floor = f" >= {minimum:g}" if minimum is not None else ""
    if n is None or not math.isfinite(n) or (minimum is not None and n < minimum):
        raise _BadValue(key, f"must be a number{floor}, got {_show(v)}", fix)
    return n


def _price(v: Any, text: bool, key: str) -> float:
    return _number(v, text, key, "write the price as a plain number, e.g. 19.99", minimum=0)


def _value(v: Any, text: bool, key: str) -> float:
    return _number(v, text, key, "write the rating or quantity as a plain number, e.g. 4 or 4.5")


def _bool(v: Any, text: bool, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if text and isinstance(v, str) and v.strip().lower() in _BOOL_TEXT:
        return _BOOL_TEXT[v.strip().lower()]
    raise _BadValue(key, f"must be true or false, got {_show(v)}", "write true or false")


def _attributes(v: Any, text: bool, key: str) -> dict[str, str]:
    fix = 'write a JSON object of strings, e.g. {"colour": "red", "size": "M"}'
    if text and isinstance(v, str):
        try:
            v = parse_json(v)
        except json.JSONDecodeError as e:
            raise _BadValue(key, f"is not valid JSON ({e.msg} at column {e.colno})", fix) from None
    if not isinstance(v, dict):
        raise _BadValue(key, f"must be an object of string keys, got {_show(v)}", fix)
    return {str(k): val if isinstance(val, str) else str(val) for k, val in v.items()}


def _iso(v: Any, key: str, fix: str) -> datetime:
    try:
        dt = datetime.fromisoformat(v.strip())
    except ValueError:
        raise _BadValue(key, f"is not an ISO 8601 date-time, got {_show(v)}", fix) from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)  # naive means UTC


def _created_at(v: Any, text: bool, key: str) -> datetime:
    fix = 'write ISO 8601, e.g. "2024-03-01T12:00:00Z" (no offset means UTC)'
    if not isinstance(v, str):
        raise _BadValue(key, f"must be an ISO 8601 string, got {_show(v)}", fix)
    return _iso(v, key, fix)


def _timestamp(v: Any, text: bool, key: str) -> datetime:
    fix = 'write ISO 8601 (e.g. "2024-03-01T12:00:00Z") or unix seconds (e.g. 1709294400)'
    seconds: float | None = None
    if isinstance(v, int | float) and not isinstance(v, bool):
        seconds = float(v)
    elif isinstance(v, str):
        try:
            seconds = float(v) if text else None
        except ValueError:
            seconds = None
        if seconds is None:
            return _iso(v, key, fix)
    else:
        raise _BadValue(key, f"must be an ISO 8601 string or unix seconds, got {_show(v)}", fix)
    if not math.isfinite(seconds) or abs(seconds) > 1e11:  # 1e11 s is year 5138: most likely milliseconds
        problem = f"is not a plausible unix time in seconds, got {_show(v)}"
        raise _BadValue(key, problem, fix + "; not milliseconds")
    return datetime.fromtimestamp(seconds, UTC)


def _position(v: Any, text: bool, key: str) -> int:
    n: int | None = None
    if text and isinstance(v, str):
        n = int(v) if v.strip().isdigit() else None
    elif isinstance(v, int) and not isinstance(v, bool):
        n = v
    if n is None or n < 0:
        raise _BadValue(key, f"must be an integer >= 0, got {_show(v)}", "write the order: 0, 1, 2, ...")
    return n


def _type(v: Any, text: bool, key: str) -> InteractionType:
    s = v.strip().lower() if isinstance(v, str) else None
    if s not in {t.value for t in InteractionType}:
        raise _BadValue(key, f"must be one of {_TYPES}, got {_show(v)}", f"map your event names to {_TYPES}")
    return InteractionType(s)


_Converter = Callable[[Any, bool, str], Any]
_ITEM_CONVERTERS: dict[str, _Converter] = {
    "id": _id,
    "title": _title,
    "category": _category,
    "brand": _str,
    "price": _price,
    "description": _str,
    "attributes": _attributes,
    "created_at": _created_at,
    "in_stock": _bool,
}
_EVENT_CONVERTERS: dict[str, _Converter] = {
    "user_id": _id,
    "item_id": _id,
    "type": _type,
    "value": _value,
    "timestamp": _timestamp,
    "position": _position,
    "event_id": _id,
    "recommendation_id": _id,
}


def _convert(
    row: _Row,
    converters: dict[str, _Converter],
    required: Sequence[str],
    kind: str,
) -> dict[str, Any]:
    _check_fields(row.values, tuple(converters), required, kind)
    out: dict[str, Any] = {}
    for key, v in row.values.items():
        if v is not None:  # null means "missing": the data type's default applies
            out[key] = converters[key](v, row.text, key)
    return out


def _from_validation(e: ValidationError) -> _BadValue:
    """Turn pydantic's first complaint into a field-level problem (a backstop: the converters catch most)."""
    err = e.errors()[0]
    loc = err.get("loc") or ()
    key = str(loc[0]) if loc else None
    return _BadValue(key, str(err.get("msg", "is invalid")), "correct the value (see docs/data-format.md)")


# ----------------------------------------------------------------------------------------------------
# Generic format: loading and writing
# ----------------------------------------------------------------------------------------------------


def load_generic(
    items_path: str | Path,
    events_path: str | Path | None = None,
    *,
    strict: bool = True,
    report_path: Path | None = None,
    name: str | None = None,
) -> Dataset:
    """Load the generic format (see the module docstring): an items file and an optional events file."""
    stream = stream_generic(items_path, events_path, strict=strict, report_path=report_path, name=name)
    items = list(stream.items())
    events = list(stream.events())
    return Dataset(stream.name, items, events, stream.rejected, stream.warnings)


def stream_generic(
    items_path: str | Path,
    events_path: str | Path | None = None,
    *,
    strict: bool = True,
    report_path: Path | None = None,
    name: str | None = None,
) -> DatasetStream:
    """The generic format, read lazily row by row (`DatasetStream`): memory does not grow with the files."""
    items_file = Path(items_path)
    rejects = _Rejects(strict)
    warnings: list[str] = []
    first_line: dict[str, int] = {}  # id -> line of the item kept for it
    rejected_ids: dict[str, str] = {}  # id -> why its row was rejected (for the events that name it)

    def items() -> Iterator[Item]:
        for row in _rows(items_file, rejects, _ITEM_FIELDS, ("id", "title")):
            try:
                values = _convert(row, _ITEM_CONVERTERS, ("id", "title"), "item")
                item_id = values["id"]
                if item_id in first_line:
                    raise _BadValue(
                        "id",
                        f"duplicates item id {item_id!r}, first defined on line {first_line[item_id]}",
                        "give every item a unique id, or merge the two rows",
                    )
                item = Item(**values)  # only the row's fields are set: a store merge keeps the others
            except (_BadValue, ValidationError) as e:
                bad = _from_validation(e) if isinstance(e, ValidationError) else e
                rid = row.values.get("id")
                rid = str(rid).strip() if isinstance(rid, str | int) and not isinstance(rid, bool) else None
                if rid and rid not in first_line:
                    rejected_ids[rid] = f"line {row.line}: {bad.problem}"
                rejects.add(items_file.name, row.line, bad, row.raw)
                continue
            first_line[item.id] = row.line
            rejected_ids.pop(item.id, None)
            yield item

    def events() -> Iterator[Interaction]:
        if events_path is not None:
            events_file = Path(events_path)
            for row in _rows(events_file, rejects, _EVENT_FIELDS, ("user_id", "item_id")):
                try:
                    values = _convert(row, _EVENT_CONVERTERS, ("user_id", "item_id"), "event")
                    _check_item_ref(values["item_id"], first_line, rejected_ids, items_file.name)
                    if values.get("timestamp") is None and values.get("position") is None:
                        raise _BadValue(
                            "timestamp",
                            "is missing, and so is position; an event needs one to be ordered",
                            'add "timestamp" (ISO 8601 or unix seconds) or "position" (0, 1, 2, ...)',
                        )
                    event = Interaction(**values)
                except (_BadValue, ValidationError) as e:
                    bad = _from_validation(e) if isinstance(e, ValidationError) else e
                    rejects.add(events_file.name, row.line, bad, row.raw)
                    continue
                yield event
        _summarise(rejects, warnings, report_path)

    ds_name = name or (items_file.parent.name or items_file.stem)
    return DatasetStream(ds_name, items(), events(), rejects.rows, warnings)


def _check_item_ref(item_id: str, known: dict[str, int], rejected: dict[str, str], items_file: str) -> None:
    if item_id in known:
        return
    if item_id in rejected:
        raise _BadValue(
            "item_id",
            f"names item {item_id!r}, which was rejected ({items_file} {rejected[item_id]})",
            f"fix that item's row in {items_file}, then load again",
        )
    raise _BadValue(
        "item_id",
        f"names unknown item id {item_id!r}: no item has this id in {items_file}",
        f"add the item to {items_file}, or remove the event",
    )


def write_generic(
    items: Iterable[Item], interactions: Iterable[Interaction], directory: str | Path, *, fmt: str = "jsonl"
) -> tuple[Path, Path]:
    """Write items and events in the generic format ("jsonl" or "csv") under `directory`; returns both paths.

    Output is deterministic (same input, same bytes): UTF-8, rows in input order, JSON keys sorted, CSV
    columns in the data types' field order. Each file is written atomically. `load_dataset(directory)` reads
    it back.
    """
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"unknown generic format {fmt!r}; valid formats: jsonl, csv")
    directory = Path(directory)
    items_path, events_path = directory / f"items.{fmt}", directory / f"events.{fmt}"
    item_rows = [it.model_dump(mode="json") for it in items]
    event_rows = [_event_dict(ev) for ev in interactions]
    for other in {"jsonl", "csv"} - {fmt}:
        stale = [directory / f"{stem}.{other}" for stem in ("items", "events")]
        if any(p.exists() for p in stale):
            raise ValueError(
                f"{directory} already holds {' or '.join(p.name for p in stale)}; writing {fmt} next to it "
                f"would make the folder ambiguous to load_dataset. Remove those files or write fmt={other!r}"
            )
    if fmt == "jsonl":
        atomic_write_text(items_path, "".join(_json_line(r) for r in item_rows))
        atomic_write_text(events_path, "".join(_json_line(r) for r in event_rows))
    else:
        atomic_write_text(items_path, _csv_text(_ITEM_FIELDS, [_item_cells(r) for r in item_rows]))
        columns = [f for f in _EVENT_FIELDS if f not in _OPTIONAL_EVENT_KEYS or any(f in r for r in event_rows)]
        atomic_write_text(events_path, _csv_text(columns, [_cells(r) for r in event_rows]))
    return items_path, events_path


# Written only when set, so files of events without them read exactly as before these fields existed.
_OPTIONAL_EVENT_KEYS = ("event_id", "recommendation_id")


def _event_dict(ev: Interaction) -> dict[str, Any]:
    row = ev.model_dump(mode="json")
    for key in _OPTIONAL_EVENT_KEYS:
        if row.get(key) is None:
            row.pop(key, None)
    return row


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"


def _cells(row: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, v in row.items():
        if v is None:
            out[key] = ""
        elif isinstance(v, bool):
            out[key] = "true" if v else "false"
        else:
            out[key] = str(v)
    return out


def _item_cells(row: dict[str, Any]) -> dict[str, str]:
    levels = row["category"]
    if any(">" in level for level in levels):
        raise ValueError(
            f"item {row['id']!r}: category level containing '>' cannot be written to CSV "
            f"({levels!r}); write JSONL instead"
        )
    attributes = row["attributes"]
    cells = _cells(row)
    cells["category"] = " > ".join(levels)
    cells["attributes"] = json.dumps(attributes, ensure_ascii=False, sort_keys=True) if attributes else ""
    return cells


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# MovieLens 100K
# ----------------------------------------------------------------------------------------------------


def load_movielens(directory: str | Path, *, strict: bool = True, report_path: Path | None = None) -> Dataset:
    """Load MovieLens 100K: ``u.item`` (Latin-1, ``|``-separated) and ``u.data`` (ratings, tab-separated).

    Each movie's category is its first flagged genre (a one-level path); all its genres are in
    ``attributes["genres"]`` and the year, when the title or release date has one, in ``attributes["year"]``.
    Ratings become `Interaction(type=rating, value=rating, timestamp=UTC time)`.
    """
    root = Path(directory)
    rejects = _Rejects(strict)
    warnings: list[str] = []
    genres = _movielens_genres(root, warnings)
    items: list[Item] = []
    known: dict[str, int] = {}
    rejected_ids: dict[str, str] = {}
    item_path = root / "u.item"
    for lineno, raw in enumerate(item_path.read_text(encoding="latin-1").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = _movielens_item(raw, genres)
            if item.id in known:
                raise _BadValue(
                    "movie_id",
                    f"duplicates movie id {item.id!r}, first on line {known[item.id]}",
                    "keep one row per movie",
                )
        except (_BadValue, ValidationError) as e:
            bad = _from_validation(e) if isinstance(e, ValidationError) else e
            rejected_ids[raw.split("|", 1)[0].strip()] = f"line {lineno}: {bad.problem}"
            rejects.add("u.item", lineno, bad, raw)
            continue
        if item.title == "unknown":
            warnings.append(f"u.item:{lineno}: movie {item.id!r} is the release's 'unknown' placeholder")
        known[item.id] = lineno
        items.append(item)

    events: list[Interaction] = []
    with (root / "u.data").open(encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            raw = line.rstrip("\r\n")
            if not raw.strip():
                continue
            try:
                events.append(_movielens_rating(raw, known, rejected_ids))
            except (_BadValue, ValidationError) as e:
                bad = _from_validation(e) if isinstance(e, ValidationError) else e
                rejects.add("u.data", lineno, bad, raw)
    return _finish(root.name, items, events, rejects, warnings, report_path)


def _movielens_genres(root: Path, warnings: list[str]) -> tuple[str, ...]:
    path = root / "u.genre"
    if not path.is_file():
        warnings.append("u.genre is missing; using the standard ml-100k genre order")
        return MOVIELENS_GENRES
    by_index: dict[int, str] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        name, _, idx = line.rpartition("|")
        if name and idx.strip().isdigit():
            by_index[int(idx)] = name
    return tuple(by_index[i] for i in sorted(by_index)) or MOVIELENS_GENRES


def _movielens_item(raw: str, genres: Sequence[str]) -> Item:
    cells = raw.split("|")
    if len(cells) != 5 + len(genres):
        raise _BadValue(
            None,
            f"has {len(cells)} '|'-separated fields, expected 5 + {len(genres)} genre flags",
            "restore the row from the original ml-100k release",
        )
    movie_id, title, release, _video, _url = (c.strip() for c in cells[:5])
    if not movie_id.isdigit():
        raise _BadValue("movie_id", f"must be an integer, got {_show(movie_id)}", "restore the row")
    flags = cells[5:]
    if any(fl.strip() not in ("0", "1") for fl in flags):
        raise _BadValue("genres", f"flags must be 0 or 1, got {_show(flags)}", "restore the row")
    flagged = [g for g, fl in zip(genres, flags, strict=True) if fl.strip() == "1"]
    created_at = _movielens_date(release)
    attributes = {"genres": ", ".join(flagged)}
    year = re.search(r"\((\d{4})\)\s*$", title)
    if year:
        attributes["year"] = year.group(1)
    elif created_at is not None:
        attributes["year"] = str(created_at.year)
    if not title:
        raise _BadValue("title", "is blank", "restore the row from the release")
    return Item(
        id=movie_id,
        title=title,
        category=tuple(flagged[:1]),
        brand="",
        attributes=attributes,
        created_at=created_at,
    )


def _movielens_date(text: str) -> datetime | None:
    """'01-Jan-1995' -> 1995-01-01 UTC; None when empty or unparseable (by hand: %b depends on locale)."""
    parts = text.split("-")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[2].isdigit()) or parts[1].lower() not in _MONTHS:
        return None
    try:
        return datetime(int(parts[2]), _MONTHS[parts[1].lower()], int(parts[0]), tzinfo=UTC)
    except ValueError:
        return None


def _movielens_rating(raw: str, known: dict[str, int], rejected: dict[str, str]) -> Interaction:
    cells = raw.split("\t")
    if len(cells) != 4:
        raise _BadValue(
            None,
            f"has {len(cells)} tab-separated fields, expected 4 (user, item, rating, timestamp)",
            "restore the row from the original ml-100k release",
        )
    user, item, rating, ts = (c.strip() for c in cells)
    if item not in known:
        reason = f"it was rejected (u.item {rejected[item]})" if item in rejected else "it is not in u.item"
        raise _BadValue("item_id", f"names movie {item!r}, but {reason}", "restore u.item from the release")
    try:
        value = float(rating)
    except ValueError:
        raise _BadValue("rating", f"must be a number, got {_show(rating)}", "restore the row") from None
    if not ts.isdigit():
        raise _BadValue("timestamp", f"must be unix seconds, got {_show(ts)}", "restore the row") from None
    return Interaction(
        user_id=user,
        item_id=item,
        type=InteractionType.RATING,
        value=value,
        timestamp=datetime.fromtimestamp(int(ts), UTC),
    )


# ----------------------------------------------------------------------------------------------------
# LC-Rec / P5 JSON
# ----------------------------------------------------------------------------------------------------


def _lcrec_pair(root: Path) -> tuple[Path, Path] | None:
    for item_path in sorted(root.glob("*.item.json")):
        inter_path = item_path.with_name(item_path.name.removesuffix(".item.json") + ".inter.json")
        if inter_path.is_file():
            return item_path, inter_path
    return None


def load_lcrec(directory: str | Path, *, strict: bool = True, report_path: Path | None = None) -> Dataset:
    """Load the LC-Rec/P5 JSON layout: ``<name>.item.json`` and ``<name>.inter.json``.

    Items: ``{"<idx>": {"title", "description", "brand", "categories"}}``, HTML entities unescaped. Events:
    ``{"<user>": [item, ...]}``, each a purchase whose `position` is its index in the list (the lists are in
    time order and carry no timestamps). Keys other than those four are ignored, with one warning.

    ``categories`` is one string joined with ", ", but some Amazon names contain ", " themselves ("Tape,
    Adhesives & Fasteners"), so `split_lcrec_categories` re-joins such names; the top level is never merged.
    Items with an empty title (the Office file has three) are kept under a fallback title built from brand,
    leaf category and id, with a warning per item.
    """
    root = Path(directory)
    pair = _lcrec_pair(root)
    if pair is None:
        raise LoadError(
            str(root),
            None,
            None,
            "has no <name>.item.json with a matching <name>.inter.json",
            "point at the folder holding both files",
        )
    item_path, inter_path = pair
    rejects = _Rejects(strict)
    warnings: list[str] = []

    item_text = item_path.read_text(encoding="utf-8")
    item_doc = _json_document(item_path, item_text)
    item_lines = _key_lines(item_text)
    records: list[tuple[str, int, dict[str, Any]]] = []
    for key, rec in item_doc.items():
        line = item_lines.get(key, 1)
        if not isinstance(rec, dict):
            bad = _BadValue(
                None,
                f"item {key!r} is a JSON {type(rec).__name__}, not an object",
                'write each item as {"title": ..., "description": ..., "brand": ..., ...}',
            )
            rejects.add(item_path.name, line, bad, _show(rec, 500))
            continue
        records.append((key, line, rec))
    split = _category_splitter([r.get("categories") for _, _, r in records])

    items: list[Item] = []
    known: set[str] = set()
    rejected_ids: dict[str, str] = {}
    extra_keys: Counter[str] = Counter()
    for key, line, rec in records:
        extra_keys.update(k for k in rec if k not in ("title", "description", "brand", "categories"))
        try:
            item = _lcrec_item(key, rec, split, warnings, item_path.name, line)
        except (_BadValue, ValidationError) as e:
            bad = _from_validation(e) if isinstance(e, ValidationError) else e
            rejected_ids[key] = f"line {line}: {bad.problem}"
            rejects.add(item_path.name, line, bad, json.dumps({key: rec}, ensure_ascii=False))
            continue
        known.add(item.id)
        items.append(item)
    if extra_keys:
        ignored = ", ".join(sorted(extra_keys))
        warnings.append(f"{item_path.name}: ignored keys that are not in the LC-Rec layout: {ignored}")

    inter_text = inter_path.read_text(encoding="utf-8")
    inter_doc = _json_document(inter_path, inter_text)
    inter_lines = _key_lines(inter_text)
    events: list[Interaction] = []
    for user, seq in inter_doc.items():
        line = inter_lines.get(user, 1)
        if not isinstance(seq, list):
            bad = _BadValue(
                None,
                f"user {user!r} maps to a JSON {type(seq).__name__}, not a list of item ids",
                'write each user as "<user>": [item, item, ...]',
            )
            rejects.add(inter_path.name, line, bad, _show(seq, 500))
            continue
        for pos, raw_item in enumerate(seq):
            try:
                if isinstance(raw_item, bool) or not isinstance(raw_item, int | str):
                    raise _BadValue(
                        "item_id",
                        f"user {user!r}, position {pos}: must be an item id, got {_show(raw_item)}",
                        "write item ids as integers or strings",
                    )
                item_id = str(raw_item)
                if item_id not in known:
                    reason = (
                        f"was rejected ({item_path.name} {rejected_ids[item_id]})"
                        if item_id in rejected_ids
                        else f"is not in {item_path.name}"
                    )
                    raise _BadValue(
                        "item_id",
                        f"user {user!r}, position {pos}: item {item_id!r} {reason}",
                        f"add or fix the item in {item_path.name}",
                    )
                events.append(
                    Interaction(
                        user_id=str(user),
                        item_id=item_id,
                        type=InteractionType.PURCHASE,
                        position=pos,
                    )
                )
            except (_BadValue, ValidationError) as e:
                bad = _from_validation(e) if isinstance(e, ValidationError) else e
                rejects.add(inter_path.name, line, bad, json.dumps({user: raw_item}, ensure_ascii=False))
    name = item_path.name.removesuffix(".item.json")
    return _finish(name, items, events, rejects, warnings, report_path)


def _json_document(path: Path, text: str) -> dict[str, Any]:
    try:
        doc = parse_json(text)
    except json.JSONDecodeError as e:
        raise LoadError(
            path.name,
            e.lineno,
            None,
            f"is not valid JSON ({e.msg} at column {e.colno})",
            "repair or re-download the file; the whole file is one JSON object",
        ) from None
    if not isinstance(doc, dict):
        raise LoadError(
            path.name,
            1,
            None,
            f"is a JSON {type(doc).__name__}, not an object keyed by id",
            'use the LC-Rec layout: {"<id>": ...}',
        )
    return doc


def _key_lines(text: str) -> dict[str, int]:
    """Line of each top-level key, so errors in a one-document JSON file can point at it.

    Pretty-printed files (the published ones are) start each key on its own line: '    "17": {'. The keys
    with the least indentation are the top-level ones. A minified file is all line 1, the default.
    """
    found: list[tuple[int, str, int]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = _KEY_LINE.match(line)
        if m:
            found.append((len(m.group(1)), m.group(2), lineno))
    top = min((indent for indent, _, _ in found), default=0)
    lines: dict[str, int] = {}
    for indent, key, lineno in found:
        if indent == top:
            lines.setdefault(key, lineno)
    return lines


_KEY_LINE = re.compile(r'([ \t]*)"([^"\\]*)"\s*:\s*[\[{]')


def _lcrec_item(
    key: str,
    rec: dict[str, Any],
    split: Callable[[str], tuple[str, ...]],
    warnings: list[str],
    file: str,
    line: int,
) -> Item:
    if "title" not in rec:
        raise _BadValue("title", f"item {key!r} has no title key", 'add "title" to the item')
    values: dict[str, str] = {}
    for k in ("title", "description", "brand", "categories"):
        v = rec.get(k, "")
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise _BadValue(k, f"item {key!r}: must be a string, got {_show(v)}", "write a string")
        values[k] = html.unescape(v).strip()
    category = split(values["categories"])
    title = values["title"]
    if not title:
        leaf = category[-1] if category else ""
        title = " ".join(p for p in (values["brand"], leaf, f"(item {key})") if p)
        warnings.append(f"{file}:{line}: item {key!r} has an empty title; using the fallback title {title!r}")
    brand, description = values["brand"], values["description"]
    return Item(id=key, title=title, category=category, brand=brand, description=description)


def _category_splitter(raw: Iterable[Any]) -> Callable[[str], tuple[str, ...]]:
    """Learn from all of a file's category strings which ", "-separated fragments belong together.

    Amazon names such as "Tape, Adhesives & Fasteners" have the shape "A, B & C". A fragment A below the top
    level is joined with the next fragment B when, across the whole file, A (under the same parent path) is
    never a leaf and is always followed by that same B, and B contains " & " while A has no "&". So
    "Office & School Supplies, Tape, Adhesives & Fasteners, Tape, Packing Tape" becomes
    ("Office & School Supplies", "Tape, Adhesives & Fasteners", "Tape", "Packing Tape"), while
    "Office Electronics, Telephones & Accessories" keeps two levels (Office Electronics has other children).
    The top level is never joined. It is a heuristic: a small file with a single path under a node may join
    two real levels, which prefix matching on the top levels tolerates.

    Some releases (Amazon "Industrial and Scientific" in LC-Rec's layout) join levels with a bare ","
    ("Industrial & Scientific,Lab & Scientific Products,Lab Instruments & Equipment"). When any string of the
    file has a comma followed by a non-space, the whole file is read that way: levels split at "," with no space
    after it, and a ", " stays inside a level's name.
    """
    strings = [html.unescape(s) for s in raw if isinstance(s, str)]
    if any(_COMPACT_SEPARATOR.search(s) for s in strings):
        return _compact_fragments
    children: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
    leaves: set[tuple[str, ...]] = set()
    for s in strings:
        parts = _fragments(s)
        for i in range(len(parts)):
            if i + 1 < len(parts):
                children[parts[: i + 1]][parts[i + 1]] += 1
            else:
                leaves.add(parts)
    joins = {
        node
        for node, kids in children.items()
        if len(node) > 1
        and len(kids) == 1
        and node not in leaves  # below the top, one child, never a leaf
        and "&" not in node[-1]
        and " & " in next(iter(kids))  # the "A, B & C" shape
    }

    def split(s: str) -> tuple[str, ...]:
        parts = _fragments(s)
        out: list[str] = []
        i = 0
        while i < len(parts):
            if parts[: i + 1] in joins and i + 1 < len(parts):
                out.append(f"{parts[i]}, {parts[i + 1]}")
                i += 2
            else:
                out.append(parts[i])
                i += 1
        return tuple(out)

    return split


def _fragments(s: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in s.split(", ") if p.strip())


_COMPACT_SEPARATOR = re.compile(r",(?=\S)")


def _compact_fragments(s: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in _COMPACT_SEPARATOR.split(s) if p.strip())
