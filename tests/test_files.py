"""unimedi_jax.files: the checked JSON read and the atomic write."""

import json

import pytest

from unimedi_jax import files


def test_read_json_names_the_file_and_what_is_wrong(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": 1, "b": [2]}))
    assert files.read_json(good, ("a", "b"), what="run config") == {"a": 1, "b": [2]}
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,')
    with pytest.raises(ValueError, match=r"run config .*bad\.json is not valid JSON"):
        files.read_json(bad, what="run config")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json holds a JSON list, not an object"):
        files.read_json(listed)
    with pytest.raises(ValueError, match=r"good\.json lacks required key\(s\) \['c'\]"):
        files.read_json(good, ("a", "c"))


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.txt"
    files.write_text(path, "old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        files.atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind
