"""Files in, files out, on real Docker and through both transfer paths: the /run volume's
host directory (direct) and the engine's archive API. Every case runs through both and
must come out the same.

The processor is a busybox script built here on the local base image (run by its
image id, so no registry is involved); what it should do is the input's "mode".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import textwrap
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import docker
import docker.errors
import pytest

from runner.errors import SandboxError, StorageError
from runner.sandbox import (
    RUN_LABEL,
    WORKER_LABEL,
    ArtifactStatus,
    ContainerSpec,
    InputFile,
    Outcome,
    ResultStatus,
    Sandbox,
    SandboxConfig,
    StoredArtifact,
    provenance,
)
from runner.sandbox.transfer import VolumeTransfer
from tests.integration.conftest import SESSION
from tests.support.shellimage import shell_processor

KiB, MiB = 1024, 1024 * 1024
BOUND = 256 * KiB  # output_bytes of every case but the copy
MAX_FILES = 8
PATHS = pytest.mark.parametrize("direct", [True, False], ids=["direct", "archive"])

MAIN = textwrap.dedent(r"""
    mode=$(sed -n 's/.*"mode": *"\([a-z_]*\)".*/\1/p' /run/input.json)
    out=/run/out
    try() { if "$@" 2>/dev/null; then echo ok; else echo failed; fi; }
    case "$mode" in
    copy)
      cp /run/in/doc.bin $out/copy.bin
      mkdir -p $out/dir/sub $out/empty/inner
      printf 'hello\n' > $out/dir/sub/file.txt
      echo "in=$(stat -c '%u %a' /run/in) doc=$(stat -c '%u %a %s' /run/in/doc.bin)"
      echo '{"copied": true}' > $out/result.json ;;
    readonly)
      printf '{"create": "%s", "append": "%s", "truncate": "%s", "remove": "%s",' \
        "$(try sh -c 'echo x > /run/in/x')" "$(try sh -c 'echo x >> /run/in/doc.bin')" \
        "$(try sh -c ': > /run/in/doc.bin')" "$(try rm -f /run/in/doc.bin)" > $out/result.json
      printf '"rename": "%s", "chmod": "%s", "mkdir": "%s", "move_in": "%s"}' \
        "$(try mv /run/in/doc.bin /run/in/y)" "$(try chmod 666 /run/in/doc.bin)" \
        "$(try mkdir /run/in/d)" "$(try mv /run/in /run/gone)" >> $out/result.json
      echo "doc=$(sha256sum /run/in/doc.bin | cut -d' ' -f1)" ;;
    symlink) echo a > $out/a.txt; ln -s a.txt $out/link.txt ;;
    fifo) echo a > $out/a.txt; mkfifo $out/pipe ;;
    hardlink) echo a > $out/a; ln $out/a $out/b ;;
    badname) echo a > $out/a.txt; touch "$(printf '/run/out/bad\377name')" ;;
    ctrlname) echo a > $out/a.txt; touch "$(printf '/run/out/tab\tname')" ;;
    deep)
      d=$out; for i in $(seq 33); do d=$d/d; done
      mkdir -p $d && touch $d/f ;;
    exact)
      dd if=/dev/zero of=$out/a.bin bs=4096 count=48 2>/dev/null &&
        dd if=/dev/zero of=$out/b.bin bs=4096 count=16 2>/dev/null && echo "dd=0" ;;
    sparse) dd if=/dev/zero of=$out/a.bin bs=4096 count=48 2>/dev/null
      truncate -s 65537 $out/b.bin ;;
    huge) truncate -s 1099511627776 $out/huge.bin && echo truncated ;;
    many) for i in $(seq 9); do touch $out/f$i; done ;;
    nonzero)
      echo "in=[$(ls -A /run/in)] rc=$? $(stat -c '%u %a' /run/in)"
      echo partial > $out/partial.txt; exit 3 ;;
    sleep) echo early > $out/early.txt; exec sleep 30 ;;
    esac
    """)


class MemorySink:
    """An in-memory ArtifactSink that records what it was given and what it dropped."""

    def __init__(self, *, fail_at: int | None = None) -> None:
        self.kept: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.discards = 0
        self.largest_chunk = 0
        self.fail_at = fail_at

    def put(self, name: str, size: int, chunks: Iterable[bytes]) -> StoredArtifact:
        self.puts.append(name)
        if self.fail_at is not None and len(self.puts) >= self.fail_at:
            raise StorageError("the test's store is full")
        data = bytearray()
        for chunk in chunks:
            self.largest_chunk = max(self.largest_chunk, len(chunk))
            data += chunk
        assert len(data) == size, (name, len(data), size)
        self.kept[name] = bytes(data)
        return StoredArtifact(name=name, size=size, sha256=hashlib.sha256(data).hexdigest(),
                              media_type="application/octet-stream")

    def discard(self) -> None:
        self.discards += 1
        self.kept.clear()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory,
          docker_client: docker.DockerClient) -> Iterator[str]:
    """The test processor's local image id (removed after the module)."""
    with shell_processor(tmp_path_factory.mktemp("files-processor"), MAIN,
                         docker_client) as built:
        yield built


@pytest.fixture(scope="module")
def sandboxes() -> dict[bool, Sandbox]:
    """One sandbox per path, in a deployment of their own (no reconciler touches it)."""
    made = {}
    for direct in (True, False):
        config = SandboxConfig(instance=f"files-{SESSION}", stop_grace_seconds=1,
                               allow_image_ids=True, artifact_max_files=MAX_FILES,
                               direct_volume_io=direct)
        made[direct] = Sandbox(docker.from_env(), config)
        assert made[direct].transfers.direct_io() is direct
    return made


def in_memory(name: str, data: bytes, *, size: int | None = None) -> InputFile:
    return InputFile(name=name, size=len(data) if size is None else size,
                     open=lambda: io.BytesIO(data))


Run = Callable[..., tuple[Outcome, MemorySink | None, bytes]]


@pytest.fixture
def run(image: str, sandboxes: dict[bool, Sandbox]) -> Run:
    """Run one mode through one path: the outcome, the sink and the logs."""
    def go(mode: str, direct: bool, *, files: tuple[InputFile, ...] = (),
           sink: MemorySink | None = None, output_bytes: int = BOUND,
           timeout: float = 30, with_sink: bool = True) -> tuple[Outcome, MemorySink | None,
                                                                 bytes]:
        sink = sink if sink is not None else (MemorySink() if with_sink else None)
        spec = ContainerSpec(
            name=f"runner-files-{SESSION}-{mode}-{'direct' if direct else 'archive'}",
            image=image, cpus=0.5, memory_bytes=64 * MiB, pids_limit=32,
            timeout_seconds=timeout, log_cap_bytes=MiB, output_bytes=output_bytes,
            input_json=json.dumps({"mode": mode}).encode(), files=files,
            labels={RUN_LABEL: f"files-{SESSION}", WORKER_LABEL: f"files-{SESSION}"})
        logs: list[bytes] = []
        outcome = sandboxes[direct].run(spec, on_log=logs.append, artifacts=sink)
        assert not sandboxes[direct].run_fs.directory(spec.name).exists()
        return outcome, sink, b"".join(logs)
    return go


def result_of(outcome: Outcome) -> Any:
    assert outcome.result.status is ResultStatus.OK, outcome
    assert outcome.result.data is not None
    return json.loads(outcome.result.data)


@PATHS
def test_a_file_goes_in_read_only_and_comes_back_out_byte_exact(run: Run, direct: bool
                                                                ) -> None:
    document = os.urandom(MiB + 12345)  # more than one chunk each way
    outcome, sink, logs = run("copy", direct, files=(in_memory("doc.bin", document),),
                              output_bytes=4 * MiB)
    assert sink is not None
    assert outcome.exit_code == 0, logs
    assert f"in=0 555 doc=0 444 {len(document)}".encode() in logs
    assert result_of(outcome) == {"copied": True}
    collected = outcome.artifacts
    assert collected.status is ArtifactStatus.OK and collected.problem is None
    # Sorted by name; result.json and the empty directories are no artifacts.
    assert [(i.name, i.size) for i in collected.items] == [
        ("copy.bin", len(document)), ("dir/sub/file.txt", 6)]
    assert collected.items[0].sha256 == hashlib.sha256(document).hexdigest()
    assert sink.kept == {"copy.bin": document, "dir/sub/file.txt": b"hello\n"}
    assert 0 < sink.largest_chunk <= MiB and sink.discards == 0


@PATHS
def test_the_processor_can_change_nothing_in_run_in(run: Run, direct: bool) -> None:
    document = b"the original\n"
    outcome, sink, logs = run("readonly", direct, files=(in_memory("doc.bin", document),),
                              with_sink=False)
    assert outcome.exit_code == 0, logs
    attempts = result_of(outcome)
    assert attempts == dict.fromkeys(attempts, "failed")
    assert len(attempts) == 8
    assert f"doc={hashlib.sha256(document).hexdigest()}".encode() in logs
    # Without a sink nothing under /run/out is walked.
    assert sink is None and outcome.artifacts.status is ArtifactStatus.NONE


@PATHS
def test_a_run_without_files_still_has_an_empty_run_in_and_a_failure_still_collects(
        run: Run, direct: bool) -> None:
    outcome, sink, logs = run("nonzero", direct)
    assert sink is not None
    assert outcome.exit_code == 3
    assert b"in=[] rc=0 0 555" in logs
    assert outcome.result.status is ResultStatus.ABSENT  # only a clean exit has a result
    assert outcome.artifacts.status is ArtifactStatus.OK
    assert [i.name for i in outcome.artifacts.items] == ["partial.txt"]
    assert sink.kept == {"partial.txt": b"partial\n"}


REFUSED = [
    ("symlink", ArtifactStatus.INVALID, "out/link.txt is a symlink"),
    ("fifo", ArtifactStatus.INVALID, "out/pipe is a FIFO"),
    ("hardlink", ArtifactStatus.INVALID, "is a hard link"),
    ("badname", ArtifactStatus.INVALID, "out/bad\\xffname has a name that is not valid UTF-8"),
    ("ctrlname", ArtifactStatus.INVALID, "out/tab\\x09name has a control character"),
    ("deep", ArtifactStatus.INVALID, "is more than 32 directories deep"),
    ("sparse", ArtifactStatus.TOO_LARGE, "out/b.bin takes the artifacts to 262145 bytes, "
                                         "more than the output bound of 262144"),
    ("huge", ArtifactStatus.TOO_LARGE, "out/huge.bin takes the artifacts to 1099511627776"),
    ("many", ArtifactStatus.TOO_LARGE, f"more than {MAX_FILES} files under out/"),
]


@PATHS
@pytest.mark.parametrize(("mode", "status", "problem"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_bad_entry_refuses_the_whole_tree_and_nothing_is_kept(
        run: Run, direct: bool, mode: str, status: ArtifactStatus, problem: str) -> None:
    outcome, sink, logs = run(mode, direct)
    assert sink is not None
    assert outcome.exit_code == 0, logs
    collected = outcome.artifacts
    assert collected.status is status, collected
    assert collected.problem is not None and problem in collected.problem, collected.problem
    assert collected.items == () and sink.kept == {}
    if direct:  # the whole tree is judged before a byte is read
        assert sink.puts == []
    else:  # judged as the stream goes: what was put before is discarded
        assert sink.puts == [] or sink.discards == 1, (sink.puts, sink.discards)
    if mode == "hardlink":
        assert collected.problem in ("out/a is a hard link", "out/b is a hard link")


@PATHS
def test_artifacts_of_exactly_the_bound_are_kept(run: Run, direct: bool) -> None:
    outcome, sink, logs = run("exact", direct)
    assert sink is not None
    assert b"dd=0" in logs  # the bound left room for exactly this much
    assert outcome.artifacts.status is ArtifactStatus.OK, outcome.artifacts
    assert sum(i.size for i in outcome.artifacts.items) == BOUND
    assert sorted(sink.kept) == ["a.bin", "b.bin"]


@PATHS
def test_a_timed_out_run_collects_nothing(run: Run, direct: bool) -> None:
    outcome, sink, _ = run("sleep", direct, timeout=1)
    assert sink is not None
    assert outcome.timed_out
    assert outcome.artifacts.status is ArtifactStatus.NONE and sink.puts == []


@PATHS
@pytest.mark.parametrize("size_delta", [-3, 3], ids=["short", "long"])
def test_a_reader_of_another_size_than_announced_stops_the_run_before_the_start(
        run: Run, direct: bool, size_delta: int, sandboxes: dict[bool, Sandbox],
        docker_client: docker.DockerClient) -> None:
    data = b"0123456789"
    wrong = in_memory("doc.bin", data, size=len(data) - size_delta)
    with pytest.raises(SandboxError) as caught:
        run("copy", direct, files=(in_memory("ok.txt", b"fine"), wrong))
    assert caught.value.context["stage"] == "deliver input"
    assert "in/doc.bin" in caught.value.message
    name = f"runner-files-{SESSION}-copy-{'direct' if direct else 'archive'}"
    assert docker_client.containers.list(all=True, filters={"name": name}) == []
    assert not sandboxes[direct].run_fs.directory(name).exists()


@PATHS
def test_a_failing_sink_drops_what_it_was_given_and_the_run_raises(run: Run, direct: bool
                                                                   ) -> None:
    sink = MemorySink(fail_at=2)
    with pytest.raises(StorageError):
        run("copy", direct, files=(in_memory("doc.bin", b"x" * 100),), sink=sink,
            output_bytes=4 * MiB)
    assert sink.puts == ["copy.bin", "dir/sub/file.txt"]
    assert sink.discards == 1 and sink.kept == {}


def test_the_run_filesystem_holds_the_files_and_leaves_the_processor_its_bound(
        sandboxes: dict[bool, Sandbox]) -> None:
    """Many files of awkward sizes under long names: what they take of the filesystem
    is within the footprint the image is made for, and the seal still leaves exactly
    the bound."""
    sandbox = sandboxes[True]
    files = tuple(in_memory(f"{'n' * 120}-{i}", b"z" * ((i % 5) * 4096 + i % 3))
                  for i in range(300))
    spec = ContainerSpec(name=f"runner-files-{SESSION}-fit", image="unused", cpus=1,
                         memory_bytes=MiB, pids_limit=1, timeout_seconds=1, log_cap_bytes=1,
                         input_json=b"{}", output_bytes=BOUND, files=files)
    footprint = provenance.input_bytes(spec)
    fs = sandbox.run_fs.create(spec.name, output_bytes=BOUND, input_bytes=footprint)
    try:
        before = os.statvfs(fs.path)
        VolumeTransfer(fs.path, sandbox.config).deliver(spec.input_json, spec.files)
        after = os.statvfs(fs.path)
        used = (before.f_bfree - after.f_bfree) * after.f_frsize
        # The footprint, and the two directory blocks the image adds for in/ and out/.
        assert used <= footprint + 2 * 4096, (used, footprint)
        print(f"\n300 input files: {used} bytes used, footprint {footprint}")
        assert sandbox.run_fs.seal(fs) == BOUND
        assert sorted(os.listdir(fs.path / "in")) == sorted(f.name for f in files)
    finally:
        sandbox.run_fs.release(fs)
