"""The mount daemon: open the vault, check the mountpoint, mount, serve, shut down cleanly.

`vaultfs mount` (without --foreground) starts this in a new session and waits on a pipe
until it reports ``ok <pid>`` (mounted and serving) or ``err <exit code> <message>``.

Crash handling: the daemon never uses libfuse's auto_unmount, so after ``kill -9`` the
mountpoint answers ENOTCONN ("Transport endpoint is not connected") instead of looking like
an empty directory. The next mount lazily unmounts such a dead mount (``fusermount3 -u -z``)
and recovers: the engine reconciles its queue (Vault.recover), the live tree is read from
the index and every cache file left behind becomes a dirty block again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError, TargetNotEmpty, VaultBusy, VaultError
from .readcache import DEFAULT_READ_CACHE_SIZE
from .selfexec import cli_argv, leave_cwd

log = logging.getLogger("vaultfs.daemon")

DEFAULT_CACHE_SIZE = 1024 * 1024 * 1024


def is_dead_mount(mp: Path) -> bool:
    """True if ``mp`` is a FUSE mount whose daemon is gone. Probes with opendir: the kernel
    may answer stat from cached attributes even after the connection died."""
    try:
        os.listdir(mp)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def in_mount_table(mp: Path) -> bool:
    """True while a vaultfs FUSE mount is attached at ``mp`` (a path without symlinks, as the
    kernel shows it) in this process's mount namespace. Read from the mount table, not by a stat of ``mp``, which the
    daemon would have to answer itself; a lazy unmount (``fusermount3 -u -z``) removes the
    entry at once while open files keep the connection."""
    want = str(mp)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return True  # no mount table to read: assume attached (never stop on a guess)
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or rest.split(" ", 1)[0] != "fuse.vaultfs":
            continue
        # mountinfo escapes space, tab, newline and backslash in octal (\040 ...)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        if point == want:
            return True
    return False


def path_exists(mp: Path) -> bool:
    """Like os.path.lexists, but a dead mount (ENOTCONN) exists."""
    try:
        os.lstat(mp)
    except OSError as e:
        return e.errno != errno.ENOENT
    return True


def check_mountpoint(mp: Path) -> None:
    """Refuse a missing, non-directory, non-empty or already mounted mountpoint; clean up a
    dead vaultfs mount (ENOTCONN) left by a crashed daemon."""
    try:
        if is_dead_mount(mp):
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        st = os.stat(mp)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            log.warning("%s is a dead mount (daemon crashed): unmounting it", mp)
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
            try:
                st = os.stat(mp)
            except OSError as e2:
                raise InputError(
                    f"{mp} is a dead mount that could not be cleaned up ({e2.strerror}); "
                    f"run `fusermount3 -u -z {mp}`"
                ) from None
        elif e.errno == errno.ENOENT:
            raise InputError(f"mountpoint {mp} does not exist: create an empty directory") from None
        else:
            raise InputError(f"cannot use mountpoint {mp}: {e.strerror}") from None
    import stat as stat_mod

    if not stat_mod.S_ISDIR(st.st_mode):
        raise InputError(f"mountpoint {mp} is not a directory")
    if os.path.ismount(mp):
        raise VaultBusy(f"{mp} is already a mount point: unmount it first")
    if os.listdir(mp):
        raise TargetNotEmpty(
            f"mountpoint {mp} is not empty: mount on an empty directory (nothing is hidden)"
        )


#: The daemon's GIL switch interval, seconds (Python's default is 0.005): how long the FUSE
#: loop may wait for the GIL while a worker thread computes. At 5 ms a `cp -a` of small files
#: spent most of its time in `utimensat` (which writes the file's dirty pages back first).
SWITCH_INTERVAL = 0.0002

#: Nice value of the FUSE daemon's threads (not the sealer processes), when allowed (root or
#: CAP_SYS_NICE). Every process using the mount waits on the FUSE loop: on a busy machine each
#: request otherwise waits its turn for a CPU behind the very processes it serves. JuiceFS
#: does the same (-19).
DAEMON_NICE = -19


def raise_priority(nice: int = DAEMON_NICE) -> None:
    """Give the calling thread, and the threads it starts from now on, priority ``nice``;
    silently keep the default where not allowed."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # Linux: this thread; new threads inherit it
    except OSError:
        log.debug("running at the default priority")


def check_allow_other(conf: Path = Path("/etc/fuse.conf")) -> None:
    """Raise InputError if ``--allow-other`` cannot work: fusermount3 lets a user other than
    root pass ``allow_other`` only when ``user_allow_other`` is in /etc/fuse.conf."""
    if os.geteuid() == 0:
        return
    try:
        lines = conf.read_text().splitlines()
    except OSError:
        lines = []
    if "user_allow_other" not in (line.split("#", 1)[0].strip() for line in lines):
        raise InputError(
            f"--allow-other needs a line `user_allow_other` in {conf} (as root), or mount as root"
        )


def run_foreground(
    home: Path,
    mountpoint: Path,
    cache_size: int,
    passphrase: str,
    ready_fd: int | None,
    read_cache_size: int = DEFAULT_READ_CACHE_SIZE,
    allow_other: bool = False,
) -> int:
    """Mount and serve until unmounted. Returns the exit code. ``allow_other`` lets every
    user of the machine in, the kernel checking modes (``default_permissions``)."""
    import pyfuse3
    import trio

    from . import control, maintenance, routine
    from .fs import VaultFS
    from .vault import Vault

    def report(msg: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, (msg + "\n").encode())
                os.close(ready_fd)
            except OSError:
                pass

    mountpoint = Path(os.path.abspath(mountpoint))
    home = Path(os.path.abspath(home))
    leave_cwd()  # before any thread: nothing after this depends on where it was started
    real_mountpoint = Path(os.path.realpath(mountpoint))  # before it is mounted: no FUSE call
    try:
        if not path_exists(mountpoint):
            raise InputError(f"mountpoint {mountpoint} does not exist: create an empty directory")
        if allow_other:
            check_allow_other()
        vault = Vault.open(home, passphrase)
        # fork the sealers now: before the FUSE device is open and any thread runs, so no
        # sealer holds /dev/fuse (a dead daemon must leave ENOTCONN) or a lock mid-call
        vault.start_sealers()
        raise_priority()  # after the fork: the sealers keep the normal priority
        # a worker thread holding the GIL (storing a block, decrypting a chunk) makes the FUSE
        # loop wait up to the switch interval for it: 5 ms by default, per request
        sys.setswitchinterval(SWITCH_INTERVAL)
    except VaultError as e:
        report(f"err {e.exit_code} {e.message}")
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code
    fs = None
    server = None
    runner = None
    routine_stop = None
    mounted = False
    clean = False
    try:
        try:
            check_mountpoint(mountpoint)
            # before mounting: a control directory we cannot trust is a clean error here
            addresses = [control.home_address(home), control.mount_address(mountpoint)]
            fs = VaultFS(vault, home, mountpoint, cache_size, read_cache_size)
            info = fs.load()
            log.info(
                "live tree: %(inodes)d inodes; recovered %(recovered_bytes)d dirty bytes", info
            )
            options = set(pyfuse3.default_options)
            options |= {"fsname=vaultfs", "subtype=vaultfs"}
            if allow_other:
                options.add("allow_other")
            pyfuse3.init(fs, str(mountpoint), options)
            mounted = True
        except VaultError as e:
            report(f"err {e.exit_code} {e.message}")
            print(f"error: {e.message}", file=sys.stderr)
            return e.exit_code
        except RuntimeError as e:
            msg = f"mounting {mountpoint} failed: {e} (is /dev/fuse available?)"
            report(f"err 1 {msg}")
            print(f"error: {msg}", file=sys.stderr)
            return 1

        def hold_references():
            release = trio.from_thread.run(fs.hold_references, trio_token=fs.token)
            return lambda: trio.from_thread.run_sync(release.set, trio_token=fs.token)

        def delete_snapshots(uids: list[str]) -> dict:
            return trio.from_thread.run(_delete_snapshots, fs, uids, trio_token=fs.token)

        runner = maintenance.Runner(
            vault,
            home,
            hold_references,
            fs.foreground_busy,
            lambda: routine.load_schedule(home),
            delete_snapshots,
        )

        def attached() -> bool:
            """False once a lazy unmount has detached the mount (files still open there)."""
            return in_mount_table(real_mountpoint)

        def dispatch(req: dict) -> dict:
            assert routine_stop is not None  # started before the control server
            # detached (a lazy unmount) or unmounting: no new work, as the routine takes none
            if req.get("cmd") in NEW_WORK and (routine_stop.is_set() or not attached()):
                raise _ending(mountpoint, req)
            if req.get("cmd") == "job":  # long: waits here, in the control handler's thread
                job, args = str(req.get("job")), req.get("args") or {}
                return {"result": runner.run(job, args, req.get("progress"))}
            if req.get("cmd") == "ls":  # reads the index here, off the FUSE loop
                return _ls(vault, req)
            if req.get("cmd") == "run":  # `vaultfs run`: a pass as the routine's own makes
                return {"pass": routine.run_pass(home, vault, mounted=True, stop=routine_stop)}
            reply = trio.from_thread.run(_handle, fs, req, trio_token=fs.token)
            # detached: `status`, `umount`, `mount` and `flush` say so instead of "mounted at"
            if req.get("cmd") == "ping":
                reply["detached"] = not attached()
            elif req.get("cmd") == "status":
                reply["mount"]["maintenance"] = runner.current
                reply["mount"]["detached"] = not attached()
            elif req.get("cmd") == "umount":  # what the daemon finishes before it exits
                reply["maintenance"] = runner.current
                reply["home"] = str(home)  # its mount.json says what it finishes later on
            return reply

        def start_control(fs_) -> None:
            nonlocal server, routine_stop
            # the routine runs while the mount is up, and stops with it (also when detached)
            routine_stop = routine.serve_mounted(home, vault, attached)
            server = control.ControlServer(addresses, dispatch)

        def ready() -> None:
            state = {"pid": os.getpid(), "mountpoint": str(mountpoint), "started": time.time()}
            (home / "mount.json").write_text(json.dumps(state))
            report(f"ok {os.getpid()}")
            log.info("mounted %s", mountpoint)

        trio.run(fs.run, ready, start_control)
        clean = True
        return 0
    finally:
        if routine_stop is not None:
            routine_stop.set()
        if server is not None:
            server.close()
        if runner is not None:
            # the vault stays locked until the job ends and the uploads under way are done:
            # `umount` and a refused `mount` (vault/home.py) say so from mount.json
            _finishing(home, runner.current)
            runner.close()  # a running job ends before the vault closes
            _finishing(home, None)
        if mounted:
            pyfuse3.close(unmount=not clean)
        try:
            vault.close()  # waits for the uploads under way, then frees the vault's lock
        finally:
            _forget_mount(home)
            log.info("daemon exiting")


#: The control commands that start new work, refused once the mount is ending (detached by a
#: lazy unmount, or unmounted): what each of them does not do then.
NEW_WORK = {"run": "routine pass", "snapshot": "snapshot", "delete": "snapshot delete", "job": ""}


def _ending(mountpoint: Path, req: dict) -> VaultBusy:
    """Why a mount that is ending refuses ``req`` (a :data:`NEW_WORK` command). Detached by a
    lazy unmount while files there stay open, its tree is one nobody sees and files still
    open may change it: its routine stops (vaultfs/routine.py), and so does the work commands
    send, which all work unmounted once the daemon has stored what those files wrote and
    exited. `flush` is not refused: it only stores and uploads what was written."""
    what = NEW_WORK[str(req.get("cmd"))] or f"{req.get('job')} job"
    return VaultBusy(
        f"the mount at {mountpoint} is ending (detached by a lazy unmount while files there "
        f"stay open, or unmounted): its daemon (pid {os.getpid()}) serves the files still "
        f"open, then stores what they wrote and exits, and takes no new work (no {what}). "
        "Close those files; once its daemon has exited (`vaultfs status` says so until "
        "then), run this again: it then works unmounted"
    )


def _finishing(home: Path, job: dict | None) -> None:
    """Record in HOME/mount.json that the daemon is unmounted and finishing: ``job`` (the
    maintenance job it waits for, {"job", "started"}) or None (the uploads under way). The
    file goes when the daemon has closed the vault."""
    path = home / "mount.json"
    try:
        state = json.loads(path.read_text())
        state["finishing"] = {"since": time.time(), "job": job}
        tmp = path.with_name("mount.json.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
    except (OSError, ValueError):  # not written (never mounted): nothing to say
        pass


def _forget_mount(home: Path) -> None:
    """Remove HOME/mount.json if this daemon wrote it (a new mount may own it already: the
    lock is free by now)."""
    path = home / "mount.json"
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _ls(vault, req: dict) -> dict:
    """`vaultfs ls` of the mounted vault (no passphrase): the snapshot's uid, the note on a
    shared name, and its rows in parts (vaultfs/control.py), the same rows the command
    reads unmounted (snapshots.listed)."""
    from .index import snapshots

    ref, path = req.get("snapshot"), req.get("path")
    if not isinstance(ref, str) or not (path is None or isinstance(path, str)):
        raise InputError("an ls request names a snapshot and a path (strings)")
    uid, note, rows = snapshots.listed(vault.index, ref, path)
    return {"snapshot": uid, "note": note, "parts": _ls_parts(rows)}


def _ls_parts(rows: list[tuple]) -> Iterator[list[list]]:
    """``rows`` as JSON in parts of about control.PART_SIZE characters. Names go in
    file-system form: bytes that are not UTF-8 as lone surrogates, which JSON carries as
    ``\\udcXX`` and names.from_db turns back into the same bytes."""
    from . import control, names

    part: list[list] = []
    size = 0
    for path, typ, mode, length, mtime_ns, target, rdev in rows:
        p = names.fs_path(path)
        t = None if target is None else names.fs_path(target)
        part.append([p, typ, mode, length, mtime_ns, t, rdev])
        size += 100 + 12 * (len(p) + len(t or ""))  # 12: an escaped surrogate pair
        if size >= control.PART_SIZE:
            yield part
            part, size = [], 0
    if part:
        yield part


async def _handle(fs, req: dict) -> dict:
    cmd = req.get("cmd")
    if cmd == "ping":
        return {"pid": os.getpid(), "mountpoint": str(fs.mountpoint)}
    if cmd == "status":  # what `vaultfs status` shows, so it needs no passphrase mounted
        import trio

        st = await trio.to_thread.run_sync(_vault_status, fs)
        return {"status": st, "mount": fs.mount_status()}
    if cmd == "snapshots":  # `vaultfs snapshots` on a mounted vault (no passphrase)
        import trio

        from .index import snapshots

        return {"snapshots": await trio.to_thread.run_sync(snapshots.listing, fs.vault.index)}
    if cmd == "flush":
        await fs.freeze()
        try:
            await fs.drain()
        finally:
            fs.thaw()
        rep = await fs.push(seal=True)
        return {"report": await _report(fs, rep)}
    if cmd == "snapshot":
        uid, seq, count = await fs.snapshot(req.get("name"), bool(req.get("fork")))
        rep = await fs.push(seal=True)
        return {"snapshot": uid, "seq": seq, "entries": count, "report": await _report(fs, rep)}
    if cmd == "delete":  # "id": a snapshot id or name, like every command takes
        from .index import snapshots

        found = snapshots.require(fs.vault.index, str(req.get("id")), unique=True)
        seq = await fs.delete_snapshot(found[1])
        rep = await fs.push(seal=True)
        return {"seq": seq, "snapshot": found[1], "report": await _report(fs, rep)}
    if cmd == "umount":
        rep = await fs.prepare_umount()
        return {"report": await _report(fs, rep)}
    raise InputError(f"unknown control command {cmd!r}")


def _vault_status(fs) -> dict:
    """`vaultfs status`'s report of the mounted vault (the mount's own state aside)."""
    from . import routine
    from .index import manifests
    from .manifest import Link

    v = fs.vault
    st = v.status()
    st["routine"] = routine.report(fs.home, v)
    link = manifests.newest_link(v.index)
    st |= Link(*link).as_json() if link else {"seq": 0, "manifest_hash": None}
    st["fork"] = manifests.fork_seen(v.index)
    return st


async def _delete_snapshots(fs, uids: list[str]) -> dict:
    """Forget the snapshots ``uids`` through the mount (`forget` in the daemon), then upload
    once; the flush's report (:func:`_report`). One already gone is passed over (a `forget`
    or `snapshot delete` of its own got there first)."""
    from .index import snapshots

    for uid in uids:
        if snapshots.find(fs.vault.index, uid) is not None:
            await fs.delete_snapshot(uid)
    rep = await fs.push(seal=True)
    return await _report(fs, rep)


async def _report(fs, rep) -> dict:
    import trio

    from .index import manifests

    st = await trio.to_thread.run_sync(fs.vault.status)
    link = manifests.newest_link(fs.vault.index)
    return {
        "manifest_hash": link[1].hex()[:16] if link else None,
        "stale_base": rep.stale_base,
        "uploaded": rep.uploaded,
        "pending": rep.pending,
        "errors": rep.errors,
        "complete": rep.complete,
        "segments_below_k_placed": st["segments_below_k_placed"],
        "survives_losses_now": st["survives_losses_now"],
        "survives_losses_design": st["survives_losses_design"],
    }


def spawn(
    home: Path,
    mountpoint: Path,
    cache_size: int,
    passphrase: str,
    timeout: float = 120.0,
    read_cache_size: int = DEFAULT_READ_CACHE_SIZE,
    allow_other: bool = False,
) -> int:
    """Start the daemon in its own session and wait until it is mounted. Returns its pid;
    raises the daemon's error (same message and exit code) if it could not mount."""
    r, w = os.pipe()
    home.mkdir(parents=True, exist_ok=True)
    logf = open(home / "mount.log", "ab")  # noqa: SIM115
    cmd = cli_argv("mount", "--foreground", "--home", str(home))
    cmd += ["--cache-size", str(cache_size), "--read-cache-size", str(read_cache_size)]
    cmd += ["--allow-other"] if allow_other else []
    cmd += ["--ready-fd", str(w), str(mountpoint)]
    # the passphrase goes through a pipe, not the environment (cli/early.py reads it)
    pr, pw = os.pipe()
    os.write(pw, os.fsencode(passphrase))  # far below a pipe's buffer: never blocks
    os.close(pw)
    env = {**os.environ, "VAULTFS_PASSPHRASE_FD": str(pr)}
    try:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(w, pr),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            env=env,
        )
    finally:
        os.close(w)
        os.close(pr)
        logf.close()
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise VaultError(f"the mount daemon did not become ready in {timeout:.0f}s")
            rl, _, _ = select.select([r], [], [], left)
            if not rl:
                continue
            part = os.read(r, 4096)
            if not part:
                break
            buf += part
    finally:
        os.close(r)
    msg = buf.decode(errors="replace").strip()
    if msg.startswith("ok "):
        return int(msg.split()[1])
    if msg.startswith("err "):
        _e, code, text = msg.split(" ", 2)
        err = VaultError(text)
        err.exit_code = int(code)
        proc.wait(timeout=30)
        raise err
    proc.wait(timeout=30)
    raise VaultError(
        f"the mount daemon exited (code {proc.returncode}) before mounting; see {home / 'mount.log'}"
    )


def offline_snapshot(home: Path, passphrase: str, name: str | None, fork: bool = False) -> dict:
    """`vaultfs snapshot` with no mount running: the same code path as the daemon (load the
    live tree, store the cache files a crash left, record the tree, upload) without FUSE."""
    import trio

    from .fs import VaultFS
    from .vault import Vault

    vault = Vault.open(home, passphrase)
    try:
        vault.start_sealers()  # before trio's threads (vaultfs/sealer.py, "Forking")
        fs = VaultFS(vault, home, home / "not-mounted", DEFAULT_CACHE_SIZE)
        fs.load()

        async def main() -> dict:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fs.journal.run)
                nursery.start_soon(fs.cache.run)
                uid, seq, count = await fs.snapshot(name, fork)
                rep = await fs.push(seal=True)
                out = {"snapshot": uid, "seq": seq, "entries": count}
                out["report"] = await _report(fs, rep)
                nursery.cancel_scope.cancel()
            return out

        try:
            return trio.run(main)
        finally:
            fs.reader.close()
    finally:
        vault.close()
