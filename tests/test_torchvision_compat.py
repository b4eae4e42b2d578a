"""timm must import whether torchvision's compiled ops load (normal machines) or not (here)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


def _python(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)


def test_timm_imports_and_patch_matches_whether_torchvision_loads():
    plain = _python("import torchvision")
    torchvision_broken = plain.returncode != 0
    if torchvision_broken:
        assert "torchvision::" in plain.stderr  # the failure this module exists for
    result = _python("""
        import vitq_edge, timm, torch
        print(vitq_edge.TORCHVISION_PATCHED)
        m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
        print(tuple(m(torch.zeros(1, 3, 32, 32)).shape))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[0] == str(torchvision_broken)
    assert "(1, 3)" in result.stdout


def test_no_patch_when_torchvision_loads_normally(tmp_path):
    # A torchvision that imports cleanly stands in for a machine with a matching build.
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("LOADED_NORMALLY = True\n")
    result = _python("""
        import vitq_edge
        from vitq_edge import _torchvision_compat as compat
        import torchvision
        print(vitq_edge.TORCHVISION_PATCHED, compat._SCHEMA_LIB is None, torchvision.LOADED_NORMALLY)
    """, extra_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[0] == "False True True"


def test_unrelated_torchvision_errors_are_not_hidden(tmp_path):
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('some other failure')\n")
    result = _python("import vitq_edge, timm", extra_path=tmp_path)
    assert result.returncode != 0
    assert "some other failure" in result.stderr


def test_the_check_waits_for_timm(tmp_path):
    # `import vitq_edge` stays cheap (no torch, no torchvision) until timm is imported.
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('imported too early')\n")
    result = _python("import sys, vitq_edge; print('torch' in sys.modules, 'torchvision' in sys.modules)",
                     extra_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[0] == "False False"
