"""Worker hosts on one machine, each really apart: a network namespace of its own and
a Docker engine of its own.

A `Host` is
- a network namespace (`ip netns`) joined to this machine by a veth pair: its worker
  processes run in it (`nsenter --net`, so they keep this mount namespace: the /run
  filesystems a worker mounts must be seen by its engine) and reach PostgreSQL and
  Redis only through the veth, at the host side's address, where a `Forwarder` in
  the test process relays to the servers on loopback. Loopback itself is the
  namespace's own: 127.0.0.1 reaches nothing of this machine.
- a `dockerd` of its own (data root, exec root, pid file, unix socket, no iptables,
  an empty config file) in this machine's namespaces, so it pulls from the local
  registry by digest like any other engine; the host's workers talk to it over its
  socket, which no cut of the veth can sever (a host's engine is local to it). Its
  default network is a bridge of its own (`rhb...`, made here), not `--bridge=none`:
  a daemon started with `--bridge=none` deletes the machine's `docker0` at start,
  which breaks the main engine's bridge network (processors never use one: they
  run with no network at all).

`cut()` takes the veth's host side down: packets stop (connections hang, nothing is
refused), like a cable pulled; `heal()` brings it back. `kill()` SIGKILLs the host's
engine and workers together. `Hosts` makes several at once and removes every
namespace, link, daemon, mount and directory it made, even when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from runner.settings import Settings
from tests.support.processes import RunnerProcess, child_env
from tests.support.waiting import wait_until

SUBNET = "10.250"  # host i is 10.250.i.0/30: .1 this machine's side, .2 the namespace's
PREFIX = "rh"  # names of namespaces and links: rh<session>-<i>, rhv<session><i>[ab]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Forwarder:
    """TCP relays from (address, port) to targets on this machine's loopback, served by
    one asyncio loop in a daemon thread of the test process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="forwarder")
        self._thread.start()

    def relay(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(*target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def start() -> None:
            self._servers.append(await asyncio.start_server(accept, *listen,
                                                            reuse_address=True))

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@dataclass
class Engine:
    """A dockerd of its own under `root`, its default network on `bridge`."""

    root: Path
    bridge: str
    bridge_address: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["ip", "link", "show", self.bridge], capture_output=True,
                          check=False).returncode != 0:  # a restart keeps its bridge
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", self.bridge_address, "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        config = self.root / "daemon.json"
        config.write_text("{}")
        log = (self.root / "dockerd.log").open("ab")
        self.process = subprocess.Popen(
            ["dockerd", "--config-file", str(config), "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
             "-H", self.url, f"--bridge={self.bridge}", "--iptables=false",
             "--ip-masq=false",
             "--storage-driver=fuse-overlayfs"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(self.answers, timeout=timeout, interval=0.2,
                   message=lambda: f"dockerd under {self.root} did not start:\n"
                                   f"{(self.root / 'dockerd.log').read_text()[-2000:]}")

    def answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"dockerd under {self.root} exited:\n"
                               f"{(self.root / 'dockerd.log').read_text()[-2000:]}")
        return self.docker("version", check=False).returncode == 0

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "-H", self.url, *args], capture_output=True,
                              text=True, timeout=60, check=check)

    def containers(self) -> list[str]:
        done = self.docker("ps", "-aq", check=False)
        return done.stdout.split() if done.returncode == 0 else []

    def kill(self) -> None:
        """The engine dies with its host: SIGKILL every container's first process (its
        pid namespace goes with it), the daemon, its containerd and the shims."""
        for container in self.containers():
            pid = self.docker("inspect", "-f", "{{.State.Pid}}", container, check=False)
            if pid.stdout.strip().isdigit() and int(pid.stdout) > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid.stdout), signal.SIGKILL)
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self._kill_shims()

    def _kill_shims(self) -> None:
        """containerd and the shims of this engine (started under its exec root)."""
        subprocess.run(["pkill", "-9", "-f", f"{self.root}/exec"], capture_output=True,
                       check=False)

    def stop(self) -> None:
        """Remove its containers, stop it, and unmount what it left mounted."""
        if self.process is not None and self.process.poll() is None:
            for container in self.containers():
                self.docker("rm", "-f", container, check=False)
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        # containerd-shims of a killed daemon keep their containers' processes: kill them.
        self._kill_shims()
        for mount in reversed(mounts_under(self.root)):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, in /proc/self/mountinfo order."""
    prefix = str(root)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as lines:
        for line in lines:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


@dataclass
class Host:
    """One worker host: its namespace, link, engine, relays and worker processes."""

    name: str
    index: int
    session: str
    engine: Engine
    workers: list[RunnerProcess] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"{PREFIX}{self.session}-{self.index}"

    @property
    def outside(self) -> str:  # the link's end on this machine
        return f"{PREFIX}v{self.session}{self.index}a"

    @property
    def inside(self) -> str:
        return f"{PREFIX}v{self.session}{self.index}b"

    @property
    def gateway(self) -> str:
        """This machine's address as the host sees it (its database and Redis)."""
        return f"{SUBNET}.{self.index}.1"

    def make_network(self) -> None:
        _ip("netns", "add", self.netns)
        _ip("link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
        _ip("link", "set", self.inside, "netns", self.netns)
        _ip("addr", "add", f"{self.gateway}/30", "dev", self.outside)
        _ip("link", "set", self.outside, "up")
        _ip("-n", self.netns, "addr", "add", f"{SUBNET}.{self.index}.2/30", "dev", self.inside)
        _ip("-n", self.netns, "link", "set", self.inside, "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")

    def cut(self) -> None:
        """Pull the cable: nothing passes between the host and the database or Redis."""
        _ip("link", "set", self.outside, "down")

    def heal(self) -> None:
        _ip("link", "set", self.outside, "up")
        # The address goes with a down link on some kernels: put it back if so.
        shown = subprocess.run(["ip", "-o", "addr", "show", "dev", self.outside],
                               capture_output=True, text=True, check=False).stdout
        if self.gateway not in shown:
            _ip("addr", "add", f"{self.gateway}/30", "dev", self.outside)

    def prefix(self) -> list[str]:
        """What runs a process of this host: this interpreter, in the host's network
        namespace only."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", sys.executable]

    def env(self, settings: Settings, **extra: str) -> dict[str, str]:
        """A child environment of `settings` for this host: its engine, and the database
        and Redis through its link (the relays listen on the servers' own ports)."""
        database = settings.database_url.replace("127.0.0.1", self.gateway, 1)
        redis = settings.redis_url.replace("127.0.0.1", self.gateway, 1)
        return {**child_env(settings), "DOCKER_HOST": self.engine.url,
                "RUNNER_DATABASE_URL": database, "RUNNER_REDIS_URL": redis,
                "RUNNER_WORKER_ID": f"{settings.worker_id}-{self.name}",
                "RUNNER_HOST_ID": self.name, **extra}

    def start_worker(self, settings: Settings, log_dir: Path, *, args: Sequence[str] = (),
                     extra: Mapping[str, str] | None = None, number: int | None = None,
                     timeout: float = 90) -> RunnerProcess:
        number = len(self.workers) + 1 if number is None else number
        env = {**self.env(settings), **(extra or {})}
        env["RUNNER_WORKER_ID"] = f"{env['RUNNER_WORKER_ID']}-{number}"
        process = RunnerProcess(f"{self.name}-worker-{number}", ["worker", *args], env=env,
                                log_path=log_dir / f"{self.name}-worker-{number}.log",
                                prefix=self.prefix(), append=True)
        process.wait_ready(marker="worker_started", timeout=timeout)
        self.workers.append(process)
        return process

    def kill(self) -> None:
        """The whole host dies at once: its workers and its engine, SIGKILL."""
        for worker in self.workers:
            worker.kill(signal.SIGKILL)
        self.engine.kill()

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def remove(self) -> None:
        self.stop_workers()
        self.engine.stop()
        subprocess.run(["ip", "link", "del", self.outside], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)


class Hosts:
    """`count` hosts for one test session, made in parallel; `close` removes them all."""

    def __init__(self, count: int, *, session: str, services: Mapping[str, int],
                 root: Path | None = None) -> None:
        self.session = session[:6]
        self.root = root or Path(tempfile.mkdtemp(prefix="runner-hosts-"))
        self.forwarder = Forwarder()
        self.hosts = [Host(f"host{i}", i, self.session,
                           Engine(self.root / f"host{i}", f"{PREFIX}b{self.session}{i}",
                                  f"10.251.{i}.1/24"))
                      for i in range(1, count + 1)]
        try:
            for host in self.hosts:
                host.make_network()
                for port in services.values():
                    self.forwarder.relay((host.gateway, port), ("127.0.0.1", port))
            with ThreadPoolExecutor(max_workers=count) as pool:
                list(pool.map(lambda h: h.engine.start(), self.hosts))
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.remove()
        self.forwarder.close()
        for mount in reversed(mounts_under(self.root)):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of these hosts is still there: namespaces, links, daemons, mounts."""
        found = []
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               check=False).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                               check=False).stdout
        for host in self.hosts:
            if host.netns in names:
                found.append(f"netns {host.netns}")
            for link in (host.outside, host.engine.bridge):
                if link in links:
                    found.append(f"link {link}")
            if host.engine.process is not None and host.engine.process.poll() is None:
                found.append(f"dockerd {host.engine.root}")
        found += [f"mount {m}" for m in mounts_under(self.root)]
        return found
