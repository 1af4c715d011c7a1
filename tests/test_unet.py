"""CARE U-Net: architecture, config validation, receptive field against impulse responses."""

from __future__ import annotations

import pytest
import torch

from bigcare.errors import ConfigError, ModelMismatchError
from bigcare.models.architecture import Head, UNetConfig, divisor, halo, receptive_extents, receptive_radius
from bigcare.models.unet import UNet


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_default_3d_net_has_care_parameter_count():
    cfg = UNetConfig(ndim=3)
    assert cfg.kernel_size == 3
    # CSBDeep's resunet3_2_3_32: 996,769 parameters (hand-counted from unet_block)
    assert _n_params(UNet(cfg)) == 996_769


def test_default_2d_net_uses_kernel_5():
    cfg = UNetConfig(ndim=2)
    assert cfg.kernel_size == 5
    assert _n_params(UNet(cfg)) == 922_977


def test_filter_counts_follow_csbdeep_unet_block():
    net = UNet(UNetConfig(ndim=2, depth=2, n_filter_base=8, kernel_size=3))

    def convs(seq):
        return [(m.in_channels, m.out_channels) for m in seq if hasattr(m, "in_channels")]

    assert convs(net.down[0]) == [(1, 8), (8, 8)]
    assert convs(net.down[1]) == [(8, 16), (16, 16)]
    assert convs(net.middle) == [(16, 32), (32, 16)]
    assert convs(net.up[1]) == [(32, 16), (16, 8)]
    assert convs(net.up[0]) == [(16, 8), (8, 8)]


def test_output_shapes_and_head_names():
    cfg = UNetConfig(
        ndim=3,
        depth=1,
        n_filter_base=4,
        n_channel_in=2,
        n_channel_out=2,
        heads=[Head(name="mean"), Head(name="scale", activation="softplus")],
    )
    out = UNet(cfg)(torch.randn(3, 2, 4, 6, 8))
    assert list(out) == ["mean", "scale"]
    assert all(v.shape == (3, 2, 4, 6, 8) for v in out.values())
    assert (out["scale"] > 0).all()


def test_residual_is_added_to_first_head_only():
    heads = [Head(name="a"), Head(name="b")]
    torch.manual_seed(0)
    res = UNet(UNetConfig(ndim=2, depth=1, n_filter_base=4, heads=heads, residual=True))
    plain = UNet(UNetConfig(ndim=2, depth=1, n_filter_base=4, heads=heads, residual=False))
    plain.load_state_dict(res.state_dict())
    x = torch.randn(1, 1, 8, 8)
    y_res, y_plain = res(x), plain(x)
    torch.testing.assert_close(y_res["a"], y_plain["a"] + x)
    torch.testing.assert_close(y_res["b"], y_plain["b"])


def test_input_not_divisible_by_pool_is_refused():
    net = UNet(UNetConfig(ndim=2, depth=2, n_filter_base=2))
    with pytest.raises(ModelMismatchError, match=r"\(8, 10\).*divisible by.*= 4"):
        net(torch.zeros(1, 1, 8, 10))
    with pytest.raises(ModelMismatchError, match="3 channel"):
        net(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ModelMismatchError, match="4 dimensions"):
        net(torch.zeros(1, 1, 8, 8, 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ndim=2, kernel_size=4), "kernel_size must be odd"),
        (dict(ndim=2, n_channel_in=2), "residual=True needs n_channel_in == n_channel_out"),
        (dict(ndim=2, heads=[Head(name="x"), Head(name="x")]), "unique"),
        (dict(ndim=2, heads=[]), "heads"),
        (dict(ndim=4), "ndim"),
        (dict(ndim=2, depth=0), "depth"),
        (dict(ndim=2, filters=3), "filters"),
    ],
)
def test_config_rejects_invalid_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        UNetConfig(**kwargs)


def test_head_name_must_be_identifier():
    with pytest.raises(ConfigError, match="identifier"):
        Head(name="my.head")


def test_halo_is_radius_rounded_up_to_divisor():
    cfg3, cfg2 = UNetConfig(ndim=3), UNetConfig(ndim=2)
    assert (receptive_radius(cfg3), halo(cfg3), divisor(cfg3)) == (23, 24, 4)
    assert (receptive_radius(cfg2), halo(cfg2), divisor(cfg2)) == (43, 44, 4)


# --- receptive field against impulse responses -------------------------------------------


def _measured_extents(cfg: UNetConfig, axis: int, dtype: torch.dtype, seed: int = 0):
    """Exact input extent (left, right) of one output voxel, per pooling phase, along `axis`.

    Non-negative weights (scaled by 1/fan_in) and a strictly monotone ramp input keep every
    ReLU active and make every max-pool window pick its element on the ramp's high side, so
    the gradient of one output voxel reaches exactly the farthest input a path can reach: an
    increasing ramp measures the right extent, a decreasing one the left. The other axes have
    the minimal size (divisor); their zero padding does not shorten paths along `axis`.
    """
    gen = torch.Generator().manual_seed(seed)
    net = UNet(cfg).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=dtype) / p[0].numel() + 1e-3)
    d = divisor(cfg)
    length = d * (-(-(2 * receptive_radius(cfg) + 2 * d) // d) + 1)
    shape = [d] * cfg.ndim
    shape[axis] = length
    ramp = torch.arange(length, dtype=dtype)
    ramp = ramp.reshape([-1 if i == axis else 1 for i in range(cfg.ndim)]).expand(shape)
    x = torch.stack([ramp + 1] * d + [length - ramp] * d)[:, None].requires_grad_()
    y = net(x)[cfg.heads[0].name]
    center = (length // 2) // d * d
    target = 0
    for b in range(2 * d):  # sample b: output voxel of phase b % d
        idx = [b, slice(None)] + [s // 2 for s in shape]
        idx[2 + axis] = center + b % d
        target = target + y[tuple(idx)].sum()
    (grad,) = torch.autograd.grad(target, x)
    profile = grad.abs().sum(dim=[1] + [2 + i for i in range(cfg.ndim) if i != axis])
    extents = [[0, 0] for _ in range(d)]
    for b in range(2 * d):
        nz = torch.nonzero(profile[b]).flatten()
        o = center + b % d
        if b < d:
            extents[b][1] = int(nz.max()) - o
        else:
            extents[b - d][0] = o - int(nz.min())
    return [tuple(e) for e in extents]


_IMPULSE_CASES = [(nd, depth, k) for nd in (2, 3) for depth in (1, 2, 3) for k in (3, 5)]


@pytest.mark.parametrize("ndim, depth, kernel_size", _IMPULSE_CASES)
def test_receptive_radius_matches_impulse_response(ndim, depth, kernel_size):
    cfg = UNetConfig(
        ndim=ndim, depth=depth, kernel_size=kernel_size, n_filter_base=2, residual=False
    )
    # float32 for the large 3D cases (speed): the ramp's steps are far above rounding
    dtype = torch.float32 if ndim == 3 and depth == 3 else torch.float64
    predicted = receptive_extents(cfg)
    for axis in range(ndim):
        measured = _measured_extents(cfg, axis, dtype, seed=axis)
        assert measured == predicted, f"axis {axis}"
    assert max(max(e) for e in predicted) == receptive_radius(cfg)


@pytest.mark.parametrize("ndim, depth, pooling, top_skip", [(2, 1, "maxblur", True), (2, 2, "maxblur", False),
                                                        (2, 3, "max", False), (3, 2, "maxblur", False)])
def test_n2v2_architecture_changes_the_receptive_field_as_computed(ndim, depth, pooling, top_skip):
    """Max-blur pooling and the missing top skip (N2V2) against the impulse response."""
    cfg = UNetConfig(ndim=ndim, depth=depth, kernel_size=3, n_filter_base=2, residual=False,
                     pooling=pooling, top_skip=top_skip)
    plain = UNetConfig(ndim=ndim, depth=depth, kernel_size=3, n_filter_base=2, residual=False)
    for axis in range(ndim):
        assert _measured_extents(cfg, axis, torch.float64, seed=axis) == receptive_extents(cfg), f"axis {axis}"
    if pooling == "maxblur":  # the blur reaches one voxel further on each side, per level
        assert receptive_radius(cfg) > receptive_radius(plain)


def test_n2v2_without_top_skip_has_fewer_parameters_and_needs_pool_2():
    n2v2 = UNet(UNetConfig(ndim=2, depth=2, n_filter_base=4, pooling="maxblur", top_skip=False))
    care = UNet(UNetConfig(ndim=2, depth=2, n_filter_base=4))
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert count(care) - count(n2v2) == 4 * 4 * 5 * 5  # the first up conv lost the skip's 4 channels
    with pytest.raises(ValueError, match="needs pool 2"):
        UNetConfig(ndim=2, pooling="maxblur", pool=3)


def _assert_blockwise_equals_whole(cfg: UNetConfig, shape: tuple[int, int], blocks, seed: int) -> None:
    """2D blocks (y0, x0, by, bx) read with the halo, cropped, equal the whole image's prediction."""
    torch.manual_seed(seed)
    net = UNet(cfg).double().eval()
    h = halo(cfg)
    img = torch.randn(1, 1, *shape, dtype=torch.float64)
    with torch.no_grad():
        whole = net(img)["restored"]
        for y0, x0, by, bx in blocks:
            ry0, rx0 = max(0, y0 - h), max(0, x0 - h)
            ry1, rx1 = min(shape[0], y0 + by + h), min(shape[1], x0 + bx + h)
            block = net(img[..., ry0:ry1, rx0:rx1])["restored"]
            crop = block[..., y0 - ry0 : y0 - ry0 + by, x0 - rx0 : x0 - rx0 + bx]
            torch.testing.assert_close(crop, whole[..., y0 : y0 + by, x0 : x0 + bx], atol=1e-10, rtol=0)


@pytest.mark.parametrize("top_skip", [True, False])
def test_blockwise_n2v2_prediction_with_halo_matches_whole_image(top_skip):
    cfg = UNetConfig(ndim=2, depth=2, kernel_size=3, n_filter_base=4, pooling="maxblur", top_skip=top_skip)
    _assert_blockwise_equals_whole(cfg, (128, 96), [(48, 32, 32, 32), (0, 64, 16, 32), (96, 0, 32, 16)], seed=3)


def test_receptive_extents_with_pool_3_and_three_convs():
    cfg = UNetConfig(
        ndim=2, depth=2, pool=3, kernel_size=3, n_conv_per_depth=3, n_filter_base=2,
        residual=False,
    )
    for axis in range(2):
        assert _measured_extents(cfg, axis, torch.float64) == receptive_extents(cfg)


@pytest.mark.parametrize("ndim, depth, kernel_size", [(2, 2, 5), (2, 3, 3), (3, 1, 3)])
def test_random_weights_never_reach_beyond_receptive_radius(ndim, depth, kernel_size):
    """Generic signed weights and random inputs: gradients stay within the extents."""
    cfg = UNetConfig(ndim=ndim, depth=depth, kernel_size=kernel_size, n_filter_base=4)
    torch.manual_seed(1)
    net = UNet(cfg).double()
    d, r = divisor(cfg), receptive_radius(cfg)
    size = d * (-(-(2 * r + 2 * d) // d) + 1)
    center = (size // 2) // d * d
    x = torch.randn(d, 1, *(size,) * ndim, dtype=torch.float64, requires_grad=True)
    y = net(x)["restored"]
    target = sum(y[(b, 0) + (center + b,) * ndim] for b in range(d))
    (grad,) = torch.autograd.grad(target, x)
    for b in range(d):
        nz = torch.nonzero(grad[b, 0])
        left, right = receptive_extents(cfg)[b]
        assert (nz >= center + b - left).all() and (nz <= center + b + right).all()


def test_blockwise_prediction_with_halo_matches_whole_image():
    cfg = UNetConfig(ndim=2, depth=2, kernel_size=3, n_filter_base=4)
    _assert_blockwise_equals_whole(cfg, (96, 80), [(32, 16, 32, 32), (0, 48, 16, 32), (64, 0, 32, 16)], seed=2)


def test_blockwise_prediction_with_too_small_halo_differs():
    """The check above can fail: one pooling step less of halo leaves a seam."""
    cfg = UNetConfig(ndim=2, depth=2, kernel_size=3, n_filter_base=4)
    torch.manual_seed(2)
    net = UNet(cfg).double().eval()
    h = halo(cfg) - divisor(cfg)
    img = torch.randn(1, 1, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        whole = net(img)["restored"][..., 32:64, 32:64]
        block = net(img[..., 32 - h : 64 + h, 32 - h : 64 + h])["restored"][..., h:-h, h:-h]
    assert (block - whole).abs().max() > 1e-12  # exact halo: < 1e-15 in float64
