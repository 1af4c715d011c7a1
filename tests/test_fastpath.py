"""Every fast path of bigcare.predictors.fastpath against the plain fp32 model, on CPU, tiny nets."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from bigcare.errors import ModelMismatchError
from bigcare.models import Head, UNet, UNetConfig
from bigcare.predictors.fastpath import default_paths, prepare_model


def _net(ndim, heads=None, seed=0):
    torch.manual_seed(seed)
    kwargs = {} if heads is None else {"heads": [Head(**h) for h in heads]}
    return UNet(UNetConfig(ndim=ndim, depth=2, n_filter_base=4, **kwargs)).eval()


def _input(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


NETS = {  # ndim -> (model, input)
    3: (_net(3, heads=[{"name": "restored"}, {"name": "scale", "activation": "softplus"}]), _input((1, 1, 16, 32, 32))),
    2: (_net(2), _input((2, 1, 32, 32))),
}


def _reference(ndim):
    model, x = NETS[ndim]
    with torch.inference_mode():
        return {k: v.clone() for k, v in model(x).items()}


def _max_rel(y, ref):
    return max(float((y[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)


def _rel_l2(y, ref):
    return max(float((y[k] - ref[k]).norm() / ref[k].norm()) for k in ref)


def _check_outputs(y, ref):
    assert list(y) == list(ref)
    for k in ref:
        assert y[k].dtype == torch.float32 and y[k].shape == ref[k].shape and y[k].is_contiguous()


@pytest.mark.parametrize("ndim", [3, 2])
def test_plain_equals_model(ndim):
    model, x = NETS[ndim]
    y = prepare_model(model, channels_last=False, compile=False, onednn_conv=False)(x)
    _check_outputs(y, _reference(ndim))
    assert _max_rel(y, _reference(ndim)) == 0.0


@pytest.mark.parametrize("ndim", [3, 2])
@pytest.mark.parametrize("channels_last,onednn", [(True, True), (True, False), (False, True)])
def test_channels_last_and_onednn_conv(ndim, channels_last, onednn):
    model, x = NETS[ndim]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = prepare_model(model, channels_last=channels_last, compile=False, onednn_conv=onednn)
    y, ref = f(x), _reference(ndim)
    assert f.paths == {"channels_last": channels_last, "compile": False, "freezing": False,
                       "onednn_conv": onednn and torch.backends.mkldnn.is_available()}
    _check_outputs(y, ref)
    assert _max_rel(y, ref) <= 1e-5
    # the caller's model is untouched (still default layout, same weights)
    for k, v in model.state_dict().items():
        assert v.is_contiguous() and torch.equal(v, before[k])


@pytest.mark.parametrize("ndim", [3, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast(ndim, channels_last):
    model, x = NETS[ndim]
    y = prepare_model(model, precision="bf16", channels_last=channels_last, compile=False)(x)
    ref = _reference(ndim)
    _check_outputs(y, ref)
    assert _rel_l2(y, ref) < 2e-2


def test_fp16_autocast_cpu():
    model, _ = NETS[3]
    x = _input((1, 1, 8, 16, 16))
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
            model(x)
    except RuntimeError as err:
        pytest.skip(f"fp16 autocast not supported on this CPU build: {err}")
    with pytest.warns(RuntimeWarning, match="fp16"):
        f = prepare_model(model, precision="fp16", compile=False)
    with torch.inference_mode():
        ref = model(x)
    y = f(x)
    _check_outputs(y, ref)
    assert _rel_l2(y, ref) < 2e-2


def test_defaults_and_bad_precision():
    assert default_paths("cpu", "fp32") == {"channels_last": True, "compile": False}
    assert prepare_model(NETS[3][0], precision="bf16").paths["onednn_conv"] is False  # autocast: not swapped
    assert default_paths("cuda", "bf16")["channels_last"] is True
    with pytest.raises(ValueError, match="precision"):
        prepare_model(NETS[3][0], precision="int8")


# -- torch.compile: the policy with a stand-in compiler (fast), then real compiles (slow, once) --


class _FakeCompiled:
    def __init__(self, module, fail=False):
        self.module, self.fail, self.calls = module, fail, []

    def __call__(self, x):
        self.calls.append(tuple(x.shape))
        if self.fail:
            raise RuntimeError("InductorError: no C++ compiler")
        return self.module(x)


def _fake_compile(monkeypatch, fail=False):
    made = []

    def fake(module, **kwargs):
        made.append(_FakeCompiled(module, fail))
        assert kwargs["dynamic"] is False
        return made[-1]

    monkeypatch.setattr(torch, "compile", fake)
    return made


def test_compile_policy_per_shape(monkeypatch):
    made = _fake_compile(monkeypatch)
    model, x = NETS[3]
    f = prepare_model(model, compile=True, compile_min_calls=2, max_compiled_shapes=1)
    f(x)
    assert made[0].calls == []  # first sight of a shape: eager
    f(x)
    f(x)
    assert made[0].calls == [tuple(x.shape)] * 2 and f.compiled_shapes == {tuple(x.shape)}
    other = _input((1, 1, 16, 32, 16))
    for _ in range(3):
        f(other)  # over max_compiled_shapes: stays eager
    assert len(made[0].calls) == 2
    prepare_model(model, compile=True, example_shape=(16, 32, 32))  # compiled (warmed up) at once
    assert made[1].calls == [(1, 1, 16, 32, 32)]


def test_compile_failure_falls_back(monkeypatch):
    _fake_compile(monkeypatch, fail=True)
    model, x = NETS[3]
    f = prepare_model(model, compile=True, compile_min_calls=1)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        y = f(x)
    assert f.paths["compile"] is False and _max_rel(y, _reference(3)) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(x)  # no second warning, eager from now on
    # a bad input raises the model's own error, not a compile warning
    g = prepare_model(model, compile=True, compile_min_calls=1)
    with pytest.raises(ModelMismatchError):
        g(_input((1, 1, 16, 32, 30)))


@pytest.fixture(scope="module")
def compiled():
    """One real compile per tiny net: 3D fp32 (+freezing) and 2D bf16 (+freezing, channels_last)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f3 = prepare_model(NETS[3][0], compile=True, channels_last=False, example_shape=tuple(NETS[3][1].shape))
        f2 = prepare_model(NETS[2][0], compile=True, channels_last=True, precision="bf16",
                           example_shape=tuple(NETS[2][1].shape))
    if not (f3.paths["compile"] and f2.paths["compile"]):
        pytest.skip("torch.compile unavailable here: " + "; ".join(str(w.message) for w in caught))
    return {3: f3, 2: f2}


@pytest.mark.slow
def test_compile_fp32_3d(compiled):
    f = compiled[3]
    y, ref = f(NETS[3][1]), _reference(3)
    assert f.paths == {"channels_last": False, "compile": True, "freezing": True, "onednn_conv": False}
    assert tuple(NETS[3][1].shape) in f.compiled_shapes
    _check_outputs(y, ref)
    assert _max_rel(y, ref) <= 1e-4


@pytest.mark.slow
def test_compile_bf16_2d(compiled):
    y, ref = compiled[2](NETS[2][1]), _reference(2)
    _check_outputs(y, ref)
    assert _rel_l2(y, ref) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_defaults(precision):
    model, x = NETS[3]
    f = prepare_model(model, device="cuda", precision=precision)
    assert torch.backends.cudnn.benchmark and f.paths["channels_last"]
    y = {k: v.cpu() for k, v in f(x).items()}
    ref = _reference(3)
    assert _rel_l2(y, ref) < (1e-2 if precision == "fp32" else 2e-2)  # fp32: cuDNN may use TF32


@pytest.mark.parametrize("ndim", [3, 2])
def test_n2v2_architecture_takes_every_cpu_fast_path(ndim):
    """Max-blur pooling (a grouped blur conv) and the missing top skip in channels-last, oneDNN, bf16."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(ndim=ndim, depth=2, n_filter_base=4, pooling="maxblur", top_skip=False,
                            residual=False)).eval()
    x = _input((1, 1, 16, 32, 32) if ndim == 3 else (2, 1, 32, 32))
    with torch.inference_mode():
        ref = {k: v.clone() for k, v in model(x).items()}
    fp32 = prepare_model(model, channels_last=True, compile=False, onednn_conv=True)(x)
    _check_outputs(fp32, ref)
    assert _max_rel(fp32, ref) <= 1e-5
    assert _rel_l2(prepare_model(model, precision="bf16", compile=False)(x), ref) < 2e-2


def test_auto_precision_follows_the_hardware(monkeypatch):
    from bigcare.predictors import fastpath

    assert fastpath.resolve_precision("fp32", "cpu") == "fp32" and fastpath.resolve_precision("bf16", "cpu") == "bf16"
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    native = " avx512_bf16" in flags or " amx_bf16" in flags
    assert fastpath.resolve_precision("auto", "cpu") == ("bf16" if native and torch.backends.mkldnn.is_available() else "fp32")
    monkeypatch.setattr(fastpath, "native_bf16", lambda device="cpu": False)
    assert fastpath.resolve_precision("auto", "cpu") == "fp32"
    model, x = NETS[2]
    f = prepare_model(model, precision="auto", compile=False)  # resolved: fp32 here now
    assert _max_rel(f(x), _reference(2)) <= 1e-5
