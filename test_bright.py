"""
Tests for the BRIGHT reference: the hash-grid lookup (reference, fast torch path, Triton
kernels in the interpreter), the model, training, the commands and their errors, and the
diffusion model. CPU only: `pytest` (the few end-to-end tests are marked slow and still run).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import argparse
import dataclasses
import io
import json
import math
import re
import struct
import shutil
import signal
import zlib
from re import escape as re_escape
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from PIL import Image

import bright
import diffusion
from bright import BRIGHT, Config, make_config
import hashgrid_triton as hg
from hashgrid_triton import GridSpec, cell_and_frac, grid_lookup, grid_lookup_fast, grid_lookup_reference

SETTINGS = settings(max_examples=15, deadline=None)

# the Ctrl-C tests need Python's usual SIGINT handling, here and in the processes they start;
# a shell without job control starts background jobs (`pytest &`) with SIGINT ignored
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ----------------------------------------------------------------------------- lookup: strategies

@st.composite
def grid_case(draw, max_points=40):
    """A random grid spec with both dense and hashed levels possible, either vertex placement,
    coords that include exact 0 and 1, and float64 tables."""
    D = draw(st.sampled_from([2, 3, 4]))
    L = draw(st.integers(1, 5))
    Fe = draw(st.sampled_from([1, 2, 4]))
    G = draw(st.integers(1, 3))
    min_res = draw(st.integers(1, 6))
    max_res = draw(st.integers(min_res, 24))
    t = draw(st.integers(4, 12))  # small tables: the finer levels hash
    spec = GridSpec(D, L, Fe, t, min_res, max_res, draw(st.booleans()))
    N = draw(st.integers(1, max_points))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(N, G, D, generator=gen, dtype=torch.float64)
    # put exact 0s and 1s in some coordinates
    edge = torch.rand(N, G, D, generator=gen) < 0.15
    coords[edge] = torch.randint(0, 2, (int(edge.sum()),), generator=gen).double()
    tables = torch.randn(G, spec.num_entries, Fe, generator=gen, dtype=torch.float64)
    return spec, coords, tables


def grads(fn, coords, tables, spec, grad_out):
    c, t = coords.clone().requires_grad_(), tables.clone().requires_grad_()
    y = fn(c, t, spec)
    gc, gt = torch.autograd.grad(y, (c, t), grad_out)
    return y.detach(), gc, gt


@pytest.fixture
def two_threads():
    """torch on two threads for the test (where several threads change the order of float sums)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- lookup: GridSpec

def test_gridspec_paper_sizes():
    # BRIGHT's grid: D=3, L=16, res 16->64, T=2^18: levels 0-14 dense, level 15 hashed,
    # 1,164,392 entries per group (the church model's 18,630,272 parameters: test_model_cost...)
    spec = GridSpec(3, 16, 4, 18, 16, 64)
    assert spec.resolutions[0] == 16 and spec.resolutions[-1] == 64
    assert spec.dense == (True,) * 15 + (False,)
    assert spec.num_entries == 1_164_392
    assert all(o % 8 == 0 for o in spec.offsets)
    # a level is dense when its (res + 1)^D vertices fit in T entries, exactly T included
    assert GridSpec(2, 1, 1, 4, 3, 3).dense == (True,) and GridSpec(2, 1, 1, 4, 3, 3).num_entries == 16
    assert GridSpec(2, 1, 1, 4, 4, 4).dense == (False,)   # 25 vertices > 16: hashed


def test_hash_matches_uint32_arithmetic():
    # the torch hash (int64, masked) equals the uint32 XOR-of-products mod T computed by numpy
    spec = GridSpec(4, 1, 1, 10, 100, 100)
    c = torch.randint(0, 101, (1000, 4))
    from hashgrid_triton import PRIMES, corner_index
    ref = np.zeros(1000, dtype=np.uint32)
    for d in range(4):
        ref ^= c[:, d].numpy().astype(np.uint32) * np.uint32(PRIMES[d])
    assert torch.equal(corner_index(c, spec, 0), torch.from_numpy((ref % 1024).astype(np.int64)))
    # Instant-NGP's constants (Mueller et al. 2022, eq. 4): 1 for the first dimension keeps
    # neighbouring x in neighbouring entries (cache coherence)
    assert PRIMES[:3] == (1, 2654435761, 805459861)


# ----------------------------------------------------------------------------- lookup: properties of the reference

@SETTINGS
@given(grid_case(), st.floats(-3, 3))
def test_partition_of_unity(case, c):
    # multilinear weights sum to 1: a level whose entries all equal c returns c everywhere
    spec, coords, tables = case
    tables[:] = c
    y = grid_lookup_reference(coords, tables, spec)
    assert torch.allclose(y, torch.full_like(y, c), atol=1e-12)


@SETTINGS
@given(grid_case(max_points=10), st.integers(0, 100))
def test_continuity_across_cell_faces(case, which):
    # put dimension d of every point exactly on a face of level l, step delta either side:
    # the change is bounded by the Lipschitz constant (D * res_max * 2 max|entry| per unit
    # of x), far below the O(max|entry|) jump a wrong corner or weight would produce
    spec, coords, tables = case
    torch.manual_seed(0)  # the draws below: the same whenever hypothesis replays the case
    l, d = which % spec.levels, which % spec.dim
    # the faces pos = x * scale + shift = k of level l's cells 0..res-1 that lie inside (0, 1)
    # (staggered, the last one may lie past 1, and a level of scale 0 has none)
    faces = torch.tensor([x for k in range(1, spec.resolutions[l]) if spec.scales[l] > 0
                          and 0 < (x := (k - spec.shift) / spec.scales[l]) < 1] or [0.5], dtype=torch.float64)
    coords[:, :, d] = faces[torch.randint(len(faces), coords.shape[:2])]
    delta = 1e-7
    lo, hi = coords.clone(), coords.clone()
    lo[:, :, d] -= delta
    hi[:, :, d] += delta
    diff = (grid_lookup_reference(hi, tables, spec) - grid_lookup_reference(lo, tables, spec)).abs().max()
    bound = 2 * delta * spec.dim * max(spec.resolutions) * 2 * tables.abs().max()
    assert diff <= bound * (1 + 1e-6) + 1e-12


@SETTINGS
@given(grid_case())
def test_coord_gradient_matches_finite_differences(case):
    # central differences in float64 (h = 1e-6): exact for a function linear in x on the
    # cell, up to rounding ~1e-10; points within 1e-4 of any cell face of any level are left
    # out (the derivative jumps there), as are clamped coordinates (gradient 0 by definition)
    spec, coords, tables = case
    torch.manual_seed(0)  # the draws below: the same whenever hypothesis replays the case
    N, G, D = coords.shape
    go = torch.randn(N, G, spec.levels * spec.features, dtype=torch.float64)
    _, gc, _ = grads(grid_lookup_reference, coords, tables, spec, go)
    h = 1e-6
    far = (coords > 1e-3) & (coords < 1 - 1e-3)
    for scale in spec.scales:
        pos = coords * scale + spec.shift
        frac = pos - pos.floor()
        far &= (frac > 1e-4) & (frac < 1 - 1e-4)
    for d in range(D):
        e = torch.zeros(D, dtype=torch.float64); e[d] = h
        fd = ((grid_lookup_reference(coords + e, tables, spec) - grid_lookup_reference(coords - e, tables, spec))
              * go).sum(-1) / (2 * h)
        m = far[..., d]
        assert torch.allclose(gc[..., d][m], fd[m], rtol=1e-6, atol=1e-6)
    # exactly on the boundary the clamp is active: gradient 0
    on_edge = (coords == 0) | (coords == 1)
    assert (gc[on_edge] == 0).all()


@SETTINGS
@given(grid_case(), st.floats(-2, 2), st.floats(-2, 2))
def test_linear_in_tables_and_table_gradient(case, a, b):
    # lookup(a T1 + b T2) = a lookup(T1) + b lookup(T2); and the table gradient is the
    # adjoint of that linear map: <dL/dT, T2> = <lookup(T2), grad_out>
    spec, coords, t1 = case
    torch.manual_seed(0)  # the draws below: the same whenever hypothesis replays the case
    t2 = torch.randn_like(t1)
    f = lambda t: grid_lookup_reference(coords, t, spec)
    assert torch.allclose(f(a * t1 + b * t2), a * f(t1) + b * f(t2), atol=1e-10)
    go = torch.randn_like(f(t1))
    _, _, gt = grads(grid_lookup_reference, coords, t1, spec, go)
    assert torch.allclose((gt * t2).sum(), (f(t2) * go).sum(), rtol=1e-9, atol=1e-9)


def test_lookup_exact_values_on_vertices():
    # at a vertex, interpolation returns that vertex's entry: dense row-major index check
    spec = GridSpec(3, 1, 2, 12, 4, 4)  # one dense level, res 4: 125 vertices
    tables = torch.randn(1, spec.num_entries, 2, dtype=torch.float64)
    c = torch.tensor([[1, 2, 3]])
    y = grid_lookup_reference((c / 4).double()[:, None], tables, spec)
    assert torch.equal(y[0, 0], tables[0, 1 + 2 * 5 + 3 * 25])


def test_staggered_vertices_are_torch_ngps():
    # Instant-NGP / torch-ngp: pos = x * (N_l - 1) + 0.5 with N_l = min_res * b^l unrounded,
    # the same (res + 1)^D row-major vertices. Level 1 of res 2 -> 8 over 3 levels: N = 4,
    # scale 3, res 4; the vertex c sits at x = (c - 0.5) / 3, and x = 0 is no vertex but the
    # centre of cell 0: the mean of its 2^D corners.
    spec = GridSpec(3, 3, 2, 12, 2, 8, staggered=True)
    assert spec.resolutions == (2, 4, 8) and spec.scales == pytest.approx((1, 3, 7)) and spec.dense == (True,) * 3
    assert GridSpec(3, 2, 2, 12, 2, 5, staggered=True).scales == pytest.approx((1, 4))  # N_1 = 5
    assert GridSpec(2, 3, 1, 12, 4, 9, staggered=True).scales == pytest.approx((3, 5, 8))  # N_1 = 6
    assert GridSpec(2, 3, 1, 12, 4, 9, staggered=True).resolutions == (4, 6, 9)
    tables = torch.randn(1, spec.num_entries, 2, dtype=torch.float64)
    level = lambda y, l: y[0, 0, 2 * l:2 * l + 2]
    rows = lambda l, cs: tables[0, [spec.offsets[l] + c[0] + c[1] * 5 + c[2] * 25 for c in cs]]
    x = ((torch.tensor([1.0, 2, 3]) - 0.5) / 3).double()
    y = grid_lookup_reference(x[None, None], tables, spec)
    assert torch.allclose(level(y, 1), rows(1, [(1, 2, 3)])[0], atol=1e-12)
    corners = [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    y0 = grid_lookup_reference(torch.zeros(1, 1, 3, dtype=torch.float64), tables, spec)
    assert torch.allclose(level(y0, 1), rows(1, corners).mean(0), atol=1e-12)
    # and not c / res: there x = 0 returns vertex 0 alone
    y0 = grid_lookup_reference(torch.zeros(1, 1, 3, dtype=torch.float64), tables, GridSpec(3, 3, 2, 12, 2, 8))
    assert torch.equal(level(y0, 1), tables[0, spec.offsets[1]])


def test_staggered_lookup_is_torch_ngps_on_the_paper_grid():
    # torch-ngp's gridencoder.cu (the grid BRIGHT used) transcribed, in float64: per level
    # scale = 16 b^l - 1, resolution = ceil(scale) + 1, pos = x * scale + 0.5, corners
    # floor(pos) + bits; index sum_d c_d (resolution + 1)^d while that fits in T, else the
    # uint32 XOR of c_d * prime_d; levels stored unpadded (min(T, (resolution + 1)^3) rows).
    # This lookup's tables, read in that layout, give the same outputs.
    spec = GridSpec(3, 16, 4, 18, 16, 64, staggered=True)
    b = 2 ** (math.log2(64 / 16) / 15)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 3, generator=gen, dtype=torch.float64)
    tables = torch.randn(1, spec.num_entries, 4, generator=gen, dtype=torch.float64)
    want = []
    for l in range(16):
        scale = 16 * b ** l - 1
        res = math.ceil(scale) + 1
        rows = min(2 ** 18, (res + 1) ** 3)
        level = tables[0, spec.offsets[l]:spec.offsets[l] + rows]
        pos = x * scale + 0.5
        c0 = pos.floor().long()
        acc = 0
        for k in range(8):
            bits = torch.tensor([(k >> d) & 1 for d in range(3)])
            c = c0 + bits
            w = torch.where(bits.bool(), pos - c0, 1 - (pos - c0)).prod(1)
            if (res + 1) ** 3 <= 2 ** 18:
                idx = c[:, 0] + c[:, 1] * (res + 1) + c[:, 2] * (res + 1) ** 2
            else:
                idx = (c[:, 0] ^ (c[:, 1] * 2654435761) ^ (c[:, 2] * 805459861)) & 0xFFFFFFFF
            acc = acc + w[:, None] * level[idx % rows]
        want.append(acc)
    assert sum(spec.dense) == 15
    assert torch.allclose(grid_lookup_reference(x[:, None], tables, spec)[:, 0], torch.cat(want, 1), atol=1e-12)


@SETTINGS
@given(grid_case())
def test_fast_path_equals_reference(case):
    # same maths, different order of floating-point operations: float64 agreement to 1e-10
    spec, coords, tables = case
    torch.manual_seed(0)  # the draws below: the same whenever hypothesis replays the case
    go = torch.randn(*coords.shape[:2], spec.levels * spec.features, dtype=torch.float64)
    r = grads(grid_lookup_reference, coords, tables, spec, go)
    f = grads(grid_lookup_fast, coords, tables, spec, go)
    for a, b in zip(r, f):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


def test_fast_path_gradient_near_zero_in_float32():
    # grid_sample reads a coordinate x as 2x - 1: in float32 any x below ~3e-8 rounds to -1,
    # the edge. It must be read as the inside of cell 0 (the reference's one-sided derivative),
    # not clipped (padding_mode "border" gives those dense levels a coordinate gradient of 0).
    # Tolerance: float32 sums of 8 corners x F = 2 entries of size ~1, times res <= 16
    spec = GridSpec(3, 3, 2, 12, 4, 16)
    assert tuple(spec.dense) == (True, True, False)
    gen = torch.Generator().manual_seed(0)
    coords = torch.rand(64, 2, 3, generator=gen)
    coords[:32, :, 0] = torch.tensor([1e-9, 1e-20, 1e-38, 2e-8]).repeat(8)[:, None]
    tables = torch.randn(2, spec.num_entries, 2, generator=gen)
    go = torch.randn(64, 2, 6, generator=gen)
    r = grads(grid_lookup_reference, coords, tables, spec, go)
    f = grads(grid_lookup_fast, coords, tables, spec, go)
    assert r[1][:32, :, 0].abs().min() > 0.01                    # a real slope there, not 0
    for a, b in zip(r, f):
        assert torch.allclose(a, b, atol=1e-4)


def test_fast_path_gradients_are_bitwise_repeatable_on_two_threads(two_threads):
    # Training on the CPU is bit-reproducible (the same command takes the same steps), and
    # Adam's eps of 1e-15 turns last-bit gradient differences on rarely-touched entries into
    # whole steps. A scatter with float atomics on several threads (tables[g, idx]'s backward,
    # index_put_ with accumulate) sums the many corners that share an entry in a varying
    # order: with it, this case (25k points on 128 entries per hashed level, 2 threads) gives
    # a different table gradient on most repeats.
    spec = GridSpec(3, 3, 2, 7, 4, 16)  # res 4: 125 vertices, dense (grid_sample); 8, 16: hashed
    assert tuple(spec.dense) == (True, False, False)
    gen = torch.Generator().manual_seed(0)
    coords = torch.rand(25_000, 2, 3, generator=gen)
    tables = torch.randn(2, spec.num_entries, 2, generator=gen)
    go = torch.randn(25_000, 2, spec.levels * 2, generator=gen)
    first = grads(grid_lookup_fast, coords, tables, spec, go)
    for _ in range(4):
        again = grads(grid_lookup_fast, coords, tables, spec, go)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_lookup_clamps_and_rejects_bad_shapes():
    spec = GridSpec(3, 2, 2, 8, 2, 4)
    t = torch.randn(2, spec.num_entries, 2)
    c = torch.tensor([[[-0.5, 1.5, float("nan")]] * 2])
    clamped = torch.tensor([[[0.0, 1.0, 0.0]] * 2])
    assert torch.equal(grid_lookup(c, t, spec), grid_lookup(clamped, t, spec))
    with pytest.raises(ValueError, match="do not match"):
        grid_lookup(torch.rand(5, 3, 3), t, spec)
    with pytest.raises(ValueError, match="unknown backend"):
        grid_lookup(torch.rand(5, 2, 3), t, spec, backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_lookup_promotes_dtypes(backend):
    # bf16 coords are computed in fp32 (pos = x * res in bf16 would keep ~8 bits: the reference
    # itself was off by 0.58 on outputs of ~2 before), fp64 coords with fp32 tables in fp64 (the
    # fast path's grid_sample once refused the mix); every backend gives the promoted result
    spec = GridSpec(3, 2, 2, 10, 4, 24)  # res 4 dense, res 24 hashed
    gen = torch.Generator().manual_seed(0)
    tables = torch.randn(2, spec.num_entries, 2, generator=gen)
    c16 = torch.rand(300, 2, 3, generator=gen).bfloat16()
    want = grid_lookup_reference(c16.float(), tables, spec)
    got = grid_lookup(c16, tables, spec, backend)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)  # summation order: 2.4e-7
    c64 = c16.double().requires_grad_()
    got = grid_lookup(c64, tables, spec, backend)
    assert got.dtype == torch.float64 and torch.allclose(got, grid_lookup_reference(c64, tables.double(), spec))
    got.sum().backward()
    assert c64.grad.dtype == torch.float64 and c64.grad.abs().sum() > 0


def test_kernel_index_arithmetic_passes_the_overflow_sanitizer():
    # a hashed level whose (res+1)^D exceeds 2^31 must not wrap any int32 arithmetic either:
    # TRITON_DEBUG=1 checks every integer op, even in the dense index a hashed level discards
    from triton.runtime import interpreter
    builder = getattr(interpreter, "interpreter_builder", None)
    if builder is None or not hasattr(getattr(builder, "options", None), "debug"):
        pytest.skip("this triton's interpreter has no debug option to switch on")
    old = builder.options
    builder.options = dataclasses.replace(old, debug=True)
    try:
        spec = GridSpec(4, 1, 2, 16, 250, 250)  # 251^4 > 2^31 vertices: hashed
        c = torch.rand(64, 1, 4, generator=torch.Generator().manual_seed(0))
        tables = torch.randn(1, spec.num_entries, 2)
        y = grid_lookup(c, tables, spec, "triton")
    finally:
        builder.options = old
    assert torch.allclose(y, grid_lookup_reference(c, tables, spec), atol=1e-6)  # fp32 sums, in another order


# ----------------------------------------------------------------------------- model

MICRO = dict(image_size=16, z_size=4, z_channels=4, levels=3, features=2, log2_table_size=8,
             min_res=2, max_res=8, feat_size=8, c_d=16, head_hidden=8, enc_widths=(8, 8, 16),
             dec_widths=(16, 8), style_dim=8, batch_size=4, eval_every=1000)


@pytest.fixture
def micro(monkeypatch):
    """A model small enough to train in a second, registered as the preset 'micro'."""
    monkeypatch.setitem(bright.PRESETS, "micro", MICRO)
    return make_config("micro")


def test_key_codes_in_open_unit_interval(micro):
    torch.manual_seed(0)
    m = BRIGHT(micro)
    z = m.encode(torch.rand(8, 3, 16, 16) * 2 - 1)
    assert z.shape == (8, 4, 4, 4)
    assert (z > 0).all() and (z < 1).all()


@pytest.mark.parametrize("preset", list(bright.PRESETS))
def test_presets_build_with_paper_shapes(preset):
    cfg = make_config(preset)
    with torch.device("meta"):
        m = BRIGHT(cfg)
        z = m.encode(torch.empty(2, 3, cfg.image_size, cfg.image_size))
        f = m.features(z)
        y = m.synthesize(f)
    assert z.shape == (2, cfg.z_channels, cfg.z_size, cfg.z_size)
    assert f.shape == (2, cfg.c_d, cfg.feat_size, cfg.feat_size)
    assert y.shape == (2, 3, cfg.image_size, cfg.image_size)
    assert m.tables.shape == (cfg.groups, cfg.grid.num_entries, cfg.features)
    if preset == "church256":
        assert m.tables.numel() == 18_630_272  # the paper's 18.6M
    if preset == "ffhq256":
        assert (cfg.groups, cfg.grid.dim, cfg.c_d, cfg.feat_size) == (16, 3, 512, 64)


@pytest.mark.parametrize("fields,msg", [
    (dict(eval_every=0), "eval_every must be > 0, got 0"),
    (dict(z_channels=0), "z_channels must be > 0, got 0"),
    (dict(image_size=8, z_size=2, feat_size=2), "SSIM's 11x11 window"),
    (dict(min_res=64), "1 <= min_res <= max_res"),
    (dict(log2_table_size=2), "log2_table_size must be in 3..30"),
    (dict(batch_size=0), "batch_size must be > 0, got 0"),
    (dict(batch_size=6, grad_accum=4), "batch_size must be a multiple of grad_accum"),
    (dict(seed=2 ** 31), "seed must be in 0..2^31-1"),
    # values of the wrong type or outside their range, as --set '{...}' may give them
    (dict(enc_widths=3), "enc_widths must be a list of positive integers, got 3"),
    (dict(max_iters="5"), "max_iters must be an integer, got '5'"),
    (dict(batch_size=8.0), "batch_size must be an integer, got 8.0"),
    (dict(lr="0.001"), "lr must be a number, got '0.001'"),
    (dict(codebook_restart=1), "codebook_restart must be true or false, got 1"),
    (dict(lr=-1), "lr must be > 0, got -1"),
    (dict(codebook_size=0), "codebook_size must be > 0, got 0"),
    (dict(l1_weight=-1), "l1_weight must be >= 0, got -1"),
    (dict(gan_weight=-0.5), "gan_weight must be >= 0, got -0.5"),
    (dict(ema_decay=5), "ema_decay must be in [0, 1), got 5"),
    (dict(ema_decay=1.0), "ema_decay must be in [0, 1), got 1.0"),
    (dict(lr=True), "lr must be a number, got True"),                  # JSON true is no number
    (dict(grad_accum=0), "grad_accum must be > 0, got 0"),
    (dict(c_d=30), "c_d of the group count"),                           # 4 groups: 30 channels do not split
    (dict(bottleneck="vae"), "bottleneck must be 'hash' or 'vq', not 'vae'"),
    (dict(enc_widths=(16, 32)), "image_size must be z_size * 2^(len(enc_widths) - 1)"),
    (dict(z_size=32, enc_widths=(16, 32)), "feat_size must be a multiple of z_size"),
])
def test_config_errors_are_one_line(fields, msg):
    with pytest.raises(SystemExit, match="^error: bad config: .*" + re_escape(msg)):
        make_config("tiny", **fields)


def test_missing_shapes_script_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"prepare.py not found \(it makes the built-in data\): pass --data"):
        bright.shapes_module(str(tmp_path))


def test_model_cost_counts_macs_not_flops(micro):
    # a 3x3 conv costs 9*H*W*Cin*Cout multiply-adds: check the counter's unit on one layer
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as fc:
        torch.nn.functional.conv2d(torch.empty(1, 4, 8, 8), torch.empty(5, 4, 3, 3), padding=1)
    assert fc.get_total_flops() / 2 == 9 * 8 * 8 * 4 * 5
    c = bright.model_cost(make_config("church256"))
    assert c["table_params"] == 18_630_272 and c["decoder_gmacs"] > 1


def test_decode_rejects_codes_outside_unit_interval(micro):
    m = BRIGHT(micro)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.decode(torch.full((1, 4, 4, 4), 1.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.decode(torch.full((1, 4, 4, 4), float("nan")))
    assert m.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 16, 16)  # the bounds themselves are fine


def test_modconv_equals_per_sample_weight_modulation():
    # StyleGAN2 eq. 1 and 3 as the paper writes them: each sample's weight scaled by its style,
    # then normalised per output channel. The styles are randomised: at init affine = 0, s = 1,
    # and s^2 = s would hide a demodulation that forgot to square. atol 1e-5: float32 sums of
    # 36 products of size ~1, two orders of operation
    torch.manual_seed(0)
    conv = bright.ModConv(4, 5, 3, 6)
    torch.nn.init.normal_(conv.affine.weight); torch.nn.init.normal_(conv.affine.bias)
    torch.nn.init.normal_(conv.bias)
    x, style = torch.randn(2, 4, 8, 8), torch.randn(2, 6)
    y = conv(x, style)
    s = conv.affine(style) + 1                                                   # (B, C_in)
    for i in range(2):
        w = conv.weight * conv.gain * s[i][None, :, None, None]                  # eq. 1
        w = w * torch.rsqrt(w.square().sum((1, 2, 3), keepdim=True) + 1e-8)     # eq. 3
        want = torch.nn.functional.conv2d(x[i:i + 1], w, padding=1) + conv.bias[:, None, None]
        assert torch.allclose(y[i:i + 1], want, atol=1e-5)


def test_key_code_noise_only_when_training(micro):
    torch.manual_seed(0)
    m = BRIGHT(micro)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    (y1, z1, a1), (y2, z2, _) = m(x), m(x)
    assert torch.equal(y1, y2) and torch.equal(z1, m.encode(x)) and a1.item() == 0
    n = torch.randn(2, 4, 4, 4)
    _, zn, _ = m(x, noise=n)
    # sigma = a quarter of the finest cell, 1 / (4 max_res), clipped back into [0, 1]
    assert torch.equal(zn, (z1 + n / (4 * micro.max_res)).clamp(0, 1)) and not torch.equal(zn, z1)
    # an untrained encoder's codes sit near 0.5, where the clamp never acts: saturate them (at 1
    # in channels 0-1, at 0 in 2-3) so the noise would leave [0, 1] without it
    with torch.no_grad():
        m.to_key.bias[:2], m.to_key.bias[2:] = 40.0, -40.0
    _, zn, _ = m(x, noise=n)
    assert zn.min() == 0 and zn.max() == 1 and (zn[:, :2] < 1).any() and (zn[:, 2:] > 0).any()


def test_tile_and_queries_place_each_code_on_its_pixels(micro):
    # feat_size 8 from 4x4 codes: code (i, j) covers feature pixels (2i..2i+1, 2j..2j+1); the
    # query of pixel (r, c) and group g is (x, y) = pixel centre, key = channel g of its code
    m = BRIGHT(micro)
    z = torch.rand(1, 4, 4, 4)
    q = m.queries(z).reshape(8, 8, 4, 3)                                     # (H_d, W_d, G, D)
    for r, c, g in [(0, 0, 0), (1, 6, 2), (5, 3, 1), (7, 7, 3)]:
        assert q[r, c, g].tolist() == pytest.approx([(c + 0.5) / 8, (r + 0.5) / 8, z[0, g, r // 2, c // 2].item()])


def test_training_draws_key_code_noise(micro, data16, tmp_path, monkeypatch):
    seen = []
    real = BRIGHT.forward
    monkeypatch.setattr(BRIGHT, "forward", lambda self, x, noise=None: (seen.append(noise), real(self, x, noise))[1])
    run("train", "--preset", "micro", "--data", data16, "--out", tmp_path, "--max-iters", 2)
    noises = [n for n in seen if n is not None]
    assert len(noises) == 2 and noises[0].shape == (4, 4, 4, 4) and 0.5 < noises[0].std() < 1.5
    assert not torch.equal(noises[0], noises[1])                              # fresh noise every step


def test_ema_update_and_step_seed():
    e, p = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    e.register_buffer("b", torch.zeros(2)); p.register_buffer("b", torch.ones(2))
    want = 0.9 * e.weight.detach() + 0.1 * p.weight.detach()
    bright.ema_update(e, p, 0.9)
    assert torch.allclose(e.weight, want, atol=1e-7) and torch.equal(e.b, p.b)   # buffers copied
    # every (seed, step) pair its own draws (seed + step would replay seed 0 one step later)
    seeds = {bright.step_seed(s, k) for s in range(4) for k in range(100)}
    assert len(seeds) == 400 and bright.step_seed(0, 7) == 7
    # and distinct draws: torch's CPU generator reads only a seed's low 32 bits (2^32 is 0 to it)
    # (--seed is at most 2^31 - 1)
    assert max(seeds) < 2 ** 32 and max(bright.step_seed(2 ** 31 - 1, k) for k in range(9)) < 2 ** 32
    draws = lambda seed: (torch.manual_seed(bright.step_seed(seed, 5)), torch.rand(4))[1]
    assert not torch.equal(draws(1), draws(0)) and not torch.equal(draws(2 ** 31 - 1), draws(0))


def check_ema(saved, init, states, ema_decay):
    """the EMA both trainers keep: the decay-warmed average of the weights after each step,
    from the initial ones: e <- e + (1 - d_k) (p_k - e), d_k = min(ema_decay, (1 + k) / (10 + k))"""
    ema = {n: v.clone() for n, v in init.items()}
    for k, p in enumerate(states):
        d = min(ema_decay, (1 + k) / (10 + k))
        ema = {n: e + (1 - d) * (p[n] - e) for n, e in ema.items()}
    # atol 1e-6: the same float32 updates, lerp's rounding against e + (1 - d)(p - e)
    assert all(torch.allclose(saved[n], ema[n], atol=1e-6) for n in ema)
    assert not all(torch.allclose(saved[n], states[-1][n], atol=1e-6) for n in ema)  # not the last weights


def record_states(states):
    """an on_step that keeps a copy of the weights after every step"""
    return lambda step, model, loss: states.append({n: v.clone() for n, v in model.state_dict().items()})


def test_training_keeps_an_ema_of_the_weights(micro, data16, tmp_path):
    states = []
    args = bright.parser().parse_args(["train", "--preset", "micro", "--data", str(data16), "--out",
                                       str(tmp_path), "--max-iters", "3"])
    torch.manual_seed(micro.seed)
    init = BRIGHT(micro).state_dict()                                       # what train() starts from
    bright.train(args, on_step=record_states(states))
    check_ema(torch.load(tmp_path / "bright.pt", weights_only=True)["ema"], init, states, micro.ema_decay)


def test_learning_rate_schedules():
    c = make_config("tiny", lr=1.0, lr_final=0.1, max_iters=100)
    assert [bright.learning_rate(c, s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.55, 0.1])
    d = diffusion.make_config("tiny", lr=1.0, warmup=10, max_iters=100)
    assert [diffusion.learning_rate(d, s) for s in (0, 4, 50, 99)] == pytest.approx(
        [0.1, 0.5, 0.55, 0.55 + 0.45 * math.cos(math.pi * 0.99)])      # warm-up, then the cosine


def test_trainers_follow_their_lr_schedules(micro, data16, world, tmp_path):
    # the optimizer's lr at the last step is the schedule's (not the constant base lr)
    run("train", "--preset", "micro", "--data", data16, "--out", tmp_path / "b", "--max-iters", 3,
        "--set", '{"lr_final": 0.1}')
    ck = torch.load(tmp_path / "b" / "bright.pt", weights_only=True)
    cfg = Config(**ck["config"])
    lr = ck["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(bright.learning_rate(cfg, 2)) and lr < 0.9 * cfg.lr
    diff_run(*train_args(world, tmp_path / "d", 3))
    ck = torch.load(tmp_path / "d" / "ddpm.pt", weights_only=True)
    cfg = diffusion.DiffusionConfig(**ck["config"])
    lr = ck["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(diffusion.learning_rate(cfg, 2)) and lr < 0.1 * cfg.lr     # in the warm-up


@pytest.mark.parametrize("n", [2, 10, 16])
def test_reconstruction_grid_puts_each_image_above_its_reconstruction(tmp_path, n):
    # 8 a row; fewer than 8 images: one row of n; a short last row is padded with white
    orig = torch.linspace(-1, 0, n)[:, None, None, None].expand(n, 3, 4, 4)   # distinct greys
    recon = -orig
    bright.pairs_grid(orig, recon, tmp_path / "g.png")
    g = np.asarray(Image.open(tmp_path / "g.png"))
    k = min(n, 8)
    assert g.shape == (2 * math.ceil(n / k) * 6 + 2, k * 6 + 2, 3)
    px = lambda row, col: g[2 + row * 6, 2 + col * 6, 0]                      # a pixel of that cell
    grey = lambda t: int((((t + 1) / 2) * 255).round())                        # float32, as save_grid
    for i in range(n):
        r, c = divmod(i, k)
        assert (px(2 * r, c), px(2 * r + 1, c)) == (grey(orig[i, 0, 0, 0]), grey(recon[i, 0, 0, 0]))
    for i in range(n, math.ceil(n / k) * k):                                   # the padding: white
        r, c = divmod(i, k)
        assert px(2 * r, c) == px(2 * r + 1, c) == 255


def test_curve_axis_labels_stand_at_their_numbers(tmp_path, monkeypatch):
    # a 4-iteration run: the x labels 1, 2, 3, 4 once each, each at the x of its number (the
    # chart's 6 ticks used to read 1 2 2 3 3 4, drawn at 1.6, 2.2, ...)
    from PIL import ImageDraw
    texts = []
    orig = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, t, *a, **k: (
        texts.append((xy, t, k.get("anchor"))), orig(self, xy, t, *a, **k))[1])
    bright.plot_curves({"a": ([1, 2, 3, 4], [10, 11, 12, 13])}, str(tmp_path / "c.png"), "iteration", "psnr")
    xs = [(xy[0], t) for xy, t, anchor in texts if anchor == "mt"]
    assert [t for _, t in xs] == ["1", "2", "3", "4"]
    left, right = xs[0][0], xs[-1][0]
    assert all(x == pytest.approx(left + (int(t) - 1) / 3 * (right - left)) for x, t in xs)


def test_psnr_and_ssim_known_values():
    a = torch.zeros(2, 3, 16, 16)
    assert bright.psnr(a, a + 0.2).tolist() == pytest.approx([20.0, 20.0])   # [0, 1] error 0.1: 20 dB
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert bright.ssim(x, x).item() == pytest.approx(1.0)
    # constant images: SSIM = luminance term (2 mu_a mu_b + c1) / (mu_a^2 + mu_b^2 + c1), in [0, 1]
    # units; float32 E[x^2] - mu^2 leaves a variance of ~3e-7 against c2 = 9e-4: 3e-4 relative
    mu_a, mu_b, c1 = 0.25, 0.75, 0.01 ** 2
    s = bright.ssim(torch.full((1, 3, 16, 16), -0.5), torch.full((1, 3, 16, 16), 0.5)).item()
    assert s == pytest.approx((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1), rel=1e-3)


def ssim_windows(a, b):
    """SSIM as Wang et al. 2004 define it, one 11x11 window at a time in float64 numpy loops:
    an implementation independent of bright.ssim's blurred moments"""
    a, b = (a.double().numpy() + 1) / 2, (b.double().numpy() + 1) / 2
    k = np.exp(-(np.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(k, k) / k.sum() ** 2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for c in range(3):
        for i in range(a.shape[2] - 10):
            for j in range(a.shape[3] - 10):
                pa, pb = a[0, c, i:i + 11, j:j + 11], b[0, c, i:i + 11, j:j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb, cov = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum(), (w * (pa - ma) * (pb - mb)).sum()
                out.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(out))


def test_ssim_matches_the_windowed_definition():
    # images whose means, variances and covariance change across the frame, so that c1, c2,
    # the window's width and its weights all count; rel 1e-4: bright.ssim's float32 E[x^2] - mu^2
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    x = x * torch.linspace(0.2, 1, 16)                              # variance grows to the right
    y = (0.3 * x + 0.1 * torch.randn(1, 3, 16, 16, generator=g)).clamp(-1, 1)
    y = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(y, (1, 1, 1, 1), mode="replicate"), 3, 1)
    assert bright.ssim(x, y).item() == pytest.approx(ssim_windows(x, y), rel=1e-4)


def test_atomic_save_keeps_the_old_file_on_interrupt(tmp_path, monkeypatch):
    p = tmp_path / "ck.pt"
    bright.atomic_save({"step": 1}, str(p))
    def interrupted(obj, f):
        f.write(b"half a checkpoint"); raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bright.atomic_save({"step": 2}, str(p))
    assert torch.load(p, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["ck.pt"]
    # and the data reaches the disk before the new name points at it (a power cut)
    calls, fsync, replace = [], os.fsync, os.replace
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), replace(a, b))[1])
    bright.atomic_save({"step": 3}, str(p))
    assert calls == ["fsync", "replace"] and torch.load(p, weights_only=True) == {"step": 3}


def test_loss_falls_on_a_fixed_batch(micro):
    torch.manual_seed(0)
    m = BRIGHT(micro)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4) * 2 - 1, size=16, mode="bilinear")  # smooth
    opt = torch.optim.Adam(m.parameters(), lr=2e-3, betas=(0.0, 0.99), eps=1e-15)
    losses = []
    for _ in range(150):
        y, _, _ = m(x, noise=torch.randn(4, 4, 4, 4))
        loss = torch.nn.functional.mse_loss(y, x)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    # the untrained decoder outputs ~0, so the loss starts near E[x^2]; 150 steps on 4 smooth
    # images cut it ~2.5x here (the tables start at 1e-4 and grow by ~lr per step), so 0.6x is a
    # safe bar that a broken gradient path does not pass. The encoder must get gradient too.
    assert losses[-1] < 0.6 * losses[0]
    assert m.encoder[0].weight.grad.abs().sum() > 0


def test_table_usage_hand_case(micro):
    # all key codes 0: only the key-slice c=0 of each dense level can carry weight, so a
    # dense level's usage is at most 1/(res+1); and some entries are used
    m = BRIGHT(micro)
    per_level, overall = bright.table_usage(m, torch.zeros(2, 4, 4, 4))
    for l, u in enumerate(per_level):
        if m.spec.dense[l]:
            assert 0 < u <= 1 / (m.spec.resolutions[l] + 1) + 1e-12
    # random codes use far more of the tables
    _, overall_rand = bright.table_usage(m, torch.rand(8, 4, 4, 4))
    assert overall_rand > 2 * overall


def test_table_usage_counts_the_vertices_a_staggered_level_can_reach(micro):
    # staggered, level 1 of res 2 -> 5 over 3 levels has N_1 = sqrt(10) = 3.16: res 4 (125
    # vertices, dense), but pos = x * 2.16 + 0.5 <= 2.66 reaches vertices 0..3 only. Random key
    # codes and the 8x8 pixel centres reach every one of those: usage 1, not 4^3 / 5^3
    m = BRIGHT(dataclasses.replace(micro, levels=3, max_res=5, staggered=True))
    assert m.spec.resolutions[:2] == (2, 4) and m.spec.dense[:2] == (True, True)
    torch.manual_seed(0)
    per_level, _ = bright.table_usage(m, torch.rand(64, 4, 4, 4))
    assert per_level[:2] == [1.0, 1.0]


def test_each_group_has_its_own_head(micro):
    """the per-group MLP is grouped: group g's L*F lookup features reach only its C_d / G
    output channels. (Fails with: the first 1x1 conv without groups=G, which mixes the groups.)"""
    torch.manual_seed(0)
    m = BRIGHT(micro)
    G, LF, C = micro.groups, micro.levels * micro.features, micro.c_d // micro.groups
    f = torch.randn(2, G * LF, 8, 8)
    f2 = f.clone()
    f2[:, LF:2 * LF] += 1                                                    # group 1's features
    with torch.no_grad():
        d = (m.head(f2) - m.head(f)).abs().amax((0, 2, 3)).view(G, C)
    assert (d[1] > 0).all() and (d[[0, 2, 3]] == 0).all()


def test_features_of_a_pixel_come_from_the_code_tile_over_it(micro):
    """f at pixel (r, c) of the feature map depends only on the key code that covers it:
    changing the code at (i, j) = (0, 3) (feature pixels rows 0-1, cols 6-7 here) changes f
    there and nowhere else. (Fails with: the lookup's output reshaped to (B, C, W, H), i.e. the
    feature map transposed: code (0, 3) would drive rows 6-7, cols 0-1.)"""
    torch.manual_seed(0)
    m = BRIGHT(micro).eval()
    with torch.no_grad():
        m.tables.normal_()                       # the output depends on the codes
        z = torch.rand(1, 4, 4, 4)
        z2 = z.clone()
        z2[0, 1, 0, 3] = 1 - z[0, 1, 0, 3]
        diff = (m.features(z2) - m.features(z)).abs().amax(1)[0]           # (H_d, W_d)
    changed = torch.zeros(8, 8, dtype=torch.bool)
    changed[0:2, 6:8] = True
    assert (diff[changed] > 0).all() and (diff[~changed] == 0).all()


def test_table_usage_counts_the_vertices_not_the_alignment_padding(micro):
    """random key codes reach every vertex of the two coarse (dense) levels of the micro
    grid, res 2 and 4: 27 and 125 vertices, stored in 32 and 128 entries (multiples of 8).
    Usage is 100%, not 27/32. (Fails with: dense levels divided by their padded size.)"""
    m = BRIGHT(micro)
    assert m.spec.dense[:2] == (True, True) and m.spec.sizes[:2] == (32, 128)
    torch.manual_seed(0)
    per_level, _ = bright.table_usage(m, torch.rand(64, 4, 4, 4))
    assert per_level[:2] == [1.0, 1.0]


def test_info_prints_what_the_readme_shows(capsys):
    """`python bright.py info` for the tiny preset is the README's first block (counts of
    dense/hashed levels, parameters of the grouped heads, the lookup's 2^D corners).
    (Fails with: dense/hashed counts swapped; lookup MACs with 2^C_key corners; ungrouped heads.)"""
    bright.main(["info"])
    out = capsys.readouterr().out.splitlines()
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("`python bright.py info` prints these")[1].split("```")[1].strip().splitlines()
    assert out == block


def test_readme_commands_parse(tmp_path):
    """Every command in the README's bash blocks, run by bash with python, torchrun, pip and
    pytest recording their arguments instead of running: each bright.py / diffusion.py command
    line parses and its --set makes a config (with its --preset); a prepare.py's flags are in its
    -h. A renamed flag, preset or config field fails here rather than for a reader."""
    blocks = re.findall(r"```bash\n(.*?)```", open(os.path.join(HERE, "README.md")).read(), re.S)
    rec = tmp_path / "calls"
    # one echo, so one write: the README starts some commands with & and their lines must not interleave
    shims = (f"python() {{ local IFS=$'\\x1f'; echo \"$*\"$'\\x1f' >> {rec}; }}\n"
             "torchrun() { while [[ $1 == --* ]]; do shift; done; python \"$@\"; }\n"  # its own flags: --x=y
             "pip() { :; }; pytest() { :; }\n")
    subprocess.run(["bash", "-euc", shims + "\n".join(blocks) + "\nwait"], check=True, cwd=tmp_path)
    calls = [line.split("\x1f")[:-1] for line in rec.read_text().splitlines()]
    assert len(calls) >= 20 and {c[0] for c in calls} == {"bright.py", "diffusion.py", "hashgrid_triton.py",
                                                          "data/shapes/prepare.py"}
    for script, *argv in calls:
        if script in ("bright.py", "diffusion.py"):
            mod = bright if script == "bright.py" else diffusion
            a = mod.parser().parse_args(argv)  # argparse: exit status 2 and the bad flag on stderr
            if a.cmd == "train":
                mod.make_config(a.preset or "tiny", **bright.parse_set(a.set))
        elif script.endswith("prepare.py"):
            usage = subprocess.run([sys.executable, os.path.join(HERE, script), "-h"], capture_output=True,
                                   text=True, check=True).stdout
            assert all(f in usage for f in argv if f.startswith("--")), (script, argv)


# ----------------------------------------------------------------------------- data and errors

def write_images(folder, n, size=20, start=0, **kw):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        Image.fromarray(rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))


def test_a_file_name_that_is_not_utf8_is_read_and_split(tmp_path):
    """a name from an old archive (Latin-1 bytes): one more image, held out or not by its bytes"""
    write_images(tmp_path, 25)
    try:
        os.rename(tmp_path / "003.png", os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    tr, val = bright.load_dataset(str(tmp_path), 16)
    assert len(tr) + len(val) == 25 and len(val) >= 1


def test_loader_modes_and_split(tmp_path, capsys):
    d = tmp_path / "imgs"
    write_images(d / "sub", 30)  # recursive; odd-sized (20x23): centre-cropped
    Image.new("L", (40, 30), 128).save(d / "gray.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(d / "rgba.png")   # transparent: white
    Image.new("RGB", (2, 2)).save(d / "tiny.jpg")                      # too small: skipped
    (d / "corrupt.png").write_bytes(b"not a png")                     # skipped
    (d / "notes.txt").write_text("ignored")
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(d / "grey16.png")  # 16-bit: scaled, not clipped
    Image.fromarray(np.full((20, 20), 70000, np.int32)).save(d / "int32.tif")   # past 16 bits: clipped to white
    Image.new("RGB", (20, 20)).save(d / "trns.png", transparency=(0, 0, 0))      # transparent colour: white
    a = np.zeros((10, 20, 3), np.uint8); a[:, 10:] = 255                        # left black, right white,
    im = Image.fromarray(a); exif = im.getexif(); exif[0x0112] = 6              # to be turned 90° clockwise:
    im.save(d / "exif.jpg", exif=exif, quality=95)                               # black on top, white below
    write_images(tmp_path / "elsewhere", 3, start=100)
    os.symlink(tmp_path / "elsewhere", d / "linked")                            # a symlinked folder is read,
    os.symlink(d, d / "sub" / "back")                                           # each real folder once
    png = io.BytesIO(); Image.new("RGB", (20, 20), (0, 0, 255)).save(png, "PNG")
    junk = b"eXIf" + b"\xff" * 20                                                # a malformed EXIF block:
    chunk = struct.pack(">I", 20) + junk + struct.pack(">I", zlib.crc32(junk))  # the pixels still read
    (d / "badexif.png").write_bytes(png.getvalue()[:33] + chunk + png.getvalue()[33:])
    train, val = bright.load_dataset(str(d), 16)
    assert train.dtype == torch.uint8 and train.shape[1:] == (3, 16, 16)
    assert len(train) + len(val) == 39 and len(val) >= 1  # .tif is not an image extension read here
    assert "skipped 2 unusable" in capsys.readouterr().err
    train2, val2 = bright.load_dataset(str(d), 16)
    assert torch.equal(val, val2)  # deterministic split
    read = lambda name: bright.read_image(str(d / name), 8)
    names = ("gray.png", "rgba.png", "grey16.png", "trns.png", "badexif.png", "int32.tif")
    assert [tuple(read(n)[:, 0, 0].tolist()) for n in names] == [
        (128, 128, 128), (255, 255, 255), (128, 128, 128), (255, 255, 255), (0, 0, 255), (255, 255, 255)]
    e = read("exif.jpg").float().mean(0)                                       # (8, 8)
    assert e[:2].mean() < 30 and e[-2:].mean() > 225


def test_loader_splits_readable_files_skips_run_folders_and_reads_what_it_needs(tmp_path, capsys):
    flat = tmp_path / "flat"
    write_images(flat, 3)
    (flat / "zz.png").write_text("not an image")      # last by name: the tiny folder's held-out file
    train, val = bright.load_dataset(str(flat), 16)    # the split is among the readable files
    assert (len(train), len(val)) == (2, 1) and "skipped 1 unusable image file" in capsys.readouterr().err
    (flat / "bright.pt").write_bytes(b"")              # a run with --out = --data: its data stays
    assert len(bright.load_dataset(str(flat), 16)[0]) == 2
    run_dir = flat / "run"                             # a run's folder inside the data: outputs, not data
    write_images(run_dir, 2, start=10)
    (run_dir / "bright.pt").write_bytes(b"")
    train2, val2 = bright.load_dataset(str(flat), 16)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert f"left out {run_dir}, a run's folder" in capsys.readouterr().err
    one = tmp_path / "one"                             # one image: both splits, and a note says so
    write_images(one, 1)
    assert [len(x) for x in bright.load_dataset(str(one), 16)] == [1, 1]
    assert "one image in" in capsys.readouterr().err and len(bright.load_dataset(str(flat), 16)[0]) == 2
    assert "one image" not in capsys.readouterr().err
    split = tmp_path / "split"                         # train=False: the training images are not read
    write_images(split / "val", 2)
    write_images(split / "train", 2)
    (split / "train" / "bad.png").write_text("not an image")
    assert bright.load_dataset(str(split), 16, train=False)[0] is None
    assert "skipped" not in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        bright.load_dataset(str(flat / "zz.png"), 16)


def test_loader_holds_the_images_once(tmp_path):
    """load_dataset's peak memory is about one copy of the decoded images (FFHQ 256^2: 13.6 GB
    per process), not two (a list of images, then their stack). Measured in a fresh process by
    the growth of its peak RSS over 400 images decoded at 256^2 (78.6 MB): ~1.05 copies, ~2.07
    with a stack at the end; the rest is PIL's buffers for one image at a time."""
    write_images(tmp_path / "d", 400, size=64)  # small files (quick to write), upscaled to 256^2 when read
    code = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {HERE!r})
        import bright
        torch.empty(3, 256, 256, dtype=torch.uint8)
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tr, val = bright.load_dataset({str(tmp_path / "d")!r}, 256)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) * 1024
        print(len(tr) + len(val), grown / (400 * 3 * 256 * 256))""")
    n, copies = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(n) == 400 and float(copies) < 1.5


@pytest.mark.parametrize("setup,msg", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), r"no images \(png/jpg/jpeg/webp/bmp\) found under '[^']*'$"),
    (lambda d: (d.mkdir(), (d / "prepare.py").write_text("")), r"no images .*: run python .*prepare.py first"),
    (lambda d: (d.mkdir(), (d / "a.png").write_bytes(b"junk")), "could be read"),
])
def test_loader_errors(tmp_path, setup, msg):
    d = tmp_path / "data"
    setup(d)
    with pytest.raises(SystemExit, match=msg):
        bright.load_dataset(str(d), 16)


@pytest.fixture
def ffhq(monkeypatch, request):
    """data/ffhq/prepare.py as an importable module `prepare` (its worker pool pickles convert()
    by name, and spawned workers import it again from sys.path); removed from sys.modules after"""
    import importlib
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(bright.__file__)), "data", "ffhq"))
    request.addfinalizer(lambda: sys.modules.pop("prepare", None))
    return importlib.import_module("prepare")


def test_ffhq_prepare(ffhq, tmp_path):
    src, root = tmp_path / "src", tmp_path / "ffhq"
    write_images(src, 4)                                                           # 000..003.png, 20x23
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(src / "004.png")     # 16-bit grey, validation
    ffhq.prepare(str(src), str(root), size=16, n_val=1, workers=1, quiet=True)
    assert ffhq.is_prepared(str(root))
    assert sorted(os.listdir(root / "train")) == [".complete", "00000.png", "00001.png", "00002.png", "00003.png"]
    v = np.asarray(Image.open(root / "val" / "00000.png"))
    assert v.shape == (16, 16, 3) and (v == 128).all()                             # scaled, not clipped at 255
    # the source inside an output folder (emptied first) or around one: refused, nothing deleted
    for bad_src in (root / "train", tmp_path):
        with pytest.raises(SystemExit, match="overlap"):
            ffhq.prepare(str(bad_src), str(root), size=16, n_val=1, workers=1, quiet=True)
    assert len(os.listdir(root / "train")) == 5


def shapes_generator():
    """data/shapes/prepare.py of this checkout, as a module"""
    return bright.shapes_module(os.path.join(os.path.dirname(os.path.abspath(bright.__file__)), "data", "shapes"))


def test_shapes_generator_options():
    """data/shapes/prepare.py: an image depends only on (seed, split, i); the default set is
    SIMPLE: one shape (two distinct colours cover nearly every pixel) on one background colour
    (the four corners agree unless the shape covers one); --hard has gradients"""
    shapes = shapes_generator()
    img = lambda i, **kw: np.asarray(shapes.make_image(0, 0, i, 64, **kw)).reshape(-1, 3)
    assert (img(3) == img(3)).all() and not (img(3) == img(4)).all()
    assert all((img(i) == img(i, **shapes.SIMPLE)).all() for i in range(5))   # the defaults are SIMPLE
    corners = lambda x: len({tuple(x[k]) for k in (0, 63, 64 * 63, 64 * 64 - 1)})
    assert sum(corners(img(i)) == 1 for i in range(20)) >= 17
    assert sum(corners(img(i, **shapes.HARD)) > 1 for i in range(20)) >= 5   # half the backgrounds are gradients
    for i in range(20):
        _, counts = np.unique(img(i), axis=0, return_counts=True)
        # the rest is the shape's antialiased edge: at most a ~3 px band (Lanczos) around a
        # perimeter of at most ~180 px, under 20% of the 64x64 pixels
        assert np.sort(counts)[-2:].sum() >= 0.8 * 64 * 64


def shape_mask(img):
    """a one-shape image (H, W, 3) -> the shape's pixels: those far from the background colour"""
    x = np.asarray(img).astype(int)
    return np.abs(x - x[0, 0]).sum(-1) > 30


def box_fill(mask):
    """the share of its bounding box that a mask covers"""
    ys, xs = np.nonzero(mask)
    return mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))


def test_shapes_generator_rotation_and_radius():
    """rotate=False keeps shapes axis-aligned: an axis-aligned rectangle fills its bounding box
    (ratio 1), a rotated one at most ~0.9 (ellipses ~0.79, triangles <= 0.5 either way);
    radius scales the shapes; both draw the same random numbers, so the colours stay put"""
    shapes = shapes_generator()
    img = lambda i, **kw: np.asarray(shapes.make_image(0, 0, i, 64, max_shapes=1, gradients=False, **kw)).astype(int)
    mask = lambda i, **kw: shape_mask(img(i, **kw))
    small = dict(radius=(0.12, 0.3))
    ids = [i for i in range(30) if not mask(i, rotate=True, **small)[0, 0] and not mask(i, **small)[0, 0]]
    assert sum(box_fill(mask(i, **small)) >= 0.97 for i in ids) >= 3   # the axis-aligned rectangles
    assert sum(box_fill(mask(i, rotate=True, **small)) >= 0.97 for i in ids) == 0
    assert (img(5, rotate=True)[0, 0] == img(5)[0, 0]).all()
    area = lambda **kw: np.mean([mask(i, **kw).sum() for i in ids])
    assert area(radius=(0.2, 0.35)) > 1.3 * area(**small)             # (0.275 / 0.21)^2 = 1.7 in area


def test_shapes_kinds_label_the_images():
    """kinds, as prepare() writes them to kinds.json: in the default (axis-aligned) set a
    rectangle fills its bounding box and an ellipse or triangle never does (an ellipse ~0.79, a
    triangle ~0.5; one cut by the image border a little more)"""
    shapes = shapes_generator()
    fills = {k: [] for k in shapes.KINDS}
    for i in range(40):
        kinds = []
        m = shape_mask(shapes.make_image(0, 0, i, 64, kinds=kinds))
        if not m[0, 0]:                                      # skip a shape that covers the corner
            fills[kinds[0]].append(box_fill(m))
    assert all(len(f) >= 5 for f in fills.values()), {k: len(f) for k, f in fills.items()}
    assert min(fills["rectangle"]) >= 0.95 and max(fills["ellipse"] + fills["triangle"]) <= 0.9


def test_shapes_prepare_records_its_settings(tmp_path):
    """prepare() writes a marker last with its settings; is_prepared(root, **settings) reads
    them, so bright.py can tell the default set from another one in data/shapes"""
    shapes = shapes_generator()
    assert not shapes.is_prepared(str(tmp_path))
    shapes.prepare(str(tmp_path), n_train=2, n_val=1, size=16, quiet=True, **shapes.HARD)
    assert sorted(os.listdir(tmp_path / "train")) == [".complete", "00000.png", "00001.png", "kinds.json"]
    assert shapes.is_prepared(str(tmp_path)) and shapes.is_prepared(str(tmp_path), **shapes.HARD)
    assert not shapes.is_prepared(str(tmp_path), **shapes.SIMPLE)
    assert not shapes.is_prepared(str(tmp_path), **{**shapes.HARD, "radius": (0.12, 0.31)})
    kinds = json.load(open(tmp_path / "train" / "kinds.json"))
    assert len(kinds) == 2 and all(1 <= len(k) <= 3 and set(k) <= set(shapes.KINDS) for k in kinds)
    counts = set()                                     # --max-shapes 3: one to three shapes, each drawn
    for i in range(30):
        shapes.make_image(0, 0, i, 16, **{**shapes.HARD, "kinds": (k := [])})
        counts.add(len(k))
    assert counts == {1, 2, 3}
    shutil.rmtree(tmp_path / "val")                    # a split gone since: not prepared
    assert not shapes.is_prepared(str(tmp_path))
    shapes.prepare(str(tmp_path), n_train=2, n_val=1, size=16, quiet=True, **shapes.HARD)
    # the command line: --hard sets the defaults, a flag given as well wins
    subprocess.run([sys.executable, shapes.__file__, "--hard", "--max-shapes", "2", "--n-train", "1", "--n-val", "1",
                    "--size", "16", "--root", str(tmp_path)], check=True, capture_output=True)
    assert shapes.is_prepared(str(tmp_path), **{**shapes.HARD, "max_shapes": 2})


def test_read_image_centre_crops_landscape_and_portrait(tmp_path):
    """read_image centre-crops (the x offset as well as the y one): a 30x10 image in three
    bands, black | grey | white, keeps the grey middle, and so does the same image turned
    upright. (Fails with: crop box x0 = 0, i.e. the left square of a landscape image.)"""
    a = np.zeros((10, 30, 3), np.uint8)
    a[:, 10:20], a[:, 20:] = 128, 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    Image.fromarray(a.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")
    for name in ("wide.png", "tall.png"):
        assert (bright.read_image(str(tmp_path / name), 10) == 128).all(), name


def test_read_image_downscales_with_an_antialiasing_filter(tmp_path):
    """a one-pixel checkerboard shrunk 4x averages to mid-grey (Lanczos, as
    data/ffhq/prepare.py's images are made), not a pattern of black and white samples.
    (Fails with: Image.NEAREST.)"""
    board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    Image.fromarray(np.stack([board] * 3, -1)).save(tmp_path / "board.png")
    x = bright.read_image(str(tmp_path / "board.png"), 16).float()
    assert (x - 127.5).abs().max() < 20


def test_the_split_holds_out_the_names_that_hash_to_zero_mod_20(tmp_path):
    """a flat folder of 100 images: the files whose relative name's crc32 is 0 mod 20 (~5%)
    are the validation set, the rest train. (Fails with: == 0 -> != 0, 95% held out.)"""
    write_images(tmp_path / "d", 100, size=16)
    held = sum(zlib.crc32(f"{i:03d}.png".encode()) % 20 == 0 for i in range(100))
    assert 1 <= held <= 15
    train, val = bright.load_dataset(str(tmp_path / "d"), 16)
    assert (len(train), len(val)) == (100 - held, held)


def test_to_float_maps_the_uint8_range_onto_minus_one_one():
    """0 -> -1 and 255 -> 1 exactly: the targets of the MSE and the PSNR's [0, 1] images.
    (Fails with: x / 128 - 1, 255 -> 0.992.)"""
    x = bright.to_float(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]


def test_image_extensions_are_matched_in_any_case(tmp_path):
    """IMG_0001.JPG (as cameras name them) and .PNG are images too.
    (Fails with: f.endswith without .lower().)"""
    for name in ("A.PNG", "B.JPG", "c.Jpeg", "d.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name, format="PNG" if "png" in name.lower() else "JPEG")
    assert [os.path.basename(p) for p in bright.list_images(str(tmp_path))] == ["A.PNG", "B.JPG", "c.Jpeg", "d.png"]


def test_shapes_validation_images_are_not_the_training_images():
    """image i of the val split is drawn from its own generator, not the training image i
    again (the validation PSNR and neighbors' held-out distances would be on training
    images). (Fails with: default_rng([seed, 0, i]), the split ignored.)"""
    shapes = shapes_generator()
    for i in range(4):
        tr, va = (np.asarray(shapes.make_image(0, split, i, 32)) for split in (0, 1))
        assert not (tr == va).all(), i


# ----------------------------------------------------------------------------- training and commands

def test_ctrl_c_outside_training_is_one_line():
    # e.g. while diffusion.py encodes the training images: exit status 130 and "interrupted"
    r = subprocess.run([sys.executable, "-c", "import os, signal, bright; "
                        "bright.cli(lambda: os.kill(os.getpid(), signal.SIGINT) or __import__('time').sleep(5))"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(bright.__file__)))
    assert (r.returncode, r.stderr) == (130, "interrupted\n")


def test_file_names_outside_the_locale_encoding_print_escaped():
    # a folder named in bytes that are not UTF-8 (Python holds them as surrogates) printed to a
    # stdout that is strict about its encoding (a UTF-8 locale other than C): escaped, not a
    # UnicodeEncodeError half-way through a command
    r = subprocess.run([sys.executable, "-c", "import bright; bright.cli(lambda: print('saved /tmp/a\\udcffb'))"],
                       capture_output=True, cwd=os.path.dirname(os.path.abspath(bright.__file__)),
                       env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert (r.returncode, r.stdout) == (0, b"saved /tmp/a\\udcffb\n"), r.stderr


def test_ctrl_c_in_the_lookup_benchmark_is_one_line():
    # python hashgrid_triton.py, stopped once it has started timing: the rows so far, then one line
    p = subprocess.Popen([sys.executable, "-u", "hashgrid_triton.py"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=os.path.dirname(os.path.abspath(bright.__file__)))
    try:
        first = p.stdout.readline()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()  # (a no-op once it has ended)
    assert first.startswith("device: CPU") and (p.returncode, err) == (130, "interrupted\n"), err[-500:]


def test_prepare_scripts_check_their_arguments(tmp_path):
    (tmp_path / "afile").write_text("x")
    here = os.path.dirname(os.path.abspath(__file__))
    new = ["--root", tmp_path / "new"]          # where a check that let it through would write
    for script, argv, msg in [("shapes", ["--seed", "-1", *new], "--seed must be at least 0"),
                              ("shapes", ["--n-train", "0", *new], "--n-train must be at least 1"),
                              ("shapes", ["--size", "8", *new], "--size must be at least 16"),
                              ("shapes", ["--radius", "0.3", "0.6", *new], "--radius LO HI needs 0 < LO <= HI <= 0.5"),
                              ("shapes", ["--root", tmp_path / "afile"], "cannot make that folder (File exists)"),
                              ("shapes", ["--root", tmp_path / "afile" / "sub"], "cannot make that folder"),
                              ("ffhq", ["--src", tmp_path, "--root", tmp_path / "afile"], "cannot make that folder")]:
        r = subprocess.run([sys.executable, os.path.join(here, "data", script, "prepare.py"), *map(str, argv)],
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr.strip().splitlines()[-1], (script, argv, r.stderr[-500:])
    assert not (tmp_path / "new").exists()


def run(*argv):
    bright.main([str(a) for a in argv])


@pytest.fixture
def data16(tmp_path):
    d = tmp_path / "data"
    write_images(d / "train", 12, size=16)
    write_images(d / "val", 4, size=16, start=50)
    return d


def test_train_checkpoint_and_exact_resume(micro, data16, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run("train", "--preset", "micro", "--data", data16, "--out", a, "--max-iters", 6, "--log-every", 1)
    run("train", "--preset", "micro", "--data", data16, "--out", b, "--max-iters", 3, "--log-every", 1)
    # as if killed (SIGKILL, OOM) at step 5, in the middle of a log line, after the checkpoint of step 3
    with open(b / "log.csv", "a") as f:
        f.write("4,0.1,20.0,1.0\n5,0.1,20.0,1.0\n6,0.")
    run("train", "--data", data16, "--out", b, "--max-iters", 6, "--resume", "--log-every", 1)
    # log.csv: steps 4 and 5 logged once, from the resumed run, and the cut line gone
    steps = lambda run: bright.read_log(run)["iteration"]
    assert steps(a) == steps(b) == [1, 2, 3, 4, 5, 6]
    assert bright.read_log(a)["loss"][3:] == bright.read_log(b)["loss"][3:] != [0.1, 0.1, 0.1]
    ca = torch.load(a / "bright.pt", weights_only=True)
    cb = torch.load(b / "bright.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 6 and ca["config"] == cb["config"]
    for k in ("model", "ema"):
        for n in ca[k]:
            assert torch.equal(ca[k][n], cb[k][n]), (k, n)
    assert (a / "recon.png").exists() and (a / "log.csv").read_text().startswith("iteration,loss,psnr,seconds")
    # the file alone rebuilds the model
    m, cfg, _ = bright.load_checkpoint(str(a / "bright.pt"))
    assert cfg == Config(**MICRO, max_iters=6) and not m.training


def test_training_on_two_threads_is_bitwise_repeatable(tmp_path, two_threads):
    # the tiny preset at its own size, so that the lookup's gathers are large enough for torch
    # to split them over threads: two runs of the same command take the same steps, to the
    # last bit (what the README promises for the CPU); with tables[g, idx] in the fast path
    # the weights differ after a few steps
    data = tmp_path / "data"
    write_images(data / "train", 16, size=64)
    write_images(data / "val", 2, size=64, start=50)
    for name in ("a", "b"):
        run("train", "--data", data, "--out", tmp_path / name, "--max-iters", 4, "--batch-size", 8)
    wa = torch.load(tmp_path / "a" / "bright.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "bright.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_diverging_run_keeps_its_last_good_checkpoint(micro, data16, tmp_path):
    # lr 1000: the loss overflows within a few steps; a save every step. The run stops with one
    # line at the first non-finite loss or weight, and bright.pt keeps the step before, finite
    # (it used to be replaced by NaN weights, and the validation then raised a traceback)
    with pytest.raises(SystemExit, match=r"^error: training diverged at step \d+ .*: nothing was saved"):
        run("train", "--preset", "micro", "--data", data16, "--out", tmp_path / "none", "--max-iters", 50,
            "--set", '{"eval_every": 50, "lr": 1000}')
    with pytest.raises(SystemExit, match=r"^error: training diverged at step (\d+) .* keeps its last save") as e:
        run("train", "--preset", "micro", "--data", data16, "--out", tmp_path, "--max-iters", 50,
            "--set", '{"eval_every": 1, "lr": 1000}')
    bad = int(re.search(r"step (\d+)", str(e.value)).group(1))
    c = torch.load(tmp_path / "bright.pt", weights_only=True)
    assert c["step"] == bad - 1 and all(v.isfinite().all() for k in ("model", "ema") for v in c[k].values())


@pytest.mark.parametrize("script", ["bright", "diffusion"])
def test_ctrl_c_finishes_the_step_saves_and_exits_130(micro, data16, world, tmp_path, script):
    # Ctrl-C during step 2 (here: sent from the step callback): the run finishes the step it is
    # in, logs and saves it, and ends with exit status 130 rather than 0 (a script running
    # `train && sample` must not go on with a half-trained model)
    def ctrl_c(step, model, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    if script == "bright":
        argv = ["train", "--preset", "micro", "--data", data16, "--out", tmp_path, "--max-iters", 10, "--device", "cpu"]
        mod, name, log = bright, "bright.pt", lambda: bright.read_log(tmp_path)
    else:
        argv = [*train_args(world, tmp_path, 10), "--device", "cpu"]
        mod, name = diffusion, "ddpm.pt"
        log = lambda: bright.read_log(tmp_path, "ddpm_log.csv", diffusion.LOG_COLUMNS)
    with pytest.raises(SystemExit) as e:
        mod.train(mod.parser().parse_args([str(a) for a in argv]), on_step=ctrl_c)
    assert e.value.code == 130
    assert torch.load(tmp_path / name, weights_only=True)["step"] == 3 == log()["iteration"][-1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_divergence_check_and_recorded_paths(tmp_path, monkeypatch):
    lin, p = torch.nn.Linear(2, 2), tmp_path / "p.pt"
    p.write_bytes(b"")                                                       # the last save
    bright.check_diverged(1, 0.5, str(p), lambda: None, [lin])              # finite: nothing happens
    for loss, msg in [(math.nan, "loss not finite"), (math.inf, "loss not finite"), (0.5, "weights not finite")]:
        if loss == 0.5:
            with torch.no_grad():
                lin.weight[0, 0] = math.nan
        restored = []
        with pytest.raises(SystemExit, match=f"^error: training diverged at step 7 \\({msg}\\): .*p.pt keeps"):
            bright.check_diverged(7, loss, str(p), lambda: restored.append(1), [lin])
        assert restored == [1]                                               # the signal handlers are put back
    # the built-in data (beside bright.py) is recorded as "data/shapes" and read back as that of
    # the copy that reads it; other folders absolutely; one that is gone names the flag
    monkeypatch.chdir(tmp_path)
    assert bright.data_record(bright.DEFAULT_DATA) == "data/shapes" and os.path.isabs(bright.DEFAULT_DATA)
    assert bright.data_record("mine") == str(tmp_path / "mine")
    assert bright.recorded({"data": "data/shapes"}, "data", "x.pt", "--data") == bright.DEFAULT_DATA
    with pytest.raises(SystemExit, match="'/gone', which x.pt records as its data, is gone: pass --data"):
        bright.recorded({"data": "/gone"}, "data", "x.pt", "--data")


def test_checkpoint_is_saved_before_the_validation(micro, data16, tmp_path, monkeypatch):
    # a second Ctrl-C during the validation that follows a save (minutes for a CPU run with
    # the interpreted kernels) ends the run as usual: the checkpoint of that step is written
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(bright, "evaluate", interrupted)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        run("train", "--preset", "micro", "--data", data16, "--out", tmp_path, "--max-iters", 2)
    for sig, h in handlers.items():  # the interrupted run had no chance to put them back
        signal.signal(sig, h)
    assert torch.load(tmp_path / "bright.pt", weights_only=True)["step"] == 2


def test_gan_term_starts_at_gan_start(micro, data16, tmp_path, capsys):
    """before gan_start the GAN run takes exactly the steps of a run without it; from then on
    the adversarial term changes them, and the log lines show the discriminator's loss"""
    def weights(name, *flags):
        run("train", "--preset", "micro", "--data", data16, "--out", tmp_path / name, "--max-iters", 3,
            "--log-every", 1, *flags)
        weights.d_losses = [float(m) for m in re.findall(r"D loss (\S+) ", capsys.readouterr().out)]
        return torch.load(tmp_path / name / "bright.pt", weights_only=True)["model"]
    plain = weights("plain")
    assert weights.d_losses == []
    late = weights("late", "--gan-weight", "0.5", "--set", '{"gan_start": 3}')
    assert weights.d_losses == []               # 3 steps: iterations 0..2, all before gan_start
    early = weights("early", "--gan-weight", "0.5", "--set", '{"gan_start": 2}')
    # iteration 2 alone: softplus losses of real and fake, near 2 log 2 = 1.39 as D starts
    assert len(weights.d_losses) == 1 and 0.5 < weights.d_losses[0] < 3
    assert all(torch.equal(plain[k], late[k]) for k in plain)
    assert not all(torch.equal(plain[k], early[k]) for k in plain)


def test_commands_and_checkpoint_errors(micro, data16, tmp_path, capsys):
    out = tmp_path / "o"
    # `train --data DIR` with no --preset trains the tiny preset, and says so (not the paper's)
    run("train", "--data", data16, "--out", tmp_path / "t", "--max-iters", 1)
    assert "note: no --preset, so the tiny one (64^2" in capsys.readouterr().out
    assert torch.load(tmp_path / "t" / "bright.pt", weights_only=True)["config"]["image_size"] == 64
    run("train", "--preset", "micro", "--data", data16, "--out", out, "--max-iters", 2)
    assert "no --preset" not in capsys.readouterr().out
    ck = out / "bright.pt"
    with pytest.raises(SystemExit, match="--resume"):  # never overwrite a run silently
        run("train", "--preset", "micro", "--data", data16, "--out", out, "--max-iters", 2)
    with pytest.raises(SystemExit, match="other settings .*image_size 64, it has 16"):  # --preset: all of it
        run("train", "--preset", "tiny", "--data", data16, "--out", out, "--resume")
    with pytest.raises(SystemExit, match="keeps its checkpoint's config"):   # --set would be ignored
        run("train", "--data", data16, "--out", out, "--resume", "--set", '{"lr": 0.01}')
    with pytest.raises(SystemExit, match=r"other settings \(asked: seed 5, it has 0\)"):  # would be ignored
        run("train", "--data", data16, "--out", out, "--resume", "--seed", 5)
    # the run's own command plus --resume: the stored values are accepted, --max-iters may change
    run("train", "--preset", "micro", "--data", data16, "--out", out, "--resume", "--seed", 0, "--max-iters", 3,
        "--set", json.dumps(MICRO))
    assert torch.load(ck, weights_only=True)["step"] == 3
    # without --data, a resumed run trains on its own data (not data/shapes); time adds up
    seconds = torch.load(ck, weights_only=True)["seconds"]
    capsys.readouterr()
    run("train", "--out", out, "--resume", "--max-iters", 4)
    said = capsys.readouterr().out
    assert f"from {data16}" in said and "no --preset" not in said  # a resumed run: its checkpoint's config
    other = tmp_path / "other_data"
    write_images(other / "train", 4, size=16); write_images(other / "val", 2, size=16, start=10)
    run("train", "--out", out, "--resume", "--max-iters", 5, "--data", other)
    assert f"trained on {data16} so far; it goes on with {other}" in capsys.readouterr().out
    c = torch.load(ck, weights_only=True)
    assert c["data"] == str(other) and c["seconds"] > seconds
    # every run logs its first and its last step, whatever --log-every (25 here)
    assert bright.read_log(out)["iteration"] == [1, 2, 3, 4, 5]
    # a new run: --set may name any field, a flag wins over it; --set twice: both, the later one wins
    run("train", "--preset", "micro", "--data", data16, "--out", tmp_path / "s", "--max-iters", 1,
        "--set", '{"seed": 3, "batch_size": 2, "lr": 0.1}', "--seed", 4, "--set", '{"lr": 0.002, "l1_weight": 0.5}')
    assert {k: torch.load(tmp_path / "s" / "bright.pt", weights_only=True)["config"][k]
            for k in ("seed", "batch_size", "lr", "l1_weight")} == {"seed": 4, "batch_size": 2, "lr": 0.002, "l1_weight": 0.5}
    a = diffusion.parser().parse_args(["train", "--set", '{"width": 48}', "--set", '{"mults": [1, 2]}'])
    assert bright.parse_set(a.set) == {"width": 48, "mults": [1, 2]}
    capsys.readouterr()
    run("eval", "--ckpt", ck, "--data", data16, "--json")
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 4 and 0 < r["table_usage"]["overall"] <= 1 and len(r["table_usage"]["per_level"]) == 3
    assert 0 < r["key_codes"]["min"] <= r["key_codes"]["max"] < 1 and math.isfinite(r["psnr"])
    run("reconstruct", "--ckpt", ck, "--data", data16, "--out", tmp_path / "r.png")
    assert Image.open(tmp_path / "r.png").size[0] > 16
    run("reconstruct", "--ckpt", ck, "--data", data16, "--n", 2)     # without --out: beside the checkpoint
    assert Image.open(out / "reconstruct.png").size[0] > 16
    run("encode", "--ckpt", ck, "--data", data16, "--out", tmp_path / "codes.pt")
    codes = torch.load(tmp_path / "codes.pt", weights_only=True)
    assert codes["codes"].shape == (12, 4, 4, 4) and codes["val_codes"].shape == (4, 4, 4, 4)
    # outputs are checked before the work: an image name for images, and key codes never replace a checkpoint
    with pytest.raises(SystemExit, match="needs an image file extension"):
        run("reconstruct", "--ckpt", ck, "--data", data16, "--out", tmp_path / "r.txt")
    with pytest.raises(SystemExit, match="exists and is not a bright-codes file but a bright one"):
        run("encode", "--ckpt", ck, "--data", data16, "--out", ck)
    assert torch.load(ck, weights_only=True)["kind"] == "bright"
    run("encode", "--ckpt", ck, "--data", data16, "--out", tmp_path / "codes.pt")   # its own kind: replaced
    torch.save({"kind": "something else"}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(ck.read_bytes()[:1000])  # a torch.save file cut short
    # weights of another version of the model (a renamed layer): one line, not a load_state_dict trace
    old = torch.load(ck, weights_only=True)
    for k in ("model", "ema"):
        old[k] = {n.replace("to_key.", "encoder.99."): v for n, v in old[k].items()}
    torch.save(old, tmp_path / "old.pt")
    newer = torch.load(ck, weights_only=True)       # a config field this code does not know
    newer["config"]["future_field"] = 1
    torch.save(newer, tmp_path / "newer.pt")
    for bad, msg in [(tmp_path / "missing.pt", "not found"), (tmp_path / "other.pt", "not a bright file"),
                     (tmp_path / "junk.pt", r"not a checkpoint \(not a file torch.save wrote\)"),
                     (tmp_path / "empty.pt", "not a checkpoint"), (tmp_path / "cut.pt", "not a readable checkpoint"),
                     (tmp_path, "is a folder: name the checkpoint file in it"),
                     (tmp_path / "old.pt", "does not fit"),
                     (tmp_path / "newer.pt", "Config cannot build .*future_field")]:
        with pytest.raises(SystemExit, match=msg):
            run("eval", "--ckpt", bad, "--data", data16)
    # output paths: one line before the work, not a traceback after it
    afile = tmp_path / "afile"
    afile.write_text("a file where a folder is needed")
    for argv, msg in [(("train", "--preset", "micro", "--data", data16, "--out", afile), "cannot make that folder"),
                      (("encode", "--ckpt", ck, "--out", afile / "codes.pt"), "cannot make that folder"),
                      (("encode", "--ckpt", ck, "--out", f"{tmp_path / 'new'}{os.sep}"), "is a folder: name a file"),
                      (("reconstruct", "--ckpt", ck, "--out", tmp_path / "r.psd"), r"needs an image file extension: \.png"),
                      (("reconstruct", "--ckpt", ck, "--out", tmp_path / ("a" * 300 + ".png")), "File name too long"),
                      # 250 characters: a name the file system takes, but not the temp file's (+ .tmp<pid>)
                      (("encode", "--ckpt", ck, "--out", tmp_path / ("a" * 247 + ".pt")), "File name too long"),
                      (("compare", out, "--out", afile), "cannot make that folder"),
                      (("train", "--preset", "micro", "--data", data16, "--out", data16), "is the data folder")]:
        with pytest.raises(SystemExit, match="^error: .*" + msg):
            run(*argv)
    # a folder by the name of a file the command writes there: one line now, not a traceback at
    # the first log line or grid (train) or at the end (compare)
    for name, argv in [("log.csv", ("train", "--preset", "micro", "--data", data16, "--max-iters", 1)),
                       ("recon.png", ("train", "--preset", "micro", "--data", data16, "--max-iters", 1)),
                       ("curves.png", ("compare", out, out))]:
        (tmp_path / f"in_{name}" / name).mkdir(parents=True)
        with pytest.raises(SystemExit, match=f"^error: --out .*holds a folder named {name}, where the command writes"):
            run(*argv, "--out", tmp_path / f"in_{name}")
        assert not (tmp_path / f"in_{name}" / "bright.pt").exists()


class RunsCode:
    """pickled as a call of os.getpid: a torch.load that unpickles freely would run that call"""
    def __reduce__(self):
        return os.getpid, ()


def test_a_failed_command_removes_the_empty_out_folders_it_made(micro, data16, tmp_path):
    """an error before anything is written (a mistyped --data) leaves no empty run folder
    behind; a folder that was there before stays, and so does one the command wrote into"""
    def cli(main, *argv):
        main([str(a) for a in argv] + ["--device", "cpu"])
    for main, argv, msg in [(bright.main, ("train", "--data", tmp_path / "nope", "--out", tmp_path / "a" / "b"),
                             "does not exist"),
                            (diffusion.main, ("sample", "--ckpt", tmp_path / "none.pt", "--out", tmp_path / "a" / "s.png"),
                             "not found")]:
        with pytest.raises(SystemExit, match=msg):
            bright.cli(lambda: cli(main, *argv))
        assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(SystemExit, match="does not exist"):
        bright.cli(lambda: cli(bright.main, "train", "--data", tmp_path / "nope", "--out", tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir()
    bright.cli(lambda: cli(bright.main, "train", "--preset", "micro", "--data", data16, "--out", tmp_path / "c" / "d",
                           "--max-iters", 1))
    assert (tmp_path / "c" / "d" / "bright.pt").is_file()


def test_checkpoints_are_read_without_running_code_and_outputs_keep_other_files(tmp_path):
    # a .pt from elsewhere is read as weights only: an object that runs code is refused
    torch.save({"kind": "bright", "config": {}, "x": RunsCode()}, tmp_path / "code.pt")
    with pytest.raises(SystemExit, match="is not a readable checkpoint"):
        bright.read_checkpoint(str(tmp_path / "code.pt"), "bright")
    torch.save({"kind": "bright"}, tmp_path / "noconfig.pt")      # no config at all: one line too
    with pytest.raises(SystemExit, match="has a config this code's Config cannot build"):
        bright.load_checkpoint(str(tmp_path / "noconfig.pt"))
    # key codes replace only key codes: a file with no kind (a user's own tensors, notes) stays
    torch.save({"a": torch.ones(2)}, tmp_path / "mine.pt")
    (tmp_path / "notes.pt").write_text("notes")
    for p in (tmp_path / "mine.pt", tmp_path / "notes.pt"):
        with pytest.raises(SystemExit, match="exists and is not a bright-codes file: choose another --out"):
            bright.check_overwrite(str(p), "bright-codes")
    for name in ("grid.PNG", "grid.Jpeg"):                      # an extension in capitals: the same format
        bright.check_image_out(str(tmp_path / name))


def test_each_process_takes_its_node_local_gpu(monkeypatch):
    # torchrun numbers processes over all nodes (RANK) and on each node (LOCAL_RANK): on the
    # second of two 4-GPU nodes, process 5 runs on that node's GPU 1 (there is no GPU 5)
    for k, v in dict(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(bright, "pick_device", lambda name: torch.device("cuda"))
    taken = []
    monkeypatch.setattr(torch.cuda, "set_device", taken.append)
    monkeypatch.setattr(bright.dist, "is_initialized", lambda: True)      # as if joined already
    monkeypatch.setattr(bright.dist, "get_rank", lambda: 5)
    monkeypatch.setattr(bright.dist, "get_world_size", lambda: 8)
    assert bright.setup_distributed("cuda") == (5, 8, torch.device("cuda", 1))
    assert taken == [torch.device("cuda", 1)]


def white_data(root):
    """16x16 all-white images: 4 to train on, 2 to validate"""
    for split, n in (("train", 4), ("val", 2)):
        os.makedirs(root / split)
        for i in range(n):
            Image.new("RGB", (16, 16), "white").save(root / split / f"{i}.png")
    return root


class StubD(torch.nn.Module):
    """a discriminator whose logit is a * mean(image) + b, recording what it is shown"""
    def __init__(self, w=64):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(5.0)), torch.nn.Parameter(torch.tensor(3.0))
        self.seen = []

    def forward(self, x):
        StubD.last = self
        self.seen.append(x.detach().clone())
        return (self.a * x.mean((1, 2, 3)) + self.b)[:, None, None, None]


def test_gan_losses_are_the_non_saturating_ones(micro, tmp_path, monkeypatch, capsys):
    """one step with a known discriminator D(x) = 5 mean(x) + 3 on white images: the
    generator's loss is MSE + w softplus(-D(fake)) and D's softplus(D(fake)) + softplus(-D(real)),
    the fakes being the first half of D's batch. (Fails with: softplus(+D(fake)) for the
    generator, the signs of D's two terms swapped.)"""
    monkeypatch.setattr(bright, "PatchDiscriminator", StubD)
    data = white_data(tmp_path / "white")
    losses = []
    args = bright.parser().parse_args(["train", "--preset", "micro", "--data", str(data), "--out", str(tmp_path / "o"),
                                       "--max-iters", "1", "--log-every", "1", "--gan-weight", "0.5"])
    bright.train(args, on_step=lambda step, model, loss: losses.append(loss))
    d_loss = float(re.search(r"D loss (\S+) ", capsys.readouterr().out).group(1))
    gen_in, d_in = StubD.last.seen                                           # the generator's pass, then D's
    y, x = d_in[:4], d_in[4:]
    assert torch.equal(y, gen_in) and (x == 1).all()                         # fakes first, reals white
    D = lambda im: 5 * im.mean((1, 2, 3)) + 3
    want_g = torch.nn.functional.mse_loss(y, x) + 0.5 * torch.nn.functional.softplus(-D(y)).mean()
    want_d = torch.nn.functional.softplus(D(y)).mean() + torch.nn.functional.softplus(-D(x)).mean()
    assert losses[0] == pytest.approx(want_g.item(), rel=1e-5)
    assert d_loss == pytest.approx(want_d.item(), abs=2e-4)     # printed to 4 decimals


def test_optimizers_are_the_papers(micro, data16, tmp_path):
    """Adam with betas (0, 0.99) and eps 1e-15 (README, the paper), for the model and the
    discriminator. (Fails with: betas (0.9, 0.99) for the model.)"""
    run("train", "--preset", "micro", "--data", data16, "--out", tmp_path, "--max-iters", 1, "--gan-weight", 0.1)
    ck = torch.load(tmp_path / "bright.pt", weights_only=True)
    g, d = ck["optimizer"]["param_groups"][0], ck["disc_optimizer"]["param_groups"][0]
    assert (tuple(g["betas"]), g["eps"]) == ((0.0, 0.99), 1e-15)
    assert tuple(d["betas"]) == (0.0, 0.99)


def test_a_resumed_gan_run_continues_its_discriminator(micro, data16, tmp_path):
    """2 steps + --resume for 2 more = 4 steps at once, the discriminator and its optimizer
    included (gan_start 0). (Fails with: the resumed run starts a fresh discriminator.)"""
    gan = ("--preset", "micro", "--data", data16, "--gan-weight", 0.5)
    run("train", *gan, "--out", tmp_path / "a", "--max-iters", 4)
    run("train", *gan, "--out", tmp_path / "b", "--max-iters", 2)
    run("train", *gan, "--out", tmp_path / "b", "--max-iters", 4, "--resume")
    ca, cb = (torch.load(tmp_path / r / "bright.pt", weights_only=True) for r in ("a", "b"))
    for k in ("model", "disc"):
        for n in ca[k]:
            assert torch.equal(ca[k][n], cb[k][n]), (k, n)


def test_resume_may_change_grad_accum(micro, data16, tmp_path, capsys):
    """--grad-accum may change on --resume (a smaller GPU): the resumed run uses and records
    it. (Fails with: only max_iters taken from the flags, --grad-accum silently ignored.)"""
    run("train", "--preset", "micro", "--data", data16, "--out", tmp_path, "--max-iters", 1)
    run("train", "--data", data16, "--out", tmp_path, "--max-iters", 2, "--resume", "--grad-accum", 2)
    assert torch.load(tmp_path / "bright.pt", weights_only=True)["config"]["grad_accum"] == 2
    # not given again, it stays the run's 2, not the help's default 1 (which --help says)
    run("train", "--data", data16, "--out", tmp_path, "--max-iters", 3, "--resume")
    assert torch.load(tmp_path / "bright.pt", weights_only=True)["config"]["grad_accum"] == 2
    with pytest.raises(SystemExit):
        run("train", "--help")
    helps = " ".join(capsys.readouterr().out.split())
    assert "--grad-accum GRAD_ACCUM micro-batches per step (default 1, or the resumed run's)" in helps


def test_each_seed_draws_its_own_batches(micro, data16, tmp_path, monkeypatch):
    """--seed reaches the per-step draws: step k's batch (and key-code noise, drawn right after
    it) comes from step_seed(seed, k), so two seeds train on different image sequences, not
    only from different initial weights. (A step seed taken from the step alone would give every
    seed the same batches and noise: runs meant to measure seed variance would be correlated.)"""
    seen = []
    real = bright.to_float
    monkeypatch.setattr(bright, "to_float", lambda x: (seen.append(x.clone()), real(x))[1])
    run("train", "--preset", "micro", "--data", data16, "--out", tmp_path, "--max-iters", 1, "--seed", 1)
    train_x, _ = bright.load_dataset(str(data16), 16)
    batch = lambda seed: (torch.manual_seed(bright.step_seed(seed, 0)), train_x[torch.randint(len(train_x), (4,))])[1]
    assert not torch.equal(batch(1), batch(0))              # the check below can tell the two apart
    assert torch.equal(seen[0], batch(1))                   # the first call: step 0's (only) micro-batch


def test_open_log_drops_a_cut_line_whose_digits_read_as_an_earlier_step(tmp_path):
    """A run killed while writing the line of step 12 can leave "1" at the end of log.csv: an
    integer <= the checkpoint's step, but no row. open_log must drop it (it has no newline), or
    the resumed run's first line is glued to it ("1" + "11,..." = step 111)."""
    p = tmp_path / "log.csv"
    p.write_text("iteration,loss,psnr,seconds\n1,0.5,20.0,1.0\n2,0.4,21.0,2.0\n1")
    with bright.open_log(str(p), 10) as f:
        f.write("11,0.3,22.0,3.0\n")
    assert bright.read_log(str(tmp_path))["iteration"] == [1, 2, 11]
    # re-saved by a spreadsheet in Latin-1: a log, not a UnicodeDecodeError at --resume
    p.write_bytes("iteration,loss,psnr,seconds\n1,0.5,20.0,1.0\n2,0.4,21.0,2.0 \xb5s\n".encode("latin-1"))
    bright.open_log(str(p), 10).close()
    assert bright.read_log(str(tmp_path))["iteration"] == [1, 2]


def test_validation_and_recon_png_use_the_ema_weights(micro, data16, tmp_path, monkeypatch):
    """The validation printed at a save ("val psnr ... (EMA)") scores the EMA weights that the
    checkpoint stores as "ema", and recon.png shows their reconstructions, not those of the
    weights being trained (which the checkpoint stores as "model", and which differ after 2 steps)."""
    seen = {}
    real_eval, real_pairs = bright.evaluate, bright.pairs_grid

    def spy_eval(model, *a, **k):
        seen["weights"] = {n: v.clone() for n, v in model.state_dict().items()}
        return real_eval(model, *a, **k)

    def spy_pairs(orig, recon, path, *a, **k):
        seen["orig"], seen["recon"] = orig.clone(), recon.clone()
        return real_pairs(orig, recon, path, *a, **k)
    monkeypatch.setattr(bright, "evaluate", spy_eval)
    monkeypatch.setattr(bright, "pairs_grid", spy_pairs)
    run("train", "--preset", "micro", "--data", data16, "--out", tmp_path, "--max-iters", 2)
    ck = torch.load(tmp_path / "bright.pt", weights_only=True)
    assert not all(torch.equal(ck["ema"][n], ck["model"][n]) for n in ck["ema"])
    assert seen["weights"].keys() == ck["ema"].keys()
    assert all(torch.equal(seen["weights"][n], ck["ema"][n]) for n in ck["ema"])
    m, _, _ = bright.load_checkpoint(str(tmp_path / "bright.pt"))
    with torch.no_grad():
        want = m.decode(m.encode(seen["orig"])).clamp(-1, 1)
    # the same weights and inputs on the same CPU: equal up to float rounding (measured: 0)
    assert torch.allclose(seen["recon"], want, atol=1e-6)


def test_log_csv_columns_hold_what_their_names_say(micro, data16, tmp_path):
    """log.csv is iteration, loss, psnr, seconds: the loss column holds the step's loss (as
    on_step sees it, written with 6 decimals, hence abs 1e-6), the psnr column the training
    batch's PSNR in dB (a fresh micro model on these images: 5-20 dB), so that `compare` plots PSNR."""
    losses = []
    args = bright.parser().parse_args(["train", "--preset", "micro", "--data", str(data16), "--out", str(tmp_path),
                                       "--max-iters", "2", "--log-every", "1"])
    bright.train(args, on_step=lambda step, model, loss: losses.append(loss))
    log = bright.read_log(str(tmp_path))
    assert log["iteration"] == [1, 2]
    assert log["loss"] == pytest.approx(losses, abs=1e-6)
    assert all(5 < p < 20 for p in log["psnr"]), log["psnr"]


def test_curves_draw_higher_values_higher(tmp_path, monkeypatch):
    """plot_curves: image rows grow downwards, so a rising series must go up the chart: 10 on the
    frame's bottom edge (y = 420 - 50), 20 on its top (y = 20), and the y labels beside them."""
    from PIL import ImageDraw
    lines, texts = [], []
    orig_line, orig_text = ImageDraw.ImageDraw.line, ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "line", lambda self, xy, *a, **k: (
        lines.append((xy, k.get("fill"))), orig_line(self, xy, *a, **k))[1])
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, t, *a, **k: (
        texts.append((xy, t)), orig_text(self, xy, t, *a, **k))[1])
    bright.plot_curves({"a": ([1, 2, 3], [10.0, 15.0, 20.0])}, str(tmp_path / "c.png"), "iteration", "psnr")
    curve = [xy for xy, fill in lines if fill == (31, 119, 180) and len(xy) == 3]
    assert len(curve) == 1 and [y for _, y in curve[0]] == pytest.approx([370, 195, 20])
    labels = {t: xy[1] for xy, t in texts}
    assert labels["10.0"] == pytest.approx(370) and labels["20.0"] == pytest.approx(20)


def test_curves_of_many_runs_have_distinct_colours(tmp_path, monkeypatch):
    from PIL import ImageDraw
    fills = []
    orig_line = ImageDraw.ImageDraw.line
    monkeypatch.setattr(ImageDraw.ImageDraw, "line", lambda self, xy, *a, **k: (
        fills.append(k.get("fill")) if len(xy) == 3 else None, orig_line(self, xy, *a, **k))[1])
    bright.plot_curves({f"run{i}": ([1, 2, 3], [i, i + 1, i]) for i in range(14)}, str(tmp_path / "c.png"), "it", "y")
    assert len(fills) == 14 and len(set(fills)) == 14


def micro_checkpoint(cfg, path, seed=0):
    """a BRIGHT checkpoint of the micro config written by hand (no training): random weights,
    tables N(0, 1) so that the output depends on the key codes. -> the model (eval mode)"""
    torch.manual_seed(seed)
    m = BRIGHT(cfg).eval().requires_grad_(False)
    m.tables.normal_()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": "bright", "config": dataclasses.asdict(cfg), "step": 3, "seconds": 1.0, "model": m.state_dict(),
                "ema": m.state_dict()}, path)
    return m


def test_a_checkpoint_without_the_placement_field_reads_as_c_over_res(micro, tmp_path):
    # checkpoints written before the config had `staggered` were trained with vertices at
    # c / res: they must load so (decoding with the staggered grid would silently differ)
    m = micro_checkpoint(micro, tmp_path / "bright.pt")
    ckpt = torch.load(tmp_path / "bright.pt", weights_only=True)
    del ckpt["config"]["staggered"]
    torch.save(ckpt, tmp_path / "old.pt")
    old, cfg, _ = bright.load_checkpoint(str(tmp_path / "old.pt"))
    assert cfg.staggered is False and cfg == micro
    z = torch.rand(2, 4, 4, 4)
    assert torch.equal(old.decode(z), m.decode(z))


def test_reconstruct_puts_the_originals_above_their_reconstructions(micro, data16, tmp_path):
    """reconstruct.png: first row the validation images (exactly: uint8 -> [-1, 1] -> uint8
    round-trips), the row below their reconstructions (to one grey level: float rounding at a
    .5 boundary), as its message says."""
    m = micro_checkpoint(micro, tmp_path / "bright.pt")
    run("reconstruct", "--ckpt", tmp_path / "bright.pt", "--data", data16, "--n", 2, "--out", tmp_path / "r.png",
        "--device", "cpu")
    g = torch.from_numpy(np.array(Image.open(tmp_path / "r.png"))).permute(2, 0, 1)
    assert g.shape == (3, 2 * 18 + 2, 2 * 18 + 2)
    cell = lambda r, c: g[:, 2 + r * 18:2 + r * 18 + 16, 2 + c * 18:2 + c * 18 + 16]
    _, val = bright.load_dataset(str(data16), 16, train=False)
    with torch.no_grad():
        y = m.decode(m.encode(bright.to_float(val[:2]))).clamp(-1, 1)
    recon = ((y + 1) / 2 * 255).round().byte()
    for c in range(2):
        assert torch.equal(cell(0, c), val[c])
        assert (cell(1, c).int() - recon[c].int()).abs().max() <= 1
        assert (recon[c].int() - val[c].int()).abs().max() > 10         # the two rows can be told apart


def test_evaluate_scores_the_clamped_reconstructions(micro):
    """evaluate's PSNR and SSIM are those of the reconstructions as images, clamped to [-1, 1] as
    reconstruct, compare and decode_all show them. A to_rgb bias of 3 puts every output above 1:
    unclamped, the PSNR would count errors that no saved image has."""
    torch.manual_seed(0)
    m = BRIGHT(micro).eval().requires_grad_(False)
    m.to_rgb.bias.fill_(3.0)
    val = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = bright.to_float(val)
    with torch.no_grad():
        y = m.decode(m.encode(x))
    assert y.min() > 1
    p, s, _ = bright.evaluate(m, val, "cpu")
    # the same float32 ops on the same inputs: agreement to rounding (1e-4 dB, 1e-5 in SSIM)
    assert torch.allclose(p, bright.psnr(y.clamp(-1, 1), x), atol=1e-4)
    assert torch.allclose(s, bright.ssim(y.clamp(-1, 1), x), atol=1e-5)


def test_eval_reports_the_mean_of_the_per_image_psnrs(micro, data16, tmp_path, monkeypatch, capsys):
    """eval's "psnr" is the mean over images of each image's PSNR (evaluate's per-image values,
    as the paper's tables average them), not the PSNR of the mean MSE: images at 10 and 30 dB
    give 20 dB (the PSNR of their mean MSE would be 12.97 dB)."""
    micro_checkpoint(micro, tmp_path / "bright.pt")
    monkeypatch.setattr(bright, "evaluate", lambda model, val, device, **k: (
        torch.tensor([10.0, 30.0]), torch.tensor([0.5, 0.7]), torch.rand(2, 4, 4, 4)))
    capsys.readouterr()
    run("eval", "--ckpt", tmp_path / "bright.pt", "--data", data16, "--json", "--device", "cpu")
    r = json.loads(capsys.readouterr().out)
    assert r["psnr"] == pytest.approx(20.0) and r["ssim"] == pytest.approx(0.6)


def test_compare_plots_each_smoothed_psnr_at_the_iteration_its_window_ends(micro, data16, tmp_path, monkeypatch):
    """compare smooths the training PSNR over k = rows // 40 rows ('valid' moving average) and
    plots value i at the iteration of the window's last row: 100 rows -> k = 2, 99 points,
    the first at iteration 2 = mean of rows 1 and 2."""
    run_dir = tmp_path / "run"
    micro_checkpoint(micro, run_dir / "bright.pt")
    its = list(range(1, 101))
    psnrs = [float(i % 7) for i in its]
    (run_dir / "log.csv").write_text("iteration,loss,psnr,seconds\n"
                                     + "".join(f"{i},0.1,{p},{i}\n" for i, p in zip(its, psnrs)))
    curves = {}
    monkeypatch.setattr(bright, "plot_curves", lambda series, path, *a, **k: curves.update(series))
    run("compare", run_dir, "--data", data16, "--out", tmp_path / "cmp", "--n", 2, "--device", "cpu")
    (xs, ys), = curves.values()
    assert xs == its[1:]
    assert ys == pytest.approx([(a + b) / 2 for a, b in zip(psnrs, psnrs[1:])])  # float64 means of small integers
    # the same run named twice, once with a trailing slash: one name, the second marked #2
    curves.clear()
    run("compare", run_dir, f"{run_dir}{os.sep}", "--data", data16, "--out", tmp_path / "cmp2", "--n", 2,
        "--device", "cpu")
    assert list(curves) == [f"{run_dir} (hash)", f"{run_dir} (hash) #2"]


# ----------------------------------------------------------------------------- the VQ baseline and code bits

def test_vq_snaps_to_the_nearest_codebook_entry():
    torch.manual_seed(0)
    vq = bright.VectorQuantizer(16, 4).eval()
    vq.codebook.normal_()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    q, idx, commit = vq(z)
    v = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(idx.flatten(), torch.cdist(v, vq.codebook).argmin(1))
    # q = z + (e - z).detach(): equal to the entry up to one float32 rounding of that sum
    assert torch.allclose(q.detach().permute(0, 2, 3, 1).reshape(-1, 4), vq.codebook[idx.flatten()], atol=1e-6)
    assert commit.item() == pytest.approx((v - vq.codebook[idx.flatten()]).square().mean().item(), rel=1e-5)
    # the commitment term (VQ-VAE eq. 3) moves the encoder vectors toward their entries, not
    # the entries: d/dz = 2 (z - e) / numel (atol: float32 rounding of values ~0.1)
    g, = torch.autograd.grad(commit, z, retain_graph=True)
    assert torch.allclose(g, 2 * (z - vq.codebook[idx].permute(0, 3, 1, 2)).detach() / z.numel(), atol=1e-7)
    (q * torch.arange(4.0)[:, None, None]).sum().backward()   # straight through: dq/dz = identity
    assert torch.equal(z.grad, torch.arange(4.0)[:, None, None].expand_as(z))


def test_vq_model_gradient_reaches_the_encoder(micro):
    torch.manual_seed(0)
    m = BRIGHT(bright.Config(**{**MICRO, "bottleneck": "vq", "codebook_size": 16}))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y, z, commit = m(x)
    assert y.shape == x.shape and commit.item() > 0
    torch.nn.functional.mse_loss(y, x).backward()   # the reconstruction alone: through the straight-through path
    assert m.encoder[0].weight.grad.abs().sum() > 0 and m.to_key.weight.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in m.quantizer.buffers())   # the codebook is not the optimizer's


def test_vq_ema_moves_an_entry_toward_its_assigned_mean():
    vq = bright.VectorQuantizer(4, 2, decay=0.9).train()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [-5.0, -5.0], [-5.0, 5.0], [5.0, -5.0]]))  # the last 3: unused
    vq.embed_sum.copy_(vq.codebook)
    before = vq.codebook.clone()
    z = torch.tensor([[1.0, 1.2], [0.8, 1.0], [1.2, 0.8]]).reshape(1, 3, 1, 2).permute(0, 3, 1, 2)  # (1, 2, 1, 3)
    _, idx, _ = vq(z)
    assert (idx == 0).all() and torch.equal(vq.codebook, before)            # the forward only counts,
    vq(z)                                                                   # summed until ema_step (bounded)
    assert vq.pending[0].tolist() == [6, 0, 0, 0] and vq.pending[1].shape == (4, 2)
    vq.ema_step()                                                           # one step per optimizer step
    mean = torch.tensor([1.0, 1.0])
    assert (vq.codebook[0] - mean).norm() < (before[0] - mean).norm()      # toward the mean...
    assert (vq.codebook[0] - mean).norm() > 0                               # ...by an EMA step, not a jump
    # unused entries barely move: entry = sum / smoothed count, and one step decays sum and
    # count alike, so only the smoothing's eps = 1e-5 shifts it (measured: 7.6e-6 for entries of 5)
    assert torch.allclose(vq.codebook[1:], before[1:], atol=1e-4)
    for _ in range(200):                          # but dead ones collapse towards 0 once their count,
        vq(z); vq.ema_step()                      # decaying by 0.9 a step, nears eps (~115 steps)
    assert vq.codebook[1:].norm(dim=1).max() < 0.1 * before[1:].norm(dim=1).min()


def test_vq_commitment_is_weighted_by_beta():
    # the model's commitment term is beta * ||z - sg(e)||^2 (the unweighted term: above)
    commits = []
    for beta in (0.25, 1.0):
        torch.manual_seed(0)
        m = BRIGHT(bright.Config(**{**MICRO, "bottleneck": "vq", "codebook_size": 16, "commitment": beta}))
        commits.append(m(torch.zeros(1, 3, 16, 16))[2].item())           # same weights, same vectors
    assert commits[1] == pytest.approx(4 * commits[0], rel=1e-6) and commits[0] > 0


def test_vq_ema_step_smooths_counts_and_restarts_only_dead_entries():
    # VQ-VAE appendix A.1 with Laplace-smoothed counts: N_i <- (N_i + eps) / (n + K eps) * n,
    # entry_i = embed_sum_i / N_i. Counts of order eps make the smoothing matter (40% here)
    vq = bright.VectorQuantizer(3, 2, decay=0.5).train()
    vq.cluster_size.copy_(torch.tensor([4e-5, 2e-5, 2e-5]))
    vq.embed_sum.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    vq.pending = (torch.zeros(3), torch.zeros(3, 2), torch.zeros(1, 2))   # nothing assigned this step
    vq.ema_step()
    N, eps = torch.tensor([2e-5, 1e-5, 1e-5], dtype=torch.float64), 1e-5
    size = (N + eps) / (N.sum() + 3 * eps) * N.sum()
    want = torch.tensor([[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]], dtype=torch.float64) / size[:, None]
    assert torch.allclose(vq.codebook.double(), want, rtol=1e-5)         # float32 buffers
    # --set '{"codebook_restart": true}': an entry whose count decayed below 1e-3 is re-seeded
    # from the step's vectors; the entries in use keep their EMA
    vq = bright.VectorQuantizer(3, 2, decay=0.5, restart=True).train()
    vq.cluster_size.copy_(torch.tensor([4.0, 6.0, 0.0]))
    vq.embed_sum.copy_(torch.tensor([[4.0, 4.0], [6.0, 0.0], [1.0, 1.0]]))
    vq.pending = (torch.tensor([4.0, 6.0, 0.0]), torch.tensor([[4.0, 4.0], [6.0, 0.0], [0.0, 0.0]]),
                  torch.tensor([[7.0, 9.0]]))
    vq.ema_step()
    assert torch.allclose(vq.codebook[:2], torch.tensor([[1.0, 1.0], [1.0, 0.0]]), atol=1e-5)  # eps's shift
    assert vq.codebook[2].tolist() == [7.0, 9.0] and vq.cluster_size[2] == 1


def test_codebook_usage_and_perplexity_hand_cases():
    assert bright.codebook_usage(torch.tensor([0, 0, 1, 1]), 4) == pytest.approx((0.5, 2.0))
    assert bright.codebook_usage(torch.tensor([3, 3, 3]), 4) == pytest.approx((0.25, 1.0))
    assert bright.codebook_usage(torch.arange(8), 8) == pytest.approx((1.0, 8.0))


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_quantize_codes_bits(bits):
    z = torch.rand(5000, dtype=torch.float64)
    q = bright.quantize_codes(z, bits)
    assert q.unique().numel() <= 2 ** bits and q.min() >= 0 and q.max() <= 1
    assert (q - z).abs().max() <= 0.5 / (2 ** bits - 1) + 1e-12   # the nearest level


def test_quantized_codes_change_the_output_only_when_coarse(micro):
    # tables of size 1 (not the 1e-4 of a fresh model), so the output depends on the codes.
    # 16 bits move a code by at most 2^-17 (1/16000 of the finest cell here, 1/8), 1 bit by up
    # to 0.5: the output is smooth in the codes, so the first change is ~1e-4 of the second
    torch.manual_seed(0)
    m = BRIGHT(micro).eval()
    with torch.no_grad():
        m.tables.normal_()
        z = m.encode(torch.rand(8, 3, 16, 16) * 2 - 1)
        y, y16, y1 = (m.decode(c) for c in (z, bright.quantize_codes(z, 16), bright.quantize_codes(z, 1)))
    assert (y1 - y).abs().max() > 0
    assert (y16 - y).abs().max() < 1e-3 * (y1 - y).abs().max()


def test_vq_training_eval_and_compare(micro, data16, tmp_path, capsys):
    h, v = tmp_path / "hash", tmp_path / "vq"
    run("train", "--preset", "micro", "--data", data16, "--out", h, "--max-iters", 4, "--log-every", 1)
    run("train", "--preset", "micro", "--bottleneck", "vq", "--set", '{"codebook_size": 32}',
        "--data", data16, "--out", v, "--max-iters", 4, "--log-every", 1)
    m, cfg, _ = bright.load_checkpoint(str(v / "bright.pt"))
    assert cfg.bottleneck == "vq" and not hasattr(m, "tables") and m.quantizer.codebook.shape == (32, 4)
    capsys.readouterr()
    run("eval", "--ckpt", v / "bright.pt", "--data", data16, "--json")
    r = json.loads(capsys.readouterr().out)
    u = r["codebook_usage"]
    assert r["bottleneck"] == "vq" and 0 < u["used"] <= 1 and 1 <= u["perplexity"] <= 32 * u["used"] + 1e-9
    assert r["code_bits_per_image"] == 4 * 4 * 5          # 4x4 indices of log2(32) bits
    with pytest.raises(SystemExit, match="hash-bottleneck"):
        run("eval", "--ckpt", v / "bright.pt", "--data", data16, "--quantize-bits", "4")
    with pytest.raises(SystemExit, match="VQ model"):  # before it reads the images (--data that is not there)
        run("encode", "--ckpt", v / "bright.pt", "--data", tmp_path / "no_data", "--out", tmp_path / "codes.pt")
    with pytest.raises(SystemExit, match="VQ model"):  # nor does diffusion.py train on its encoder vectors
        diffusion.main(["train", "--bright-ckpt", str(v / "bright.pt"), "--data", str(data16), "--out",
                        str(tmp_path / "d"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="--n must be at least 1"):
        run("compare", h, v, "--data", data16, "--out", tmp_path / "cmp", "--n", 0)
    big = tmp_path / "big"                                    # 32x32 images: not comparable image for image
    run("train", "--preset", "micro", "--data", data16, "--out", big, "--max-iters", 1,
        "--set", '{"image_size": 32, "enc_widths": [8, 8, 8, 16], "dec_widths": [16, 8, 8]}')
    with pytest.raises(SystemExit, match="compare needs runs of one image size"):
        run("compare", h, big, "--data", data16, "--out", tmp_path / "cmp")
    run("compare", h, v, "--data", data16, "--out", tmp_path / "cmp", "--n", 4)
    out = capsys.readouterr().out
    assert out.count("| hash |") == 1 and out.count("| vq |") == 1
    assert Image.open(tmp_path / "cmp" / "recon.png").size[1] == 2 + 3 * (16 + 2)  # originals + 2 runs
    im = np.asarray(Image.open(tmp_path / "cmp" / "curves.png"))
    for color in [(31, 119, 180), (214, 39, 40)]:  # both curves were drawn
        assert (im == color).all(-1).sum() > 20
    # the same run twice: two curves (the second, red, over the first); imperfect logs: their bad
    # rows left out, no traceback
    run("compare", h, h, "--data", data16, "--out", tmp_path / "twice", "--n", 2)
    twice = np.asarray(Image.open(tmp_path / "twice" / "curves.png"))
    assert (twice == (214, 39, 40)).all(-1).sum() > 20
    with open(h / "log.csv", "a") as f:
        f.write("5,inf,-inf,1.0\n6,nan,nan,2.0\n7,0.1,20\n8,0.1,")
    assert bright.read_log(h)["iteration"] == [1, 2, 3, 4]
    (v / "log.csv").write_text("iteration,loss,psnr,seconds\n")   # a header alone: no curve for v
    capsys.readouterr()
    run("compare", h, v, "--data", data16, "--out", tmp_path / "bad_logs", "--n", 2)
    assert "| hash |" in capsys.readouterr().out and (tmp_path / "bad_logs" / "curves.png").exists()
    (v / "log.csv").unlink()                              # a run without its log: before any work
    with pytest.raises(SystemExit, match=r"log.csv' not found"):
        run("compare", h, v, "--data", data16, "--out", tmp_path / "no_log")
    assert not (tmp_path / "no_log" / "recon.png").exists()


def test_eval_quantize_bits_and_lpips(micro, data16, tmp_path, capsys):
    run("train", "--preset", "micro", "--data", data16, "--out", tmp_path, "--max-iters", 4)
    capsys.readouterr()
    run("eval", "--ckpt", tmp_path / "bright.pt", "--data", data16, "--json", "--quantize-bits", "16,1,16", "--lpips")
    r = json.loads(capsys.readouterr().out)
    assert [d["bits"] for d in r["quantized"]] == [1, 16]   # each once, in order
    q = {d["bits"]: d for d in r["quantized"]}
    assert q[1]["code_bits_per_image"] == 4 * 4 * 4 and q[16]["code_bits_per_image"] == 16 * 64
    # 16 bits move a key code by at most half of 1/65535 (~1/200 of the noise sigma it trained with)
    assert q[16]["psnr"] == pytest.approx(r["psnr"], abs=0.01)
    try:
        import lpips  # noqa: F401
        assert isinstance(r["lpips"], float) or r["lpips"].startswith("skipped: torchvision's AlexNet weights")
    except ImportError:
        assert r["lpips"].startswith("skipped: the lpips package is not installed")
    for bad in ("0", "x", "2,40"):  # refused before the images are read (--data that is not there)
        with pytest.raises(SystemExit, match="quantize-bits"):
            run("eval", "--ckpt", tmp_path / "bright.pt", "--data", tmp_path / "no_data", "--quantize-bits", bad)


# ----------------------------------------------------------------------------- distributed, accumulation, precision

def step_losses(micro_cfg_args, tmp_path, name, *more):
    """train a micro model in this process; -> per-step losses (global means) and final parameters"""
    losses = []
    args = bright.parser().parse_args(["train", "--preset", "micro", *map(str, micro_cfg_args), "--out",
                                       str(tmp_path / name), *map(str, more)])
    m = bright.train(args, on_step=lambda step, model, loss: losses.append(loss))
    return losses, m


def test_grad_accum_equals_the_whole_batch(micro, data16, tmp_path):
    # batch 4 as 2 micro-batches of 2 vs one batch of 4: the same images and key-code noise,
    # the same mean gradient up to float32 summation order; after 3 Adam steps the losses
    # agree to ~2e-7 relative and the weights to ~1e-7, so 1e-5 and 1e-6 leave room for that
    # and nothing else
    a, ma = step_losses(["--data", data16, "--max-iters", 3, "--batch-size", 4], tmp_path, "a")
    b, mb = step_losses(["--data", data16, "--max-iters", 3, "--batch-size", 4, "--grad-accum", 2], tmp_path, "b")
    c, _ = step_losses(["--data", data16, "--max-iters", 3, "--batch-size", 2], tmp_path, "c")
    assert len(a) == 3 and b == pytest.approx(a, rel=1e-5)
    assert c[1:] != pytest.approx(a[1:], rel=5e-3)   # a different batch: losses 0.8% and 1.2% apart
    assert torch.allclose(ma.encoder[0].weight, mb.encoder[0].weight, atol=1e-6)
    # the last step's gradient, summed over the micro-batches: the whole batch's mean, not 2x it
    # (Adam would hide a missing 1/grad_accum: its steps do not depend on the gradient's scale)
    ga, gb = ma.to_key.weight.grad, mb.to_key.weight.grad
    assert (gb - ga).norm() < 1e-4 * ga.norm()                     # measured: 2e-6 relative
    with pytest.raises(SystemExit, match="multiple"):
        step_losses(["--data", data16, "--max-iters", 1, "--batch-size", 4, "--grad-accum", 3], tmp_path, "d")
    # the VQ codebook takes one EMA step per optimizer step, from all its micro-batches
    vq = ["--data", data16, "--max-iters", 3, "--batch-size", 4, "--bottleneck", "vq", "--set", '{"codebook_size": 16}']
    (a, ma), (b, mb) = step_losses(vq, tmp_path, "va"), step_losses(vq + ["--grad-accum", 2], tmp_path, "vb")
    assert b == pytest.approx(a, rel=1e-4)
    assert torch.allclose(ma.quantizer.codebook, mb.quantizer.codebook, atol=1e-5)


def test_bfloat16_is_for_cuda_only(micro, data16, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine takes --dtype bfloat16")
    with pytest.raises(SystemExit, match="CUDA"):
        step_losses(["--data", data16, "--max-iters", 1, "--dtype", "bfloat16", "--device", "cpu"], tmp_path, "bf")


def test_autocast_keeps_key_codes_and_lookup_in_float32(micro, monkeypatch):
    # what --dtype bfloat16 does on CUDA, with the CPU's bf16 autocast: the convolutions run in
    # bf16, but the key codes and every tensor of the lookup stay float32
    seen = []
    real = bright.grid_lookup
    def spy(coords, tables, spec, backend):
        out = real(coords, tables, spec, backend)
        seen.append((coords.dtype, tables.dtype, out.dtype))
        return out
    monkeypatch.setattr(bright, "grid_lookup", spy)
    m = BRIGHT(micro)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = m.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
        f = m.features(z)
        y = m.synthesize(f)
    assert z.dtype == torch.float32 and seen == [(torch.float32,) * 3]
    assert f.dtype == torch.bfloat16 and y.isfinite().all()   # the per-group MLP did run in bf16


@pytest.fixture
def fresh_dynamo():
    """skip without a C++ compiler (torch.compile builds C++ on the CPU); else a fresh dynamo
    for the test, reset again after it"""
    import shutil
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("torch.compile on the CPU builds C++ and finds no compiler here")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_ddp_of_a_compiled_1x1_conv_warns_nothing(fresh_dynamo):
    """torch.compile gives a 1x1 conv's weight gradient odd strides for its size-1 dimensions;
    DDP warns once per process that they differ from its bucket's, a false alarm ddp_wrap
    silences. In a fresh process (the C++ side warns once per process), a world of 1 that
    ddp_wrap is told is 2; the gradient's strides show the situation did arise."""
    code = textwrap.dedent(f"""
        import json, sys, tempfile, warnings, torch, torch.distributed as dist
        sys.path.insert(0, {HERE!r})
        import bright
        dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
        m = bright.ModConv(8, 3, 1, 4, demod=False)
        m.compile()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ddp = bright.ddp_wrap(m, torch.device("cpu"), 2)
            ddp(torch.randn(2, 8, 5, 5), torch.randn(2, 4)).square().sum().backward()
        print(json.dumps([m.weight.grad.stride(), [str(w.message) for w in seen]]))
        dist.destroy_process_group()""")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    strides, warned = json.loads(out.stdout.strip().splitlines()[-1])
    if strides == [8, 1, 1, 1]:
        pytest.skip("this torch's compiled 1x1 conv returns the standard gradient strides: nothing to silence")
    assert warned == []


def compiled_graphs():
    """graphs torch.compile has captured since the last reset (a --compile that compiled
    nothing would leave it at 0)"""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compile_trains_as_eager_and_saves_plain_checkpoints(micro, data16, tmp_path, fresh_dynamo):
    # --compile (torch.compile of the encoder, heads and decoder; the lookup stays the custom
    # autograd Function) takes the eager run's steps: the losses agree to float32 rounding of
    # the fused kernels (measured: 9e-8 relative on step 1, equal after), and the checkpoint
    # has the eager model's keys (no "_orig_mod." prefix), so eval, resume and diffusion.py
    # load it with or without --compile
    eager, _ = step_losses(["--data", data16, "--max-iters", 3], tmp_path, "eager")
    assert compiled_graphs() == 0
    compiled, _ = step_losses(["--data", data16, "--max-iters", 3, "--compile"], tmp_path, "compiled")
    assert compiled_graphs() >= 3        # encoder, heads, decoder (more with graph breaks)
    assert len(compiled) == 3 and compiled == pytest.approx(eager, rel=1e-6)
    ce = torch.load(tmp_path / "eager" / "bright.pt", weights_only=True)
    cc = torch.load(tmp_path / "compiled" / "bright.pt", weights_only=True)
    for k in ("model", "ema"):
        assert ce[k].keys() == cc[k].keys(), k
    bright.load_checkpoint(str(tmp_path / "compiled" / "bright.pt"))


DDP_WORKER = """
import json, os, sys, torch
sys.path.insert(0, {here!r})
import bright, diffusion
bright.PRESETS["micro"] = json.loads({micro!r})
rank = int(os.environ.get("RANK", 0))
record = []
args = {module}.parser().parse_args(sys.argv[1:])
{module}.train(args, on_step=lambda step, model, loss: record.append(
    (step, loss, torch.cat([p.detach().flatten() for p in model.parameters()]))))
torch.save(record, os.path.join({rec!r}, f"rank{{rank}}.pt"))
"""


def torchrun_two(tmp_path, module, argv):
    """argv through `torchrun --standalone --nproc_per_node=2` (gloo, one thread each)
    -> per rank: [(step, loss, all parameters flattened)] after every step"""
    rec = tmp_path / f"rec_{module}"
    rec.mkdir()
    worker = tmp_path / f"worker_{module}.py"
    worker.write_text(DDP_WORKER.format(here=HERE, micro=json.dumps(MICRO), rec=str(rec), module=module))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(worker), *map(str, argv)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r0, r1 = torch.load(rec / "rank0.pt"), torch.load(rec / "rank1.pt")
    for (_, l0, p0), (_, l1, p1) in zip(r0, r1):  # the same parameters on both ranks after every step
        assert l0 == l1 and torch.equal(p0, p1)
    return r0, r1


@pytest.mark.slow
def test_ddp_two_processes_match_one(micro, data16, tmp_path):
    r0, r1 = torchrun_two(tmp_path, "bright", ["train", "--preset", "micro", "--data", data16, "--batch-size", 4,
                                               "--log-every", 1, "--device", "cpu", "--out", tmp_path / "ddp",
                                               "--max-iters", 3])
    assert [s for s, _, _ in r0] == [1, 2, 3]
    # one process with the same global batch of 4: the same losses up to float32 summation
    # order (the all-reduce averages two means of 2; ~1e-6 relative), 1e-4 as elsewhere
    single, _ = step_losses(["--data", data16, "--batch-size", 4, "--max-iters", 5], tmp_path, "single")
    assert [l for _, l, _ in r0] == pytest.approx(single[:3], rel=1e-4)
    # only rank 0 wrote: one header and one line per step in the log, one checkpoint
    log = (tmp_path / "ddp" / "log.csv").read_text().splitlines()
    assert log[0] == "iteration,loss,psnr,seconds" and len(log) == 4
    assert sorted(os.listdir(tmp_path / "ddp")) == ["bright.pt", "log.csv", "recon.png"]
    # the DDP checkpoint resumes in a single process and continues the same trajectory
    resumed = []
    args = bright.parser().parse_args(["train", "--data", str(data16), "--out", str(tmp_path / "ddp"),
                                       "--max-iters", "5", "--resume"])
    bright.train(args, on_step=lambda step, model, loss: resumed.append(loss))
    assert resumed == pytest.approx(single[3:], rel=1e-4)


# ----------------------------------------------------------------------------- Triton kernels vs the reference
# On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set at the top of this
# file). With a GPU, `TRITON_INTERPRET=0 pytest -k kernel` tests the compiled kernels on CUDA.

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = "cpu" if hg._INTERPRETED else "cuda"
# The interpreter pays ~0.1 s per program, so on the CPU a program takes many points; 128
# (the GPU block size) still makes the hypothesis cases span several blocks with a ragged end.
BLOCK = 128


def _inputs(spec, N, G, dtype, seed, special=True):
    """Random coords with the awkward values mixed in (0, 1, cell faces, outside, NaN),
    random tables and a random upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(N, G, spec.dim, generator=gen, dtype=torch.float64)
    if special:
        r, s = spec.resolutions[-1], spec.scales[-1] or 1
        face = lambda k: (k - spec.shift) / s  # pos = k: on a face of the finest level's cells
        values = torch.tensor([0.0, 1.0, face(1), 0.5, min(face(r - 1), 1), -0.25, 1.5, float("nan")],
                              dtype=torch.float64)
        pick = torch.rand(coords.shape, generator=gen) < 0.2
        coords[pick] = values[torch.randint(len(values), (int(pick.sum()),), generator=gen)]
    tables = torch.randn(G, spec.num_entries, spec.features, generator=gen, dtype=torch.float64)
    grad = torch.randn(N, G, spec.levels * spec.features, generator=gen, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (coords, tables, grad)]


def _run(fn, coords, tables, grad, spec, coords_grad=True, tables_grad=True):
    c = coords.clone().requires_grad_(coords_grad)
    t = tables.clone().requires_grad_(tables_grad)
    out = fn(c, t, spec)
    out.backward(grad)
    return out.detach(), c.grad, t.grad


def _triton(c, t, spec):
    return hg.grid_lookup_triton(c, t, spec, block=BLOCK)


def _close(a, b, atol, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=False)


@settings(max_examples=12, deadline=None)
@given(D=st.sampled_from([2, 3, 4]), L=st.integers(1, 3), Fe=st.sampled_from([1, 2, 4, 8]),
       G=st.integers(1, 2), log2_T=st.integers(3, 10), min_res=st.integers(1, 6),
       growth=st.integers(1, 4), N=st.integers(1, 300), seed=st.integers(0, 2 ** 16),
       staggered=st.booleans())
# always run, whatever the draw: D = 4 with levels of 81, 256 (= T, dense) and 625 (hashed)
# vertices, and the paper's D = 3, F = 4 with staggered vertices (scales 2, 3.2, 5)
@example(D=4, L=3, Fe=2, G=2, log2_T=8, min_res=2, growth=2, N=300, seed=0, staggered=False)
@example(D=3, L=3, Fe=4, G=2, log2_T=7, min_res=3, growth=2, N=300, seed=1, staggered=True)
def test_kernels_match_reference_fp32(D, L, Fe, G, log2_T, min_res, growth, N, seed, staggered):
    """Output, table gradient and coordinate gradient equal the reference's, in float32.
    Table sizes 2^3..2^10 against (res+1)^D vertices give dense, hashed and mixed grids."""
    spec = GridSpec(D, L, Fe, log2_T, min_res, min_res * growth, staggered)
    coords, tables, grad = _inputs(spec, N, G, torch.float32, seed)
    out, gc, gt = _run(_triton, coords, tables, grad, spec)
    ref_out, ref_gc, ref_gt = _run(grid_lookup_reference, coords, tables, grad, spec)
    # Tolerances. Both sides compute the same fp32 expressions; they differ only by rounding
    # order (the GPU contracts a*b+c into one fma, the table gradient's atomics add in any
    # order), so every error is a few ulp of the *terms* of a sum, not of its result:
    # - out: at most 2^D terms w*entry with sum w = 1 -> |terms| <= max|entry|; 1e-6 of it
    #   is ~16 fp32 ulp.
    emax, gmax = tables.abs().max(), grad.abs().max()
    _close(out, ref_out, atol=1e-6 * emax)
    # - table gradient: sums of w*grad over the points hitting an entry (<= N*G*2^D terms
    #   of size <= gmax here); n*eps*sum|terms| is a loose bound, 1e-6*gmax*sqrt(terms) a
    #   realistic one for fp32 (eps = 6e-8) with this many terms.
    _close(gt, ref_gt, atol=1e-6 * gmax * (N * G * 2 ** D) ** 0.5)
    # - coordinate gradient: scale (<= res) * sum over corners of +-prod_{e!=d} w_e * <entry, grad>;
    #   the partial weights of one dimension sum to 2, so the terms total at most
    #   2 * res * F * emax * gmax. The +- sum can cancel, hence an absolute tolerance
    #   relative to that bound (1e-6 ~ 16 ulp), summed over L levels.
    _close(gc, ref_gc, atol=1e-6 * L * 2 * spec.resolutions[-1] * Fe * emax * gmax)
    assert torch.isfinite(out).all() and torch.isfinite(gc).all()


@pytest.mark.parametrize("D,Fe,staggered", [(2, 8, False), (3, 4, False), (3, 4, True), (4, 2, True)])
def test_dense_and_hashed_levels_fp64(D, Fe, staggered):
    """A grid whose coarse levels are dense and fine levels hashed, in float64: the kernels
    then agree with the reference to rounding (1e-12), which would expose any index that is
    off by one vertex or any corner taken with the wrong weight (or the wrong placement)."""
    spec = GridSpec(D, 3, Fe, 2 * D + 2, 2, 12, staggered)
    assert any(spec.dense) and not all(spec.dense), spec
    coords, tables, grad = _inputs(spec, 200, 2, torch.float64, seed=D)
    got = _run(_triton, coords, tables, grad, spec)
    want = _run(grid_lookup_reference, coords, tables, grad, spec)
    for a, b in zip(got, want):
        _close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("staggered", [False, True])
def test_no_reads_outside_the_table(staggered):
    """x = 1 (and values clamped to 1) must use the last cell, not a cell past the grid: the
    tables sit between NaN slabs, so any read past the end would turn the output into NaN.
    (The interpreter returns whatever lies outside a tensor instead of failing.)"""
    spec = GridSpec(3, 1, 2, 12, 6, 6, staggered)  # one dense level
    assert spec.dense == (True,)
    slab = torch.full((3, spec.num_entries, 2), float("nan"), dtype=torch.float64, device=DEVICE)
    tables = slab[1:2]
    tables.copy_(torch.randn(1, spec.num_entries, 2, dtype=torch.float64))
    coords = torch.tensor([[[1.0, 1.0, 1.0]], [[1.5, 1.0, 2.0]], [[0.0, 0.0, 0.0]],
                           [[float("nan"), -1.0, 1.0]]], dtype=torch.float64, device=DEVICE)
    c = coords.clone().requires_grad_()
    t = tables.requires_grad_()  # not cloned: the kernels must see the slab around it
    out = _triton(c, t, spec)
    out.sum().backward()
    want = _run(grid_lookup_reference, coords, tables.detach(), torch.ones_like(out), spec)
    for a, b in zip((out, c.grad, t.grad), want):
        _close(a.detach(), b, atol=1e-12, rtol=1e-12)
    assert torch.isnan(slab[0]).all() and torch.isnan(slab[2]).all()  # nothing written there


def test_one_gradient_at_a_time():
    """Only the gradients autograd asks for are computed (ctx.needs_input_grad)."""
    spec = GridSpec(3, 2, 2, 6, 2, 6)
    coords, tables, grad = _inputs(spec, 100, 2, torch.float64, seed=1)
    want = _run(grid_lookup_reference, coords, tables, grad, spec)
    _, gc, gt = _run(_triton, coords, tables, grad, spec, tables_grad=False)
    assert gt is None
    _close(gc, want[1], atol=1e-12, rtol=1e-12)
    _, gc, gt = _run(_triton, coords, tables, grad, spec, coords_grad=False)
    assert gc is None
    _close(gt, want[2], atol=1e-12, rtol=1e-12)


def test_int64_offsets(monkeypatch):
    """The int64-offset variant (tensors of 2^31+ elements) computes the same thing."""
    monkeypatch.setattr(hg, "_INT32_LIMIT", 0)
    spec = GridSpec(3, 2, 4, 7, 2, 8)
    coords, tables, grad = _inputs(spec, 100, 2, torch.float64, seed=2)
    for a, b in zip(_run(_triton, coords, tables, grad, spec),
                    _run(grid_lookup_reference, coords, tables, grad, spec)):
        _close(a, b, atol=1e-12, rtol=1e-12)


def test_tables_of_2_31_entries_get_int64_level_offsets():
    """A group's table of 2^31+ entries (here 3 levels of 2^30) has level offsets past int32:
    the kernels get them as int64 (the kernel test above runs that variant) and int64 indices."""
    spec = GridSpec(3, 3, 1, 30, 2048, 4096)
    assert spec.num_entries >= 2 ** 31 and not hg.triton_unfit(spec)
    _, (res, scale, off, dense), common = hg._launch_args(torch.rand(10, 1, 3), torch.empty(0), spec, 1024)
    assert off.dtype == torch.int64 and off.tolist() == list(spec.offsets) and common["IDX64"]
    assert res.dtype == dense.dtype == torch.int32 and scale.dtype == torch.float32


def test_coordinate_gradient_variants(monkeypatch):
    """Atomic adds into (N, G, D) and the per-level buffer summed afterwards agree."""
    spec = GridSpec(2, 3, 2, 6, 3, 9)
    coords, tables, grad = _inputs(spec, 150, 2, torch.float64, seed=3)
    want = _run(grid_lookup_reference, coords, tables, grad, spec)[1]
    for atomic in (True, False):
        for inner in (True, False):
            monkeypatch.setattr(hg, "COORD_GRAD_ATOMIC", atomic)
            monkeypatch.setattr(hg, "LEVELS_INNER", inner)
            got = _run(_triton, coords, tables, grad, spec, tables_grad=False)[1]
            _close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("staggered", [False, True])
def test_gradcheck_fp64(staggered):
    """torch.autograd.gradcheck of the autograd.Function (finite differences vs. the
    backward kernel) in float64, coordinates kept away from cell faces, where the
    interpolation is not differentiable."""
    spec = GridSpec(3, 2, 2, 5, 2, 3, staggered)  # res 2: 27 vertices, dense; res 3: 64 > 32, hashed
    assert spec.dense == (True, False)
    gen = torch.Generator().manual_seed(4)
    N, G = 4, 1
    # every coordinate in the middle of a cell of both levels: the faces (c / res: multiples of
    # 1/2 and 1/3; staggered, scales 1 and 2: 1/2, 1/4 and 3/4) all lie on multiples of 1/n,
    # n = 6 or 4, avoided by staying within 0.025 of the centre of such an interval
    n = 4 if staggered else 6
    assert spec.scales == pytest.approx((1, 2) if staggered else (2, 3))
    cell_mid = (torch.randint(0, n, (N, G, 3), generator=gen) + 0.5) / n
    coords = (cell_mid + 0.05 * (torch.rand(N, G, 3, generator=gen) - 0.5)).double()
    tables = torch.randn(G, spec.num_entries, 2, generator=gen, dtype=torch.float64)
    coords = coords.to(DEVICE).requires_grad_()
    tables = tables.to(DEVICE).requires_grad_()
    fn = lambda c, t: _triton(c, t, spec)
    # every coordinate derivative exactly, then both inputs through random projections
    # (fast_mode: a full Jacobian over the 128 table entries would take minutes here)
    assert torch.autograd.gradcheck(fn, (coords, tables.detach()), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(fn, (coords, tables), eps=1e-6, atol=1e-7, fast_mode=True)


def test_grid_lookup_dispatch():
    """backend='triton' through grid_lookup; 'auto' stays on the torch path for CPU tensors."""
    spec = GridSpec(2, 2, 2, 5, 2, 6)
    coords, tables, _ = _inputs(spec, 50, 1, torch.float64, seed=5)
    ref = grid_lookup_reference(coords, tables, spec)
    _close(grid_lookup(coords, tables, spec, backend="triton"), ref, atol=1e-12, rtol=1e-12)
    if DEVICE == "cpu":
        _close(grid_lookup(coords, tables, spec, backend="auto"), ref, atol=1e-12, rtol=1e-12)


def test_grids_the_kernels_cannot_run(micro, data16, tmp_path):
    """F not a power of 2 or D > 4: the kernels raise, --backend triton says so in one line before
    the work (train, and eval of such a checkpoint), and the paper's grid is one they run"""
    assert hg.triton_unfit(make_config("ffhq256").grid) is None
    assert hg.triton_unfit(GridSpec(5, 2, 2, 5, 2, 6)) and hg.triton_unfit(GridSpec(3, 2, 128, 5, 2, 6))
    spec = GridSpec(3, 2, 3, 5, 2, 6)
    coords, tables, _ = _inputs(spec, 20, 1, torch.float32, seed=5)
    with pytest.raises(ValueError, match="F a power of 2 up to 64, got D=3, F=3"):
        hg.grid_lookup_triton(coords, tables, spec)
    f3 = ["--preset", "micro", "--data", data16, "--max-iters", 1, "--set", '{"features": 3}']
    with pytest.raises(SystemExit, match="^error: the Triton kernels need .* F=3: use --backend torch"):
        run("train", *f3, "--out", tmp_path / "t", "--backend", "triton")
    assert not (tmp_path / "t" / "log.csv").exists()  # before the data and the log
    run("train", *f3, "--out", tmp_path / "c")
    with pytest.raises(SystemExit, match="^error: the Triton kernels need .* F=3"):
        run("eval", "--ckpt", tmp_path / "c" / "bright.pt", "--backend", "triton")


def _python(script, env_drop=("TRITON_INTERPRET",)):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a triton 3.9 warning
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for CPU-only machines")
def test_cpu_tensors_without_interpreter_give_a_clear_error():
    r = _python("""
        import torch
        from hashgrid_triton import GridSpec, grid_lookup
        spec = GridSpec(2, 2, 2, 5, 2, 6)
        try:
            grid_lookup(torch.rand(3, 1, 2), torch.zeros(1, spec.num_entries, 2), spec, "triton")
        except RuntimeError as e:
            print("ERROR:", e)
    """)
    assert "TRITON_INTERPRET=1" in r.stdout and "--backend torch" in r.stdout, r.stdout + r.stderr
    # the commands say so before anything else (here: before finding that the checkpoint is missing)
    r = _python("""
        import bright
        bright.main(["eval", "--backend", "triton", "--device", "cpu", "--ckpt", "missing.pt"])
    """)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: grid_lookup(backend='triton') got CPU tensors"), \
        r.stderr


# Compiles the kernels for Hopper (sm_90) at the shipped block size, D = 3, F = 4 and fp32,
# and reports the SASS instructions that matter. Runs without TRITON_INTERPRET (the
# interpreter replaces @triton.jit functions, which triton.compile cannot take).
_SASS_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
from collections import Counter
out = {}
try:
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    import triton.backends.nvidia  # noqa: F401  (the CUDA backend ships with the wheel)
except Exception as e:
    print(json.dumps({"skip": f"triton's CUDA backend is not available: {e!r}"})); sys.exit()
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
nvdisasm, cuobjdump = os.path.join(bindir, "nvdisasm"), os.path.join(bindir, "cuobjdump")
if not os.path.exists(nvdisasm):
    print(json.dumps({"skip": f"no nvdisasm in {bindir}"})); sys.exit()
import hashgrid_triton as hg
assert not hg._INTERPRETED

def compile_sass(kernel, pointers, constexprs):
    sig = {}
    for name in kernel.arg_names:
        sig[name] = "constexpr" if name in constexprs else pointers.get(name, "i32")
    # the JIT marks 16-byte aligned pointers (torch allocations) as such; do the same
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if sig[name].startswith("*")}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": hg.NUM_WARPS})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    regs = getattr(k, "n_regs", None)  # only filled in when loaded on a GPU
    if regs is None and os.path.exists(cuobjdump):
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
        regs = int(re.search(r"REG:(\d+)", usage).group(1))
    os.unlink(f.name)
    ops = [m.group(1) for m in re.finditer(
        r"/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)", sass)]
    memory = Counter(o for o in ops if o.startswith(("LDG", "STG", "RED", "ATOM", "MEMBAR",
                                                    "STL", "LDL", "FENCE", "ERRBAR")))
    return {"regs": regs, "ops": dict(memory)}

f32, i32 = "*fp32", "*i32"
meta = dict(res_ptr=i32, scale_ptr=f32, offset_ptr=i32, dense_ptr=i32)
bwd_ptrs = dict(coords_ptr=f32, tables_ptr=f32, grad_out_ptr=f32, grad_tables_ptr=f32,
                grad_coords_ptr=f32, **meta)
for staggered in (False, True):  # vertices at c / res (tiny preset), staggered (paper presets)
    common = dict(D=3, F=4, BLOCK=hg.BLOCK_POINTS, ACC=tl.float32, LEVELS_INNER=True, IDX64=False,
                  STAGGERED=staggered)
    tag = ", staggered" if staggered else ""
    out["forward" + tag] = compile_sass(hg._grid_fwd_kernel, dict(
        coords_ptr=f32, tables_ptr=f32, out_ptr=f32, **meta), common)
    for name, tg, cg in [("backward", True, True), ("backward_tables_only", True, False)]:
        out[name + tag] = compile_sass(hg._grid_bwd_kernel, bwd_ptrs, dict(
            common, TABLE_GRAD=tg, COORD_GRAD=cg, COORD_ATOMIC=hg.COORD_GRAD_ATOMIC))
out["triton"] = triton.__version__
out["block"] = hg.BLOCK_POINTS
print(json.dumps(out))
"""


def test_sass_for_hopper():
    """Reads the Hopper machine code: relaxed vector reductions for the table gradient (no
    memory barrier per add), one vector load per corner (not F scalar loads), no spills."""
    r = _python(_SASS_SCRIPT)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines, f"SASS script failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    res = json.loads(lines[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    print(f"\ntriton {res['triton']}, sm_90, D=3, F=4, fp32, BLOCK={res['block']}, "
          f"num_warps={hg.NUM_WARPS}")
    for name, k in res.items():
        if isinstance(k, dict):
            print(f"  {name}: {k['regs']} registers/thread, {k['ops']}")
    corners = 2 ** 3
    for name, k in res.items():
        if not isinstance(k, dict):
            continue
        ops = k["ops"]
        assert not any(o.startswith(("STL", "LDL")) for o in ops), f"{name} spills: {ops}"
        assert not any(o.startswith(("MEMBAR", "FENCE")) for o in ops), f"{name}: barrier {ops}"
        # gathers: F = 4 fp32 features per corner in one 128-bit load
        vec_loads = sum(v for o, v in ops.items() if o.startswith("LDG.E.128"))
        scalar_loads = sum(v for o, v in ops.items() if o == "LDG.E")
        assert scalar_loads <= 3 + 4, f"{name}: scalar loads beyond coords + metadata: {ops}"
        if "tables_only" not in name:
            assert vec_loads >= corners, f"{name}: corner gathers are not vector loads: {ops}"
        if name.startswith("backward"):
            # relaxed fp32 reductions (REDG...ADD.F32, vectorised as F32x4 where the
            # compiler can), no ATOMG (which returns a value) and no barrier (checked above)
            red = {o: v for o, v in ops.items() if o.startswith("REDG") and ".ADD" in o}
            assert sum(red.values()) >= corners, f"{name}: table scatter is not REDG.ADD: {ops}"
            assert not any(o.startswith("ATOM") for o in ops), f"{name}: {ops}"


@pytest.mark.slow
def test_training_with_triton_backend_matches_torch(micro, data16, tmp_path):
    # the same 3 steps through the interpreted Triton kernels and through the torch path:
    # identical batches and noise (seeded per step), so the runs differ only by float32
    # summation order in the lookup and its gradients. Measured: losses 1.6e-7 relative, the
    # tables 1.7e-7 and to_key 1.0e-7 apart after 3 steps (scale 1e-2 and 0.25). The tables
    # are what the table gradient trains and to_key the first layer the coordinate gradient
    # reaches; a wrong kernel moves them by Adam steps of ~lr = 2e-3. (Biases feeding a
    # GroupNorm get a gradient of pure rounding noise, which Adam's eps = 1e-15 turns into
    # full steps: those differ by ~1e-2 between any two summation orders, so they are left out.)
    run = {b: step_losses(["--data", data16, "--max-iters", 3, "--backend", b], tmp_path, b) for b in ("torch", "triton")}
    (lt, mt), (lk, mk) = run["torch"], run["triton"]
    assert len(lt) == 3 and lk == pytest.approx(lt, rel=1e-5)
    assert torch.allclose(mk.tables, mt.tables, atol=1e-6) and not torch.allclose(mt.tables, torch.zeros(1), atol=1e-3)
    assert torch.allclose(mk.to_key.weight, mt.to_key.weight, atol=1e-5)


def test_triton_lookup_takes_non_contiguous_inputs():
    """The kernels index coords as row * D + d and tables as rows of F: the autograd Function
    must make both contiguous first. Here coords come from a transposed (G, N, D) tensor and
    the tables from a (G, F, E) one, both views with other strides; output and both gradients
    must equal the reference's, in float64 to rounding (1e-12), as test_dense_and_hashed_levels_fp64.
    (A stride-blind read takes other points' coordinates and other entries' features.)"""
    spec = GridSpec(3, 1, 2, 6, 6, 6)                       # one hashed level: 7^3 vertices > 2^6
    assert spec.dense == (False,)
    gen = torch.Generator().manual_seed(0)
    N, G = 40, 2
    c_base = torch.rand(G, N, 3, generator=gen, dtype=torch.float64).to(DEVICE)
    t_base = torch.randn(G, spec.features, spec.num_entries, generator=gen, dtype=torch.float64).to(DEVICE)
    grad = torch.randn(N, G, spec.levels * spec.features, generator=gen, dtype=torch.float64).to(DEVICE)
    results = []
    for fn in (lambda c, t: hg.grid_lookup_triton(c, t, spec, block=BLOCK), lambda c, t: grid_lookup_reference(c, t, spec)):
        cb, tb = c_base.clone().requires_grad_(), t_base.clone().requires_grad_()
        c, t = cb.transpose(0, 1), tb.transpose(1, 2)       # (N, G, 3), (G, E, F): not contiguous
        assert not c.is_contiguous() and not t.is_contiguous()
        out = fn(c, t)
        out.backward(grad)
        results.append((out.detach(), cb.grad, tb.grad))
    for a, b in zip(*results):
        _close(a, b, atol=1e-12, rtol=1e-12)


def test_launch_grid_stays_within_cudas_limits():
    """CUDA grids allow 2^31 - 1 blocks on axis 0 but only 65535 on axes 1 and 2: with more than
    65535 point blocks the launch must put them on axis 0 (levels on axis 2). Checked on the
    launch arguments alone (an expanded tensor of 2^20 + 1 points takes no memory; nothing runs).
    (Without that switch a lookup of > 65535 * 128 = 8.4M points per launch fails on the GPU.)"""
    spec = GridSpec(3, 2, 2, 6, 2, 6)
    N, block = 65536 * 16 + 1, 16
    coords = torch.zeros(1, 1, 3, device=DEVICE).expand(N, 1, 3)
    tables = torch.zeros(1, spec.num_entries, spec.features, device=DEVICE)
    grid, _, common = hg._launch_args(coords, tables, spec, block)
    nblocks = -(-N // block)
    assert nblocks > 65535 and grid[1] <= 65535 and grid[2] <= 65535
    assert sorted(grid) == sorted((nblocks, 1, spec.levels))                # every program still launched
    assert common["LEVELS_INNER"] is False and grid[0] == nblocks          # the layout the kernel reads
    # a small N keeps the level-fastest order
    grid, _, common = hg._launch_args(coords[:100], tables, spec, block)
    assert common["LEVELS_INNER"] is hg.LEVELS_INNER and grid == ((spec.levels, 7, 1) if hg.LEVELS_INNER else (7, 1, spec.levels))


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_lookup_rejects_tables_with_another_feature_count(backend):
    """tables (G, E, F) with F other than the spec's: one ValueError, whatever the backend (the
    fast path would reshape them to rows of the spec's F and interpolate garbage, the reference
    would return L * F' features, the kernels read past each row)."""
    spec = GridSpec(3, 2, 2, 8, 2, 4)
    coords = torch.rand(5, 2, 3)
    with pytest.raises(ValueError, match="do not match the spec"):
        grid_lookup(coords, torch.randn(2, spec.num_entries, 4), spec, backend)


def test_benchmark_only_runs_the_configuration_named(monkeypatch, capsys):
    """python hashgrid_triton.py --only tiny times the 'tiny' configuration and not 'paper'
    (0.3 GB of tables and 16 images of inputs). What is timed does not matter here: the inputs are cut to
    one image and the lookup is a stub of the right shape, so the run takes milliseconds; the
    paper configuration's inputs must not even be built."""
    real = hg.benchmark_inputs
    built = []

    def one_image(images, side, G, spec, device):
        built.append(side)
        if side != 16:                                       # 'tiny' has a 16x16 feature map, 'paper' 64x64
            raise AssertionError(f"--only tiny built the inputs of a {side}x{side} configuration")
        return real(1, side, G, spec, device)

    def stub(c, t, spec, backend):                          # (N, G, L*F), differentiable in c and t
        return (c.sum() + t.sum()) * torch.zeros(c.shape[0], c.shape[1], spec.levels * spec.features)
    monkeypatch.setattr(hg, "benchmark_inputs", one_image)
    monkeypatch.setattr(hg, "grid_lookup", stub)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["hashgrid_triton.py", "--only", "tiny", "--repeats", "3"])
    hg._benchmark()
    out = capsys.readouterr().out
    assert built == [16] and "[tiny]" in out and "[paper]" not in out
    assert "reference" in out and "torch (fast path)" in out


# ----------------------------------------------------------------------------- diffusion over key codes

T = 1000


def small_unet(seed=0, **kw):
    """A small UNet whose output layer is re-initialised at random: a fresh UNet outputs exact
    zeros (zero-init last conv), which would make any sampler test trivially deterministic."""
    torch.manual_seed(seed)
    # 8x8x8 codes and two resolutions: quicker than the tiny preset's 16x16x4 and three
    cfg = diffusion.make_config("tiny", **{"z_channels": 8, "z_size": 8, "mults": (1, 2), **kw})
    m = diffusion.UNet(cfg)
    torch.nn.init.normal_(m.out[-1].weight, std=0.05)
    return m.eval(), cfg


# ----------------------------------------------------------------------------- schedule, forward process

def test_cosine_schedule():
    d = diffusion.Diffusion(T)
    a = d.abar64
    assert a.shape == (T + 1,) and a[0] == 1
    assert (a[1:] > 0).all() and (a[1:] < 1).all() and (a[1:] < a[:-1]).all()  # strictly decreasing in (0, 1)
    # the ends: t = 1 is nearly clean, t = T nearly pure noise (beta clipped at 0.999)
    assert a[1] > 0.9999 and a[T] < 1e-6
    beta = 1 - a[1:] / a[:-1]
    assert beta.max() <= 0.999 + 1e-12
    # away from the clipped end it is Nichol & Dhariwal's f(t) / f(0)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (1, 250, 500, 900):
        assert a[t].item() == pytest.approx(f(t) / f(0), rel=1e-9)


def test_q_sample_matches_closed_form():
    """DDPM eq. 4: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), checked on 40,000 draws.
    Tolerance: 5 standard errors of the estimates (mean: sigma/sqrt(n) <= 0.005; std:
    sigma/sqrt(2n) <= 0.0036), so a correct implementation fails with probability ~1e-6."""
    d, n = diffusion.Diffusion(T), 40_000
    torch.manual_seed(0)
    x0 = torch.linspace(-1, 1, 8).reshape(1, 2, 2, 2)
    for t in (1, 300, 700, T):
        xt = d.q_sample(x0.expand(n, -1, -1, -1), torch.full((n,), t), torch.randn(n, 2, 2, 2))
        a = d.abar64[t].item()
        assert torch.allclose(xt.mean(0), math.sqrt(a) * x0[0], atol=0.025)
        assert torch.allclose(xt.std(0), torch.full_like(x0[0], math.sqrt(1 - a)), atol=0.018)


def test_timestep_embedding_is_the_transformer_encoding():
    # Vaswani et al. 2017, section 3.5: sin(t / 10000^(2i/d)) then cos of the same arguments,
    # and distinct steps distinct vectors
    t = torch.tensor([1, 2, 500, 1000])
    e = diffusion.timestep_embedding(t, 8)
    for i in range(4):
        arg = t.double() / 10000 ** (2 * i / 8)
        assert torch.allclose(e[:, i].double(), arg.sin(), atol=1e-5)       # float32 args up to 1000
        assert torch.allclose(e[:, 4 + i].double(), arg.cos(), atol=1e-5)
    assert torch.cdist(e, e).add(torch.eye(4)).min() > 0.1


def test_min_snr_weighting():
    """With a model that predicts 0, each sample's error is mean(eps^2); the loss must weight it
    by min(SNR_t, 5) / SNR_t: 1 where SNR <= 5 (noisy t), 5 / SNR_t where the step is nearly clean."""
    d = diffusion.Diffusion(T)
    eps = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t: torch.zeros_like(x)
    for t in (1, 10, 200, 600, T):
        a = d.abar64[t].item()
        snr = a / (1 - a)
        got = d.loss(zero, torch.zeros(3, 2, 4, 4), 5.0, torch.full((3,), t), eps).item()
        want = min(snr, 5.0) / snr * eps.square().mean().item()
        assert got == pytest.approx(want, rel=1e-4), t   # a float32 mean over 96 values against float64
    snr_1 = d.abar64[1] / (1 - d.abar64[1])
    assert 5.0 / snr_1 < 1e-3                                     # so t = 1 counts < 1/1000 of a noisy step


# ----------------------------------------------------------------------------- samplers

def test_ddim_timesteps_cover_both_ends():
    d = diffusion.Diffusion(T)
    for steps in (1, 2, 10, 50, 999, T):
        ts = d.ddim_timesteps(steps)
        assert ts[0] == T and len(ts) == steps and all(a > b for a, b in zip(ts, ts[1:]))
        assert steps == 1 or ts[-1] == 1
    with pytest.raises(SystemExit, match="^error: --steps"):
        d.ddim_timesteps(T + 1)


def test_ddim_eta0_is_deterministic_for_a_seed():
    m, cfg = small_unet()
    d, shape = diffusion.Diffusion(T), (3, cfg.z_channels, 8, 8)
    run = lambda seed, eta=0.0: d.ddim_sample(m, shape, "cpu", 10, eta, torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # eta = 1 draws fresh noise at every step: a different result from the same x_T
    assert not torch.allclose(run(0, 1.0), a)
    # eq. 16 at eta = 1 and s = t - 1 is DDPM's posterior std sqrt(beta~_t), DDPM eq. 7
    for t in (2, 300, 999):
        ab, ab_prev = d.abar64[t].item(), d.abar64[t - 1].item()
        beta = 1 - ab / ab_prev
        assert d.ddim_sigma(ab, ab_prev, 1.0) == pytest.approx(math.sqrt((1 - ab_prev) / (1 - ab) * beta), rel=1e-12)
        assert d.ddim_sigma(ab, ab_prev, 0.0) == 0


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_moves_with_the_predicted_noise(eta):
    """DDIM eq. 12, written out: x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_theta(x_t)
    + sigma z, sigma from eq. 16 (z: the generator's next draws, after x_T),
    x0_hat clipped to [-1, 1] but eps_theta the model's own output (recomputing eps from the
    clipped x0_hat would carry the clipped-off part into x_s). The model here overshoots at
    t = T (clipped) and not later, so that the two readings give different samples.
    atol 1e-6: float32 tensors with float64 coefficients, the same operations in the same order
    up to how the products are grouped (values of size ~1: a few ulp)."""
    d = diffusion.Diffusion(T)
    model = lambda x, t: torch.full_like(x, 0.3) if t[0] == T else 0.5 * x
    x = d.ddim_sample(model, (4, 3, 4, 4), "cpu", 4, eta, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 3, 4, 4, generator=g)   # the sampler's x_T
    ts = d.ddim_timesteps(4)
    for t, s in zip(ts, ts[1:] + [0]):
        a, a_s = d.abar64[t].item(), d.abar64[s].item()
        eps = model(ref, torch.tensor([t]))
        x0 = ((ref - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        sigma = eta * math.sqrt((1 - a_s) / (1 - a)) * math.sqrt(1 - a / a_s)
        ref = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma ** 2) * eps
        if s > 0 and eta > 0:
            ref = ref + sigma * torch.randn(4, 3, 4, 4, generator=g)
    assert torch.allclose(x, ref, atol=1e-6)


def test_ddpm_step_written_out():
    """DDPM Algorithm 2 through the posterior of eq. 6-7, by hand, on a 4-step schedule: there
    beta~_t and beta_t (and sqrt(abar_{t-1}) and sqrt(abar_t)) differ by far more than rounding,
    which at T = 1000 they barely do, so a wrong variance or mean coefficient shows. The model
    overshoots at t = 4 (clipped x0_hat). Same generator draws as the sampler; atol as above."""
    d = diffusion.Diffusion(4)
    model = lambda x, t: torch.full_like(x, 0.9) if t[0] == 4 else 0.5 * x
    x = d.ddpm_sample(model, (3, 2, 4, 4), "cpu", torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 2, 4, 4, generator=g)
    for t in range(4, 0, -1):
        a, a_prev = d.abar64[t].item(), d.abar64[t - 1].item()
        beta = 1 - a / a_prev
        x0 = ((ref - math.sqrt(1 - a) * model(ref, torch.tensor([t]))) / math.sqrt(a)).clamp(-1, 1)
        ref = (math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * ref)  # eq. 7
        if t > 1:
            ref = ref + math.sqrt((1 - a_prev) / (1 - a) * beta) * torch.randn(3, 2, 4, 4, generator=g)
    assert torch.allclose(x, ref, atol=1e-6)


def oracle(d, x0):
    """eps_theta that returns the noise actually in x_t: eq. 4 solved for eps, given the true x0"""
    def f(x, t):
        a = d.abar64[t].view(-1, 1, 1, 1).float()
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    return f


@pytest.mark.parametrize("sampler", ["ddim10", "ddim50", "ddpm"])
def test_samplers_recover_x0_with_the_true_noise(sampler):
    """With the oracle every x0_hat equals x0, so DDIM's last step (abar_0 = 1) and DDPM's last
    posterior mean (beta_1 = 1 - abar_1) both return x0. Tolerance 1e-4: float32 rounding, which
    the division by sqrt(abar_T) ~ 3e-5 at the first step amplifies, then the clip and later steps shrink."""
    d = diffusion.Diffusion(T)
    x0 = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9
    g = torch.Generator().manual_seed(2)
    if sampler == "ddpm":
        x = d.ddpm_sample(oracle(d, x0), x0.shape, "cpu", g)
    else:
        x = d.ddim_sample(oracle(d, x0), x0.shape, "cpu", int(sampler[4:]), 0.0, g)
    assert (x - x0).abs().max() < 1e-4


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_reproduce_gaussian_data(sampler):
    """Data x0 ~ N(mu, s^2) per element: the optimal eps-prediction is known in closed form,
    eps* = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), so the samplers alone decide
    whether the samples have the data's mean and spread. 16,384 values: the standard error of the
    mean is s/128 = 0.0016 (tolerance 0.01, 6 SE), of the std 0.55% (tolerance 3%, 5 SE). DDIM runs
    all 1000 steps here: with few steps it under-disperses (std 0.188 at 50 steps, 0.139 at 10),
    a discretisation error of the method, not of the code."""
    mu, s, d = 0.3, 0.2, diffusion.Diffusion(T)

    def eps_star(x, t):
        a = d.abar64[t].view(-1, 1, 1, 1).float()
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)
    g = torch.Generator().manual_seed(0)
    shape = (1024, 1, 4, 4)
    x = d.ddpm_sample(eps_star, shape, "cpu", g) if sampler == "ddpm" else d.ddim_sample(eps_star, shape, "cpu", T, 0.0, g)
    assert abs(x.mean().item() - mu) < 0.01
    assert x.std().item() == pytest.approx(s, rel=0.03)


# ----------------------------------------------------------------------------- the UNet

@pytest.mark.parametrize("z_size,mults", [(4, (1, 2)), (8, (1, 2)), (8, (1, 2, 2)), (16, (1, 2, 2, 4)), (6, (1, 2))])
def test_unet_any_size_divisible_by_its_downsampling(z_size, mults):
    m, cfg = small_unet(z_size=z_size, z_channels=3, mults=mults, attn_lowest=2)
    x = torch.randn(2, 3, z_size, z_size)
    assert m(x, torch.tensor([1, T])).shape == x.shape
    assert not any("abar" in k or "alpha" in k for k in m.state_dict())  # the schedule is not a weight


def test_unet_attention_heads_divide_their_channels():
    # width 50: 100 channels at mult 2, where 100 // 32 = 3 heads would not split them evenly
    m, cfg = small_unet(width=50, attn_lowest=2)
    heads = {mod.heads: mod.qkv.in_channels for mod in m.modules() if isinstance(mod, diffusion.Attention)}
    assert heads == {1: 50, 2: 100}
    x = torch.randn(2, 8, 8, 8)
    assert m(x, torch.tensor([1, T])).shape == x.shape


def test_unet_rejects_codes_it_cannot_halve():
    with pytest.raises(SystemExit, match=r"^error: key codes of size 6 cannot be halved 2 times"):
        diffusion.make_config("tiny", z_size=6, mults=(1, 2, 2))


def test_presets():
    big = diffusion.make_config("bright16")
    assert (big.width, big.mults, big.attn_lowest, big.z_size, big.z_channels) == (128, (1, 2, 2, 4), 2, 16, 16)
    assert big.timesteps == 1000 and big.min_snr_gamma == 5.0
    with pytest.raises(SystemExit, match="^error: unknown preset"):
        diffusion.make_config("huge")


def test_unet_overfits_a_handful_of_codes():
    """Four fixed 8x8x8 codes, 150 Adam steps. The loss is measured on a fixed set of (code, t,
    noise) triples before and after; it must fall 8x (it falls ~18x here). Predictions blind to
    the codes get ~3x at best (eps_hat = x_t: 0.87 -> 0.27; the Gaussian-optimal one given the
    codes' mean and variance: 0.27), so 8x needs the UNet to have learnt the codes."""
    torch.manual_seed(0)
    cfg = diffusion.make_config("tiny", z_channels=8, z_size=8, mults=(1, 2))
    m, d = diffusion.UNet(cfg), diffusion.Diffusion(T)
    x0 = torch.rand(4, 8, 8, 8).round() * 1.2 - 0.6 + 0.2 * torch.rand(4, 8, 8, 8)    # codes in [-0.6, 0.8]
    g = torch.Generator().manual_seed(1)
    xe = x0.repeat(16, 1, 1, 1)
    te = torch.randint(1, T + 1, (64,), generator=g)
    ee = torch.randn(xe.shape, generator=g)
    evaluate = lambda: d.loss(m, xe, 5.0, te, ee).item()
    before = evaluate()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    for _ in range(150):
        loss = d.loss(m, x0.repeat(8, 1, 1, 1))
        opt.zero_grad(); loss.backward(); opt.step()
    after = evaluate()
    assert after < before / 8, (before, after)


# ----------------------------------------------------------------------------- end to end, with a real tiny BRIGHT

def bright_run(*argv):
    bright.main([str(a) for a in argv] + ["--device", "cpu"])


def diff_run(*argv):
    """the command line, on the CPU (deterministic, and tensors comparable with the CPU models here)"""
    diffusion.main([str(a) for a in argv] + ["--device", "cpu"])


def write_shapes(folder, n, size=64, start=0):
    """n images: a coloured rectangle on a coloured background"""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        im = np.broadcast_to(rng.integers(0, 255, 3, dtype=np.uint8), (size, size, 3)).copy()
        x, y = rng.integers(0, size // 2, 2)
        im[y:y + size // 3, x:x + size // 3] = rng.integers(0, 255, 3)
        Image.fromarray(im).save(os.path.join(folder, f"{i:03d}.png"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 12 + 4 image folder and two BRIGHT checkpoints of one training step: the tiny preset
    with 8x8x8 key codes (a smaller DDPM than 16x16x4, so quicker tests) and one with 4-channel
    codes, for the shape-mismatch errors."""
    root = tmp_path_factory.mktemp("diff")
    data = root / "data"
    write_shapes(data / "train", 12)
    write_shapes(data / "val", 4, start=50)
    z8 = '"z_size": 8, "enc_widths": [16, 32, 64, 128]'
    bright_run("train", "--data", data, "--out", root / "b8", "--max-iters", 1, "--log-every", 1,
               "--set", '{"z_channels": 8, %s}' % z8)
    bright_run("train", "--data", data, "--out", root / "b4", "--max-iters", 1, "--log-every", 1,
               "--set", '{"z_channels": 4, %s}' % z8)
    return root, data, root / "b8" / "bright.pt", root / "b4" / "bright.pt"


def train_args(world, out, iters, *more):
    root, data, b8, _ = world
    return ["train", "--bright-ckpt", b8, "--data", data, "--out", out, "--max-iters", iters,
            "--batch-size", 4, "--log-every", 1, *more]


def ddpm_losses(world, out, iters, *more):
    """train a DDPM in this process; -> its per-step losses"""
    got = []
    diffusion.train(diffusion.parser().parse_args([str(a) for a in train_args(world, out, iters, *more)]),
                    on_step=lambda step, model, loss: got.append(loss))
    return got


def test_train_sample_decode(world, tmp_path, capsys):
    root, data, b8, _ = world
    diff_run(*train_args(world, tmp_path, 2))
    out = capsys.readouterr().out
    assert "iter      2/2 | loss" in out and "it/s" in out and "eta" in out and "done: step 2" in out
    diff_run("sample", "--ckpt", tmp_path / "ddpm.pt", "--n", 5, "--steps", 3, "--out", tmp_path / "s.png", "--save-codes")
    assert Image.open(tmp_path / "s.png").size == (3 * 66 + 2, 2 * 66 + 2)     # 5 images of 64^2, 3 a row
    codes = torch.load(tmp_path / "s.pt", weights_only=True)["codes"]
    assert codes.shape == (5, 8, 8, 8) and codes.min() >= 0 and codes.max() <= 1
    # the same through the functions: images of the BRIGHT model's size, in [0, 1]
    model, cfg, _ = diffusion.load_ddpm(str(tmp_path / "ddpm.pt"), "cpu")
    b, _, _ = bright.load_checkpoint(str(b8))
    z = diffusion.generate(model, cfg, 3, "cpu", "ddim", steps=4, seed=0)
    img = diffusion.decode_all(b, z, "cpu")
    assert img.shape == (3, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
    diff_run("neighbors", "--ckpt", tmp_path / "ddpm.pt", "--n", 2, "--k", 2, "--n-stats", 4, "--steps", 2,
             "--out", tmp_path / "nb.png")
    out = capsys.readouterr().out
    assert Image.open(tmp_path / "nb.png").size == (6 * 66 + 2, 2 * 66 + 2)    # sample, 2 + blank + 2 a row
    assert "held-out" in out and "memorisation" in out


def test_checkpoint_round_trip_and_exact_resume(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    diff_run(*train_args(world, a, 4))
    diff_run(*train_args(world, b, 2))
    seconds = torch.load(b / "ddpm.pt", weights_only=True)["seconds"]
    with open(b / "ddpm_log.csv", "a") as f:  # as if killed at step 4 after the checkpoint of step 2
        f.write("3,0.1,9.9\n4,0.1")
    diff_run(*train_args(world, b, 4, "--resume"))
    # ddpm_log.csv, as BRIGHT's log.csv: steps 3 and 4 once, from the resumed run
    log = lambda run: bright.read_log(run, "ddpm_log.csv", diffusion.LOG_COLUMNS)
    assert log(a)["iteration"] == log(b)["iteration"] == [1, 2, 3, 4]
    assert log(a)["loss"] == log(b)["loss"] and 0.1 not in log(b)["loss"]
    assert log(b)["seconds"][-1] == pytest.approx(torch.load(b / "ddpm.pt", weights_only=True)["seconds"], abs=0.5)
    ca, cb = (torch.load(p / "ddpm.pt", weights_only=True) for p in (a, b))
    assert set(ca) == {"kind", "model", "ema", "optimizer", "step", "seconds", "config", "bright_ckpt", "bright_config",
                       "data", "bright_fingerprint", "codes", "codes_count", "codes_probe"}
    assert cb["seconds"] > seconds > 0                # training time adds up over resumes
    assert ca["bright_fingerprint"] == bright.fingerprint(torch.load(world[2], weights_only=True)["ema"])
    assert ca["kind"] == "ddpm" and ca["step"] == cb["step"] == 4 and ca["config"] == cb["config"]
    assert ca["bright_ckpt"] == str(world[2]) and ca["bright_config"]["z_channels"] == 8
    for k in ("model", "ema"):                        # batches, t and noise depend on the step alone
        for n in ca[k]:
            assert torch.equal(ca[k][n], cb[k][n]), (k, n)
    m, cfg, _ = diffusion.load_ddpm(str(a / "ddpm.pt"), "cpu")
    assert cfg == diffusion.DiffusionConfig(**ca["config"]) and not m.training
    assert all(torch.equal(v, ca["ema"][k]) for k, v in m.state_dict().items())
    with pytest.raises(SystemExit, match="^error: .*exists: pass --resume"):
        diff_run(*train_args(world, a, 4))


def test_diffusion_stops_when_it_diverges(world, tmp_path):
    # as bright.py: a non-finite loss or weight is one line, and ddpm.pt keeps the step before
    with pytest.raises(SystemExit, match=r"^error: training diverged at step (\d+)") as e:
        diff_run(*train_args(world, tmp_path, 50, "--lr", 1e30, "--set", '{"save_every": 1, "warmup": 0}'))
    bad = int(re.search(r"step (\d+)", str(e.value)).group(1))
    c = torch.load(tmp_path / "ddpm.pt", weights_only=True)
    assert c["step"] == bad - 1 and all(v.isfinite().all() for k in ("model", "ema") for v in c[k].values())


def test_diffusion_keeps_an_ema_of_the_weights(world, tmp_path):
    states = []
    diffusion.train(diffusion.parser().parse_args([str(a) for a in train_args(world, tmp_path, 3)] + ["--device", "cpu"]),
                    on_step=record_states(states))
    ck = torch.load(tmp_path / "ddpm.pt", weights_only=True)
    cfg = diffusion.DiffusionConfig(**ck["config"])
    torch.manual_seed(cfg.seed)
    check_ema(ck["ema"], diffusion.UNet(cfg).state_dict(), states, cfg.ema_decay)


def test_diffusion_clips_the_gradient_norm(world, tmp_path):
    # a clip far below the gradient norm rescales every step's gradient, which changes Adam's
    # steps from the second on (its moments mix differently scaled gradients); 10 steps
    # without warm-up, so that they show in the losses
    def losses(out, clip):
        return ddpm_losses(world, out, 10, "--device", "cpu", "--set", json.dumps({"grad_clip": clip, "warmup": 0}))
    free, tight = losses(tmp_path / "a", 1e9), losses(tmp_path / "b", 1e-6)
    assert tight[0] == free[0] and max(abs(a / b - 1) for a, b in zip(tight, free)) > 1e-2   # measured: 4.6%


def test_resume_and_sampling_check_which_codes_and_bright(world, tmp_path, capsys):
    root, data, b8, _ = world
    codes = tmp_path / "codes.pt"
    bright_run("encode", "--ckpt", b8, "--data", data, "--out", codes)
    assert torch.load(codes, weights_only=True)["bright_fingerprint"] == bright.fingerprint(
        torch.load(b8, weights_only=True)["ema"])
    # another BRIGHT model with the same config: b8's weights, the key-code layer's bias changed
    other = torch.load(b8, weights_only=True)
    other["ema"]["to_key.bias"] += 1
    torch.save(other, tmp_path / "other.pt")
    run = tmp_path / "r"
    diff_run("train", "--codes", codes, "--out", run, "--max-iters", 1, "--batch-size", 4)
    # resumed without --codes, the run takes its own codes file again (not b8's images re-encoded)
    capsys.readouterr()
    diff_run("train", "--out", run, "--max-iters", 2, "--resume")
    assert "encoded" not in capsys.readouterr().out
    # the same codes in a file without a fingerprint (an older encode), or in half precision: accepted
    old = torch.load(codes, weights_only=True)
    del old["bright_fingerprint"]
    torch.save(old, tmp_path / "old_codes.pt")
    torch.save({**old, "codes": old["codes"].half()}, tmp_path / "half_codes.pt")
    diff_run("train", "--codes", tmp_path / "old_codes.pt", "--out", run, "--max-iters", 3, "--resume")
    diff_run("train", "--codes", tmp_path / "old_codes.pt", "--bright-ckpt", b8, "--out", run, "--max-iters", 4, "--resume")
    diff_run("train", "--codes", tmp_path / "half_codes.pt", "--out", run, "--max-iters", 5, "--resume")
    with pytest.raises(SystemExit, match="^error: .*key codes of another BRIGHT model than"):
        diff_run("train", "--codes", codes, "--bright-ckpt", tmp_path / "other.pt", "--out", tmp_path / "x")
    with pytest.raises(SystemExit, match="^error: .* key codes of another BRIGHT model than"):
        diff_run("train", "--bright-ckpt", tmp_path / "other.pt", "--data", data, "--out", run, "--resume",
                 "--max-iters", 6)
    write_shapes(tmp_path / "d2", 12, start=100)  # other images, same BRIGHT model
    with pytest.raises(SystemExit, match="^error: the training key codes .* are not those"):
        diff_run("train", "--bright-ckpt", b8, "--data", tmp_path / "d2", "--out", run, "--resume", "--max-iters", 6)
    # sampling through a BRIGHT model with other weights than the one that made the codes: a warning
    diff_run("sample", "--ckpt", run / "ddpm.pt", "--n", 1, "--steps", 2, "--out", tmp_path / "s.png")
    assert "warning" not in capsys.readouterr().out
    diff_run("sample", "--ckpt", run / "ddpm.pt", "--bright-ckpt", tmp_path / "other.pt", "--n", 1, "--steps", 2,
             "--out", tmp_path / "s.png")
    assert "warning: " in capsys.readouterr().out


@pytest.mark.slow
def test_diffusion_ddp_and_grad_accum(world, tmp_path):
    # as for bright.py: 2 processes, or 2 micro-batches, give the steps of one batch of 4, up to
    # float32 summation order (1e-4 relative over 3 steps, as elsewhere)
    def single(out, *more):
        losses = []
        model = diffusion.train(diffusion.parser().parse_args([str(a) for a in train_args(world, out, 3, *more)]),
                                on_step=lambda step, model, loss: losses.append(loss))
        single.grad = model.inp.weight.grad.clone()  # the last step's gradient, the micro-batches' mean
        return losses
    whole, g_whole = single(tmp_path / "one"), single.grad
    assert single(tmp_path / "accum", "--grad-accum", 2) == pytest.approx(whole, rel=1e-4)
    assert (single.grad - g_whole).norm() < 1e-4 * g_whole.norm()  # not 2x: loss / grad_accum
    r0, _ = torchrun_two(tmp_path, "diffusion", [*train_args(world, tmp_path / "ddp", 3), "--device", "cpu"])
    assert [l for _, l, _ in r0] == pytest.approx(whole, rel=1e-4)
    assert torch.load(tmp_path / "ddp" / "ddpm.pt", weights_only=True)["step"] == 3
    log = (tmp_path / "ddp" / "ddpm_log.csv").read_text().splitlines()  # rank 0's alone
    assert log[0] == "iteration,loss,seconds" and [l.split(",")[0] for l in log[1:]] == ["1", "2", "3"]
    # with dropout, each micro-batch slot (process x micro-batch) has its own mask seed: the two
    # processes draw the masks of one process's two micro-batches (not the same masks twice)
    # (30 steps without warm-up: the zero-initialised conv after each dropout makes it matter
    # only once trained)
    drop = ("--set", '{"dropout": 0.1, "warmup": 0}', "--max-iters", 30)
    accum = single(tmp_path / "accum_drop", "--grad-accum", 2, *drop)
    (tmp_path / "drop").mkdir()
    r0, _ = torchrun_two(tmp_path / "drop", "diffusion", [*train_args(world, tmp_path / "ddp_drop", 3, *drop),
                                                          "--device", "cpu"])
    plain = single(tmp_path / "plain", "--set", '{"warmup": 0}', "--max-iters", 30)
    # measured: the two agree to ~1e-7 relative; dropout itself moves the losses by ~1e-3
    assert [l for _, l, _ in r0] == pytest.approx(accum, rel=1e-5)
    assert max(abs(a / b - 1) for a, b in zip(accum, plain)) > 5e-4


@pytest.mark.slow
def test_diffusion_compile_trains_as_eager(world, tmp_path, fresh_dynamo):
    # as for bright.py: torch.compile of the UNet takes the eager steps (measured: equal
    # losses; 1e-6 relative leaves room for float32 rounding of fused kernels) and saves the
    # eager model's keys, which sample loads
    small = ["--set", '{"width": 16, "mults": [1, 2]}']  # a smaller graph compiles sooner
    eager = ddpm_losses(world, tmp_path / "eager", 3, *small)
    assert compiled_graphs() == 0
    compiled = ddpm_losses(world, tmp_path / "compiled", 3, *small, "--compile")
    assert compiled_graphs() >= 1
    assert len(compiled) == 3 and compiled == pytest.approx(eager, rel=1e-6)
    ce = torch.load(tmp_path / "eager" / "ddpm.pt", weights_only=True)
    cc = torch.load(tmp_path / "compiled" / "ddpm.pt", weights_only=True)
    assert ce["model"].keys() == cc["model"].keys() and ce["ema"].keys() == cc["ema"].keys()
    diff_run("sample", "--ckpt", tmp_path / "compiled" / "ddpm.pt", "--n", 2, "--steps", 2,
             "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").exists()


def test_train_from_a_codes_file(world, tmp_path):
    root, data, b8, _ = world
    bright_run("encode", "--ckpt", b8, "--data", data, "--out", tmp_path / "codes.pt")
    diff_run("train", "--codes", tmp_path / "codes.pt", "--out", tmp_path, "--max-iters", 1, "--batch-size", 2,
             "--set", '{"width": 16, "mults": [1, 2], "lr": 0.01, "z_size": 8}', "--lr", 0.002)
    c = torch.load(tmp_path / "ddpm.pt", weights_only=True)
    assert c["bright_ckpt"] == str(b8) and (c["config"]["z_channels"], c["config"]["z_size"]) == (8, 8)
    # --set reaches the config and a flag wins over it (the codes fix the shape: another is an error)
    assert (c["config"]["width"], c["config"]["mults"], c["config"]["lr"]) == (16, (1, 2), 0.002)
    # codes a user saved in another float dtype (numpy's float64, say) train as float32
    for dtype in (torch.float64, torch.float16):
        d = torch.load(tmp_path / "codes.pt", weights_only=True)
        torch.save({**d, "codes": d["codes"].to(dtype)}, tmp_path / "other.pt")
        diff_run("train", "--codes", tmp_path / "other.pt", "--out", tmp_path / str(dtype), "--max-iters", 1,
                 "--batch-size", 2, "--set", '{"width": 16, "mults": [1, 2]}')
        assert os.path.isfile(tmp_path / str(dtype) / "ddpm.pt")


def test_files_name_each_other_by_absolute_paths(world, tmp_path, monkeypatch, capsys):
    """codes.pt and ddpm.pt record where their BRIGHT model, codes and images are as absolute
    paths, so that commands work from any folder; what is gone since gets a line naming the flag;
    neighbors searches the images whose codes the DDPM learnt, not BRIGHT's training set"""
    root, data, b8, _ = world
    other = tmp_path / "other"                         # 6 training images BRIGHT never saw
    write_shapes(other / "train", 6, start=200)
    write_shapes(other / "val", 2, start=300)
    monkeypatch.chdir(tmp_path)                        # relative names from here on
    bright_run("encode", "--ckpt", b8, "--data", "other", "--out", "codes.pt")
    c = torch.load("codes.pt", weights_only=True)
    assert (c["bright_ckpt"], c["data"]) == (str(b8), str(other))
    diff_run("train", "--codes", "codes.pt", "--out", "run", "--max-iters", 1, "--batch-size", 2,
             "--set", '{"timesteps": 20}')
    d = torch.load("run/ddpm.pt", weights_only=True)
    assert (d["codes"], d["data"], d["bright_ckpt"]) == (str(tmp_path / "codes.pt"), str(other), str(b8))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    diff_run("neighbors", "--ckpt", tmp_path / "run" / "ddpm.pt", "--n", 1, "--k", 1, "--n-stats", 2,
             "--out", "nb.png")
    assert "nearest of 6 training images" in capsys.readouterr().out
    # no --steps: 50, or T when the model has fewer steps (20 here)
    diff_run("sample", "--ckpt", tmp_path / "run" / "ddpm.pt", "--n", 1, "--out", "s.png")
    assert "DDIM, 20 steps" in capsys.readouterr().out and os.path.isfile("s.png")
    os.rename(tmp_path / "codes.pt", tmp_path / "moved.pt")
    with pytest.raises(SystemExit, match=r"^error: .*codes.pt', which .*ddpm.pt records as its codes, is gone: "
                                         r"pass --codes, or --data and --bright-ckpt"):
        diff_run("train", "--out", tmp_path / "run", "--resume", "--max-iters", 2)
    # BRIGHT trained on since: other weights, the same architecture -> the weights warning, not
    # the config one (max_iters is the one field that changed)
    shutil.copytree(b8.parent, tmp_path / "b")
    diff_run("train", "--bright-ckpt", tmp_path / "b" / "bright.pt", "--data", os.path.relpath(data),
             "--out", tmp_path / "run2", "--max-iters", 1, "--batch-size", 2, "--set", '{"timesteps": 20}')
    assert torch.load(tmp_path / "run2" / "ddpm.pt", weights_only=True)["data"] == str(data)  # absolute
    bright_run("train", "--out", tmp_path / "b", "--resume", "--max-iters", 2, "--data", os.path.relpath(data))
    assert torch.load(tmp_path / "b" / "bright.pt", weights_only=True)["data"] == str(data)  # absolute
    capsys.readouterr()
    diff_run("sample", "--ckpt", tmp_path / "run2" / "ddpm.pt", "--n", 1, "--out", "s.png")
    out = capsys.readouterr().out
    assert "has other weights than the BRIGHT model" in out and "another config" not in out
    # codes of the built-in data (recorded as such, not as a path): the DDPM records the same,
    # not data/shapes under the folder it was trained from
    c = torch.load(tmp_path / "moved.pt", weights_only=True)
    torch.save({**c, "data": bright.BUILTIN_DATA}, tmp_path / "builtin.pt")
    diff_run("train", "--codes", tmp_path / "builtin.pt", "--out", tmp_path / "run3", "--max-iters", 1,
             "--batch-size", 2, "--set", '{"timesteps": 20}')
    assert torch.load(tmp_path / "run3" / "ddpm.pt", weights_only=True)["data"] == bright.BUILTIN_DATA


def test_bad_inputs(world, tmp_path, capsys):
    root, data, b8, b4 = world
    ok = tmp_path / "ok"
    diff_run(*train_args(world, ok, 1))
    afile, folder_png = tmp_path / "afile", tmp_path / "folder.png"
    afile.write_text("a file where a folder is needed")
    folder_png.mkdir()
    log_folder = tmp_path / "in_log" / "ddpm_log.csv"
    log_folder.mkdir(parents=True)

    def codes_file(name, codes, kind="bright-codes"):
        torch.save({"kind": kind, "codes": codes, "val_codes": codes, "bright_ckpt": str(b8), "config": {}}, tmp_path / name)
        return tmp_path / name
    cases = [
        (["train", "--bright-ckpt", tmp_path / "missing.pt", "--out", tmp_path / "x"], "not found"),
        (["train", "--bright-ckpt", ok / "ddpm.pt", "--data", data, "--out", tmp_path / "x"], "not a bright file"),
        (["train", "--codes", codes_file("empty.pt", torch.zeros(0, 8, 8, 8)), "--out", tmp_path / "x"], "holds no key codes"),
        (["train", "--codes", codes_file("kind.pt", torch.rand(4, 8, 8, 8), "ddpm"), "--out", tmp_path / "x"], "not a bright-codes file"),
        (["train", "--codes", codes_file("range.pt", torch.rand(4, 8, 8, 8) * 3), "--out", tmp_path / "x"], r"must lie in \[0, 1\]"),
        (["train", "--codes", codes_file("odd.pt", torch.rand(4, 8, 5, 5)), "--out", tmp_path / "x"], "cannot be halved"),
        (["train", "--codes", codes_file("c4.pt", torch.rand(4, 4, 8, 8)), "--out", ok, "--resume", "--max-iters", 2],
         r"key codes are \(4, 8, 8\) .* expects \(8, 8, 8\)"),
        (["train", "--codes", tmp_path / "range.pt", "--data", data], "not both"),
        ([*train_args(world, tmp_path / "x", 1), "--set", '{"widht": 8}'], "unknown config field.*widht"),
        ([*train_args(world, ok, 1), "--resume", "--set", '{"lr": 0.1}'], "keeps its checkpoint's config"),
        ([*train_args(world, ok, 1), "--resume", "--lr", 0.5], r"other settings \(asked: lr 0.5, it has "),
        ([*train_args(world, tmp_path / "x", 1), "--set", '[8]'], "--set takes a JSON object"),
        ([*train_args(world, tmp_path / "x", 1), "--set", '{"width": }'], "--set is not valid JSON"),
        ([*train_args(world, data, 1)], "--out .* is the data folder"),
        (["sample", "--ckpt", tmp_path / "missing.pt"], "not found"),
        (["sample", "--ckpt", b8], "not a ddpm file"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--bright-ckpt", b4, "--out", tmp_path / "s.png"], "makes 4x8x8 key codes"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--steps", 0, "--out", tmp_path / "s.png"], "--steps must be"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--eta", -1, "--out", tmp_path / "s.png"], r"--eta must be in \[0, 1\]"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--sampler", "ddpm", "--steps", 10, "--out", tmp_path / "s.png"],
         "--steps and --eta are DDIM's"),
        (["neighbors", "--ckpt", ok / "ddpm.pt", "--k", 0], "--k must be at least 1"),
        (["neighbors", "--ckpt", ok / "ddpm.pt", "--n-stats", 0], "--n-stats must be at least 1, got 0"),
        ([*train_args(world, tmp_path / "x", 1), "--batch-size", 0], "batch_size must be > 0, got 0"),
        ([*train_args(world, tmp_path / "x", 1), "--lr", -1], "lr must be > 0, got -1"),
        ([*train_args(world, tmp_path / "x", 1), "--set", '{"timesteps": 0}'], "timesteps must be > 0"),
        ([*train_args(world, tmp_path / "x", 1), "--set", '{"dropout": 2}'], r"dropout must be in \[0, 1\)"),
        ([*train_args(world, tmp_path / "x", 1), "--set", '{"save_every": "5"}'], "save_every must be an integer"),
        ([*train_args(world, tmp_path / "x", 1), "--set", '{"z_size": 16}'], "the key codes have z_size 8"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--out", tmp_path / "s"], "needs an image file extension"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--out", ok / "ddpm.png", "--save-codes"],
         "is not a ddpm-samples file but a ddpm one"),
        ([*train_args(world, tmp_path / "x", 0)], "--max-iters must be at least 1"),
        ([*train_args(world, tmp_path / "x", 1), "--log-every", 0], "--log-every must be at least 1"),
        ([*train_args(world, ok, 1), "--resume"], "nothing to train: .* is at step 1"),
        ([*train_args(world, ok, 2), "--resume", "--preset", "bright16"], r"other settings \(asked: width 128, it has 32; .* more\)"),
        ([*train_args(world, tmp_path / "x", 1), "--set", '{"mults": []}'], r"mults must list at least one resolution"),
        ([*train_args(world, tmp_path / "x", 1), "--set", '{"mults": [1, 0]}'], r"mults must be a list of positive integers"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--steps", 1001, "--out", tmp_path / "s.png"], r"1..1000 \(the model's T\)"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--seed", 2 ** 32, "--out", tmp_path / "s.png"], r"--seed must be in"),
        # output paths: checked before the work, not at its end (or at the first checkpoint)
        ([*train_args(world, afile, 1)], "--out .*afile.*: cannot make that folder"),
        ([*train_args(world, log_folder.parent, 1)], "holds a folder named ddpm_log.csv"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--out", afile / "s.png"], "cannot make that folder"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--out", tmp_path / "s.pgm"], "needs an image file extension"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--out", ok], "needs an image file extension"),
        (["sample", "--ckpt", ok / "ddpm.pt", "--out", folder_png], "is a folder: name a file in it"),
        (["sample", "--ckpt", ok], "is a folder: name the checkpoint file in it"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit, match="^error: .*" + msg):
            diff_run(*argv)
    assert not (tmp_path / "s.png").exists()
    # a flag, a config or a BRIGHT model the run refuses is refused before it encodes the images
    # (hours for FFHQ): new runs and resumed ones
    for argv, msg in [((*train_args(world, ok, 2), "--resume", "--lr", 0.5), "other settings"),
                      ((*train_args(world, ok, 2), "--resume", "--bright-ckpt", b4),
                       "makes 4x8x8 key codes, but the diffusion model was trained on 8x8x8"),
                      ((*train_args(world, tmp_path / "x", 1), "--set", '{"width": 33}'), "width must be even"),
                      ((*train_args(world, tmp_path / "x", 1), "--set", '{"z_channels": 4}'), "have z_channels 8"),
                      ((*train_args(world, tmp_path / "x", 1), "--batch-size", 3, "--grad-accum", 2), "multiple of")]:
        capsys.readouterr()
        with pytest.raises(SystemExit, match=msg):
            diff_run(*argv)
        assert "encoded" not in capsys.readouterr().out


def test_command_line_error_is_one_line(tmp_path):
    """Through the real entry point: exit status 1 and a single 'error: ...' line, no traceback."""
    r = subprocess.run([sys.executable, "diffusion.py", "sample", "--ckpt", str(tmp_path / "none.pt")],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(diffusion.__file__)))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {str(tmp_path / 'none.pt')!r} not found "
                                                                   "(train one first: python diffusion.py train)"]


def test_diffusion_trains_on_codes_in_minus_one_one_with_fresh_draws_each_step(world, tmp_path, monkeypatch):
    """every x0 the loss sees is 2 z - 1 for a key code z of the training set; each step
    draws its own batch, t and noise; AdamW without weight decay. (Fails with: x0 = z, the
    [0, 1] codes themselves; the step seed replaced by the run seed (one batch forever);
    AdamW's default weight decay 0.01.)"""
    root, data, b8, _ = world
    bright_run("encode", "--ckpt", b8, "--data", data, "--out", tmp_path / "codes.pt")
    z = torch.load(tmp_path / "codes.pt", weights_only=True)["codes"]
    seen, real = [], diffusion.Diffusion.loss
    def spy(self, model, x0, gamma=5.0, t=None, eps=None):
        seen.append((x0.detach().clone(), t.clone(), eps.clone()))
        return real(self, model, x0, gamma, t, eps)
    monkeypatch.setattr(diffusion.Diffusion, "loss", spy)
    diff_run("train", "--codes", tmp_path / "codes.pt", "--out", tmp_path / "d", "--max-iters", 2,
                         "--batch-size", 4)
    assert len(seen) == 2
    bank = (2 * z - 1).flatten(1)
    for x0, _, _ in seen:
        assert torch.cdist(x0.flatten(1), bank).min(1).values.max() < 1e-5   # each row is some 2 z - 1
    (x1, t1, e1), (x2, t2, e2) = seen
    assert not torch.equal(t1, t2) and not torch.equal(e1, e2)
    assert torch.load(tmp_path / "d" / "ddpm.pt", weights_only=True)["optimizer"]["param_groups"][0]["weight_decay"] == 0


def test_sampling_checks_eta_and_the_bright_models_key_code_shape(world):
    # --eta 1 (DDIM with DDPM's amount of noise) is in range, 1.5 is not
    flags = lambda eta: argparse.Namespace(sampler="ddim", steps=None, eta=eta, seed=0)
    diffusion.check_sampler_flags(flags(1.0))
    with pytest.raises(SystemExit, match=r"--eta must be in \[0, 1\]"):
        diffusion.check_sampler_flags(flags(1.5))
    # a BRIGHT model whose key codes have the DDPM's channels but another size: refused
    _, _, b8, _ = world
    with pytest.raises(SystemExit, match="makes 8x8x8 key codes, but the diffusion model was trained on 8x16x16"):
        diffusion.load_bright(str(b8), "cpu", argparse.Namespace(z_channels=8, z_size=16))


def test_generate_maps_samples_to_key_codes_in_batches(monkeypatch):
    """generate turns the sampler's x in [-1, 1] (clipped) into key codes (x + 1) / 2, and
    draws n = 5 in batches of 2, 2, 1. (Fails with: x clamped to [0, 1] without the mapping.)"""
    cfg = diffusion.make_config("tiny", z_channels=2, z_size=4)
    calls = []
    def fake(self, model, shape, device, steps=50, eta=0.0, generator=None):
        calls.append(shape[0])
        return torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 0.25]).repeat(shape[0], 2, 2, 1).view(shape)
    monkeypatch.setattr(diffusion.Diffusion, "ddim_sample", fake)
    z = diffusion.generate(None, cfg, 5, "cpu", "ddim", steps=2, bs=2)
    assert calls == [2, 2, 1] and z.shape == (5, 2, 4, 4)
    assert z[0].flatten()[:8].tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.625]


def test_decode_all_gives_the_decoders_images_in_unit_interval(micro):
    """decode_all = (decode(z).clamp(-1, 1) + 1) / 2, batch by batch. (Fails with: decode(z)
    clamped to [0, 1], the negative half of the image range lost.)"""
    torch.manual_seed(0)
    m = BRIGHT(micro).eval().requires_grad_(False)
    m.tables.normal_()
    z = torch.rand(5, 4, 4, 4)
    y = m.decode(z)
    assert (y < 0).any() and (y > 0).any()
    got = diffusion.decode_all(m, z, "cpu", bs=2)
    assert torch.allclose(got, (y.clamp(-1, 1) + 1) / 2, atol=1e-5)


def test_nearest_finds_the_closest_rows_and_their_rms_distance():
    """a hand case: rows at RMS distance 2, 1, 3 and 0.5 from the query (4 dims), searched in
    chunks of 2: the two nearest are rows 3 and 1, at 0.5 and 1. (Fails with: largest=True, the
    farthest rows; the L2 distance instead of the RMS one.)"""
    q = torch.zeros(1, 4)
    bank = torch.tensor([2.0, 1.0, 3.0, 0.5])[:, None].expand(4, 4).contiguous()
    d, idx = diffusion.nearest(q, bank, 2, lambda b: b, chunk=2)
    assert idx.tolist() == [[3, 1]] and d[0].tolist() == pytest.approx([0.5, 1.0])


@pytest.mark.parametrize("codes,msg", [
    (torch.rand(4, 8, 8, 4), "key codes must be square, got 8x4"),
    (torch.rand(4, 8, 8, 8) - 0.5, r"key codes must lie in \[0, 1\]"),
])
def test_check_codes_refuses_non_square_or_negative_codes(codes, msg):
    """one error line, not a traceback in q_sample (non-square) nor silent training on codes
    below 0. (Fails with: the square check removed; only the upper bound checked.)"""
    with pytest.raises(SystemExit, match="^error: codes.pt: " + msg):
        diffusion.check_codes(codes, "codes.pt")


def test_neighbors_grid_shows_key_code_neighbours_then_pixel_ones(world, tmp_path, monkeypatch):
    """neighbors.png, one row a sample: the sample, its k nearest training images by key code,
    a blank, its k nearest by pixels (as the command's message says). nearest() is made to
    answer training image 0 for every key-code search and image 1 for every pixel search, so
    the columns say which search they show. (Fails with: the two searches' columns swapped.)"""
    root, data, b8, _ = world
    diff_run(*train_args(world, tmp_path / "d", 1))
    real = diffusion.nearest
    def fixed(queries, bank, k, as_float, chunk=1024):
        d, idx = real(queries, bank, k, as_float, chunk)
        return d, torch.full_like(idx, 1 if bank.dtype == torch.uint8 else 0)  # pixels: uint8 images
    monkeypatch.setattr(diffusion, "nearest", fixed)
    diff_run("neighbors", "--ckpt", tmp_path / "d" / "ddpm.pt", "--n", 1, "--k", 1, "--n-stats", 2,
                         "--steps", 2, "--out", tmp_path / "nb.png")
    g = torch.from_numpy(np.array(Image.open(tmp_path / "nb.png"))).permute(2, 0, 1)
    cell = lambda c: g[:, 2:66, 2 + c * 66:2 + c * 66 + 64]
    train_x, _ = bright.load_dataset(str(data), 64)
    assert torch.equal(cell(1), train_x[0]) and torch.equal(cell(3), train_x[1]) and (cell(2) == 255).all()


SMALL_DDPM = ["--set", '{"width": 16, "mults": [1, 2], "timesteps": 20}', "--batch-size", "4"]


def codes_file(path, codes):
    """a bright-codes file as `bright.py encode` writes it, without a fingerprint (an older one)"""
    torch.save({"kind": "bright-codes", "codes": codes, "val_codes": codes[:2], "bright_ckpt": str(path) + ".none",
                "config": {}}, path)
    return str(path)


def test_a_resumed_ddpm_refuses_other_key_codes(tmp_path):
    """--resume checks that the training codes are the run's own: their count and the first 8
    (to 1e-3; the same images through the same weights differ by ~1e-6). Refused: the 12 codes
    plus one more (the first 8 unchanged), and the 12 codes each moved by 0.02; accepted: the
    same 12 again. (A DDPM resumed on other codes no longer takes the steps of one run.)"""
    z = torch.rand(12, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    out = str(tmp_path / "r")
    diffusion.main(["train", "--codes", codes_file(tmp_path / "a.pt", z), "--out", out, "--max-iters", "1",
                    *SMALL_DDPM, "--device", "cpu"])
    for name, other in [("more.pt", torch.cat([z, z[:1]])), ("moved.pt", z + 0.02)]:
        with pytest.raises(SystemExit, match="^error: the training key codes .* are not those"):
            diffusion.main(["train", "--codes", codes_file(tmp_path / name, other), "--out", out, "--resume",
                            "--max-iters", "2", "--device", "cpu"])
    diffusion.main(["train", "--codes", str(tmp_path / "a.pt"), "--out", out, "--resume", "--max-iters", "2",
                    "--device", "cpu"])
    assert torch.load(os.path.join(out, "ddpm.pt"), weights_only=True)["step"] == 2
    # a run's last step is logged whatever --log-every (100 here): the curve reaches its end
    assert bright.read_log(out, "ddpm_log.csv", diffusion.LOG_COLUMNS)["iteration"] == [1, 2]


def test_ddpm_bfloat16_on_the_cpu_is_refused_before_any_encoding(world, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine takes --dtype bfloat16")
    monkeypatch.setattr(diffusion, "encode_images", lambda *a: pytest.fail("encoded the dataset first"))
    with pytest.raises(SystemExit, match="bfloat16 is for CUDA"):
        diff_run(*train_args(world, tmp_path / "bf", 1, "--dtype", "bfloat16"))


def test_ddpm_train_without_preset_says_which_unet(tmp_path, capsys):
    """key codes larger than the tiny preset's (ffhq256's 16x16x16, church256's 64x64x4) with no
    --preset: the tiny UNet trains, and a note names the paper's (bright16); with --preset, or
    codes no larger than 16x16x4, no note"""
    def say(out, *flags, shape=(16, 16, 16)):
        diffusion.main(["train", "--codes", codes_file(tmp_path / f"{out}.pt", torch.rand(4, *shape)),
                        "--out", str(tmp_path / out), "--max-iters", "1", *SMALL_DDPM, *flags, "--device", "cpu"])
        return capsys.readouterr().out
    assert "note: no --preset, so the tiny UNet (width 16) for these 16x16x16 key codes; " \
           "--preset bright16 is the paper's" in say("a")
    assert "no --preset" not in say("b", "--preset", "bright16")
    assert "these 4x64x64 key codes" in say("c", shape=(4, 64, 64))
    assert "no --preset" not in say("d", shape=(4, 16, 16))


def ddpm_checkpoint(path, **records):
    """a DDPM checkpoint written by hand (no training) over the micro model's 4x4x4 key codes,
    with what it records of its BRIGHT model (bright_ckpt, bright_config, bright_fingerprint)"""
    cfg = diffusion.make_config("tiny", z_channels=4, z_size=4, width=16, mults=(1, 2), timesteps=20)
    torch.manual_seed(0)
    unet = diffusion.UNet(cfg).state_dict()
    torch.save({"kind": "ddpm", "config": dataclasses.asdict(cfg), "step": 1, "model": unet, "ema": unet, **records},
               path)


def test_sampling_warns_only_about_a_real_change_of_the_bright_model(micro, tmp_path, capsys):
    """load_for_sampling compares the BRIGHT checkpoint with the one the DDPM's codes came from:
    its config (less max_iters and grad_accum, which a resumed run may change) and then its
    weights' fingerprint. Hand-made checkpoints: same model -> silent; a DDPM without a
    fingerprint (trained on an older codes file) -> nothing to compare, silent; BRIGHT resumed with
    another --grad-accum and trained on -> the weights warning, not the config one; another lr ->
    the config warning."""
    fp = bright.fingerprint(micro_checkpoint(micro, tmp_path / "b.pt").state_dict())
    for i, (ddpm_fp, change, warning) in enumerate([(fp, {}, None), (None, {}, None),
                                                     ("0badf00d", {"grad_accum": 2}, "has other weights"),
                                                     (fp, {"lr": 0.01}, "has another config")]):
        b, d = tmp_path / f"b{i}.pt", tmp_path / f"d{i}.pt"
        micro_checkpoint(dataclasses.replace(micro, **change), b)       # the same weights (seed 0)
        ddpm_checkpoint(d, bright_config=dataclasses.asdict(micro), bright_fingerprint=ddpm_fp)
        diffusion.load_for_sampling(argparse.Namespace(device="cpu", ckpt=str(d), steps=None, bright_ckpt=str(b)))
        out = capsys.readouterr().out
        assert (warning in out if warning else "warning" not in out), (i, out)
        assert out.count("warning") <= 1


def test_neighbors_grid_rows_hold_every_training_image_when_k_exceeds_them(micro, data16, tmp_path, capsys):
    """--k larger than the training set (12 images): k becomes 12, so each row holds the sample,
    12 key-code neighbours, a blank and 12 pixel neighbours, 26 cells of 16 + 2 pixels (with the
    asked k the rows would be 2k + 2 = 42 cells wide and the 26 images would not fill them)."""
    micro_checkpoint(micro, tmp_path / "bright.pt")
    ddpm_checkpoint(tmp_path / "ddpm.pt", bright_ckpt=str(tmp_path / "bright.pt"))
    diffusion.main(["neighbors", "--ckpt", str(tmp_path / "ddpm.pt"), "--data", str(data16), "--n", "1", "--k", "20",
                    "--n-stats", "2", "--steps", "2", "--out", str(tmp_path / "nb.png"), "--device", "cpu"])
    assert "their 12 nearest of 12 training images" in capsys.readouterr().out
    assert Image.open(tmp_path / "nb.png").size == (26 * 18 + 2, 18 + 2)


# ----------------------------------------------------------------------------- data/ffhq/prepare.py


def test_an_interrupted_prepare_leaves_a_set_bright_refuses(ffhq, tmp_path, monkeypatch):
    """Ctrl-C in a prepare.py after some images: the folder says it is half-written, and every
    command says so rather than train on the images there are (100 of 1000, say); a finished
    run of the script clears it"""
    write_images(tmp_path / "src", 6)
    real = ffhq.convert

    class Interrupted:  # a worker pool that converts one image, then the user presses Ctrl-C
        def __init__(self, *a, **k): pass
        def __enter__(self): return self
        def __exit__(self, *a): pass
        def imap(self, fn, tasks, chunksize=1):
            yield real(tasks[0]); raise KeyboardInterrupt
    shapes = shapes_generator()
    real_make, made = shapes.make_image, []

    def make_image(*a):  # the same for the shapes: Ctrl-C at the third image
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(1)
        return real_make(*a)
    for name, run_prepare in [("ffhq", lambda: ffhq.prepare(str(tmp_path / "src"), str(tmp_path / "ffhq"), size=16,
                                                            n_val=1, workers=1, quiet=True)),
                              ("shapes", lambda: shapes.prepare(str(tmp_path / "shapes"), n_train=4, n_val=2, size=16,
                                                                quiet=True))]:
        with monkeypatch.context() as m:
            m.setattr(ffhq.multiprocessing, "Pool", Interrupted)
            m.setattr(shapes, "make_image", make_image)
            with pytest.raises(KeyboardInterrupt):
                run_prepare()
        assert len(os.listdir(tmp_path / name / "train")) > 1  # the images so far, and the .partial file
        with pytest.raises(SystemExit, match=f"^error: data folder .*{name}' is half-written: the prepare.py"):
            bright.load_dataset(str(tmp_path / name), 16)
        run_prepare()
        assert [len(x) for x in bright.load_dataset(str(tmp_path / name), 16)] == ([5, 1] if name == "ffhq" else [4, 2])


def test_ffhq_limit_never_reaches_into_the_validation_images(ffhq, tmp_path):
    """--limit larger than the training count keeps the training count: 5 images, --n-val 1,
    --limit 10 -> 4 training images; the 5th is validation only (else it is trained on too)."""
    write_images(tmp_path / "src", 5)
    ffhq.prepare(str(tmp_path / "src"), str(tmp_path / "out"), size=16, n_val=1, limit=10, workers=1, quiet=True)
    assert sorted(os.listdir(tmp_path / "out" / "train")) == [".complete"] + [f"{i:05d}.png" for i in range(4)]
    assert os.listdir(tmp_path / "out" / "val") == ["00000.png"]


def test_ffhq_needs_a_training_image_beside_the_validation_ones(ffhq, tmp_path):
    """--n-val equal to the number of images leaves nothing to train on: one error line, before
    anything is written (not an empty train/ marked complete)."""
    write_images(tmp_path / "src", 3)
    with pytest.raises(SystemExit, match="only 3 images .* not enough for --n-val 3 plus training"):
        ffhq.prepare(str(tmp_path / "src"), str(tmp_path / "out"), size=16, n_val=3, workers=1, quiet=True)
    assert not (tmp_path / "out").exists()


def test_ffhq_lists_images_in_natural_order_without_hidden_files(ffhq, tmp_path):
    """Names sort with numbers compared as numbers (2 before 10: a mirror without zero padding
    keeps its order, so the last --n-val are the right ones), and hidden files, such as the
    ._name resource forks and __MACOSX/ folder macOS zips carry, are not images."""
    src = tmp_path / "src"
    for name in ("1.png", "2.png", "10.png", ".3.png", "__MACOSX/._1.png", "sub/.hidden/4.png", "sub/5.png"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"")
    assert ffhq.list_images(str(src)) == ["1.png", "2.png", "10.png", os.path.join("sub", "5.png")]
