"""`vitq-edge bench --profile`: where the time of one inference goes, operator by operator.

The runner's `--etdump FILE` attaches ExecuTorch's ETDump event tracer (ETDumpGen) and
keeps the events of the timed forward calls only. This module reads the file with
ExecuTorch's devtools `Inspector` (no ETRecord: the build does not write one) and
aggregates what it holds per inference:

  Method::execute          the whole forward call (the 100% below)
  OPERATOR_CALL            a non-delegated kernel call, instruction id = its index in
                           the program; `native_call_<op>` inside it names the kernel
  DELEGATE_CALL            one call into a delegate (the XNNPACK subgraph as a whole)
  "<XNNPACK op> #k"        XNNPACK's own per-operator timer inside that call (delegated
                           events, microsecond steps)

Without an ETRecord the Inspector has no debug handles or module names, so the
program itself names the instructions: its execution plan maps instruction index to
operator (`aten::native_layer_norm.out`) or delegate backend (`XnnpackBackend`).
Delegate calls that run the same sequence of XNNPACK operators (one per transformer
block, say) are grouped into one row.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import defaultdict
from pathlib import Path

from vitq_edge.artifacts import write_atomic
from vitq_edge.errors import VitqError
from vitq_edge.pte import read_program

DEFAULT_TOP = 10
_EXECUTE = "Method::execute"
_DELEGATE_CALL = "DELEGATE_CALL"
_OPERATOR_CALL = "OPERATOR_CALL"
_KERNEL_PREFIX = "native_call_"
_ETDUMP_ID = b"ED00"
_SEQUENCE = re.compile(r"\s+#\d+$")  # XNNPACK numbers repeated operators of one call: "Add (ND) #2"


def etdump_path(pte: Path, device: str) -> Path:
    """Where a profile's raw etdump is kept: beside the program, one file per device."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_") or "device"
    return pte.parent / f"profile-{safe}.etdp"


def save_etdump(data: bytes, target: Path) -> None:
    """Write `data` to `target` atomically: a temporary file beside it, renamed over it."""
    write_atomic(target, lambda f: f.write(data), mode=0o644)


def program_instructions(pte: Path) -> dict[int, tuple[str, str]]:
    """Instruction index -> ("operator", "aten::op.overload") or ("delegate", backend id), of `forward`.

    Empty when the program cannot be read this way (the etdump's own names are used then).
    """
    program = read_program(pte.read_bytes())
    if program is None:
        return {}
    try:
        plan = next(p for p in program.execution_plan if p.name == "forward")
        if len(plan.chains) != 1:  # instruction ids repeat per chain; the etdump events carry no chain here
            return {}
        names = {}
        for i, instruction in enumerate(plan.chains[0].instructions):
            args = instruction.instr_args
            if hasattr(args, "op_index"):
                op = plan.operators[args.op_index]
                names[i] = ("operator", op.name + (f".{op.overload}" if op.overload else ""))
            elif hasattr(args, "delegate_index"):
                names[i] = ("delegate", plan.delegates[args.delegate_index].id)
        return names
    except Exception:  # naming is a convenience: the etdump still has the kernels' names
        return {}


def _inspector_events(etdump: bytes):
    """(name, instruction id or None, delegated?, per-run times in ms) for every event with timings."""
    # A size-prefixed flatbuffer with file identifier ED00. Checked here because the Inspector
    # decodes it by running `flatc`, which prints its usage on our stdout for anything else.
    if len(etdump) < 12 or etdump[8:12] != _ETDUMP_ID:
        raise VitqError(f"the runner's etdump is not an ETDump (no {_ETDUMP_ID.decode()} identifier, "
                        f"{len(etdump)} bytes); rerun, or rebuild the runner bundle with tools/build_runtime.sh")
    with warnings.catch_warnings():
        # "Output Buffer not found": there is no debug buffer (no intermediate tensors), as intended.
        warnings.simplefilter("ignore")
        try:
            from executorch.devtools import Inspector
        except ImportError as exc:
            raise VitqError(f"ExecuTorch's devtools Inspector cannot be imported ({exc}); reinstall executorch "
                            "(tools/setup.sh)") from None
        logging.getLogger("executorch").setLevel(logging.ERROR)
        try:
            inspector = Inspector(etdump_data=etdump)
        except Exception as exc:  # a malformed file can fail anywhere in the parser
            raise VitqError(f"ExecuTorch's Inspector cannot read the etdump ({type(exc).__name__}: {exc}); "
                            "rerun, or rebuild the runner bundle with tools/build_runtime.sh") from None
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is None:
                continue
            # The instruction id is the Inspector's private field: without an ETRecord it is the
            # only link from an event to the program's instruction (debug handles need one).
            yield (event.name, getattr(event, "_instruction_id", None), bool(event.is_delegated_op),
                   [float(t) for t in event.perf_data.raw])


def summarize(etdump: bytes, pte: Path | None = None) -> dict:
    """The per-inference profile: rows that tile Method::execute, and the delegates' own operators."""
    execute: list[float] = []
    top_level: dict[int, tuple[str, list[float]]] = {}  # instruction -> (DELEGATE_CALL/OPERATOR_CALL, times)
    kernels: dict[int, str] = {}  # instruction -> kernel name from native_call_<op>
    inner: dict[int, list[tuple[str, list[float]]]] = defaultdict(list)  # delegate call -> its operators
    for name, instruction, delegated, times in _inspector_events(etdump):
        if delegated:
            inner[instruction].append((_SEQUENCE.sub("", name), times))
        elif name == _EXECUTE:
            execute += times
        elif name in (_DELEGATE_CALL, _OPERATOR_CALL) and instruction is not None:
            top_level[instruction] = (name, top_level.get(instruction, (name, []))[1] + times)
        elif name.startswith(_KERNEL_PREFIX) and instruction is not None:
            kernels[instruction] = name.removeprefix(_KERNEL_PREFIX)
    runs = len(execute)
    total = sum(execute)
    if runs == 0 or total <= 0:
        raise VitqError("the etdump holds no timed forward call (no Method::execute event); is the runner bundle "
                        "built with the event tracer? rebuild it with tools/build_runtime.sh")

    names = program_instructions(pte) if pte is not None else {}
    groups: dict[tuple, dict] = {}
    delegate_ops: dict[tuple[str, str], dict] = {}
    for instruction, (event, times) in sorted(top_level.items()):
        if event == _DELEGATE_CALL:
            backend = names.get(instruction, ("delegate", "delegate"))[1]
            ops: dict[str, list] = {}  # operator -> [total ms, calls]: in call order
            for op, op_times in inner.get(instruction, []):
                acc = ops.setdefault(op, [0.0, 0])
                acc[0] += sum(op_times)
                acc[1] += len(op_times)
                d = delegate_ops.setdefault((backend, op), {"name": op, "backend": backend, "total_ms": 0.0,
                                                            "events": 0})
                d["total_ms"] += sum(op_times)
                d["events"] += len(op_times)
            # Calls that run the same operators (per call, in order) are one row.
            per_call = {op: n // len(times) for op, (_, n) in ops.items()}
            key = ("delegate", backend, tuple(per_call.items()))
            row = groups.setdefault(key, {"kind": "delegate", "backend": backend, "per_call": per_call,
                                          "ops": defaultdict(float)})
            for op, (ms, _) in ops.items():
                row["ops"][op] += ms
        else:
            op = (names.get(instruction, ("operator", None))[1] or kernels.get(instruction)
                  or f"instruction {instruction}")
            key = ("operator", op)
            row = groups.setdefault(key, {"kind": "operator", "name": op})
        row["total_ms"] = row.get("total_ms", 0.0) + sum(times)
        row["events"] = row.get("events", 0) + len(times)
        row.setdefault("instructions", []).append(instruction)

    rows = []
    for row in groups.values():
        if row["kind"] == "delegate":
            # Named after what runs inside, costliest first.
            ops = sorted(row.pop("ops").items(), key=lambda kv: -kv[1])
            counts = row.pop("per_call")
            row["contains"] = [{"name": op, "per_call": counts[op], "mean_ms": _ms(ms / runs)} for op, ms in ops]
            row["name"] = f"{row['backend']} call" + (": " if ops else "") + ", ".join(
                op + (f" x{counts[op]}" if counts[op] > 1 else "") for op, _ in ops)
        rows.append(_row(row, runs, total))
    overhead = total - sum(r["total_ms"] for r in rows)
    rows.append(_row({"kind": "runtime", "name": "ExecuTorch runtime between instructions",
                      "total_ms": max(overhead, 0.0), "events": runs, "instructions": []}, runs, total))
    rows.sort(key=lambda r: -r["total_ms"])
    # What a delegate call spends outside the operators its backend times: preparing the call and
    # its inputs, and the rounding of the backend's microsecond timer.
    for backend in sorted({r["backend"] for r in rows if r["kind"] == "delegate"}):
        calls = sum(r["total_ms"] for r in rows if r.get("backend") == backend)
        timed = sum(d["total_ms"] for d in delegate_ops.values() if d["backend"] == backend)
        events = sum(round(r["calls_per_inference"] * runs) for r in rows if r.get("backend") == backend)
        delegate_ops[(backend, "")] = {"name": "outside its timed operators (call setup, timer rounding)",
                                       "backend": backend, "total_ms": max(calls - timed, 0.0), "events": events}
    inside = sorted((_row({"kind": "delegate_operator", **d, "instructions": []}, runs, total)
                     for d in delegate_ops.values()), key=lambda r: -r["total_ms"])
    for r in inside:
        del r["instructions"]
    return {
        "runs": runs,
        "inference_ms": _ms(total / runs),
        "rows": rows,
        "delegate_operators": inside,
        "source": "ExecuTorch devtools Inspector on the runner's ETDump (no ETRecord); names from the program",
    }


def _row(row: dict, runs: int, total: float) -> dict:
    calls = row.pop("events") / runs
    out = {"kind": row.pop("kind"), "name": row.pop("name"), **{k: v for k, v in row.items() if k != "total_ms"},
           "calls_per_inference": round(calls, 3),
           "total_ms": _ms(row["total_ms"]),  # over all timed runs
           "mean_ms": _ms(row["total_ms"] / runs),  # per inference
           "ms_per_call": _ms(row["total_ms"] / runs / calls) if calls else None,
           "share": round(100.0 * row["total_ms"] / total, 3)}
    return out


def _ms(value: float) -> float:
    return round(value, 6)


def format_profile(p: dict, top: int = DEFAULT_TOP) -> list[str]:
    """The lines `vitq-edge bench --profile` prints after the benchmark."""
    kind = ("emulated wall time under qemu, not the board's: shares rank operators only roughly"
            if p["latency_is_emulated"] else "wall time")
    lines = [f"profile: slowest operators / delegate calls per inference ({kind})",
             f"  {p['inference_ms']:.3f} ms per inference in Method::execute (mean of {p['runs']} traced runs; "
             f"untraced median {p['untraced_median_ms']:.3f} ms)",
             f"  ETDump: {p['etdump']}",
             f"  {'share':>6}  {'ms/inf':>8}  {'calls':>5}  {'ms/call':>8}  operator / delegate call"]
    for r in p["rows"][:top]:
        counted = r["kind"] != "runtime"
        per_call = f"{r['ms_per_call']:8.4f}" if counted and r["ms_per_call"] is not None else " " * 8
        calls = f"{r['calls_per_inference']:5g}" if counted else " " * 5
        lines.append(f"  {r['share']:5.1f}%  {r['mean_ms']:8.4f}  {calls}  {per_call}  {_clip(r['name'])}")
    if len(p["rows"]) > top:
        rest = p["rows"][top:]
        lines.append(f"  {sum(r['share'] for r in rest):5.1f}%  {sum(r['mean_ms'] for r in rest):8.4f}  "
                     f"{'':5}  {'':8}  ({len(rest)} more rows; --top N, or --json)")
    inside = [r for r in p["delegate_operators"] if r["total_ms"] > 0][:top]
    if inside:
        lines.append("  inside the delegate calls (the backend's own per-operator timer, 1 us steps):")
        for r in inside:
            lines.append(f"  {r['share']:5.1f}%  {r['mean_ms']:8.4f}  {r['calls_per_inference']:5g}  "
                         f"{r['ms_per_call']:8.4f}  {_clip(r['backend'] + ': ' + r['name'])}")
    return lines


def _clip(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."
