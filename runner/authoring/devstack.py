"""`runner dev up|down`: the whole stack on one machine, state under ./var/.

`up` starts what is missing (Redis and the registry through scripts/services.sh, the
API and workers as background processes), builds and publishes the sample processors
if needed, pins them in var/dev/manifest.yaml, and writes var/dev/env. `down` stops
exactly what `up` started, as recorded in var/dev/started.

Webhooks work out of the box on loopback: the API and workers get
RUNNER_WEBHOOK_ALLOWED_URLS=http://127.0.0.1:,http://localhost: (unless it is set) and
a RUNNER_WEBHOOK_SECRET made once and kept in var/dev/webhook-secret (unless it is
set); var/dev/env exports both, so a local receiver can check signatures.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import httpx
import structlog

from runner.authoring.publish import ProcessorDir, publish, registry_digest
from runner.control.keys import Keys
from runner.control.migrate import upgrade
from runner.control.store import Store
from runner.domain import Role
from runner.errors import ManifestError, PublishError, RunnerError
from runner.manifest import load_manifest, pin
from runner.settings import Settings

log = structlog.get_logger(__name__)

DEV_WORKER_PORT = 9101  # dev worker i serves its metrics and health on 9101 + i - 1
# Where the dev stack's webhooks may go: receivers on this machine, any port.
DEV_WEBHOOK_URLS = "http://127.0.0.1:,http://localhost:"

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "processor-templates" / "samples"
Say = Callable[[str], None]


class DevStack:
    def __init__(self, settings: Settings, *, root: Path = ROOT, say: Say = print) -> None:
        self.settings, self.root, self.say = settings, root, say
        self.dir = root / "var" / "dev"
        self.pids = self.dir / "pids"
        self.logs = self.dir / "logs"
        self.manifest = self.dir / "manifest.yaml"
        self.env_file = self.dir / "env"
        self.started_file = self.dir / "started"
        self.webhook_secret_file = self.dir / "webhook-secret"
        self.api_url = f"http://{settings.api_host}:{settings.api_port}"

    # up --------------------------------------------------------------------

    def up(self, *, workers: int = 2) -> None:
        for path in (self.pids, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        self._services()
        self._script("base-images.sh")
        self._samples()
        env = self._child_env()
        upgrade(self.settings.database_url)
        key = self._admin_key()
        self._write_env(key)
        self._spawn("api", ["api"], env)
        self._wait_healthy()
        for index in range(workers):
            # Each worker's /metrics, /healthz and /readyz (unless the caller chose).
            port = env.get("RUNNER_WORKER_PORT") or str(DEV_WORKER_PORT)
            self._spawn(f"worker-{index + 1}", ["worker"],
                        {**env, "RUNNER_WORKER_ID": f"dev-worker-{index + 1}",
                         "RUNNER_WORKER_PORT": str(int(port) + index) if port != "0" else "0"})
        self.say(f"stack up: API {self.api_url}, {workers} worker(s); "
                 f"`. {self.env_file.relative_to(self.root)}` to use it")

    def _script(self, name: str, *args: str) -> None:
        result = subprocess.run(["bash", str(self.root / "scripts" / name), *args],
                                cwd=self.root, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RunnerError(f"scripts/{name} failed: "
                              f"{(result.stderr or result.stdout).strip()[-500:]}")
        for line in result.stdout.splitlines():
            self.say(line)

    def _services(self) -> None:
        started = self._started()
        for service in ("redis", "registry"):
            before = subprocess.run(["bash", str(self.root / "scripts/services.sh"), "status"],
                                    capture_output=True, text=True, check=False).stdout
            if f"{service}: up" in before:
                continue
            self._script("services.sh", "start", service)
            started.add(f"service:{service}")
            self.say(f"started {service}")
        self.started_file.write_text("".join(f"{s}\n" for s in sorted(started)))

    def _started(self) -> set[str]:
        if not self.started_file.exists():
            return set()
        return {line for line in self.started_file.read_text().split() if line}

    def _sample_current(self, client: docker.DockerClient, proc: ProcessorDir) -> bool:
        try:
            found = load_manifest(self.manifest).find(proc.name, proc.version)
        except ManifestError:
            return False
        if found is None:
            return False
        try:
            client.api.inspect_image(found.image)
            return registry_digest(found.repo, proc.version) == found.digest
        except (docker.errors.DockerException, PublishError):
            return False

    def _samples(self) -> None:
        client = docker.from_env()
        for path in sorted(p for p in SAMPLES.iterdir() if (p / "processor.yaml").exists()):
            proc = ProcessorDir.load(path)
            if self.manifest.exists() and self._sample_current(client, proc):
                continue
            self.say(f"publishing sample processor {proc.name} {proc.version}...")
            entry = publish(path, registry=self.settings.registry, client=client,
                            local_base=True)
            pin(self.manifest, entry)
            self.say(f"  pinned {entry['image']}")

    def _child_env(self) -> dict[str, str]:
        return {**os.environ, "RUNNER_MANIFEST": str(self.manifest),
                "RUNNER_DATABASE_URL": self.settings.database_url,
                "RUNNER_REDIS_URL": self.settings.redis_url,
                "RUNNER_REGISTRY": self.settings.registry,
                "RUNNER_API_HOST": self.settings.api_host,
                "RUNNER_API_PORT": str(self.settings.api_port), **self._webhook_env()}

    def _webhook_env(self) -> dict[str, str]:
        """The webhook settings of the dev stack: the caller's, else loopback receivers
        and a secret made once (var/dev/webhook-secret, owner-only)."""
        secret = self.settings.webhook_secret.get_secret_value()
        if not secret:
            if not self.webhook_secret_file.exists():
                self.dir.mkdir(parents=True, exist_ok=True)
                self.webhook_secret_file.touch(mode=0o600)
                self.webhook_secret_file.write_text(secrets.token_hex(32))
            secret = self.webhook_secret_file.read_text().strip()
        return {"RUNNER_WEBHOOK_ALLOWED_URLS":
                self.settings.webhook_allowed_urls or DEV_WEBHOOK_URLS,
                "RUNNER_WEBHOOK_SECRET": secret}

    def _admin_key(self) -> str:
        store = Store(self.settings.database_url)
        try:
            if self.env_file.exists():
                for line in self.env_file.read_text().splitlines():
                    if line.startswith("export RUNNER_API_KEY="):
                        key = line.split("=", 1)[1].strip()
                        if Keys(store).authenticate(key) is not None:
                            return key
            _, key = Keys(store).create(tenant="dev", role=Role.ADMIN)
            return key
        finally:
            store.close()

    def _write_env(self, key: str) -> None:
        values = {"RUNNER_API_URL": self.api_url, "RUNNER_API_KEY": key,
                  "RUNNER_REGISTRY": self.settings.registry,
                  "RUNNER_MANIFEST": str(self.manifest),
                  "RUNNER_DATABASE_URL": self.settings.database_url,
                  "RUNNER_REDIS_URL": self.settings.redis_url, **self._webhook_env()}
        lines = [f"export {k}={shlex.quote(v)}\n" for k, v in values.items()]
        # So that `runner` works after `. var/dev/env` without activating the venv.
        lines.append(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
        self.env_file.write_text("".join(lines))
        self.env_file.chmod(0o600)

    def _alive(self, name: str) -> int | None:
        pid_file = self.pids / f"{name}.pid"
        if not pid_file.exists():
            return None
        pid = int(pid_file.read_text().strip() or 0)
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return None
        return pid

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        if self._alive(name):
            self.say(f"{name} already running")
            return
        with (self.logs / f"{name}.log").open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "runner", *args], cwd=self.root, env=env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        (self.pids / f"{name}.pid").write_text(str(process.pid))

    def _wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if not self._alive("api"):
                break
            time.sleep(0.2)
        api_log = self.logs / "api.log"
        tail = api_log.read_text()[-800:] if api_log.exists() else ""
        raise RunnerError(f"the API did not become ready at {self.api_url}: {tail.strip()}")

    # down ------------------------------------------------------------------

    def down(self) -> None:
        names = sorted(p.stem for p in self.pids.glob("*.pid")) if self.pids.exists() else []
        for name in names:
            pid = self._alive(name)
            if pid is not None:
                os.killpg(pid, signal.SIGTERM)
                # Workers drain their current run first; give them the drain timeout.
                for _ in range(int((self.settings.drain_timeout_seconds + 5) * 10)):
                    if self._alive(name) is None:
                        break
                    time.sleep(0.1)
                else:
                    os.killpg(pid, signal.SIGKILL)
                self.say(f"stopped {name}")
            (self.pids / f"{name}.pid").unlink(missing_ok=True)
        for entry in sorted(self._started()):
            service = entry.removeprefix("service:")
            self._script("services.sh", "stop", service)
            self.say(f"stopped {service}")
        self.started_file.unlink(missing_ok=True)
