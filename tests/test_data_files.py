"""Tests of the atomic, marked dataset folders (``anomalib_moleflow.data.files``) and the ELPV writer that uses them."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_moleflow.data import elpv
from anomalib_moleflow.data.checks import DatasetError
from anomalib_moleflow.data.files import ForeignFolderError, atomic_folder, check_owned, read_marker, write_marker

MARKER = ".test.json"
PAYLOAD = {"format_version": 1, "config": {"seed": 0}}


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fill_then_fail(target: Path) -> None:
    with atomic_folder(target, MARKER, PAYLOAD) as folder:
        (folder / "new.png").write_bytes(b"half-written")
        raise RuntimeError("render failed")


def test_success_leaves_target_with_marker(tmp_path: Path) -> None:
    target = tmp_path / "root" / "wood"
    with atomic_folder(target, MARKER, PAYLOAD) as folder:
        assert folder.parent == target.parent
        assert folder.name.startswith(".")
        assert not target.exists()  # nothing under the final name while the folder is filled
        (folder / "train").mkdir()
        (folder / "train" / "000.png").write_bytes(b"image")
    assert read_marker(target, MARKER) == PAYLOAD
    assert (target / "train" / "000.png").read_bytes() == b"image"
    assert _tree(tmp_path / "root") == ["wood", f"wood/{MARKER}", "wood/train", "wood/train/000.png"]


def test_failure_leaves_no_target_and_no_temporary_folder(tmp_path: Path) -> None:
    target = tmp_path / "wood"
    with pytest.raises(RuntimeError, match="render failed"):
        _fill_then_fail(target)
    assert not target.exists()
    assert _tree(tmp_path) == []


def test_failure_keeps_the_previous_folder(tmp_path: Path) -> None:
    target = tmp_path / "wood"
    target.mkdir()
    (target / "old.png").write_bytes(b"old")
    write_marker(target, MARKER, {"config": {"seed": 1}})
    with pytest.raises(RuntimeError, match="render failed"):
        _fill_then_fail(target)
    assert _tree(tmp_path) == ["wood", f"wood/{MARKER}", "wood/old.png"]
    assert read_marker(target, MARKER) == {"config": {"seed": 1}}


def test_own_folder_with_other_payload_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "wood"
    target.mkdir()
    (target / "stale.png").write_bytes(b"stale")
    write_marker(target, MARKER, {"config": {"seed": 1}})
    with atomic_folder(target, MARKER, PAYLOAD) as folder:
        (folder / "new.png").write_bytes(b"new")
    assert _tree(tmp_path) == ["wood", f"wood/{MARKER}", "wood/new.png"]  # no backup or temporary folder left
    assert read_marker(target, MARKER) == PAYLOAD


def test_folder_written_meanwhile_with_same_payload_is_kept(tmp_path: Path) -> None:
    """Two runs generating one category at once: the one finishing second must not pull the folder from under the
    first, which may already be reading it."""
    target = tmp_path / "wood"
    with atomic_folder(target, MARKER, PAYLOAD) as folder:
        (folder / "second.png").write_bytes(b"second")
        target.mkdir()  # the first run finishes while the second is still filling its folder
        (target / "first.png").write_bytes(b"first")
        write_marker(target, MARKER, PAYLOAD)
    assert (target / "first.png").read_bytes() == b"first"
    assert _tree(tmp_path) == ["wood", f"wood/{MARKER}", "wood/first.png"]  # kept; no temporary folder left
    assert read_marker(target, MARKER) == PAYLOAD


@pytest.mark.parametrize("marker_text", [None, "not json"])
def test_foreign_folder_is_left_untouched(tmp_path: Path, marker_text: str | None) -> None:
    target = tmp_path / "pill"
    target.mkdir()
    (target / "user.png").write_bytes(b"user data")
    if marker_text is not None:
        (target / MARKER).write_text(marker_text)
    before = _tree(tmp_path)
    ran = False
    with pytest.raises(ForeignFolderError) as info, atomic_folder(target, MARKER, PAYLOAD):
        ran = True
    assert not ran
    assert isinstance(info.value, FileExistsError)
    assert isinstance(info.value, DatasetError)
    assert str(target) in str(info.value)
    assert "root" in str(info.value)
    assert _tree(tmp_path) == before
    assert (target / "user.png").read_bytes() == b"user data"


def test_foreign_file_is_left_untouched(tmp_path: Path) -> None:
    target = tmp_path / "pill"
    target.write_text("a file, not a folder")
    with pytest.raises(ForeignFolderError, match="pill"):
        check_owned(target, MARKER)
    assert target.read_text() == "a file, not a folder"


def test_read_marker(tmp_path: Path) -> None:
    assert read_marker(tmp_path, MARKER) is None
    assert read_marker(tmp_path / "missing", MARKER) is None
    path = write_marker(tmp_path, MARKER, PAYLOAD)
    assert path == tmp_path / MARKER
    assert read_marker(tmp_path, MARKER) == PAYLOAD
    check_owned(tmp_path, MARKER)
    check_owned(tmp_path / "missing", MARKER)


def _fake_elpv_source(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    lines = []
    for index in range(8):
        name = f"images/cell{index:04d}.png"
        (folder / name).write_bytes(f"cell {index}".encode())
        lines.append(f"{name} {1.0 if index >= 6 else 0.0} mono")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_elpv_writer_refuses_foreign_folder(tmp_path: Path) -> None:
    source = _fake_elpv_source(tmp_path / "source")
    root = tmp_path / "data"
    (root / "mono").mkdir(parents=True)
    (root / "mono" / "mine.txt").write_text("keep me")
    split = elpv.ElpvSplit(n_train=4, n_test_good=2, n_test_defect=2)
    with pytest.raises(ForeignFolderError, match="mono"):
        elpv.write_elpv_category(root, "mono", split, source)
    assert _tree(root) == ["mono", "mono/mine.txt"]

    target = elpv.write_elpv_category(tmp_path / "fresh", "mono", split, source)
    assert len(list((target / "train" / "good").iterdir())) == 4
    assert len(list((target / "test" / "good").iterdir())) == 2
    assert len(list((target / "test" / "defect").iterdir())) == 2
    assert read_marker(target, elpv.MARKER_NAME)["split"]["n_train"] == 4
    # Its own folder, written with other settings, is rewritten.
    elpv.write_elpv_category(tmp_path / "fresh", "mono", elpv.ElpvSplit(n_train=3, n_test_good=1), source)
    assert len(list((target / "train" / "good").iterdir())) == 3
    assert _tree(tmp_path / "fresh")[0] == "mono"
    assert len(list((tmp_path / "fresh").iterdir())) == 1
