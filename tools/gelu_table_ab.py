"""GELU by table (arith.gelu_table, the integer programs' GELU) against the exact GELU (arith.gelu) on
the bundled reference model, in the simulation (bit for bit what its programs compute), on a
validation split of its calibration images (Fashion-MNIST training data): each recipe calibrates on
the first 512 and is evaluated on the other 512, once per GELU, the quantizers unchanged.

    .venv/bin/python tools/gelu_table_ab.py --recipes minmax,liu2021 --bits W8A8,W4A4

Writes docs/validation/NAME.{md,json} (default gelu-table-bundled): agreement with the float model's
top-1 and logit SQNR under each GELU. (The real model's programs: tools/runtime_ab.py.)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.artifacts import write_atomic
from vitq_edge.lifetime import run_script
from vitq_edge.metrics import sqnr_db
from vitq_edge.models.source import load_model
from vitq_edge.quant import arith, quantize, recipe_config

ASSETS = Path(vitq_edge.__file__).parent / "assets" / "reference"
CALIB, VAL = slice(0, 512), slice(512, 1024)


def reference_images() -> torch.Tensor:
    """The bundled calibration images, preprocessed as the reference model's meta says."""
    meta = json.loads((ASSETS / "meta.json").read_text())["input"]
    images = torch.tensor(np.load(ASSETS / "calib.npz")["images"]).float() / 255.0
    return ((images - meta["mean"][0]) / meta["std"][0])[:, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="minmax,liu2021")
    ap.add_argument("--bits", default="W8A8,W4A4")
    ap.add_argument("--name", default="gelu-table-bundled")
    args = ap.parse_args()
    start = time.time()
    x = reference_images()
    model = load_model(None).model.eval()
    with torch.no_grad():
        float_logits = model(x[VAL])
    table = arith.gelu_table
    rows = []
    for recipe in args.recipes.split(","):
        for bits in args.bits.split(","):
            calib = [x[CALIB][i:i + 64] for i in range(0, 512, 64)]
            qm = quantize(model, recipe_config(recipe, bits), calib, (x[:1],))
            row = {"recipe": recipe, "bits": bits}
            try:
                for name, gelu in (("exact", arith.gelu), ("table", table)):
                    arith.gelu_table = gelu  # the simulation's GELU, everything else as built
                    with torch.no_grad():
                        logits = qm.module(x[VAL])
                    row[name] = {"agreement": 100 * float((logits.argmax(1) == float_logits.argmax(1)).float().mean()),
                                 "sqnr_db": sqnr_db(logits, float_logits)}
            finally:
                arith.gelu_table = table
            rows.append(row)
            print(f"{recipe} {bits}: {row}", file=sys.stderr)
    command = "python tools/gelu_table_ab.py " + shlex.join(sys.argv[1:])
    lines = ["# GELU by table against the exact GELU: the bundled reference model\n",
             f"Written by:\n\n    {command}\n",
             f"in {time.time() - start:.0f} s. Calibration: bundled calibration images 0-511; validation: 512-1023 "
             "(Fashion-MNIST training data). The simulation computes the programs' arithmetic bit for bit.\n",
             "| recipe | bits | agreement %, exact GELU | agreement %, by table | SQNR dB, exact | SQNR dB, by table |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['bits']} | {r['exact']['agreement']:.2f} | {r['table']['agreement']:.2f} | "
              f"{r['exact']['sqnr_db']:.2f} | {r['table']['sqnr_db']:.2f} |" for r in rows]
    out = Path("docs/validation") / args.name
    md, js = "\n".join(lines) + "\n", json.dumps({"command": command, "rows": rows}, indent=1) + "\n"
    write_atomic(out.with_suffix(".md"), lambda f: f.write(md.encode()))
    write_atomic(out.with_suffix(".json"), lambda f: f.write(js.encode()))
    print(f"gelu_table_ab: wrote {out}.md", file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
