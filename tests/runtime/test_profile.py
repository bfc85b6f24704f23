"""edge-vla profile: report fields and consistency, trace format, verdict, and the bundle still verifying."""

import json
import shutil

import numpy as np
import pytest

from edge_vla import cli
from edge_vla.bundle import Bundle
from edge_vla.runtime import profile as prof
from edge_vla.runtime.trace import chrome_trace

STEPS = (1, 3)


@pytest.fixture(scope="module")
def bundle_copy(tiny_bundle, tmp_path_factory):
    # a private copy: profiling writes target/, and the session bundle is shared with other tests
    dst = tmp_path_factory.mktemp("profiled") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture(scope="module", autouse=True)
def _stepping_path():
    # These tests check the per-stage (prefix, step_i) attribution of the stepping path; the onnxruntime backend
    # otherwise runs a chunk as one call, timed as "chunk_graph" (tests/runtime/test_ort_chunk.py).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_VLA_ORT_CHUNK", "off")
        yield


@pytest.fixture(scope="module")
def cli_run(bundle_copy, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile_out")
    rc = cli.main(["profile", str(bundle_copy), "--steps", ",".join(map(str, STEPS)), "--iterations", "25",
                   "--warmup", "3", "--threads", "1", "--rate-hz", "50", "--budget-ms", "1e6", "--output", str(out)])
    # read now: later tests profile the same copy again and overwrite target/profile.json
    return rc, out, json.loads((bundle_copy / "target" / "profile.json").read_text())


@pytest.fixture(scope="module")
def results(bundle_copy):
    return prof.profile_bundle(Bundle.open(bundle_copy), [2], iterations=30, warmup=3, threads=1)


def test_cli_writes_report_trace_and_plot(cli_run, bundle_copy):
    rc, out, report = cli_run
    assert rc == 0
    assert report["kind"] == "edge-vla-profile" and report["budget_ms"] == pytest.approx(1e6)
    assert report["rate_hz"] == 50 and report["control_loop"]["period_ms"] == pytest.approx(20.0)
    assert [c["steps"] for c in report["configurations"]] == list(STEPS)
    assert (out / "trace.json").is_file() and (out / "profile.json").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_stats_are_consistent(cli_run):
    report = cli_run[2]
    for config in report["configurations"]:
        stages = config["stages"]
        expected = ["preprocess", "prefix", *(f"step_{i}" for i in range(config["steps"])),
                    "ode_total", "postprocess", "total"]
        assert set(stages) == set(expected)
        for name, s in stages.items():
            assert 0 <= s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], name
            assert s["std"] >= 0 and s["jitter_p99_p50"] == pytest.approx(s["p99"] - s["p50"])
        assert config["verdict"]["pass"] and config["verdict"]["misses"] == 0 and config["verdict"]["budget_pass"]
        assert config["iterations"] == 25


def test_stages_add_up_to_the_total(results):
    s = results[0].samples
    parts = s["preprocess"] + s["prefix"] + s["step_0"] + s["step_1"] + s["postprocess"]
    gap = np.abs(s["total"] - parts)
    # per run, against the run's own total: only clock reads and the noise draw are unattributed
    assert np.median(gap) <= max(0.5, 0.1 * np.median(s["total"]))
    assert np.all(s["ode_total"] >= s["step_0"] + s["step_1"] - 1e-6)


def test_budget_gate_flips_with_the_budget(results):
    total = results[0].samples["total"]
    assert prof.summarize(results[0], budget_ms=1e6)["verdict"]["pass"]
    fail = prof.summarize(results[0], budget_ms=float(total.min()) / 2)["verdict"]
    assert not fail["pass"] and fail["misses"] == len(total) and fail["headroom_ms"] < 0


def test_check_flag_exits_nonzero_over_an_explicit_budget(bundle_copy, tmp_path):
    rc = cli.main(["profile", str(bundle_copy), "--steps", "1", "--iterations", "3", "--warmup", "1",
                   "--budget-ms", "0.000001", "--threads", "1", "--no-plot", "--no-roofline", "--check",
                   "--output", str(tmp_path)])
    assert rc == 3


def test_check_flag_exits_nonzero_when_the_robot_would_not_keep_up(bundle_copy, tmp_path):
    # without --budget-ms the judged strategy's own limit decides: run's defaults pass, and a chunk-age
    # limit (5 ms, passed as `edge-vla run` would take it) leaves a receding loop no time for any inference.
    args = ["profile", str(bundle_copy), "--steps", "3", "--iterations", "5", "--warmup", "1", "--threads", "1",
            "--no-plot", "--no-roofline", "--rate-hz", "500", "--check", "--output", str(tmp_path)]
    assert cli.main(args) == 0
    assert cli.main([*args, "--run-args", "--chunk-max-age 0.005"]) == 3


def test_precision_filter_rejects_missing_precision(bundle_copy, tmp_path):
    rc = cli.main(["profile", str(bundle_copy), "--precision", "int8", "--output", str(tmp_path)])
    assert rc == 1


def test_bad_rate_and_run_args_fail_in_one_line_before_profiling(bundle_copy, tmp_path, capsys):
    for extra, needle in ((["--rate-hz", "0.001"], "--rate-hz"), (["--run-args", "--bogus 1"], "--bogus"),
                          (["--run-args", "'unclosed"], "--run-args")):
        rc = cli.main(["profile", str(bundle_copy), "--output", str(tmp_path), *extra])
        err = capsys.readouterr()
        assert rc == 1 and needle in err.err and "profiling" not in err.out, (extra, err)


def test_trace_is_valid_trace_event_format(cli_run):
    out = cli_run[1]
    trace = json.loads((out / "trace.json").read_text())
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    meta = [e for e in events if e["ph"] == "M"]
    assert len(meta) == 3 * len(STEPS)  # process name, sort index, thread name per configuration
    for pid, steps in enumerate(STEPS, start=1):
        mine = {e["name"]: e for e in complete if e["pid"] == pid}
        expected = {"total", "preprocess", "prefix", "ode_total", "postprocess", *(f"step_{i}" for i in range(steps))}
        assert set(mine) == expected
        total = mine["total"]
        for e in mine.values():
            assert isinstance(e["ts"], (int, float)) and e["dur"] >= 0 and e["tid"] == 1
            # children nest inside the total (what makes Perfetto draw a proper flame)
            assert total["ts"] <= e["ts"] and e["ts"] + e["dur"] <= total["ts"] + total["dur"] + 1e-3
        assert mine["prefix"]["ts"] >= mine["preprocess"]["ts"] + mine["preprocess"]["dur"] - 1e-3
        assert mine["postprocess"]["ts"] >= mine["ode_total"]["ts"] + mine["ode_total"]["dur"] - 1e-3


def test_trace_stays_nested_when_stage_rounding_exceeds_total():
    timings = {"preprocess": 0.1, "prefix": 1.0, "step_0": 0.5, "ode_total": 0.5, "postprocess": 0.1, "total": 1.6}
    events = {e["name"]: e for e in chrome_trace([("x", timings)])["traceEvents"] if e["ph"] == "X"}
    end = events["postprocess"]["ts"] + events["postprocess"]["dur"]
    assert events["total"]["dur"] >= end - events["total"]["ts"]


def test_bundle_still_verifies_after_profiling(cli_run, bundle_copy):
    assert (bundle_copy / "target" / "profile.json").is_file()
    Bundle.open(bundle_copy).verify()


def test_tables_render(cli_run):
    report = cli_run[2]
    table = prof.format_table(report["configurations"][0])
    assert "PASS" in table and "prefix" in table and "step_0" in table
    roof = prof.format_roofline(report["roofline"])
    assert "ESTIMATE" in roof or "skipped" in roof
