"""
Grouped multi-resolution hash-grid lookup: the naive torch reference, a faster torch
path for CPU training, and the Triton kernels checked against the reference.

Data layout (shared by every backend)
-------------------------------------
coords  (N, G, D)               float32, one D-dim query per point and group, in [0, 1].
                                Values outside are clamped to [0, 1] and NaN reads as 0;
                                a clamped coordinate, or one exactly 0 or 1, gets gradient 0
                                (the clamp is taken as active on the boundary, which is also
                                what F.grid_sample does, so every backend agrees).
tables  (G, spec.num_entries, F) one flat table per group; level l owns the rows
                                [spec.offsets[l], spec.offsets[l] + spec.sizes[l]).
out     (N, G, L*F)             level-major: out[n, g, l*F + f].

Level l has resolution res_l (geometric from min_res to max_res, as in Instant-NGP) and
(res_l + 1)^D vertices: vertex c (integer, 0..res_l per dimension) sits at c / res_l, so
x = 0 and x = 1 are vertices. A level whose vertices fit in T = 2^t entries is dense
(row-major, dimension 0 fastest); a larger one is hashed: XOR of c_d * prime_d, mod T, in
uint32 arithmetic. Each level's size is rounded up to a multiple of 8 entries so that
every level starts 32-byte aligned (vector loads in the kernels).

Multilinear interpolation over the 2^D corners of the cell holding x:
    pos = x * res, cell = min(floor(pos), res - 1), t = pos - cell  (t in [0, 1])
    out = sum_corners  w_corner * table[index(cell + corner)],
    w_corner = prod_d (t_d if corner_d else 1 - t_d)
Gradients
    d out / d table[index(corner)] = w_corner                          (a scatter-add)
    d out / d x_d = res * sum_corners (+1 if corner_d else -1) * prod_{e != d} w_e * entry
"""
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    # derived, per level (filled in __post_init__)
    resolutions: tuple = field(init=False)
    dense: tuple = field(init=False)
    sizes: tuple = field(init=False)
    offsets: tuple = field(init=False)
    num_entries: int = field(init=False)

    def __post_init__(self):
        if not 1 <= self.dim <= len(PRIMES):
            raise ValueError(f"GridSpec: dim must be in 1..{len(PRIMES)}, got {self.dim}")
        if self.levels < 1 or self.features < 1 or not 1 <= self.max_res / self.min_res:
            raise ValueError(f"GridSpec: bad levels/features/resolutions in {self}")
        if not 3 <= self.log2_table_size <= 30:
            raise ValueError("GridSpec: log2_table_size must be in 3..30")
        T = 1 << self.log2_table_size
        growth = (math.log(self.max_res) - math.log(self.min_res)) / max(self.levels - 1, 1)
        res, dense, sizes, offsets, total = [], [], [], [], 0
        for l in range(self.levels):
            # -1e-9: 16 * 4^(15/15) must give 64, not 65, despite float rounding
            r = max(1, math.ceil(self.min_res * math.exp(growth * l) - 1e-9))
            vertices = (r + 1) ** self.dim
            is_dense = vertices <= T
            n = (vertices + 7) // 8 * 8 if is_dense else T
            res.append(r); dense.append(is_dense); sizes.append(n); offsets.append(total)
            total += n
        set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass
        set_("resolutions", tuple(res)); set_("dense", tuple(dense))
        set_("sizes", tuple(sizes)); set_("offsets", tuple(offsets)); set_("num_entries", total)

    @property
    def table_size(self):
        return 1 << self.log2_table_size


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


def cell_and_frac(x, res):
    """x (..., D) in [0,1] -> integer cell (..., D) in [0, res-1] and t (..., D) in [0,1]."""
    pos = x * res
    cell = pos.detach().floor().clamp(max=res - 1)  # x = 1 belongs to the last cell
    return cell.long(), pos - cell


def grid_lookup_reference(coords, tables, spec):
    """The naive lookup, written for clarity: one gather per corner per level.
    coords (N, G, D), tables (G, num_entries, F) -> (N, G, L*F); autograd does the gradients."""
    N, G, D = coords.shape
    x = clamp_coords(coords)
    group = torch.arange(G, device=coords.device).expand(N, G)  # (N, G)
    out = []
    for l in range(spec.levels):
        cell, t = cell_and_frac(x, spec.resolutions[l])  # (N, G, D) each
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
    vertex 0 at x = 0, vertex res at x = 1) interpolates it with both gradients in one fused
    op; other levels gather all 2^D corners at once instead of one corner at a time."""
    N, G, D = coords.shape
    Fe = spec.features
    x = clamp_coords(coords)
    bits = torch.tensor([[(k >> d) & 1 for d in range(D)] for k in range(2 ** D)],
                        device=coords.device)  # (2^D, D)
    out = []
    for l in range(spec.levels):
        r, off = spec.resolutions[l], spec.offsets[l]
        if spec.dense[l] and D in (2, 3):
            n = (r + 1) ** D
            vol = tables[:, off:off + n].reshape(G, *([r + 1] * D), Fe)  # (G, [c_{D-1}..c_0], F)
            vol = vol.movedim(-1, 1)                                    # (G, F, [c_{D-1}..c_0])
            grid = (2 * x - 1).transpose(0, 1).reshape(G, *([1] * (D - 1)), N, D)  # (G, 1.., N, D)
            y = F.grid_sample(vol, grid, mode="bilinear", padding_mode="border", align_corners=True)
            out.append(y.reshape(G, Fe, N).permute(2, 0, 1))            # (N, G, F)
            continue
        cell, t = cell_and_frac(x, r)                                   # (N, G, D)
        c = cell[:, :, None, :] + bits                                  # (N, G, 2^D, D)
        tt = t[:, :, None, :]
        w = torch.where(bits.bool(), tt, 1 - tt).prod(-1)               # (N, G, 2^D)
        idx = off + corner_index(c, spec, l)                            # (N, G, 2^D)
        g = torch.arange(G, device=coords.device)[None, :, None]
        entry = tables[g, idx]                                          # (N, G, 2^D, F)
        out.append((w[..., None] * entry).sum(2))
    return torch.cat(out, dim=-1)


def grid_lookup(coords, tables, spec, backend="torch"):
    """coords (N, G, D) in [0,1] (clamped), tables (G, spec.num_entries, F) -> (N, G, L*F).
    backend: "torch" (fast torch path), "reference" (naive), "triton", or "auto"
    (triton on CUDA tensors, torch otherwise)."""
    if coords.dim() != 3 or coords.shape[-1] != spec.dim or coords.shape[1] != tables.shape[0]:
        raise ValueError(f"grid_lookup: coords {tuple(coords.shape)} do not match "
                         f"tables {tuple(tables.shape)} and dim {spec.dim}")
    if tables.shape[1:] != (spec.num_entries, spec.features):
        raise ValueError(f"grid_lookup: tables {tuple(tables.shape)} do not match the spec "
                         f"(G, {spec.num_entries}, {spec.features})")
    if backend == "auto":
        backend = "triton" if coords.is_cuda else "torch"
    if backend == "reference":
        return grid_lookup_reference(coords, tables, spec)
    if backend == "torch":
        return grid_lookup_fast(coords, tables, spec)
    if backend == "triton":
        return grid_lookup_triton(coords, tables, spec)
    raise ValueError(f"grid_lookup: unknown backend {backend!r} (torch, reference, triton, auto)")


def grid_lookup_triton(coords, tables, spec):
    raise NotImplementedError("the Triton kernels are not written yet")
