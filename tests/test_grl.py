"""GRL-small (model/grl.py) against the reference implementation (spandrel's GRL).

The comparisons use random weights pushed away from the init (larger linear
weights, varied logit scales, a position-bias MLP with real spread) so that every
path - window attention, shift mask, anchored stripe attention, position bias,
logit-scale clamp - moves the output; ``test_comparison_has_teeth`` checks that.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import pytest
import torch

from model.grl import GRL, GRL_SMALL_PARAMS, GRLConfig, build_grl_small, clean_grl_state_dict

TOL = 1e-4  # max abs difference to the reference, fp32


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):  # spans the clamp at log(100)
                p.copy_(torch.empty(p.shape).uniform_(math.log(3.0), math.log(150.0), generator=g))
            elif ".cpb_mlp.0." in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif ".cpb_mlp.2." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() == 2 or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.03)
    return model


def _reference_cls():
    return pytest.importorskip("spandrel.architectures.GRL", reason="spandrel (test extra) not installed").GRL


@pytest.fixture(scope="module")
def ours() -> GRL:
    torch.manual_seed(0)
    return _randomize(build_grl_small()).eval()


@pytest.fixture(scope="module")
def ref(ours):
    r = _reference_cls()(**GRLConfig().spandrel_kwargs())
    r.load_state_dict(ours.state_dict(), strict=True)
    return r.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------ config / structure


def test_parameter_count():
    model = build_grl_small()
    assert sum(p.numel() for p in model.parameters()) == GRL_SMALL_PARAMS == 3_487_715


def test_config_defaults_are_grl_small_and_frozen():
    cfg = GRLConfig()
    assert (cfg.upscale, cfg.embed_dim, cfg.depths, cfg.window_size, cfg.stripe_size) == (4, 128, (4,) * 4, 8, (8, 8))
    assert (cfg.num_heads_window, cfg.num_heads_stripe, cfg.mlp_ratio) == ((2,) * 4, (2,) * 4, 2.0)
    assert (cfg.anchor_proj_type, cfg.anchor_window_down_factor, cfg.upsampler) == ("avgpool", 2, "pixelshuffle")
    assert (cfg.drop_path_rate, cfg.stripe_shift, cfg.local_connection) == (0.1, False, False)
    assert cfg.stripe_groups == (None, None) and cfg.img_range == 1.0
    assert cfg.pad_size == 8 and cfg.padded_size(90, 90) == (96, 96)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.embed_dim = 64  # type: ignore[misc]
    assert GRLConfig(depths=[2, 2], num_heads_window=[2, 2], num_heads_stripe=[2, 2]).depths == (2, 2)


@pytest.mark.parametrize(
    "override",
    [{"stripe_shift": True}, {"local_connection": True}, {"upsampler": "nearest+conv"}, {"stripe_groups": (2, 2)}],
)
def test_unsupported_options_are_rejected(override):
    with pytest.raises(NotImplementedError, match=next(iter(override))):
        GRLConfig(**override)


def test_drop_path_rates_follow_the_stochastic_depth_rule():
    model = build_grl_small()
    rates = [getattr(b.drop_path, "p", 0.0) for layer in model.layers for b in layer.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 16).tolist())


def test_shapes_padding_and_small_inputs():
    model = build_grl_small(depths=(1,), num_heads_window=(2,), num_heads_stripe=(2,), img_size=16).eval()
    with torch.no_grad():
        for h, w in [(16, 16), (13, 21), (3, 5)]:  # exact, reflect-padded, too small to reflect (zero pad)
            assert model(torch.rand(2, 3, h, w)).shape == (2, 3, 4 * h, 4 * w)


# ------------------------------------------------------------------ state dicts


def test_state_dict_keys_and_shapes_equal_the_reference(ours, ref):
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


def test_reference_weights_load_into_ours(ref):
    fresh = build_grl_small()
    fresh.load_state_dict(ref.state_dict(), strict=True)
    sd = fresh.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())


def test_checkpoint_with_reference_buffers_loads(ours, ref):
    # VCISR's own GRL registers its tables/indices/masks persistently (mask_w for its
    # img_size), and torch.compile adds "_orig_mod.": both are handled.
    sd = dict(ref.state_dict())
    sd.update({name: buf for name, buf in ref.named_buffers()})
    sd["mask_w"] = torch.zeros(9, 64, 64)  # another training size
    fresh = build_grl_small()
    fresh.load_state_dict(sd, strict=True)
    compiled = {f"_orig_mod.{k}": v for k, v in ours.state_dict().items()}
    fresh.load_state_dict(clean_grl_state_dict(compiled), strict=True)
    assert torch.equal(fresh.conv_last.weight, ours.conv_last.weight)


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize("shape", [(1, 3, 90, 90), (1, 3, 64, 48)], ids=["90x90-padded", "64x48"])
def test_matches_reference(ours, ref, shape, device):
    a, b = copy.deepcopy(ours).to(device), copy.deepcopy(ref).to(device)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        out, expected = a(x), b(x)
    assert out.shape == expected.shape == (shape[0], 3, 4 * shape[2], 4 * shape[3])
    diff = _max_diff(out, expected)
    print(f"max abs diff {shape}: {diff:.3g}")
    assert diff < TOL


@pytest.mark.parametrize(
    "overrides",
    [
        dict(depths=(2, 3), num_heads_window=(2, 4), num_heads_stripe=(4, 2), stripe_size=(8, 16), img_size=(32, 48)),
        dict(depths=(2,), num_heads_window=(1,), num_heads_stripe=(2,), stripe_size=(16, 8), window_size=4,
             anchor_proj_type="maxpool", upscale=2, img_size=20),
        dict(depths=(2,), num_heads_window=(2,), num_heads_stripe=(2,), upscale=3, in_channels=1, out_channels=1,
             img_range=255.0, img_size=16),
    ],
    ids=["non-square-stripes-mixed-heads", "window4-maxpool-x2", "gray-x3-range255"],
)  # fmt: skip
def test_other_configurations_match_reference(overrides):
    # Beyond GRL-small: orientation-dependent stripe tables, per-stage head counts,
    # other window sizes, anchor pooling, scales and channel counts.
    cfg = GRLConfig(**overrides)
    torch.manual_seed(0)
    model = _randomize(GRL(cfg)).eval()
    reference = _reference_cls()(**cfg.spandrel_kwargs()).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for shape in [(1, cfg.in_channels, 32, 48), (2, cfg.in_channels, 21, 37)]:
            x = torch.rand(shape, generator=g)
            assert _max_diff(model(x), reference(x)) < TOL


def test_padding_matches_reference(ours, ref):
    # Reflect padding on the bottom/right up to a multiple of 8, zero padding when the
    # image is too small to reflect, then the crop back to 4x the input.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for shape in [(1, 3, 13, 21), (1, 3, 3, 5), (1, 3, 8, 2)]:
            x = torch.rand(shape, generator=g)
            assert _max_diff(ours(x), ref(x)) < TOL


def test_comparison_has_teeth(ours, ref):
    # A small change deep in the network (one position-bias weight of the last
    # block) moves the output far beyond TOL: equality above is not vacuous.
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    bent = copy.deepcopy(ours)
    with torch.no_grad():
        bent.layers[-1].blocks[-1].attn.stripe_attn.attn_transform2.cpb_mlp[2].weight.add_(0.05)
        assert _max_diff(ours(x), ref(x)) < TOL
        assert _max_diff(bent(x), ref(x)) > 20 * TOL


def test_gradients_match_reference(ours, ref):
    a, b = copy.deepcopy(ours), copy.deepcopy(ref)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    for m in (a, b):
        m(x).square().mean().backward()
    ref_params = dict(b.named_parameters())
    worst = 0.0
    for name, p in a.named_parameters():
        g = ref_params[name].grad
        worst = max(worst, _max_diff(p.grad, g) / (g.abs().max().item() + 1e-12))
    print(f"worst relative grad diff: {worst:.3g}")
    assert worst < 1e-3


def test_bf16_autocast_cpu_train_step():
    model = build_grl_small(depths=(2,), num_heads_window=(2,), num_heads_stripe=(2,), img_size=16).train()
    x = torch.rand(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().mean().backward()
    assert torch.isfinite(y.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_traces_without_graph_breaks():
    # dynamo only (eager backend): no graph break at the training size, so
    # torch.compile(fullgraph=True) and CUDA graphs apply.
    model = build_grl_small(depths=(2,), num_heads_window=(2,), num_heads_stripe=(2,), img_size=16).eval()
    x = torch.rand(1, 3, 16, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert _max_diff(compiled(x), model(x)) == 0.0


# ------------------------------------------------------------------ CUDA


@contextlib.contextmanager
def _no_tf32():
    """Full fp32 matmuls and convolutions (cuDNN allows TF32 by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
def test_matches_reference_cuda_fp32_and_bf16(ours, ref):
    dev = torch.device("cuda")
    a, b = copy.deepcopy(ours).to(dev), copy.deepcopy(ref).to(dev)
    x = torch.rand(2, 3, 90, 90, generator=torch.Generator().manual_seed(4)).to(dev)
    with _no_tf32(), torch.no_grad():
        expected = b(x)
        diff = _max_diff(a(x), expected)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours_bf16, ref_bf16 = a(x), b(x)
    print(f"cuda fp32 max abs diff: {diff:.3g}")
    assert diff < TOL
    # bf16: ours is no further from the fp32 reference than the reference's own bf16 run (with slack).
    err_ours, err_ref = _max_diff(ours_bf16, expected), _max_diff(ref_bf16, expected)
    mean_ours = (ours_bf16.float() - expected).abs().mean().item()
    mean_ref = (ref_bf16.float() - expected).abs().mean().item()
    print(f"cuda bf16 max abs err ours {err_ours:.3g} reference {err_ref:.3g}; mean {mean_ours:.3g} / {mean_ref:.3g}")
    assert torch.isfinite(ours_bf16).all()
    assert err_ours < max(3 * err_ref, 0.05)
    assert mean_ours < max(3 * mean_ref, 5e-3)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_grads_match_reference_and_compile(ours, ref):
    dev = torch.device("cuda")
    a, b = copy.deepcopy(ours).to(dev), copy.deepcopy(ref).to(dev)
    x = torch.rand(2, 3, 90, 90, generator=torch.Generator().manual_seed(5)).to(dev)
    with _no_tf32():
        for m in (a, b):
            m(x).square().mean().backward()
        ref_params = dict(b.named_parameters())
        for name, p in a.named_parameters():
            g = ref_params[name].grad
            assert _max_diff(p.grad, g) <= 1e-3 * g.abs().max().item() + 1e-7, name
        compiled = torch.compile(copy.deepcopy(a), fullgraph=True)
        with torch.no_grad():
            assert _max_diff(compiled(x), a(x)) < 1e-3
