"""Benchmarks that cannot rot: their smoke modes run here (seconds, tiny sizes, no figures asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_runs_in_smoke_mode_and_writes_its_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("gpu_suite", None)
    import gpu_suite

    report = gpu_suite.main(["--smoke", "--device", "cpu", "--out", str(tmp_path / "gpu_suite.json"),
                             "--workdir", str(tmp_path / "work")])
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["smoke"] and saved["device"] == "cpu"
    variants = saved["model_only"]["variants"]
    assert {v["precision"] for v in variants} == {"fp32", "bf16"} and all("error" not in v for v in variants)
    assert "error" not in saved["end_to_end"] and saved["end_to_end"]["blocks"] >= 1
    assert report["suite_s"] == saved["suite_s"]


def test_the_scheduler_and_sparse_start_benchmarks_run_in_smoke_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for name in ("scheduler", "sparse_start"):
        sys.modules.pop(name, None)
    import scheduler
    import sparse_start

    scheduler.main(["--smoke"])
    sparse_start.main([str(tmp_path / "sparse"), "--smoke"])
    out = capsys.readouterr().out
    assert "fresh :" in out and "resume:" in out and "marker:" in out


def test_the_self_supervised_benchmark_runs_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("self_supervised", None)
    import self_supervised

    report = self_supervised.main(["--smoke", "--ablation", "--out", str(tmp_path / "ssl")])
    mean = report["synthetic"]["mean"]
    assert set(mean) == {"input", "nlm", "n2v", "n2v2", "care", *self_supervised.ABLATION}
    for name, (section, network) in self_supervised.ABLATION.items():  # each variant trained what it names
        provenance = json.loads((tmp_path / "ssl" / name / "best" / "config.json").read_text())["provenance"]["config"]
        assert {k: provenance["self_supervised"][k] for k in section} == section
        assert {k: provenance["network"][k] for k in network} == network
    assert json.loads((tmp_path / "ssl" / "self_supervised.json").read_text())["args"]["smoke"]
    if "skipped" not in report["llsm"]:  # the shared data lie beside the checkout
        assert set(report["llsm"]["n2v"]["residual_lag1"]) == {"z", "y", "x"}
        assert Path(report["llsm"]["png"]).exists()


def _import(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop(name, None)
    return __import__(name)


@pytest.mark.slow
def test_the_engine_and_cpu_path_benchmarks_run_in_smoke_mode(tmp_path, monkeypatch, capsys):
    engine = _import("engine", monkeypatch)
    results = engine.main(["all", "--smoke", "--tmp", str(tmp_path / "engine")])
    assert {"copy", "care", "rss", "cpu-goal"} <= set(results) and results["rss"]["8x"]["blocks"] > 1
    cpu_paths = _import("cpu_paths", monkeypatch)
    cpu_paths.main(["--smoke"])
    assert "bf16 channels_last:" in capsys.readouterr().out


@pytest.mark.slow
def test_the_quality_benchmarks_run_in_smoke_mode(tmp_path, monkeypatch):
    care_quality = _import("care_quality", monkeypatch)
    summary = care_quality.main(["--smoke", "--out", str(tmp_path / "care")])
    assert set(summary) == {"input", "nlm", "care"}
    isotropic = _import("isotropic_synthetic", monkeypatch)
    table = isotropic.main(["--smoke", "--workdir", str(tmp_path / "iso")])
    assert [r["method"] for r in table][-2:] == ["bigcare isotropic", "ground truth"]


@pytest.mark.slow
def test_the_sampling_benchmark_runs_in_smoke_mode(tmp_path, monkeypatch):
    sampling = _import("sampling", monkeypatch)
    figures = sampling.main(["--smoke", "--data", str(tmp_path / "sampling")])
    assert {"throughput", "memory"} <= set(figures)


@pytest.mark.slow
def test_the_reliability_benchmark_runs_in_smoke_mode(tmp_path, monkeypatch):
    reliability = _import("reliability", monkeypatch)
    report = reliability.main(["--smoke", "--out", str(tmp_path / "rel")])
    assert json.loads((tmp_path / "rel" / "reliability.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["calibration"]) == {"single", "ensemble"}
    for readout in report["calibration"].values():  # recalibration changes what is measured
        assert readout["coverage_after"] != readout["coverage_before"]
    assert 0 <= report["disagreement"]["mean_d_in_distribution"] <= 1
    graded = report["disagreement"]["graded_input"]
    assert len(graded["mean_d_per_x_third"]) == len(graded["mean_abs_error_per_x_third"]) == 3


@pytest.mark.slow
def test_the_subdiffraction_benchmark_runs_in_smoke_mode(tmp_path, monkeypatch):
    subdiffraction = _import("subdiffraction", monkeypatch)
    report = subdiffraction.main(["--smoke", "--out", str(tmp_path / "sd")])
    assert json.loads((tmp_path / "sd" / "subdiffraction.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["methods"]) == {"input", "rl", "care", "gan"}
    assert report["rl_iterations"] in (2, 4) and report["truth"]["false_positive_maxima"] == 0
    for row in report["methods"].values():
        assert row["n_profiles"] > 0 and row["fwhm_um"] > 0 and 0 <= row["false_positive_maxima"] <= row["maxima"]
        assert row["frc_um"] > 0.07  # about Nyquist (2 px of 0.04 um) at the finest


def test_the_isotropic_real_data_benchmark_runs_in_smoke_mode(tmp_path, monkeypatch):
    isotropic_real = _import("isotropic_real", monkeypatch)
    if not isotropic_real.DATA.exists():
        pytest.skip(f"{isotropic_real.DATA} is not beside the checkout")
    rows = isotropic_real.main(["--smoke", "--workdir", str(tmp_path / "real")])
    assert [r["method"].split(" (")[0] for r in rows] == ["linear", "cubic", "Richardson-Lucy", "bigcare isotropic"]
    assert all(r["psnr"] == r["psnr"] and r["psnr"] > 0 and 0 < r["ssim"] <= 1 for r in rows)  # finite
    with pytest.raises(SystemExit, match="was made with"):  # a stale restored volume is not rescored
        isotropic_real.main(["--smoke", "--workdir", str(tmp_path / "real"), "--reuse", "--blur", "0.2"])


def test_the_projection_benchmark_runs_in_smoke_mode(tmp_path, monkeypatch):
    projection = _import("projection", monkeypatch)
    report = projection.main(["--smoke", "--out", str(tmp_path / "projection")])
    assert set(report["projection"]["methods"]) == {"max", "heightmap", "care3d_max", "care3d_heightmap", "projection"}
    assert set(report["upsampling"]["methods"]) == {"cubic", "isotropic", "upsampling"}
    assert json.loads((tmp_path / "projection" / "projection.json").read_text())["args"]["smoke"]


def test_the_predict_overhead_benchmark_runs_in_smoke_mode(monkeypatch, capsys):
    predict_overhead = _import("predict_overhead", monkeypatch)
    report = predict_overhead.main(["--smoke"])
    assert {"fp32", "bf16"} <= set(report) and "network" in report["fp32"]["stages"]


def test_the_isotropic_ablation_runs_in_smoke_mode(tmp_path, monkeypatch):
    ablation = _import("isotropic_ablation", monkeypatch)
    rows = ablation.main(["--smoke", "--workdir", str(tmp_path / "ablation")])
    assert [r["arm"] for r in rows] == ["input (linear)", "base", "grid_noise", "geometric",
                                            "noise+small_patch+cosine"]
    assert all(r["psnr"] == r["psnr"] and r["psnr"] > 0 for r in rows)  # finite scores


def test_the_csbdeep_comparison_runs_in_smoke_mode_without_csbdeep(monkeypatch, capsys):
    vs_csbdeep = _import("vs_csbdeep", monkeypatch)
    report = vs_csbdeep.main(["--smoke", "--backends", "auto", "torch"])
    files = {"bigcare fp32", "bigcare auto", "bigcare fp32 torch", "bigcare auto torch"}
    assert set(report["table"]) == files | {f"{name} in memory" for name in files}
    assert report["table"]["bigcare fp32 torch"]["runs"][0]["backend"] == "torch"
    assert report["table"]["bigcare auto in memory"]["runs"][0]["shape"] == [16, 64, 64]
