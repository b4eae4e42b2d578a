"""`--device ssh://user@host[:port]`: a real board (a Raspberry Pi) reached with the system ssh/scp.

A session makes a temporary folder on the device, copies the aarch64 runner bundle and the
`.pte` into it, and for each run copies the inputs, runs the runner, and fetches its report
and outputs; at the end it removes the folder. The bundle needs glibc >= 2.34 on the device
(64-bit Raspberry Pi OS Bookworm or later).

Logins are key-based and never interactive (BatchMode=yes): a missing key is an error, not a
password prompt. Unknown host keys are accepted on first contact and checked afterwards
(StrictHostKeyChecking=accept-new). One master connection (ControlMaster) carries every
ssh/scp call of a session.

Environment:
  VITQ_SSH_OPTS             extra options for both ssh and scp, e.g. "-i ~/.ssh/pi -o UserKnownHostsFile=F";
                            given first, so they override the defaults above
  VITQ_SSH_CONNECT_TIMEOUT  seconds to connect and authenticate (default 10)
  VITQ_SSH_WRAPPER          a command the device puts before the runner, e.g.
                            "qemu-aarch64 -L /path/to/prefix" to run the aarch64 bundle on an x86 machine
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from vitq_edge.device.base import (
    ETDUMP_FILE,
    Device,
    RunRequest,
    RunResult,
    Session,
    last_line,
    load_etdump,
    load_output,
    parse_report,
    program_uses_kernels,
    run_local,
    runner_args,
    runner_error_line,
)
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import SHORT_TEMP, OwnedDir, owned_temp_dir
from vitq_edge.runtime import RUNNER, Bundle, find_bundle

log = logging.getLogger("vitq_edge")

DEFAULT_CONNECT_TIMEOUT = 10.0
TRANSFER_TIMEOUT = 900.0  # seconds for one scp (the bundle is ~12 MB)
AARCH64 = ("aarch64", "arm64")


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise VitqError(f"{name}={value} is not a positive number of seconds")
    return seconds


# What a user and host name may hold. Neither may start with "-": ssh would read it as an
# option (e.g. ssh://-oProxyCommand=...@x), whatever else guards the command line.
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*|[0-9A-Fa-f:.]+(%[A-Za-z0-9._-]+)?")


def _check_destination(spec: str, user: str | None, host: str) -> None:
    if user is not None and not _USER.fullmatch(user):
        raise VitqError(f"the user name in '{spec}' is not one ssh accepts safely (letters, digits, '.', '_', '-', "
                        "not starting with '-'); write it as ssh://user@host")
    if not _HOST.fullmatch(host):
        raise VitqError(f"the host in '{spec}' is not a host name or IP address (letters, digits, '.', '-', not "
                        "starting with '-'); write it as ssh://user@host")


class SshDevice(Device):
    def __init__(self, spec: str):
        try:
            parts = urlsplit(spec)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.password:
            raise VitqError(f"cannot read the device '{spec}'; write it as ssh://user@host or ssh://user@host:port")
        self.name = spec
        self.user = parts.username
        self.host = parts.hostname
        self.port = port
        _check_destination(spec, self.user, self.host)
        self.connect_timeout = _env_seconds("VITQ_SSH_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)
        try:
            self.extra_opts = shlex.split(os.environ.get("VITQ_SSH_OPTS", ""))
        except ValueError as exc:
            raise VitqError(f"VITQ_SSH_OPTS cannot be split into words ({exc}); check its quotes") from None
        self.wrapper = os.environ.get("VITQ_SSH_WRAPPER", "").strip()
        self._control: str | None = None
        self.cores: int | None = None  # the device's online cores, known once a session connected

    # --- identity ---------------------------------------------------------------------
    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def where(self) -> str:
        return self.destination + (f" port {self.port}" if self.port else "")

    def describe(self) -> dict:
        return {"device": self.name, "kind": "ssh", "host": self.host, "user": self.user, "port": self.port,
                "wrapper": self.wrapper or None}

    # --- ssh / scp ----------------------------------------------------------------------
    def _options(self) -> list[str]:
        # ssh keeps the first value it gets for an option: the user's come first.
        opts = [*self.extra_opts,
                "-o", "BatchMode=yes",
                "-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}",
                "-o", "StrictHostKeyChecking=accept-new",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
                "-o", "LogLevel=ERROR"]
        if self.port:
            opts += ["-o", f"Port={self.port}"]
        if self._control:
            opts += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self._control}", "-o", "ControlPersist=60"]
        return opts

    def _tool(self, name: str) -> str:
        found = shutil.which(name)
        if found is None:
            raise VitqError(f"`{name}` is not installed; install the OpenSSH client (`apt-get install openssh-client`)")
        return found

    def _call(self, cmd: list[str], timeout: float | None, what: str,
              timeout_message: str | None = None) -> subprocess.CompletedProcess:
        proc = run_local(cmd, timeout, self.where,
                         timeout_message or f"{what} on {self.where} took longer than {timeout or 0:g} s and was "
                         "stopped; check the device and the network")
        if proc.returncode == 255:  # ssh's own failure (connection, authentication, host key)
            raise self._ssh_failure(proc.stderr, what)
        return proc

    def ssh(self, remote_command: str, timeout: float | None, what: str,
            timeout_message: str | None = None) -> subprocess.CompletedProcess:
        return self._call([self._tool("ssh"), *self._options(), "-T", "--", self.destination, remote_command],
                          timeout, what, timeout_message)

    def scp(self, sources: list[str], target: str, what: str) -> None:
        proc = self._call([self._tool("scp"), "-q", "-r", *self._options(), "--", *sources, target],
                          TRANSFER_TIMEOUT, what)
        if proc.returncode != 0:
            detail = last_line(proc.stderr) or f"exit code {proc.returncode}"
            raise VitqError(f"{what} on {self.where} failed: {detail}")

    def remote(self, path: str) -> str:
        """scp's spelling of a path on the device (an IPv6 address needs brackets there)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}:{path}"

    def _ssh_failure(self, stderr: str, what: str) -> VitqError:
        line = last_line(stderr) or "ssh exited with code 255"
        low = stderr.lower()
        if "connection refused" in low:
            return VitqError(f"cannot connect to {self.where}: connection refused; check the address and port, "
                             "and that the SSH server runs on the device")
        if "timed out" in low or "timeout" in low:
            return VitqError(f"connecting to {self.where} timed out after {self.connect_timeout:g} s ({line}); check "
                             "that the device is on and reachable (VITQ_SSH_CONNECT_TIMEOUT sets the limit)")
        if "permission denied" in low or "too many authentication failures" in low:
            return VitqError(f"authentication to {self.where} failed ({line}); vitq-edge logs in with keys only "
                             f"and never asks for a password: install your key with `ssh-copy-id "
                             f"{'-p ' + str(self.port) + ' ' if self.port else ''}{self.destination}` or name one "
                             "with VITQ_SSH_OPTS='-i KEY'")
        if "host key verification failed" in low or "identification has changed" in low:
            return VitqError(f"the host key of {self.host} does not match your known_hosts ({line}); if the device "
                             f"was reinstalled, remove its old key with `ssh-keygen -R {self.host}`")
        if "could not resolve hostname" in low or "name or service not known" in low:
            return VitqError(f"cannot resolve the host name {self.host}; check the spelling or use its IP address")
        if "no route to host" in low or "network is unreachable" in low:
            return VitqError(f"cannot reach {self.where} ({line}); check the network")
        return VitqError(f"ssh to {self.where} failed while {what}: {line}")

    # --- session ------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, pte: Path) -> Iterator[Session]:
        bundle = find_bundle("aarch64")
        self._tool("ssh")
        self._tool("scp")
        # A short socket path: unix sockets are limited to ~104 bytes.
        control_dir = OwnedDir("vq-ssh-", SHORT_TEMP)
        self._control = os.path.join(control_dir.path, "%C")
        remote_dir = None
        try:
            machine, cores, remote_dir = self._make_remote_dir()
            self.cores = cores
            if machine not in AARCH64 and not self.wrapper:
                raise VitqError(f"{self.where} is a {machine} machine, but the runner bundle is built for aarch64 "
                                "(64-bit Raspberry Pi OS); use an aarch64 device, or set VITQ_SSH_WRAPPER to an "
                                "emulator command such as 'qemu-aarch64 -L PREFIX'")
            yield _SshSession(self, bundle, Path(pte), remote_dir)
        finally:
            try:
                if remote_dir is not None:
                    self._remove_remote_dir(remote_dir)
            finally:
                self._close_master()
                control_dir.release()
                self._control = None

    def _make_remote_dir(self) -> tuple[str, int | None, str]:
        """(the device's `uname -m`, its online cores, a new temporary folder there)."""
        proc = self.ssh('uname -m && (getconf _NPROCESSORS_ONLN 2>/dev/null || echo 0) && '
                        'd=$(mktemp -d "${TMPDIR:-/tmp}/vitq-edge.XXXXXX") && mkdir "$d/in" && echo "$d"',
                        self.connect_timeout + 30, "connecting")
        lines = proc.stdout.split()
        if proc.returncode != 0 or len(lines) < 3:
            raise VitqError(f"cannot create a temporary folder on {self.where}: "
                            f"{last_line(proc.stderr) or f'exit code {proc.returncode}'}")
        cores = int(lines[-2]) if lines[-2].isdigit() and int(lines[-2]) > 0 else None
        return lines[-3], cores, lines[-1]

    def _remove_remote_dir(self, remote_dir: str) -> None:
        # Stop a runner still going after a timeout (its shell wrote its pid), then delete.
        q = shlex.quote(remote_dir)
        cmd = (f"if [ -f {q}/pid ]; then kill -TERM -- -$(cat {q}/pid) $(cat {q}/pid) 2>/dev/null; fi; "
               f"rm -rf {q}")
        try:
            self.ssh(cmd, self.connect_timeout + 30, "cleaning up")
        except VitqError as exc:
            log.warning("could not remove %s on %s (%s)", remote_dir, self.where, exc)

    def _close_master(self) -> None:
        if not self._control:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([self._tool("ssh"), "-o", f"ControlPath={self._control}", "-O", "exit", "--",
                            self.destination], capture_output=True, timeout=10, stdin=subprocess.DEVNULL)


class _SshSession(Session):
    def __init__(self, device: SshDevice, bundle: Bundle, pte: Path, remote_dir: str):
        self.device, self.dir = device, remote_dir
        self.pte_label, self.bundle_name = str(pte), bundle.name
        self.uses_kernels = program_uses_kernels(pte)
        device.scp([str(bundle.root / "bin"), str(bundle.lib)], device.remote(remote_dir + "/"),
                   "copying the runner bundle")
        device.scp([str(pte)], device.remote(remote_dir + "/model.pte"), "copying the program")

    def run(self, req: RunRequest) -> RunResult:
        dev, q = self.device, shlex.quote(self.dir)
        with owned_temp_dir("vitq-ssh-run-") as tmp:
            names = []
            if req.inputs:
                # Unique names on the device, whatever the local files are called.
                for i, src in enumerate(req.inputs):
                    link = Path(tmp) / f"in{i}.npy"
                    link.symlink_to(Path(src).resolve())
                    names.append(f"in/in{i}.npy")
                dev.scp([str(Path(tmp) / Path(n).name) for n in names], dev.remote(self.dir + "/in/"),
                        "copying the inputs")
            out = "out.npy" if req.outputs else None
            etdump = ETDUMP_FILE if req.etdump else None
            args = " ".join(shlex.quote(a) for a in runner_args("model.pte", names, req, out, etdump))
            wrapper = f"{dev.wrapper} " if dev.wrapper else ""
            # The shell's pid lets cleanup stop the runner if this side gives up first.
            command = (f"cd {q} && rm -f out.npy {ETDUMP_FILE} && echo $$ > pid && "
                       f"{wrapper}./bin/{RUNNER} {args}")
            proc = dev.ssh(command, req.timeout, "running the program",
                           f"the run on {dev.where} took longer than --timeout {req.timeout or 0:g} s and was "
                           "stopped; raise --timeout or use fewer --runs/--limit")
            if proc.returncode != 0 and runner_error_line(proc.stderr) is None:
                raise VitqError(self._launch_failure(proc))
            report = parse_report(proc.stdout, proc.stderr, proc.returncode, dev.where, self.pte_label,
                                  bundle=self.bundle_name, uses_kernels=self.uses_kernels)
            result = RunResult(report, notes=[] if not req.count_instructions else
                               [f"instruction counts are measured on emulated devices only, not on {dev.name}"])
            if out is not None:
                local = Path(tmp) / "out.npy"
                dev.scp([dev.remote(f"{self.dir}/{out}")], str(local), "fetching the outputs")
                result.output = load_output(local, dev.where)
            if etdump is not None:
                local = Path(tmp) / ETDUMP_FILE
                dev.scp([dev.remote(f"{self.dir}/{etdump}")], str(local), "fetching the ETDump")
                result.etdump = load_etdump(local, dev.where)
            return result

    def _launch_failure(self, proc: subprocess.CompletedProcess) -> str:
        dev, line = self.device, last_line(proc.stderr) or f"exit code {proc.returncode}"
        low = proc.stderr.lower()
        if "exec format error" in low or "cannot execute binary" in low:
            return (f"{dev.where} cannot run the aarch64 runner ({line}); it needs 64-bit Raspberry Pi OS, or "
                    "VITQ_SSH_WRAPPER naming an emulator")
        if "glibc_" in low:
            return (f"the runner needs a newer C library than {dev.where} has ({line}); use Raspberry Pi OS "
                    "Bookworm (glibc 2.36) or later")
        if proc.returncode in (126, 127) and dev.wrapper:
            return f"the remote command `{dev.wrapper}` failed on {dev.where} ({line}); check VITQ_SSH_WRAPPER"
        return f"the runner failed on {dev.where}: {line}"
