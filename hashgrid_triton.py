"""
Grouped multi-resolution hash-grid lookup: the naive torch reference, a faster torch
path for CPU training, and the Triton kernels checked against the reference.

Data layout (shared by every backend)
-------------------------------------
coords  (N, G, D)               float32 (or float64; grid_lookup computes bf16/fp16 inputs
                                in float32), one D-dim query per point and group, in [0, 1].
                                Values outside are clamped to [0, 1] and NaN reads as 0;
                                a clamped coordinate, or one exactly 0 or 1, gets gradient 0
                                (the clamp is taken as active on the boundary, which is also
                                what F.grid_sample does, so every backend agrees).
tables  (G, spec.num_entries, F) one flat table per group; level l owns the rows
                                [spec.offsets[l], spec.offsets[l] + spec.sizes[l]).
out     (N, G, L*F)             level-major: out[n, g, l*F + f].

Level l has resolution res_l (geometric from min_res to max_res, as in Instant-NGP) and
(res_l + 1)^D vertices (integer c, 0..res_l per dimension), placed in one of two ways:
  GridSpec(staggered=False): vertex c sits at c / res_l, so x = 0 and x = 1 are vertices;
  GridSpec(staggered=True):  Instant-NGP's and torch-ngp's placement (the grid BRIGHT used),
      pos = x * (N_l - 1) + 0.5 in vertex units, N_l = min_res * b^l unrounded (b the growth
      per level): a half-cell offset, so x = 0 is no level's vertex and the levels' vertices
      do not line up at the edges; where N_l < res_l - 0.5 the last vertex row (c = res_l)
      is allocated (torch-ngp's sizes) but never reached.
Both are pos = x * scale_l + shift (spec.scales, spec.shift). A level whose vertices fit in
T = 2^t entries is dense (row-major, dimension 0 fastest); a larger one is hashed: XOR of
c_d * prime_d, mod T, in uint32 arithmetic. Each level's size is rounded up to a multiple of
8 entries so that every level starts 32-byte aligned (vector loads in the kernels).

Multilinear interpolation over the 2^D corners of the cell holding x:
    pos = x * scale + shift, cell = min(floor(pos), res - 1), t = pos - cell  (t in [0, 1])
    out = sum_corners  w_corner * table[index(cell + corner)],
    w_corner = prod_d (t_d if corner_d else 1 - t_d)
Gradients
    d out / d table[index(corner)] = w_corner                          (a scatter-add)
    d out / d x_d = scale * sum_corners (+1 if corner_d else -1) * prod_{e != d} w_e * entry

The Triton kernels (grid_lookup_triton; the jit helpers are named like the torch functions
they mirror, plus "_tl")
--------------------------------------------------------------------------------------------
Launch grid (L, ceil(N / BLOCK), G): one program = BLOCK points x one group x one level, so
a single launch covers every level and group. Per-level resolution, row offset and dense flag
come from three small int32 tensors, a staggered grid's scale from one in the lookup's
precision (the placement is a compile-time constant); dense vs. hashed is chosen at run time
per program.
Each corner's F features are one (BLOCK, F) tile load: F contiguous floats per point, a single
64- or 128-bit load (levels start at multiples of 8 entries, and the kernel says so).
  forward   out[n, g, l*F:(l+1)*F] = sum_corners w * entry, accumulated in fp32 (fp64 inputs:
            fp64); nothing is saved for the backward except coords and tables.
  backward  one kernel recomputes cells, weights and corner indices, then
            tables: atomic adds of w * grad_out into each corner's entry, relaxed (no
                    ordering needed; the default acq_rel costs a barrier per add), into an
                    fp32 buffer; not bitwise deterministic (summation order varies);
            coords: gathers the corner entries again (recomputed, not stored by the
                    forward), forms <entry, grad_out> per corner and the formula above, and
                    sums the L levels with atomic adds into (N, G, D). Skipped unless
                    coords.requires_grad (and the table scatter unless tables need it).
On CPU tensors the kernels need Triton's interpreter: TRITON_INTERPRET=1 before anything
imports triton (tests only; far too slow to train).
"""
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Instant-NGP's hash primes; the first is 1 so that dimension 0 stays coherent in memory.
PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437)


@dataclass(frozen=True)
class GridSpec:
    """Geometry of one group's multi-resolution grid (every group has the same one)."""
    dim: int               # D = C_key + 2: (x, y, key slice)
    levels: int            # L
    features: int          # F features per entry
    log2_table_size: int   # T = 2^t entries at most per level
    min_res: int
    max_res: int
    staggered: bool = False  # vertex placement (module docstring): False c / res, True torch-ngp's
    # derived, per level (filled in __post_init__)
    resolutions: tuple = field(init=False)
    scales: tuple = field(init=False)  # pos = x * scale + shift
    dense: tuple = field(init=False)
    sizes: tuple = field(init=False)
    offsets: tuple = field(init=False)
    num_entries: int = field(init=False)

    def __post_init__(self):
        if not 1 <= self.dim <= len(PRIMES):
            raise ValueError(f"GridSpec: dim must be in 1..{len(PRIMES)}, got {self.dim}")
        if self.levels < 1 or self.features < 1 or not 1 <= self.min_res <= self.max_res:
            raise ValueError(f"GridSpec: need levels, features >= 1 and 1 <= min_res <= max_res, got L={self.levels}, "
                             f"F={self.features}, res {self.min_res}->{self.max_res}")
        if not 3 <= self.log2_table_size <= 30:
            raise ValueError("GridSpec: log2_table_size must be in 3..30")
        T = 1 << self.log2_table_size
        growth = (math.log(self.max_res) - math.log(self.min_res)) / max(self.levels - 1, 1)
        res, scales, dense, sizes, offsets, total = [], [], [], [], [], 0
        for l in range(self.levels):
            # -1e-9: 16 * 4^(15/15) must give 64, not 65, despite float rounding
            n_l = self.min_res * math.exp(growth * l)  # N_l, unrounded
            r = max(1, math.ceil(n_l - 1e-9))
            # staggered: pos = x * (N_l - 1) + 0.5 runs from 0.5 to N_l - 0.5 <= r - 0.5, so its
            # cells are 0..r-1 as with c / res (torch-ngp's scale: N_l unrounded, not r)
            scales.append(n_l - 1 if self.staggered else float(r))
            vertices = (r + 1) ** self.dim
            is_dense = vertices <= T
            n = (vertices + 7) // 8 * 8 if is_dense else T
            res.append(r); dense.append(is_dense); sizes.append(n); offsets.append(total)
            total += n
        set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass
        set_("resolutions", tuple(res)); set_("scales", tuple(scales)); set_("dense", tuple(dense))
        set_("sizes", tuple(sizes)); set_("offsets", tuple(offsets)); set_("num_entries", total)

    @property
    def table_size(self):
        return 1 << self.log2_table_size

    @property
    def shift(self):
        return 0.5 if self.staggered else 0.0

    def reach(self, l):
        """vertices 0..reach(l) per dimension are the ones level l's queries can touch: res with
        c / res; staggered, pos <= N_l - 0.5 reaches floor(N_l - 0.5) + 1, res - 1 when N_l < res - 0.5"""
        return min(self.resolutions[l], math.floor(self.scales[l] + self.shift) + 1)


def corner_index(c, spec, l):
    """Entry index (within level l) of integer vertices c (..., D) -> (...)."""
    r = spec.resolutions[l]
    if spec.dense[l]:
        idx, stride = torch.zeros_like(c[..., 0]), 1
        for d in range(spec.dim):  # row-major, dimension 0 fastest
            idx = idx + c[..., d] * stride
            stride *= r + 1
        return idx
    # hashed: int64 products of (< 2^31) x (< 2^32) cannot overflow, and the low
    # log2(T) bits of the XOR are the same as in uint32 arithmetic, so & (T - 1) = mod T.
    idx = torch.zeros_like(c[..., 0])
    for d in range(spec.dim):
        idx = idx ^ (c[..., d] * PRIMES[d])
    return idx & (spec.table_size - 1)


def clamp_coords(coords):
    """Clamp to [0, 1] (NaN -> 0); gradient passes only where 0 < coords < 1."""
    inside = (coords > 0) & (coords < 1)
    return torch.where(inside, coords, coords.detach().nan_to_num(0.0).clamp(0, 1))


def cell_and_frac(x, spec, l):
    """x (..., D) in [0,1] -> integer cell (..., D) in [0, res-1] of level l and t (..., D) in [0,1]."""
    res = spec.resolutions[l]
    pos = x * spec.scales[l] + spec.shift
    cell = pos.detach().floor().clamp(max=res - 1)  # c / res: x = 1 belongs to the last cell
    return cell.long(), pos - cell


def level_corners(x, spec, l):
    """All 2^D corners of level l at once: clamped x (N, G, D) -> entry indices within the
    level (N, G, 2^D) and their multilinear weights (N, G, 2^D)"""
    D = x.shape[-1]
    bits = torch.tensor([[(k >> d) & 1 for d in range(D)] for k in range(2 ** D)], device=x.device)
    cell, t = cell_and_frac(x, spec, l)                                 # (N, G, D)
    tt = t[:, :, None, :]
    w = torch.where(bits.bool(), tt, 1 - tt).prod(-1)                   # (N, G, 2^D)
    return corner_index(cell[:, :, None, :] + bits, spec, l), w


def grid_lookup_reference(coords, tables, spec):
    """The naive lookup, written for clarity: one gather per corner per level.
    coords (N, G, D), tables (G, num_entries, F) -> (N, G, L*F); autograd does the gradients
    (on the CPU, the table gradient of tables[group, idx] adds with float atomics on several
    threads: not bitwise repeatable, unlike grid_lookup_fast's)."""
    N, G, D = coords.shape
    x = clamp_coords(coords)
    group = torch.arange(G, device=coords.device).expand(N, G)  # (N, G)
    out = []
    for l in range(spec.levels):
        cell, t = cell_and_frac(x, spec, l)  # (N, G, D) each
        acc = 0
        for corner in range(2 ** D):
            bit = [(corner >> d) & 1 for d in range(D)]
            w = 1
            for d in range(D):
                w = w * (t[..., d] if bit[d] else 1 - t[..., d])  # (N, G)
            c = cell + torch.tensor(bit, device=coords.device)
            entry = tables[group, spec.offsets[l] + corner_index(c, spec, l)]  # (N, G, F)
            acc = acc + w[..., None] * entry
        out.append(acc)
    return torch.cat(out, dim=-1)


def grid_lookup_fast(coords, tables, spec):
    """Same result as grid_lookup_reference, faster on CPU: a dense level with D = 2 or 3 is
    a small image/volume of F channels, so F.grid_sample (bilinear/trilinear, align_corners:
    vertex 0 at -1, vertex res at +1) interpolates it with both gradients in one fused op;
    other levels gather all 2^D corners at once instead of one corner at a time.
    With c / res placement grid_sample reads x as 2x - 1, rounded: in float32 a coordinate
    below ~3e-8 lands on -1, the edge, which padding_mode "zeros" reads as the inside of cell
    0 ("border" would clip it and lose its gradient; the coordinates are clamped to [0, 1]
    first, so nothing is ever outside). A coordinate on a cell face may take (rounded) the
    one-sided derivative of the cell below, where the reference and the kernels take the
    upper cell's."""
    N, G, D = coords.shape
    Fe = spec.features
    x = clamp_coords(coords)
    out = []
    for l in range(spec.levels):
        r, off, scale = spec.resolutions[l], spec.offsets[l], spec.scales[l]
        if spec.dense[l] and D in (2, 3):
            n = (r + 1) ** D
            vol = tables[:, off:off + n].reshape(G, *([r + 1] * D), Fe)  # (G, [c_{D-1}..c_0], F)
            vol = vol.movedim(-1, 1)                                    # (G, F, [c_{D-1}..c_0])
            # vertex units pos = x * scale + shift -> [-1, 1]; c / res is exactly 2x - 1
            u = (x * scale + spec.shift) * (2 / r) - 1 if spec.staggered else 2 * x - 1
            grid = u.transpose(0, 1).reshape(G, *([1] * (D - 1)), N, D)  # (G, 1.., N, D)
            y = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out.append(y.reshape(G, Fe, N).permute(2, 0, 1))            # (N, G, F)
            continue
        idx, w = level_corners(x, spec, l)                              # (N, G, 2^D) each
        # rows of the flattened tables: on the CPU, index_select's backward (index_add_) sums
        # in a fixed order, where tables[g, idx]'s (index_put_ with accumulate) does not on
        # several threads, and Adam's eps of 1e-15 turns those last-bit differences into whole
        # steps (on CUDA both add with atomics; the Triton kernels are the CUDA path anyway)
        row = torch.arange(G, device=coords.device)[None, :, None] * spec.num_entries + off + idx
        entry = tables.reshape(-1, Fe).index_select(0, row.reshape(-1)).view(*idx.shape, Fe)  # (N, G, 2^D, F)
        out.append((w[..., None] * entry).sum(2))
    return torch.cat(out, dim=-1)


def grid_lookup(coords, tables, spec, backend="torch"):
    """coords (N, G, D) in [0,1] (clamped), tables (G, spec.num_entries, F) -> (N, G, L*F).
    backend: "torch" (fast torch path), "reference" (naive), "triton", or "auto"
    (triton on CUDA tensors for a grid it can run, see triton_unfit; torch otherwise)."""
    if coords.dim() != 3 or coords.shape[-1] != spec.dim or coords.shape[1] != tables.shape[0]:
        raise ValueError(f"grid_lookup: coords {tuple(coords.shape)} do not match "
                         f"tables {tuple(tables.shape)} and dim {spec.dim}")
    if tables.shape[1:] != (spec.num_entries, spec.features):
        raise ValueError(f"grid_lookup: tables {tuple(tables.shape)} do not match the spec "
                         f"(G, {spec.num_entries}, {spec.features})")
    # at least float32 for every backend (float64 if either input is): pos = x * res in bf16
    # would keep ~8 bits, and grid_sample needs one dtype for coords and tables
    dtype = torch.promote_types(torch.promote_types(coords.dtype, tables.dtype), torch.float32)
    coords, tables = coords.to(dtype), tables.to(dtype)
    if backend == "auto":
        backend = "triton" if coords.is_cuda and not triton_unfit(spec) else "torch"
    if backend == "reference":
        return grid_lookup_reference(coords, tables, spec)
    if backend == "torch":
        return grid_lookup_fast(coords, tables, spec)
    if backend == "triton":
        return grid_lookup_triton(coords, tables, spec)
    raise ValueError(f"grid_lookup: unknown backend {backend!r} (torch, reference, triton, auto)")


# =========================================================================================
# Triton kernels
# =========================================================================================
# Each @triton.jit helper mirrors the torch function with the same name minus "_tl" above,
# so the two can be read side by side; corner_weight_tl is the weight product written inline
# in grid_lookup_reference, and clamp_coords_tl returns the `inside` mask that clamp_coords
# applies through torch.where (the backward kernel zeroes x's gradient outside with it).
# One program handles BLOCK points of one (group, level); its per-point values are (BLOCK,)
# tensors and the D per-dimension values of a point are tuples of D such tensors (D is a
# constexpr, so every loop over d or over the 2^D corners is unrolled at compile time).

BLOCK_POINTS = 128     # points per program on the GPU (1 point per thread at NUM_WARPS = 4)
NUM_WARPS = 4
# Launch-grid order. True: the level is the fastest grid axis, so the L programs that write
# one point block's L*F outputs (contiguous in the (N, G, L*F) layout) run together and fill
# whole cache lines; the price is that all L tables of a group are live in L2 at once
# (18.6 MB per group in the paper configuration, which fits the 50 MB of an H100).
# False: tiny-cuda-nn's order (one level's table hot at a time), but each program writes
# F*4 bytes every G*L*F*4 bytes of the output, a partial sector per point.
# Measured on an H100 (BENCHMARKS.md), paper configuration: forward 1.11 ms (True)
# vs 1.60 ms (False), forward + backward 4.30 vs 4.92 ms.
LEVELS_INNER = True
# Coordinate gradient, summed over levels: True = fp32/fp64 atomic adds into (N, G, D);
# False = each level writes its own (L, N, G, D) buffer, summed by torch afterwards
# (deterministic, but L times the memory and traffic of the result: 201 MB in the paper
# configuration). Measured (H100, paper configuration, forward + backward): 4.30 ms with
# atomics vs 6.19 ms with the buffer, so atomics; the L adds per value come from programs
# far apart in time and hardly contend, and they make the gradient's last bits vary run
# to run, as the table gradient's already do.
COORD_GRAD_ATOMIC = True
_PRIMES_TL = tl.constexpr(PRIMES)  # a global must be a constexpr to be read in a kernel


@triton.jit
def clamp_coords_tl(x):
    """NaN -> 0, clamp to [0, 1]; `inside` is where the gradient passes (0 < x < 1)."""
    inside = (x > 0) & (x < 1)           # False for NaN
    x = tl.where(x == x, x, 0.0)         # NaN != NaN
    return tl.minimum(tl.maximum(x, 0.0), 1.0), inside


@triton.jit
def cell_and_frac_tl(x, scale, res, STAGGERED: tl.constexpr):
    pos = x * scale
    if STAGGERED:  # a constexpr: the c / res kernel is compiled without the add
        pos += 0.5
    cell = tl.minimum(tl.floor(pos), res - 1)  # c / res: x = 1 belongs to the last cell
    return cell.to(tl.int32), pos - cell


@triton.jit
def corner_index_tl(cell, corner: tl.constexpr, res, dense, hash_mask, D: tl.constexpr):
    """Entry index (within the level) of vertex cell + bits(corner), like corner_index.
    Both the dense and the hashed index are computed (a few integer ops) and `dense`, which
    is the same for the whole program, selects one; no branch diverges."""
    dense_idx = tl.zeros_like(cell[0])
    hashed = tl.zeros_like(cell[0]).to(tl.uint32)
    stride = 1
    for d in tl.static_range(D):
        c = cell[d] + ((corner >> d) & 1)      # in [0, res]: coordinates were clamped first
        # row-major, dimension 0 fastest; (res+1)^D <= T fits int32 for a dense level. In a
        # hashed level it may wrap past 2^31, harmless as it is discarded below, so the overflow
        # sanitizer (TRITON_DEBUG=1) is told not to stop on it
        dense_idx = tl.add(dense_idx, tl.mul(c, stride, sanitize_overflow=False), sanitize_overflow=False)
        stride = tl.mul(stride, res + 1, sanitize_overflow=False)
        # uint32: the product must wrap mod 2^32 (an int32 times 2654435761 does not compile),
        # so tell the overflow sanitizer (TRITON_DEBUG=1, the interpreter) it is meant to
        hashed ^= tl.mul(c.to(tl.uint32), _PRIMES_TL[d], sanitize_overflow=False)
    return tl.where(dense, dense_idx, (hashed & hash_mask).to(tl.int32))


@triton.jit
def corner_weight_tl(t, corner: tl.constexpr, D: tl.constexpr, skip: tl.constexpr = -1):
    """prod_d (t_d if bit d of corner else 1 - t_d), leaving out dimension `skip`."""
    w = 1.0
    for d in tl.static_range(D):
        if d != skip:
            if (corner >> d) & 1:
                w = w * t[d]
            else:
                w = w * (1 - t[d])
    return w


@triton.jit
def _program_setup(coords_ptr, res_ptr, scale_ptr, offset_ptr, dense_ptr, N, G, num_entries,
                   D: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                   LEVELS_INNER: tl.constexpr, IDX64: tl.constexpr, STAGGERED: tl.constexpr):
    """What the forward and the backward kernels share: which points, group and level this
    program handles, the level's geometry, and each point's cell, fraction t and gradient
    mask per dimension (tuples of D (BLOCK,) tensors)."""
    if LEVELS_INNER:
        pid_n, g, l = tl.program_id(1), tl.program_id(2), tl.program_id(0)
    else:
        pid_n, g, l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    if IDX64:  # only for tensors with >= 2^31 elements (checked on the host)
        n, g, l = n.to(tl.int64), g.to(tl.int64), l.to(tl.int64)
    res = tl.load(res_ptr + l)
    if STAGGERED:  # N_l - 1, in ACC's precision (a float32 for fp32, as torch rounds it)
        scale = tl.load(scale_ptr + l)
    else:          # the resolution itself
        scale = res
    dense = tl.load(dense_ptr + l) != 0
    # Offsets and sizes of levels are multiples of 8 entries (GridSpec), so this row is
    # 8*F-element aligned; telling the compiler lets it issue one vector load per corner.
    level_row = tl.multiple_of((g * num_entries + tl.load(offset_ptr + l)) * F, 8 * F)
    row = n * G + g                                 # (point, group) row of coords and out
    cell, t, inside = (), (), ()
    for d in tl.static_range(D):
        x = tl.load(coords_ptr + row * D + d, mask=mask, other=0.0).to(ACC)
        x, ins = clamp_coords_tl(x)
        c, td = cell_and_frac_tl(x, scale, res, STAGGERED)
        cell, t, inside = cell + (c,), t + (td,), inside + (ins,)
    return n, mask, row, l, res, scale, dense, level_row, cell, t, inside


@triton.jit
def _grid_fwd_kernel(coords_ptr, tables_ptr, out_ptr, res_ptr, scale_ptr, offset_ptr, dense_ptr,
                     N, G, L, num_entries, hash_mask,
                     D: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                     LEVELS_INNER: tl.constexpr, IDX64: tl.constexpr, STAGGERED: tl.constexpr):
    """out[n, g, l*F:(l+1)*F] = sum over corners of weight * tables[g, offset_l + index]."""
    n, mask, row, l, res, scale, dense, level_row, cell, t, inside = _program_setup(
        coords_ptr, res_ptr, scale_ptr, offset_ptr, dense_ptr, N, G, num_entries,
        D, F, BLOCK, ACC, LEVELS_INNER, IDX64, STAGGERED)
    f = tl.arange(0, F)
    acc = tl.zeros((BLOCK, F), ACC)
    for corner in tl.static_range(2 ** D):
        w = corner_weight_tl(t, corner, D)
        idx = corner_index_tl(cell, corner, res, dense, hash_mask, D)
        if IDX64:
            idx = idx.to(tl.int64)
        # one (BLOCK, F) tile: each point reads its F contiguous features as one vector load
        entry = tl.load(tables_ptr + level_row + idx[:, None] * F + f[None, :],
                        mask=mask[:, None], other=0.0)
        acc += w[:, None] * entry.to(ACC)
    tl.store(out_ptr + row[:, None] * (L * F) + l * F + f[None, :], acc, mask=mask[:, None])


@triton.jit
def _grid_bwd_kernel(coords_ptr, tables_ptr, grad_out_ptr, grad_tables_ptr, grad_coords_ptr,
                     res_ptr, scale_ptr, offset_ptr, dense_ptr, N, G, L, num_entries, hash_mask,
                     D: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                     LEVELS_INNER: tl.constexpr, IDX64: tl.constexpr, STAGGERED: tl.constexpr,
                     TABLE_GRAD: tl.constexpr, COORD_GRAD: tl.constexpr,
                     COORD_ATOMIC: tl.constexpr):
    """Both gradients of one (point block, group, level), recomputing the forward's corners.
    tables: scatter-add w_corner * grad_out into each corner's entry (relaxed fp32 atomics:
      no ordering is needed, only the sum, and the default acq_rel semantics would add a
      memory barrier per add on Hopper). Not deterministic: fp32 sums in arbitrary order.
    coords: d out/d x_d = scale * sum_corners (+1 if bit d else -1) * prod_{e!=d} w_e
      * <entry, grad_out>, zero where the clamp is active (x <= 0, x >= 1 or NaN).
      Summed over levels, which live in different programs: either atomic adds into
      (N, G, D) (COORD_ATOMIC; L adds per value, spread out in time, so little contention)
      or one (L, N, G, D) slice per level summed afterwards (deterministic, L x the bytes)."""
    n, mask, row, l, res, scale, dense, level_row, cell, t, inside = _program_setup(
        coords_ptr, res_ptr, scale_ptr, offset_ptr, dense_ptr, N, G, num_entries,
        D, F, BLOCK, ACC, LEVELS_INNER, IDX64, STAGGERED)
    f = tl.arange(0, F)
    go = tl.load(grad_out_ptr + row[:, None] * (L * F) + l * F + f[None, :],
                 mask=mask[:, None], other=0.0).to(ACC)
    dots = ()  # <entry, grad_out> per corner, for the coordinate gradient
    for corner in tl.static_range(2 ** D):
        idx = corner_index_tl(cell, corner, res, dense, hash_mask, D)
        if IDX64:
            idx = idx.to(tl.int64)
        entry_off = level_row + idx[:, None] * F + f[None, :]
        if TABLE_GRAD:
            w = corner_weight_tl(t, corner, D)
            tl.atomic_add(grad_tables_ptr + entry_off, w[:, None] * go,
                          mask=mask[:, None], sem="relaxed")
        if COORD_GRAD:
            entry = tl.load(tables_ptr + entry_off, mask=mask[:, None], other=0.0).to(ACC)
            dots = dots + (tl.sum(entry * go, axis=1),)
    if COORD_GRAD:
        for d in tl.static_range(D):
            gd = tl.zeros_like(t[0])
            for corner in tl.static_range(2 ** D):
                dw = corner_weight_tl(t, corner, D, d)      # prod over e != d
                if (corner >> d) & 1:
                    gd += dw * dots[corner]
                else:
                    gd -= dw * dots[corner]
            gd = tl.where(inside[d], gd * scale, 0.0)
            if COORD_ATOMIC:
                tl.atomic_add(grad_coords_ptr + row * D + d, gd, mask=mask, sem="relaxed")
            else:
                tl.store(grad_coords_ptr + (l * N * G + row) * D + d, gd, mask=mask)


# ---- host side ---------------------------------------------------------------------------

_INTERPRETED = isinstance(_grid_fwd_kernel, InterpretedFunction)
_META_CACHE = {}
_INT32_LIMIT = 2 ** 31  # element counts from here on need int64 offsets (tests lower it)


def triton_problem(device):
    """why the Triton kernels cannot run on `device`, or None"""
    if torch.device(device).type != "cuda" and not _INTERPRETED:
        return ("grid_lookup(backend='triton') got CPU tensors, but Triton runs on the CPU only in its "
                "interpreter: set TRITON_INTERPRET=1 before Python starts (slow, for tests), or use --backend torch")
    return None


def triton_unfit(spec):
    """why the Triton kernels cannot run `spec`'s grid, or None: the corner loop is unrolled for
    up to 4 dimensions and a corner's F features are one vector load (a power of 2)"""
    if spec.dim > 4 or spec.features & (spec.features - 1) or spec.features > 64:
        return (f"the Triton kernels need D <= 4 and F a power of 2 up to 64, got D={spec.dim}, "
                f"F={spec.features}: use --backend torch")
    return None


def _level_meta(spec, device, dtype):
    """Per-level (resolution, scale, offset, dense) as tensors on the device, cached: int32,
    the scales in the lookup's dtype, the offsets int64 where a group's table has 2^31
    entries or more (8 GB of fp32 at F = 1)."""
    wide = spec.num_entries >= _INT32_LIMIT
    key = (spec, str(device), dtype, wide)
    if key not in _META_CACHE:
        i32 = dict(dtype=torch.int32, device=device)
        _META_CACHE[key] = (torch.tensor(spec.resolutions, **i32),
                            torch.tensor(spec.scales, dtype=dtype, device=device),
                            torch.tensor(spec.offsets, dtype=torch.int64 if wide else torch.int32, device=device),
                            torch.tensor([int(d) for d in spec.dense], **i32))
    return _META_CACHE[key]


def _acc_dtype(coords, tables):
    """the kernels' accumulation dtype: float64 if either input is, else float32"""
    return torch.float64 if torch.float64 in (coords.dtype, tables.dtype) else torch.float32


def _launch_args(coords, tables, spec, block):
    N, G, D = coords.shape
    L, Fe = spec.levels, spec.features
    if coords.is_cuda != tables.is_cuda:
        raise ValueError("grid_lookup_triton: coords and tables must be on the same device")
    if why := triton_problem(coords.device):
        raise RuntimeError(why)
    if D != spec.dim:
        raise ValueError(f"grid_lookup_triton: coords have D={D}, the spec {spec.dim}")
    if why := triton_unfit(spec):
        raise ValueError(f"grid_lookup_triton: {why}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"grid_lookup_triton: block must be a power of 2 >= 16, got {block}")
    # int32 offsets unless some tensor has 2^31 or more elements
    idx64 = max(G * spec.num_entries * Fe, N * G * L * Fe, L * N * G * D) >= _INT32_LIMIT
    nblocks = triton.cdiv(N, block)
    levels_inner = LEVELS_INNER and nblocks < 65536  # grid axes 1 and 2 stop at 65535
    grid = (L, nblocks, G) if levels_inner else (nblocks, G, L)
    acc = _acc_dtype(coords, tables)
    common = dict(N=N, G=G, L=L, num_entries=spec.num_entries, hash_mask=spec.table_size - 1,
                  D=D, F=Fe, BLOCK=block, ACC=tl.float64 if acc == torch.float64 else tl.float32,
                  LEVELS_INNER=levels_inner, IDX64=idx64, STAGGERED=spec.staggered, num_warps=NUM_WARPS)
    return grid, _level_meta(spec, coords.device, acc), common


class _GridLookupTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coords, tables, spec, block):
        coords, tables = coords.contiguous(), tables.contiguous()
        N, G, _ = coords.shape
        grid, meta, common = _launch_args(coords, tables, spec, block)
        out = torch.empty(N, G, spec.levels * spec.features, device=coords.device,
                          dtype=torch.promote_types(coords.dtype, tables.dtype))
        if N:  # an empty grid is not a valid launch
            _grid_fwd_kernel[grid](coords, tables, out, *meta, **common)
        ctx.save_for_backward(coords, tables)
        ctx.spec, ctx.block = spec, block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        coords, tables = ctx.saved_tensors
        spec, (N, G, D), L = ctx.spec, coords.shape, ctx.spec.levels
        need_coords, need_tables = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grid, meta, common = _launch_args(coords, tables, spec, ctx.block)
        acc = _acc_dtype(coords, tables)
        grad_tables = torch.zeros(tables.shape, device=tables.device, dtype=acc) \
            if need_tables else tables  # a dummy pointer when unused
        if need_coords and COORD_GRAD_ATOMIC:
            grad_coords = torch.zeros(N, G, D, device=coords.device, dtype=acc)
        elif need_coords:
            grad_coords = torch.empty(L, N, G, D, device=coords.device, dtype=acc)
        else:
            grad_coords = coords
        if N and (need_coords or need_tables):
            _grid_bwd_kernel[grid](coords, tables, grad_out.contiguous(), grad_tables,
                                   grad_coords, *meta, **common, TABLE_GRAD=need_tables,
                                   COORD_GRAD=need_coords, COORD_ATOMIC=COORD_GRAD_ATOMIC)
        if need_coords and not COORD_GRAD_ATOMIC:
            grad_coords = grad_coords.sum(0)
        return (grad_coords.to(coords.dtype) if need_coords else None,
                grad_tables.to(tables.dtype) if need_tables else None, None, None)


def grid_lookup_triton(coords, tables, spec, block=None):
    """The Triton lookup (forward and both gradients); block = points per program
    (default BLOCK_POINTS; tests under the interpreter pass a large one)."""
    return _GridLookupTriton.apply(coords, tables, spec, block or BLOCK_POINTS)


# ---- benchmark: python hashgrid_triton.py [--only tiny|paper] [--repeats R] [--variants] ----

def benchmark_inputs(images, side, G, spec, device):
    """BRIGHT's queries for a batch of images with a side x side feature map: (x, y) = pixel
    centres, repeated per image, and a random key code (C_key = spec.dim - 2 channels) per group;
    tables initialised as in BRIGHT; a random grad_out. -> coords (N, G, D), tables, grad_out"""
    N, gen = images * side * side, torch.Generator().manual_seed(0)
    ij = (torch.arange(side) + 0.5) / side
    xy = torch.stack(torch.meshgrid(ij, ij, indexing="xy"), -1).reshape(1, -1, 1, 2)
    coords = torch.cat([xy.expand(images, -1, G, 2).reshape(N, G, 2),
                        torch.rand(N, G, spec.dim - 2, generator=gen)], -1)
    tables = (torch.rand(G, spec.num_entries, spec.features, generator=gen) * 2 - 1) * 1e-4
    grad = torch.randn(N, G, spec.levels * spec.features, generator=gen)
    return coords.to(device), tables.to(device), grad.to(device)


def _benchmark():
    import argparse
    import statistics
    import time

    ap = argparse.ArgumentParser(description="time the grid lookup backends")
    ap.add_argument("--only", choices=["tiny", "paper"], help="run one configuration")
    ap.add_argument("--repeats", type=int, default=10,
                    help="timed runs at most, median reported (3 at least, more until they total 3 s)")
    ap.add_argument("--cpu-batch", type=int, default=1,
                    help="images per batch for 'paper' on CPU (16 on GPU)")
    ap.add_argument("--variants", action="store_true",
                    help="CUDA: also time Triton launch-order / coordinate-gradient / block variants")
    ap.add_argument("--check", action="store_true",
                    help="CUDA: first compare the Triton output and gradients with the reference")
    args = ap.parse_args()
    if args.repeats < 3 or args.cpu_batch < 1:
        ap.error("--repeats must be at least 3 and --cpu-batch at least 1")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    global LEVELS_INNER, COORD_GRAD_ATOMIC, BLOCK_POINTS

    # (name, images, pixels per side, groups, spec); 'tiny' is the tiny training preset's batch
    # (8 images, a 16x16 feature map, 4 groups), 'paper' is BRIGHT's grid as the paper presets
    # build it: D = 3, L = 16, F = 4, T = 2^18, res 16 -> 64, staggered, 16 groups, a 64x64 feature map
    configs = [("tiny", 8, 16, 4, GridSpec(3, 8, 2, 14, 8, 32)),
               ("paper", 16, 64, 16, GridSpec(3, 16, 4, 18, 16, 64, staggered=True))]
    if cuda:
        name = torch.cuda.get_device_name()
        # device-to-device copy of 1 GiB: the bandwidth a streaming kernel can reach
        a = torch.empty(2 ** 28, device=device); b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        sync(); t0 = time.perf_counter()
        for _ in range(10):
            b.copy_(a)
        sync(); copy_bw = 2 * a.numel() * 4 * 10 / (time.perf_counter() - t0)
        del a, b
        print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; "
              f"measured copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads); torch {torch.__version__}. "
              "Triton rows skipped: its CPU interpreter is far too slow to time"
              + (" (and so are --check and --variants)." if args.check or args.variants else "."))

    def timeit(fn):
        fn()  # warm-up: Triton compiles, caches fill
        times = []
        while len(times) < 3 or (len(times) < args.repeats and sum(times) < 3.0):
            sync(); t0 = time.perf_counter(); fn(); sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    for cname, images, side, G, spec in configs:
        if args.only and cname != args.only:
            continue
        if not cuda and cname == "paper" and args.cpu_batch != images:
            print(f"\n[{cname}] batch reduced from {images} to {args.cpu_batch} images on CPU "
                  "(--cpu-batch)")
            images = args.cpu_batch
        N, L, Fe, D = images * side * side, spec.levels, spec.features, spec.dim
        coords, tables, grad = benchmark_inputs(images, side, G, spec, device)
        lookups = N * G * L
        # compulsory bytes (fp32): forward reads coords and every table entry once, writes
        # out; backward reads coords, grad_out and the tables, zeroes and writes the table
        # gradient, writes the coordinate gradient. Random corner gathers really move more
        # (32-byte sectors), so the achieved fraction is a lower bound on the memory traffic.
        tab_bytes = G * spec.num_entries * Fe * 4
        fwd_bytes = 4 * (N * G * D + N * G * L * Fe) + tab_bytes
        bwd_bytes = fwd_bytes + 4 * (N * G * D + N * G * L * Fe + N * G * D) + 3 * tab_bytes
        print(f"\n[{cname}] N = {N} points ({images} x {side}x{side}), G = {G}, D = {D}, "
              f"L = {L}, F = {Fe}, T = 2^{spec.log2_table_size}, res "
              f"{spec.resolutions[0]}->{spec.resolutions[-1]}, "
              f"{sum(spec.dense)}/{L} levels dense{', staggered' if spec.staggered else ''}; "
              f"{lookups / 1e6:.1f} M point-levels per pass "
              f"(N*G*L)")
        if cuda and args.check:  # max |triton - reference| relative to max |reference|
            res = []
            for backend in ("reference", "triton"):
                c, t = coords.clone().requires_grad_(), tables.clone().requires_grad_()
                out = grid_lookup(c, t, spec, backend)
                out.backward(grad)
                res.append((out.detach(), c.grad, t.grad))
            err = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*res[::-1])]
            print("  check triton vs reference, max|diff|/max|ref|: out {:.1e}, d/dcoords "
                  "{:.1e}, d/dtables {:.1e}".format(*err))
            del res, out
        print(f"  {'backend':<34}{'fwd ms':>9}{'Mlookup/s':>11}{'x ref':>7}"
              f"{'fwd+bwd ms':>12}{'Mlookup/s':>11}{'x ref':>7}" + ("  GB/s fwd, f+b (% copy)" if cuda else ""))
        rows = [("reference", "reference", None), ("torch (fast path)", "torch", None)]
        if cuda:
            rows.append(("triton", "triton", None))
            if args.variants:
                rows += [("triton LEVELS_INNER=False", "triton", ("LEVELS_INNER", False)),
                         ("triton COORD_GRAD_ATOMIC=False", "triton", ("COORD_GRAD_ATOMIC", False)),
                         ("triton BLOCK_POINTS=256", "triton", ("BLOCK_POINTS", 256)),
                         ("triton BLOCK_POINTS=64", "triton", ("BLOCK_POINTS", 64))]
        ref = None
        for label, backend, variant in rows:
            saved = (LEVELS_INNER, COORD_GRAD_ATOMIC, BLOCK_POINTS)
            if variant:
                globals()[variant[0]] = variant[1]
            c, t = coords.clone().requires_grad_(), tables.clone().requires_grad_()

            def fwd():
                with torch.no_grad():
                    grid_lookup(c, t, spec, backend)

            def fwd_bwd():
                c.grad = t.grad = None
                grid_lookup(c, t, spec, backend).backward(grad)

            try:
                tf, tb = timeit(fwd), timeit(fwd_bwd)
            finally:
                LEVELS_INNER, COORD_GRAD_ATOMIC, BLOCK_POINTS = saved
            ref = ref or (tf, tb)
            line = (f"  {label:<34}{tf * 1e3:9.3f}{lookups / tf / 1e6:11.4g}{ref[0] / tf:7.1f}"
                    f"{tb * 1e3:12.3f}{lookups / tb / 1e6:11.4g}{ref[1] / tb:7.1f}")
            if cuda:
                line += (f"  {fwd_bytes / tf / 1e9:6.0f} ({100 * fwd_bytes / tf / copy_bw:3.0f}%),"
                         f" {bwd_bytes / tb / 1e9:6.0f} ({100 * bwd_bytes / tb / copy_bw:3.0f}%)")
            print(line, flush=True)


if __name__ == "__main__":
    try:
        _benchmark()
    except KeyboardInterrupt:  # Ctrl-C: the rows printed so far stand; one line, not a traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
