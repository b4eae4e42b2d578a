"""Devices end to end: the host runner, qemu-emulated Raspberry Pis, a real sshd on 127.0.0.1.

Needs the runner bundles (`bash tools/setup.sh` builds them with tools/build_runtime.sh).
The SSH tests start their own sshd on a free port of 127.0.0.1 (installing openssh-server
if missing) whose remote command runs the aarch64 bundle through qemu.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, assert_user_error, run_cli

pytestmark = [pytest.mark.device, pytest.mark.slow]

N_IMAGES = 20
RUNTIME = Path(os.environ.get("VITQ_RUNTIME_DIR", REPO / "build" / "runtime"))
PLUGIN = RUNTIME / "qemu-plugin" / "libinsn_count.so"
QEMU = shutil.which("qemu-aarch64")


@pytest.fixture(scope="module", autouse=True)
def bundles() -> Path:
    missing = [p for p in ("host/bin/vitq-runner", "aarch64/bin/vitq-runner", "pi-prefix/rpi4/proc/cpuinfo",
                           "pi-prefix/rpi5/proc/cpuinfo") if not (RUNTIME / p).exists()]
    if missing or QEMU is None:
        pytest.fail(f"runner bundles or qemu missing ({', '.join(missing) or 'qemu-aarch64'}); "
                    "run `bash tools/setup.sh`")
    return RUNTIME


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("device-builds") / "int8"
    result = run_cli("build", "--recipe", "xnnpack-int8", "--calib-limit", "64", "--eval-limit", "50",
                     "--out", str(out), "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def program(tmp_path) -> Path:
    """A .pte that is never loaded: for failures that must happen before anything runs."""
    pte = tmp_path / "lonely" / "model.pte"
    pte.parent.mkdir()
    pte.write_bytes(b"not read by these tests")
    return pte


@pytest.fixture
def build_copy(build, tmp_path) -> Path:
    """A private copy, for tests that change the manifest or the program."""
    return Path(shutil.copytree(build, tmp_path / "int8"))


@pytest.fixture(scope="module")
def logits(build) -> dict[str, np.ndarray]:
    """The first N_IMAGES' logits from the Python runtime, the host runner and both emulated Pis."""
    from vitq_edge.evaluate import device_logits
    from vitq_edge.progress import set_quiet

    set_quiet(True)
    out = {}
    for device in ("host", "emulated-rpi4", "emulated-rpi5"):
        out[device], labels, info = device_logits(build, device, limit=N_IMAGES)
        assert info["device"] == device and len(labels) == N_IMAGES
        if device.startswith("emulated"):
            assert info["detected_cpu"]["uarch"] == {"emulated-rpi4": "cortex-a72",
                                                     "emulated-rpi5": "cortex-a76"}[device]
    out["labels"] = labels
    out["python"] = _python_runtime_logits(build)
    return out


def _python_runtime_logits(build: Path) -> np.ndarray:
    import torch
    from vitq_edge.artifacts import resolve_build
    from vitq_edge.data.datasets import bundled_set
    from vitq_edge.data.preprocess import Preprocess
    from vitq_edge.device.host_runtime import HostProgram

    pte, manifest = resolve_build(build)
    x, _ = next(bundled_set("eval").limit(N_IMAGES).batches(Preprocess.from_manifest(manifest["input"]), N_IMAGES))
    with torch.no_grad():
        return HostProgram(pte)(x).numpy()


# ---- accuracy: every device computes the same answers ----


@pytest.mark.parametrize("device", ["host", "emulated-rpi4", "emulated-rpi5"])
def test_runner_agrees_with_python_runtime_on_top1(logits, device):
    assert logits[device].shape == (N_IMAGES, 10)
    np.testing.assert_array_equal(logits[device].argmax(-1), logits["python"].argmax(-1))
    # Same program, different XNNPACK kernels (x86 vs Cortex-A72/A76): close, not bit-equal.
    assert np.abs(logits[device] - logits["python"]).max() < 0.05 * (np.abs(logits["python"]).max() + 1)


def test_eval_cli_on_emulated_device_matches_runner_logits(build, logits):
    result = run_cli("eval", str(build), "--device", "emulated-rpi4", "--limit", str(N_IMAGES), "--json", "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["n"] == N_IMAGES and report["device"] == "emulated-rpi4" and report["runtime"] == "vitq-runner"
    expected = 100.0 * np.mean(logits["emulated-rpi4"].argmax(-1) == logits["labels"])
    assert report["top1"] == round(expected, 2)
    assert report["top5"] >= report["top1"]


def test_eval_help_says_which_runtime_runs():
    result = run_cli("eval", "--help")
    assert result.code == 0
    assert "Python runtime" in result.stdout and "--device" in result.stdout and "emulated-rpi4" in result.stdout
    assert "VITQ_SSH_WRAPPER" in result.stdout and "VITQ_RUNTIME_DIR" in result.stdout


# ---- bench: latency, instructions, memory, size; recorded in the manifest ----


def test_bench_host_appends_to_manifest(build_copy):
    before = json.loads((build_copy / "manifest.json").read_text())
    for _ in range(2):
        result = run_cli("bench", str(build_copy), "--device", "host", "--runs", "3", "--json", "--quiet")
        assert result.code == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["device"] == "host" and report["runs"] == 3 and report["threads"] == 1
    assert report["latency_ms"]["count"] == 3 and 0 < report["latency_ms"]["median"] < 1000
    assert report["size_bytes"] == (build_copy / "model.pte").stat().st_size
    # The runner's own peak memory, not that of the Python process that started it.
    assert 0 < report["peak_rss_mb"] < 200
    assert report["instructions_per_inference"] is None
    assert report["kernels_gemm"] is None  # a stock program: no vitq:: ops, so no GEMM of ours ran
    manifest = json.loads((build_copy / "manifest.json").read_text())
    assert len(manifest["benchmarks"]) == 2 and manifest["benchmarks"][1]["latency_ms"] == report["latency_ms"]
    assert {k: v for k, v in manifest.items() if k != "benchmarks"} == before
    assert sorted(p.name for p in build_copy.iterdir()) == ["manifest.json", "model.pte", "report.md"]


def test_emulated_instruction_counts_repeat_exactly(build_copy):
    if not PLUGIN.is_file():
        pytest.skip(f"the qemu plugin {PLUGIN} is not built (tools/build_runtime.sh)")
    reports = []
    for _ in range(2):
        result = run_cli("bench", str(build_copy), "--device", "emulated-rpi4", "--runs", "2", "--json", "--quiet")
        assert result.code == 0, result.stderr[-3000:]
        reports.append(json.loads(result.stdout))
    first, second = (r["instructions_per_inference"] for r in reports)
    assert first == second and first > 1_000_000, (first, second)
    assert reports[0]["instructions"]["exact"] and reports[0]["latency_is_emulated"]
    assert reports[0]["detected_cpu"]["uarch"] == "cortex-a72"
    manifest = json.loads((build_copy / "manifest.json").read_text())
    assert [b["instructions_per_inference"] for b in manifest["benchmarks"]] == [first, first]


def test_emulated_critical_path_of_two_threads(build_copy):
    """--threads 2 on an emulated Pi: the modelled critical path, repeatable, between the
    work of all threads split evenly and the one-thread count."""
    if not PLUGIN.is_file():
        pytest.skip(f"the qemu plugin {PLUGIN} is not built (tools/build_runtime.sh)")

    def bench(threads: int) -> dict:
        result = run_cli("bench", str(build_copy), "--device", "emulated-rpi4", "--runs", "2", "--threads",
                         str(threads), "--json", "--quiet", "--no-record")
        assert result.code == 0, result.stderr[-3000:]
        return json.loads(result.stdout)["instructions"]

    one = bench(1)
    assert one["method"] == "one thread" and one["exact"]
    runs = [bench(2), bench(2)]
    for ins in runs:
        assert ins["method"] == "critical path" and ins["exact"] and ins["threads"] == 2, ins
        # The pool's code was recognised: the workers ran nothing but tasks and the pool.
        assert ins["untracked"] <= ins["work"] // 1000, ins
        assert ins["tasks"] > ins["regions"] > 0, ins
        # The same program's work, whatever the split (tiles are planned per thread count, and the
        # 1-thread count holds the pool's loops): none of it may hide in the pool's bucket, as a
        # task reached by a tail call did (ExecuTorch's quantize ops through std::function).
        assert abs(ins["work"] - one["per_inference"]) < 0.03 * one["per_inference"], (ins, one)
        assert ins["work"] / 2 <= ins["per_inference"] < 0.9 * one["per_inference"], (ins, one)
    first, second = (ins["per_inference"] for ins in runs)
    assert abs(first - second) <= 0.02 * first, (first, second)


def test_insn_profile_adds_up_to_the_bench_count(tmp_path):
    """tools/insn_profile.py (the hot_blocks plugin's blocks, named by their functions) on a vitq::
    attention program: its total is bench's exact one-thread count, and the attention kernel's
    function carries most of it."""
    import sys

    import torch
    from vitq_edge.lower import ops  # noqa: F401  (torch.ops.vitq)
    from vitq_edge.lower.one_op import one_op_program

    if not (RUNTIME / "qemu-plugin" / "libhot_blocks.so").is_file() or not PLUGIN.is_file():
        pytest.skip("the qemu plugins are not built (tools/build_runtime.sh plugin)")
    uniform = [0.05, 128, 0, 255]
    args = [3, 0.125, *uniform, *uniform, *uniform, 0.9, 0, 0, 0, 8, 16]  # log probabilities, 16 steps per octave
    qkv = torch.randn(1, 33, 3 * 3 * 16, generator=torch.Generator().manual_seed(3))
    pte = tmp_path / "attention.pte"
    pte.write_bytes(one_op_program(torch.ops.vitq.attention, qkv, args))
    result = run_cli("bench", str(pte), "--device", "emulated-rpi4", "--runs", "1", "--threads", "1", "--json",
                     "--quiet", "--no-record")
    assert result.code == 0, result.stderr[-3000:]
    counted = json.loads(result.stdout)["instructions_per_inference"]
    out = tmp_path / "profile.md"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "insn_profile.py"), str(pte), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    total = int(text.split(" guest instructions per inference")[0].split("\n")[-1].replace(",", ""))
    assert abs(total - counted) <= 1e-4 * counted, (total, counted)  # bench passes an input file: a few more
    first = next(line for line in text.splitlines() if line.startswith("| ") and "libvitq_kernels.so" in line)
    assert "log_tile" in first, first  # op_attention.cpp's tile of log probability codes, by name


def test_bench_without_plugin_skips_counting_with_a_note(build_copy, tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    for name in ("host", "aarch64", "pi-prefix"):
        (runtime / name).symlink_to(RUNTIME / name)
    result = run_cli("bench", str(build_copy), "--device", "emulated-rpi5", "--runs", "1", "--no-record",
                     env={"VITQ_RUNTIME_DIR": str(runtime)})
    assert result.code == 0, result.stderr[-3000:]
    assert "instruction counts skipped" in result.stdout and "libinsn_count.so" in result.stdout
    assert "latency" in result.stdout and "not recorded (--no-record)" in result.stdout
    assert "benchmarks" not in json.loads((build_copy / "manifest.json").read_text())


# ---- bench --profile: ETDump -> ExecuTorch's Inspector -> slowest operators / delegate calls ----


def _check_profile(report: dict, runs: int) -> dict:
    """What every profile of the stock int8 program shows, on any device."""
    prof = report["profile"]
    assert prof["runs"] == runs and prof["inference_ms"] > 0
    rows = prof["rows"]
    # The rows tile Method::execute: their shares add up to 100%.
    assert abs(sum(r["share"] for r in rows) - 100.0) < 0.05, [r["share"] for r in rows]
    assert abs(sum(r["mean_ms"] for r in rows) - prof["inference_ms"]) < 1e-3 * prof["inference_ms"] + 1e-5
    assert [r["total_ms"] for r in rows] == sorted((r["total_ms"] for r in rows), reverse=True)
    delegate = [r for r in rows if r["kind"] == "delegate"]
    ops = {r["name"]: r for r in rows if r["kind"] == "operator"}
    # The XNNPACK delegate calls, named after the XNNPACK operators they run.
    assert delegate and all(r["backend"] == "XnnpackBackend" for r in delegate)
    assert any("Fully Connected" in c["name"] for r in delegate for c in r["contains"])
    assert all(r["total_ms"] > 0 and r["calls_per_inference"] >= 1 for r in delegate)
    # layer_norm stays outside XNNPACK in the stock int8 flow: 2 per block + the final one.
    norm = ops["aten::native_layer_norm.out"]
    assert norm["calls_per_inference"] == 13 and norm["total_ms"] > 0 and norm["ms_per_call"] > 0
    assert all(r["total_ms"] > 0 for r in ops.values())
    assert sum(r["calls_per_inference"] for r in delegate) + sum(r["calls_per_inference"] for r in ops.values()) \
        == len({i for r in rows for i in r["instructions"]})
    # XNNPACK's own per-operator times inside those calls.
    inner = {r["name"]: r for r in prof["delegate_operators"]}
    assert inner["Fully Connected (NC, QS8, QC8W) GEMM"]["total_ms"] > 0
    assert abs(sum(r["share"] for r in inner.values()) - sum(r["share"] for r in delegate)) < 0.05
    return prof


def test_bench_profile_on_host(build_copy):
    result = run_cli("bench", str(build_copy), "--device", "host", "--runs", "4", "--profile", "--json", "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    prof = _check_profile(report, runs=4)
    assert not prof["latency_is_emulated"] and prof["traced_latency_ms"]["count"] == 4
    # The recorded timings are those of the untraced run.
    manifest = json.loads((build_copy / "manifest.json").read_text())
    assert manifest["benchmarks"][-1]["latency_ms"] == report["latency_ms"]
    assert prof["untraced_median_ms"] == report["latency_ms"]["median"]
    # The raw ETDump beside the build, written whole (no temporary file left), readable again.
    saved = build_copy / "profile-host.etdp"
    assert prof["etdump"] == str(saved) and saved.stat().st_size == prof["etdump_bytes"] > 0
    assert sorted(p.name for p in build_copy.iterdir()) == ["manifest.json", "model.pte", "profile-host.etdp",
                                                            "report.md"]
    from vitq_edge.profile import summarize

    assert summarize(saved.read_bytes(), build_copy / "model.pte")["rows"] == prof["rows"]

    text = run_cli("bench", str(build_copy), "--device", "host", "--runs", "2", "--profile", "--top", "3",
                   "--no-record", "--quiet")
    assert text.code == 0, text.stderr[-3000:]
    lines = text.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("profile: slowest operators"))
    assert "(wall time)" in lines[start] and "emulated" not in lines[start]
    assert lines[start + 2] == f"  ETDump: {saved}"
    table = lines[start + 4:start + 7]
    assert all(line.strip()[0].isdigit() and "%" in line for line in table), table
    assert "more rows; --top N" in lines[start + 7]
    assert any("XnnpackBackend call: " in line for line in table), table
    assert "inside the delegate calls" in text.stdout and "XnnpackBackend: Fully Connected" in text.stdout


def test_bench_profile_on_emulated_rpi4(build_copy):
    from vitq_edge.bench import format_bench

    result = run_cli("bench", str(build_copy), "--device", "emulated-rpi4", "--runs", "2", "--profile", "--json",
                     "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    prof = _check_profile(report, runs=2)
    assert prof["latency_is_emulated"] and report["detected_cpu"]["uarch"] == "cortex-a72"
    assert (build_copy / "profile-emulated-rpi4.etdp").stat().st_size == prof["etdump_bytes"]
    if PLUGIN.is_file():  # the instruction counts come from the untraced run, as without --profile
        assert report["instructions"]["exact"] and report["instructions_per_inference"] > 1_000_000
    header = next(line for line in format_bench(report).splitlines() if line.startswith("profile:"))
    assert "emulated wall time under qemu, not the board's" in header


def test_bench_top_needs_profile(program):
    assert_user_error(run_cli("bench", str(program), "--top", "3"), "--top", "--profile")
    help_text = run_cli("bench", "--help")
    assert help_text.code == 0 and "--profile" in help_text.stdout and "--top N" in help_text.stdout
    assert "Inspector" in help_text.stdout and "emulated wall time" in help_text.stdout


# ---- a real sshd on 127.0.0.1 ----


@dataclass
class Sshd:
    port: int
    user: str
    env: dict  # VITQ_SSH_* for a key it accepts
    wrong_key_env: dict
    log: Path

    @property
    def device(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install_openssh_server() -> None:
    """apt-get install openssh-server, without letting the package start the system sshd."""
    if os.geteuid() != 0:
        pytest.skip("openssh-server is not installed and installing it needs root")
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")  # Debian's switch: do not start services now
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "openssh-server"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode != 0:
                pytest.skip(f"cannot install openssh-server ({' '.join(cmd)}: {proc.stderr.strip()[-300:]})")
    finally:
        if ours:
            policy.unlink()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Sshd:
    sshd_bin = Path("/usr/sbin/sshd")
    if not sshd_bin.exists():
        _install_openssh_server()
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "wrong_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(f"""
Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = d / "sshd.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([str(sshd_bin), "-D", "-e", "-f", str(d / "sshd_config")], stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.settimeout(1)
                s.connect(("127.0.0.1", port))
                if s.recv(16).startswith(b"SSH-"):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        # Never the user's ~/.ssh/config or known_hosts, never an agent's keys.
        base = f"-F /dev/null -o IdentitiesOnly=yes -o UserKnownHostsFile={d / 'known_hosts'}"
        wrapper = f"{shlex.quote(QEMU)} -cpu cortex-a72 -L {shlex.quote(str(RUNTIME / 'pi-prefix' / 'rpi4'))}"
        user = getpass.getuser()
        yield Sshd(port, user,
                   env={"VITQ_SSH_OPTS": f"{base} -i {d / 'client_key'}", "VITQ_SSH_WRAPPER": wrapper,
                        "SSH_AUTH_SOCK": ""},
                   wrong_key_env={"VITQ_SSH_OPTS": f"{base} -i {d / 'wrong_key'}", "VITQ_SSH_WRAPPER": wrapper,
                                  "SSH_AUTH_SOCK": ""},
                   log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _remote_leftovers() -> set[str]:
    return {p.name for p in Path("/tmp").glob("vitq-edge.*")}


def test_ssh_device_runs_the_aarch64_bundle_and_cleans_up(build, sshd, logits, monkeypatch):
    from vitq_edge.evaluate import device_logits

    before = _remote_leftovers()
    for key, value in sshd.env.items():
        monkeypatch.setenv(key, value)
    remote, labels, info = device_logits(build, sshd.device, limit=N_IMAGES)
    # The same aarch64 runner under the same qemu Pi 4 as emulated-rpi4: bit-identical logits.
    np.testing.assert_array_equal(remote, logits["emulated-rpi4"])
    assert info["detected_cpu"]["uarch"] == "cortex-a72"
    assert _remote_leftovers() == before


def test_bench_over_ssh_records_in_manifest(build_copy, sshd):
    before = _remote_leftovers()
    result = run_cli("bench", str(build_copy), "--device", sshd.device, "--runs", "2", "--json", "--quiet",
                     env=sshd.env)
    assert result.code == 0, result.stderr[-3000:] + sshd.log.read_text()[-2000:]
    report = json.loads(result.stdout)
    assert report["device"] == sshd.device and report["latency_ms"]["count"] == 2
    assert report["detected_cpu"]["uarch"] == "cortex-a72"
    manifest = json.loads((build_copy / "manifest.json").read_text())
    assert manifest["benchmarks"][-1]["device"] == sshd.device
    assert _remote_leftovers() == before


def test_bench_profile_over_ssh_fetches_the_etdump(build_copy, sshd):
    before = _remote_leftovers()
    result = run_cli("bench", str(build_copy), "--device", sshd.device, "--runs", "2", "--profile", "--no-record",
                     "--json", "--quiet", env=sshd.env)
    assert result.code == 0, result.stderr[-3000:] + sshd.log.read_text()[-2000:]
    prof = _check_profile(json.loads(result.stdout), runs=2)
    saved = build_copy / f"profile-ssh_{sshd.user}_127.0.0.1_{sshd.port}.etdp"
    assert prof["etdump"] == str(saved) and saved.stat().st_size == prof["etdump_bytes"]
    assert _remote_leftovers() == before


def test_ssh_run_timeout_stops_the_remote_runner(build_copy, sshd):
    before = _remote_leftovers()
    result = run_cli("bench", str(build_copy), "--device", sshd.device, "--runs", "500", "--timeout", "3",
                     env=sshd.env)
    assert_user_error(result, "--timeout 3")
    time.sleep(0.5)
    # The "remote" is this machine: its runner (under qemu) must be gone, and its folder too.
    assert not [p for p in Path("/proc").glob("[0-9]*") if _cwd(p).startswith("/tmp/vitq-edge.")]
    assert _remote_leftovers() == before


def _cwd(proc_dir: Path) -> str:
    try:
        return os.readlink(proc_dir / "cwd")
    except OSError:
        return ""


# ---- failure paths: one line, exit code 2 ----


def test_ssh_unreachable_host(program):
    port = _free_port()  # closed: nothing listens there
    result = run_cli("bench", str(program), "--device", f"ssh://nobody@127.0.0.1:{port}", "--no-record",
                     env={"VITQ_SSH_OPTS": "-F /dev/null -o UserKnownHostsFile=/dev/null"})
    assert_user_error(result, "connection refused", str(port))


def test_ssh_authentication_failure(program, sshd):
    result = run_cli("bench", str(program), "--device", sshd.device, env=sshd.wrong_key_env)
    assert_user_error(result, "authentication", "ssh-copy-id")


def test_ssh_connect_timeout(program):
    with socket.socket() as silent:  # accepts TCP connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        t0 = time.monotonic()
        result = run_cli("bench", str(program), "--device", f"ssh://nobody@127.0.0.1:{silent.getsockname()[1]}",
                         env={"VITQ_SSH_CONNECT_TIMEOUT": "2",
                                             "VITQ_SSH_OPTS": "-F /dev/null -o UserKnownHostsFile=/dev/null"})
    assert_user_error(result, "timed out", "VITQ_SSH_CONNECT_TIMEOUT")
    assert time.monotonic() - t0 < 60


def test_ssh_remote_without_qemu_and_without_wrapper(program, sshd):
    before = _remote_leftovers()
    env = {**sshd.env, "VITQ_SSH_WRAPPER": "/nonexistent/qemu-aarch64 -L /nowhere"}
    assert_user_error(run_cli("bench", str(program), "--device", sshd.device, env=env), "VITQ_SSH_WRAPPER")
    if os.uname().machine not in ("aarch64", "arm64"):
        env = {**sshd.env, "VITQ_SSH_WRAPPER": ""}
        assert_user_error(run_cli("bench", str(program), "--device", sshd.device, env=env), "built for aarch64")
    assert _remote_leftovers() == before


def test_run_timeout_stops_the_emulator(build_copy):
    result = run_cli("bench", str(build_copy), "--device", "emulated-rpi4", "--runs", "500", "--timeout", "2")
    assert_user_error(result, "--timeout 2")
    time.sleep(0.5)
    pte = str(build_copy / "model.pte")
    left = [p for p in Path("/proc").glob("[0-9]*") if pte in _cmdline(p)]
    assert not left, "the emulator kept running after the timeout"
    assert "benchmarks" not in json.loads((build_copy / "manifest.json").read_text())


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_missing_qemu(program, tmp_path):
    assert_user_error(run_cli("bench", str(program), "--device", "emulated-rpi4",
                              env={"VITQ_QEMU": str(tmp_path / "no" / "qemu-aarch64")}), "VITQ_QEMU")
    no_qemu = tmp_path / "bin"
    no_qemu.mkdir()
    assert_user_error(run_cli("bench", str(program), "--device", "emulated-rpi5", env={"PATH": str(no_qemu)}),
                      "qemu-aarch64 is not installed", "qemu-user")


def test_wrong_architecture_bundles(program, tmp_path):
    swapped = tmp_path / "runtime"
    swapped.mkdir()
    (swapped / "aarch64").symlink_to(RUNTIME / "host")  # an x86-64 runner where the aarch64 one belongs
    (swapped / "host").symlink_to(RUNTIME / "aarch64")
    (swapped / "pi-prefix").symlink_to(RUNTIME / "pi-prefix")
    env = {"VITQ_RUNTIME_DIR": str(swapped)}
    host_arch = "x86-64" if os.uname().machine == "x86_64" else os.uname().machine
    assert_user_error(run_cli("bench", str(program), "--device", "emulated-rpi4", env=env),
                      f"built for {host_arch}, not aarch64", "build_runtime.sh")
    if host_arch != "aarch64":
        assert_user_error(run_cli("bench", str(program), "--device", "host", env=env), "built for aarch64")


def test_missing_bundle_names_the_build_command(program, tmp_path):
    result = run_cli("bench", str(program), "--device", "emulated-rpi4", env={"VITQ_RUNTIME_DIR": str(tmp_path)})
    assert_user_error(result, "bundle is missing", "build_runtime.sh aarch64")


def test_truncated_program(build_copy):
    data = (build_copy / "model.pte").read_bytes()
    (build_copy / "model.pte").write_bytes(data[: len(data) // 3])
    assert_user_error(run_cli("bench", str(build_copy), "--device", "emulated-rpi4"),
                      "not a loadable ExecuTorch program")
    assert_user_error(run_cli("eval", str(build_copy), "--device", "host", "--limit", "2"), "not a loadable")
    assert "benchmarks" not in json.loads((build_copy / "manifest.json").read_text())


@pytest.mark.parametrize("device, fragment", [
    ("emulated-rpi3", "unknown device 'emulated-rpi3'"),
    ("ssh://pi@host:notaport", "ssh://user@host:port"),
])
def test_bad_device_names(program, device, fragment):
    assert_user_error(run_cli("bench", str(program), "--device", device), fragment)


def test_runner_refuses_an_absurd_thread_count(program):
    """--threads far above any board's core count is refused before anything runs (pthreadpool
    used to be asked for 100000 threads and crash the runner with SIGSEGV at exit)."""
    runner = RUNTIME / "host" / "bin" / "vitq-runner"
    proc = subprocess.run([str(runner), "--threads", "100000", str(program)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout == ""
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("vitq-runner: error:")]
    assert len(error_lines) == 1, proc.stderr[-2000:]
    assert "--threads 100000" in error_lines[0] and "limit of 256" in error_lines[0], error_lines[0]
