"""A pyfuse3 file system that accepts writes and discards them: the ceiling any Python FUSE
file system can reach on this machine (same pyfuse3, trio and writeback cache as vaultfs).

It does not implement ``getxattr``, so the kernel stops asking for ``security.capability``
before every ``write(2)`` (docs/mount.md, "Performance"); vaultfs, which keeps real extended
attributes, gets the same by negotiating FUSE_HANDLE_KILLPRIV_V2.

Usage: ``python -m bench.nullfs MOUNTPOINT`` (serves until ``fusermount3 -u``).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time

import pyfuse3
import trio


class NullFS(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[bytes, int] = {}
        self.sizes: dict[int, int] = {}
        self.next_ino = 2

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o755) if ino == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644)
        a.st_nlink = 1
        a.st_size = self.sizes.get(ino, 0)
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.entry_timeout = a.attr_timeout = 60
        a.st_blksize = 128 * 1024
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = time.time_ns()
        return a

    async def getattr(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE and inode not in self.sizes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx):
        if name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self.names[name])

    async def create(self, parent_inode, name, mode, flags, ctx):
        ino = self.next_ino
        self.next_ino += 1
        self.names[name] = ino
        self.sizes[ino] = 0
        return pyfuse3.FileInfo(fh=ino), self._attr(ino)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            self.sizes[inode] = attr.st_size
        return self._attr(inode)

    async def write(self, fh, off, buf):
        self.sizes[fh] = max(self.sizes[fh], off + len(buf))
        return len(buf)

    async def read(self, fh, off, size):
        return bytes(max(0, min(size, self.sizes[fh] - off)))

    async def unlink(self, parent_inode, name, ctx):
        self.sizes.pop(self.names.pop(name, 0), None)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        items = sorted(self.names.items())
        for i in range(start_id, len(items)):
            name, ino = items[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                break

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30
        s.f_files = s.f_ffree = s.f_favail = 1 << 20
        s.f_namemax = 255
        return s


def main() -> None:
    pyfuse3.init(NullFS(), sys.argv[1], set(pyfuse3.default_options) | {"fsname=nullfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
