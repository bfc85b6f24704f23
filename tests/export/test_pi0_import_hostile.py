"""A π0 checkpoint directory is bytes from outside (downloaded, converted by another tool, hand-edited). Each
hostile variant of the tiny test checkpoint must give one CheckpointError / ConfigError line naming the file and
what is wrong, quickly and in bounded memory: never a traceback from transformers or safetensors, a hang, or a
model built at the sizes a bad config.json declares."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from edge_vla.errors import CheckpointError, ConfigError  # noqa: E402
from edge_vla.export.pi0.checkpoint import Pi0Source, open_pi0  # noqa: E402
from edge_vla.export.pi0.exporter import Pi0ExportOptions, make_plan  # noqa: E402
from edge_vla.export.pi0.testing import make_checkpoint  # noqa: E402

WEIGHTS = "model.safetensors"
SIDECAR = {"action": {"names": ["shoulder", "elbow", "gripper"]}, "control": {"action_period_s": 0.02}}


@pytest.fixture(scope="module")
def pi0_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_checkpoint(tmp_path_factory.mktemp("pi0") / "ckpt", num_cameras=1, state_dim=3, action_dim=3)


@pytest.fixture(scope="module")
def loaded(pi0_dir: Path) -> tuple[Pi0Source, Any]:
    src = open_pi0(pi0_dir)
    return src, src.load_model()


@pytest.fixture
def ckpt(pi0_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pi0_dir, tmp_path / "ckpt"))


@pytest.fixture
def model_never_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tripwire: a config that cannot belong to the weights must be refused before transformers builds and fills
    the model (it builds every layer the config declares and allocates the tensors the weights lack)."""
    from transformers import PI0ForConditionalGeneration

    def tripped(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("PI0ForConditionalGeneration.from_pretrained was called for a config the weights "
                             "cannot fill")

    monkeypatch.setattr(PI0ForConditionalGeneration, "from_pretrained", tripped)


def load(d: Path) -> Any:
    return open_pi0(d).load_model()


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def edit_config(d: Path, path: tuple[str, ...], value: Any) -> None:
    cfg = json.loads((d / "config.json").read_text())
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (d / "config.json").write_text(json.dumps(cfg))


# --- a config.json the weights cannot fill: refused from the weights' headers, before any model is built ----------
TEXT, VISION, EXPERT = ("vlm_config", "text_config"), ("vlm_config", "vision_config"), ("dit_config",)
OVERSIZE = {
    "language layers 1e6": ((*TEXT, "num_hidden_layers"), 10**6, r"vlm_config\.text_config\.num_hidden_layers is 1000000"),
    "vision layers 1e6": ((*VISION, "num_hidden_layers"), 10**6, r"vision_config\.num_hidden_layers is 1000000"),
    "expert layers 1e6": ((*EXPERT, "num_hidden_layers"), 10**6, r"dit_config\.num_hidden_layers is 1000000"),
    "language width 1e6": ((*TEXT, "hidden_size"), 10**6, r"describes a π0 of [\d,]+ parameters"),
    "vocabulary 1e9": ((*TEXT, "vocab_size"), 10**9, r"describes a π0 of [\d,]+ parameters"),
    "image size 1e6": ((*VISION, "image_size"), 10**6, r"describes a π0 of [\d,]+ parameters"),
    "expert config dropped (defaults: a 300M Gemma)": (EXPERT, None, r"describes a π0 of [\d,]+ parameters"),
}


@pytest.mark.parametrize("case", OVERSIZE)
def test_a_config_bigger_than_its_weights_is_refused_before_the_model_is_built(
        ckpt: Path, model_never_built: None, case: str) -> None:
    path, value, named = OVERSIZE[case]
    edit_config(ckpt, path, value)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=named) as err:
        load(ckpt)
    msg = one_line(err)
    assert str(ckpt / "config.json") in msg and WEIGHTS in msg, msg
    assert time.perf_counter() - t0 < 5, "refusing must not build or walk the declared model"


NOT_IN_WEIGHTS = {  # sizes no tensor shape carries: bounded by what the exporter and the runtime can run
    "chunk_size 1e9": ("chunk_size", 10**9, r"chunk_size is 1000000000"),
    "chunk_size 0": ("chunk_size", 0, r"chunk_size is 0"),
    "num_inference_steps 1e12": ("num_inference_steps", 10**12, r"num_inference_steps is 1000000000000"),
    "num_inference_steps 0": ("num_inference_steps", 0, r"num_inference_steps is 0"),
}


@pytest.mark.parametrize("case", NOT_IN_WEIGHTS)
def test_a_chunk_or_step_count_out_of_range_is_refused(ckpt: Path, model_never_built: None, case: str) -> None:
    """chunk_size 1e9 had the exporter allocate x_t [1, 1e9, 8] (32 GB) and the numerics gate loop 1e12 steps."""
    key, value, named = NOT_IN_WEIGHTS[case]
    edit_config(ckpt, (key,), value)
    with pytest.raises(CheckpointError, match=named) as err:
        load(ckpt)
    assert str(ckpt / "config.json") in one_line(err)


def test_steps_option_out_of_range_is_refused(loaded: tuple[Pi0Source, Any]) -> None:
    src, model = loaded
    with pytest.raises(ConfigError, match=r"steps 100000 is outside 1\.\.64"):
        make_plan(src, model, Pi0ExportOptions(steps=100_000))
    assert make_plan(src, model, Pi0ExportOptions(steps=64)).steps == 64  # control: the runtime's limit is taken


def test_the_untouched_copy_loads(ckpt: Path, loaded: tuple[Pi0Source, Any]) -> None:
    """Control for every refusal here: the same copy, unedited, loads to the same weights and plans."""
    src = open_pi0(ckpt)
    model = src.load_model()
    ref = dict(loaded[1].named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in model.named_parameters())
    assert make_plan(src, model, Pi0ExportOptions(sidecar=None)).shapes.chunk == 8


def test_cli_export_of_a_million_layer_config_is_one_line_in_bounded_memory(pi0_dir: Path, tmp_path: Path) -> None:
    """`edge-vla export` in a real process held to 3 GB of address space: before, transformers built the million
    layers (4 GB and still going after 2 minutes); now one line, exit 1, no bundle."""
    d = Path(shutil.copytree(pi0_dir, tmp_path / "ckpt"))
    edit_config(d, (*TEXT, "num_hidden_layers"), 10**6)
    out = tmp_path / "bundle"
    limit = 3 << 30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t0 = time.perf_counter()
    run = subprocess.run([str(Path(sys.executable).with_name("edge-vla")), "export", str(d), "-o", str(out)],
                         capture_output=True, text=True, timeout=60, preexec_fn=cap,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1, (run.returncode, run.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("edge-vla export: error: "), lines
    assert "num_hidden_layers is 1000000" in lines[0], lines
    assert not out.exists() and time.perf_counter() - t0 < 60


# --- config.json of the wrong types, and weights files that are damaged: one CheckpointError ----------------------
def _raw(d: Path, old: str, new: str) -> None:
    text = (d / "config.json").read_text()
    assert old in text
    (d / "config.json").write_text(text.replace(old, new, 1))


BAD_TYPES: dict[str, tuple[Callable[[Path], None], str]] = {
    "hidden_size a string": (lambda d: edit_config(d, (*TEXT, "hidden_size"), "64"), "hidden_size"),
    "hidden_size a fraction": (lambda d: edit_config(d, (*TEXT, "hidden_size"), 64.5), "hidden_size"),
    "hidden_size NaN": (lambda d: _raw(d, '"hidden_size": 64,', '"hidden_size": NaN,'), "hidden_size"),
    "hidden_size a list": (lambda d: edit_config(d, (*TEXT, "hidden_size"), [64]), "hidden_size"),
    "text_config a string": (lambda d: edit_config(d, TEXT, "gemma"), "text_config"),
    "vlm_config a list": (lambda d: edit_config(d, ("vlm_config",), [1]), "vlm_config"),
    "chunk_size a string": (lambda d: edit_config(d, ("chunk_size",), "8"), "chunk_size"),
    "hidden_size negative": (lambda d: edit_config(d, (*TEXT, "hidden_size"), -64), "hidden_size"),
}


@pytest.mark.parametrize("case", BAD_TYPES)
def test_a_config_of_the_wrong_types_is_one_checkpoint_error(ckpt: Path, model_never_built: None, case: str) -> None:
    damage, field = BAD_TYPES[case]
    damage(ckpt)
    with pytest.raises(CheckpointError) as err:
        load(ckpt)
    msg = one_line(err)
    assert str(ckpt / "config.json") in msg and field in msg, msg


def _header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict[str, Any], body: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def _reshape(name: str, shape: list[int]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        header, body = _header(d / WEIGHTS)
        header[name]["shape"] = shape
        _write_header(d / WEIGHTS, header, body)
    return apply


def _truncate(d: Path) -> None:
    blob = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(blob[: len(blob) // 2])


def _header_length(d: Path) -> None:
    blob = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 2**63) + blob[8:])


def _header_not_json(d: Path) -> None:
    header, body = _header(d / WEIGHTS)
    blob = json.dumps(header).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(blob)) + b"{" * len(blob) + body)


DAMAGED_WEIGHTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, WEIGHTS),
    "header length 2^63": (_header_length, WEIGHTS),
    "header not JSON": (_header_not_json, WEIGHTS),
    "a shape bigger than its bytes": (_reshape("action_out_proj.weight", [10**6, 10**6]), WEIGHTS),
    "a shape transposed (same bytes)": (_reshape("action_out_proj.weight", [32, 8]),
                                        "1 of another shape (action_out_proj.weight)"),
}


@pytest.mark.parametrize("case", DAMAGED_WEIGHTS)
def test_damaged_weights_are_one_checkpoint_error_naming_the_file(ckpt: Path, case: str) -> None:
    damage, named = DAMAGED_WEIGHTS[case]
    damage(ckpt)
    with pytest.raises(CheckpointError) as err:
        load(ckpt)
    msg = one_line(err)
    assert named in msg and str(ckpt) in msg, msg


def _shard(d: Path) -> dict[str, str]:
    """Split the weights into two shards and an index, as save_pretrained(max_shard_size=...) writes them."""
    tensors = load_file(str(d / WEIGHTS))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(d / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (d / WEIGHTS).unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _index_points_at(target: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        weight_map = _shard(d)
        first = next(iter(weight_map))
        weight_map[first] = target
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return apply


def _shard_is_fifo(d: Path) -> None:
    shard = _shard(d)["action_in_proj.weight"]
    (d / shard).unlink()
    os.mkfifo(d / shard)


def _shard_is_dev_zero(d: Path) -> None:
    shard = _shard(d)["action_in_proj.weight"]
    (d / shard).unlink()
    (d / shard).symlink_to("/dev/zero")


SHARDED: dict[str, tuple[Callable[[Path], None], str]] = {
    "index not JSON": (lambda d: (_shard(d), (d / "model.safetensors.index.json").write_text("{")),
                       "model.safetensors.index.json"),
    "index nested deeply": (lambda d: (_shard(d), (d / "model.safetensors.index.json").write_text("[" * 100_000)),
                            "model.safetensors.index.json"),
    "shard missing": (_index_points_at("model-00009-of-00009.safetensors"), "model-00009-of-00009.safetensors"),
    "shard outside the directory": (_index_points_at("../../../etc/passwd"), "../../../etc/passwd"),
    "shard a FIFO": (_shard_is_fifo, "model-0000"),
    "shard a link to /dev/zero": (_shard_is_dev_zero, "model-0000"),
}


@pytest.mark.parametrize("case", SHARDED)
def test_a_damaged_sharded_checkpoint_is_one_checkpoint_error(ckpt: Path, model_never_built: None, case: str) -> None:
    """A FIFO shard blocked transformers' open forever; the others were tracebacks or reads outside the folder."""
    damage, named = SHARDED[case]
    damage(ckpt)
    with pytest.raises(CheckpointError) as err:
        load(ckpt)
    msg = one_line(err)
    assert named in msg, msg


def test_control_the_sharded_copy_loads(ckpt: Path, loaded: tuple[Pi0Source, Any]) -> None:
    _shard(ckpt)
    ref = dict(loaded[1].named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in load(ckpt).named_parameters())


# --- weights that cannot be the float model the graphs compute --------------------------------------------------
def _retype(d: Path, name: str, convert: Callable[[Any], Any]) -> None:
    tensors = load_file(str(d / WEIGHTS))
    tensors[name] = convert(tensors[name])
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})


def test_integer_weights_are_refused_not_cast(ckpt: Path) -> None:
    """transformers casts an int8 tensor to float32 silently: a quantized tensor without its scale became the
    model the bundle was exported from (and the numerics gate compared the bundle with that same wrong model)."""
    _retype(ckpt, "action_out_proj.weight", lambda t: (t * 100).to(torch.int8))
    with pytest.raises(CheckpointError, match=r"action_out_proj\.weight \(I8\)") as err:
        load(ckpt)
    assert WEIGHTS in one_line(err)


def test_non_finite_weights_are_refused(ckpt: Path) -> None:
    def poison(t: Any) -> Any:
        t = t.clone()
        t[0, 0] = float("nan")
        return t

    _retype(ckpt, "state_proj.weight", poison)
    with pytest.raises(CheckpointError, match=r"NaN or Inf.*embed_action_time\.state_proj\.weight") as err:
        load(ckpt)
    assert str(ckpt) in one_line(err)


def test_control_float16_weights_load_as_float32(ckpt: Path, loaded: tuple[Pi0Source, Any]) -> None:
    _retype(ckpt, "action_out_proj.weight", lambda t: t.half())
    model = load(ckpt)
    got = model.action_out_proj.weight
    assert got.dtype == torch.float32
    assert torch.equal(got, loaded[1].action_out_proj.weight.half().float())


# --- the side files: tokenizer, processor and robot description ----------------------------------------------------
def _sparse(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size)


def test_a_huge_tokenizer_file_is_refused_without_reading_it(ckpt: Path) -> None:
    """A 3 GB tokenizer.json took 3.5 GB of memory and 10 s to be called unreadable (200 MB here: over any real
    tokenizer, under what the old code could read without harming the machine)."""
    _sparse(ckpt / "tokenizer.json", 200 << 20)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is 209715200 bytes") as err:
        open_pi0(ckpt)
    one_line(err)
    assert time.perf_counter() - t0 < 1


def _processor(d: Path, **changes: Any) -> None:
    path = d / "processor_config.json"
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        if key.startswith("image_processor."):
            doc["image_processor"][key.split(".", 1)[1]] = value
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))


BAD_PROCESSOR: dict[str, tuple[Callable[[Path], None], str]] = {
    "nested deeply": (lambda d: (d / "processor_config.json").write_text("[" * 100_000 + "]" * 100_000),
                      "nested too deeply"),
    "huge": (lambda d: _sparse(d / "processor_config.json", 200 << 20), "bytes"),
    "a list": (lambda d: (d / "processor_config.json").write_text("[1]"), "not a JSON object"),
    "state_mean a string": (lambda d: _processor(d, state_mean="abc", state_std="xyz"), "state_mean"),
    "state_mean nested": (lambda d: _processor(d, state_mean=[[1.0]] * 3), "state_mean"),
    "actions_std NaN": (lambda d: _processor(d, actions_std=[float("nan")] * 3), "actions_std"),
    "actions_std negative": (lambda d: _processor(d, actions_std=[1.0, -1.0, 1.0]), "actions_std"),
    "image_processor a string": (lambda d: _processor(d, image_processor="x"), "image_processor"),
    "resize bigger than the pad": (lambda d: _processor(d, **{"image_processor.size": {
        "max_height": 10**9, "max_width": 10**9}}), "max_height"),
    "image_std zero": (lambda d: _processor(d, **{"image_processor.image_std": [0.5, 0.0, 0.5]}), "image_std"),
    "rescale_factor a string": (lambda d: _processor(d, **{"image_processor.rescale_factor": "x"}),
                                "rescale_factor"),
}


@pytest.mark.parametrize("case", BAD_PROCESSOR)
def test_a_bad_processor_config_is_one_checkpoint_error(ckpt: Path, loaded: tuple[Pi0Source, Any], case: str) -> None:
    """A resize target of 1e9 px had the encoder allocate 7.5 GB for its taps; a string or nested list of
    statistics was a ValueError / TypeError traceback; a NaN std became the bundle's normalisation."""
    damage, named = BAD_PROCESSOR[case]
    damage(ckpt)
    with pytest.raises(CheckpointError) as err:
        make_plan(open_pi0(ckpt), loaded[1], Pi0ExportOptions())
    msg = one_line(err)
    assert "processor_config.json" in msg and named in msg, msg


def _sidecar(d: Path, doc: Any) -> Path:
    path = d / "robot.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


BAD_SIDECARS: dict[str, tuple[Any, str]] = {
    "nested deeply": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "a limit a string": ({"action": {"names": ["a", "b", "c"], "lower": ["x", 1, 2]}}, "action.lower"),
    "control a list": ({"action": {"names": ["a", "b", "c"]}, "control": [1]}, "control"),
    "period a NaN string": ({"action": {"names": ["a", "b", "c"]}, "control": {"action_period_s": "nan"}},
                            "action_period_s"),
    "stats a list": ({"action": {"names": ["a", "b", "c"]}, "stats": {"state": [1]}}, "stats.state"),
    "stats NaN": ({"action": {"names": ["a", "b", "c"]}, "stats": {"state": {"mean": [0, 0, 0],
                                                                             "std": ["nan", 1, 1]}}}, "stats.state"),
    "kind a list": ({"action": {"names": ["a", "b", "c"], "kind": ["joint"]}}, "action.kind"),
    "state_names numbers": ({"action": {"names": ["a", "b", "c"]}, "state_names": [1, 2, 3]}, "state_names"),
}


@pytest.mark.parametrize("case", BAD_SIDECARS)
def test_a_bad_sidecar_is_one_config_error(ckpt: Path, loaded: tuple[Pi0Source, Any], case: str) -> None:
    doc, named = BAD_SIDECARS[case]
    path = _sidecar(ckpt, doc)
    with pytest.raises(ConfigError) as err:
        make_plan(open_pi0(ckpt), loaded[1], Pi0ExportOptions(sidecar=str(path)))
    msg = one_line(err)
    assert str(path) in msg and named in msg, msg


def test_control_a_good_sidecar_beside_the_checkpoint_is_used(ckpt: Path, loaded: tuple[Pi0Source, Any]) -> None:
    _sidecar(ckpt, SIDECAR)
    plan = make_plan(open_pi0(ckpt), loaded[1], Pi0ExportOptions())
    assert plan.sidecar.action_space.names == ("shoulder", "elbow", "gripper")


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_a_sidecar_that_is_not_a_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """`--sidecar` naming a FIFO blocked forever; one naming /dev/zero read until memory ran out. In a process held
    to 1 GB and 30 s, so the old behaviour fails the test instead of the machine."""
    path = tmp_path / "robot.json"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(kind)
    limit = 1 << 30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    code = ("import sys\nfrom edge_vla.errors import ConfigError\nfrom edge_vla.export.pi0.sidecar import load_sidecar\n"
            "try:\n    load_sidecar(sys.argv[1])\nexcept ConfigError as exc:\n    print(exc)\n    raise SystemExit(3)\n")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30,
                         preexec_fn=cap)
    assert run.returncode == 3, (run.returncode, run.stderr[-2000:])
    assert f"{path} is not a regular file" in run.stdout, run.stdout


def test_a_robot_json_beside_the_checkpoint_that_is_a_fifo_is_refused_not_skipped(
        ckpt: Path, loaded: tuple[Pi0Source, Any]) -> None:
    """Skipped before (is_file() is false for a FIFO): the bundle silently got the generic ±π robot description."""
    os.mkfifo(ckpt / "robot.json")
    with pytest.raises(ConfigError, match=r"robot\.json is not a regular file"):
        make_plan(open_pi0(ckpt), loaded[1], Pi0ExportOptions())
