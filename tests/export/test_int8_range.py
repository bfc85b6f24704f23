"""INT8 weight range (issue 28): `--int8-range full|reduced` reaches quantize_static, the manifest records it,
bad values are refused in one line, and a full-range bundle warns (Policy.load, `edge-vla doctor`) only where
onnxruntime's u8s8 kernels can saturate: an x86 CPU with AVX2 but neither AVX512-VNNI nor AVX-VNNI."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge_vla.errors import EdgeVlaError

# /proc/cpuinfo as each kind of machine writes it (one processor is enough: every core has the same flags).
X86_AVX2_NO_VNNI = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Core(TM) i7-8700\n"
                    "flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2\n\n")
X86_AVX512_NO_VNNI = X86_AVX2_NO_VNNI.replace("bmi2", "bmi2 avx512f avx512dq avx512bw avx512vl")  # Skylake-SP
X86_AVX512_VNNI = X86_AVX512_NO_VNNI.replace("avx512vl", "avx512vl avx512_vnni")  # Cascade Lake and later
X86_AVX_VNNI = X86_AVX2_NO_VNNI.replace("bmi2", "bmi2 avx_vnni")  # Alder Lake: VNNI without AVX-512
X86_SSE_ONLY = X86_AVX2_NO_VNNI.replace(" avx f16c avx2", "")
ARM64 = ("processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
         "asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n\n")  # Jetson Orin's Cortex-A78AE


def _weight_codes(graph: Path) -> np.ndarray:
    """Every int8 weight code in a QDQ graph: the int8 initializers that DequantizeLinear nodes read."""
    model = onnx.load(str(graph))
    inits = {i.name: i for i in model.graph.initializer}
    codes = [numpy_helper.to_array(inits[n.input[0]]).ravel() for n in model.graph.node
             if n.op_type == "DequantizeLinear" and n.input[0] in inits
             and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert codes, f"{graph.name} has no int8 weights"
    return np.concatenate(codes).astype(np.int32)


@pytest.fixture(scope="module")
def fp32_prefix(tmp_path_factory, tiny_model) -> tuple[Path, list[dict[str, np.ndarray]]]:
    from edge_vla.export import calibration
    from edge_vla.export.onnx_graphs import export_graphs

    out = tmp_path_factory.mktemp("fp32")
    graphs = {g.name: g.path for g in export_graphs(tiny_model, out, None, "table")}
    feeds = calibration.prefix_feeds(calibration.load_observations(tiny_model.config, None, 4))
    return graphs["prefix"], feeds


@pytest.fixture(scope="module")
def full_range_bundle(tmp_path_factory, tiny_model) -> Path:
    from edge_vla.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("int8_full") / "bundle"
    opts = ExportOptions(precision="int8", int8_range="full", int8_graphs=("prefix",), calib_count=4,
                         numerics_count=2, table_steps=(10,))
    return export_model(tiny_model, out, opts).bundle


@pytest.mark.parametrize(("weight_range", "largest"), [("reduced", 64), ("full", 127)])
def test_the_weight_range_reaches_quantize_static(fp32_prefix, tmp_path, weight_range, largest):
    from edge_vla.export import quantize

    src, feeds = fp32_prefix
    codes = _weight_codes(quantize.to_int8(src, tmp_path / "prefix.onnx", feeds, weight_range=weight_range))
    # Symmetric per-channel: each channel's largest |weight| maps to the top code, +-64 in onnxruntime's reduced
    # INT8 range (quant_utils.ONNX_INT_TYPE_REDUCED_RANGE), +-127 in the full symmetric one.
    assert np.abs(codes).max() == largest


def test_the_export_records_the_weight_range_and_uses_it(full_range_bundle):
    from edge_vla.bundle import Bundle

    b = Bundle.open(full_range_bundle)
    calib = b.manifest["provenance"]["calibration"]
    assert (calib["weight_range"], calib["weight_bits"]) == ("full", 8)
    assert "VNNI" in calib["weight_range_note"]
    assert np.abs(_weight_codes(full_range_bundle / "graphs" / "prefix.onnx")).max() == 127


def test_a_bad_weight_range_is_refused_in_one_line_before_any_export_work(tmp_path, tiny_model):
    from edge_vla.export import export_cli
    from edge_vla.export.exporter import ExportOptions, export_model

    with pytest.raises(EdgeVlaError) as err:
        export_model(tiny_model, tmp_path / "b", ExportOptions(precision="int8", int8_range="7bit"))
    message = str(err.value)
    assert "\n" not in message and "'7bit'" in message and "full" in message and "reduced" in message
    assert not (tmp_path / "b").exists()
    parser = argparse.ArgumentParser()
    export_cli.configure(parser)
    assert parser.parse_args(["ckpt", "-o", "b", "--int8-range", "reduced"]).int8_range == "reduced"
    with pytest.raises(SystemExit):
        parser.parse_args(["ckpt", "-o", "b", "--int8-range", "7bit"])


@pytest.mark.parametrize(("cpuinfo", "warns"), [
    (X86_AVX2_NO_VNNI, True), (X86_AVX512_NO_VNNI, True),  # vpmaddubsw: int16 pair sums saturate
    (X86_AVX512_VNNI, False), (X86_AVX_VNNI, False),  # vpdpbusd(s): int32 accumulation
    (X86_SSE_ONLY, False),  # Linux SSE u8s8 kernel widens to int16 first (pmaddwd), no saturation
    (ARM64, False),  # no x86 flags line: ARM kernels (sdot/udot, smmla) accumulate in int32
])
def test_the_saturation_warning_depends_on_the_cpu(cpuinfo, warns):
    from edge_vla.runtime.policy import int8_saturation_risk

    full = {"precision": "int8", "provenance": {"calibration": {"weight_range": "full"}}}
    assert (int8_saturation_risk(full, cpuinfo) is not None) == warns
    reduced = {"precision": "int8", "provenance": {"calibration": {"weight_range": "reduced"}}}
    before = {"precision": "int8", "provenance": {"calibration": {"format": "QDQ ... 7-bit range (reduce_range)"}}}
    assert int8_saturation_risk(reduced, cpuinfo) is None
    assert int8_saturation_risk(before, cpuinfo) is None  # bundles from before the option: all reduced
    assert int8_saturation_risk({"precision": "fp32", "provenance": {}}, cpuinfo) is None


@pytest.mark.parametrize(("cpuinfo", "warns"), [(X86_AVX2_NO_VNNI, True), (X86_AVX512_VNNI, False)])
def test_policy_load_warns_for_a_full_range_bundle_where_u8s8_saturates(full_range_bundle, tmp_path, monkeypatch,
                                                                          caplog, cpuinfo, warns):
    from edge_vla.runtime import policy

    fake = tmp_path / "cpuinfo"
    fake.write_text(cpuinfo)
    monkeypatch.setattr(policy, "CPUINFO", fake)
    with caplog.at_level(logging.WARNING, logger="edge_vla.runtime.policy"):
        policy.Policy.load(full_range_bundle, backend="onnxruntime", threads=1).close()
    said = [r.getMessage() for r in caplog.records if "saturat" in r.getMessage()]
    assert bool(said) == warns, said
    if warns:
        assert "--int8-range reduced" in said[0] and "avx512_vnni" in said[0]


@pytest.mark.parametrize(("cpuinfo", "status"), [(X86_AVX2_NO_VNNI, "warn"), (X86_AVX512_VNNI, "pass"),
                                                  (ARM64, "pass")])
def test_doctor_checks_the_int8_weight_range_against_this_cpu(full_range_bundle, tmp_path, cpuinfo, status):
    from edge_vla.provision import doctor

    (tmp_path / "cpuinfo").write_text(cpuinfo)
    machine = doctor.Machine(proc_root=tmp_path)
    check = doctor.check_int8_range(doctor.Expectation(bundle_root=full_range_bundle), machine)
    assert check.status == status, check
    if status == "warn":
        assert "--int8-range reduced" in check.fix
    by_name = {c.name: c for c in doctor.run_checks(doctor.Expectation(bundle_root=full_range_bundle), machine)}
    assert by_name["int8"].status == status
