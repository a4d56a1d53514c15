"""A network emulation for the benchmark and a few tests: remotes behind links that behave
like links (issue 16), with nothing leaving the machine.

Each emulated remote is an ``rclone serve s3`` over a local directory, reached through its own
link. :class:`Network` builds them:

* **namespace mode** (root with ``ip``): a network namespace of our own (``ip netns add``),
  one veth pair per remote on a private /30 (``10.<a>.<i>.1`` on our side, ``.2`` inside), the
  server listening on the inside address only. Bandwidth is a token-bucket qdisc (``tc qdisc
  ... tbf``) on *both* ends of the veth (ours shapes uploads, the namespace's downloads), so
  the kernel's TCP meets a real bottleneck queue: slow start, congestion control and
  head-of-line waits are real.
* **latency** comes from a delaying TCP relay (:func:`relay_main`, one child process for all
  remotes), listening on 127.0.0.1 and forwarding to the server: every chunk is held for half
  the RTT in each direction, and a new connection waits one RTT before it is forwarded (the
  TCP handshake). This kernel has no ``netem`` qdisc; the relay is used even where one
  exists (:func:`has_netem` is only recorded), so figures compare across machines.
* **fallback** (not root, or no ``ip``/``tc``): servers on 127.0.0.1, and the relay also
  meters bandwidth (a token bucket per direction per remote, shared by its connections).

What it models: one-way propagation delay, a per-remote bottleneck rate in each direction,
connection set-up cost, independent links (a slow remote slows only itself). What it does not:
packet loss and reordering, jitter, the relay's own small buffering (up to
:data:`RELAY_BUFFER` bytes in flight per connection and direction, on top of the kernel's
socket buffers, so the window a sender sees is not exactly that of a real path), provider
request latency or throttling, DNS, TLS (plain HTTP), and contention with other traffic.

Lifetime: everything is torn down by :meth:`Network.close` (also the context manager's exit),
and, should this process die without it (even ``kill -9``), by a reaper child that waits on a
pipe from us: on EOF or after ``ttl`` seconds it kills the servers and deletes the veths and
the namespace. Servers run under ``setpriv --pdeathsig KILL``; the relay exits when its stdin
(a pipe from us) closes or after ``ttl``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

#: Bytes the relay holds per connection and direction before it stops reading (backpressure).
RELAY_BUFFER = 4 * 1024 * 1024
RELAY_CHUNK = 256 * 1024
S3_PORT = 8333
ACCESS_KEY = "vaultfs-netem"
SECRET_KEY = "vaultfs-netem-secret"
DEFAULT_TTL = 4 * 3600.0


@dataclass(frozen=True)
class Link:
    """One remote's link: round-trip time in seconds and bandwidth in bits per second, the
    same in both directions."""

    rtt: float = 0.040
    rate_bps: float = 100e6

    @property
    def bytes_per_s(self) -> float:
        return self.rate_bps / 8

    def __str__(self) -> str:
        return f"{self.rtt * 1000:.0f} ms RTT, {self.rate_bps / 1e6:g} Mbit/s"


@dataclass
class EmulatedRemote:
    """One server behind one link. ``spec(path)`` is the rclone connection string for a path
    under its bucket (``bucket/sub``); ``endpoint`` the HTTP endpoint a client (restic) uses."""

    index: int
    root: Path
    link: Link
    port: int = 0  # the relay's port on 127.0.0.1
    inside: str = ""  # where the server listens
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spec(self, path: str) -> str:
        bucket = path.strip("/").split("/", 1)[0]
        (self.root / bucket).mkdir(parents=True, exist_ok=True)
        return (
            f":s3,provider=Rclone,endpoint='{self.endpoint}',"
            f"access_key_id={ACCESS_KEY},secret_access_key={SECRET_KEY}:{path}"
        )


def has_netns() -> bool:
    """Whether this process can build the namespace mode (root, ``ip`` and ``tc``)."""
    return os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("tc"))


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip() or p.returncode}")
    return p


def has_netem(ns: str, dev: str) -> bool:
    """Whether the kernel has the ``netem`` qdisc (tried on ``dev`` in ``ns``, then removed)."""
    p = _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem",
             "delay", "1ms", check=False)  # fmt: skip
    if p.returncode == 0:
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
    return p.returncode == 0


def _rclone() -> str:
    env = os.environ.get("VAULTFS_RCLONE")
    if env:
        return env
    local = Path(sys.executable).parent / "rclone"
    return str(local) if local.exists() else (shutil.which("rclone") or "rclone")


def _tbf(dev: str, link: Link, ns: str | None) -> None:
    """A token bucket of the link's rate on ``dev``'s egress; replaces any earlier one."""
    rate = link.bytes_per_s
    burst = max(64 * 1024, int(rate / 100))  # >= rate/HZ at any HZ, a few packets at minimum
    pre = ["ip", "netns", "exec", ns] if ns else []
    _run(*pre, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(link.rate_bps)}bit",
         "burst", str(burst), "latency", "100ms")  # fmt: skip


class Network:
    """The emulated remotes (see the module docstring). Use as a context manager::

        with Network(workdir, [Link(0.04, 100e6)] * 5) as net:
            specs = [r.spec("vault/v") for r in net.remotes]
            net.set_link(4, Link(0.4, 5e6))   # slow one remote down

    ``mode`` is "netns" or "loopback" (the fallback); ``force_loopback`` chooses the fallback.
    Raises RuntimeError when a server or the relay does not start (everything started so far
    is torn down first)."""

    def __init__(
        self,
        workdir: Path,
        links: list[Link],
        *,
        ttl: float = DEFAULT_TTL,
        force_loopback: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.ttl = ttl
        self.mode = "loopback" if force_loopback or not has_netns() else "netns"
        # unique among the networks of every process: link names are global (<= 15 chars)
        self.tag = f"{os.getpid():x}{next(_SEQ):x}"
        self.ns = f"{NS_PREFIX}{self.tag}"
        self.subnet_a = 0  # the 10.<a>.0.0/16 block, chosen when built
        self.remotes = [
            EmulatedRemote(i, self.workdir / f"remote{i}", link) for i, link in enumerate(links)
        ]
        self._veths: list[str] = []
        self._reaper: subprocess.Popen | None = None
        self._relay: subprocess.Popen | None = None
        self._ns_made = False
        self.netem = False
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _veth(self, i: int) -> tuple[str, str]:
        return _host_veth(self.ns, i), f"vn{self.tag}n{i}"

    def _start(self) -> None:
        for r in self.remotes:
            r.root.mkdir(parents=True, exist_ok=True)
        if self.mode == "netns":
            self._start_reaper()
            self.subnet_a = _free_block()
            _run("ip", "netns", "add", self.ns)
            self._ns_made = True
            _run("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
            for r in self.remotes:
                host, inner = self._veth(r.index)
                _run("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
                self._veths.append(host)
                _run("ip", "link", "set", inner, "netns", self.ns)
                net = f"10.{self.subnet_a}.{r.index}"
                _run("ip", "addr", "add", f"{net}.1/30", "dev", host)
                _run("ip", "link", "set", host, "up")
                _run(
                    "ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{net}.2/30", "dev", inner
                )
                _run("ip", "netns", "exec", self.ns, "ip", "link", "set", inner, "up")
                r.inside = f"{net}.2:{S3_PORT}"
            self.netem = has_netem(self.ns, self._veth(0)[1])
            for r in self.remotes:
                self._shape(r)
        else:
            for r in self.remotes:
                r.inside = f"127.0.0.1:{_free_port()}"
        for r in self.remotes:
            self._serve(r)
        self._start_relay()

    def _shape(self, r: EmulatedRemote) -> None:
        host, inner = self._veth(r.index)
        _tbf(host, r.link, None)
        _tbf(inner, r.link, self.ns)

    def _start_reaper(self) -> None:
        """The child that tears the namespace down if we die without :meth:`close`."""
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "bench.netem", "reap", self.ns, str(self.ttl)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip

    def _tell_reaper(self, msg: dict) -> None:
        if self._reaper is not None and self._reaper.stdin is not None:
            self._reaper.stdin.write((json.dumps(msg) + "\n").encode())
            self._reaper.stdin.flush()

    def _serve(self, r: EmulatedRemote) -> None:
        host, port = r.inside.rsplit(":", 1)
        cmd = [_rclone(), "serve", "s3", str(r.root), "--addr", r.inside,
               "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "-q"]  # fmt: skip
        setpriv = shutil.which("setpriv")
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
        if self.mode == "netns":
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        log = open(self.workdir / f"serve{r.index}.log", "ab")  # noqa: SIM115
        with log:
            r.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._tell_reaper({"pid": r.proc.pid})
        deadline = time.monotonic() + 20
        while not self._listening(host, int(port)):
            if r.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / f"serve{r.index}.log").read_text(errors="replace")[-500:]
                raise RuntimeError(f"rclone serve s3 for remote {r.index} did not start: {tail}")
            time.sleep(0.05)

    def _listening(self, host: str, port: int) -> bool:
        if self.mode == "netns":
            p = _run("ip", "netns", "exec", self.ns, "ss", "-Hltn", f"src {host}:{port}",
                     check=False)  # fmt: skip
            return bool(p.stdout.strip())
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    def _start_relay(self, ports: list[int] | None = None) -> None:
        """Start the relay (on ``ports``, to keep client specs valid across a restart)."""
        routes = [
            {
                "to": r.inside,
                "delay": r.link.rtt / 2,
                "rate": r.link.bytes_per_s if self.mode == "loopback" else 0.0,
                "port": ports[r.index] if ports else 0,
            }
            for r in self.remotes
        ]
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=self.workdir, delete=False) as f:
            json.dump({"routes": routes, "ttl": self.ttl}, f)
        self._relay = subprocess.Popen(
            [sys.executable, "-m", "bench.netem", "relay", f.name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        assert self._relay.stdout is not None
        line = self._relay.stdout.readline()
        if not line:
            raise RuntimeError("the delaying relay did not start")
        for r, port in zip(self.remotes, json.loads(line)["ports"], strict=True):
            r.port = port

    def set_link(self, i: int, link: Link) -> None:
        """Change remote ``i``'s link: bandwidth at once; for the delay the relay is restarted
        on the same ports, so connections open through it are cut (clients reconnect)."""
        r = self.remotes[i]
        r.link = link
        if self.mode == "netns":
            self._shape(r)
        ports = [x.port for x in self.remotes]
        self._stop_relay()
        self._start_relay(ports)

    def _stop_relay(self) -> None:
        if self._relay is not None:
            if self._relay.stdin is not None:
                self._relay.stdin.close()  # its signal to exit
            try:
                self._relay.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._relay.kill()
                self._relay.wait()
            if self._relay.stdout is not None:
                self._relay.stdout.close()
            self._relay = None

    def stop_remote(self, i: int) -> None:
        """Stop remote ``i``'s server (an outage); its files stay."""
        r = self.remotes[i]
        if r.proc is not None and r.proc.poll() is None:
            r.proc.terminate()
            try:
                r.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()

    def bytes_sent(self, i: int) -> tuple[int, int] | None:
        """(bytes uploaded to, bytes downloaded from) remote ``i`` so far, as its token
        buckets counted them (headers and retransmissions included; take differences); None
        in the loopback fallback, which has no qdisc to ask."""
        if self.mode != "netns":
            return None
        host, inner = self._veth(i)
        up = _run("tc", "-s", "qdisc", "show", "dev", host).stdout
        down = _run(
            "ip", "netns", "exec", self.ns, "tc", "-s", "qdisc", "show", "dev", inner
        ).stdout
        return _sent(up), _sent(down)

    def describe(self) -> dict:
        """What was built, for a benchmark's details."""
        return {
            "mode": self.mode,
            "delay_by": "relay",
            "kernel_has_netem": self.netem,
            "bandwidth_by": "tbf" if self.mode == "netns" else "relay",
            "links": [str(r.link) for r in self.remotes],
        }

    def close(self) -> None:
        """Stop the relay and the servers, delete the veths and the namespace. Idempotent."""
        self._stop_relay()
        for r in self.remotes:
            self.stop_remote(r.index)
        _teardown(self.ns if self._ns_made else None, self._veths)
        self._ns_made = False
        self._veths = []
        if self._reaper is not None:
            if self._reaper.stdin is not None:
                self._reaper.stdin.close()
            try:
                self._reaper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None


def _teardown(ns: str | None, veths: list[str]) -> None:
    for v in veths:  # deleting one end deletes the pair
        _run("ip", "link", "del", v, check=False)
    if ns:
        _run("ip", "netns", "del", ns, check=False)


NS_PREFIX = "vfsnet-"
_SEQ = itertools.count()


def _host_veth(ns: str, i: int | str) -> str:
    """Our end of remote ``i``'s veth in namespace ``ns`` (the reaper finds them by it)."""
    return f"vn{ns[len(NS_PREFIX) :]}h{i}"


def _free_block() -> int:
    """An ``a`` in 200..249 whose 10.a.0.0/16 no address on this machine uses (another
    emulated network's included), starting from one our pid picks."""
    used = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    start = os.getpid() % 50
    for j in range(50):
        a = 200 + (start + j) % 50
        if f" 10.{a}." not in used:
            return a
    raise RuntimeError("no free 10.x.0.0/16 block in 10.200-10.249 for the emulated links")


def _sent(tc_stats: str) -> int:
    """The "Sent N bytes" figure of ``tc -s qdisc show`` output (its root qdisc)."""
    for word, nxt in zip(tc_stats.split(), tc_stats.split()[1:], strict=False):
        if word == "Sent":
            return int(nxt)
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the child processes -------------------------------------------------------------------


def reap_main(ns: str, ttl: float) -> None:
    """Wait for EOF on stdin (our parent closed it or died) or ``ttl`` seconds, then kill the
    server pids the parent named (one JSON line each) and delete ``ns`` and every link whose
    peer lives in it. Ignores SIGINT: a Ctrl-C to the bench must not skip the teardown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pids: list[int] = []
    deadline = time.monotonic() + ttl
    os.set_blocking(0, False)
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([0], [], [], min(5.0, max(0.0, deadline - time.monotonic())))
        if not ready:
            continue
        data = os.read(0, 65536)
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        pids += [json.loads(ln)["pid"] for ln in lines if ln.strip()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p = _run("ip", "-o", "link", "show", check=False)
    prefix = _host_veth(ns, "")
    veths = [ln.split(":")[1].strip().split("@")[0] for ln in p.stdout.splitlines()]
    _teardown(ns, [v for v in veths if v.startswith(prefix)])


class _Bucket:
    """A token bucket of ``rate`` bytes/s shared by a route's connections (fallback mode)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.free_at = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.free_at = max(self.free_at, now) + n / self.rate
        if self.free_at - now > 0.001:
            await asyncio.sleep(self.free_at - now)


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, bucket: _Bucket
) -> None:
    """Copy reader to writer, each chunk delivered ``delay`` seconds after it was read, at
    most :data:`RELAY_BUFFER` bytes held."""
    held: deque[tuple[float, bytes]] = deque()
    room = asyncio.Semaphore(RELAY_BUFFER // RELAY_CHUNK)
    more = asyncio.Event()
    done = False

    async def read() -> None:
        nonlocal done
        try:
            while True:
                await room.acquire()
                data = await reader.read(RELAY_CHUNK)
                if not data:
                    break
                held.append((time.monotonic() + delay, data))
                more.set()
        except (ConnectionError, OSError):
            pass
        finally:
            done = True
            more.set()

    task = asyncio.create_task(read())
    try:
        while True:
            if not held:
                if done:
                    break
                more.clear()
                await more.wait()
                continue
            due, data = held.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
            room.release()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()


async def _relay(routes: list[dict], ttl: float) -> None:
    servers = []
    ports = []
    for route in routes:
        host, port = route["to"].rsplit(":", 1)
        up, down = _Bucket(route["rate"]), _Bucket(route["rate"])

        async def handle(
            cr: asyncio.StreamReader,
            cw: asyncio.StreamWriter,
            host: str = host,
            port: int = int(port),
            delay: float = route["delay"],
            up: _Bucket = up,
            down: _Bucket = down,
        ) -> None:
            try:
                await asyncio.sleep(2 * delay)  # the handshake's round trip
                sr, sw = await asyncio.open_connection(host, port)
            except OSError:
                cw.close()
                return
            await asyncio.gather(_pump(cr, sw, delay, up), _pump(sr, cw, delay, down))
            for w in (cw, sw):
                w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", route.get("port", 0))
        servers.append(srv)
        ports.append(srv.sockets[0].getsockname()[1])
    sys.stdout.write(json.dumps({"ports": ports}) + "\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    eof = loop.create_future()

    def on_stdin() -> None:
        if not os.read(0, 4096) and not eof.done():
            eof.set_result(None)

    loop.add_reader(0, on_stdin)
    try:
        await asyncio.wait_for(eof, ttl)
    except TimeoutError:
        pass
    for srv in servers:
        srv.close()


def relay_main(config: str) -> None:
    """The delaying relay (see the module docstring): routes from the JSON file ``config``;
    prints {"ports": [...]} once listening; exits when stdin closes or after its ttl."""
    cfg = json.loads(Path(config).read_text())
    Path(config).unlink(missing_ok=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it by closing stdin
    asyncio.run(_relay(cfg["routes"], cfg["ttl"]))


if __name__ == "__main__":
    if sys.argv[1] == "reap":
        reap_main(sys.argv[2], float(sys.argv[3]))
    elif sys.argv[1] == "relay":
        relay_main(sys.argv[2])
