"""Write docs/reliability.{md,json}: every mistaken or hostile input, run as a user runs it.

Each case of tests/reliability_cases.py runs as a real `vitq-edge` command (the console
script, a fresh process) in its own scratch folder, next to one finished build of the bundled
model; the table records the command, the exit code and what the user sees on stderr, and
whether that is what the case expects (one `error:` line and exit 2, or success). Interruptions
(SIGTERM / SIGKILL of a build and of an emulated eval) are run and checked for what they leave.

    .venv/bin/python tools/reliability_table.py            # ~10 minutes on 2 cores
    .venv/bin/python tools/reliability_table.py --only nan-checkpoint,mean-nan
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reliability_cases import CASES, Case, image_folder  # noqa: E402

CLI = Path(sys.executable).parent / "vitq-edge"


def printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown(args: list[str], scratch: Path, build: Path) -> str:
    words = [printable(a).replace(str(scratch), "$TMP").replace(str(build), "$BUILD") for a in args]
    return "vitq-edge " + " ".join(shlex.quote(w) if w else "''" for w in words)


def visible_lines(stream: str) -> list[str]:
    return [line.rsplit("\r", 1)[-1] for line in stream.splitlines() if line.rsplit("\r", 1)[-1].strip()]


def run_case(case: Case, scratch: Path, build: Path) -> dict:
    scratch.mkdir()
    args = case.make(scratch, build)
    t0 = time.monotonic()
    proc = subprocess.run([str(CLI), *args], capture_output=True, cwd=scratch, timeout=1800)
    seconds = time.monotonic() - t0
    stdout = proc.stdout.decode(errors="replace")
    stderr = visible_lines(proc.stderr.decode(errors="replace"))
    if stderr:
        seen = " | ".join(stderr)
    else:
        seen = (stdout.strip().splitlines() or [""])[0]
    if case.code == 2:
        ok = proc.returncode == 2 and len(stderr) == 1 and stderr[0].startswith("error: ") and \
            all(f in stderr[0] for f in case.fragments)
    else:
        ok = proc.returncode == case.code and not stderr and all(f in stdout for f in case.fragments)
    ok = ok and not any(f in seen for f in case.absent) and "Traceback" not in proc.stderr.decode(errors="replace")
    if case.check is not None:
        try:
            case.check(scratch)
        except AssertionError as exc:
            ok, seen = False, f"{seen} [post-condition failed: {exc}]"
    return {"id": case.id, "item": case.item, "case": case.what, "command": shown(args, scratch, build),
            "exit_code": proc.returncode, "user_sees": printable(seen).replace(str(scratch), "$TMP")
            .replace(str(build), "$BUILD"), "expected_exit_code": case.code, "as_expected": ok,
            "seconds": round(seconds, 1)}


# ---- interruptions -----------------------------------------------------------------------


def _stages(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _qemu_running() -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
                state = (entry / "status").read_text()
            except OSError:
                continue
            if b"qemu-aarch64" in cmd and b"vitq-runner" in cmd and "State:\tZ" not in state:
                return True
    return False


def _temp_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(("vitq-eval-", "vitq-run-"))}


def interruption_rows(scratch: Path, build: Path) -> list[dict]:
    rows = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        parent = scratch / f"build-{sig.name}"
        parent.mkdir()
        out = parent / "out"
        args = ["build", "--out", str(out), "--eval-limit", "2000", "--quiet"]
        proc = subprocess.Popen([str(CLI), *args], stderr=subprocess.PIPE, text=True)
        _wait(lambda p=parent: _stages(p, "out"), 120)
        time.sleep(2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        left = _stages(parent, "out")
        after = "nothing to clean" if not left else None
        if left:
            few = image_folder(parent / "few", ["a"])
            subprocess.run([str(CLI), "build", "--out", str(out), "--calib", str(few), "--calib-limit", "1",
                            "--skip-eval", "--recipe", "fp32", "--quiet"], capture_output=True, timeout=600)
            after = f"{len(left)} stage folder(s) after the kill; {len(_stages(parent, 'out'))} after the next build"
        expected = 128 + sig if sig == signal.SIGTERM else -sig
        # SIGTERM: the build removes its stage and leaves --out as it was (absent); SIGKILL: the next build does.
        clean = not _stages(parent, "out") and (sig == signal.SIGKILL or not out.exists())
        rows.append({"id": f"build-{sig.name}", "item": "11", "case": f"{sig.name} during a build",
                     "command": shown(args, scratch, build), "exit_code": proc.returncode,
                     "user_sees": (visible_lines(err) or [""])[-1] + f" ({after})", "expected_exit_code": expected,
                     "as_expected": proc.returncode == expected and clean, "seconds": None})
    if shutil.which("qemu-aarch64") is None:
        return rows
    for sig in (signal.SIGTERM, signal.SIGKILL):
        before = _temp_folders()
        args = ["eval", str(build), "--device", "emulated-rpi4", "--limit", "300", "--quiet"]
        proc = subprocess.Popen([str(CLI), *args], stderr=subprocess.PIPE, text=True)
        _wait(_qemu_running, 120)
        time.sleep(1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        gone = _wait(lambda: not _qemu_running(), 10)
        left = _temp_folders() - before
        subprocess.run([str(CLI), "targets"], capture_output=True, timeout=120)
        after = _temp_folders() - before
        rows.append({"id": f"eval-emulated-{sig.name}", "item": "12", "case": f"{sig.name} during an emulated eval",
                     "command": shown(args, scratch, build), "exit_code": proc.returncode,
                     "user_sees": (visible_lines(err) or [""])[-1]
                     + f" (qemu {'ended' if gone else 'STILL RUNNING'}; {len(left)} temp folder(s) left, "
                       f"{len(after)} after the next command)",
                     "expected_exit_code": 128 + sig if sig == signal.SIGTERM else -sig,
                     "as_expected": gone and not after, "seconds": None})
    return rows


# ---- the table ---------------------------------------------------------------------------


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_table(rows: list[dict], command: str, seconds: float) -> None:
    docs = REPO / "docs"
    payload = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": command, "seconds": round(seconds), "rows": rows}
    (docs / "reliability.json").write_text(json.dumps(payload, indent=2) + "\n")
    good = sum(r["as_expected"] for r in rows)
    lines = [
        "# Reliability: what a user sees for every mistake we know of",
        "",
        "Each row is a real `vitq-edge` command in a fresh process. `$BUILD` is a finished stock-int8 build of the",
        "bundled model, `$TMP` the case's scratch folder. Expected: exactly one `error:` line on stderr and exit",
        "code 2 for bad input (nothing else before it, no traceback); exit 0 and a clean stderr where the input is",
        "fine; for interruptions, no child process and no stage or temporary folder after the next command.",
        "The cases live in `tests/reliability_cases.py`; `tests/test_reliability.py` runs them in the suite.",
        "",
        f"Generated by `{command}` ({datetime.date.today().isoformat()}, {round(seconds)} s on this 2-core "
        f"machine): {good} of {len(rows)} rows as expected.",
        "",
        "| item | case | command | exit | the user sees | ok |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['item']} | {_cell(r['case'])} | `{_cell(r['command'])}` | {r['exit_code']} | "
                     f"{_cell(r['user_sees'])} | {'yes' if r['as_expected'] else '**NO**'} |")
    lines += ["", "Items refer to the numbered cases of the reliability issue; `suite` rows are the test suite's "
              "earlier cases.", ""]
    (docs / "reliability.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case ids (the table then holds only those)")
    parser.add_argument("--no-interruptions", action="store_true", help="skip the SIGTERM/SIGKILL rows")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    cases = [c for c in CASES if wanted is None or c.id in wanted]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vitq-reliability-") as tmp:
        scratch_root = Path(tmp)
        build = scratch_root / "build"
        print("building the bundled model once (stock int8) ...", flush=True)
        done = subprocess.run([str(CLI), "build", "--out", str(build), "--calib-limit", "256", "--eval-limit", "300",
                               "--quiet"], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        rows = []
        for i, case in enumerate(cases, 1):
            row = run_case(case, scratch_root / f"case-{i:02d}", build)
            print(f"[{i}/{len(cases)}] {case.id}: exit {row['exit_code']}, "
                  f"{'ok' if row['as_expected'] else 'NOT AS EXPECTED'} ({row['seconds']} s)", flush=True)
            rows.append(row)
        if not args.no_interruptions and wanted is None:
            print("interruptions ...", flush=True)
            rows += interruption_rows(scratch_root, build)
    command = "python " + " ".join(shlex.quote(a) for a in ["tools/reliability_table.py", *sys.argv[1:]])
    write_table(rows, command, time.monotonic() - t0)
    bad = [r["id"] for r in rows if not r["as_expected"]]
    print(f"wrote docs/reliability.md ({len(rows) - len(bad)}/{len(rows)} as expected)"
          + (f"; not as expected: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
