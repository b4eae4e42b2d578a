"""libvitq_kernels.so against the Python references of the vitq:: ops (lower/ops/).

Each case exports a one-op ExecuTorch program (the op's tensors baked in as constants,
as the build does), runs it in ExecuTorch's runtime with the kernels loaded, and
compares with the reference. Codes must match exactly except where a 1-ulp difference
of exp/log2/erf/LayerNorm moves a value across a rounding boundary; outputs to float
rounding. `test_kernels_under_address_sanitizer` re-runs this module against the
AddressSanitizer build of the library.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from vitq_edge.lower import ops  # noqa: F401  (torch.ops.vitq)
from vitq_edge.lower.one_op import one_op_program
from vitq_edge.lower.ops import attention, gelu_shift_log2, linear, log_linear
from vitq_edge.lower.ops.linear import PROLOGUE_GELU, PROLOGUE_LAYER_NORM, PROLOGUE_NONE, pack_int4
from vitq_edge.lower.ops.log_linear import gelu_then_log_linear
from vitq_edge.quant import arith
from vitq_edge.runtime import ARITHMETIC_VERSION, kernels_path, load_kernels, runtime_dir

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not kernels_path().is_file(),
                                reason="libvitq_kernels.so not built (bash tools/build_runtime.sh host)")


def run_program(op, x: torch.Tensor, *args) -> torch.Tensor:
    """Export `op(x, *args)` to a .pte and run it in ExecuTorch's runtime with our kernels."""
    from executorch.runtime import Runtime

    load_kernels()
    buffer = one_op_program(op, x, args)  # kept alive while the method runs: the runtime reads it in place
    method = Runtime.get().load_program(buffer).load_method("forward")
    return method.execute([x])[0]


def random_weight(n: int, k: int, bits: int, gen: torch.Generator) -> dict:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    return {"weight": pack_int4(w) if bits <= 4 else w,
            "weight_scale": torch.rand(n, generator=gen) * 0.02 + 1e-3,
            # Unsigned weight quantizers (ADFQ-ViT) leave a zero point per channel.
            "weight_zero": torch.randint(lo // 2, hi // 2 + 1, (n,), generator=gen).float(),
            "bias": torch.randn(n, generator=gen)}


def linear_args(k: int, n: int, tokens: int, *, w_bits: int = 8, a_bits: int = 8, per_token: bool = False,
                signed: bool = False, threshold: float = 0.0, prologue: int = PROLOGUE_NONE,
                seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    w = random_weight(n, k, w_bits, gen)
    groups = tokens if per_token else 1
    qmin, qmax = (-(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1) if signed else (0, 2**a_bits - 1)
    scale = torch.rand(groups, generator=gen) * 0.05 + 0.01
    zero = torch.zeros(groups) if signed else torch.randint(0, qmax + 1, (groups,), generator=gen).float()
    norm = (torch.randn(k, generator=gen), torch.randn(k, generator=gen)) if prologue == PROLOGUE_LAYER_NORM \
        else (torch.zeros(0), torch.zeros(0))
    return [w["weight"], w["weight_scale"], w["weight_zero"], w["bias"], scale, zero, qmin, qmax, threshold,
            w_bits, prologue, norm[0], norm[1], 1e-6]


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit: kernel and reference share one definition of every float step (quant/arith.py)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = (got.float() - want.float()).abs()
    assert torch.equal(got, want), f"{int((diff > 0).sum())} of {diff.numel()} differ, max {float(diff.max()):.3g}"


LINEAR_CASES = {
    "8-bit per-tensor": dict(k=192, n=64, tokens=17),
    "4-bit packed weights": dict(k=192, n=64, tokens=17, w_bits=4, a_bits=4),
    "odd K and N, 4-bit": dict(k=49, n=11, tokens=5, w_bits=4, a_bits=4),
    "one token": dict(k=64, n=10, tokens=1),
    "15 tokens: row tiles of 8 or 4, then 4, 2, 1": dict(k=96, n=40, tokens=15),
    "signed symmetric input (liu2021)": dict(k=96, n=33, tokens=9, signed=True),
    "per-token scales (PPOQ)": dict(k=96, n=40, tokens=17, per_token=True),
    "LayerNorm prologue": dict(k=96, n=40, tokens=17, prologue=PROLOGUE_LAYER_NORM),
    "GELU prologue": dict(k=96, n=40, tokens=17, prologue=PROLOGUE_GELU),
    "6-bit": dict(k=96, n=40, tokens=17, w_bits=6, a_bits=6),
}


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_matches_reference(case):
    kw = LINEAR_CASES[case]
    x = torch.randn(2, kw["tokens"], kw["k"], generator=torch.Generator().manual_seed(1)) * 2
    args = linear_args(**kw)
    assert_same(run_program(torch.ops.vitq.linear, x, *args), linear.reference(x, *args))


@pytest.mark.parametrize("outliers", ["none", "few", "many", "many, 4-bit"])
def test_linear_outliers_are_added_exactly(outliers):
    x = torch.randn(1, 17, 96, generator=torch.Generator().manual_seed(2))
    if outliers == "few":
        x[0, 3, 5], x[0, 9, 90] = 40.0, -25.0
    elif outliers.startswith("many"):
        x[0, 4] *= 30  # one token made almost only of outliers (groups of four and the rest)
    bits = 4 if "4-bit" in outliers else 8
    args = linear_args(96, 48, 17, per_token=True, threshold=5.0, w_bits=bits, a_bits=bits)
    got, want = run_program(torch.ops.vitq.linear, x, *args), linear.reference(x, *args)
    assert_same(got, want)
    # The outliers matter: without the sparse correction the result would be far off.
    if outliers != "none":
        no_correction = linear.reference(torch.where(x.abs() > 5.0, 0.0, x), *args)
        assert (no_correction - want).abs().max() > 100 * (got - want).abs().max()


def test_linear_outliers_on_a_second_call_use_new_and_seen_channels():
    """The kernel keeps the outlier channels' weights from call to call; new channels join them."""
    from executorch.runtime import Runtime

    load_kernels()
    first = torch.randn(1, 17, 96, generator=torch.Generator().manual_seed(4))
    first[0, 2, 7], first[0, 5, 60] = 30.0, -12.0
    second = first.clone()
    second[0, 8, 7], second[0, 8, 33], second[0, 11, 95] = -9.0, 50.0, 6.5  # channel 7 again, 33 and 95 new
    args = linear_args(96, 48, 17, per_token=True, threshold=5.0, seed=5)
    buffer = one_op_program(torch.ops.vitq.linear, first, args)
    method = Runtime.get().load_program(buffer).load_method("forward")
    for x in (first, second):
        assert_same(method.execute([x])[0], linear.reference(x, *args))


@pytest.mark.parametrize("fill", ["zeros", "saturated"])
def test_linear_edge_inputs(fill):
    x = torch.zeros(1, 5, 64) if fill == "zeros" else torch.full((1, 5, 64), 1e4) * torch.tensor([1.0, -1.0]).repeat(32)
    args = linear_args(64, 16, 5)
    assert_same(run_program(torch.ops.vitq.linear, x, *args), linear.reference(x, *args))


def test_linear_2d_input_like_the_head():
    x = torch.randn(1, 192, generator=torch.Generator().manual_seed(3))
    args = linear_args(192, 10, 1, prologue=PROLOGUE_LAYER_NORM)
    assert_same(run_program(torch.ops.vitq.linear, x, *args), linear.reference(x, *args))


# k <= 16: a compare per threshold (k = 12, 3: padded); more: the mantissa's bucket tables (k = 40 not a power of
# two).
@pytest.mark.parametrize("bits,k", [(4, 2), (8, 32), (6, 8), (4, 1), (8, 64), (8, 16), (7, 12), (5, 3), (8, 40)])
def test_gelu_shift_log2_codes(bits, k):
    x = torch.cat([torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(4)) * 3,
                   torch.zeros(1, 17, 64), torch.full((1, 17, 64), -30.0)])  # zeros; GELU -> 0 -> shift only
    args = [0.17, 2.5, bits, k]
    got, want = run_program(torch.ops.vitq.gelu_shift_log2, x, *args), gelu_shift_log2.reference(x, *args)
    assert_same(got, want)


def test_gelu_shift_log2_codes_of_tiny_ratios():
    # GELU(1) / delta = 2^-122: the exact code 122 on the 8-bit log2 ladder (the ratio floor is below it).
    x = torch.ones(1, 3, 16)
    delta = float(arith.gelu(torch.tensor(1.0))) * 2.0**122
    got = run_program(torch.ops.vitq.gelu_shift_log2, x, 0.0, delta, 8, 1)
    assert_same(got, gelu_shift_log2.reference(x, 0.0, delta, 8, 1))
    assert int(got.flatten()[0]) == 122


@pytest.mark.parametrize("w_bits", [4, 8])
def test_log_linear_matches_reference(w_bits):
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16 if w_bits == 4 else 256, (1, 17, 77), generator=gen, dtype=torch.uint8)
    w = random_weight(24, 77, w_bits, gen)
    args = [w["weight"], w["weight_scale"], w["weight_zero"], w["bias"], 1.5, w_bits, 2 if w_bits == 4 else 32,
            w_bits]
    assert_same(run_program(torch.ops.vitq.log_linear, codes, *args), log_linear.reference(codes, *args))


def test_log_linear_on_a_ladder_too_wide_for_the_planes():
    # 1 step per octave over 254 octaves: the levels are no integer multiples of one unit that int64
    # sums could hold, so the kernel sums per code (its slots) and must still give the reference's bits.
    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 256, (1, 9, 40), generator=gen, dtype=torch.uint8)
    w = random_weight(12, 40, 8, gen)
    args = [w["weight"], w["weight_scale"], w["weight_zero"], w["bias"], 2.0**100, 8, 1, 8]
    assert_same(run_program(torch.ops.vitq.log_linear, codes, *args), log_linear.reference(codes, *args))


def gelu_log_linear_args(w_bits: int, steps: int, seed: int) -> tuple[list, list]:
    """Arguments of gelu_shift_log2 and of the log_linear that reads its codes (fc2 of an adfq block)."""
    gen = torch.Generator().manual_seed(seed)
    w = random_weight(37, 150, w_bits, gen)  # N not a multiple of 8 or 16, K not of 16: every tile tail
    return [0.17, 4.0, w_bits, steps], [w["weight"], w["weight_scale"], w["weight_zero"], w["bias"], 4.0, w_bits,
                                        steps, w_bits]


@pytest.mark.parametrize("w_bits,steps", [(8, 32), (6, 8), (4, 2)])
def test_gelu_then_log_linear_matches_reference(w_bits, steps):
    # adfq's fc2 ladders (8 octaves at 2, 8 and 32 steps per octave) on the codes GELU gives.
    gelu_args, args = gelu_log_linear_args(w_bits, steps, seed=11)
    x = torch.randn(1, 21, 150, generator=torch.Generator().manual_seed(12)) * 2
    got = run_program(lambda v, *a: gelu_then_log_linear(v, gelu_args, *a), x, *args)
    assert_same(got, log_linear.reference(gelu_shift_log2.reference(x, *gelu_args), *args))


def attention_args(log_probs: bool, signed: bool = False, log_bits: int = 8, steps: int = 32) -> list:
    def uniform(scale, zero):
        return [scale, 0 if signed else zero, -128 if signed else 0, 127 if signed else 255]

    probs = [0.9, 0, 0, 0, log_bits, steps] if log_probs else [1 / 255, 0, 0, 255, 0, 0]
    return [3, 0.125, *uniform(0.04, 120), *uniform(0.05, 131), *uniform(0.03, 127), *probs]


@pytest.mark.parametrize("tokens,head_dim", [(1, 16), (17, 16), (50, 16), (6, 3), (13, 13)])
@pytest.mark.parametrize("probs", ["uniform", "log"])
def test_attention_matches_reference(tokens, head_dim, probs):
    """Token and head-dim counts off the kernel's 4-row tiles and 8-lane vectors too."""
    qkv = torch.randn(2, tokens, 3 * 3 * head_dim, generator=torch.Generator().manual_seed(6)) * 2
    args = attention_args(probs == "log")
    assert_same(run_program(torch.ops.vitq.attention, qkv, *args), attention.reference(qkv, *args))


def test_attention_signed_codes_and_saturated_scores():
    qkv = torch.randn(1, 17, 3 * 3 * 16, generator=torch.Generator().manual_seed(7)) * 50  # q, k saturate
    args = attention_args(False, signed=True)
    assert_same(run_program(torch.ops.vitq.attention, qkv, *args), attention.reference(qkv, *args))


@pytest.mark.parametrize("device", ["host", pytest.param("emulated-rpi4", marks=pytest.mark.slow),
                                    pytest.param("emulated-rpi5", marks=pytest.mark.slow)])
def test_attention_log_levels_narrowed_for_wide_v_codes(tmp_path, device):
    """16-bit v codes: T * max|cv - zv| * 2^14 would leave int32, so the integer levels take P = 11
    (arith.level_bits); kernel and reference must narrow them alike."""
    if device != "host" and not _emulated_pis_ready():
        pytest.skip("no aarch64 bundle or qemu (bash tools/setup.sh)")
    tokens, head_dim = 17, 16
    qkv = torch.randn(1, tokens, 3 * 3 * head_dim, generator=torch.Generator().manual_seed(12)) * 2
    args = attention_args(True, log_bits=8, steps=16)
    args[10:14] = [1e-4, 0, -32767, 32767]  # v: 16-bit codes
    assert arith.level_bits(tokens, 32767) == 11
    got = run_on_device(device, torch.ops.vitq.attention, qkv, args, tmp_path)
    assert_same(got, attention.reference(qkv, *args).flatten())


def test_inconsistent_arguments_fail_cleanly():
    """Per-token scales for 5 tokens given 7: the kernel refuses; the process survives."""
    x = torch.randn(1, 7, 32)
    args = linear_args(32, 8, 5, per_token=True)
    with pytest.raises(RuntimeError):
        run_program(torch.ops.vitq.linear, x, *args)


def test_kernels_report_the_arithmetic_they_compute():
    """CMake reads ARITHMETIC_VERSION from runtime.py into the library; load_kernels refuses another."""
    import ctypes

    load_kernels()
    assert ctypes.CDLL(str(kernels_path())).vitq_arithmetic_version() == ARITHMETIC_VERSION


def test_missing_kernels_library_is_a_clear_error(tmp_path):
    code = ("import vitq_edge, sys\nfrom vitq_edge.errors import VitqError\n"
            "from vitq_edge.runtime import load_kernels\n"
            "try:\n    load_kernels()\nexcept VitqError as e:\n    print(e); sys.exit(3)\n")
    env = {**os.environ, "VITQ_KERNELS": str(tmp_path / "libvitq_kernels.so")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "not built" in proc.stdout and "build_runtime.sh" in proc.stdout


FORCED_PATHS = {
    # Our int8 GEMM (qs8_gemm.h) for the linear layers and the attention's int8 codes runs by
    # default on the Pis and on x86 CPUs with VNNI. Forced here in portable C++: the packing of
    # CPUs without dot products (Pi 4), with its -128 fixes ...
    "int8 GEMM, pairs packing": ("VITQ_GEMM", "pairs", "(linear or attention) and not emulated"),
    # ... and of CPUs with them (Pi 5)
    "int8 GEMM, dot packing": ("VITQ_GEMM", "dot", "(linear or attention) and not emulated"),
    # The path of x86 CPUs without VNNI: XNNPACK's GEMM for the linear layers, int16
    # attention codes, log_linear's per-code sums.
    "XNNPACK GEMM, int16 attention": ("VITQ_GEMM", "xnnpack", "(linear or attention) and not emulated"),
    # log_linear's per-code sums where our GEMM runs too (they run anyway for too wide ladders).
    "log_linear per-code sums": ("VITQ_LOG_LINEAR", "slots", "log_linear and not emulated"),
}


@pytest.mark.slow
@pytest.mark.parametrize("path", FORCED_PATHS)
def test_forced_code_paths_match_reference(path):
    """The attention / linear tests again on the code path another CPU takes (forced here): the
    offset corrections of the int8 codes, and our GEMM's packing, tails and epilogue, must give the
    same bits."""
    var, value, tests = FORCED_PATHS[path]
    if os.environ.get("VITQ_FORCED_RUN") == "1":
        pytest.skip("already a forced run")  # (the -k filter selects these tests too)
    env = {**os.environ, var: value, "VITQ_FORCED_RUN": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", tests,
                           __file__], capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def gemm_for_this_cpu() -> str:
    """The GEMM the kernels should pick here, from the CPU's flags (common.cpp: cpu_vnni; qs8_gemm_layout)."""
    info = open("/proc/cpuinfo").read()
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith(("flags", "Features"))), []))
    if os.uname().machine == "aarch64":
        return "dot" if "asimddp" in flags else "pairs"
    if "avx_vnni" in flags:
        return "vnni"
    return "vnni-evex" if {"avx512_vnni", "avx512vl"} <= flags else "xnnpack"


def test_runner_reports_the_gemm_this_cpu_runs(tmp_path):
    """The runner names the int8 GEMM its kernels run: the one this CPU's instructions allow (a detection
    slip, e.g. missing AVX512-VNNI's EVEX tile, would fall back to XNNPACK's GEMM: the same bits, only
    slower, so no other test would see it), or what VITQ_GEMM forces."""
    from vitq_edge.runtime import find_bundle

    pte = tmp_path / "linear.pte"
    pte.write_bytes(one_op_program(torch.ops.vitq.linear, torch.randn(1, 5, 64), linear_args(64, 8, 5)))
    env = {k: v for k, v in os.environ.items() if k != "VITQ_GEMM"}
    for forced, want in ((None, gemm_for_this_cpu()), ("xnnpack", "xnnpack"), ("pairs", "pairs")):
        ran = subprocess.run([str(find_bundle("host").runner), str(pte)], capture_output=True, text=True,
                             timeout=120, env=env if forced is None else {**env, "VITQ_GEMM": forced})
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert json.loads(ran.stdout)["gemm"] == want, (forced, ran.stdout)


def _emulated_pis_ready() -> bool:
    from vitq_edge.device.emulated import find_qemu
    from vitq_edge.errors import VitqError

    try:
        find_qemu()
    except VitqError:
        return False
    return (runtime_dir() / "aarch64" / "lib" / "libvitq_kernels.so").is_file()


def run_on_device(device: str, op, x: torch.Tensor, args: list, tmp_path) -> torch.Tensor:
    """`op(x, *args)` as a one-op .pte run by vitq-runner on `device`; the output, flat."""
    import numpy as np
    from vitq_edge.device import get_device
    from vitq_edge.device.base import RunRequest

    pte, inputs = tmp_path / "op.pte", tmp_path / "x.npy"
    pte.write_bytes(one_op_program(op, x, args))
    np.save(inputs, x.numpy())
    with get_device(device).session(pte) as session:
        result = session.run(RunRequest(inputs=[inputs], outputs=True, timeout=600))
    return torch.from_numpy(result.output).flatten()


@pytest.mark.slow
@pytest.mark.skipif(not _emulated_pis_ready(), reason="no aarch64 bundle or qemu (bash tools/setup.sh)")
@pytest.mark.parametrize("case", ["random", "random, 15 tokens", "-128 pairs, saturated", "PPOQ outliers",
                                  "LayerNorm", "LayerNorm, PPOQ outliers, symmetric weights"])
@pytest.mark.parametrize("device", ["emulated-rpi4", "emulated-rpi5"])
def test_linear_on_emulated_pi_matches_reference(tmp_path, device, case):
    """vitq::linear on the emulated Pis, where our NEON GEMMs run (Cortex-A72: smull/smlal2 pairs in
    int16 lanes; Cortex-A76: sdot): the host's bits, i.e. the reference's. On the A72 a -128/-128
    weight pair at k and k + 8 meeting inputs of code -128 would overflow an int16 lane (XNNPACK's
    neon_mlal kernels get this case wrong): our GEMM packs the one at k + 8 as -127 and corrects the
    sums. PPOQ outliers: the sparse float correction in groups of four and singly (one token almost
    all outliers, others with a few). LayerNorm: the aarch64 pass that normalizes and codes at once
    (K 203: its rest of 3 values; symmetric weights: no row sums; outliers: LayerNorm's output
    above 2 kept in float)."""
    # K not a multiple of 16, N of 4, tokens of 4: every tail of the tiles (15 tokens: the rows left
    # after whole row tiles in tiles of 4, 2 and 1 rows on the Pi 5, of 2 and 1 on the Pi 4)
    norm = case.startswith("LayerNorm")
    k, n, tokens = 203 if norm else 200, 43, 15 if case == "random, 15 tokens" else 17
    outliers = "PPOQ outliers" in case
    threshold = (2.0 if norm else 5.0) if outliers else 0.0
    args = linear_args(k, n, tokens, seed=5, per_token=outliers, threshold=threshold,
                       prologue=PROLOGUE_LAYER_NORM if norm else PROLOGUE_NONE)
    if "symmetric" in case:
        args[2] = torch.zeros_like(args[2])
    x = torch.randn(1, 1, tokens, k, generator=torch.Generator().manual_seed(6)) * 2
    if outliers:
        x[0, 0, 4] *= 30
        x[0, 0, 9, ::37] = 12.0
    elif case == "-128 pairs, saturated":
        w = args[0].clone()
        w[0, 0] = w[0, 8] = w[n - 1, 16] = w[n - 1, 24] = -128
        args[0] = w
        x[0, 0, 3] = -1e4  # code 0 = -128 after the unsigned shift, at every k
    got = run_on_device(device, torch.ops.vitq.linear, x, args, tmp_path).reshape(1, 1, tokens, n)
    assert_same(got, linear.reference(x, *args))


@pytest.mark.slow
@pytest.mark.skipif(not _emulated_pis_ready(), reason="no aarch64 bundle or qemu (bash tools/setup.sh)")
@pytest.mark.parametrize("signed,probs", [(False, "uniform"), (True, "uniform"), (False, "log 8 bits, k 32"),
                                          (False, "log 8 bits, k 16"), (False, "log 6 bits, k 4"),
                                          (False, "log 4 bits, k 1")])
@pytest.mark.parametrize("device", ["emulated-rpi4", "emulated-rpi5"])
def test_attention_on_emulated_pi_matches_reference(tmp_path, device, signed, probs):
    """vitq::attention on the emulated Pis, where q.k^T and A.V run on our GEMM's NEON tiles (int8
    codes with offsets). Saturated q / k / v put codes of -128 on both sides of the A72's int16 pairs:
    the keys' and V's -128 pairs are packed with -127 and corrected. Log probability codes: codes
    from the dot products without the int8 codes' row term, integer levels interleaved by key times
    int16 V rows by lane (37 keys: a padded key group; 20 columns: 16 and a last 8; 37 rows: a short
    row group). Up to 16 steps per octave (adfq's probabilities at 8, 6 and 4 bits) the levels come
    from NEON table lookups (quant_math.h LogLevelsX4), at 32 from a table one by one."""
    tokens, head_dim = 37, 20  # tails of the 4- and 8-row tiles, of 16-deep blocks and of column groups
    qkv = torch.randn(1, tokens, 3 * 3 * head_dim, generator=torch.Generator().manual_seed(8)) * 50
    if probs.startswith("log"):
        qkv[..., :3 * head_dim] *= 0.05  # q: scores over a few units, probabilities over many octaves
        log_bits, steps = (int(probs.split()[1]), int(probs.split()[-1]))
        args = attention_args(True, log_bits=log_bits, steps=steps)
    else:
        args = attention_args(False, signed=signed)
    got = run_on_device(device, torch.ops.vitq.attention, qkv, args, tmp_path).reshape(1, tokens, 3 * head_dim)
    assert_same(got, attention.reference(qkv, *args))


def scale_halving_log_factor(steps: int) -> float:
    """A float32 `scale` with q_scale = k_scale = 1 whose log codes' factor f32(k log2(e) f32(scale))
    is exactly 0.5: then every odd difference of dot products is a tie of the codes' rounding."""
    want = torch.tensor(0.5 / (steps * arith.LOG2E_F64), dtype=torch.float32)
    for _ in range(64):
        factor = arith._f32(steps * arith.LOG2E_F64 * float(want))
        if factor == 0.5:
            return float(want)
        want = torch.nextafter(want, torch.tensor(0.0 if factor > 0.5 else 1.0))
    raise AssertionError(f"no float scale gives the factor 0.5 at k = {steps}")


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["asymmetric", "symmetric"])  # with and without the inputs' row sums
@pytest.mark.parametrize("device", ["host", "emulated-rpi4", "emulated-rpi5"])
def test_linear_gelu_codes_near_every_rounding_boundary(tmp_path, device, weights):
    """The GELU prologue's codes at codes per token position (a table of the grid points' codes made
    for each row, runtime/kernels/gelu_codes.h): a dense grid of inputs per token, each
    token at its own scale (0.002 .. 0.05), crosses every code's rounding boundary; an infinity,
    and values above the grid whose conversion saturates (zero point 200: a wrapping addition
    fails)."""
    if device != "host" and not _emulated_pis_ready():
        pytest.skip("no aarch64 bundle or qemu (bash tools/setup.sh)")
    tokens, k, n = 16, 4096, 24
    args = linear_args(k, n, tokens, per_token=True, prologue=PROLOGUE_GELU, seed=21)
    scales = torch.logspace(math.log10(0.002), math.log10(0.05), tokens)
    zeros = torch.tensor([100.0, 200.0]).repeat(tokens // 2)  # codes 0..255 cover gelu in [-z s, (255 - z) s]
    args[4], args[5] = scales, zeros
    if weights == "symmetric":
        args[2] = torch.zeros_like(args[2])
    x = torch.stack([torch.linspace(-6.0, (255 - float(z)) * float(s) + 1.0, k)
                     for s, z in zip(scales, zeros, strict=True)]).unsqueeze(0)
    x[0, :2, :3] = torch.tensor([math.inf, 1e30, -1e30])  # (gelu(-inf) is NaN: no code)
    got = run_on_device(device, torch.ops.vitq.linear, x, args, tmp_path).reshape(1, tokens, n)
    assert_same(got, linear.reference(x, *args))


def gelu_table_edges(k: int, seed: int) -> torch.Tensor:
    """k inputs of arith.gelu_table's edge cases, shuffled, random values after them: every midpoint
    between grid points (ties, to even) and the floats either side of it, the grid's top edge 127.5 / 32
    (above it: x itself) and bottom, huge values, infinities, a NaN (coded as gelu(0)), signed zeros."""
    mids = (torch.arange(-131, 131) + 0.5) / arith.GELU_GRID_STEPS
    top = torch.tensor(127.5 / arith.GELU_GRID_STEPS)
    special = torch.tensor([-4.0, -4.015625, -4.03125, -1e30, 1e30, math.inf, -math.inf, math.nan, 0.0, -0.0, top,
                            torch.nextafter(top, torch.tensor(0.0)), torch.nextafter(top, torch.tensor(9.0))])
    edges = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), special])
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([edges, torch.randn(max(k - edges.numel(), 0), generator=gen) * 3])[:k]
    return x[torch.randperm(k, generator=gen)]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])  # 8: the table of codes; 4: GELU by table's values, then coded
@pytest.mark.parametrize("device", ["host", "emulated-rpi4", "emulated-rpi5"])
def test_linear_gelu_table_edges(tmp_path, device, bits):
    """GELU by table (arith.gelu_table) into codes per tensor at its edges: ties between grid points,
    the top edge (x itself above it, coded in the groups of 16 that hold such a lane), the bottom, a
    NaN, infinities; K = 16 x 60 + 7 leaves a scalar tail. Each token shuffled differently; symmetric
    weights at 4 bits (no row sums)."""
    if device != "host" and not _emulated_pis_ready():
        pytest.skip("no aarch64 bundle or qemu (bash tools/setup.sh)")
    tokens, k, n = 6, 16 * 60 + 7, 24
    args = linear_args(k, n, tokens, prologue=PROLOGUE_GELU, w_bits=bits, a_bits=bits, seed=23)
    args[4], args[5] = torch.tensor([0.02 if bits == 8 else 0.3]), torch.tensor([20.0 if bits == 8 else 1.0])
    if bits == 4:
        args[2] = torch.zeros_like(args[2])
    x = torch.stack([gelu_table_edges(k, seed) for seed in range(tokens)]).unsqueeze(0)
    got = run_on_device(device, torch.ops.vitq.linear, x, args, tmp_path).reshape(1, tokens, n)
    want = linear.reference(x, *args)
    assert torch.isfinite(want).all()
    assert_same(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["host", "emulated-rpi4"])
def test_gelu_shift_log2_table_edges(tmp_path, device):
    """The Shift-Log2 path's GELU by table at its edges (gelu_table_edges), on the 4-bit log-sqrt2 ladder."""
    if device != "host" and not _emulated_pis_ready():
        pytest.skip("no aarch64 bundle or qemu (bash tools/setup.sh)")
    x = gelu_table_edges(1031, seed=5).reshape(1, 1, -1)
    args = [0.17, 4.0, 4, 2]
    got = run_on_device(device, torch.ops.vitq.gelu_shift_log2, x, args, tmp_path)
    assert_same(got, gelu_shift_log2.reference(x, *args).flatten())


@pytest.mark.parametrize("case", ["ties", "octaves", "clamped"])
@pytest.mark.parametrize("device", ["host", pytest.param("emulated-rpi4", marks=pytest.mark.slow),
                                    pytest.param("emulated-rpi5", marks=pytest.mark.slow)])
def test_attention_integer_softmax_ties_and_octaves(tmp_path, device, case):
    """Uniform probability codes in integers (arith.integer_softmax_codes). A query (q, q, 0, ..) and keys
    whose two first codes sum to 254 minus each difference 0 .. 508: "ties": the exponentials' factor
    f32(256 log2(e) alpha) exactly 0.5, so every odd difference is a tie of Y's rounding (half to even)
    and Y runs over 0 .. 254 (every step within the first octave); "octaves": q = 2 and the factor 8, Y
    in steps of 16 over all 20 octaves and past the cap (E = 0). A probability scale of 2^-15 or 2^-11
    puts the largest codes near 90: an exponential one step off moves codes; "clamped": the octaves with
    2^-13 and zero point 100, the largest codes past 255 (the Pis' saturating narrowing is the clamp)."""
    if device != "host" and not _emulated_pis_ready():
        pytest.skip("no aarch64 bundle or qemu (bash tools/setup.sh)")
    diffs = torch.arange(0, 509)
    tokens, head_dim = diffs.numel(), 8
    q, scale = (1.0, scale_halving_log_factor(arith.SOFTMAX_EXP_STEPS)) if case == "ties" else \
        (2.0, 16 * scale_halving_log_factor(arith.SOFTMAX_EXP_STEPS))
    qkv = torch.zeros(1, tokens, 3 * head_dim)
    qkv[0, :, 0:2] = q
    key_sums = 254 - diffs  # two codes in [-127, 127] with this sum
    qkv[0, :, head_dim] = torch.clamp(key_sums, max=127).float()
    qkv[0, :, head_dim + 1] = (key_sums - torch.clamp(key_sums, max=127)).float()
    qkv[0, :, 2 * head_dim:] = torch.randn(tokens, head_dim, generator=torch.Generator().manual_seed(14)) * 3
    unit = [1.0, 0, -127, 127]
    p_scale, p_zero = {"ties": (2.0**-15, 0), "octaves": (2.0**-11, 0), "clamped": (2.0**-13, 100)}[case]
    args = [1, scale, *unit, *unit, 0.05, 0, -127, 127, p_scale, p_zero, 0, 255, 0, 0]
    got = run_on_device(device, torch.ops.vitq.attention, qkv, args, tmp_path)
    want = attention.reference(qkv, *args).flatten()
    assert_same(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("log_bits,steps", [(8, 16), (6, 4), (4, 1), (8, 32)])
@pytest.mark.parametrize("device", ["host", "emulated-rpi4", "emulated-rpi5"])
def test_attention_log_codes_round_ties_to_even(tmp_path, device, log_bits, steps):
    """Log probability codes at ties: with the codes' factor exactly 0.5, a query (1, 1, 0, ..) and
    keys whose two first codes sum to the largest minus each difference 0 .. 508, every odd difference
    is a tie of round(diff / 2) (half to even: fcvtns, nearbyint, torch.round), and at 8 bits k 16
    the difference 480 gives the code 240, whose integer level 2^14 * 2^-15 is itself a tie (to 0).
    Random scores never land on ties."""
    if device != "host" and not _emulated_pis_ready():
        pytest.skip("no aarch64 bundle or qemu (bash tools/setup.sh)")
    diffs = torch.arange(0, 509)
    tokens, head_dim = diffs.numel(), 8
    qkv = torch.zeros(1, tokens, 3 * head_dim)
    qkv[0, :, 0:2] = 1.0  # q codes (1, 1, 0, ...)
    key_sums = 254 - diffs  # two codes in [-127, 127] with this sum
    qkv[0, :, head_dim] = torch.clamp(key_sums, max=127).float()
    qkv[0, :, head_dim + 1] = (key_sums - torch.clamp(key_sums, max=127)).float()
    qkv[0, :, 2 * head_dim:] = torch.randn(tokens, head_dim, generator=torch.Generator().manual_seed(13)) * 3
    unit = [1.0, 0, -127, 127]
    args = [1, scale_halving_log_factor(steps), *unit, *unit, 0.05, 0, -127, 127, 1.0, 0, 0, 0, log_bits, steps]
    got = run_on_device(device, torch.ops.vitq.attention, qkv, args, tmp_path)
    assert_same(got, attention.reference(qkv, *args).flatten())


@pytest.mark.slow
@pytest.mark.skipif(not _emulated_pis_ready(), reason="no aarch64 bundle or qemu (bash tools/setup.sh)")
@pytest.mark.parametrize("w_bits,steps", [(8, 32), (4, 2)])
@pytest.mark.parametrize("device", ["emulated-rpi4", "emulated-rpi5"])
def test_log_linear_on_emulated_pi_matches_reference(tmp_path, device, w_bits, steps):
    """vitq::log_linear on the emulated Pis: the exact integer planes of the log levels through our NEON
    GEMMs (bytes of the levels at 8 bits, one plane per step within the octave at W4A4's 2 steps)."""
    gelu_args, args = gelu_log_linear_args(w_bits, steps, seed=9)
    x = torch.randn(1, 21, 150, generator=torch.Generator().manual_seed(10)) * 2
    got = run_on_device(device, lambda v, *a: gelu_then_log_linear(v, gelu_args, *a), x, args, tmp_path)
    want = log_linear.reference(gelu_shift_log2.reference(x, *gelu_args), *args)
    assert_same(got.reshape(want.shape), want)


ASAN_LIB = runtime_dir() / "host-asan" / "lib" / "libvitq_kernels.so"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VITQ_UNDER_ASAN") == "1", reason="already the sanitized run")
@pytest.mark.skipif(not ASAN_LIB.is_file(), reason="no AddressSanitizer build (bash tools/build_runtime.sh asan)")
def test_kernels_under_address_sanitizer():
    def gcc_lib(name: str) -> str:
        return subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()

    # libstdc++ preloaded too: ASan's __cxa_throw interceptor must find it before torch throws.
    env = {**os.environ, "VITQ_KERNELS": str(ASAN_LIB), "VITQ_UNDER_ASAN": "1",
           "LD_PRELOAD": f"{gcc_lib('libasan.so')} {gcc_lib('libstdc++.so.6')}",
           # Python and torch are not sanitized: only report errors, not their allocations at exit.
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "ERROR: AddressSanitizer" not in proc.stderr


def test_runner_without_the_kernels_library_names_it(tmp_path):
    """vitq-runner on a program calling vitq:: ops, with the bundled library not loaded: a clear error."""
    from vitq_edge.runtime import find_bundle

    runner = find_bundle("host").runner
    x = torch.randn(1, 5, 64)
    pte = tmp_path / "linear.pte"
    pte.write_bytes(one_op_program(torch.ops.vitq.linear, x, linear_args(64, 8, 5)))
    ok = subprocess.run([str(runner), str(pte)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    missing = subprocess.run([str(runner), "--no-default-kernels", str(pte)], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode != 0 and "Segmentation" not in missing.stderr
    assert "libvitq_kernels.so" in missing.stderr, missing.stderr[-2000:]


def test_runner_reports_its_kernels_arithmetic_and_a_stale_bundle_is_refused(tmp_path):
    """The runner reports the arithmetic of the kernels it loaded; the SDK refuses a runner of another
    one for a program that calls vitq:: ops (it would compute other bits), and only for such a program."""
    from vitq_edge.device.base import parse_report, program_uses_kernels
    from vitq_edge.errors import VitqError
    from vitq_edge.runtime import find_bundle

    runner = find_bundle("host").runner
    x = torch.randn(1, 5, 64)
    pte = tmp_path / "linear.pte"
    pte.write_bytes(one_op_program(torch.ops.vitq.linear, x, linear_args(64, 8, 5)))
    assert program_uses_kernels(pte)
    ran = subprocess.run([str(runner), str(pte)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    report = parse_report(ran.stdout, ran.stderr, 0, "host", str(pte), bundle="host", uses_kernels=True)
    assert report["arithmetic_version"] == ARITHMETIC_VERSION

    field = f'"arithmetic_version": {ARITHMETIC_VERSION}'
    assert field in ran.stdout
    for stale, says in ((ran.stdout.replace(field, f'"arithmetic_version": {ARITHMETIC_VERSION - 1}'),
                         f"integer arithmetic {ARITHMETIC_VERSION - 1}"),
                        (ran.stdout.replace(field, '"arithmetic_version": null'), "(it predates versions)")):
        with pytest.raises(VitqError, match=re.escape(f"{says} and this vitq-edge {ARITHMETIC_VERSION}; rebuild the "
                                                      "bundle")):
            parse_report(stale, "", 0, "host", str(pte), bundle="host", uses_kernels=True)
        # A stock program computes no arithmetic of ours: the same runner may run it.
        assert parse_report(stale, "", 0, "host", str(pte), bundle="host", uses_kernels=False)["latency_ms"]
