"""`mount.vaultfs`: the helper mount(8) runs for an /etc/fstab line (or a systemd .mount
unit) of type ``vaultfs`` (docs/operations.md, "The mount as a service").

mount(8) calls ``mount.vaultfs SPEC DIR [-sfnv] [-o OPTIONS]``: SPEC is the vault's home
directory, DIR the mountpoint. Our options: ``passphrase_file=PATH`` (its first line is the
passphrase; else $VAULTFS_PASSPHRASE) and ``cache_size=SIZE`` (as `vaultfs mount
--cache-size`). The generic fstab options (defaults, rw, auto, noauto, user, users, nouser,
owner, group, _netdev, nofail, x-*, comment=*) are mount(8)'s and systemd's business and
ignored here; anything else is refused. Exit codes follow mount(8): 0 mounted, 1 bad usage,
32 the mount failed (the reason on stderr).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vaultfs.selfexec import cli_argv

USAGE = "usage: mount.vaultfs HOME MOUNTPOINT [-sfnv] [-o passphrase_file=F,cache_size=S,...]"
GENERIC = {"defaults", "rw", "auto", "noauto", "user", "users", "nouser", "owner", "group",
           "_netdev", "nofail", "exec", "noexec", "suid", "nosuid", "dev", "nodev"}  # fmt: skip
EXIT_USAGE = 1
EXIT_FAILED = 32


def parse(argv: list[str]) -> tuple[str, str, dict[str, str], bool]:
    """(home, mountpoint, our options, fake) from mount(8)'s arguments; ValueError if bad."""
    pos: list[str] = []
    opts: list[str] = []
    fake = False
    it = iter(argv)
    for a in it:
        if a in ("-o", "-t", "-N"):
            value = next(it, None)
            if value is None:
                raise ValueError(f"{a} needs a value")
            if a == "-o":
                opts += value.split(",")
        elif a.startswith("-") and len(a) > 1:
            if set(a[1:]) - set("sfnv"):
                raise ValueError(f"unknown flag {a}")
            fake |= "f" in a
        else:
            pos.append(a)
    if len(pos) != 2:
        raise ValueError("give the vault's home and the mountpoint")
    ours: dict[str, str] = {}
    for o in filter(None, opts):
        key, _, value = o.partition("=")
        if key in ("passphrase_file", "cache_size"):
            if not value:
                raise ValueError(f"{key} needs a value")
            ours[key] = value
        elif key not in GENERIC and not key.startswith("x-") and key != "comment":
            raise ValueError(f"unknown option {o!r}")
    return pos[0], pos[1], ours, fake


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mount.vaultfs` console script."""
    try:
        home, mountpoint, opts, fake = parse(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"mount.vaultfs: {e}\n{USAGE}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    env = dict(os.environ)
    if "passphrase_file" in opts:
        try:
            lines = Path(opts["passphrase_file"]).read_text().splitlines()
        except OSError as e:
            print(f"mount.vaultfs: cannot read the passphrase file: {e}", file=sys.stderr)
            sys.exit(EXIT_FAILED)
        env["VAULTFS_PASSPHRASE"] = lines[0] if lines else ""
    elif "VAULTFS_PASSPHRASE" not in env:  # mount(8) gives no terminal to ask on
        print(
            "mount.vaultfs: no passphrase: add passphrase_file=PATH (its first line, mode 600)"
            " to the options, or set VAULTFS_PASSPHRASE",
            file=sys.stderr,
        )
        sys.exit(EXIT_FAILED)
    if fake:
        sys.exit(0)
    cmd = cli_argv("mount", "--home", home, mountpoint)
    if "cache_size" in opts:
        cmd[-1:-1] = ["--cache-size", opts["cache_size"]]
    res = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL)
    sys.exit(0 if res.returncode == 0 else EXIT_FAILED)


if __name__ == "__main__":
    main()
