"""nodes.common.safe_output_path: the one check every node that writes a user-named file goes through."""

from __future__ import annotations

import pytest
from ffprop.nodes.common import safe_output_path

BAD = [
    "", "   ", ".safetensors",                                  # empty
    "../../x", "..", "a/../../b", "./x", "a//b", "a/", "/x",     # traversal, empty parts, absolute
    "/etc/passwd", "C:/Windows/x", "C:x", "a\\b", "..\\..\\x",     # absolute, drives, backslashes
    ".hidden", "a/.git/config", "x.", "a /b", "a./b",            # hidden, Windows-stripped endings
    "con", "NUL", "com1.bak", "lpt9", "a/aux/b",                 # Windows device names
    "x\ny", "x\0y", "a*b", "a?b", "<x>", 'a"b', "a|b",          # characters no file system takes
    "x" * 201,                                                   # too long
]


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_and_nothing_is_created(tmp_path, name):
    root = tmp_path / "loras"
    root.mkdir()
    with pytest.raises(ValueError, match="is not allowed") as e:
        safe_output_path(root, name, ".safetensors")
    assert "letters, digits" in str(e.value), "the error says what to type instead"
    assert list(tmp_path.rglob("*")) == [root], "validation creates nothing"


@pytest.mark.parametrize("name, rel", [
    ("clip1", "clip1.safetensors"),
    ("  clip1  ", "clip1.safetensors"),
    ("clip1.safetensors", "clip1.safetensors"),                # the suffix is optional
    ("clip1.SAFETENSORS", "clip1.safetensors"),
    ("clip1.pt", "clip1.pt.safetensors"),                      # the suffix is forced
    ("my edits/v1.2/clip-1", "my edits/v1.2/clip-1.safetensors"),
    ("élan_2", "élan_2.safetensors"),
    ("x" * 200, "x" * 200 + ".safetensors"),
])
def test_good_names_stay_inside_the_folder(tmp_path, name, rel):
    path = safe_output_path(tmp_path, name, ".safetensors")
    assert path == tmp_path / rel
    assert path.resolve().is_relative_to(tmp_path.resolve())


def test_existing_file_is_versioned_or_overwritten_only_when_asked(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.safetensors").write_bytes(b"old")
    assert safe_output_path(tmp_path, "sub/a", ".safetensors") == tmp_path / "sub" / "a_2.safetensors"
    (tmp_path / "sub" / "a_2.safetensors").write_bytes(b"old 2")
    assert safe_output_path(tmp_path, "sub/a", ".safetensors") == tmp_path / "sub" / "a_3.safetensors"
    assert safe_output_path(tmp_path, "sub/a", ".safetensors", overwrite=True) == tmp_path / "sub" / "a.safetensors"
    assert (tmp_path / "sub" / "a.safetensors").read_bytes() == b"old", "choosing a path writes nothing"


def test_a_folder_of_that_name_is_an_error(tmp_path):
    (tmp_path / "a.safetensors").mkdir()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is a folder"):
            safe_output_path(tmp_path, "a", ".safetensors", overwrite)
