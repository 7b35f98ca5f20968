"""The next layer's decode attention as the last phase of a layer's weight stream (kernels/layer_decode.py), its
splits merged by the next launch's output projection.

Launched on its own, a batch-1 decode attention is a chain of memory round trips (7.2 us a llama-3.2-1b layer in
the Triton kernel, kernels/decode_attention.py, against 0.6 us of cache bytes). At the end of a layer's launch the
weights are all read, so the attention of the next layer runs there with the memory otherwise idle, on the Q/K/V
partial sums the launch just wrote, without a launch of its own; the next launch merges the splits in its output
projection's prologue, while its memory warpgroup already streams the weights.

Program p < kvh * A (`window`: A splits per KV head) takes KV head h = p // A and the cache window
[a * W, (a + 1) * W) of split a = p % A:
  1. its window's K and V requested (TMA) before the grid barrier that makes the Q/K/V sums complete;
  2. the head's rows of the Q/K/V partial sums added and rounded: q (G rows, G = query heads per KV head) and the
     8-row blocks ending at k_h and at v_h, stored into row 0 of each 8-row tile of a swizzled wgmma operand (a
     128-byte swizzle leaves a tile's row 0 in place; Mosaic GPU finds no layout for a register block stored into a
     swizzled buffer, nor for a buffer both stored by rows and loaded as an operand);
  3. rope as a product: [q; k] @ R^T with R the [d, d] rotation at pos (`rope_matrix`: exact in bf16, and the
     product of two bf16 values is exact in float32, so it is the reference's rope up to the order of one sum);
  4. the program whose window holds pos writes the new k (roped) and v into the cache (TMA stores) and only then
     loads its window, so the new token is attended from the cache like the others;
  5. scores, softmax and P @ V over the window as wgmma products (query head j in row 8 j of the 64-row tile: the
     other rows hold whatever the buffers hold and never reach a read row, every product being row by row);
  6. the window's normalised output and log-sum-exp rows to float32 workspaces [A, kvh, 64, d] (`Partials`).
The window's TMA loads are at offsets every program knows statically (jax's Mosaic GPU finds no layout for a TMA
load at an offset read from memory; it does for a store), so the cache read is max_len's, not pos's: windows past
pos are skipped, and `supported` keeps W within one 128-row load.

Measured on the H200 (docs/PERF.md, session 29; scripts/gpu/probe_weight_stream.py --products attention+layer): a
llama-3.2-1b layer's launch with the next attention takes 44.6 us of kernel time against 46.4 for the Triton
attention (9.4) and the stream (37.0), but the decode step measured level (0.831 to 0.849 ms against 0.833 to
0.848, the order flipping between calls), so it is opt-in (`stream_attention` in $TILERT_PALLAS_OPS). Its profiled
regions, in thousands of SM cycles: the barrier 2.7, the sums 1.5, rope 0.2, scores 0.5, softmax 2.0, P @ V 1.1,
the results' stores 1.9, and the next launch's merge 4.0 under its weight stream. At llama-3.1-8b the buffers
(146 KB) take the stream's stages: 233 us against 125. Taken as the first phase instead (the weights of the output
projection streaming during it), the attention's loads queued behind the weight stream's and the stream stalled on
full buffers: 46.8 us against 46.3 (the local git branch wip/attention-head).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

f32 = jnp.float32
ROWS = 64  # the wgmma's M: q's heads padded to one tile
BLOCK = 8  # rows of each Q/K/V block of step 1
MAX_WINDOW = 128  # cache rows one program loads at once
LOG2E = math.log2(math.e)


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["num_heads", "scale"],
                   data_fields=["k_cache", "v_cache", "pos", "cos", "sin"])
@dataclasses.dataclass(frozen=True)
class Attention:
    """A layer's decode attention on the Q/K/V the launch projects (batch 1, no bias, no q/k norm, no sliding
    window); a pytree whose head count and scale are static."""
    k_cache: jax.Array  # [1, kvh, max_len, d] (donate it: updated in place)
    v_cache: jax.Array  # [1, kvh, max_len, d]
    pos: jax.Array  # int32 scalar: the new token's position
    cos: jax.Array  # [d] rope table at pos, in the model dtype
    sin: jax.Array  # [d]
    num_heads: int
    scale: float


class Partials(NamedTuple):
    """The attention's splits, as `attend` leaves them: each split's normalised output and base-2 log-sum-exp rows
    [A, kvh, R, d] float32 (query head j of a KV head in row 8 j; R = 64 here, 128 from kernels/decode_attention.py)."""
    out: jax.Array
    lse: jax.Array


def merge_reference(partials: Partials, groups: int, dtype) -> jax.Array:
    """The splits combined -> the attention's output [1, kvh * groups * d] in dtype."""
    splits, kvh, r, d = partials.out.shape
    rows = lambda t: t.reshape(splits, kvh, r // 8, 8, d)[:, :, :groups, 0]  # noqa: E731 [A, kvh, G, d]
    weights = jnp.exp2(rows(partials.lse) - jnp.max(rows(partials.lse), axis=0))
    return (jnp.sum(weights * rows(partials.out), axis=0) / jnp.sum(weights, axis=0)).astype(dtype).reshape(1, -1)


def one_split(out: jax.Array, kv_heads: int) -> Partials:
    """An attention's output [1, n, d] as Partials of one split (its log-sum-exp 0)."""
    _, n, d = out.shape
    groups = n // kv_heads
    rows = jnp.zeros((1, kv_heads, groups, 8, d), f32).at[:, :, :, 0].set(out.reshape(1, kv_heads, groups, d))
    rows = rows.reshape(1, kv_heads, 8 * groups, d)
    return Partials(rows, jnp.zeros_like(rows))


def rope_matrix(cos: jax.Array, sin: jax.Array) -> jax.Array:
    """R [d, d] with x @ R^T = rope(x) (rotate-half): R[o, o] = cos[o], R[o, o + d/2] = -sin[o] and
    R[o + d/2, o] = sin[o + d/2] for o < d/2; in cos's dtype (every entry a table value, so exact)."""
    d = cos.shape[0]
    half = d // 2
    eye = jnp.eye(d, dtype=cos.dtype)
    rotate = jnp.roll(eye, half, axis=1) * jnp.concatenate([-jnp.ones(half), jnp.ones(half)])[:, None]
    return cos[:, None] * eye + sin[:, None] * rotate.astype(cos.dtype)


def window(max_len: int, kv_heads: int, programs: int) -> tuple[int, int]:
    """-> (A splits per KV head, W cache rows per split): W a multiple of 64 (the P @ V product's K step), as few
    splits as cover max_len with at most programs // kv_heads of them."""
    rows = -(-max_len // (programs // kv_heads))
    w = -(-rows // 64) * 64
    return -(-max_len // w), w


def supported(att: Attention, programs: int) -> bool:
    """Whether the attention phase takes these shapes: one token, head_dim 64 or 128, 2 to 8 query heads per KV head
    (a group's rows fill the 128 threads' registers; one head a row tile) and at least 8 in all (the k and v blocks
    end at their row), a window of at most MAX_WINDOW rows."""
    batch, kvh, max_len, d = att.k_cache.shape
    splits, w = window(max_len, kvh, programs) if kvh <= programs else (0, 0)
    groups = att.num_heads // kvh
    return (batch == 1 and d in (64, 128) and splits > 0 and w <= MAX_WINDOW and att.num_heads % kvh == 0
            and groups <= BLOCK and groups * d >= 128 and att.num_heads >= BLOCK)


def scratch(d: int, w: int, dtype) -> tuple:
    """The phase's shared buffers, as members of the kernel's RefUnion (all at its offset 0): the rope product's
    operand [q rows; k block] (swizzled), the same bytes as [16, d/64, 8, 64] tiles, then the rest behind room for
    it. A 128-byte swizzle leaves row 0 of each 8-row tile in place, so a register block stored into the tiles' row 0
    lands in the operand's rows 0, 8, 16, ... (Mosaic GPU finds no layout for a block stored into a swizzled
    buffer, nor for a buffer both stored by rows and loaded as an operand)."""
    swizzled = plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)
    return (plgpu.SMEM((2 * ROWS, d), dtype, transforms=swizzled),
            plgpu.SMEM((2 * ROWS // 8, d // 64, 8, 64), dtype),
            (plgpu.SMEM((2 * ROWS, d), dtype),  # room for the operand
             plgpu.SMEM((w, d), dtype, transforms=swizzled),  # the K window
             plgpu.SMEM((w, d), dtype, transforms=swizzled),  # the V window
             plgpu.SMEM((d, d), dtype, transforms=swizzled),  # R
             plgpu.SMEM((BLOCK, d), dtype),  # the summed v block, for the new v's cache write
             plgpu.SMEM((ROWS, d), dtype)))  # the roped k block, for the new k's


def shared_bytes(d: int, w: int) -> int:
    """`scratch`'s bytes (bf16)."""
    return 2 * (2 * 2 * ROWS * d + 2 * w * d + d * d + BLOCK * d + ROWS * d)


def workspace_types(att: Attention, programs: int):
    """The phase's HBM outputs: each split's output and log-sum-exp rows [A, kvh, 64, d] (query head j of a KV head
    in row 8 j, the rest unused)."""
    _, kvh, max_len, d = att.k_cache.shape
    splits, _ = window(max_len, kvh, programs)
    return (jax.ShapeDtypeStruct((splits, kvh, ROWS, d), f32),) * 2


def attend(p, refs, buffers, barriers, barrier, *, num_heads, kv_heads, max_len, d, n_parts, scale, programs,
           dtype):
    """Steps 1 to 6 for program p (the compute warpgroup), barrier() (every program's) between steps 1 and 2.
    refs: (parts [S, nh, d] f32, rope [d, d], pos [1] int32, k_cache and v_cache [kvh * max_len, d] (refs), the
    Partials' out and lse); barriers: (R's, the windows')."""
    splits, w = window(max_len, kv_heads, programs)
    parts, rope, pos_ref, k_cache, v_cache, ws_o, ws_lse = refs
    operand, tiles, (_, k_win, v_win, r_smem, v_block, roped) = buffers
    r_bar, kv_bar = barriers
    h, a = p // splits, lax.rem(p, splits)
    t0 = a * w
    pos = pos_ref[0]
    active = p < kv_heads * splits
    rows = pl.ds(pl.multiple_of(h * max_len + t0, 64), w)

    def load_window():
        plgpu.copy_gmem_to_smem(k_cache.at[rows], k_win, kv_bar)
        plgpu.copy_gmem_to_smem(v_cache.at[rows], v_win, kv_bar)

    pl.when(jnp.logical_and(active, t0 + w <= pos))(load_window)  # a window wholly before pos: at once
    pl.when(active)(lambda: plgpu.copy_gmem_to_smem(rope, r_smem, r_bar))
    barrier()

    @pl.when(active)
    def _():
        _attend(parts, pos, (operand, tiles, r_smem, v_block, roped, k_win, v_win), (r_bar, kv_bar),
                (ws_o.at[a, h], ws_lse.at[a, h]), (k_cache, v_cache), load_window, h=h, t0=t0, w=w,
                num_heads=num_heads, kv_heads=kv_heads, max_len=max_len, d=d, n_parts=n_parts, scale=scale,
                dtype=dtype)


def _attend(parts, pos, buffers, barriers, outs, caches, load_window, *, h, t0, w, num_heads, kv_heads, max_len, d,
            n_parts, scale, dtype):
    operand, tiles, r_smem, v_block, roped, k_win, v_win = buffers
    r_bar, kv_bar = barriers
    k_cache, v_cache = caches
    groups = num_heads // kv_heads
    with jax.named_scope("att_sums"):  # every load issued before the first sum: their latencies overlap
        row0s = ((h * groups, groups), (num_heads + h - (BLOCK - 1), BLOCK),
                 (num_heads + kv_heads + h - (BLOCK - 1), BLOCK))  # q; the k and v blocks ending at k_h, v_h
        loaded = [[parts[j, pl.ds(row0, n), :] for j in range(n_parts)] for row0, n in row0s]
        q, k, v = (functools.reduce(jnp.add, pieces).astype(dtype) for pieces in loaded)
        tiles[pl.ds(0, groups), :, 0, :] = q.reshape(groups, d // 64, 64)  # operand rows 0, 8, ..
        tiles[pl.ds(ROWS // 8, BLOCK), :, 0, :] = k.reshape(BLOCK, d // 64, 64)  # rows 64, 72, .., 120 (k_h)
        v_block[...] = v
        plgpu.commit_smem()
    plgpu.barrier_wait(r_bar)

    def rope_product(half):
        def product(acc):
            plgpu.wgmma(acc, operand.at[pl.ds(half * ROWS, ROWS)], r_smem.transpose((1, 0)))
            return acc[...]
        return pl.run_scoped(product, plgpu.ACC((ROWS, d), f32)).astype(dtype)

    with jax.named_scope("att_rope"):
        qk = rope_product(0)  # [64, d]: query head j roped in row 8 j

    @pl.when(jnp.logical_and(t0 <= pos, pos < t0 + w))  # the window that holds pos: the new k and v first
    @jax.named_scope("att_new_token")
    def _():
        roped[...] = rope_product(1)  # k_h roped in row 56
        plgpu.commit_smem()
        new_row = pl.ds(h * max_len + pos, 1)
        plgpu.copy_smem_to_gmem(roped.at[pl.ds(ROWS - 8, 1)], k_cache.at[new_row])
        plgpu.copy_smem_to_gmem(v_block.at[pl.ds(BLOCK - 1, 1)], v_cache.at[new_row])
        plgpu.wait_smem_to_gmem(0)
        load_window()

    def results(o, lse):
        outs[0][...] = o
        outs[1][...] = lax.broadcast_in_dim(lse, (ROWS, d), [0])

    @pl.when(t0 <= pos)
    @jax.named_scope("att_window")
    def _():
        with jax.named_scope("att_wait"):
            plgpu.barrier_wait(kv_bar)  # both windows (two arrivals)

        def scores(acc):
            plgpu.wgmma(acc, qk, k_win.transpose((1, 0)))
            return acc[...]

        with jax.named_scope("att_scores"):  # in base 2: exp2 is one instruction, exp a call
            s = pl.run_scoped(scores, plgpu.ACC((ROWS, w), f32)) * (scale * LOG2E)  # [64, W]
        with jax.named_scope("att_softmax"):
            col = plgpu.broadcasted_iota(jnp.int32, (ROWS, w), 1, layout=plgpu.Layout.WGMMA)
            s = jnp.where(col + t0 <= pos, s, -jnp.inf)
            m = s.max(axis=1)  # [64]: finite (the window holds a position <= pos)
            pr = jnp.exp2(s - lax.broadcast_in_dim(m, s.shape, [0]))
            l = pr.sum(axis=1)
        with jax.named_scope("att_pv"):
            zeros = plgpu.layout_cast(jnp.zeros((ROWS, d), f32), plgpu.Layout.WGMMA)
            acc = pl.run_state(lambda acc: plgpu.wgmma(acc, pr.astype(dtype), v_win))(plgpu.ACC.init(zeros))
        with jax.named_scope("att_results"):
            results(acc * lax.broadcast_in_dim(1.0 / l, (ROWS, d), [0]), m + jnp.log2(l))

    @pl.when(t0 > pos)  # an empty window: weight zero in the merge
    def _():
        results(jnp.zeros((ROWS, d), f32), jnp.full((ROWS,), -jnp.inf, f32))


def merge(ws_o, ws_lse, kv0, kv_heads: int, groups: int, dtype) -> jax.Array:
    """The splits' outputs of KV heads [kv0, kv0 + kv_heads) combined -> [kv_heads * groups * d / 64, 64] in dtype
    (the query heads in order, as 64-wide rows)."""
    d = ws_o.shape[-1]

    def rows(ref, a):  # [kv_heads, groups, d]: the query heads' rows
        return ref.at[a, pl.ds(kv0, kv_heads)].reshape(kv_heads, ref.shape[2] // 8, 8, d)[:, pl.ds(0, groups), 0, :]

    splits = ws_o.shape[0]
    lse = [rows(ws_lse, a) for a in range(splits)]
    top = functools.reduce(jnp.maximum, lse)
    weights = [jnp.exp2(x - top) for x in lse]
    total = sum(wt * rows(ws_o, a) for a, wt in enumerate(weights))
    return (total / sum(weights)).astype(dtype).reshape(kv_heads * groups * d // 64, 64)
