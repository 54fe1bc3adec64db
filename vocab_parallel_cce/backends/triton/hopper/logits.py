"""The logits product z = E·C_rᵀ on Hopper (sm_90a), written in Gluon, with its epilogue fused.

One persistent, warp-specialised kernel walks [BM, BN] tiles of z [N, V_r] (bf16 operands, float32
accumulation in wgmma registers) in grouped order (GROUP_M row blocks per column block, so a C tile
and E's rows stay in L2). A one-warp partition issues the TMA loads of E [BM, BK] and C [BN, BK]
blocks into a ring of NUM_STAGES shared-memory slots (mbarriers `ready` / `empty`); consumers of
BM/16 warps run the async wgmma main loop and then the tile's epilogue. Either one consumer (two
warpgroups on a 128-row tile), or two (ping-pong: one warpgroup each on alternate 64-row tiles of
the program's stream, their main loops taking turns, so one tile's epilogue runs under the other
tile's products). The epilogue is one of

  MODE_LOGITS  (fast mode, forward): the tile rounded to bf16 is stored (TMA), and per row the
               tile's statistics of the float32 values:
                   m = max_j z_j,  s = Σ_j exp(z_j − m),  s̃ = Σ_j exp(bf16(z_j) − m)  [, Σ_j z_j]
               (s gives the loss's lse, exact to float32; s̃ the lse of the stored logits, which
               the gradient p_ij = exp(bf16(z_ij) − lsẽ_i) needs, as the unfused layer's);
  MODE_STATS   (memory-first forward): m, s [, Σ_j z_j] [, q = Σ_j exp(z_j − m)·z_j]; nothing is
               stored (q: the entropy's pz = Σ_j p_j z_j after the merge);
  MODE_GRAD    (memory-first backward): G_ij = a_i·p_ij + b_i·[j = t_i] + u_i [+ q_i·p_ij·(z_ij − pz_i)]
               with p_ij = exp(z_ij − lse_i), stored in bf16 (the chunk of logit gradients the dE
               and dC products read).
With a temperature, z = (E·C_rᵀ)·inv_temp throughout and G carries the factor inv_temp.

Statistics go to float32 partials [k, T, N] (T = column tiles), merged per row by
`partials.merge` (lse = M + log Σ_T s·exp(m − M)). Columns ≥ `n_cols` (the shard's padding and
what lies past C's rows) take no part; rows ≥ N are never stored.
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

LOG2E = gl.constexpr(1.4426950408889634)
MODE_LOGITS = gl.constexpr(0)
MODE_STATS = gl.constexpr(1)
MODE_GRAD = gl.constexpr(2)


@gluon.constexpr_function
def accumulator_layout(BM, BN, num_warps):
    """wgmma's float32 accumulator: warps stacked along rows (16 each), one instruction spans BN."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])


@gluon.jit
def _tile_coords(tile, n_m, n_n, GROUP_M: gl.constexpr):
    """(row block, column block) of the tile-th tile in grouped order: GROUP_M row blocks share
    each column block before the next one starts."""
    per_group = GROUP_M * n_n
    first_m = (tile // per_group) * GROUP_M
    size_m = gl.minimum(n_m - first_m, GROUP_M)
    return first_m + tile % size_m, (tile % per_group) // size_m


@gluon.jit
def _tile_counts(n_rows, n_cols, k_dim, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
    """(row blocks, column blocks, k-blocks): both partitions walk the same (tile, k-block) stream."""
    return gl.cdiv(n_rows, BM), gl.cdiv(n_cols, BN), gl.cdiv(k_dim, BK)


@gluon.jit
def _tiles_in_pair(first, n_tiles, CONSUMERS: gl.constexpr):
    """Tiles (1 or CONSUMERS) in the pair the consumers share whose first tile is `first`: the
    program's stream steps by num_programs, and only its last pair may be short."""
    return gl.minimum(gl.cdiv(n_tiles - first, gl.num_programs(0)), CONSUMERS)


@gluon.jit
def _load_block(e_desc, c_desc, e_bufs, c_bufs, ready, empty, count, pid_m, pid_n, k):
    """TMA k-block k of tile (pid_m, pid_n) into ring slot count % S once the slot is free."""
    BM: gl.constexpr = e_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[0]
    BK: gl.constexpr = e_desc.block_type.shape[1]
    S: gl.constexpr = e_bufs.shape[0]
    s = count % S
    # a fresh barrier is in phase 0: waiting for parity 1 passes, so each slot's first fill waits for nothing
    mbarrier.wait(empty.index(s), ((count // S) & 1) ^ 1)
    bar = ready.index(s)
    mbarrier.expect(bar, e_desc.block_type.nbytes + c_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(e_desc, [pid_m * BM, k * BK], bar, e_bufs.index(s))
    tma.async_copy_global_to_shared(c_desc, [pid_n * BN, k * BK], bar, c_bufs.index(s))


@gluon.jit
def _load_partition(e_desc, c_desc, e_bufs, c_bufs, ready, empty, n_rows, n_cols, k_dim,
                    GROUP_M: gl.constexpr, CONSUMERS: gl.constexpr, SLICE_TILES: gl.constexpr):
    """One warp: this program's (tile, k-block) stream, TMA'd into the ring as slots free up. With
    accumulator slices the stream goes slice by slice over each pair of tiles the consumers share
    (first tile's slice 0, second's slice 0, first's slice 1, ...), the order they issue them in."""
    BM: gl.constexpr = e_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[0]
    BK: gl.constexpr = e_desc.block_type.shape[1]
    n_m, n_n, k_tiles = _tile_counts(n_rows, n_cols, k_dim, BM, BN, BK)
    count = 0
    if SLICE_TILES == 0:
        for tile in range(gl.program_id(0), n_m * n_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, n_m, n_n, GROUP_M)
            for k in range(k_tiles):
                _load_block(e_desc, c_desc, e_bufs, c_bufs, ready, empty, count, pid_m, pid_n, k)
                count += 1
    else:
        step = gl.num_programs(0)
        for first in range(gl.program_id(0), n_m * n_n, step * CONSUMERS):
            pair = _tiles_in_pair(first, n_m * n_n, CONSUMERS)
            for k0 in range(0, k_tiles, SLICE_TILES):
                k1 = gl.minimum(k0 + SLICE_TILES, k_tiles)
                for c in range(pair):
                    pid_m, pid_n = _tile_coords(first + c * step, n_m, n_n, GROUP_M)
                    for k in range(k0, k1):
                        _load_block(e_desc, c_desc, e_bufs, c_bufs, ready, empty, count, pid_m, pid_n, k)
                        count += 1


@gluon.jit
def _split_columns(x, PARTS: gl.constexpr):
    """A [BM, BN] register tile as PARTS tiles [BM, BN / PARTS] (column order), without data movement."""
    xs = (x,)
    for _ in gl.static_range(PARTS.bit_length() - 1):
        halves = ()
        for i in gl.static_range(len(xs)):
            y = xs[i]
            halves += y.reshape(y.shape[0], 2, y.shape[1] // 2).permute(0, 2, 1).split()
        xs = halves
    return xs


@gluon.jit
def _unpack_pairs(high):
    """float32 (a, b) of the pairs `high`: a's 16 high bits in its low half, b's in its high half."""
    return (high << 16).to(gl.float32, bitcast=True), (high & -65536).to(gl.float32, bitcast=True)


@gluon.jit
def _columns(acc):
    """The accumulator's even and odd columns, [BM, BN / 2] each (pairs each thread holds)."""
    return acc.reshape(acc.shape[0], acc.shape[1] // 2, 2).split()


@gluon.jit
def _joined(a, b, LAYOUT: gl.constexpr):
    """`_columns` inverted."""
    return gl.convert_layout(gl.join(a, b).reshape(a.shape[0], 2 * a.shape[1]), LAYOUT)


@gluon.jit
def _carry_high(acc, high, LAYOUT: gl.constexpr):
    """(z₀ − h, h) for the sum so far z₀ = acc + high: h is z₀ with the 16 low bits of its float32
    cleared (a bf16 value, |z₀ − h| < 2⁻⁷·|z₀|, the difference exact), kept as pairs in int32."""
    a, b = _columns(acc)
    high_a, high_b = _unpack_pairs(high)
    a, b = a + high_a, b + high_b
    bits_a = a.to(gl.int32, bitcast=True) & -65536
    bits_b = b.to(gl.int32, bitcast=True) & -65536
    high = ((bits_a >> 16) & 0xFFFF) | bits_b
    rest_a = a - bits_a.to(gl.float32, bitcast=True)
    rest_b = b - bits_b.to(gl.float32, bitcast=True)
    return _joined(rest_a, rest_b, LAYOUT), high


@gluon.jit
def _add_high(acc, high, LAYOUT: gl.constexpr):
    """acc + the pairs `high` (`_carry_high`)."""
    a, b = _columns(acc)
    high_a, high_b = _unpack_pairs(high)
    return _joined(a + high_a, b + high_b, LAYOUT)


@gluon.jit
def _row_stats(z, z_rounded, valid, MODE: gl.constexpr, NEED_SUM: gl.constexpr, NEED_PZ: gl.constexpr):
    """Per row of a float32 tile z (−inf at invalid columns): (m, s, s̃, Σz, q) as in the module
    docstring, s̃ from z_rounded = bf16(z) (MODE_LOGITS), Σz only with NEED_SUM, q only with
    NEED_PZ (0 stands in for those left out). m is finite: every tile holds a valid column."""
    m = gl.max(z, axis=1)
    total = gl.zeros_like(m)
    if NEED_SUM:
        total = gl.sum(gl.where(valid, z, 0.0), axis=1)
    m_log2 = gl.expand_dims(m * LOG2E, 1)
    p = gl.exp2(z * LOG2E - m_log2)
    s = gl.sum(p, axis=1)
    s_rounded = gl.zeros_like(s)
    if MODE == MODE_LOGITS:
        s_rounded = gl.sum(gl.exp2(z_rounded.to(gl.float32) * LOG2E - m_log2), axis=1)
    q = gl.zeros_like(s)
    if NEED_PZ:  # p is 0 at invalid columns (z = −inf): their z is never multiplied in
        q = gl.sum(p * gl.where(valid, z, 0.0), axis=1)
    return m, s, s_rounded, total, q


@gluon.jit
def _merge_halves(a, b):
    """(m, s, s̃, Σz, q) of two column ranges of the same rows → of their union."""
    m = gl.maximum(a[0], b[0])
    wa = gl.exp2((a[0] - m) * LOG2E)
    wb = gl.exp2((b[0] - m) * LOG2E)
    return m, a[1] * wa + b[1] * wb, a[2] * wa + b[2] * wb, a[3] + b[3], a[4] * wa + b[4] * wb


@gluon.jit
def _store_partials(stats, rows, n_rows, pid_n, n_tiles, part_ptr, MODE: gl.constexpr, NEED_SUM: gl.constexpr,
                    NEED_PZ: gl.constexpr):
    """Row statistics of column tile pid_n into part_ptr [k, n_tiles, n_rows]: m, s, then s̃
    (MODE_LOGITS), then Σz (NEED_SUM), then q (NEED_PZ)."""
    plane = n_tiles * n_rows
    offs = pid_n * n_rows + rows
    ok = rows < n_rows
    gl.store(part_ptr + offs, stats[0], mask=ok)
    gl.store(part_ptr + plane + offs, stats[1], mask=ok)
    k = 2
    if MODE == MODE_LOGITS:
        gl.store(part_ptr + k * plane + offs, stats[2], mask=ok)
        k += 1
    if NEED_SUM:
        gl.store(part_ptr + k * plane + offs, stats[3], mask=ok)
        k += 1
    if NEED_PZ:
        gl.store(part_ptr + k * plane + offs, stats[4], mask=ok)


@gluon.jit
def _logit_grad(z, rows, cols, n_rows, col_base, lse_ptr, coef_ptr, t_ptr, coef_stride, HAS_PZ: gl.constexpr):
    """G = a·p + b·[j = t] + u [+ q·p·(z − pz)], p = exp(z − lse), over a float32 tile z; cols
    count from C's row 0, t from col_base (its column)."""
    ok = rows < n_rows
    lse = gl.load(lse_ptr + rows, mask=ok, other=0.0)
    a = gl.load(coef_ptr + rows, mask=ok, other=0.0)
    b = gl.load(coef_ptr + coef_stride + rows, mask=ok, other=0.0)
    u = gl.load(coef_ptr + 2 * coef_stride + rows, mask=ok, other=0.0)
    # t − col_base in int32: one compare per element (t outside the chunk can match no column)
    t = gl.minimum(gl.maximum(gl.load(t_ptr + rows, mask=ok, other=-1) - col_base, -1), 1 << 30).to(gl.int32)
    p = gl.exp2(z * LOG2E - gl.expand_dims(lse * LOG2E, 1))
    hit = gl.expand_dims(cols, 0) == gl.expand_dims(t, 1)
    g = gl.expand_dims(a, 1) * p + gl.where(hit, gl.expand_dims(b, 1), 0.0) + gl.expand_dims(u, 1)
    if HAS_PZ:  # the entropy's term, z − pz formed first (no cancellation of two large products)
        q = gl.load(coef_ptr + 3 * coef_stride + rows, mask=ok, other=0.0)
        pz = gl.load(coef_ptr + 4 * coef_stride + rows, mask=ok, other=0.0)
        g += gl.expand_dims(q, 1) * p * (z - gl.expand_dims(pz, 1))
    return g


@gluon.jit
def _epilogue(acc, pid_m, pid_n, out_desc, out_smem, part_ptr, lse_ptr, coef_ptr, t_ptr,
              n_rows, n_cols, n_tiles, col_base, inv_temp, MODE: gl.constexpr, NEED_SUM: gl.constexpr,
              NEED_PZ: gl.constexpr, HAS_TEMP: gl.constexpr, SPLIT: gl.constexpr, LAYOUT: gl.constexpr):
    """The tile's epilogue (module docstring), over SPLIT column slices of the accumulator; each
    bf16 slice leaves through out_smem and a TMA store that is waited for only at the next store."""
    BM: gl.constexpr = acc.shape[0]
    BN: gl.constexpr = acc.shape[1]
    SLICE: gl.constexpr = BN // SPLIT
    SLICE_LAYOUT: gl.constexpr = accumulator_layout(BM, SLICE, LAYOUT.warps_per_cta[0])
    rows = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, SLICE_LAYOUT))
    parts = _split_columns(acc, SPLIT)
    stats = (0.0, 0.0, 0.0, 0.0, 0.0)
    for i in gl.static_range(SPLIT):
        part = gl.convert_layout(parts[i], SLICE_LAYOUT, assert_trivial=True)
        if HAS_TEMP:
            part = part * inv_temp
        cols = pid_n * BN + i * SLICE + gl.arange(0, SLICE, layout=gl.SliceLayout(0, SLICE_LAYOUT))
        if MODE == MODE_GRAD:
            g = _logit_grad(part, rows, cols, n_rows, col_base, lse_ptr, coef_ptr, t_ptr, n_rows, NEED_PZ)
            if HAS_TEMP:
                g = g * inv_temp
            out = g.to(gl.bfloat16)
        else:
            valid = gl.expand_dims(cols < n_cols, 0)
            z = gl.where(valid, part, float("-inf"))
            # the store clips the columns past n_cols; the exp of bf16(−inf) is 0 there
            out = z.to(gl.bfloat16)
            here = _row_stats(z, out, valid, MODE, NEED_SUM, NEED_PZ)
            if i == 0:
                stats = here
            else:
                stats = _merge_halves(stats, here)
        if MODE != MODE_STATS:
            tma.store_wait(pendings=0)
            out_smem.store(out)
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [pid_m * BM, pid_n * BN + i * SLICE], out_smem)
    if MODE != MODE_GRAD:
        _store_partials(stats, rows, n_rows, pid_n, n_tiles, part_ptr, MODE, NEED_SUM, NEED_PZ)


@gluon.jit
def _issue_blocks(e_bufs, c_bufs, ready, empty, acc, count, n_k):
    """acc += the n_k k-blocks from ring position count on (one wgmma group in flight; each slot is
    released once the next block's wgmma is issued and the slot's has retired); (acc, count + n_k)."""
    S: gl.constexpr = e_bufs.shape[0]
    for k in range(n_k):
        s = count % S
        mbarrier.wait(ready.index(s), (count // S) & 1)
        acc = warpgroup_mma(e_bufs.index(s), c_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        # the previous k-block's wgmma has retired: its slot may be refilled
        mbarrier.arrive(empty.index((count + S - 1) % S), pred=k > 0)
        count += 1
    return acc, count


@gluon.jit
def _mma_partition(e_bufs, c_bufs, ready, empty, turn, out_desc, out_smem, part_ptr, lse_ptr, coef_ptr, t_ptr,
                   n_rows, n_cols, k_dim, col_base, inv_temp, MODE: gl.constexpr, NEED_SUM: gl.constexpr,
                   NEED_PZ: gl.constexpr, HAS_TEMP: gl.constexpr, SPLIT: gl.constexpr, GROUP_M: gl.constexpr,
                   CONSUMER: gl.constexpr, CONSUMERS: gl.constexpr, WARPS: gl.constexpr,
                   SLICE_TILES: gl.constexpr):
    """One consumer (WARPS warps on one tile): wgmma over the ring (one group in flight), then the
    epilogue. With two consumers, consumer c takes every other tile of the program's stream
    (stream index i = 2·j + c) and their main loops alternate (ping-pong): consumer c starts its
    j-th main loop once the other has issued its previous one (`turn` mbarriers), so one tile's
    epilogue runs while the other tile's products do, and each consumer waits on ring slots the
    loader fills next (an mbarrier's parity names its phase only within two of the current one).
    SLICE_TILES > 0 (accumulator slices): after every SLICE_TILES k-blocks the sum so far,
    z₀ = high + acc, is split into high, a bf16 value (`_carry_high`), and the float32 remainder
    acc = z₀ − high, from which the accumulation goes on (z = high + acc at the end, rounded once
    to float32). acc then stays as small as one slice's sum, which bounds the tensor cores'
    accumulation error (a pull of every logit toward 0 that grows with the magnitude and the K the
    accumulator sums over); high costs half an accumulator's registers. The ping-pong then
    alternates slices rather than tiles, so one consumer's split runs under the other's products."""
    BM: gl.constexpr = e_bufs.shape[1]
    BN: gl.constexpr = c_bufs.shape[1]
    BK: gl.constexpr = e_bufs.shape[2]
    S: gl.constexpr = e_bufs.shape[0]
    LAYOUT: gl.constexpr = accumulator_layout(BM, BN, WARPS)
    n_m, n_n, k_tiles = _tile_counts(n_rows, n_cols, k_dim, BM, BN, BK)
    step = gl.num_programs(0) * CONSUMERS
    j = 0
    waits = 0  # turn waits so far (sliced): consumer 0's first passes on the fresh barrier (parity 1)
    for tile in range(gl.program_id(0) + CONSUMER * gl.num_programs(0), n_m * n_n, step):
        pid_m, pid_n = _tile_coords(tile, n_m, n_n, GROUP_M)
        acc = gl.zeros([BM, BN], gl.float32, LAYOUT)
        if SLICE_TILES == 0:
            count = (j * CONSUMERS + CONSUMER) * k_tiles  # the loader's count of this tile's first k-block
            if CONSUMERS > 1:  # consumer 0's first wait passes on the fresh barrier (parity 1)
                mbarrier.wait(turn.index(CONSUMER), (j & 1) ^ (1 - CONSUMER))
            acc, count = _issue_blocks(e_bufs, c_bufs, ready, empty, acc, count, k_tiles)
            if CONSUMERS > 1:  # every k-block of this tile is issued: the other consumer's turn
                mbarrier.arrive(turn.index(1 - CONSUMER))
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index((count + S - 1) % S))
        else:
            high = _columns(acc)[0].to(gl.int32)  # zeros, in the pairs' layout
            # tiles in this pair (consumer 0's tile is the first): the loader interleaves their slices
            first = tile - CONSUMER * gl.num_programs(0)
            pair = _tiles_in_pair(first, n_m * n_n, CONSUMERS)
            for k0 in range(0, k_tiles, SLICE_TILES):
                n_k = gl.minimum(SLICE_TILES, k_tiles - k0)
                count = j * CONSUMERS * k_tiles + k0 * pair + CONSUMER * n_k
                if CONSUMERS > 1:
                    if (k0 == 0) | (pair > 1):  # alone in the last pair: only the first slice waits
                        mbarrier.wait(turn.index(CONSUMER), (waits & 1) ^ (1 - CONSUMER))
                        waits += 1
                acc, count = _issue_blocks(e_bufs, c_bufs, ready, empty, acc, count, n_k)
                if CONSUMERS > 1:  # the other consumer issues its slice while this one carries
                    mbarrier.arrive(turn.index(1 - CONSUMER))
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(empty.index((count + S - 1) % S))
                if k0 + SLICE_TILES < k_tiles:
                    acc, high = _carry_high(acc, high, LAYOUT)
            acc = _add_high(acc, high, LAYOUT)
        _epilogue(acc, pid_m, pid_n, out_desc, out_smem, part_ptr, lse_ptr, coef_ptr, t_ptr,
                  n_rows, n_cols, n_n, col_base, inv_temp, MODE, NEED_SUM, NEED_PZ, HAS_TEMP, SPLIT, LAYOUT)
        j += 1
    tma.store_wait(pendings=0)


@gluon.jit
def logits_kernel(e_desc, c_desc, out_desc, part_ptr, lse_ptr, coef_ptr, t_ptr, n_rows, n_cols, k_dim, col_base,
                  inv_temp, MODE: gl.constexpr, NEED_SUM: gl.constexpr, NEED_PZ: gl.constexpr,
                  HAS_TEMP: gl.constexpr, NUM_STAGES: gl.constexpr, SPLIT: gl.constexpr,
                  GROUP_M: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                  LOADER_REGS: gl.constexpr, SLICE_TILES: gl.constexpr, num_warps: gl.constexpr):
    """z = E·Cᵀ tiles [BM, BN] (BM = 16·num_warps, blocks from the descriptors) with the epilogue
    MODE, by CONSUMERS (1 or 2, ping-pong) consumers of num_warps warps each and a loader warp.
    e_desc: E [n_rows, k_dim] blocks [BM, BK]; c_desc: C [≥ n_cols, k_dim] blocks [BN, BK];
    out_desc: the bf16 output (z or G) [n_rows, ·] blocks [BM, BN / SPLIT] (unused in MODE_STATS);
    part_ptr: float32 partials [k, cdiv(n_cols, BN), n_rows] (MODE_LOGITS, MODE_STATS);
    lse_ptr [n_rows], coef_ptr [3 or 5, n_rows] (a, b, u[, q, pz] with NEED_PZ), t_ptr [n_rows] int64
    (MODE_GRAD: target ids in C's numbering plus col_base, the column of C's row 0); inv_temp: the
    logits' factor (HAS_TEMP); SLICE_TILES: k-blocks per accumulator slice (0: one slice)."""
    dtype: gl.constexpr = e_desc.dtype
    e_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + e_desc.block_type.shape, e_desc.layout)
    c_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + c_desc.block_type.shape, c_desc.layout)
    out_smem = gl.allocate_shared_memory(out_desc.dtype, [CONSUMERS] + out_desc.block_type.shape, out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_mma_partition, (e_bufs, c_bufs, ready, empty, turn, out_desc, out_smem.index(0), part_ptr, lse_ptr,
                              coef_ptr, t_ptr, n_rows, n_cols, k_dim, col_base, inv_temp, MODE, NEED_SUM, NEED_PZ,
                              HAS_TEMP, SPLIT, GROUP_M, 0, 1, num_warps, SLICE_TILES)),
            (_load_partition, (e_desc, c_desc, e_bufs, c_bufs, ready, empty, n_rows, n_cols, k_dim, GROUP_M,
                               1, SLICE_TILES)),
        ], [1], [LOADER_REGS])
    else:
        gl.warp_specialize([
            (_mma_partition, (e_bufs, c_bufs, ready, empty, turn, out_desc, out_smem.index(0), part_ptr, lse_ptr,
                              coef_ptr, t_ptr, n_rows, n_cols, k_dim, col_base, inv_temp, MODE, NEED_SUM, NEED_PZ,
                              HAS_TEMP, SPLIT, GROUP_M, 0, 2, num_warps, SLICE_TILES)),
            (_mma_partition, (e_bufs, c_bufs, ready, empty, turn, out_desc, out_smem.index(1), part_ptr, lse_ptr,
                              coef_ptr, t_ptr, n_rows, n_cols, k_dim, col_base, inv_temp, MODE, NEED_SUM, NEED_PZ,
                              HAS_TEMP, SPLIT, GROUP_M, 1, 2, num_warps, SLICE_TILES)),
            (_load_partition, (e_desc, c_desc, e_bufs, c_bufs, ready, empty, n_rows, n_cols, k_dim, GROUP_M,
                               2, SLICE_TILES)),
        ], [num_warps, 1], [CONSUMER_REGS, LOADER_REGS])


# ---- launcher ----------------------------------------------------------------------------------

# (BM, BN, BK, NUM_STAGES, SPLIT, GROUP_M, num_warps[, CONSUMERS]) per mode. The statistics modes:
# ping-pong (CONSUMERS = 2), each consumer one warpgroup on its own 64×256 tile, four ring slots
# of 40 KB, a staging buffer each; one tile's epilogue runs under the other's products (statistics
# 0.94–0.95×, logits 0.97–1.02× the cooperative kernel's time on an H100). The gradient: one 128×256 tile on two warpgroups,
# three slots of 48 KB (its longer epilogue measured slower in ping-pong).
CONFIGS = {
    MODE_LOGITS.value: (64, 256, 64, 4, 1, 32, 4, 2),
    MODE_STATS.value: (64, 256, 64, 4, 1, 32, 4, 2),
    MODE_GRAD.value: (128, 256, 64, 3, 1, 16, 8),
}
# The entropy's gradient holds z, p and G at once: four column slices keep it in registers.
ENTROPY_GRAD_CONFIG = (128, 256, 64, 3, 4, 16, 8)
# Columns of D per accumulator slice in the statistics modes (`_mma_partition`; 0: one slice; a
# call's Tuning(stats_k_slice=...) overrides it): the tensor cores' accumulation leaves lse 1.6e-5
# nats low at D = 4096 with one slice, 7.5e-6 with slices of 2048, for 1–2% of the memory-first
# mode's time (k_slices.md). The gradient mode keeps one slice: its bf16 G rounds far more.
STATS_K_SLICE = 2048
# 8 consumer warps + the loader (padded to 4): 240 / 24 registers each after setmaxnreg
MAXNREG, CONSUMER_REGS, LOADER_REGS = 168, 240, 24


def partial_rows(mode: int, need_sum: bool, need_pz: bool = False) -> int:
    """k of the partials [k, T, N] a mode writes: m, s, (s̃ in MODE_LOGITS), (Σz with need_sum),
    (q with need_pz)."""
    return 2 + (mode == MODE_LOGITS.value) + bool(need_sum) + bool(need_pz)


def _descriptor(t, shape, block):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    return TensorDescriptor(t, list(shape), [t.stride()[0], 1], list(block), layout)


def launch(e, c, n_cols: int, mode: int, *, out=None, partials=None, need_sum: bool = False,
           need_pz: bool = False, inv_temp: float = 1.0, lse=None, coef=None, t=None, col_base: int = 0,
           num_sms: int = 132, config=None, k_slice: int | None = None, warmup: bool = False):
    """Run `logits_kernel` over z = e·c[:n_cols]ᵀ.

    e [N, D] and c [≥ n_cols, D] bf16 with unit last stride and 16-byte aligned rows. MODE_LOGITS
    writes z into out [N, ≥ n_cols] (bf16, unit last stride) and the partials; MODE_STATS the
    partials only; MODE_GRAD writes G into out (lse [N], coef [3, N] float32 contiguous, or
    [5, N] with need_pz, t [N] int64 in c's row numbering + col_base). partials: float32
    [partial_rows(mode, need_sum, need_pz), cdiv(n_cols, BN), N] contiguous. need_pz: the
    entropy's statistic (MODE_STATS) or gradient term (MODE_GRAD); inv_temp ≠ 1: a temperature.
    k_slice (None: STATS_K_SLICE in the statistics modes, 0 in MODE_GRAD), if > 0 a multiple of
    the block's BK: every k_slice columns of D the accumulator keeps only the float32 remainder of
    the sum's bf16 part (`_mma_partition`), bounding the tensor cores' accumulation error.
    `warmup` compiles without running (returns the compiled kernel; the tensors may be stand-ins)."""
    default = ENTROPY_GRAD_CONFIG if mode == MODE_GRAD.value and need_pz else CONFIGS[mode]
    bm, bn, bk, stages, split, group_m, warps, *more = config or default
    consumers = more[0] if more else 1
    if split != 1 and mode != MODE_GRAD.value:
        # a slice past n_cols would hold no valid column (m = −inf) and poison the merged statistics
        raise ValueError(f"config: the statistics modes take whole tiles (SPLIT = 1), got SPLIT = {split}")
    if k_slice is None:
        k_slice = 0 if mode == MODE_GRAD.value else STATS_K_SLICE
    if k_slice < 0 or k_slice % bk:
        raise ValueError(f"k_slice: expected 0 or a positive multiple of the block's K ({bk}), got {k_slice}")
    n, d = e.shape
    e_desc = _descriptor(e, (n, d), (bm, bk))
    c_desc = _descriptor(c, (c.shape[0], d), (bn, bk))
    if mode == MODE_STATS.value:  # no output: a small stand-in descriptor keeps the staging buffer small
        out_desc = _descriptor(e, (n, d), (8, 64))
    else:
        out_desc = _descriptor(out, (n, n_cols), (bm, bn // split))
    part = partials if partials is not None else e
    tiles = -(-n // bm) * -(-n_cols // bn)
    grid = (max(1, min(num_sms, -(-tiles // consumers))),)
    args = (e_desc, c_desc, out_desc, part, lse if lse is not None else part, coef if coef is not None else part,
            t if t is not None else part, n, n_cols, d, col_base, float(inv_temp))
    kw = dict(MODE=mode, NEED_SUM=need_sum, NEED_PZ=need_pz, HAS_TEMP=inv_temp != 1.0, NUM_STAGES=stages,
              SPLIT=split, GROUP_M=group_m, CONSUMERS=consumers, CONSUMER_REGS=CONSUMER_REGS,
              LOADER_REGS=LOADER_REGS, SLICE_TILES=k_slice // bk, num_warps=warps, maxnreg=MAXNREG)
    if warmup:
        return logits_kernel.warmup(*args, grid=grid, **kw)
    logits_kernel[grid](*args, **kw)
    return None
