"""π0 from transformers through export, the numerics gate, and the torch-free robot path (small configs, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from edge_vla.bundle import Bundle  # noqa: E402
from edge_vla.errors import CheckpointError, EdgeVlaError, ObservationError  # noqa: E402
from edge_vla.export.pi0.checkpoint import is_pi0_checkpoint, open_pi0  # noqa: E402
from edge_vla.export.pi0.exporter import Pi0ExportOptions, export_pi0  # noqa: E402
from edge_vla.export.pi0.testing import make_checkpoint  # noqa: E402
from edge_vla.runtime.types import Observation  # noqa: E402

SIDECAR = {
    "action": {"names": ["shoulder", "elbow", "gripper"], "units": "rad", "kind": "absolute_joint_position",
               "lower": [-2.0, -2.5, 0.0], "upper": [2.0, 2.5, 1.0], "max_velocity": [1.5, 1.5, 3.0],
               "max_acceleration": [10.0, 10.0, 20.0]},
    "cameras": ["base", "wrist"],
    "control": {"action_period_s": 0.02},
}


@pytest.fixture(scope="module")
def pi0_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_checkpoint(tmp_path_factory.mktemp("pi0") / "ckpt", num_cameras=2, state_dim=3, action_dim=3)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("robot") / "robot.json"
    p.write_text(json.dumps(SIDECAR))
    return p


@pytest.fixture(scope="module")
def bundles(pi0_dir, sidecar, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for precision in ("fp32", "fp16", "int8"):
        dst = tmp_path_factory.mktemp(f"pi0_{precision}") / "bundle"
        opts = Pi0ExportOptions(precision=precision, sidecar=str(sidecar), calib_count=4, numerics_count=2)
        out[precision] = export_pi0(pi0_dir, dst, opts).bundle
    return out


def observation(seed: int = 0, cameras: int = 2, frame: tuple[int, int] = (120, 160)) -> Observation:
    g = np.random.default_rng(seed)
    images = [g.integers(0, 256, (*frame, 3), dtype=np.uint8) for _ in range(cameras)]
    return Observation(images, "pick up the red block", np.array([0.1, -0.2, 0.3], np.float32))


def test_checkpoint_directory_is_recognised(pi0_dir):
    assert is_pi0_checkpoint(pi0_dir)
    src = open_pi0(pi0_dir)
    assert src.stats("state") is not None and len(src.stats("actions")[0]) == 3
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {
        p.name for p in pi0_dir.iterdir()}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_bundle_passes_numerics_gate_and_lint(bundles, precision):
    b = Bundle.open(bundles[precision])
    m = b.manifest
    assert m["family"] == "pi0" and m["precision"] == precision
    assert m["numerics"]["passed"]
    report = json.loads(b.path("reports/numerics.json").read_text())
    assert report["passed"] and report["actions"]["rel_l2"] <= report["threshold_rel_l2"]
    assert report["reference"].startswith("transformers PI0ForConditionalGeneration.sample_actions")
    assert json.loads(b.path("reports/lint.json").read_text())["errors"] == 0
    c = b.contract  # the runtime's own parser accepts the description
    assert (c.flow.start, c.flow.end) == (1.0, 0.0)
    assert [s.name for s in c.step.inputs_by_role("prefix")] == [
        f"prefix_{kv}_{i}" for i in range(2) for kv in ("k", "v")]
    assert {s.role for s in c.step.inputs} == {"x_t", "time", "state", "token_mask", "prefix"}
    assert m["action_space"]["names"] == ["shoulder", "elbow", "gripper"]
    assert m["preprocessing"]["action"] == {"dim": 8, "valid_dims": 3, "normalize": "mean_std",
                                            "kind": "absolute_joint_position"}
    assert b.path(m["tokenizer"]["file"]).is_file()
    if precision == "int8":
        assert m["provenance"]["calibration"]["source"].startswith("synthetic")


def test_prefix_outputs_are_transformers_kv_cache(pi0_dir, bundles):
    """The prefix graph's per-layer outputs are exactly what π0's DynamicCache holds (post-RoPE K/V)."""
    import onnxruntime as ort
    from transformers import PI0ForConditionalGeneration

    from edge_vla.preprocess import Pi0ObservationEncoder

    b = Bundle.open(bundles["fp32"])
    enc = Pi0ObservationEncoder.from_bundle(b)
    spec = {s.name: s for s in b.contract.prefix.inputs}
    feeds = {n: np.zeros(s.shape, s.np_dtype) for n, s in spec.items()}
    feeds["state"] = np.zeros((1, 8), np.float32)
    enc.encode(observation(), {"images": feeds["images"], "tokens": feeds["tokens"],
                               "token_mask": feeds["token_mask"], "state": feeds["state"]})
    del feeds["state"]
    sess = ort.InferenceSession(str(b.path("graphs/prefix.onnx")))
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    model = PI0ForConditionalGeneration.from_pretrained(pi0_dir).eval()
    with torch.no_grad():
        ids = torch.from_numpy(feeds["tokens"]).long()
        mask = torch.from_numpy(feeds["token_mask"]).long()
        emb = model.model.embed_prefix(ids, torch.from_numpy(feeds["images"]), torch.ones(1, 2, dtype=torch.bool))
        cache = model.model.vlm(inputs_embeds=emb, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                                token_type_ids=torch.zeros_like(mask), use_cache=True).past_key_values
    for i in range(2):
        k, v = cache.layers[i].keys.numpy(), cache.layers[i].values.numpy()
        np.testing.assert_allclose(got[f"prefix_k_{i}"], k, atol=2e-5)
        np.testing.assert_allclose(got[f"prefix_v_{i}"], v, atol=2e-5)


_ROBOT = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np

    class Forbid(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "onnx"):
                raise ImportError(f"the robot side must not import {name}")
            return None

    sys.meta_path.insert(0, Forbid())
    from edge_vla import Policy
    from edge_vla.runtime.types import Observation

    g = np.random.default_rng(0)
    obs = Observation([g.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(2)],
                      "pick up the red block", np.array([0.1, -0.2, 0.3], np.float32))
    policy = Policy.load(sys.argv[1], seed=3, threads=1)
    chunk = policy.infer(obs)
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx"))
    print(json.dumps({"actions": chunk.actions.tolist(), "forbidden": bad}))
""")


def test_robot_path_is_torch_free_and_matches_sample_actions(pi0_dir, bundles):
    from transformers import PI0ForConditionalGeneration

    from edge_vla.preprocess import Pi0ObservationEncoder

    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _ROBOT, str(bundles["fp32"])], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["forbidden"] == []
    got = np.asarray(result["actions"], np.float32)
    # Reference: the same observation encoded (torch-free code), transformers' sampler, the Policy's noise.
    b = Bundle.open(bundles["fp32"])
    inputs = {"images": np.zeros((1, 2, 3, 56, 56), np.float32), "tokens": np.zeros((1, 80), np.int32),
              "token_mask": np.zeros((1, 80), np.int32), "state": np.zeros((1, 8), np.float32)}
    Pi0ObservationEncoder.from_bundle(b).encode(observation(), inputs)
    noise = np.random.default_rng(3).standard_normal((1, 8, 8), dtype=np.float32)
    model = PI0ForConditionalGeneration.from_pretrained(pi0_dir).eval()
    ref = model.sample_actions(state=torch.from_numpy(inputs["state"]),
                               input_ids=torch.from_numpy(inputs["tokens"]).long(),
                               pixel_values=torch.from_numpy(inputs["images"]), noise=torch.from_numpy(noise),
                               attention_mask=torch.from_numpy(inputs["token_mask"]).long(),
                               pixel_attention_mask=torch.ones(1, 2, dtype=torch.bool), num_steps=10).numpy()
    norm = b.manifest["normalization"]["action"]
    want = ref[0, :, :3] * np.asarray(norm["std"], np.float32) + np.asarray(norm["mean"], np.float32)
    assert got.shape == (8, 3)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_wrong_camera_count_and_long_instruction_are_clear_errors(bundles):
    from edge_vla import Policy

    with Policy.load(bundles["fp32"], threads=1) as policy:
        with pytest.raises(ObservationError, match=r"takes 2 camera image\(s\) \['base', 'wrist'\], got 1"):
            policy.infer(observation(cameras=1))
        obs = observation()
        obs.instruction = "pick up the red block " * 40
        with pytest.raises(ObservationError, match="at most 48"):
            policy.infer(obs)
        gray = observation()
        gray.images[1] = gray.images[1][..., 0]
        with pytest.raises(ObservationError, match="camera 'wrist'"):
            policy.infer(gray)


def test_export_cli_dispatches_pi0_checkpoints(pi0_dir, sidecar, tmp_path, capsys):
    from edge_vla.cli import main

    out = tmp_path / "cli_bundle"
    assert main(["export", str(pi0_dir), "-o", str(out), "--sidecar", str(sidecar)]) == 0
    assert "π0 bundle written" in capsys.readouterr().out
    assert Bundle.open(out).manifest["family"] == "pi0"


def test_another_architecture_is_refused(tmp_path):
    from transformers import GemmaConfig, GemmaForCausalLM

    d = tmp_path / "gemma"
    GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)).save_pretrained(d)
    assert not is_pi0_checkpoint(d)
    with pytest.raises(CheckpointError, match="model_type 'gemma'.*not supported"):
        export_pi0(d, tmp_path / "b", Pi0ExportOptions())


def test_missing_tokenizer_is_refused(pi0_dir, tmp_path):
    d = tmp_path / "no_tok"
    shutil.copytree(pi0_dir, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        export_pi0(d, tmp_path / "b", Pi0ExportOptions())
    assert not (tmp_path / "b").exists()


def _with_weights_changed(pi0_dir: Path, dst: Path, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> Path:
    """A copy of the checkpoint whose model.safetensors lacks the `drop` tensors and holds extra `add` ones."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(pi0_dir, dst)
    weights = dst / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata, names = f.metadata(), set(f.keys())
        tensors = {k: f.get_tensor(k) for k in names - set(drop)}
    assert set(drop) <= names  # what is dropped was there
    tensors.update({k: torch.zeros(4) for k in add})
    save_file(tensors, str(weights), metadata=metadata)
    return dst


@pytest.mark.parametrize(("drop", "add", "named"), [
    (("action_out_proj.weight",), (), r"missing 1 tensor\(s\) \(action_out_proj\.weight\)"),
    ((), ("action_head.extra.weight",), r"1 unexpected \(action_head\.extra\.weight\)"),
])
def test_weights_that_do_not_fit_the_architecture_are_refused(pi0_dir, tmp_path, drop, add, named):
    """transformers fills a missing tensor with a fresh random one, and the numerics gate compares against
    that same random model: without this check the export passes and writes a bundle of random weights."""
    d = _with_weights_changed(pi0_dir, tmp_path / "ckpt", drop, add)
    with pytest.raises(CheckpointError, match=named) as err:
        export_pi0(d, tmp_path / "b", Pi0ExportOptions(numerics_count=1))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "b").exists()


def test_a_missing_weight_pi0_never_reads_is_accepted(pi0_dir, tmp_path, caplog):
    """The expert's token embedding (saved as gemma_expert.lm_head) feeds neither the graphs nor
    sample_actions: a checkpoint without it is complete (control for the refusal above)."""
    d = _with_weights_changed(pi0_dir, tmp_path / "ckpt", drop=("paligemma_with_expert.gemma_expert.lm_head.weight",))
    with caplog.at_level("WARNING", logger="edge_vla.export.pi0.checkpoint"):
        open_pi0(d).load_model()
    assert "model.dit.embed_tokens.weight" in caplog.text and "never reads it" in caplog.text


GARBLED_TOKENIZERS = {
    "truncated": lambda text: text[: len(text) // 2],
    "not a tokenizer": lambda text: json.dumps({"version": "1.0", "model": {"type": "Unknown"}}),
    "binary": lambda text: "\udcff\x00garbage",
}


@pytest.mark.parametrize("garble", sorted(GARBLED_TOKENIZERS))
def test_garbled_tokenizer_is_a_one_line_checkpoint_error(pi0_dir, tmp_path, garble):
    d = tmp_path / "ckpt"
    shutil.copytree(pi0_dir, d)
    tok = d / "tokenizer.json"
    tok.write_bytes(GARBLED_TOKENIZERS[garble](tok.read_text(encoding="utf-8")).encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a readable tokenizer") as err:
        export_pi0(d, tmp_path / "b", Pi0ExportOptions(numerics_count=1))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "b").exists()


def test_cli_refuses_a_garbled_tokenizer_and_a_missing_weight_in_one_line(pi0_dir, sidecar, tmp_path):
    """`edge-vla export` end to end (a real process): one stderr line naming the problem, exit 1, no bundle."""
    garbled = tmp_path / "garbled"
    shutil.copytree(pi0_dir, garbled)
    (garbled / "tokenizer.json").write_text('{"version": "1.0", "truncated": ')
    missing = _with_weights_changed(pi0_dir, tmp_path / "missing", drop=("state_proj.weight",))
    edge_vla = Path(sys.executable).with_name("edge-vla")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for ckpt, named in ((garbled, "tokenizer.json is not a readable tokenizer"), (missing, "state_proj.weight")):
        out = tmp_path / f"bundle_{ckpt.name}"
        run = subprocess.run([str(edge_vla), "export", str(ckpt), "-o", str(out), "--sidecar", str(sidecar)],
                             capture_output=True, text=True, env=env, timeout=300)
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 1, (run.returncode, run.stderr[-3000:])
        assert len(lines) == 1 and lines[0].startswith("edge-vla export: error: ") and named in lines[0], lines
        assert not out.exists()


def test_missing_statistics_are_refused(pi0_dir, tmp_path):
    d = tmp_path / "no_stats"
    shutil.copytree(pi0_dir, d)
    (d / "processor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no state/action statistics"):
        export_pi0(d, tmp_path / "b", Pi0ExportOptions())


def test_sidecar_must_agree_with_statistics(pi0_dir, tmp_path):
    side = tmp_path / "robot.json"
    side.write_text(json.dumps({"action": {"names": ["a", "b"]}}))
    with pytest.raises(EdgeVlaError, match="names 2 actions but the action statistics have 3"):
        export_pi0(pi0_dir, tmp_path / "b", Pi0ExportOptions(sidecar=str(side)))


def test_numerics_miss_writes_nothing(pi0_dir, tmp_path, monkeypatch):
    from edge_vla.export.pi0 import exporter

    monkeypatch.setitem(exporter.THRESHOLDS, "fp32", (0.0, 1.0 + 1e-9))  # an unreachable bar
    with pytest.raises(EdgeVlaError, match="numerics check failed, no bundle written"):
        export_pi0(pi0_dir, tmp_path / "b", Pi0ExportOptions(numerics_count=1))
    assert not (tmp_path / "b").exists()


def test_profile_feeds_a_pi0_bundle_its_own_state_size(bundles):
    """The profiler renders sim frames but sizes the state from the manifest (this π0 has 3 state dims)."""
    from edge_vla.bundle import Bundle
    from edge_vla.runtime.profile import profile_bundle

    results = profile_bundle(Bundle.open(bundles["fp32"]), [2], iterations=2, warmup=1, threads=1)
    assert results and results[0].steps == 2
