"""edge-vla profile answers "will my robot keep up?": chunk-strategy verdicts from the onboard loop's own
limits, stage means that add up to the total (under load too, and in both plot panels), outputs of a
tarball profile that outlive the command, and the Jetson power mode recorded with the report."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_vla import cli
from edge_vla.bundle import Bundle
from edge_vla.runtime import profile as prof


@pytest.fixture(scope="module")
def bundle_copy(tiny_bundle, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("verdict") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _synthetic(total_ms: np.ndarray, steps: int = 1) -> prof.ConfigResult:
    """A configuration whose stages split each run's total 10/50/30/10 minus a small unattributed rest."""
    total = np.asarray(total_ms, np.float64)
    samples = {"preprocess": 0.1 * total, "prefix": 0.5 * total, "postprocess": 0.1 * total,
               "ode_total": 0.29 * total, "total": total}
    for i in range(steps):
        samples[f"step_{i}"] = samples["ode_total"] / steps
    return prof.ConfigResult("fp32 euler x1", "fp32", steps, "euler", samples, "fake")


# --- item: the tarball's outputs -----------------------------------------------------------------------
PATH_LINE = re.compile(r"^(?:trace[^:]*|plot|report|profile)[^:]*: (/\S+)$", re.MULTILINE)


def test_tarball_profile_prints_only_paths_that_exist_after_it_returns(bundle_copy, tmp_path, capsys):
    tarball = tmp_path / "bundle.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(bundle_copy, arcname=".")
    rc = cli.main(["profile", str(tarball), "--steps", "1", "--iterations", "3", "--warmup", "1",
                   "--threads", "1", "--no-roofline"])
    out = capsys.readouterr().out
    printed = [Path(p) for p in PATH_LINE.findall(out)]
    assert rc == 0
    assert any(p.name == "trace.json" for p in printed) and any(p.name == "profile.json" for p in printed), out
    missing = [str(p) for p in printed if not p.exists()]
    assert not missing, f"printed paths that do not exist after the command returned: {missing}"
    # next to the tarball, not inside the bundle's temporary extraction
    assert all(p.is_relative_to(tmp_path) for p in printed), printed


# --- item: stage times that add up ---------------------------------------------------------------------
def _busy(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        x += 1


@pytest.mark.parametrize("chunk", ["off", "auto"])
def test_stage_means_add_up_to_the_total_mean_under_load(bundle_copy, chunk, monkeypatch):
    # off: prefix + steps from the host; auto: onnxruntime's one-call chunk, one chunk_graph stage (as TensorRT's)
    monkeypatch.setenv("EDGE_VLA_ORT_CHUNK", chunk)
    stop = threading.Event()
    hog = threading.Thread(target=_busy, args=(stop,), daemon=True)  # competes for the GIL and a core
    hog.start()
    try:
        results = prof.profile_bundle(Bundle.open(bundle_copy), [2], iterations=40, warmup=2, threads=1)
    finally:
        stop.set()
        hog.join()
    summary = prof.summarize(results[0], budget_ms=20.0)
    rows = summary["breakdown_ms"]
    middle = ["prefix", "ode"] if chunk == "off" else [prof.FUSED]
    assert list(rows) == ["preprocess", *middle, "postprocess", "other", "total"]
    parts = sum(v for k, v in rows.items() if k != "total")
    assert parts == pytest.approx(rows["total"], rel=1e-12, abs=1e-12)
    assert rows["total"] == pytest.approx(summary["stages"]["total"]["mean"], rel=1e-12)
    # the "other" row is what no stage accounts for, not a fudge: it equals mean(total - stages) per run
    s = results[0].samples
    inner = s["prefix"] + s["ode_total"] if chunk == "off" else s[prof.FUSED]
    rest = s["total"] - s["preprocess"] - inner - s["postprocess"]
    assert rows["other"] == pytest.approx(float(rest.mean()), abs=1e-9)


def test_table_shares_sum_to_100_percent():
    config = prof.summarize(_synthetic(np.linspace(10.0, 30.0, 50)), budget_ms=None)
    table = prof.format_table(config)
    shares = [float(m.group(1)) for m in re.finditer(r"^  (?:preprocess|prefix|ode|postprocess|other)\b.*?"
                                                     r"(-?\d+\.\d)%$", table, re.MULTILINE)]
    assert len(shares) == 5, table
    assert sum(shares) == pytest.approx(100.0, abs=0.3)


def test_plot_panels_use_the_same_numbers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    results = [_synthetic(np.r_[np.full(90, 10.0), np.full(10, 60.0)]), _synthetic(np.full(100, 5.0))]
    prof.plot_latency(results, 20.0, tmp_path / "latency.png")
    ax_dist, ax_stack = figures[0].axes
    for row, r in enumerate(results):
        bars = [p for p in ax_stack.patches if abs(p.get_y() + p.get_height() / 2 - (row + 1)) < 1e-6]
        # the stacked bar ends at the mean total (stages + other), and the distribution panel marks that mean
        assert max(p.get_x() + p.get_width() for p in bars) == pytest.approx(r.samples["total"].mean())
        marks = [line for line in ax_dist.lines if line.get_label() == "_mean"]
        assert any(np.allclose(line.get_xdata(), [r.samples["total"].mean()]) and
                   np.allclose(line.get_ydata(), [row + 1]) for line in marks)
    plt.close("all")


# --- item: the verdict judges the chunk strategy, not one control period -------------------------------
def test_cli_verdict_judges_the_chunk_strategy_not_the_control_period(bundle_copy, tmp_path, capsys):
    # 500 Hz: a 2 ms control period, which a 10-step inference (~3-10 ms here) exceeds; the async loop
    # only needs a chunk every few hundred ms, so the robot keeps up and --check must pass.
    rc = cli.main(["profile", str(bundle_copy), "--steps", "10", "--iterations", "10", "--warmup", "2",
                   "--threads", "1", "--no-plot", "--no-roofline", "--rate-hz", "500", "--check",
                   "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads((tmp_path / "profile.json").read_text())["reports"][0]
    config = report["configurations"][0]
    assert set(config["chunk_verdicts"]) == {"sync", "receding", "ensemble"}  # no rtc block in this bundle
    rec = config["chunk_verdicts"]["receding"]
    assert rec["pass"] and rec["tolerated_ms"] > 100 and rec["margin_ms"] == pytest.approx(
        rec["tolerated_ms"] - rec["p99_ms"])
    assert config["verdict"]["strategy"] == "receding" and config["verdict"]["pass"]
    assert config["stages"]["total"]["p99"] > report["control_loop"]["period_ms"] == pytest.approx(2.0)
    assert re.search(r"^control loop: 500 Hz", out, re.MULTILINE), out


def test_tolerated_latency_follows_the_onboard_loops_numbers():
    from edge_vla.onboard.scheduler import STRATEGIES
    from edge_vla.onboard.watchdog import WatchdogConfig

    man = _manifest(chunk_len=8, period=0.1, rate=50)
    timing = prof.loop_timing(man)
    tol = prof.tolerances(timing)
    assert set(tol) == set(STRATEGIES)
    hp, tc = 8 * 0.1, 1 / 50
    # async: observe, infer L, publish; the next chunk lands 2L + one control period after the last
    # observation, and the last one's actions run out H * P after it
    assert tol["receding"].tolerated_s == pytest.approx((hp - tc) / 2)
    assert tol["ensemble"].tolerated_s == pytest.approx((hp - tc) / 2)
    age = WatchdogConfig().chunk_max_age_s
    assert timing.chunk_max_age_s == age
    # sync: the robot waits; chunk age before the next one is 2 (L + Tc) + H * P + the plan clock's ramp / 2
    assert tol["sync"].tolerated_s == pytest.approx((age - hp - timing.start_ramp_s / 2) / 2 - tc)
    # control case: the verdict flips with the latency, not with the control period
    ok = prof.chunk_verdicts(np.full(50, 100.0), timing)
    slow = prof.chunk_verdicts(np.full(50, 500.0), timing)
    assert ok["receding"]["pass"] and not slow["receding"]["pass"]
    assert "keeps up" in ok["receding"]["reason"] and "watchdog" in slow["receding"]["reason"]


def test_run_args_change_the_limits_as_run_would():
    man = _manifest(chunk_len=8, period=0.1, rate=50)
    base = prof.tolerances(prof.loop_timing(man))["sync"].tolerated_s
    tighter = prof.loop_timing(man, run_args=["--chunk-max-age", "1.2", "--execute", "4"])
    assert tighter.chunk_max_age_s == 1.2 and tighter.execute == 4
    assert prof.tolerances(tighter)["sync"].tolerated_s != pytest.approx(base)
    with pytest.raises(Exception, match="--bogus"):
        prof.loop_timing(man, run_args=["--bogus"])


def test_rtc_block_sets_its_own_tolerance_and_a_bad_one_is_reported():
    timing = prof.loop_timing({**_manifest(8, 0.1, 50), "rtc": {"max_delay": 3}})
    tol = prof.tolerances(timing)
    # Guaranteed for an inference that starts anywhere within an action: the action under way is already partly
    # played, so 3 frozen actions cover (3 - 1) x 100 ms, less the wait for the next control cycle (20 ms). The
    # onboard strategy takes a chunk over on time up to 3 x 100 - 20 ms only when an inference starts on a boundary.
    assert tol["rtc"].tolerated_s == pytest.approx(2 * 0.1 - 1 / 50)
    v = prof.chunk_verdicts(np.full(20, 250.0), timing)  # inside 3 x 100 - 20 ms, outside the guarantee
    assert not v["rtc"]["pass"] and v["receding"]["pass"]
    assert prof.chunk_verdicts(np.full(20, 150.0), timing)["rtc"]["pass"]  # control
    assert prof.loop_timing({**_manifest(8, 0.1, 50), "rtc": {"max_delay": 2}}, strategy="rtc").strategy == "rtc"
    with pytest.raises(Exception, match="declares no rtc block"):
        prof.loop_timing(_manifest(8, 0.1, 50), strategy="rtc")
    for bad in ({"max_delay": "x"}, {"max_delay": -1}, ["max_delay"], {"max_delay": 1e9}, {}):
        t = prof.loop_timing({**_manifest(8, 0.1, 50), "rtc": bad})
        verdicts = prof.chunk_verdicts(np.full(5, 1.0), t)
        assert "rtc" in verdicts and not verdicts["rtc"]["pass"] and "rtc" in verdicts["rtc"]["reason"]


def _manifest(chunk_len: int, period: float, rate: float) -> dict:
    return {"control": {"action_period_s": period, "chunk_len": chunk_len, "default_rate_hz": rate},
            "model": {"chunk_len": chunk_len},
            "action_space": {"kind": "absolute_joint_position", "names": ["a", "b"], "units": "rad",
                             "action_period_s": period, "lower": [-1.0, -1.0], "upper": [1.0, 1.0],
                             "max_velocity": [2.5, 2.5], "max_acceleration": [20.0, 20.0]}}


# --- item: Jetson power mode ---------------------------------------------------------------------------
def _write(root: Path, rel: str, text: str, mode: int | None = None) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    if mode is not None:
        p.chmod(mode)


def test_power_probe_reads_a_fake_jetson_root(tmp_path):
    _write(tmp_path, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.0\n")
    _write(tmp_path, "proc/device-tree/compatible", "nvidia,p3737-0000+p3701-0005\0nvidia,tegra234\0")
    _write(tmp_path, "usr/sbin/nvpmodel", "#!/bin/sh\necho 'NV Power Mode: MAXN'\necho 0\n", 0o755)
    for cpu, khz in (("cpu0", "2201600"), ("cpu1", "729600")):
        _write(tmp_path, f"sys/devices/system/cpu/{cpu}/cpufreq/scaling_cur_freq", khz + "\n")
    _write(tmp_path, "sys/devices/gpu.0/devfreq/17000000.gpu/cur_freq", "1300500000\n")
    info = prof.power_info(tmp_path)
    assert info["jetson"] is True and "tegra234" in info["model"]
    assert info["nvpmodel"]["mode"] == "MAXN" and "NV Power Mode: MAXN" in info["nvpmodel"]["output"]
    assert info["cpu_mhz"] == {"cpu0": pytest.approx(2201.6), "cpu1": pytest.approx(729.6)}
    assert info["gpu_mhz"] == pytest.approx(1300.5)
    assert "MAXN" in prof.format_power(info)


def test_power_probe_elsewhere_says_not_a_jetson(tmp_path):
    _write(tmp_path, "proc/device-tree/compatible", "raspberrypi,4-model-b\0brcm,bcm2711\0")
    info = prof.power_info(tmp_path)
    assert info == {"jetson": False, "note": "not a Jetson"}
    assert prof.power_info(tmp_path / "missing") == {"jetson": False, "note": "not a Jetson"}


def test_power_probe_survives_broken_files_and_a_failing_nvpmodel(tmp_path):
    _write(tmp_path, "etc/nv_tegra_release", "\xff garbage")
    _write(tmp_path, "usr/bin/nvpmodel", "#!/bin/sh\necho 'NVPM ERROR: permission denied' >&2\nexit 1\n", 0o755)
    _write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "not a number\n")
    (tmp_path / "sys/devices/system/cpu/cpu1/cpufreq").mkdir(parents=True)  # offline core: no file
    _write(tmp_path, "sys/devices/gpu.0/devfreq/x/cur_freq", "")
    unreadable = tmp_path / "sys/devices/system/cpu/cpu2/cpufreq/scaling_cur_freq"
    _write(tmp_path, str(unreadable.relative_to(tmp_path)), "1000")
    unreadable.chmod(0)
    info = prof.power_info(tmp_path)
    assert info["jetson"] is True
    assert info["nvpmodel"]["mode"] is None and "permission denied" in info["nvpmodel"]["error"]
    assert "cpu0" not in info["cpu_mhz"] and info["gpu_mhz"] is None
    assert "unknown" in prof.format_power(info)


def test_power_probe_times_out_a_hung_nvpmodel(tmp_path, monkeypatch):
    _write(tmp_path, "etc/nv_tegra_release", "# R35\n")
    _write(tmp_path, "usr/sbin/nvpmodel", "#!/bin/sh\nexec sleep 30\n", 0o755)
    monkeypatch.setattr(prof, "NVPMODEL_TIMEOUT_S", 0.5)
    info = prof.power_info(tmp_path)
    assert "timed out" in info["nvpmodel"]["error"]


def test_roofline_names_the_power_mode_it_assumes():
    from edge_vla.runtime import roofline as rl

    for t in rl.TARGETS.values():
        assert t.power_mode, t.name
    report = rl.roofline_report({"prefix": rl.GraphCost(1e9, 10**6, 10**3, "fp32"),
                                 "denoise_step": rl.GraphCost(1e8, 10**6, 10**3, "fp32")}, [1])
    assert report["targets"]["agx-orin-64gb"]["power_mode"] == "MAXN"
    assert "MAXN" in prof.format_roofline(report)



def test_fused_tensorrt_timings_profile_report_plot_and_trace(tmp_path):
    # TensorRT runs prefix + steps as one CUDA graph: its timings have chunk_graph, not prefix/ode_total
    total = np.linspace(2.0, 4.0, 30)
    samples = {"preprocess": 0.1 * total, "chunk_graph": 0.8 * total, "postprocess": 0.05 * total, "total": total}
    fused = prof.ConfigResult("fp16 euler x10", "fp16", 10, "euler", samples, "tensorrt")
    config = prof.summarize(fused, budget_ms=None)
    rows = config["breakdown_ms"]
    assert list(rows) == ["preprocess", "chunk_graph", "postprocess", "other", "total"]
    assert rows["other"] == pytest.approx(0.05 * total.mean())
    assert "chunk_graph" in prof.format_table(config)
    from edge_vla.runtime.trace import chrome_trace

    events = {e["name"]: e for e in chrome_trace([("x", fused.representative())])["traceEvents"] if e["ph"] == "X"}
    assert set(events) == {"total", "preprocess", "chunk_graph", "postprocess"}
    if pytest.importorskip("matplotlib"):
        prof.plot_latency([fused, _synthetic(total)], None, tmp_path / "p.png")
