"""The manifest contract (docs/MANIFEST.md): validation errors, time inputs, step counts, old schemas."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from edge_vla.bundle import Bundle
from edge_vla.errors import BundleError, ConfigError
from edge_vla.runtime.contract import Contract
from edge_vla.runtime.flow import Flow
from edge_vla.runtime.policy import Policy


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return Bundle.open(tiny_bundle).manifest


def broken(manifest, edit):
    m = copy.deepcopy(manifest)
    edit(m)
    return m


def _step_inputs(m):
    return m["graphs"]["denoise_step"]["inputs"]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["graphs"].pop("denoise_step"), "exactly one graph with role 'step', found 0"),
    (lambda m: m["graphs"]["prefix"].update(role="encoder"), "has role 'encoder'"),
    (lambda m: m["graphs"]["prefix"]["outputs"].pop(), "step input 'prefix_v_1' .* has no prefix-graph output"),
    (lambda m: m["graphs"]["prefix"]["outputs"][0].update(shape=[1, 4, 7, 32]),
     "'prefix_k_0' is float32.* but the prefix output is float32\\[1, 4, 7, 32\\]"),
    (lambda m: _step_inputs(m)[0].update(role="mystery"), "IO 'x_t' has role 'mystery'"),
    (lambda m: _step_inputs(m)[0].update(shape=[1, "H", 2]), "shapes must be static"),
    (lambda m: m["sampler"]["time_input"].update(input="tau"), "names step input 'tau'"),
    (lambda m: m["sampler"]["time_input"].update(kind="scalar"), "step graph's 'time' inputs are \\[\\]"),
    (lambda m: m["sampler"]["time_input"].pop("tables"), "tables must map step counts"),
    (lambda m: m["sampler"].update(solver="rk4"), "sampler.solver 'rk4' is not among"),
    (lambda m: m["sampler"].update(time={"start": 0.5, "end": 0.5}), "no direction"),
    (lambda m: m["sampler"].update(min_steps=30), "min_steps <= num_steps <= max_steps"),
    (lambda m: m.pop("preprocessing"), "preprocessing must be an object"),
])
def test_invalid_manifests_are_refused_with_what_is_wrong(manifest, edit, message):
    with pytest.raises(BundleError, match=message) as info:
        Contract.from_manifest(broken(manifest, edit))
    assert "Re-export the bundle" in str(info.value)


def test_several_problems_are_reported_at_once(manifest):
    def edit(m):
        m["graphs"]["prefix"]["outputs"].pop()
        m["sampler"]["solver"] = "rk4"

    with pytest.raises(BundleError, match="prefix_v_1.*; .*rk4|rk4.*; .*prefix_v_1"):
        Contract.from_manifest(broken(manifest, edit))


def test_reference_contract_roles_and_per_layer_kv(tiny_bundle, manifest):
    c = Bundle.open(tiny_bundle).contract
    assert c.family == "edge-vla-reference" and c.flow == Flow(0.0, 1.0)
    assert [s.name for s in c.step.inputs_by_role("prefix")] == ["prefix_k_0", "prefix_v_0", "prefix_k_1", "prefix_v_1"]
    assert c.time_input.kind == "table" and c.time.name == "time_cond"
    assert sorted(c.observation_inputs()) == ["images", "state", "tokens"]
    k0 = next(s for s in c.prefix.outputs if s.name == "prefix_k_0")
    prefix_len = Bundle.open(tiny_bundle).manifest["model"]["max_text_len"] + 1 + 64 + 8  # 8x8 grid + 8 keypoints
    assert k0.extra == {"layer": 0, "kv": "key"} and k0.shape == (1, 4, prefix_len, 32)


def test_scalar_time_rows_are_the_half_step_grid(tiny_bundle_scalar_t):
    c = Bundle.open(tiny_bundle_scalar_t).contract
    rows = c.time_rows(4)
    assert rows.shape == (9, 1) and rows.dtype == np.float32
    np.testing.assert_allclose(rows[:, 0], np.arange(9) / 8)
    assert c.allowed_steps() == list(range(1, 65))


def test_time_tables_one_per_step_count(tiny_bundle, tiny_model):
    import torch

    from edge_vla.export.onnx_graphs import time_rows

    c = Bundle.open(tiny_bundle).contract
    assert c.allowed_steps() == [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20]
    for n in (1, 4, 10):
        rows = c.time_rows(n)
        assert rows.shape == (2 * n + 1, 1792)
        with torch.no_grad():
            want = time_rows(tiny_model, torch.arange(2 * n + 1) / (2 * n)).numpy()
        np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="tables for .* not 7"):
        c.time_rows(7)


def test_a_table_of_the_wrong_shape_is_refused(tiny_bundle, tmp_path):
    from edge_vla.bundle import write_bundle

    b = Bundle.open(tiny_bundle)
    files = {rel: b.root / rel for rel in b.manifest["files"]}
    files["tables/time_cond_4.npy"] = _npy(np.zeros((8, 1792), np.float32))
    out = write_bundle(tmp_path / "b", dict(b.manifest), files)
    with pytest.raises(BundleError, match=r"time table tables/time_cond_4.npy is float32\[8, 1792\], expected"):
        Policy.load(out, steps=4)


def _npy(arr):
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(("solver", "steps"), [("euler", 7), ("heun", 3), ("midpoint", 5)])
def test_scalar_t_bundle_matches_pytorch_at_any_step_count(tiny_bundle_scalar_t, tiny_model, solver, steps):
    from test_policy import replay_noise, torch_actions

    from edge_vla.sim.env import ReachEnv

    obs = ReachEnv().reset(9)
    got = Policy.load(tiny_bundle_scalar_t, steps=steps, solver=solver, seed=4).infer(obs).actions
    want = torch_actions(tiny_model, obs, replay_noise(4, tiny_model.config), steps, solver)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def _rewrite_manifest(root, edit):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(("version", "message"), [(1, "schema 1 is older .* predates the manifest-driven contract"),
                                                  (3, "schema 3 is newer than this edge-vla supports")])
def test_old_and_new_schemas_are_refused(tiny_bundle, tmp_path, version, message):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    _rewrite_manifest(b, lambda m: m.update(schema_version=version))
    with pytest.raises(BundleError, match=message):
        Bundle.open(b)


def test_time_tables_are_hash_checked(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    table = b / "tables" / "time_cond_10.npy"
    data = bytearray(table.read_bytes())
    data[-1] ^= 0x01
    table.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="time_cond_10.npy does not match its sha256"):
        Bundle.open(b)
    _rewrite_manifest(b, lambda m: m["files"].pop("tables/time_cond_10.npy"))
    with pytest.raises(BundleError, match="time table 'tables/time_cond_10.npy' is not among the hashed files"):
        Bundle.open(b)


def test_policy_refuses_an_inconsistent_manifest(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    _rewrite_manifest(b, lambda m: m["sampler"]["time_input"].update(input="t"))
    with pytest.raises(BundleError, match="names step input 't'"):
        Policy.load(b)


def test_unknown_preprocessing_kind_is_refused(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    _rewrite_manifest(b, lambda m: m["preprocessing"].update(kind="telepathy"))
    with pytest.raises(BundleError, match="preprocessing kind 'telepathy' is not known"):
        Policy.load(b)
