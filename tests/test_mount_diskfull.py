"""A full home disk under the mount, through a real kernel FUSE mount: the home lives on a
small tmpfs (96 MiB: room for everything once the filler goes), a filler file leaves 4 MiB,
and files larger than that are written.

What the mount shows must be what it stores: the blocks the cache directory has no room for
are held in the daemon's memory, served from there, refused by fsync (ENOSPC) and by
umount (exit 15, naming the file) while the disk is full, and stored once space is back
(docs/mount.md, "A full home disk"). Before this, the kernel's page cache kept serving the
bytes the daemon had refused, umount exited 0 after the space came back, and the stored
file was cut to 4 MiB. Root only (tmpfs); the vault helper is tests/test_mount.py's.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import needs_fuse
from test_mount import Vault

pytestmark = needs_fuse

MiB = 1024 * 1024


def _dropped(path: Path) -> bytes:
    """``path``'s bytes after dropping its pages from the kernel's page cache, so they come
    from the daemon rather than from pages the kernel kept."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path.read_bytes()


def test_a_full_home_disk_never_makes_the_mount_store_less_than_it_shows(tmp_path: Path):
    small = tmp_path / "home-fs"
    small.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(small)])
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    v = None
    try:
        (small / "v").mkdir()
        v = Vault(small / "v", remotes=[str(tmp_path / f"r{i}") for i in range(3)])
        v.mount()
        # stored before the disk fills: must come through whole
        before = os.urandom(3 * MiB + 12345)
        (v.mp / "before.bin").write_bytes(before)
        v.cli("flush", timeout=300)

        ref = os.urandom(8 * MiB)
        (tmp_path / "y.ref").write_bytes(ref)
        filler = small / "filler"
        avail = shutil.disk_usage(small).free
        subprocess.run(["fallocate", "-l", str(avail - 4 * MiB), str(filler)], check=True)

        # the writer of the review: cat into the mount, no fsync
        subprocess.run(["sh", "-c", f"cat {tmp_path / 'y.ref'} > {v.mp / 'y.bin'}"], check=True)
        # a patch into the middle of the stored file, and an fsync that cannot be kept
        patch = os.urandom(2 * MiB)
        fd = os.open(v.mp / "before.bin", os.O_WRONLY)
        try:
            os.pwrite(fd, patch, MiB // 2)
            with pytest.raises(OSError) as exc:
                os.fsync(fd)
            assert exc.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        want_before = before[: MiB // 2] + patch + before[MiB // 2 + len(patch) :]
        # a file written and then cut into the middle of a block the memory holds
        cut = os.urandom(3 * MiB)
        with open(v.mp / "cut.bin", "wb") as f:
            f.write(cut)
            f.flush()
            os.truncate(f.fileno(), 2 * MiB + 777)
        want_cut = cut[: 2 * MiB + 777]

        # what the mount shows is what the daemon holds, not pages the kernel kept
        assert _dropped(v.mp / "y.bin") == ref
        assert _dropped(v.mp / "before.bin") == want_before
        assert _dropped(v.mp / "cut.bin") == want_cut
        assert v.status()["mount"]["memory_blocks"] > 0
        assert "only in the mount daemon's memory" in " ".join(v.cli("status").stdout.split())

        res = v.cli("umount", str(v.mp), check=False, timeout=300)
        assert res.returncode == 15, res.stdout + res.stderr
        err = res.stderr
        assert "disk full" in err and "y.bin" in err and "memory" in err, err
        assert "Traceback" not in err
        assert os.path.ismount(v.mp)  # still mounted, still serving what it holds
        assert _dropped(v.mp / "y.bin") == ref

        filler.unlink()  # the user frees space, as told
        res = v.cli("umount", str(v.mp), check=False, timeout=300)
        assert res.returncode in (0, 3), res.stdout + res.stderr
        v.mount()
        assert (v.mp / "y.bin").stat().st_size == len(ref)
        assert _dropped(v.mp / "y.bin") == ref
        assert _dropped(v.mp / "before.bin") == want_before
        assert _dropped(v.mp / "cut.bin") == want_cut
    finally:
        if v is not None:
            v.cleanup()
        subprocess.run(["umount", "-l", str(small)])
