"""read_rows: every source type, with exact line/row locations for error messages."""
from __future__ import annotations

import json

import pytest

from posttrain.data.sources import read_rows
from posttrain.errors import DataError


def test_jsonl_blank_lines_and_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n\n')
    rows = read_rows(str(path))
    assert [r.data["text"] for r in rows] == ["a", "b"]
    assert [r.location for r in rows] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize("line, reason", [('{"text": "a",}', "not valid JSON"),
                                          ("[1, 2]", "expected a JSON object")])
def test_jsonl_bad_line_names_path_and_line(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n' + line + "\n")
    with pytest.raises(DataError) as info:
        read_rows(str(path))
    assert f"{path}:2" in str(info.value) and reason in str(info.value)


def test_jsonl_bad_lines_collected_when_asked(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\nnope\n{"text": "b"}\n')
    errors = []
    rows = read_rows(str(path), errors=errors)
    assert len(rows) == 2 and len(errors) == 1 and errors[0].location == f"{path}:2"


def test_json_list_and_wrapped_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    rows = read_rows(str(path))
    assert [r.location for r in rows] == [f"{path}:row 0", f"{path}:row 1"]
    path.write_text(json.dumps({"version": 1, "data": [{"text": "c"}]}))
    assert read_rows(str(path))[0].data == {"text": "c"}


def test_json_errors(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        read_rows(str(path))
    path.write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(DataError, match="exactly one list"):
        read_rows(str(path))
    path.write_text(json.dumps([{"text": "a"}, "b"]))
    with pytest.raises(DataError, match=rf"{path}:row 1: expected a JSON object"):
        read_rows(str(path))


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r.location for r in read_rows(str(path))] == [f"{path}:1", f"{path}:2"]


def test_csv_multiline_field_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"first line\nsecond line",pos\nplain,neg\n\nlast,pos\n')
    rows = read_rows(str(path))
    assert rows[0].data == {"text": "first line\nsecond line", "label": "pos"}
    assert [r.location for r in rows] == [f"{path}:2", f"{path}:4", f"{path}:6"]


def test_csv_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"a\nb",pos\nx,y,z\n')
    with pytest.raises(DataError, match=rf"{path}:4: has 3 fields, the header has 2"):
        read_rows(str(path))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), path)
    rows = read_rows(str(path))
    assert rows[1].data == {"text": "b", "label": 1} and rows[1].location == f"{path}:row 1"


def test_txt_splits(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("para one\nstill one\n\n\npara two\n  \nthree\n")
    by_paragraph = read_rows(str(path))
    assert [r.data["text"] for r in by_paragraph] == ["para one\nstill one", "para two", "three"]
    assert [r.location for r in by_paragraph] == [f"{path}:1", f"{path}:5", f"{path}:7"]
    by_line = read_rows(str(path), text_split="line")
    assert [r.location for r in by_line] == [f"{path}:{n}" for n in (1, 2, 5, 7)]
    whole = read_rows(str(path), text_split="file")
    assert len(whole) == 1 and whole[0].data["text"].startswith("para one") and whole[0].location == f"{path}:1"


def test_saved_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
    rows = read_rows(str(tmp_path / "ds"))
    assert [r.data["text"] for r in rows] == ["a", "b"] and rows[1].location == f"{tmp_path / 'ds'}:row 1"
    DatasetDict({"test": Dataset.from_list([{"text": "t"}]), "train": Dataset.from_list([{"text": "x"}])}
                ).save_to_disk(str(tmp_path / "dd"))
    assert [r.data["text"] for r in read_rows(str(tmp_path / "dd"))] == ["x"]
    DatasetDict({"only": Dataset.from_list([{"text": "o"}])}).save_to_disk(str(tmp_path / "one"))
    assert [r.data["text"] for r in read_rows(str(tmp_path / "one"))] == ["o"]


def test_folder_of_files(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    assert [r.data["text"] for r in read_rows(str(tmp_path))] == ["a", "b"]


def test_missing_file_unknown_type_and_hub_offline(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=rf"{tmp_path}/nope.jsonl: file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.xlsx' \(supported: .jsonl"):
        read_rows(str(tmp_path / "d.xlsx"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no-such-owner/no-such-data: not found locally and could not be loaded"):
        read_rows("no-such-owner/no-such-data")
