"""Restoring over a target that holds a symlink where a file goes: a clear refusal naming the
path, its target and what to do (exit 18), and the file the symlink points to untouched."""

from __future__ import annotations

from pathlib import Path

from helpers import run_cli


def test_restore_over_a_symlinked_file_is_refused_with_the_way_out(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli("init", "-k", "1", "-n", "2", "--remote", str(tmp_path / "r0"),
            "--remote", str(tmp_path / "r1"), home=home)  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("from the snapshot\n")
    run_cli("backup", str(src), home=home)
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    to = tmp_path / "to"
    (to / "src").mkdir(parents=True)
    (to / "src" / "f.txt").symlink_to(outside)
    res = run_cli("restore", "--to", str(to), "--force", home=home, check=18)
    said = res.stderr.decode()
    assert f"{to / 'src' / 'f.txt'} is a symlink (to {outside})" in said, said
    assert "Remove or rename it" in said and "Traceback" not in said
    assert "Too many levels" not in said
    assert outside.read_text() == "not yours\n"
