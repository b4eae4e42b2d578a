"""Where liu2021's interval search puts an MLP's input intervals on the real model, at several widths,
against the largest |value| those inputs reach: does the search clip the model's largest activations,
and does a wider code stop it?

    .venv/bin/python tools/liu_search_clip.py
    .venv/bin/python tools/liu_search_clip.py --blocks 2,6,9 --widths 5,6,8

Each MLP is searched as liu2021's mixed-precision sensitivities search it (`module_search`, its
`mp_candidates` intervals, on the float model's block input of the first `mp_search_images`
calibration images), the rest of the model float. Writes docs/validation/liu-search-clip.{md,json}
(or --out).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.artifacts import write_measurement
from vitq_edge.data.cifar10 import cifar10_images
from vitq_edge.lifetime import run_script
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.models.source import load_model
from vitq_edge.quant import vit
from vitq_edge.quant.calibration import BlockInputs, batches
from vitq_edge.quant.liu2021 import liu_factory, search_intervals
from vitq_edge.quant.mixed_precision import at_width, module_names, module_search
from vitq_edge.recipes import recipe_config

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="2,6,9", help="comma-separated block indices")
    ap.add_argument("--widths", default="5,6,8", help="comma-separated bit widths")
    ap.add_argument("--out", help="output stem (default docs/validation/liu-search-clip)")
    args = ap.parse_args()
    command = "python tools/liu_search_clip.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    out = Path(args.out or REPO / "docs" / "validation" / "liu-search-clip")
    # The paper's grid at every width: the question is where the paper's search clips (the recipe's
    # default no longer searches below the max at 8 bits).
    config = recipe_config("liu2021", "W6A6")
    config = replace(config, alpha_8bit=config.alpha)
    search_config = replace(config, candidates=config.mp_candidates)
    batch = config.batch_size * 4
    loaded = load_model(MODEL_NAME)
    calib = cifar10_images("train").subset(range(config.mp_search_images))
    x = torch.cat([b for b, _ in calib.batches(loaded.preprocess, 32)])
    reference = vit.quantize_vit(loaded.model, liu_factory(lambda op: (8, 8)))
    vit.set_enabled(reference, False)
    walk = BlockInputs(reference, x, batch)
    rows = []
    for i in (int(b) for b in args.blocks.split(",")):
        block_input = walk.block_input(i)
        for bits in (int(w) for w in args.widths.split(",")):
            qmodel = vit.quantize_vit(loaded.model, at_width(liu_factory, config, module_names(loaded.model), bits))
            vit.calibrate_activations(qmodel, batches(x, batch))
            vit.set_enabled(qmodel, False)
            module = f"blocks.{i}.mlp"
            search = module_search(qmodel, x, search_config, i, block_input, batch, search_intervals)
            search(qmodel, x, only=[f"{module}.fc1", f"{module}.fc2"])
            inputs = BlockInputs(qmodel, x, batch, known=(i, block_input))
            for op_name in ("fc1", "fc2"):
                op = qmodel.get_submodule(f"{module}.{op_name}")
                op.input_quant.enabled = False  # the input as it reaches the op, unquantized
                (seen,) = inputs.of(f"{module}.{op_name}", op)
                op.input_quant.enabled = True
                q = op.input_quant
                qmin, qmax = q.qrange
                lo, hi = (float(q.scale) * (c - float(q.zero_point)) for c in (qmin, qmax))
                clip, peak = min(-lo, hi), float(seen.abs().max())
                rows.append({"op": f"{module}.{op_name}", "bits": bits, "clip": clip, "max_abs": peak,
                             "clip_over_max": clip / peak,
                             "clipped_percent": float(((seen < lo) | (seen > hi)).float().mean()) * 100})
                print(rows[-1], file=sys.stderr)
    result = {"command": command, "search_images": config.mp_search_images, "candidates": config.mp_candidates,
              "grid": [config.alpha, config.beta], "rows": rows}
    lines = ["# liu2021's searched MLP input intervals against the inputs' largest values (real model)", "",
             f"    {command}", "",
             f"dinov2-s14-cifar10: each MLP searched alone as the mixed-precision sensitivities search it "
             f"({config.mp_candidates} candidate intervals in [{config.alpha}, {config.beta}] x the observed max, "
             f"the float model's block input of the first {config.mp_search_images} calibration images). clip = "
             "the searched interval's nearer end to zero; clipped % = the share of input values outside the "
             "interval.", "",
             "| op input | bits | clip | max abs | clip / max | clipped % |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['bits']} | {r['clip']:.3f} | {r['max_abs']:.2f} | {r['clip_over_max']:.2f} | "
              f"{r['clipped_percent']:.4f} |" for r in rows]
    write_measurement(out, result, lines)


if __name__ == "__main__":
    run_script(main)
