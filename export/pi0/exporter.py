"""`edge-vla export PI0_DIR -o BUNDLE`: transformers π0 checkpoint -> ONNX -> (FP16 | INT8) -> numerics gate
against `PI0ForConditionalGeneration.sample_actions` -> TensorRT lint -> schema-2 bundle (docs/MANIFEST.md).

The gate runs the bundle's graphs through the robot's own path (edge_vla.preprocess encoder, the runtime's
OrtBackend and Sampler) and compares the chunk with transformers' sampler fed the same token ids, pixels,
state and noise. A miss writes nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

import edge_vla
from edge_vla.bundle import write_bundle
from edge_vla.errors import CheckpointError, ConfigError, EdgeVlaError
from edge_vla.hf_tokenizer import PromptLayout, PromptTokenizer
from edge_vla.preprocess import ImageSpec, Pi0ObservationEncoder
from edge_vla.runtime.contract import Contract
from edge_vla.runtime.flow import Flow, integrate
from edge_vla.runtime.ort_backend import OrtBackend
from edge_vla.runtime.sampler import Sampler
from edge_vla.runtime.types import Observation

from .. import quantize
from ..exporter import enforce_gates
from ..numerics import THRESHOLDS, Metrics
from . import observations
from .checkpoint import MAX_STEPS, Pi0Source, finite_numbers, open_pi0, preview
from .graphs import OPSET, Pi0Prefix, Pi0Shapes, Pi0Step, example_inputs, export_graphs
from .graphs import to_fp16 as graphs_to_fp16
from .sidecar import RobotSidecar, default_sidecar, load_sidecar

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
PI0_FLOW = Flow(1.0, 0.0)  # t from 1 (noise) to 0 (action), dt = -1/N, x <- x + dt * v
NUMERICS_SEED = 910_000
CALIB_SEED = 920_000
TOKENIZER_FILE = "tokenizer/tokenizer.json"
SIDECAR_FILE = "robot.json"  # read from the checkpoint directory when --sidecar is not given
# Roles of the graph IO (docs/MANIFEST.md); K/V are role "prefix".
ROLES = {"images": "images", "tokens": "tokens", "token_mask": "token_mask", "state": "state", "x_t": "x_t",
         "t": "time", "velocity": "velocity"}
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32",
           onnx.TensorProto.INT64: "int64"}


@dataclass
class Pi0ExportOptions:
    precision: str = "fp32"
    steps: int | None = None  # default: the checkpoint's num_inference_steps
    cameras: int | None = None  # default: the sidecar's camera list, else 1
    max_text_tokens: int = 48  # bos + instruction + "\n", padded; PI0Processor pads to 48
    sidecar: str | None = None
    calib: str | None = None
    calib_count: int = 8
    numerics_count: int = 3
    int8_graphs: tuple[str, ...] = ("prefix", "denoise_step")
    allow_lint_errors: bool = False
    overwrite: bool = False
    external_data: bool = False  # graphs over 2 GB (the full 3.3B π0) need ONNX external data
    # False skips the comparison with sample_actions (the full 3.3B π0: a second FP32 copy of the model's work in
    # the exporting process); the bundle then says so in its manifest and reports/numerics.json.
    check_numerics: bool = True


@dataclass
class Pi0NumericsReport:
    precision: str
    observations: int
    steps: int
    valid_dims: int
    actions: dict
    actions_all_dims: dict
    threshold_rel_l2: float
    threshold_cosine: float
    passed: bool | None  # None: not checked (Pi0ExportOptions.check_numerics=False)
    reference: str = "transformers PI0ForConditionalGeneration.sample_actions (eager, float32)"

    def summary(self) -> str:
        if self.passed is None:
            return f"{self.precision}: SKIPPED (--skip-numerics): the graphs were not compared with sample_actions"
        a = self.actions
        return (f"{self.precision}: normalized action chunk vs sample_actions: max|err| {a['max_abs']:.2e}, "
                f"rel L2 {a['rel_l2']:.2e}, cosine {a['cosine']:.6f} over {self.observations} observations x "
                f"{self.steps} steps (limits rel L2 <= {self.threshold_rel_l2:g}, cosine >= {self.threshold_cosine:g}): "
                + ("PASS" if self.passed else "FAIL"))


@dataclass
class Pi0ExportResult:
    bundle: Path
    numerics: Pi0NumericsReport
    lint: dict
    seconds: float
    sizes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """Everything decided from the checkpoint, the sidecar and the options before exporting."""

    shapes: Pi0Shapes
    layout: PromptLayout
    image: ImageSpec
    state_stats: tuple[list[float], list[float]]
    action_stats: tuple[list[float], list[float]]
    stats_source: str
    sidecar: RobotSidecar
    cameras: list[str]
    steps: int


def export_pi0(checkpoint: str | Path, out: str | Path, opts: Pi0ExportOptions) -> Pi0ExportResult:
    if opts.precision not in PRECISIONS:
        raise EdgeVlaError(f"unknown precision {opts.precision!r}; choose one of {PRECISIONS}")
    t0 = time.perf_counter()
    src = open_pi0(checkpoint)
    model = src.load_model()
    plan = make_plan(src, model, opts)
    with tempfile.TemporaryDirectory(prefix="edge-vla-pi0-") as tmp:
        work = Path(tmp)
        example = example_inputs(model, plan.shapes, _image_token_id(model), plan.layout.image_seq_len)
        fp32 = export_graphs(model, plan.shapes, example, work / "fp32", external_data=opts.external_data)
        calib_desc: dict[str, Any] = {}
        graphs = fp32
        if opts.precision == "fp16":
            (work / "fp16").mkdir()
            graphs = {n: graphs_to_fp16(p, work / "fp16" / p.name) for n, p in fp32.items()}
        elif opts.precision == "int8":
            graphs, calib_desc = _int8(model, src, plan, fp32, work, opts)
        manifest = _manifest(src, model, plan, graphs, opts, calib_desc)
        contract = Contract.from_manifest(manifest)  # the runtime's own parser checks the description
        if opts.check_numerics:
            report = check_numerics(model, src, plan, graphs, contract, opts)
        else:
            rel_max, cos_min = THRESHOLDS[opts.precision]
            report = Pi0NumericsReport(opts.precision, 0, plan.steps, plan.sidecar.action_dim, {}, {}, rel_max,
                                       cos_min, None, reference="not run (check_numerics=False)")
        log.info("numerics %s", report.summary())
        lint = enforce_gates(report if report.passed is not None else None, graphs, opts.allow_lint_errors)
        manifest["numerics"] = {"passed": report.passed, "actions": report.actions,
                                "reference": report.reference}
        files: dict[str, Path | bytes] = {}
        for name, path in graphs.items():
            files[f"graphs/{name}.onnx"] = path
            data = path.with_name(path.name + ".data")
            if data.is_file():
                files[f"graphs/{data.name}"] = data
        files[TOKENIZER_FILE] = src.tokenizer_json
        files["reports/numerics.json"] = _json_bytes(asdict(report))
        files["reports/lint.json"] = _json_bytes(lint)
        bundle = write_bundle(out, manifest, files, overwrite=opts.overwrite)
        sizes = {name: path.stat().st_size for name, path in graphs.items()}
    return Pi0ExportResult(bundle, report, lint, time.perf_counter() - t0, sizes)


def _image_token_id(model: Any) -> int:
    return int(model.config.vlm_config.image_token_id)


def make_plan(src: Pi0Source, model: Any, opts: Pi0ExportOptions) -> _Plan:
    """Shapes, prompt layout, image spec, statistics and robot description, from the checkpoint, the sidecar
    (`opts.sidecar`, else a `robot.json` beside the checkpoint) and the options. The distillation teacher
    builds its observation encoder from the same plan, so it sees exactly what the bundle sees."""
    cfg = model.config
    vision = cfg.vlm_config.vision_config
    # exists(), not is_file(): a robot.json that is a FIFO or a device is refused by name, not silently skipped.
    sidecar_path = opts.sidecar or (src.path / SIDECAR_FILE if (src.path / SIDECAR_FILE).exists() else None)
    sidecar = load_sidecar(sidecar_path) if sidecar_path else None
    seq_len = (vision.image_size // vision.patch_size) ** 2
    image = _image_spec(src, vision.image_size, seq_len)
    if opts.cameras is not None:
        ncam = opts.cameras
    elif sidecar and sidecar.cameras:
        ncam = len(sidecar.cameras)
    else:
        ncam = 1
    if ncam < 1:
        raise EdgeVlaError(f"cameras must be >= 1, got {ncam}")
    cameras = list(sidecar.cameras) if sidecar and sidecar.cameras and len(sidecar.cameras) == ncam else \
        [f"cam{i}" for i in range(ncam)]
    state_stats = (sidecar.stats.get("state") if sidecar else None) or src.stats("state")
    action_stats = (sidecar.stats.get("action") if sidecar else None) or src.stats("actions")
    if state_stats is None or action_stats is None:
        raise CheckpointError(
            f"{src.path}: no state/action statistics (processor_config.json has no state_mean/actions_mean and the "
            "sidecar has no stats): π0 takes normalized state and returns normalized actions. Save the PI0Processor "
            "with its statistics beside the checkpoint, or give them in --sidecar (see docs/PI0.md)")
    stats_source = "sidecar" if sidecar and sidecar.stats else "processor_config.json"
    if len(state_stats[0]) > cfg.max_state_dim or len(action_stats[0]) > cfg.max_action_dim:
        raise CheckpointError(f"statistics are longer than the model's padded dims (state {len(state_stats[0])} > "
                              f"{cfg.max_state_dim} or action {len(action_stats[0])} > {cfg.max_action_dim})")
    sidecar = sidecar or default_sidecar(len(action_stats[0]))
    if sidecar.action_dim != len(action_stats[0]):
        raise EdgeVlaError(f"the sidecar names {sidecar.action_dim} actions but the action statistics have "
                           f"{len(action_stats[0])} dims; they must describe the same valid action dims")
    steps = opts.steps or int(cfg.num_inference_steps)  # the checkpoint's is checked in Pi0Source.checked_config
    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps {steps} is outside 1..{MAX_STEPS}, what the runtime's sampler takes")
    text = cfg.vlm_config.text_config
    n_dit = int(cfg.dit_config.num_hidden_layers)
    if n_dit > int(text.num_hidden_layers):
        raise CheckpointError(f"the expert has {n_dit} layers but the language model only {text.num_hidden_layers}")
    shapes = Pi0Shapes(ncam, (image.pad_height, image.pad_width), ncam * seq_len + opts.max_text_tokens,
                       int(cfg.chunk_size), int(cfg.max_action_dim), int(cfg.max_state_dim), n_dit)
    bos = src.tokenizer_config.get("bos_token") or "<bos>"
    pad_id = _pad_id(src)
    layout = PromptLayout("<image>", seq_len, ncam, str(bos), pad_id, shapes.prompt_len)
    return _Plan(shapes, layout, image, state_stats, action_stats, stats_source, sidecar, cameras, steps)


def _image_spec(src: Pi0Source, tower_size: int, seq_len: int) -> ImageSpec:
    """The processor's image settings, checked: they size every frame the robot resizes (a resize target of 1e9 px
    had the encoder allocate 7.5 GB for its taps) and become the bundle's normalisation."""
    where = src.processor_path
    ip = src.image_processor
    size = _dict_of_ints(ip.get("size") or {"max_height": tower_size, "max_width": tower_size},
                         ("max_height", "max_width"), f"{where}: image_processor.size")
    pad = _dict_of_ints(ip.get("pad_size") or {"height": tower_size, "width": tower_size}, ("height", "width"),
                        f"{where}: image_processor.pad_size")
    if (pad["height"], pad["width"]) != (tower_size, tower_size):
        raise CheckpointError(f"the image processor pads to {pad['height']}x{pad['width']} but the SigLIP tower takes "
                              f"{tower_size}x{tower_size}; the processor does not belong to this model")
    if not (1 <= size["max_height"] <= pad["height"] and 1 <= size["max_width"] <= pad["width"]):
        raise CheckpointError(f"{where}: image_processor.size max_height x max_width {size['max_height']}x"
                              f"{size['max_width']} must fit the {pad['height']}x{pad['width']} pad (frames are "
                              "resized to fit it, then padded)")
    declared = ip.get("image_seq_length", seq_len)
    if declared != seq_len:
        raise CheckpointError(f"{where}: image_seq_length {preview(declared)} != {seq_len} image tokens the vision "
                              "tower produces")
    scale = finite_numbers([ip.get("rescale_factor", 1 / 255)], f"{where}: image_processor.rescale_factor")[0]
    mean = finite_numbers(ip.get("image_mean", [0.5] * 3), f"{where}: image_processor.image_mean")
    std = finite_numbers(ip.get("image_std", [0.5] * 3), f"{where}: image_processor.image_std")
    if scale <= 0 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(f"{where}: image_processor needs rescale_factor > 0 and image_mean, image_std of 3 "
                              f"numbers each with image_std > 0 (got {scale}, {mean}, {std})")
    return ImageSpec(size["max_height"], size["max_width"], pad["height"], pad["width"], scale, tuple(mean),
                     tuple(std))


def _dict_of_ints(value: Any, keys: tuple[str, ...], what: str) -> dict[str, int]:
    if not isinstance(value, dict) or not all(type(value.get(k)) is int and value[k] > 0 for k in keys):
        raise CheckpointError(f"{what} must be an object with positive whole numbers {', '.join(keys)}, got "
                              f"{preview(value)}")
    return {k: value[k] for k in keys}


def _pad_id(src: Pi0Source) -> int:
    tok = src.load_tokenizer()
    pad = src.tokenizer_config.get("pad_token") or "<pad>"
    pid = tok.token_to_id(str(pad))
    return int(pid) if pid is not None else 0


def encoder_for(plan: _Plan, tokenizer_json: Path) -> Pi0ObservationEncoder:
    return Pi0ObservationEncoder(plan.cameras, plan.image, PromptTokenizer(tokenizer_json, plan.layout),
                                 np.asarray(plan.state_stats[0]), np.asarray(plan.state_stats[1]),
                                 plan.shapes.state_dim)


def _observation_feeds(encoder: Pi0ObservationEncoder, obs: Observation, shapes: Pi0Shapes) -> dict[str, np.ndarray]:
    h, w = shapes.image_size
    feeds = {"images": np.zeros((1, shapes.num_cameras, 3, h, w), np.float32),
             "tokens": np.zeros((1, shapes.prompt_len), np.int32),
             "token_mask": np.zeros((1, shapes.prompt_len), np.int32),
             "state": np.zeros((1, shapes.state_dim), np.float32)}
    encoder.encode(obs, feeds)
    return feeds


@torch.no_grad()
def check_numerics(model: Any, src: Pi0Source, plan: _Plan, graphs: dict[str, Path], contract: Contract,
                   opts: Pi0ExportOptions) -> Pi0NumericsReport:
    shapes = plan.shapes
    encoder = encoder_for(plan, src.tokenizer_json)
    obs = observations.synthetic(opts.numerics_count, shapes.num_cameras, np.asarray(plan.state_stats[0]),
                                 np.asarray(plan.state_stats[1]), NUMERICS_SEED)
    backend = OrtBackend(graphs["prefix"], graphs["denoise_step"], threads=torch.get_num_threads(),
                         providers=["CPUExecutionProvider"])
    g = np.random.default_rng(NUMERICS_SEED)
    valid = plan.sidecar.action_dim
    ref_all, got_all = [], []
    try:
        sampler = Sampler(backend, contract, "euler", plan.steps)
        for o in obs:
            feeds = _observation_feeds(encoder, o, shapes)
            for name, arr in feeds.items():
                np.copyto(backend.buffer(name), arr)
            noise = g.standard_normal((1, shapes.chunk, shapes.action_dim)).astype(np.float32)
            backend.run_prefix()
            got = sampler.run(noise).copy()
            ref = model.sample_actions(
                state=torch.from_numpy(feeds["state"]), input_ids=torch.from_numpy(feeds["tokens"]).long(),
                pixel_values=torch.from_numpy(feeds["images"]), noise=torch.from_numpy(noise),
                attention_mask=torch.from_numpy(feeds["token_mask"]).long(),
                pixel_attention_mask=torch.ones(1, shapes.num_cameras, dtype=torch.bool), num_steps=plan.steps,
            ).numpy()
            ref_all.append(ref)
            got_all.append(got)
    finally:
        backend.close()
    ref_a, got_a = np.concatenate(ref_all), np.concatenate(got_all)
    actions = Metrics.of(ref_a[..., :valid], got_a[..., :valid])
    rel_max, cos_min = THRESHOLDS[opts.precision]
    passed = actions.rel_l2 <= rel_max and actions.cosine >= cos_min
    return Pi0NumericsReport(opts.precision, len(obs), plan.steps, valid, asdict(actions),
                             asdict(Metrics.of(ref_a, got_a)), rel_max, cos_min, passed)


@torch.no_grad()
def _int8(model: Any, src: Pi0Source, plan: _Plan, fp32: dict[str, Path], work: Path, opts: Pi0ExportOptions
          ) -> tuple[dict[str, Path], dict]:
    unknown = set(opts.int8_graphs) - set(fp32)
    if unknown:
        raise EdgeVlaError(f"unknown graph(s) {sorted(unknown)} in int8_graphs; choose from {sorted(fp32)}")
    shapes = plan.shapes
    encoder = encoder_for(plan, src.tokenizer_json)
    if opts.calib:
        obs = observations.from_npz(opts.calib, shapes.num_cameras, len(plan.state_stats[0]), opts.calib_count)
        source = str(opts.calib)
    else:
        obs = observations.synthetic(opts.calib_count, shapes.num_cameras, np.asarray(plan.state_stats[0]),
                                     np.asarray(plan.state_stats[1]), CALIB_SEED)
        source = f"synthetic (seed {CALIB_SEED}: smooth random frames, built-in instructions, state ~ N(mean, std))"
    prefix, step = Pi0Prefix(model, shapes.num_cameras).eval(), Pi0Step(model).eval()
    g = torch.Generator().manual_seed(CALIB_SEED)
    prefix_feeds, step_feeds = [], []
    for o in obs:
        f = _observation_feeds(encoder, o, shapes)
        prefix_feeds.append({k: f[k] for k in ("images", "tokens", "token_mask")})
        t = {k: torch.from_numpy(v) for k, v in f.items()}
        kv = prefix(t["images"], t["tokens"], t["token_mask"])
        kv_np = {n: a.numpy() for n, a in zip(shapes.kv_names(), kv, strict=True)}

        def velocity(x: torch.Tensor, tau: float, t=t, kv=kv) -> torch.Tensor:
            return step(x, torch.full((1,), tau), t["state"], t["token_mask"], *kv)

        def record(i: int, s: int, x_in: torch.Tensor, tau: float, v: torch.Tensor, f=f, kv_np=kv_np) -> None:
            step_feeds.append({"x_t": x_in.numpy(), "t": np.full((1,), tau, np.float32), "state": f["state"],
                               "token_mask": f["token_mask"], **kv_np})

        integrate(velocity, torch.randn(1, shapes.chunk, shapes.action_dim, generator=g), PI0_FLOW, plan.steps,
                  record=record)
    (work / "int8").mkdir()
    feeds = {"prefix": prefix_feeds, "denoise_step": step_feeds}
    graphs = {n: quantize.to_int8(p, work / "int8" / p.name, feeds[n]) if n in opts.int8_graphs else p
              for n, p in fp32.items()}
    desc = {"source": source, "observations": len(prefix_feeds), "step_samples": len(step_feeds),
            "graphs": list(opts.int8_graphs), "method": "minmax", "format": "QDQ symmetric, per-channel weights"}
    return graphs, desc


def _io(path: Path) -> tuple[list[dict], list[dict]]:
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def spec(v: onnx.ValueInfoProto) -> dict:
        t = v.type.tensor_type
        d: dict[str, Any] = {"name": v.name, "shape": [dim.dim_value for dim in t.shape.dim],
                             "dtype": _DTYPES.get(t.elem_type, str(t.elem_type))}
        if v.name.startswith("prefix_"):
            _, kv, layer = v.name.split("_")
            d.update(role="prefix", layer=int(layer), kv={"k": "key", "v": "value"}[kv])
        else:
            d["role"] = ROLES[v.name]
        return d

    return [spec(v) for v in m.graph.input if v.name not in inits], [spec(v) for v in m.graph.output]


def _manifest(src: Pi0Source, model: Any, plan: _Plan, graphs: dict[str, Path], opts: Pi0ExportOptions,
              calib: dict) -> dict[str, Any]:
    cfg = model.config
    text, vision, dit = cfg.vlm_config.text_config, cfg.vlm_config.vision_config, cfg.dit_config
    gspecs = {}
    for name, path in graphs.items():
        ins, outs = _io(path)
        quantized = opts.precision != "int8" or name in opts.int8_graphs
        gspecs[name] = {"role": "prefix" if name == "prefix" else "step", "file": f"graphs/{name}.onnx",
                        "inputs": ins, "outputs": outs, "precision": opts.precision if quantized else "fp32"}
    space = plan.sidecar.action_space
    valid = space.dim
    params = sum(p.numel() for p in model.parameters())
    return {
        "family": "pi0",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "architecture": "PI0ForConditionalGeneration", "transformers_model_type": "pi0",
            "parameters": int(params), "chunk_size": int(cfg.chunk_size), "max_state_dim": int(cfg.max_state_dim),
            "max_action_dim": int(cfg.max_action_dim), "num_inference_steps": int(cfg.num_inference_steps),
            "vision": {"hidden_size": vision.hidden_size, "layers": vision.num_hidden_layers,
                       "image_size": vision.image_size, "patch_size": vision.patch_size},
            "language_model": {"hidden_size": text.hidden_size, "layers": text.num_hidden_layers,
                               "layers_exported": plan.shapes.layers, "heads": text.num_attention_heads,
                               "kv_heads": text.num_key_value_heads, "head_dim": text.head_dim,
                               "vocab_size": text.vocab_size},
            "expert": {"hidden_size": dit.hidden_size, "layers": dit.num_hidden_layers,
                       "heads": dit.num_attention_heads, "kv_heads": dit.num_key_value_heads, "head_dim": dit.head_dim},
            # edge-vla's own config fields the shared tooling (profile, run) reads:
            "num_cameras": plan.shapes.num_cameras, "image_size": plan.image.pad_height,
            "chunk_len": int(cfg.chunk_size), "action_dim": valid, "state_dim": len(plan.state_stats[0]),
            "num_steps": plan.steps,
        },
        "precision": opts.precision,
        "graphs": gspecs,
        "sampler": {
            "flow": "pi0: x_t = t * noise + (1 - t) * action, velocity = noise - action; t from 1 to 0",
            "time": {"start": PI0_FLOW.start, "end": PI0_FLOW.end},
            "solvers": ["euler", "heun", "midpoint"], "solver": "euler",
            "num_steps": plan.steps, "min_steps": 1, "max_steps": 64, "recommended_min_steps": plan.steps,
            "time_input": {"kind": "scalar", "input": "t"},
            "unrolled_graph_steps": None,
        },
        "preprocessing": {
            "kind": "pi0",
            "images": {"cameras": plan.shapes.num_cameras, "names": plan.cameras,
                       "height": plan.image.pad_height, "width": plan.image.pad_width,
                       "max_height": plan.image.max_height, "max_width": plan.image.max_width,
                       "layout": "NCHW, camera-major [1, C, 3, H, W]",
                       "resize": "keep aspect ratio to fit max_height x max_width, bicubic antialiased (torchvision "
                                 "uint8 CPU path), then pad bottom/right with 0 after normalising",
                       "scale": plan.image.scale, "mean": list(plan.image.mean), "std": list(plan.image.std)},
            "state": {"dim": len(plan.state_stats[0]), "pad_to": plan.shapes.state_dim, "normalize": "host",
                      "eps": 1e-8, "names": plan.sidecar.state_names},
            "action": {"dim": plan.shapes.action_dim, "valid_dims": valid, "normalize": "mean_std",
                       "kind": plan.sidecar.kind},
        },
        "tokenizer": {"kind": "tokenizers-json", "file": TOKENIZER_FILE, "max_len": plan.shapes.prompt_len,
                      "max_text_tokens": opts.max_text_tokens, "image_token": plan.layout.image_token,
                      "image_token_id": _image_token_id(model), "image_seq_len": plan.layout.image_seq_len,
                      "bos_token": plan.layout.bos_token, "pad_id": plan.layout.pad_id,
                      "prompt": "<image> x (image_seq_len * cameras) + bos + instruction + '\\n' (PI0Processor)"},
        "normalization": {
            "state": {"mean": plan.state_stats[0], "std": plan.state_stats[1]},
            "action": {"mean": plan.action_stats[0], "std": plan.action_stats[1]},
            "source": plan.stats_source,
        },
        "action_space": space.to_dict(),
        "control": {"action_period_s": space.action_period_s, "chunk_len": int(cfg.chunk_size),
                    "execute_horizon": max(1, int(cfg.chunk_size) // 2), "default_rate_hz": 50},
        "cameras": [{"name": n, "image_size": plan.image.pad_height} for n in plan.cameras],
        "robot": {"sidecar": plan.sidecar.source, "action_kind": plan.sidecar.kind},
        "provenance": {
            "edge_vla": edge_vla.__version__, "source_checkpoint": str(src.path),
            "source_sha256": src.weights_sha256(), "transformers": _version("transformers"),
            "tokenizers": _version("tokenizers"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": OPSET, "calibration": calib, "host": platform.node(),
        },
    }


def _version(mod: str) -> str:
    try:
        return str(__import__(mod).__version__)
    except ImportError:
        return "absent"


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
