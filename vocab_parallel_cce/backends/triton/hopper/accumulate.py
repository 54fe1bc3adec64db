"""A float32 accumulator plus a bf16 product on Hopper (sm_90a), in Gluon: out (+)= A·B.

The memory-first backward adds each vocabulary chunk's product into float32 accumulators:
dE [N, D] += G_chunk·C_chunk, and with `dc_accumulate_into` main_grad[chunk] += G_chunkᵀ·E. Every
chunk reads and writes the whole accumulator (M·NN·8 bytes). A library GEMM with beta = 1 reads
the old tile in its epilogue, after the tile's products, so that traffic adds to the chunk's time;
at narrow chunks (K ≈ 1024) it is about as long as the products themselves.

Here each consumer TMA-loads the old tile into shared memory as its main loop starts, so the read
runs under the products, and two consumers (one warpgroup each) take alternate tiles with their
main loops taking turns (ping-pong, as in logits.py), so one tile's add and TMA store run under
the other tile's products. A one-warp partition TMA-loads A [BM, BK] (or Aᵀ [BK, BM] blocks where
A is given transposed) and B [BK, BN] blocks into a ring of shared-memory slots. Columns past K
and rows/columns past the output's edges are TMA's zero fill and clipped stores: no padding.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .logits import _split_columns, _tile_coords, accumulator_layout


@gluon.jit
def _load_partition(a_desc, b_desc, a_bufs, b_bufs, ready, empty, n_rows, n_cols, k_dim, BM: gl.constexpr,
                    BN: gl.constexpr, BK: gl.constexpr, TRANS_A: gl.constexpr, GROUP_M: gl.constexpr):
    """One warp: this program's (tile, k-block) stream, TMA'd into the ring as slots free up."""
    S: gl.constexpr = a_bufs.shape[0]
    n_m, n_n, k_tiles = gl.cdiv(n_rows, BM), gl.cdiv(n_cols, BN), gl.cdiv(k_dim, BK)
    count = 0
    for tile in range(gl.program_id(0), n_m * n_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, n_m, n_n, GROUP_M)
        for k in range(k_tiles):
            s = count % S
            # a fresh barrier is in phase 0: waiting for parity 1 passes, so each slot's first fill waits for nothing
            mbarrier.wait(empty.index(s), ((count // S) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            if TRANS_A:
                tma.async_copy_global_to_shared(a_desc, [k * BK, pid_m * BM], bar, a_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM, k * BK], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [k * BK, pid_n * BN], bar, b_bufs.index(s))
            count += 1


@gluon.jit
def _mma_partition(a_bufs, b_bufs, ready, empty, turn, old_bar, out_desc, out_smem, n_rows, n_cols, k_dim,
                   ACCUMULATE: gl.constexpr, TRANS_A: gl.constexpr, GROUP_M: gl.constexpr, BM: gl.constexpr,
                   BN: gl.constexpr, BK: gl.constexpr, CONSUMER: gl.constexpr, CONSUMERS: gl.constexpr,
                   WARPS: gl.constexpr):
    """One consumer: per tile of its stream (every CONSUMERS-th of the program's), the wgmma main
    loop over the ring, then out = acc (+ old) through out_smem [BM, BN / SLICES] by TMA, slice by
    slice. With one slice (out_smem holds the whole tile) the old tile's load is issued before the
    main loop, so it runs under the products; with several, each slice's load is waited for in the
    epilogue (under the other consumer's products). Turns and ring phases as in logits._mma_partition."""
    S: gl.constexpr = a_bufs.shape[0]
    SLICE: gl.constexpr = out_smem.shape[1]
    SLICES: gl.constexpr = BN // SLICE
    LAYOUT: gl.constexpr = accumulator_layout(BM, BN, WARPS)
    SLICE_LAYOUT: gl.constexpr = accumulator_layout(BM, SLICE, WARPS)
    n_m, n_n, k_tiles = gl.cdiv(n_rows, BM), gl.cdiv(n_cols, BN), gl.cdiv(k_dim, BK)
    j = 0
    loads = 0  # old-tile loads so far: the parity of the next one's phase
    for tile in range(gl.program_id(0) + CONSUMER * gl.num_programs(0), n_m * n_n, gl.num_programs(0) * CONSUMERS):
        pid_m, pid_n = _tile_coords(tile, n_m, n_n, GROUP_M)
        count = (j * CONSUMERS + CONSUMER) * k_tiles  # the loader's count of this tile's first k-block
        if CONSUMERS > 1:  # consumer 0's first wait passes on the fresh barrier (parity 1)
            mbarrier.wait(turn.index(CONSUMER), (j & 1) ^ (1 - CONSUMER))
        if ACCUMULATE and SLICES == 1:  # the previous tile's store has read out_smem: prefetch the old tile
            tma.store_wait(pendings=0)
            mbarrier.expect(old_bar, out_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(out_desc, [pid_m * BM, pid_n * BN], old_bar, out_smem)
        acc = gl.zeros([BM, BN], gl.float32, LAYOUT)
        for k in range(k_tiles):
            s = count % S
            mbarrier.wait(ready.index(s), (count // S) & 1)
            if TRANS_A:
                a = a_bufs.index(s).permute((1, 0))
            else:
                a = a_bufs.index(s)
            acc = warpgroup_mma(a, b_bufs.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((count + S - 1) % S), pred=k > 0)
            count += 1
        if CONSUMERS > 1:  # every k-block of this tile is issued: the other consumer's turn
            mbarrier.arrive(turn.index(1 - CONSUMER))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((count + S - 1) % S))
        parts = _split_columns(acc, SLICES)
        for i in gl.static_range(SLICES):
            part = gl.convert_layout(parts[i], SLICE_LAYOUT, assert_trivial=True)
            col = pid_n * BN + i * SLICE
            if SLICES > 1:
                tma.store_wait(pendings=0)
                if ACCUMULATE:
                    mbarrier.expect(old_bar, out_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(out_desc, [pid_m * BM, col], old_bar, out_smem)
            elif not ACCUMULATE:
                tma.store_wait(pendings=0)
            if ACCUMULATE:
                mbarrier.wait(old_bar, loads & 1)
                loads += 1
                part = part + out_smem.load(SLICE_LAYOUT)
            out_smem.store(part)
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [pid_m * BM, col], out_smem)
        j += 1
    tma.store_wait(pendings=0)


@gluon.jit
def accumulate_kernel(a_desc, b_desc, out_desc, n_rows, n_cols, k_dim, ACCUMULATE: gl.constexpr,
                      TRANS_A: gl.constexpr, NUM_STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                      CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                      num_warps: gl.constexpr):
    """out [n_rows, n_cols] float32 (+)= A·B over k_dim, tiles [BM, BN] (the output descriptor's
    block), by CONSUMERS (1 or 2) consumers of num_warps warps and a loader warp.
    a_desc: A [n_rows, k_dim] blocks [BM, BK], or with TRANS_A Aᵀ [k_dim, n_rows] blocks [BK, BM];
    b_desc: B [k_dim, n_cols] blocks [BK, BN]; out_desc: float32 [n_rows, n_cols] blocks
    [BM, BN / SLICES], one slice of a tile.
    ACCUMULATE: add to out's contents (else overwrite them, never reading them)."""
    BK: gl.constexpr = b_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[1]
    BM: gl.constexpr = out_desc.block_type.shape[0]
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + b_desc.block_type.shape, b_desc.layout)
    out_smem = gl.allocate_shared_memory(gl.float32, [CONSUMERS] + out_desc.block_type.shape, out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    old = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
        mbarrier.init(old.index(i), count=1)
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_mma_partition, (a_bufs, b_bufs, ready, empty, turn, old.index(0), out_desc, out_smem.index(0), n_rows,
                              n_cols, k_dim, ACCUMULATE, TRANS_A, GROUP_M, BM, BN, BK, 0, 1, num_warps)),
            (_load_partition, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, n_rows, n_cols, k_dim, BM, BN, BK,
                               TRANS_A, GROUP_M)),
        ], [1], [LOADER_REGS])
    else:
        gl.warp_specialize([
            (_mma_partition, (a_bufs, b_bufs, ready, empty, turn, old.index(0), out_desc, out_smem.index(0), n_rows,
                              n_cols, k_dim, ACCUMULATE, TRANS_A, GROUP_M, BM, BN, BK, 0, 2, num_warps)),
            (_mma_partition, (a_bufs, b_bufs, ready, empty, turn, old.index(1), out_desc, out_smem.index(1), n_rows,
                              n_cols, k_dim, ACCUMULATE, TRANS_A, GROUP_M, BM, BN, BK, 1, 2, num_warps)),
            (_load_partition, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, n_rows, n_cols, k_dim, BM, BN, BK,
                               TRANS_A, GROUP_M)),
        ], [num_warps, 1], [CONSUMER_REGS, LOADER_REGS])


# ---- launcher ----------------------------------------------------------------------------------

# (BM, BN, BK, NUM_STAGES, GROUP_M, num_warps, CONSUMERS, SLICES).
CONFIG = (64, 256, 64, 4, 8, 4, 2, 4)
MAXNREG, CONSUMER_REGS, LOADER_REGS = 168, 240, 24


def _descriptor(t, shape, block, dtype):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return TensorDescriptor(t, list(shape), [t.stride()[0], 1], list(block), layout)


def launch(out, a, b, accumulate: bool, *, trans_a: bool = False, num_sms: int = 132, config=None,
           warmup: bool = False):
    """out [M, NN] float32 (+)= a·b with a [M, K] (trans_a: given as aᵀ [K, M], e.g. G of a chunk
    for Gᵀ·E) and b [K, NN], bf16; every operand with unit last stride and 16-byte aligned base
    and rows. accumulate=False overwrites out (its old contents, even NaN, are never read).
    `warmup` compiles without running (returns the compiled kernel; the tensors may be stand-ins)."""
    bm, bn, bk, stages, group_m, warps, consumers, slices = config or CONFIG
    m, nn = out.shape
    k = a.shape[0] if trans_a else a.shape[1]
    a_desc = _descriptor(a, (k, m), (bk, bm), gl.bfloat16) if trans_a else _descriptor(a, (m, k), (bm, bk), gl.bfloat16)
    b_desc = _descriptor(b, (k, nn), (bk, bn), gl.bfloat16)
    out_desc = _descriptor(out, (m, nn), (bm, bn // slices), gl.float32)
    tiles = -(-m // bm) * -(-nn // bn)
    grid = (max(1, min(num_sms, -(-tiles // consumers))),)
    args = (a_desc, b_desc, out_desc, m, nn, k)
    kw = dict(ACCUMULATE=bool(accumulate), TRANS_A=bool(trans_a), NUM_STAGES=stages, GROUP_M=group_m,
              CONSUMERS=consumers, CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, num_warps=warps,
              maxnreg=MAXNREG)
    if warmup:
        return accumulate_kernel.warmup(*args, grid=grid, **kw)
    accumulate_kernel[grid](*args, **kw)
    return None
