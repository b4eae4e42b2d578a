"""`vitq-edge compare`: several real programs of one model, one table, resumable.

The user's own model is a tiny timm ViT on small image folders (real builds, real .pte
programs, real benches on the host runner); the bundled model's case is slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from vitq_edge.artifacts import file_sha256
from vitq_edge.bench import GEMM_NAMES
from vitq_edge.cli import main
from vitq_edge.hostinfo import this_build_machine

from .conftest import REPO, make_image_folder

TINY = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,num_classes=3,depth=2",
        "--mean", "0.5", "--std", "0.25"]


def invoke(*args: str):
    result = CliRunner().invoke(main, ["compare", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare-data")
    make_image_folder(root / "calib", classes=3, per_class=6, mode="RGB", size=40, suffix=".jpg")
    make_image_folder(root / "eval", classes=3, per_class=5, mode="RGB", size=36, suffix=".png", seed=1)
    return root / "calib", root / "eval"


def tiny_compare(folders: tuple[Path, Path], out: Path, programs: str, *extra: str):
    calib, eval_dir = folders
    return invoke("--programs", programs, "--out", str(out), "--calib", str(calib), "--eval", str(eval_dir),
                  "--runs", "2", "--target", "host", *TINY, *extra)


@pytest.mark.slow
def test_compare_builds_measures_and_benches_a_users_model(folders, tmp_path):
    out = tmp_path / "cmp"
    result = tiny_compare(folders, out, "fp32,minmax@W8A8,minmax@W4A4")
    assert result.exit_code == 0, result.stderr[-3000:]
    table = json.loads((out / "compare.json").read_text())
    assert [r["program"] for r in table["rows"]] == ["fp32", "minmax@W8A8", "minmax@W4A4"]
    fp32, w8, w4 = table["rows"]
    for r in table["rows"]:
        a = r["accuracy"]
        assert a["eval_images"] == 15 and a["fp32"] == fp32["accuracy"]["fp32"]
        manifest = json.loads((out / r["folder"] / "manifest.json").read_text())
        assert manifest["recipe"] == r["recipe"] and (out / r["folder"] / "model.pte").stat().st_size == \
            r["pte_size_bytes"]
        bench = r["bench"]["host@1"]
        assert bench["threads"] == 1 and bench["runs"] == 2 and bench["latency_ms_median"] > 0
        assert bench["pte_sha256"] == r["pte_sha256"] == file_sha256(out / r["folder"] / "model.pte")
        # The GEMM our kernels ran: recorded for the programs that call them, and named in the notes.
        assert (bench["gemm"] in GEMM_NAMES) == (r["recipe"] != "fp32")
    # The float row is the float model itself; the quantized rows lose signal, W4A4 more than W8A8.
    assert fp32["accuracy"]["sqnr_db"] is None and fp32["accuracy"]["drop"] == 0
    assert w8["accuracy"]["sqnr_db"] > w4["accuracy"]["sqnr_db"] > 0
    assert w4["packed_size_bytes"] < w8["packed_size_bytes"]
    for r in (w8, w4):
        assert r["recipe_config"]["name"] == "minmax" and r["recipe_config"]["bits"] == r["bits"]
        assert r["build_command"].startswith("vitq-edge build --target host --recipe minmax --bits")
        assert r["built_on"] == this_build_machine()
    md = (out / "compare.md").read_text()
    assert "| minmax@W4A4 |" in md and "host@1" in md and table["command"] in md
    assert md.count(f"GEMM host@1: {w8['bench']['host@1']['gemm']}") == 2
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "minmax@W8A8" in result.stdout

    # Resuming with one more program builds only that one; the finished rows stay as they were.
    before = {r["program"]: (out / r["folder"] / "model.pte").stat().st_mtime_ns for r in table["rows"]}
    result = tiny_compare(folders, out, "fp32,minmax@W8A8,minmax@W4A4,minmax@W6A6")
    assert result.exit_code == 0, result.stderr[-3000:]
    resumed = json.loads((out / "compare.json").read_text())
    # The table keeps its reading order (stock first, then each recipe widest to narrowest), not the build's.
    assert [r["program"] for r in resumed["rows"]] == ["fp32", "minmax@W8A8", "minmax@W6A6", "minmax@W4A4"]
    assert [r for r in resumed["rows"] if r["program"] != "minmax@W6A6"] == table["rows"]
    assert {k: (out / f"programs/{k.replace('@', '-')}/model.pte").stat().st_mtime_ns for k in before} == before

    # --rebench benches the listed programs again (here with 3 runs), builds nothing, leaves the others.
    result = tiny_compare(folders, out, "fp32,minmax@W8A8", "--runs", "3", "--rebench")  # the last --runs counts
    assert result.exit_code == 0, result.stderr[-3000:]
    rebenched = {r["program"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert [rebenched[k]["bench"]["host@1"]["runs"] for k in ("fp32", "minmax@W8A8", "minmax@W4A4")] == [3, 3, 2]
    assert {k: (out / f"programs/{k.replace('@', '-')}/model.pte").stat().st_mtime_ns for k in before} == before

    # A row whose program folder is gone (a committed table on a fresh checkout) is built again when it is
    # to be benched, the same program from the same settings; without a bench to run it is left alone.
    shutil.rmtree(out / "programs" / "minmax-W4A4")
    result = tiny_compare(folders, out, "fp32,minmax@W4A4")
    assert result.exit_code == 0, result.stderr[-3000:]
    assert not (out / "programs" / "minmax-W4A4").exists()
    result = tiny_compare(folders, out, "fp32,minmax@W4A4", "--rebench")
    assert result.exit_code == 0, result.stderr[-3000:]
    before_rebuild = {"minmax@W4A4": (out / "programs" / "minmax-W4A4" / "model.pte").stat().st_mtime_ns}
    rebuilt = {r["program"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert rebuilt["minmax@W4A4"]["accuracy"] == rebenched["minmax@W4A4"]["accuracy"]
    assert rebuilt["minmax@W4A4"]["bench"]["host@1"]["pte_sha256"] == w4["bench"]["host@1"]["pte_sha256"]
    # --rebuild builds and measures a listed row again although its program is there; the others stay.
    result = tiny_compare(folders, out, "minmax@W4A4", "--rebuild")
    assert result.exit_code == 0, result.stderr[-3000:]
    again = {r["program"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert (out / "programs" / "minmax-W4A4" / "model.pte").stat().st_mtime_ns != \
        before_rebuild["minmax@W4A4"]
    assert again["minmax@W4A4"]["accuracy"] == rebuilt["minmax@W4A4"]["accuracy"]
    assert again["minmax@W4A4"]["bench"]["host@1"]["pte_sha256"] == again["minmax@W4A4"]["pte_sha256"]
    assert again["fp32"] == rebuilt["fp32"]
    assert (out / "programs" / "fp32" / "model.pte").stat().st_mtime_ns == before["fp32"]

    # A row measured on an older integer arithmetic (here: a table from before the version was recorded)
    # is built again by the same command, and says so; the rows on this arithmetic stay.
    from vitq_edge.runtime import ARITHMETIC_VERSION

    stale = json.loads((out / "compare.json").read_text())
    del next(r for r in stale["rows"] if r["program"] == "minmax@W8A8")["arithmetic_version"]
    (out / "compare.json").write_text(json.dumps(stale))
    w8_pte = (out / "programs" / "minmax-W8A8" / "model.pte").stat().st_mtime_ns
    result = tiny_compare(folders, out, "fp32,minmax@W8A8")
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "minmax@W8A8 was measured on integer arithmetic 1" in result.stderr
    current = {r["program"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert current["minmax@W8A8"]["arithmetic_version"] == ARITHMETIC_VERSION
    assert (out / "programs" / "minmax-W8A8" / "model.pte").stat().st_mtime_ns != w8_pte
    assert (out / "programs" / "fp32" / "model.pte").stat().st_mtime_ns == before["fp32"]

    # Other settings do not mix into the same table.
    line = error_line(tiny_compare(folders, out, "fp32", "--eval-limit", "5"))
    assert "other settings" in line and "eval_limit" in line and "--out" in line


def test_compare_refuses_a_folder_it_did_not_write(folders, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    line = error_line(tiny_compare(folders, out, "fp32"))
    assert "not a compare folder" in line
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    (out / "compare.json").write_text("{}")
    assert "not written by `vitq-edge compare`" in error_line(tiny_compare(folders, out, "fp32"))
    # --table elsewhere: a report of the user's own at that name is not overwritten.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("mine")
    line = error_line(tiny_compare(folders, tmp_path / "new", "fp32", "--table", str(tmp_path / "docs" / "results")))
    assert "results.md exists" in line and (tmp_path / "docs" / "results.md").read_text() == "mine"


@pytest.mark.slow
def test_compare_table_elsewhere_and_cost_only(folders, tmp_path):
    stem = tmp_path / "docs" / "cost"
    result = tiny_compare(folders, tmp_path / "work", "fp32,minmax@W4A4", "--table", str(stem), "--skip-eval",
                          "--devices", "")
    assert result.exit_code == 0, result.stderr[-3000:]
    table = json.loads(stem.with_suffix(".json").read_text())
    assert [r["accuracy"] for r in table["rows"]] == [None, None] and all("bench" not in r for r in table["rows"])
    assert "](cost.png)" in stem.with_suffix(".md").read_text() and stem.with_suffix(".png").is_file()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["programs"]

    # Python callers append sections (tools/accuracy_table.py: targets) to every write of the table.
    from vitq_edge.compare import write_table

    write_table(stem, table, sections=lambda t: ["## Targets", f"{len(t['rows'])} rows checked"])
    assert stem.with_suffix(".md").read_text().endswith("## Targets\n2 rows checked\n")
    assert json.loads(stem.with_suffix(".json").read_text()) == table

    # A --table inside OUT (tools/adfq_curve.py keeps OUT/table.*) is compare's own: the rerun resumes.
    inner = tmp_path / "work" / "table"
    for rerun in range(2):
        result = tiny_compare(folders, tmp_path / "work", "fp32", "--table", str(inner), "--skip-eval", "--devices", "")
        assert result.exit_code == 0, (rerun, result.stderr[-3000:])
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["programs", "table.json", "table.md", "table.png"]


@pytest.mark.parametrize("args,fragment", [
    (["--programs", "magic@W8A8"], "unknown recipe 'magic'"),
    (["--programs", "minmax@W3A3"], "recipe minmax supports --bits"),
    (["--programs", ","], "no programs to compare"),
    (["--threads", "0"], "thread counts are whole numbers from 1"),
    (["--threads", "one"], "not a comma-separated list"),
    (["--programs", "minmax@W8A8", "--option", "candidates=5"], "none of the programs' recipes (minmax)"),
    (["--programs", "liu2021@W8A8", "--option", "candidates=many"], "candidates='many': expected int"),
    (["--programs", "liu2021@W8A8", "--option", "search=fast"], "use coarse-to-fine or grid"),
    (["--option", "candidates"], "bad --option 'candidates': write KEY=VALUE"),
])
def test_compare_usage_errors(args, fragment, tmp_path):
    line = error_line(invoke(*args, "--out", str(tmp_path / "o")))
    assert fragment in line
    assert not (tmp_path / "o").exists()


def test_recipe_options_reach_only_the_recipes_that_have_them(folders, tmp_path):
    stem = tmp_path / "t"
    result = tiny_compare(folders, tmp_path / "w", "minmax@W8A8,liu2021@W4A4", "--option", "candidates=4",
                          "--option", "rounds=1", "--option", "ranking=false", "--table", str(stem), "--skip-eval",
                          "--devices", "")
    assert result.exit_code == 0, result.stderr[-3000:]
    minmax, liu = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert (liu["recipe_config"]["candidates"], liu["recipe_config"]["rounds"], liu["recipe_config"]["ranking"]) \
        == (4, 1, False)
    assert "candidates" not in minmax["recipe_config"] and "--option" not in minmax["build_command"]
    assert "--option candidates=4 --option rounds=1 --option ranking=false" in liu["build_command"]


@pytest.mark.slow
def test_compare_on_the_bundled_model_matches_build(tmp_path):
    out = tmp_path / "ref"
    result = invoke("--programs", "fp32,minmax@W8A8", "--out", str(out), "--calib-limit", "128",
                    "--eval-limit", "200", "--devices", "host,emulated-rpi4", "--runs", "1", "--quiet")
    assert result.exit_code == 0, result.stderr[-3000:]
    assert not result.stderr
    rows = json.loads((out / "compare.json").read_text())["rows"]
    fp32, w8 = rows
    assert fp32["accuracy"]["fp32"] >= 80 and abs(w8["accuracy"]["drop"]) <= 1.0
    assert w8["accuracy"]["pte_host"] == w8["accuracy"]["simulated"]
    assert w8["program_arithmetic"] == "integer"
    emu = w8["bench"]["emulated-rpi4@1"]
    assert emu["instructions"] > 0 and emu["latency_is_emulated"]
    assert w8["bench"]["emulated-rpi4@1"]["instructions"] < fp32["bench"]["emulated-rpi4@1"]["instructions"]


def test_a_setting_newer_than_the_table_counts_as_unset(tmp_path):
    from vitq_edge.compare import _check_resumable
    from vitq_edge.errors import VitqError

    table = {"settings": {"model": "m", "eval_limit": 10}}
    _check_resumable(table, {"model": "m", "eval_limit": 10, "recipe_options": {}}, tmp_path / "t.json")
    with pytest.raises(VitqError, match="recipe_options"):
        _check_resumable(table, {"model": "m", "eval_limit": 10, "recipe_options": {"seed": "1"}}, tmp_path / "t.json")
    with pytest.raises(VitqError, match="eval_limit: 10 then, 20 now"):
        _check_resumable(table, {"model": "m", "eval_limit": 20}, tmp_path / "t.json")


def test_rows_of_another_integer_arithmetic_are_stale_and_marked():
    from vitq_edge.compare import _notes, row_is_current
    from vitq_edge.runtime import ARITHMETIC_VERSION

    now = {"recipe": "adfq", "arithmetic_version": ARITHMETIC_VERSION}
    assert row_is_current(now) and "arithmetic" not in _notes(now)
    for old in ({"recipe": "adfq", "arithmetic_version": ARITHMETIC_VERSION - 1}, {"recipe": "minmax"}):
        assert not row_is_current(old)
        assert f"integer arithmetic {ARITHMETIC_VERSION - 1} (now {ARITHMETIC_VERSION})" in _notes(old)
    # Stock programs do not run our arithmetic: always current.
    assert row_is_current({"recipe": "fp32"}) and row_is_current({"recipe": "xnnpack-int8", "arithmetic_version": None})


def test_notes_name_each_benchs_gemm_and_a_bench_of_a_rebuilt_program():
    """The host latency of our programs depends on the GEMM the kernels ran; and a bench of a program
    rebuilt after its folder was lost (same settings, another CPU: other bytes) is not of the program measured."""
    from vitq_edge.compare import _notes
    from vitq_edge.runtime import ARITHMETIC_VERSION

    bench = {"host@1": {"gemm": "vnni-evex", "pte_sha256": "a"}, "emulated-rpi4@1": {"gemm": "pairs",
                                                                                      "pte_sha256": "a"},
             "host@2": {"gemm": "vnni-evex", "pte_sha256": "b"}, "emulated-rpi5@1": {"pte_sha256": None}}
    row = {"recipe": "adfq", "arithmetic_version": ARITHMETIC_VERSION, "custom_ops": ["vitq::linear"],
           "pte_sha256": "a", "bench": bench}
    notes = _notes(row)
    assert "host@2 benched a rebuilt program, not the one measured here" in notes
    assert "GEMM host@1 host@2: vnni-evex, emulated-rpi4@1: pairs, emulated-rpi5@1: not recorded" in notes
    # Stock programs run none of our GEMM; rows from before the hash was recorded compare nothing.
    assert "GEMM" not in _notes({**row, "recipe": "fp32", "custom_ops": []})
    assert "rebuilt" not in _notes({**row, "pte_sha256": None})


def test_a_row_built_on_another_machine_says_where():
    """A row's calibration time and bytes depend on the CPU it was built on: a row built elsewhere than
    the machine the table's header names says so; rows that recorded nothing claim nothing."""
    from vitq_edge.compare import _notes
    from vitq_edge.runtime import ARITHMETIC_VERSION

    here, there = "Linux x86_64, AMD EPYC, 2 CPU cores, torch (AVX512)", "Linux x86_64, Intel, torch (AVX2)"
    row = {"recipe": "adfq", "arithmetic_version": ARITHMETIC_VERSION, "built_on": there}
    assert f"built on {there}" in _notes(row, here)
    assert "built on" not in _notes({**row, "built_on": here}, here)
    assert "built on" not in _notes({**row, "built_on": ""}, here)


def test_targets_count_rows_of_an_older_arithmetic_as_missing():
    """tools/accuracy_table.py's Targets: a row built on an older arithmetic meets nothing."""
    import importlib.util

    from vitq_edge.runtime import ARITHMETIC_VERSION

    spec = importlib.util.spec_from_file_location("accuracy_table", REPO / "tools" / "accuracy_table.py")
    accuracy_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy_table)
    accuracy = {"simulated": 74.0, "pte_host": 74.0, "drop": 1.0, "agreement": 95.0, "sqnr_db": 20.0}
    row = {"program": "adfq@W6A6", "recipe": "adfq", "accuracy": accuracy, "calibration_seconds": 60.0,
           "arithmetic_version": ARITHMETIC_VERSION}
    table = {"settings": {"model": "dinov2-s14-cifar10"}, "rows": [row]}
    assert "| W6A6 adfq: drop <= 1.5 | met |" in accuracy_table.targets(table)
    del row["arithmetic_version"]
    assert "| W6A6 adfq: drop <= 1.5 | row missing or built on an older arithmetic |" in accuracy_table.targets(table)


def test_cost_columns_keep_each_devices_threads_together():
    """A row benched on more devices than the rows before it (a rebuilt row first in the table)
    must not split a device's thread counts apart."""
    from vitq_edge.compare import _cost_columns

    rows = [{"bench": {"host@1": {}, "emulated-rpi4@4": {}, "emulated-rpi4@1": {}}},
            {"bench": {"host@1": {}, "host@2": {}, "emulated-rpi4@1": {}}}, {}]
    assert _cost_columns(rows) == ["host@1", "host@2", "emulated-rpi4@1", "emulated-rpi4@4"]


@pytest.mark.slow
def test_compare_flows_builds_each_program_once_for_all_its_devices(tmp_path):
    """tools/compare_flows.py benches the host and the emulated devices in two passes (other runs and
    thread counts): the second pass benches the first pass's programs, it does not build them again."""
    import subprocess
    import sys

    docs = tmp_path / "docs"
    # An earlier run's rows: another model's stay, this model's are measured again.
    earlier = json.loads((REPO / "docs" / "performance.json").read_text())
    kept = [dict(r, command="an earlier run") for r in earlier if r["model"] == "deit_tiny_patch16_224"][:2]
    stale = [dict(r, command="an earlier run", instructions=1.0) for r in earlier if r["model"] == "reference"][:1]
    docs.mkdir()
    (docs / "performance.json").write_text(json.dumps(kept + stale))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "compare_flows.py"), "--models", "reference",
                           "--devices", "host,emulated-rpi4", "--threads", "1", "--host-runs", "2",
                           "--calib-limit", "32", "--work", str(tmp_path / "work"), "--docs", str(docs)],
                          capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    programs = ("fp32", "xnnpack-int8", "minmax@W8A8", "minmax@W4A4")
    built = [line.removeprefix("compare: building ") for line in proc.stderr.splitlines()
             if line.startswith("compare: building ") and not line.startswith("compare: building: ")]
    assert sorted(built) == sorted(programs)
    rows = json.loads((docs / "performance.json").read_text())
    assert rows[:len(kept)] == kept and len(kept) == 2
    rows = [r for r in rows if r["model"] == "reference"]
    assert sorted((r["program"], r["device"]) for r in rows) == sorted(
        (p, d) for p in programs for d in ("host", "emulated-rpi4"))
    assert all(r["instructions"] > 0 for r in rows if r["device"] == "emulated-rpi4")
    # Our programs' rows name the GEMM the kernels ran there (the Pi 4's A72 has no sdot); stock ones none.
    assert {(r["program"], r["gemm"]) for r in rows if r["device"] == "emulated-rpi4"} == {
        ("fp32", None), ("xnnpack-int8", None), ("minmax@W8A8", "pairs"), ("minmax@W4A4", "pairs")}
    assert (docs / "performance.md").is_file() and (docs / "performance.png").is_file()
    md = (docs / "performance.md").read_text().splitlines()
    assert "    an earlier run" in md and sum(line.startswith("    python tools/compare_flows.py") for line in md) == 1
    assert next(line for line in md if "| minmax@W8A8 | emulated-rpi4 | 1 |" in line).endswith("| pairs |")
