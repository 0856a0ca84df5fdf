"""Loaders: every bad-input case in strict and lenient mode, generic round-trips, layout detection, and (with
../shared/data present) the exact counts of the two real datasets."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from retrieval.loaders import Dataset, LoadError, load_dataset, load_generic, load_lcrec, write_generic
from retrieval.types import Interaction, InteractionType, Item

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "data-format.md"

GOOD_ITEMS = [
    '{"id": "a", "title": "Alpha pen", "price": 1.5, "category": "Office > Pens"}',
    '{"id": "b", "title": "Beta pad", "category": ["Office", "Paper"]}',
    '{"id": "c", "title": "Gamma clip"}',
]
GOOD_EVENTS = [
    '{"user_id": "u1", "item_id": "a", "type": "view", "timestamp": "2024-01-01T00:00:00Z"}',
    '{"user_id": "u1", "item_id": "b", "type": "cart", "timestamp": 1704070800}',
    '{"user_id": "u2", "item_id": "c", "type": "purchase", "position": 0}',
]


def write_lines(path: Path, lines: Sequence[str | bytes]) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


U_B = '{"user_id": "u", "item_id": "b", '  # the start of an event row about item "b"

# (case id, file whose line 2 is replaced, the bad line, field named in the error, words in the problem)
BAD_CASES = [
    ("bad-json", "items", '{"id": "b", "title": ', None, "not valid JSON"),
    ("not-an-object", "items", '["b", "Beta"]', None, "not an object"),
    ("missing-title", "items", '{"id": "b"}', "title", "missing"),
    ("blank-title", "items", '{"id": "b", "title": "   "}', "title", "blank"),
    ("price-not-number", "items", '{"id": "b", "title": "B", "price": "abc"}', "price", "got 'abc'"),
    ("price-negative", "items", '{"id": "b", "title": "B", "price": -3}', "price", "a number >= 0"),
    ("duplicate-id", "items", '{"id": "a", "title": "Again"}', "id", "first defined on line 1"),
    ("wrong-encoding", "items", '{"id": "b", "title": "Caf\xe9"}'.encode("latin-1"), None, "not valid UTF-8"),
    ("unexpected-field", "items", '{"id": "b", "title": "B", "colour": "red"}', "colour", "not a field"),
    ("bad-category", "items", '{"id": "b", "title": "B", "category": "A > > C"}', "category", "empty level"),
    ("bad-created-at", "items", '{"id": "b", "title": "B", "created_at": "soon"}', "created_at", "ISO 8601"),
    ("unknown-item", "events", '{"user_id": "u", "item_id": "zz", "position": 1}', "item_id", "unknown item"),
    ("bad-type", "events", U_B + '"type": "click", "position": 1}', "type", "one of"),
    ("bad-timestamp", "events", U_B + '"timestamp": "today"}', "timestamp", "ISO"),
    ("ms-timestamp", "events", U_B + '"timestamp": 1704070800000}', "timestamp", "unix"),
    ("missing-user", "events", '{"item_id": "b", "position": 1}', "user_id", "missing"),
    ("no-order", "events", '{"user_id": "u", "item_id": "b"}', "timestamp", "position"),
    ("unexpected-event-field", "events", U_B + '"position": 1, "x": 1}', "x", "not a field"),
    ("bad-position", "events", U_B + '"position": -1}', "position", "integer >= 0"),
]
CASE_ARGS = ("kind", "bad", "field", "words")
CASE_VALUES = [c[1:] for c in BAD_CASES]
CASE_IDS = [str(c[0]) for c in BAD_CASES]


def make_folder(tmp_path: Path, kind: str, bad: str | bytes) -> Path:
    items, events = list[str | bytes](GOOD_ITEMS), list[str | bytes](GOOD_EVENTS)
    (items if kind == "items" else events)[1] = bad
    write_lines(tmp_path / "items.jsonl", items)
    write_lines(tmp_path / "events.jsonl", events)
    return tmp_path


@pytest.mark.parametrize(CASE_ARGS, CASE_VALUES, ids=CASE_IDS)
def test_bad_row_strict_names_file_line_field(
    tmp_path: Path, kind: str, bad: str | bytes, field: str | None, words: str
) -> None:
    folder = make_folder(tmp_path, kind, bad)
    with pytest.raises(LoadError) as info:
        load_dataset(folder)
    err = info.value
    assert (err.file, err.line, err.field) == (f"{kind}.jsonl", 2, field)
    assert words in err.problem
    assert err.fix
    text = str(err)
    assert text.startswith(f"{kind}.jsonl:2: ")
    assert f"field '{field}'" in text if field else "field '" not in text
    assert ". Fix: " in text


@pytest.mark.parametrize(CASE_ARGS, CASE_VALUES, ids=CASE_IDS)
def test_bad_row_lenient_reports_it_and_keeps_the_rest(
    tmp_path: Path, kind: str, bad: str | bytes, field: str | None, words: str
) -> None:
    folder = make_folder(tmp_path, kind, bad)
    report = tmp_path / "reports" / "rejected.jsonl"
    ds = load_dataset(folder, strict=False, report_path=report)
    # a bad item row also costs the event that names it (event line 2 names item "b")
    assert len(ds.rejected) == (2 if kind == "items" else 1)
    rej = ds.rejected[0]
    assert (rej.file, rej.line, rej.field) == (f"{kind}.jsonl", 2, field)
    assert words in rej.problem
    rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(ds.rejected)
    if kind == "items":
        assert (rows[1]["file"], rows[1]["line"], rows[1]["field"]) == ("events.jsonl", 2, "item_id")
        assert "'b'" in rows[1]["problem"]
    assert {"file", "line", "field", "problem", "raw"} <= rows[0].keys()
    assert rows[0]["file"] == f"{kind}.jsonl" and rows[0]["line"] == 2 and rows[0]["field"] == field
    raw = bad.decode("utf-8", errors="backslashreplace") if isinstance(bad, bytes) else bad
    assert rows[0]["raw"] == raw
    assert any(f"{kind}.jsonl: rejected 1 row" in w for w in ds.warnings)
    # the good rows are all there
    assert (len(ds.items), len(ds.interactions)) == ((2, 2) if kind == "items" else (3, 2))
    assert not list(report.parent.glob("*.tmp"))  # written atomically: no temp file left behind


def test_error_message_reads_as_documented(tmp_path: Path) -> None:
    make_folder(tmp_path, "items", '{"id": "b", "title": "Beta", "price": "abc"}')
    with pytest.raises(LoadError) as info:
        load_dataset(tmp_path)
    assert str(info.value) == (
        "items.jsonl:2: field 'price': must be a number >= 0, got 'abc'. "
        "Fix: write the price as a plain number, e.g. 19.99"
    )


def test_encoding_error_suggests_iconv(tmp_path: Path) -> None:
    make_folder(tmp_path, "items", '{"id": "b", "title": "Caf\xe9"}'.encode("latin-1"))
    with pytest.raises(LoadError) as info:
        load_dataset(tmp_path)
    assert "0xe9" in info.value.problem
    assert "iconv -f latin1 -t utf-8" in info.value.fix


def test_event_of_rejected_item_is_rejected_with_that_reason(tmp_path: Path) -> None:
    make_folder(tmp_path, "items", '{"id": "b", "title": "Beta", "price": -1}')
    ds = load_dataset(tmp_path, strict=False)
    assert [(r.file, r.line, r.field) for r in ds.rejected] == [
        ("items.jsonl", 2, "price"),
        ("events.jsonl", 2, "item_id"),
    ]
    assert "was rejected (items.jsonl line 2" in ds.rejected[1].problem
    assert [it.id for it in ds.items] == ["a", "c"]


def test_lenient_collects_every_bad_row(tmp_path: Path) -> None:
    items = [*GOOD_ITEMS, "{oops", '{"id": "d"}', '{"id": "e", "title": "E", "price": "x"}', ""]
    write_lines(tmp_path / "items.jsonl", items)
    report = tmp_path / "rejected.jsonl"
    ds = load_dataset(tmp_path, strict=False, report_path=report)
    assert [r.line for r in ds.rejected] == [4, 5, 6]
    assert len(report.read_text().splitlines()) == 3
    assert len(ds.items) == 3 and ds.interactions == []


def test_lenient_with_nothing_wrong_writes_an_empty_report(tmp_path: Path) -> None:
    make_folder(tmp_path, "items", GOOD_ITEMS[1])
    report = tmp_path / "rejected.jsonl"
    ds = load_dataset(tmp_path, strict=False, report_path=report)
    assert ds.rejected == [] and ds.warnings == [] and report.read_text() == ""


def test_generic_conversions(tmp_path: Path) -> None:
    write_lines(
        tmp_path / "items.jsonl",
        [
            '{"id": 7, "title": "  Seven ", "category": "A > B", "attributes": {"n": 3, "ok": true}, '
            '"created_at": "2024-01-02T03:04:05", "in_stock": false, "price": 0}',
            "",
            "   ",
            '{"id": "x", "title": "Ex", "created_at": "2024-01-02T05:04:05+02:00", "brand": null}',
        ],
    )
    write_lines(
        tmp_path / "events.jsonl",
        ['{"user_id": 1, "item_id": 7, "timestamp": 0, "type": " Rating ", "value": 4}'],
    )
    ds = load_dataset(tmp_path)
    seven, ex = ds.items
    assert seven == Item(
        id="7",
        title="Seven",
        category=("A", "B"),
        attributes={"n": "3", "ok": "True"},
        created_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        in_stock=False,
        price=0.0,
    )
    assert ex.created_at == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC) and ex.brand == ""
    (ev,) = ds.interactions
    assert ev == Interaction(
        user_id="1",
        item_id="7",
        type=InteractionType.RATING,
        value=4.0,
        timestamp=datetime(1970, 1, 1, tzinfo=UTC),
    )
    assert ds.summary() == {"users": 1, "items": 2, "interactions": 1}


# --- CSV ----------------------------------------------------------------------------------------------------


def test_csv_line_numbers_count_the_header_and_multiline_cells(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text(
        'id,title,description,price\na,Alpha,"two\nlines",1\n\nb,Beta,,abc\n', encoding="utf-8"
    )
    with pytest.raises(LoadError) as info:
        load_dataset(tmp_path)
    assert (info.value.file, info.value.line, info.value.field) == ("items.csv", 5, "price")
    ds = load_dataset(tmp_path, strict=False)
    assert [it.description for it in ds.items] == ["two\nlines"]
    assert ds.rejected[0].raw == "b,Beta,,abc"


def test_csv_bad_encoding_and_cell_count(tmp_path: Path) -> None:
    lines: list[str | bytes] = ["id,title", "a,Alpha", "b,Caf\xe9".encode("latin-1"), "c,Gamma,extra"]
    write_lines(tmp_path / "items.csv", lines)
    ds = load_dataset(tmp_path, strict=False)
    assert [(r.line, r.problem.split(" (")[0]) for r in ds.rejected] == [
        (3, "is not valid UTF-8"),
        (4, "has 3 cells but the header has 2"),
    ]
    assert [it.id for it in ds.items] == ["a"]


def test_csv_strict_stops_at_the_first_bad_row_whatever_its_problem(tmp_path: Path) -> None:
    lines: list[str | bytes] = ["id,title,price", "a,Alpha,1", "b,Beta,abc", "c,Caf\xe9,1".encode("latin-1")]
    write_lines(tmp_path / "items.csv", lines)
    with pytest.raises(LoadError) as info:
        load_dataset(tmp_path)
    assert (info.value.line, info.value.field) == (3, "price")
    ds = load_dataset(tmp_path, strict=False)
    assert [(r.line, r.field) for r in ds.rejected] == [(3, "price"), (4, None)]


@pytest.mark.parametrize(
    ("header", "field", "words"),
    [
        ("id,title,colour", "colour", "unexpected column"),
        ("id,id,title", "id", "duplicate"),
        ("title", "id", "missing"),
    ],
)
def test_csv_header_problems_fail_the_file_in_both_modes(
    tmp_path: Path,
    header: str,
    field: str,
    words: str,
) -> None:
    (tmp_path / "items.csv").write_text(header + "\n", encoding="utf-8")
    for strict in (True, False):
        with pytest.raises(LoadError) as info:
            load_dataset(tmp_path, strict=strict)
        assert (info.value.file, info.value.line, info.value.field) == ("items.csv", 1, field)
        assert words in info.value.problem


def test_csv_text_values(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text(
        'id,title,category,price,attributes,in_stock\na,Alpha,A > B,2.5,"{""k"": 1}",no\n', encoding="utf-8"
    )
    (tmp_path / "events.csv").write_text("user_id,item_id,type,value,timestamp\nu,a,rating,4,1700000000\n")
    ds = load_dataset(tmp_path)
    assert ds.items == [
        Item(id="a", title="Alpha", category=("A", "B"), price=2.5, attributes={"k": "1"}, in_stock=False)
    ]
    assert ds.interactions[0].timestamp == datetime.fromtimestamp(1700000000, UTC)


# --- write_generic round-trips ----------------------------------------------------------------------------


def sample() -> tuple[list[Item], list[Interaction]]:
    items = [
        Item(
            id="p-1",
            title='Café "crème", 2 × 500 g ☕',
            category=("Food", "Coffee, Tea & Cocoa"),
            brand="Ünïcode",
            price=12.99,
            description="multi\nline, with commas",
            attributes={"roast": "dark", "origin": "Perú"},
            created_at=datetime(2024, 5, 1, 8, 30, 15, 123456, tzinfo=UTC),
            in_stock=False,
        ),
        Item(id="p-2", title="Plain"),
    ]
    events = [
        Interaction(
            user_id="u1",
            item_id="p-1",
            type=InteractionType.RATING,
            value=4.5,
            timestamp=items[0].created_at,
        ),
        Interaction(user_id="u1", item_id="p-2", type=InteractionType.CART, position=3),
        Interaction(user_id="u2", item_id="p-2", type=InteractionType.PURCHASE, value=2, position=0),
    ]
    return items, events


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_write_generic_round_trips(tmp_path: Path, fmt: str) -> None:
    items, events = sample()
    items_path, events_path = write_generic(items, events, tmp_path / "demo", fmt=fmt)
    assert (items_path.name, events_path.name) == (f"items.{fmt}", f"events.{fmt}")
    first = items_path.read_bytes() + events_path.read_bytes()
    ds = load_dataset(tmp_path / "demo")
    assert ds.name == "demo"
    assert ds.items == items and ds.interactions == events and ds.rejected == [] and ds.warnings == []
    write_generic(ds.items, ds.interactions, tmp_path / "demo", fmt=fmt)
    assert items_path.read_bytes() + events_path.read_bytes() == first  # deterministic


def test_write_generic_jsonl_is_sorted_utf8_and_refuses_mixed_formats(tmp_path: Path) -> None:
    items, events = sample()
    items_path, _ = write_generic(items, events, tmp_path)
    line = items_path.read_text(encoding="utf-8").splitlines()[0]
    assert list(json.loads(line)) == sorted(json.loads(line)) and "☕" in line
    with pytest.raises(ValueError, match="ambiguous"):
        write_generic(items, events, tmp_path, fmt="csv")


def test_docs_examples_load(tmp_path: Path) -> None:
    text = DOCS.read_text(encoding="utf-8")
    json_blocks = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    (csv_block,) = re.findall(r"```csv\n(.*?)```", text, flags=re.S)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "items.jsonl").write_text(json_blocks[0], encoding="utf-8")
    (tmp_path / "j" / "events.jsonl").write_text(json_blocks[1], encoding="utf-8")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "items.csv").write_text(csv_block, encoding="utf-8")
    ds_json, ds_csv = load_dataset(tmp_path / "j"), load_dataset(tmp_path / "c")
    assert ds_json.summary() == {"users": 1, "items": 2, "interactions": 2}
    assert ds_json.items == ds_csv.items


# --- layouts and detection ------------------------------------------------------------------------


def tiny_movielens(root: Path) -> Path:
    root.mkdir()
    flags = ["0"] * 19
    romance = flags.copy()
    romance[8], romance[14] = "1", "1"  # Drama, Romance
    (root / "u.item").write_bytes(
        "\n".join(
            [
                "1|Les Mis\xe9rables de test (1995)|01-Jan-1995||http://x|" + "|".join(romance),
                "2|Nameless||||" + "|".join(["1", *flags[1:]]),
            ]
        ).encode("latin-1")
        + b"\n"
    )
    (root / "u.data").write_text("7\t1\t5\t874724710\n8\t2\t3\t874724711\n")
    return root


def test_movielens_layout(tmp_path: Path) -> None:
    ds = load_dataset(tiny_movielens(tmp_path / "ml"))
    one, two = ds.items
    assert one.title == "Les Misérables de test (1995)"
    assert one.category == ("Drama",) and one.attributes == {"genres": "Drama, Romance", "year": "1995"}
    assert one.created_at == datetime(1995, 1, 1, tzinfo=UTC) and two.category == ("unknown",)
    assert any("u.genre is missing" in w for w in ds.warnings)
    assert ds.interactions[0] == Interaction(
        user_id="7",
        item_id="1",
        type=InteractionType.RATING,
        value=5.0,
        timestamp=datetime.fromtimestamp(874724710, UTC),
    )


def test_movielens_bad_rating_row(tmp_path: Path) -> None:
    root = tiny_movielens(tmp_path / "ml")
    with (root / "u.data").open("a") as f:
        f.write("9\t99\t4\t874724712\n")
    with pytest.raises(LoadError) as info:
        load_dataset(root)
    assert (info.value.file, info.value.line, info.value.field) == ("u.data", 3, "item_id")


def rec(title: str, brand: str, categories: str) -> dict[str, str]:
    return {"title": title, "description": "", "brand": brand, "categories": categories}


def tiny_lcrec(root: Path) -> Path:
    root.mkdir()
    items = {
        "0": rec("Pen &amp; cap", "Acme", "Shop, Tape, Glue & Clips, Tape, Duct"),
        "1": rec("", "Acme", "Shop, Tape, Glue & Clips, Glue"),
        "2": rec("Phone", "", "Shop, Phones & Parts, Cordless"),
        "3": rec("Lamp", "", "Lights, Desk & Floor"),
    }
    (root / "Shop.item.json").write_text(json.dumps(items, indent=4))
    (root / "Shop.inter.json").write_text(json.dumps({"0": [2, 0, 1], "1": [3, 0]}, indent=4))
    return root


def test_lcrec_layout(tmp_path: Path) -> None:
    ds = load_dataset(tiny_lcrec(tmp_path / "lc"))
    assert ds.name == "Shop" and ds.summary() == {"users": 2, "items": 4, "interactions": 5}
    pen, nameless, phone, lamp = ds.items
    assert pen.title == "Pen & cap"
    assert pen.category == ("Shop", "Tape, Glue & Clips", "Tape", "Duct")  # "A, B & C" re-joined
    assert phone.category == ("Shop", "Phones & Parts", "Cordless")
    assert lamp.category == ("Lights", "Desk & Floor")  # the top level is never joined
    assert nameless.title == "Acme Glue (item 1)"
    assert any("item '1' has an empty title" in w and "Acme Glue (item 1)" in w for w in ds.warnings)
    assert [(e.user_id, e.item_id, e.position, e.type) for e in ds.interactions[:3]] == [
        ("0", "2", 0, InteractionType.PURCHASE),
        ("0", "0", 1, InteractionType.PURCHASE),
        ("0", "1", 2, InteractionType.PURCHASE),
    ]


def test_lcrec_unknown_item_names_the_user_line(tmp_path: Path) -> None:
    root = tiny_lcrec(tmp_path / "lc")
    (root / "Shop.inter.json").write_text(json.dumps({"0": [0], "1": [3, 42]}, indent=4))
    with pytest.raises(LoadError) as info:
        load_lcrec(root)
    assert (info.value.file, info.value.line, info.value.field) == ("Shop.inter.json", 5, "item_id")
    assert "item '42'" in info.value.problem
    ds = load_lcrec(root, strict=False)
    assert len(ds.interactions) == 2 and len(ds.rejected) == 1


def test_detection_and_unknown_layout(tmp_path: Path) -> None:
    assert load_dataset(tiny_movielens(tmp_path / "ml")).name == "ml"
    assert load_dataset(tiny_lcrec(tmp_path / "lc")).name == "Shop"
    (tmp_path / "gen").mkdir()
    write_lines(tmp_path / "gen" / "items.jsonl", GOOD_ITEMS)
    gen = load_dataset(tmp_path / "gen")
    assert isinstance(gen, Dataset) and gen.interactions == [] and len(gen.items) == 3
    assert len(load_dataset(tmp_path / "gen" / "items.jsonl").items) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError) as info:
        load_dataset(tmp_path / "empty")
    assert all(s in str(info.value) for s in ("u.data", ".item.json", "items.jsonl", "items.csv"))
    with pytest.raises(LoadError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="valid formats"):
        load_dataset(tmp_path / "gen", fmt="parquet")
    with pytest.raises(LoadError, match="LC-Rec"):
        load_dataset(tmp_path / "gen", fmt="lcrec")


def test_load_generic_explicit_paths(tmp_path: Path) -> None:
    items = write_lines(tmp_path / "catalog.jsonl", GOOD_ITEMS)
    events = write_lines(tmp_path / "clicks.jsonl", GOOD_EVENTS)
    ds = load_generic(items, events, name="shop")
    assert ds.name == "shop" and ds.summary() == {"users": 2, "items": 3, "interactions": 3}


# --- the real datasets (../shared/data) -----------------------------------------------------------

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")


@pytest.mark.shared_data
@needs_shared
def test_movielens_100k_counts() -> None:
    ds = load_dataset(SHARED / "ml-100k")
    assert ds.summary() == {"users": 943, "items": 1682, "interactions": 100000}
    assert ds.rejected == []
    first = ds.items[0]
    assert (first.id, first.title) == ("1", "Toy Story (1995)")
    assert first.attributes["year"] == "1995"
    assert first.category == (first.attributes["genres"].split(", ")[0],)
    assert all(ev.type is InteractionType.RATING and ev.timestamp is not None for ev in ds.interactions)
    assert any(not t.isascii() for t in (it.title for it in ds.items))  # Latin-1 decoded, not mangled


@pytest.mark.shared_data
@needs_shared
def test_office_counts_titles_and_categories() -> None:
    folder = SHARED / "amazon-office-2014-5core"
    raw = json.loads((folder / "Office.item.json").read_text(encoding="utf-8"))
    ds = load_dataset(folder)
    assert ds.summary() == {"users": 4905, "items": 2420, "interactions": 53258}
    assert ds.rejected == []
    by_id = {it.id: it for it in ds.items}
    escaped = [k for k, v in raw.items() if "&amp;" in v["title"]]
    assert escaped and all(by_id[k].title == html.unescape(raw[k]["title"]).strip() for k in escaped)
    assert not any(re.search(r"&(amp|quot|reg|#\d+);", it.title) for it in ds.items)
    empty = [k for k, v in raw.items() if not v["title"].strip()]
    assert len([w for w in ds.warnings if "empty title" in w]) == len(empty) > 0
    assert all(by_id[k].title.endswith(f"(item {k})") for k in empty)
    # the top level is always the raw string's first fragment; full paths stay as distinct as the raw strings
    assert all(by_id[k].category[0] == html.unescape(v["categories"]).split(", ")[0] for k, v in raw.items())
    assert len({it.category for it in ds.items}) == len({v["categories"] for v in raw.values()})
    assert any(", " in level for it in ds.items for level in it.category)
    assert all(ev.type is InteractionType.PURCHASE and ev.position is not None for ev in ds.interactions)
