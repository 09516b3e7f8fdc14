"""A fixed-tile attention kernel in pure PyTorch, with a switch that seeds exactly one bug.

Real kernels pick their own tiles and code paths, and their bugs live beyond one tile; this one
does what they do, at their sizes (no chunk-size arguments):

- queries in tiles of ``TILE_M = 64`` rows, keys in tiles of ``TILE_N = 128`` (a shorter last tile
  when the length is not a multiple), head dims in blocks of ``TILE_D = 64`` (q.k summed block by
  block, ``p @ v`` and the gradients written block by block), as kernels do for head dims > 64;
- per query tile, the online softmax over its key tiles (FlashAttention-2 form): running max ``m``,
  running sum ``l`` and unnormalised output ``acc``, rescaled by ``exp(m_old - m_new)``; a max still
  ``-inf`` is shifted by 0;
- causal tile skipping: a query tile visits the first key tile and then only the key tiles that
  hold a key at or before its last row's diagonal (``j <= i + off``, ``off = Lk - Lq`` bottom-right,
  else 0); the mask inside a tile does the rest;
- split-KV decoding (``Lq <= DECODE_MAX_LQ`` against ``Lk >= DECODE_MIN_LK``): the key tiles are cut
  into ``SPLITS`` contiguous parts, each part's online softmax gives a partial ``(m, l, acc)``, and
  the parts are combined as ``m = max m_p``, ``l = sum exp(m_p - m) l_p``, ``acc = sum exp(m_p - m) acc_p``;
- float32 statistics, logits, probabilities and accumulators (float64 for float64 inputs), output
  rounded once to the input dtype, lse returned in float32; mask (True = attend), bias (``-inf``
  hides), grouped-query heads; a row with no visible key gives out 0, lse ``-inf`` and zero gradients.

Backward (``torch.autograd.Function``): per query tile and each key tile it visits, the probabilities
are recomputed from the saved lse (``+inf`` internally for empty rows), ``ds = p (g.v - delta + g_lse)``
with ``delta = g.o`` and ``g_lse`` the cotangent of lse; ``dq`` accumulates into a float32 buffer that
is written back tile by tile at the end, ``dk`` and ``dv`` accumulate per key tile, head-dim block by
block; ``dbias = ds`` reduced to bias's shape.

Each name in ``BUGS`` other than ``"none"`` changes one step (marked ``BUG``), and only beyond one tile:
a second key or query tile, a head dim > 64, or a decode against a long cache.
"""

from __future__ import annotations

import math

import torch

from tests.mutants.calls import check_call

TILE_M, TILE_N, TILE_D = 64, 128, 64
SPLITS = 4
DECODE_MAX_LQ, DECODE_MIN_LK = 4, 512

BUGS = (
    "none",
    "key_tile_tail",
    "dk_tail",
    "dq_dim_tail",
    "split_no_rescale",
    "max_frozen",
    "causal_skip_padded",
    "dq_last_query_tile",
)
_NEG_INF = -math.inf


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _head_blocks(d: int, drop_tail: bool) -> list[tuple[int, int]]:
    """Head-dim blocks of ``TILE_D``; ``drop_tail`` leaves out a partial last block when there are several."""
    blocks = _blocks(d, TILE_D)
    if drop_tail and d > TILE_D and d % TILE_D:
        blocks = blocks[:-1]
    return blocks


def _shifted(m: torch.Tensor) -> torch.Tensor:
    return m.masked_fill(m == _NEG_INF, 0.0)


def _reduce_to(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    padded = (1,) * (x.dim() - len(shape)) + tuple(shape)
    axes = [i for i, (have, n) in enumerate(zip(padded, x.shape, strict=True)) if have == 1 and n != 1]
    return (x.sum(dim=axes, keepdim=True) if axes else x).reshape(shape)


def _rows_tiled(x: torch.Tensor, n_tiles: int, fill: float | bool = 0.0) -> torch.Tensor:
    """``[B, H, L, ...]`` with L padded to ``n_tiles * TILE_M`` rows (``fill``), as ``[B, H, n_tiles, TILE_M, ...]``."""
    b, h, n = x.shape[:3]
    pad = x.new_full((b, h, n_tiles * TILE_M - n, *x.shape[3:]), fill)
    return torch.cat([x, pad], dim=2).view(b, h, n_tiles, TILE_M, *x.shape[3:])


class _Kernel:
    """One call in compute layout (heads first, kv heads expanded, queries as tiles) and its per-tile logits.

    The query tiles run side by side, as the thread blocks of a kernel's grid do: tensors are
    ``[B, Hq, n_query_tiles, TILE_M, ...]`` (the last tile padded with rows that are dropped at the end),
    and each step of a loop works on one key tile for every query tile at once. A key tile that a
    query tile skips (causal) is hidden from all its rows, which leaves its running statistics exactly
    as skipping it would.
    """

    def __init__(self, q, k, v, mask, bias, scale, causal, align, bug) -> None:
        check_call(q, k, v, mask, align)
        b, lq, hq, dk = q.shape
        _, lk, hkv, dv = v.shape
        self.bug = bug
        self.cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.b, self.lq, self.lk, self.hq, self.hkv, self.dk, self.dv = b, lq, lk, hq, hkv, dk, dv
        self.kv_head = torch.arange(hq, device=q.device) // (hq // hkv)
        self.nqt = math.ceil(lq / TILE_M)
        self.q = _rows_tiled(q.transpose(1, 2).to(self.cdt), self.nqt)  # [B, Hq, T, M, Dk]
        self.k = k.transpose(1, 2).to(self.cdt)[:, self.kv_head]  # [B, Hq, Lk, Dk]
        self.v = v.transpose(1, 2).to(self.cdt)[:, self.kv_head]
        shape4 = (b, hq, lq, lk)
        self.mask = None if mask is None else torch.broadcast_to(mask, shape4)
        self.bias = None if bias is None else torch.broadcast_to(bias, shape4)
        self.scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
        self.causal = bool(causal)
        self.off = lk - lq if align == "bottom-right" else 0
        skip_off = self.off
        if bug == "causal_skip_padded" and align == "bottom-right":
            skip_off = lk - self.nqt * TILE_M  # BUG causal_skip_padded: Lq padded to whole query tiles
        rows = torch.arange(self.nqt * TILE_M, device=q.device).view(self.nqt, TILE_M)
        self.rows = rows  # [T, M]: each tile row's query index (>= Lq: padding)
        self.last_row = torch.clamp(rows[:, -1], max=lq - 1)  # [T]: each query tile's last real row
        self.skip_bound = self.last_row + skip_off  # [T]: a tile visits key tiles starting at or before this
        self.key_tiles = _blocks(lk, TILE_N)
        if bug == "key_tile_tail" and lk > TILE_N and lk % TILE_N:
            self.key_tiles = self.key_tiles[:-1]  # BUG key_tile_tail: the tile count rounds down
        self.dk_blocks = _head_blocks(dk, bug == "dk_tail")  # BUG dk_tail: q.k without the head-dim tail
        self.dv_blocks = _head_blocks(dv, False)
        self.decode = lq <= DECODE_MAX_LQ and lk >= DECODE_MIN_LK

    def parts(self) -> list[list[tuple[int, int]]]:
        """The key tiles in split-KV parts (one part unless decoding)."""
        if not self.decode:
            return [self.key_tiles]
        n = len(self.key_tiles)
        cuts = [p * n // SPLITS for p in range(SPLITS + 1)]  # contiguous, sizes differing by at most one tile
        return [self.key_tiles[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]

    def visits(self, j0: int) -> torch.Tensor | None:
        """bool [T]: which query tiles visit the key tile starting at ``j0`` (None: all, no causal skipping).

        The first key tile is always visited (a kernel's peeled first iteration; where the causal mask
        hides all of it, visiting changes nothing), later ones only up to each query tile's bound.
        """
        return ((j0 <= self.skip_bound) | (j0 == 0)) if self.causal else None

    def logits(self, j0: int, j1: int) -> torch.Tensor:
        """Logits ``[B, Hq, T, M, j1-j0]`` of key tile j0:j1, -inf where hidden; q.k summed over head-dim blocks."""
        s = None
        for d0, d1 in self.dk_blocks:
            part = self.q[..., d0:d1] @ self.k[:, :, None, j0:j1, d0:d1].transpose(-1, -2)
            s = part if s is None else s + part
        if s is None:
            s = self.q.new_zeros(self.b, self.hq, self.nqt, TILE_M, j1 - j0)
        s = s * self.scale
        cols = torch.arange(j0, j1, device=s.device)
        visible = (self.rows < self.lq)[..., None].expand(-1, -1, j1 - j0)  # [T, M, w]: padded rows see nothing
        if self.bias is not None:
            bias = _rows_tiled(self.bias[..., j0:j1], self.nqt, -math.inf)
            s = s + bias.to(self.cdt)
            visible = visible & (bias != _NEG_INF)
        if self.mask is not None:
            visible = visible & _rows_tiled(self.mask[..., j0:j1], self.nqt, False)
        if self.causal:
            visible = visible & (cols <= self.rows[..., None] + self.off)
            visible = visible & self.visits(j0)[:, None, None]  # a skipped tile: hidden from the whole tile
        return s.masked_fill(~visible, _NEG_INF)

    def untiled(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, M, ...]`` back to ``[B, H, Lq, ...]`` (padding rows dropped)."""
        return x.reshape(self.b, self.hq, self.nqt * TILE_M, *x.shape[4:])[:, :, :self.lq]

    def to_kv_heads(self, grad: torch.Tensor) -> torch.Tensor:
        b, _, lk, d = grad.shape
        return grad.new_zeros(b, self.hkv, lk, d).index_add_(1, self.kv_head, grad).transpose(1, 2)


def _partial(kn: _Kernel, tiles: list[tuple[int, int]]):
    """The online softmax of every query tile over the key tiles ``tiles``: ``(m, l, acc)``, tiled."""
    shape = (kn.b, kn.hq, kn.nqt, TILE_M)
    m = kn.q.new_full(shape, _NEG_INF)
    l_sum = kn.q.new_zeros(shape)
    acc = kn.q.new_zeros(*shape, kn.dv)
    for t, (j0, j1) in enumerate(tiles):
        s = kn.logits(j0, j1)
        if kn.bug == "max_frozen" and t > 0:
            m_new = m  # BUG max_frozen: the running max stays the first key tile's
        else:
            m_new = torch.maximum(m, s.amax(dim=-1))
        shift = _shifted(m_new)
        alpha = torch.exp(m - shift)
        p = torch.exp(s - shift[..., None])
        l_sum = l_sum * alpha + p.sum(dim=-1)
        for e0, e1 in kn.dv_blocks:
            acc[..., e0:e1] = acc[..., e0:e1] * alpha[..., None] + p @ kn.v[:, :, None, j0:j1, e0:e1]
        m = m_new
    return m, l_sum, acc


def _forward(kn: _Kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, Hq, Lq, Dv]`` and lse ``[B, Hq, Lq]`` (-inf for empty rows), in the compute dtype."""
    partials = [_partial(kn, tiles) for tiles in kn.parts()]
    if len(partials) == 1:
        m, l_sum, acc = partials[0]
    else:  # split-KV: combine the parts, each rescaled from its own max to the common one
        m = torch.stack([p[0] for p in partials]).amax(dim=0)
        shift = _shifted(m)
        l_sum, acc = torch.zeros_like(partials[0][1]), torch.zeros_like(partials[0][2])
        for m_p, l_p, acc_p in partials:
            w = torch.exp(m_p - shift)
            if kn.bug == "split_no_rescale":
                w = torch.ones_like(w)  # BUG split_no_rescale: partials added as they are
            l_sum = l_sum + w * l_p
            acc = acc + w[..., None] * acc_p
    seen = l_sum > 0
    out = torch.where(seen[..., None], acc / torch.where(seen, l_sum, 1.0)[..., None], 0.0)
    lse = torch.where(seen, _shifted(m) + torch.log(torch.where(seen, l_sum, 1.0)), _NEG_INF)
    return kn.untiled(out), kn.untiled(lse)


def _backward(kn: _Kernel, out: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, g_lse: torch.Tensor | None,
              want_bias: bool):
    gh = g.transpose(1, 2).to(kn.cdt)
    delta = (gh * out).sum(dim=-1)
    extra = -delta if g_lse is None else g_lse.to(kn.cdt) - delta  # [B, Hq, Lq]
    gt = _rows_tiled(gh, kn.nqt)  # [B, Hq, T, M, Dv]
    extra_t = _rows_tiled(extra, kn.nqt)
    lse_t = _rows_tiled(lse.masked_fill(lse == _NEG_INF, math.inf), kn.nqt, math.inf)  # exp(s - inf) = 0
    dq_acc = torch.zeros_like(kn.q)
    dk = torch.zeros_like(kn.k)
    dv = torch.zeros_like(kn.v)
    dbias = kn.q.new_zeros(kn.b, kn.hq, kn.nqt, TILE_M, kn.lk) if want_bias else None
    dq_blocks = _head_blocks(kn.dk, kn.bug == "dq_dim_tail")  # BUG dq_dim_tail: dq's head-dim tail not written
    for j0, j1 in kn.key_tiles:
        s = kn.logits(j0, j1)
        p = torch.exp(s - lse_t[..., None])  # [B, Hq, T, M, w]
        dp = None
        for e0, e1 in kn.dv_blocks:
            dv[:, :, j0:j1, e0:e1] += torch.einsum("bhtmw,bhtme->bhwe", p, gt[..., e0:e1])
            part = gt[..., e0:e1] @ kn.v[:, :, None, j0:j1, e0:e1].transpose(-1, -2)
            dp = part if dp is None else dp + part
        ds = p * (dp + extra_t[..., None])
        if dbias is not None:
            dbias[..., j0:j1] = ds
        for d0, d1 in _head_blocks(kn.dk, False):
            dk[:, :, j0:j1, d0:d1] += torch.einsum("bhtmw,bhtmd->bhwd", ds, kn.q[..., d0:d1]) * kn.scale
        for d0, d1 in dq_blocks:
            dq_acc[..., d0:d1] += (ds @ kn.k[:, :, None, j0:j1, d0:d1]) * kn.scale
    dq = torch.zeros_like(dq_acc)
    n_written = kn.nqt
    if kn.bug == "dq_last_query_tile" and kn.lq > TILE_M and kn.lq % TILE_M:
        n_written -= 1  # BUG dq_last_query_tile: only full query tiles are written back
    dq[:, :, :n_written] = dq_acc[:, :, :n_written]
    return kn.untiled(dq), dk, dv, None if dbias is None else kn.untiled(dbias)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, opts, bug):
        kn = _Kernel(q, k, v, mask, bias, *opts, bug)
        out, lse = _forward(kn)
        ctx.save_for_backward(q, k, v, bias, mask, out, lse)
        ctx.opts, ctx.bug = opts, bug
        return out.transpose(1, 2).to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, g_lse):
        q, k, v, bias, mask, out, lse = ctx.saved_tensors
        kn = _Kernel(q, k, v, mask, bias, *ctx.opts, ctx.bug)
        want_bias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _backward(kn, out, lse, g, g_lse, want_bias)
        dq = dq.transpose(1, 2).to(q.dtype)
        dk = kn.to_kv_heads(dk).to(k.dtype)
        dv = kn.to_kv_heads(dv).to(v.dtype)
        if dbias is not None:
            dbias = _reduce_to(dbias, bias.shape).to(bias.dtype)
        return dq, dk, dv, dbias, None, None, None


def make(bug: str = "none"):
    """The canonical attention callable (no chunk sizes: the kernel picks its tiles) with ``bug`` seeded."""
    if bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; known: {', '.join(BUGS)}")

    def attention(q, k, v, *, mask=None, bias=None, scale=None, causal=False, align="top-left", return_lse=False):
        out, lse = _TiledAttention.apply(q, k, v, bias, mask, (scale, causal, align), bug)
        return (out, lse) if return_lse else out

    attention.__name__ = attention.__qualname__ = f"tiled_attention_{bug}"
    return attention
