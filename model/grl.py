"""GRL-small, the generator VCISR trains, written for training speed.

GRL ("Efficient and Explicit Modelling of Image Hierarchies for Image
Restoration", Li et al., CVPR 2023) in the configuration of VCISR's
``train_code/train_grl.py`` ("GRL Small", 3,487,715 parameters).

Faithful to the reference implementation (the one the ``spandrel`` package
carries, which is VCISR's own ``architecture/grl.py`` with non-persistent
buffers):

* the same ``state_dict`` key names and shapes, so weights move both ways with
  a plain ``load_state_dict`` (the position tables, indices and masks the
  reference registers as buffers are derived data: they are not in our
  ``state_dict``, and a reference checkpoint that carries them, like VCISR's,
  loads with them dropped);
* the same maths: reflect padding of the input to a multiple of 8 on the
  bottom/right (constant padding when the image is too small to reflect),
  mean shift, res-post-norm blocks of shifted-window attention + anchored
  8x8 "stripe" attention with cosine similarity, a learnt clamped logit scale
  and a continuous relative position bias (``16 * sigmoid(MLP(log-spaced
  coords))``), the -100 shift mask, and the crop back to ``4 * H x 4 * W``.

Written for a GPU:

* every attention is one ``torch.nn.functional.scaled_dot_product_attention``
  call (cosine attention = SDPA of L2-normalised q * per-head logit scale and
  L2-normalised k with ``scale=1``; position bias and shift mask are the
  additive float mask, so the memory-efficient kernel runs it, bias gradient
  included);
* relative-position coordinate tables and index tables are built once, as
  non-persistent buffers; the shift mask is built once for the training size
  (``GRLConfig.img_size``, padded) and once per other input size (cached per
  device); nothing is rebuilt per forward;
* the position-bias MLPs and logit scales of all 48 attentions are evaluated
  together, a few batched ops per table (``GRL._position_terms``), instead of
  a handful of tiny kernels per attention;
* no host syncs, no host-to-device copies and no data-dependent Python in the
  forward pass at the training size, so ``torch.compile(fullgraph=True)`` and
  CUDA graphs (``mode="reduce-overhead"``) apply;
* bf16 autocast friendly: LayerNorm and the q/k normalisation factors run in
  fp32, q/k/v stay in the autocast dtype, SDPA gets its mask cast by autocast.

Tensor layout in the body: tokens ``(B, H*W, C)`` row-major, convolutions see
the same memory as a channels-last ``(B, C, H, W)`` view (no copy).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GRL",
    "GRLConfig",
    "GRL_SMALL_PARAMS",
    "build_grl_small",
    "clean_grl_state_dict",
]

#: Parameter count of GRL-small (VCISR's generator).
GRL_SMALL_PARAMS = 3_487_715

# Buffers the reference registers (persistently in VCISR's own code): derived
# data, dropped from incoming state dicts.
_REFERENCE_BUFFER_KEYS = (
    "table_w", "table_sh", "table_sv",
    "index_w", "index_sh_a2w", "index_sh_w2a", "index_sv_a2w", "index_sv_w2a",
    "mask_w", "mask_sh_a2w", "mask_sh_w2a", "mask_sv_a2w", "mask_sv_w2a",
)  # fmt: skip
_LEGACY_BUFFER_MARKERS = ("relative_coords_table", "relative_position_index", "attn_mask")


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        a, b = v
        return int(a), int(b)
    return int(v), int(v)


@dataclass(frozen=True)
class GRLConfig:
    """Hyper-parameters of GRL; the defaults are GRL-small exactly as VCISR trains it.

    ``img_size`` is the LR training size: the shift mask for it (after padding
    to a multiple of ``pad_size``) is precomputed; any other size works too
    (its mask is built on first use and cached).
    """

    upscale: int = 4
    in_channels: int = 3
    out_channels: int = 3
    embed_dim: int = 128
    depths: tuple[int, ...] = (4, 4, 4, 4)
    num_heads_window: tuple[int, ...] = (2, 2, 2, 2)
    num_heads_stripe: tuple[int, ...] = (2, 2, 2, 2)
    window_size: int = 8
    stripe_size: tuple[int, int] = (8, 8)
    stripe_groups: tuple[int | None, int | None] = (None, None)
    stripe_shift: bool = False
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    qkv_proj_type: str = "linear"
    anchor_proj_type: str = "avgpool"
    anchor_one_stage: bool = True
    anchor_window_down_factor: int = 2
    out_proj_type: str = "linear"
    local_connection: bool = False
    conv_type: str = "1conv"
    upsampler: str = "pixelshuffle"
    img_range: float = 1.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    img_size: int | tuple[int, int] = 90
    rgb_mean: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)

    def __post_init__(self) -> None:
        # Lists from TOML/YAML or call sites become tuples (hashable, frozen).
        for name in ("depths", "num_heads_window", "num_heads_stripe", "stripe_size", "stripe_groups", "rgb_mean"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.img_size, list):
            object.__setattr__(self, "img_size", tuple(self.img_size))
        self._validate()

    def _validate(self) -> None:
        unsupported = {
            "qkv_proj_type": (self.qkv_proj_type, "linear"),
            "out_proj_type": (self.out_proj_type, "linear"),
            "conv_type": (self.conv_type, "1conv"),
            "upsampler": (self.upsampler, "pixelshuffle"),
            "stripe_groups": (self.stripe_groups, (None, None)),
            "stripe_shift": (self.stripe_shift, False),
            "local_connection": (self.local_connection, False),
            "anchor_one_stage": (self.anchor_one_stage, True),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise NotImplementedError(
                    f"GRLConfig.{name}={value!r} is not implemented here (only {supported!r}, the GRL-small setting)"
                )
        if self.anchor_proj_type not in ("avgpool", "maxpool"):
            raise NotImplementedError(
                f"GRLConfig.anchor_proj_type={self.anchor_proj_type!r} is not implemented (avgpool or maxpool)"
            )
        if not (len(self.depths) == len(self.num_heads_window) == len(self.num_heads_stripe)):
            raise ValueError("GRLConfig: depths, num_heads_window and num_heads_stripe need the same length")
        if self.upscale & (self.upscale - 1) and self.upscale != 3:
            raise ValueError(f"GRLConfig.upscale={self.upscale}: pixelshuffle supports 2^n and 3")
        half = self.embed_dim // 2
        for heads in (*self.num_heads_window, *self.num_heads_stripe):
            if self.embed_dim % 2 or half % heads:
                raise ValueError(f"GRLConfig: embed_dim/2={half} is not divisible by {heads} heads")
        df = self.anchor_window_down_factor
        if any(s % df for s in self.stripe_size):
            raise ValueError(f"GRLConfig: stripe_size {self.stripe_size} not divisible by anchor factor {df}")
        if self.pad_size % df:
            raise ValueError(f"GRLConfig: pad size {self.pad_size} not divisible by anchor factor {df}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GRLConfig.{name} must be in [0, 1)")

    @property
    def pad_size(self) -> int:
        """Inputs are padded (bottom/right) to a multiple of this, as the reference does."""
        return max(self.window_size, *self.stripe_size)

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        p = self.pad_size
        return -(-h // p) * p, -(-w // p) * p

    def spandrel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``spandrel.architectures.GRL.GRL`` for the same network.

        ``img_size`` is our padded training size, so the reference uses its own
        precomputed buffers there too (fair speed comparisons).
        """
        kw = asdict(self)
        for name in ("img_size", "rgb_mean"):
            kw.pop(name)
        kw["img_size"] = self.padded_size(*_pair(self.img_size))  # a tuple: the reference compares x_size to it
        for name in ("depths", "num_heads_window", "num_heads_stripe", "stripe_size", "stripe_groups"):
            kw[name] = list(kw[name])
        return kw


def build_grl_small(**overrides: Any) -> GRL:
    """GRL-small (VCISR's generator); keyword arguments override ``GRLConfig`` fields."""
    return GRL(replace(GRLConfig(), **overrides) if overrides else GRLConfig())


def clean_grl_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``_orig_mod.`` of torch.compile, ``module.`` of DDP,
    ``model.``/``model_g.`` of some released checkpoints) and the reference's derived buffers."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module.", "model_g.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return {k: v for k, v in out.items() if not _is_derived_buffer_key(k)}


def _is_derived_buffer_key(key: str) -> bool:
    return key in _REFERENCE_BUFFER_KEYS or any(m in key for m in _LEGACY_BUFFER_MARKERS)


# --------------------------------------------------------------------------------------
# Position tables, index tables, shift masks (built once, on the CPU)
# --------------------------------------------------------------------------------------


def _coords_table(win: tuple[int, int], down: int) -> torch.Tensor:
    """Log-spaced relative coordinates, ``(1, Th, Tw, 2)``, for attention between a window
    of ``win`` tokens and its anchor window of ``win // down`` tokens (down=1: plain window).

    The table spans ``-(a-1)-(w-a)//2 .. (w-1)-(w-a)//2`` per axis (``a = w // down``),
    is normalised by the positive end to [-8, 8] and mapped through
    ``sign(t) * log2(1 + |t|) / log2(8)``.
    """
    axes = []
    for w in win:
        a = w // down
        lo = -(a - 1) - (w - a) // 2
        hi = (w - 1) - (w - a) // 2
        axes.append(torch.arange(lo, hi + 1, dtype=torch.float32) / hi * 8)
    t = torch.stack(torch.meshgrid(axes[0], axes[1], indexing="ij"), dim=-1)
    t = torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)
    return t.unsqueeze(0)


def _grid(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    return ys.reshape(-1), xs.reshape(-1)


def _position_index(win: tuple[int, int], down: int, queries_in_window: bool) -> torch.Tensor:
    """Flat index into ``_coords_table(win, down)`` for each (query, key) pair.

    Queries are the window tokens and keys the anchor tokens when
    ``queries_in_window`` (shape ``(Nw, Na)``), and the other way round otherwise.
    """
    anchor = (win[0] // down, win[1] // down)
    width = anchor[1] + win[1] - 1
    if queries_in_window:
        (qy, qx), (ky, kx), off = _grid(win), _grid(anchor), anchor
    else:
        (qy, qx), (ky, kx), off = _grid(anchor), _grid(win), win
    dy = qy[:, None] - ky[None, :] + (off[0] - 1)
    dx = qx[:, None] - kx[None, :] + (off[1] - 1)
    return (dy * width + dx).reshape(-1)


def _shift_mask(hw: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """Additive mask ``(nW, N, N)`` of shifted-window attention: -100 between tokens that
    came from different image regions after the cyclic shift, 0 within a region."""

    def regions(n: int) -> torch.Tensor:
        r = torch.arange(n)
        return (r >= n - window).long() + (r >= n - shift).long()

    H, W = hw
    label = regions(H)[:, None] * 3 + regions(W)[None, :]  # (H, W)
    label = label.view(H // window, window, W // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    same = label[:, :, None] == label[:, None, :]
    return torch.zeros(same.shape).masked_fill_(~same, -100.0)


# --------------------------------------------------------------------------------------
# Modules (attribute names chosen so that state_dict keys equal the reference's)
# --------------------------------------------------------------------------------------


class _Holder(nn.Module):
    """Holds sub-modules under given names; exists only to keep the reference's key names."""

    def __init__(self, **modules: nn.Module) -> None:
        super().__init__()
        for name, m in modules.items():
            self.add_module(name, m)


class _DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        m = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * m.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class _AttnTransform(nn.Module):
    """Parameters of one attention's logit scale (per head) and continuous relative
    position bias (a 2-512-heads MLP on the coordinates table). They are evaluated for
    all attentions of the network at once, by ``GRL._position_terms``."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
        )


def _l2n(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalise the last axis (eps 1e-12 as ``F.normalize``), times ``scale``: one
    reduction plus one full-size multiply (small per-token factors in between). The
    result keeps ``x``'s dtype (bf16 under autocast: what SDPA would cast it to anyway)."""
    inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-12).reciprocal()
    if scale is not None:
        inv = inv * scale
    return x * inv.to(x.dtype)


class _WindowAttention(nn.Module):
    """(Shifted) window cosine attention over one half of the channels."""

    def __init__(self, window: int, heads: int, shift: bool, attn_drop: float) -> None:
        super().__init__()
        self.window = window
        self.num_heads = heads
        self.shift = window // 2 if shift else 0
        self.attn_drop = attn_drop
        self.attn_transform = _AttnTransform(heads)

    def forward(self, qkv: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor):
        # qkv: (B, H, W, 3c) (a channel slice, not contiguous); bias (nh, N, N); scale (nh, 1, 1);
        # mask (nW, N, N), used when shifted. Returns (B, H, W, c).
        B, H, W, c3 = qkv.shape
        ws, nh, s = self.window, self.num_heads, self.shift
        hd = c3 // (3 * nh)
        h, w, n = H // ws, W // ws, ws * ws
        if s:
            qkv = torch.roll(qkv, shifts=(-s, -s), dims=(1, 2))
        # One copy: (B, h, ws, w, ws, 3, nh, hd) -> (3, B, h, w, nh, ws*ws, hd)
        q, k, v = (
            qkv.reshape(B, h, ws, w, ws, 3, nh, hd).permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B * h * w, nh, n, hd)
        ).unbind(0)
        q = _l2n(q, scale)
        k = _l2n(k)
        p = self.attn_drop if self.training else 0.0
        if s:
            # Windows fold into the head axis so the (window, head) mask broadcasts over batch.
            nwh = h * w * nh
            bias = (mask.unsqueeze(1) + bias.unsqueeze(0)).view(1, nwh, n, n)
            o = F.scaled_dot_product_attention(
                q.reshape(B, nwh, n, hd), k.reshape(B, nwh, n, hd), v.reshape(B, nwh, n, hd),
                attn_mask=bias, dropout_p=p, scale=1.0,
            )  # fmt: skip
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), dropout_p=p, scale=1.0)
        o = o.view(B, h, w, nh, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, nh * hd)
        if s:
            o = torch.roll(o, shifts=(s, s), dims=(1, 2))
        return o


class _AnchorStripeAttention(nn.Module):
    """Anchored stripe attention: anchors attend to the stripe's tokens, then the tokens
    attend to the anchors (two cosine attentions of size N x Na and Na x N)."""

    def __init__(self, stripe: tuple[int, int], down: int, heads: int, attn_drop: float) -> None:
        super().__init__()
        self.stripe = stripe
        self.anchor = (stripe[0] // down, stripe[1] // down)
        self.num_heads = heads
        self.attn_drop = attn_drop
        self.attn_transform1 = _AttnTransform(heads)  # anchor -> window
        self.attn_transform2 = _AttnTransform(heads)  # window -> anchor

    def forward(self, qkv, anchor, bias1, scale1, bias2, scale2):
        # qkv: (B, H, W, 3c) slice; anchor: (B, H/df, W/df, c); bias1 (nh, Na, N) and
        # bias2 (nh, N, Na), scales (nh, 1, 1). Returns (B, H, W, c).
        B, H, W, c3 = qkv.shape
        (sh, sw), (ah, aw), nh = self.stripe, self.anchor, self.num_heads
        hd = c3 // (3 * nh)
        h, w, n, na = H // sh, W // sw, sh * sw, ah * aw
        q, k, v = (
            qkv.reshape(B, h, sh, w, sw, 3, nh, hd).permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B * h * w, nh, n, hd)
        ).unbind(0)
        a = anchor.reshape(B, h, ah, w, aw, nh, hd).permute(0, 1, 3, 5, 2, 4, 6).reshape(B * h * w, nh, na, hd)
        a = _l2n(a)
        p = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(
            a * scale1.to(a.dtype), _l2n(k), v, attn_mask=bias1.unsqueeze(0), dropout_p=p, scale=1.0
        )
        x = F.scaled_dot_product_attention(_l2n(q, scale2), a, x, attn_mask=bias2.unsqueeze(0), dropout_p=p, scale=1.0)
        return x.view(B, h, w, nh, sh, sw, hd).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, nh * hd)


class _MixedAttention(nn.Module):
    """One QKV projection; half the channels go to window attention, half to anchored
    stripe attention; one output projection."""

    def __init__(self, cfg: GRLConfig, heads_w: int, heads_s: int, shift: bool, stripe: tuple[int, int]) -> None:
        super().__init__()
        dim, df = cfg.embed_dim, cfg.anchor_window_down_factor
        self.down = df
        self.pool = F.avg_pool2d if cfg.anchor_proj_type == "avgpool" else F.max_pool2d
        self.qkv = _Holder(body=nn.Linear(dim, 3 * dim, bias=cfg.qkv_bias))
        self.anchor = _Holder(body=nn.ModuleList([_Holder(reduction=nn.Linear(dim, dim // 2, bias=True))]))
        self.window_attn = _WindowAttention(cfg.window_size, heads_w, shift, cfg.attn_drop_rate)
        self.stripe_attn = _AnchorStripeAttention(stripe, df, heads_s, cfg.attn_drop_rate)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], mask: torch.Tensor, pos: list[torch.Tensor]):
        # pos: window (bias, scale), anchor->window (bias, scale), window->anchor (bias, scale)
        B, L, C = x.shape
        H, W = hw
        qkv_w, qkv_s = self.qkv.body(x).view(B, H, W, 3 * C).split(3 * C // 2, dim=-1)
        # Anchors: pool the (channels-last view of the) tokens, then a linear to C/2.
        pooled = self.pool(x.view(B, H, W, C).permute(0, 3, 1, 2), self.down, self.down).permute(0, 2, 3, 1)
        anchor = self.anchor.body[0].reduction(pooled)
        o_w = self.window_attn(qkv_w, pos[0], pos[1], mask)
        o_s = self.stripe_attn(qkv_s, anchor, *pos[2:])
        return self.proj_drop(self.proj(torch.cat((o_w, o_s), dim=-1).view(B, L, C)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _Block(nn.Module):
    """Res-post-norm transformer block: x + DP(LN(attn(x))), then x + DP(LN(mlp(x)))."""

    def __init__(self, cfg: GRLConfig, heads_w: int, heads_s: int, index: int, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        horizontal = index % 2 == 0  # stripe type "H" on even blocks, "W" on odd ones
        stripe = cfg.stripe_size if horizontal else cfg.stripe_size[::-1]
        self.stripe_key = "_h" if horizontal else "_v"
        self.block_id = -1  # position in the network, set by GRL
        self.attn = _MixedAttention(cfg, heads_w, heads_s, shift=index % 2 == 0, stripe=tuple(stripe))
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = _DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = _Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, hw, mask, pos):
        x = x + self.drop_path(self.norm1(self.attn(x, hw, mask, pos[self.block_id])))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class _Stage(nn.Module):
    """Blocks, then a 3x3 conv, plus the stage input."""

    def __init__(self, cfg: GRLConfig, depth: int, heads_w: int, heads_s: int, drop_paths: list[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(cfg, heads_w, heads_s, i, drop_paths[i]) for i in range(depth))
        self.conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 3, 1, 1)

    def forward(self, x, hw, mask, pos):
        res = x
        for blk in self.blocks:
            res = blk(res, hw, mask, pos)
        B, L, C = res.shape
        res = self.conv(res.transpose(1, 2).view(B, C, *hw))  # channels-last view, no copy
        # A channels-last conv output makes this a plain add; .contiguous() only copies on
        # backends that return NCHW (the blocks view tokens as (B, H, W, C)).
        return (res.flatten(2).transpose(1, 2) + x).contiguous()


class GRL(nn.Module):
    """GRL super-resolution network (see module docstring). Input ``(B, C, H, W)`` in
    ``[0, 1]`` (any H, W >= 1), output ``(B, C, upscale*H, upscale*W)``."""

    def __init__(self, cfg: GRLConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or GRLConfig()
        self.cfg = cfg
        dim, feats = cfg.embed_dim, 64
        self.upscale = cfg.upscale
        self.img_range = cfg.img_range
        self.pad_size = cfg.pad_size
        mean = torch.tensor(cfg.rgb_mean) if cfg.in_channels == 3 else torch.zeros(1)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)

        self.conv_first = nn.Conv2d(cfg.in_channels, dim, 3, 1, 1)
        self.norm_start = nn.LayerNorm(dim)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        self.layers = nn.ModuleList()
        start = 0
        for depth, hw_, hs_ in zip(cfg.depths, cfg.num_heads_window, cfg.num_heads_stripe):
            self.layers.append(_Stage(cfg, depth, hw_, hs_, dpr[start : start + depth]))
            start += depth
        self.norm_end = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, 1, 1)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, feats, 3, 1, 1), nn.LeakyReLU(inplace=True))
        ups: list[nn.Module] = []
        if cfg.upscale == 3:
            ups += [nn.Conv2d(feats, 9 * feats, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            for _ in range(int(math.log2(cfg.upscale))):
                ups += [nn.Conv2d(feats, 4 * feats, 3, 1, 1), nn.PixelShuffle(2)]
        self.upsample = _Holder(up=nn.Sequential(*ups))
        self.conv_last = nn.Conv2d(feats, cfg.out_channels, 3, 1, 1)

        # Derived data, built once: coordinate tables and index tables (size independent),
        # the shift mask at the training size (other sizes: built on first use, cached).
        df, ss = cfg.anchor_window_down_factor, tuple(cfg.stripe_size)
        ws = (cfg.window_size, cfg.window_size)
        self.register_buffer("table_w", _coords_table(ws, 1), persistent=False)
        self.register_buffer("index_w", _position_index(ws, 1, True), persistent=False)
        for key, stripe in (("h", ss), ("v", ss[::-1])):
            if key == "v" and ss[0] == ss[1]:
                break  # square stripes: one set serves both orientations
            self.register_buffer(f"table_s_{key}", _coords_table(stripe, df), persistent=False)
            self.register_buffer(f"index_a2w_{key}", _position_index(stripe, df, False), persistent=False)
            self.register_buffer(f"index_w2a_{key}", _position_index(stripe, df, True), persistent=False)
        self._static_hw = cfg.padded_size(*_pair(cfg.img_size))
        self.register_buffer("mask_w", _shift_mask(self._static_hw, cfg.window_size, cfg.window_size // 2), False)
        self._mask_cache: dict[tuple[int, int, str], torch.Tensor] = {}

        # The position-bias MLPs and logit scales of all attentions, grouped by table so
        # that each group is evaluated by a few batched ops per forward instead of a
        # handful of tiny kernels per attention.
        groups: dict[tuple, tuple[list, list]] = {}
        blocks = [blk for layer in self.layers for blk in layer.blocks]
        for bi, blk in enumerate(blocks):
            blk.block_id = bi
            sk = blk.stripe_key if ss[0] != ss[1] else "_h"
            wa, sa = blk.attn.window_attn, blk.attn.stripe_attn
            n, na = wa.window**2, sa.anchor[0] * sa.anchor[1]
            ns = sa.stripe[0] * sa.stripe[1]
            for slot, key, tr in (
                (0, ("table_w", "index_w", n, n), wa.attn_transform),
                (1, ("table_s" + sk, "index_a2w" + sk, na, ns), sa.attn_transform1),
                (2, ("table_s" + sk, "index_w2a" + sk, ns, na), sa.attn_transform2),
            ):
                slots, mods = groups.setdefault((*key, tr.num_heads), ([], []))
                slots.append((bi, slot))
                mods.append(tr)
        self._n_blocks = len(blocks)
        self._bias_groups = [(*key, slots, mods) for key, (slots, mods) in groups.items()]

        self.apply(self._init_weights)
        self.register_load_state_dict_pre_hook(_drop_derived_keys)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The reference's init: truncated normal (std 0.02) linears with zero bias,
        # LayerNorm 1/0, PyTorch's default for convolutions.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _mask(self, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
        if hw == self._static_hw:
            return self.mask_w
        key = (hw[0], hw[1], str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = _shift_mask(hw, self.cfg.window_size, self.cfg.window_size // 2).to(device, self.mask_w.dtype)
            self._mask_cache[key] = mask
        return mask

    def _position_terms(self) -> list[list[torch.Tensor]]:
        """Per block: [window bias, window scale, a2w bias, a2w scale, w2a bias, w2a scale];
        bias ``(heads, Nq, Nk) = 16 * sigmoid(MLP(table))[index]``, scale
        ``exp(min(logit_scale, log 100))`` ``(heads, 1, 1)``."""
        out: list[list[torch.Tensor]] = [[None] * 6 for _ in range(self._n_blocks)]  # type: ignore[list-item]
        for table_key, index_key, n_q, n_k, nh, slots, mods in self._bias_groups:
            g = len(mods)
            table = getattr(self, table_key).reshape(1, -1, 2).expand(g, -1, -1)  # (G, T, 2)
            w1 = torch.stack([m.cpb_mlp[0].weight for m in mods])  # (G, 512, 2)
            b1 = torch.stack([m.cpb_mlp[0].bias for m in mods])  # (G, 512)
            w2 = torch.stack([m.cpb_mlp[2].weight for m in mods])  # (G, nh, 512)
            hidden = torch.relu(torch.baddbmm(b1.unsqueeze(1), table, w1.transpose(1, 2)))
            t = torch.sigmoid(torch.bmm(hidden, w2.transpose(1, 2))) * 16  # (G, T, nh)
            bias = t.transpose(1, 2)[:, :, getattr(self, index_key)].view(g, nh, n_q, n_k)
            scale = torch.stack([m.logit_scale for m in mods]).clamp(max=math.log(100.0)).exp()
            for i, (bi, slot) in enumerate(slots):
                out[bi][2 * slot] = bias[i]
                out[bi][2 * slot + 1] = scale[i]
        return out

    def _apply(self, fn, *args, **kwargs):
        self._mask_cache.clear()  # dtype/device moves: rebuild lazily
        return super()._apply(fn, *args, **kwargs)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Bottom/right padding to a multiple of ``pad_size``: reflect, or zeros when the
        image is too small to reflect (the reference's fallback)."""
        H, W = x.shape[-2:]
        ph, pw = (-H) % self.pad_size, (-W) % self.pad_size
        if not (ph or pw):
            return x
        mode = "reflect" if ph < H and pw < W else "constant"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        mask, pos = self._mask((H, W), x.device), self._position_terms()
        t = self.pos_drop(self.norm_start(x.flatten(2).transpose(1, 2)))
        for layer in self.layers:
            t = layer(t, (H, W), mask, pos)
        return self.norm_end(t).transpose(1, 2).view(B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = (self.pad(x) - self.mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_last(self.upsample.up(self.conv_before_upsample(x)))
        x = x / self.img_range + self.mean
        return x[:, :, : H * self.upscale, : W * self.upscale]


def _drop_derived_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Reference checkpoints may carry the position tables/indices/masks (VCISR registers
    them persistently); they are derived data here."""
    for k in list(state_dict):
        if k.startswith(prefix) and _is_derived_buffer_key(k[len(prefix) :]):
            del state_dict[k]
