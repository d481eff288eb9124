import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataengine.core import columns as C
from dataengine.io import shard_plan
from dataengine.io.inputs import InputError, InputSpec, read_input_file, read_parquet_rows
from dataengine.io.shard_plan import plan_shards

ROWS = [("http://a/1.jpg", "a cat", "k1"), ("http://a/2.jpg", "two dogs", "k2"), (None, None, "k3"), ("", "", "k4")]


def _write_all_formats(tmp_path):
    urls, caps, ids = zip(*ROWS)
    pq.write_table(pa.table({"url": list(urls), "caption": list(caps), "key": list(ids)}), tmp_path / "in.parquet")
    with open(tmp_path / "in.jsonl", "w") as f:
        for u, c, k in ROWS:
            f.write(json.dumps({"url": u, "caption": c, "key": k}) + "\n")
    csv = "url,caption,key\n" + "".join(f'{u or ""},"{c or ""}",{k}\n' for u, c, k in ROWS)
    (tmp_path / "in.csv").write_text(csv)
    (tmp_path / "in.tsv").write_text(csv.replace(",", "\t").replace('"', ""))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "tsv"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    _write_all_formats(tmp_path)
    table = read_input_file(tmp_path / f"in.{fmt}", InputSpec(path=".", id_col="key"))
    assert table.column_names == [C.URL, C.CAPTION, C.SOURCE_ID, C.BOXES]
    assert table.column(C.SOURCE_ID).to_pylist() == ["k1", "k2", "k3", "k4"]
    assert table.column(C.BOXES).null_count == 4  # no boxes_col: null
    urls = table.column(C.URL).to_pylist()
    assert urls[:2] == ["http://a/1.jpg", "http://a/2.jpg"]
    assert urls[2] in (None, "") and urls[3] in (None, "")  # CSV cannot tell null from empty
    assert table.column(C.CAPTION).to_pylist()[1] == "two dogs"


def test_boxes_column_becomes_json_from_nested_parquet_and_jsonl(tmp_path):
    import json

    boxes = [[{"label": "dog", "box": [0.1, 0.2, 0.5, 0.9]}], None]
    pq.write_table(pa.table({"url": ["http://a/1", "http://a/2"], "caption": ["a", "b"], "objs": boxes}), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"url": "http://a/1", "caption": "a", "objs": b}) for b in boxes))
    for name in ("in.parquet", "in.jsonl"):
        table = read_input_file(tmp_path / name, InputSpec(path=".", boxes_col="objs"))
        values = table.column(C.BOXES).to_pylist()
        assert json.loads(values[0]) == boxes[0] and values[1] is None, name
    with pytest.raises(InputError, match="input.boxes_col: column 'nope' not found"):
        read_input_file(tmp_path / "in.parquet", InputSpec(path=".", boxes_col="nope"))


def test_missing_url_column_names_field_file_and_columns(tmp_path):
    pq.write_table(pa.table({"URL": ["x"], "caption": ["c"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError) as e:
        read_input_file(tmp_path / "in.parquet", InputSpec(path="."))
    assert "input.url_col: column 'url' not found" in str(e.value) and "['URL', 'caption']" in str(e.value)


def test_missing_caption_column_suggests_null(tmp_path):
    (tmp_path / "in.csv").write_text("url\nhttp://a/1.jpg\n")
    with pytest.raises(InputError, match="caption_col: null"):
        read_input_file(tmp_path / "in.csv", InputSpec(path="."))
    table = read_input_file(tmp_path / "in.csv", InputSpec(path=".", caption_col=None))
    assert table.column(C.CAPTION).to_pylist() == [None]


def test_no_files_and_unknown_extension(tmp_path):
    with pytest.raises(InputError, match="input.path: no input files match"):
        plan_shards(InputSpec(path=str(tmp_path / "nothing*.parquet")), tmp_path / "run")
    (tmp_path / "list.txt").write_text("url\n")
    with pytest.raises(InputError, match="input.format: cannot tell the format"):
        plan_shards(InputSpec(path=str(tmp_path / "list.txt")), tmp_path / "run")


def test_unparseable_file_is_a_clear_error(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"url": "http://a"}\n{not json\n')
    with pytest.raises(InputError, match=r"cannot read .*in.jsonl as jsonl"):
        read_input_file(tmp_path / "in.jsonl", InputSpec(path=".", caption_col=None))


def test_non_utf8_and_huge_captions_survive(tmp_path):
    huge = "word " * 200_000  # 1 MB
    (tmp_path / "in.csv").write_bytes(b"url,caption\nhttp://a/1.jpg,caf\xe9 \xff\xfe\nhttp://a/2.jpg," + huge.encode() + b"\n")
    table = read_input_file(tmp_path / "in.csv", InputSpec(path="."))
    caps = table.column(C.CAPTION).to_pylist()
    assert caps[0] == "caf\ufffd \ufffd\ufffd"
    assert caps[1].strip() == huge.strip()
    (tmp_path / "in.jsonl").write_bytes(b'{"url": "http://a/1.jpg", "caption": "bad \xff byte"}\n')
    table = read_input_file(tmp_path / "in.jsonl", InputSpec(path="."))
    assert table.column(C.CAPTION).to_pylist() == ["bad \ufffd byte"]


@pytest.mark.parametrize("in_task", [False, True], ids=["here", "in tasks"])
def test_plan_shards_assigns_stable_uids_and_marks_duplicate_ids(tmp_path, monkeypatch, request, in_task):
    if in_task:  # pieces of a few row groups, ids in many partitions: every step of the plan in tasks
        request.getfixturevalue("ray_local")
        monkeypatch.setattr(shard_plan, "PIECE_ROWS", 4)
        monkeypatch.setattr(shard_plan, "ID_PARTITION_ROWS", 1)
        monkeypatch.setattr(shard_plan, "SHARDS_PER_TASK", 2)
        monkeypatch.setattr(shard_plan, "SMALL_INPUT_BYTES", 0)
    pq.write_table(pa.table({"url": [f"http://a/{i}" for i in range(25)], "caption": ["c"] * 25,
                             "key": [f"k{i % 20}" for i in range(25)]}), tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(pa.table({"url": ["http://b/0"], "caption": ["c"], "key": ["k0"]}), tmp_path / "b.parquet")
    spec = InputSpec(path=str(tmp_path / "*.parquet"), id_col="key", shard_rows=10)
    shards = plan_shards(spec, tmp_path / "run", in_task=in_task)
    assert not (tmp_path / "run" / "_shards" / "_pieces").exists()
    assert [s.rows for s in shards] == [10, 10, 6]
    rows = pa.concat_tables([pq.read_table(s.path) for s in shards])
    uids = rows.column(C.UID).to_pylist()
    assert len(set(uids)) == 26 and uids[0] == "0000-0000000000" and uids[-1] == "0001-0000000000"
    reasons = dict(zip(uids, rows.column(C.REJECT_REASON).to_pylist()))
    duplicates = sorted(u for u, r in reasons.items() if r == "duplicate_id")
    # k0..k4 repeat at rows 20..24 of a.parquet, and k0 again in b.parquet
    assert duplicates == [f"0000-{i:010d}" for i in range(20, 25)] + ["0001-0000000000"]
    # a second plan reuses the first one, and a changed input is refused
    assert plan_shards(spec, tmp_path / "run") == shards
    pq.write_table(pa.table({"url": ["http://c"], "caption": ["c"], "key": ["z"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match="changed since"):
        plan_shards(spec, tmp_path / "run")


def test_empty_input_plans_no_shards(tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    assert plan_shards(InputSpec(path=str(tmp_path / "in.jsonl")), tmp_path / "run") == []
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), tmp_path / "e.parquet")
    assert plan_shards(InputSpec(path=str(tmp_path / "e.parquet")), tmp_path / "run2") == []


def test_parquet_rows_anywhere_in_a_file_read_as_the_whole_file_gives_them(tmp_path):
    n = 100
    pq.write_table(pa.table({"url": [f"http://a/{i}" for i in range(n)], "caption": [f"c{i}" for i in range(n)]}),
                   tmp_path / "a.parquet", row_group_size=7)
    spec = InputSpec(path=str(tmp_path))
    whole = read_input_file(tmp_path / "a.parquet", spec)
    for start, rows in [(0, 100), (0, 1), (5, 3), (6, 9), (13, 1), (50, 50), (99, 1), (14, 0)]:
        assert read_parquet_rows(tmp_path / "a.parquet", spec, start, rows) == whole.slice(start, rows)
    with pytest.raises(InputError, match="has 100 rows where the plan expects at least 101"):
        read_parquet_rows(tmp_path / "a.parquet", spec, 90, 11)
    with pytest.raises(InputError, match="input.caption_col: column 'text' not found"):
        read_parquet_rows(tmp_path / "a.parquet", InputSpec(path=".", caption_col="text"), 0, 1)


def test_parquet_without_ids_is_planned_from_footers_as_pointers_into_the_files(tmp_path):
    """No copy of the input: each shard is a pointer read by the task that runs it, with the same uids
    and rows a copied shard would have, shards running across file boundaries."""
    pq.write_table(pa.table({"url": [f"http://a/{i}" for i in range(25)], "caption": [f"a{i}" for i in range(25)]}),
                   tmp_path / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"url": ["http://b/0", "http://b/1"], "caption": ["b0", "b1"]}), tmp_path / "b.parquet")
    spec = InputSpec(path=str(tmp_path / "*.parquet"), shard_rows=10)
    shards = plan_shards(spec, tmp_path / "run")
    assert [s.rows for s in shards] == [10, 10, 7]
    assert [s.path.name for s in shards] == ["000000.json", "000001.json", "000002.json"]
    assert sorted(p.name for p in (tmp_path / "run" / "_shards").iterdir()) == ["000000.json", "000001.json",
                                                                              "000002.json", "plan.json"]
    rows = pa.concat_tables([shard_plan.read_shard(s.path) for s in shards])
    assert rows.column_names == [C.UID, C.URL, C.CAPTION, C.SOURCE_ID, C.BOXES, C.REJECT_STAGE, C.REJECT_REASON,
                                 C.SHARD]
    assert rows.column(C.UID).to_pylist() == [f"0000-{i:010d}" for i in range(25)] + ["0001-0000000000",
                                                                                        "0001-0000000001"]
    assert rows.column(C.CAPTION).to_pylist() == [f"a{i}" for i in range(25)] + ["b0", "b1"]
    assert rows.column(C.SHARD).to_pylist() == ["000000"] * 10 + ["000001"] * 10 + ["000002"] * 7
    assert rows.column(C.REJECT_REASON).null_count == 27
    for s in shards:
        assert shard_plan.shard_uids(s.path) == shard_plan.read_shard(s.path).column(C.UID).combine_chunks()
    assert plan_shards(spec, tmp_path / "run") == shards  # reused as written
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("a.parquet", "b.parquet"):
        (tmp_path / name).rename(moved / name)
    again = plan_shards(InputSpec(path=str(moved / "*.parquet"), shard_rows=10), tmp_path / "run")
    assert again == shards and pa.concat_tables([shard_plan.read_shard(s.path) for s in again]) == rows


def test_a_rewritten_file_is_never_read_from_the_row_group_a_process_kept(tmp_path):
    spec = InputSpec(path=str(tmp_path))
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"url": ["http://a/0", "http://a/1"], "caption": ["old", "old"]}), path)
    assert read_parquet_rows(path, spec, 1, 1).column(C.CAPTION).to_pylist() == ["old"]
    pq.write_table(pa.table({"url": ["http://a/0", "http://a/1", "http://a/2"], "caption": ["new"] * 3}), path)
    assert read_parquet_rows(path, spec, 1, 1).column(C.CAPTION).to_pylist() == ["new"]


def test_a_file_rewritten_with_the_same_size_and_mtime_is_not_read_from_the_kept_row_group(tmp_path):
    """Path, size and mtime alike (a rewrite within one mtime tick): the row group's footer entry differs."""
    import os

    spec = InputSpec(path=str(tmp_path))
    path = tmp_path / "a.parquet"

    def write(caption: str) -> None:
        pq.write_table(pa.table({"url": ["http://a/0", "http://a/1"], "caption": [caption] * 2}), path,
                       compression="none")

    write("old")
    stat = path.stat()
    assert read_parquet_rows(path, spec, 1, 1).column(C.CAPTION).to_pylist() == ["old"]
    write("new")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert read_parquet_rows(path, spec, 1, 1).column(C.CAPTION).to_pylist() == ["new"]


def test_one_uid_format_for_a_row_and_for_a_run_of_rows():
    row_uid = shard_plan.row_uid
    assert row_uid(3, 98) == "0003-0000000098"
    assert shard_plan._uids(3, 98, 4).to_pylist() == [row_uid(3, r) for r in range(98, 102)]
    assert shard_plan._uid_at((row_uid(3, 90), 8, 4), 2) == row_uid(3, 100)  # a piece from row 90, its range from offset 8
