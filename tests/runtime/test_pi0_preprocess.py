"""π0 robot-side preprocessing (numpy + tokenizers) against transformers' PI0Processor / torch's resize."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edge_vla.errors import BundleError, ObservationError
from edge_vla.hf_tokenizer import PromptLayout, PromptTokenizer
from edge_vla.preprocess import ImageSpec, Pi0ObservationEncoder, fit_size, preprocess_image, resize_bicubic_aa
from edge_vla.runtime.types import Observation

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

FRAMES = [(480, 640), (100, 150), (224, 224), (30, 40), (300, 200), (57, 91), (224, 300), (720, 1280), (1, 1),
          (1000, 5), (7, 224), (9, 2000)]
INSTRUCTIONS = ["pick up the red block", "  Put the CUBE in the bowl ", "open the drawer\nnow", "", "ünïcode ✓",
                "stack the blue block on the red block and then push the green button"]


@pytest.fixture(scope="module")
def pi0_dir(tmp_path_factory):
    from edge_vla.export.pi0.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("pi0pre") / "ckpt", state_dim=3, action_dim=3)


@pytest.fixture(scope="module")
def processor(pi0_dir):
    """The saved PI0Processor, loaded part by part: `PI0Processor.from_pretrained` insists on torchvision
    (its image processor's only backend), which has no wheel for this torch; the parts load without it."""
    import json

    from transformers import AutoTokenizer, PI0Processor
    from transformers.models.pi0.image_processing_pi0 import PI0ImageProcessor

    cfg = json.loads((pi0_dir / "processor_config.json").read_text())
    ip = {k: v for k, v in cfg.pop("image_processor").items() if k != "image_processor_type"}
    stats = {k: cfg[k] for k in ("state_mean", "state_std", "actions_mean", "actions_std", "max_state_dim",
                                 "chunk_size")}
    return PI0Processor(image_processor=PI0ImageProcessor(**ip), tokenizer=AutoTokenizer.from_pretrained(pi0_dir),
                        **stats)


def frames(seed: int = 0):
    g = np.random.default_rng(seed)
    for h, w in FRAMES:
        noise = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        smooth = np.clip(128 + g.normal(0, 6, (h, w, 3)).cumsum(0).cumsum(1) / 20, 0, 255).astype(np.uint8)
        yield noise
        yield smooth


def torchvision_resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """What PI0ImageProcessor's resize does to a frame on a CPU: `torchvision.transforms.v2.functional.resize`
    of a uint8 tensor with BICUBIC + antialias passes the uint8 tensor straight to `interpolate`
    (`_do_native_uint8_resize_on_cpu`), i.e. ATen's uint8 kernel with int16 fixed-point weights (an unchanged
    size returns the frame as it is)."""
    if (h, w) == image.shape[:2]:
        return image
    t = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    out = torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


# ATen has a vectorised uint8 kernel (AVX2 and up) and a generic one (no AVX2, e.g. an aarch64 Jetson); the
# reference is taken from both: ATEN_CPU_CAPABILITY=default makes a process take the generic one.
_GENERIC_KERNEL = """
import json, sys
import numpy as np, torch
frames = np.load(sys.argv[1])
out = {}
for key in frames.files:
    h, w = (int(v) for v in key.split("_")[1:])
    t = torch.from_numpy(frames[key]).permute(2, 0, 1)[None].contiguous()
    r = torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    out[key] = r[0].permute(1, 2, 0).numpy()
np.savez(sys.argv[2], **out)
print(json.dumps(torch.backends.cpu.get_cpu_capability()))
"""


def test_fit_size_matches_transformers():
    from transformers.image_utils import get_image_size_for_max_height_width

    for h, w in [*FRAMES, (1000, 3), (7, 224)]:
        assert fit_size(h, w, 224, 224) == get_image_size_for_max_height_width((h, w), 224, 224)


def _resize_cases() -> list[tuple[np.ndarray, int, int]]:
    return [(img, *fit_size(*img.shape[:2], 224, 224)) for img in frames()]


def test_resize_equals_torchvisions_uint8_path_exactly():
    """Every value equal, upscaling and downscaling, noise and smooth frames (the float path, which this
    module reproduced before, differed by one level on 6-20 % of values and by up to 21 levels on upscaled
    noise: the uint8 kernel rounds to uint8 between its horizontal and vertical pass)."""
    for img, h, w in _resize_cases():
        want = torchvision_resize(img, h, w)
        got = resize_bicubic_aa(img, h, w)
        assert got.shape == want.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() == 0, f"{img.shape} -> {(h, w)}: {np.mean(diff > 0):.2%} of values differ, up to {diff.max()}"


def test_a_frame_too_thin_to_resize_is_refused():
    with pytest.raises(ObservationError, match="too thin"):
        preprocess_image(np.zeros((1000, 3, 3), np.uint8), ImageSpec(224, 224, 224, 224))  # would be 224 x 0


def test_resize_equals_the_generic_uint8_kernel_too(tmp_path):
    """The same frames through ATen's generic (non-vectorised) uint8 kernel, in a process forced onto it.
    Not a 1-pixel-wide output: there the generic kernel (uint8 and float alike, torch 2.13) repeats its first
    row down the whole column while the vectorised kernel filters each row (checked above)."""
    cases = {f"{i}_{h}_{w}": img for i, (img, h, w) in enumerate(_resize_cases())
             if (h, w) != img.shape[:2] and w > 1}
    np.savez(tmp_path / "frames.npz", **cases)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _GENERIC_KERNEL, str(tmp_path / "frames.npz"), str(tmp_path / "out.npz")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == "DEFAULT"  # the generic kernel really ran
    want = np.load(tmp_path / "out.npz")
    for key, img in cases.items():
        h, w = (int(v) for v in key.split("_")[1:])
        np.testing.assert_array_equal(resize_bicubic_aa(img, h, w), want[key], err_msg=key)


def test_image_normalisation_and_padding_follow_the_processor_config(processor):
    ip = processor.image_processor
    spec = ImageSpec(ip.size["max_height"], ip.size["max_width"], ip.pad_size["height"], ip.pad_size["width"],
                     ip.rescale_factor, tuple(ip.image_mean), tuple(ip.image_std))
    img = next(frames(1))  # 480 x 640 -> 42 x 56, padded to 56 x 56 at the bottom
    out = preprocess_image(img, spec)
    h, w = fit_size(480, 640, spec.max_height, spec.max_width)
    resized = torchvision_resize(img, h, w)
    mean = torch.tensor(ip.image_mean) * (1.0 / ip.rescale_factor)  # the processor's fused rescale+normalize
    std = torch.tensor(ip.image_std) * (1.0 / ip.rescale_factor)
    want = ((torch.from_numpy(resized).permute(2, 0, 1).float() - mean[:, None, None]) / std[:, None, None]).numpy()
    assert out.shape == (3, 56, 56) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :h, :w], want)
    assert np.all(out[:, h:, :] == 0.0)


@pytest.mark.skipif(not __import__("edge_vla.optional").optional.available("torchvision"),
                    reason="torchvision is not installed (PI0ImageProcessor needs it); parity is checked against "
                           "torch's resize above")
def test_full_processor_parity(processor, pi0_dir):
    images = list(frames(2))[:2]
    state = np.array([0.3, -0.1, 0.7], np.float32)
    ref = processor(images=[images], text="pick up the red block", state=state, return_tensors="pt")
    spec = ImageSpec(56, 56, 56, 56)
    for i, img in enumerate(images):
        np.testing.assert_allclose(preprocess_image(img, spec), ref["pixel_values"][0, i].numpy(), rtol=0, atol=1e-6)
    layout = PromptLayout("<image>", processor.image_seq_length, 2, processor.tokenizer.bos_token, 0, 200)
    ids, mask = PromptTokenizer(pi0_dir / "tokenizer.json", layout).encode("pick up the red block")
    valid = ref["attention_mask"][0].bool()  # the processor pads to 48 tokens when the prompt is shorter
    assert ids[: int(mask.sum())].tolist() == ref["input_ids"][0][valid].tolist()


@pytest.mark.parametrize("cameras", [1, 2])
def test_tokenization_matches_transformers_tokenizer(processor, pi0_dir, cameras):
    layout = PromptLayout("<image>", processor.image_seq_length, cameras, processor.tokenizer.bos_token,
                          processor.tokenizer.pad_token_id, 16 * cameras + 60)
    tok = PromptTokenizer(pi0_dir / "tokenizer.json", layout)
    assert tok.image_token_id == processor.image_token_id
    for text in INSTRUCTIONS:
        # PI0Processor.__call__'s prompt and tokenizer call, padded to the bundle's static length
        prompt = f"{processor.image_token * processor.image_seq_length * cameras}{processor.tokenizer.bos_token}{text}\n"
        want = processor.tokenizer(prompt, padding="max_length", max_length=layout.max_len, padding_side="right")
        ids, mask = tok.encode(text)
        assert ids.tolist() == want["input_ids"], text
        assert mask.tolist() == want["attention_mask"], text


def test_state_normalisation_matches_processor(processor, pi0_dir):
    enc = Pi0ObservationEncoder(["cam0"], ImageSpec(56, 56, 56, 56),
                                PromptTokenizer(pi0_dir / "tokenizer.json",
                                                PromptLayout("<image>", 16, 1, "<bos>", 0, 64)),
                                np.asarray(processor.state_mean), np.asarray(processor.state_std), 8)
    state = np.array([0.3, -1.1, 2.7], np.float32)
    inputs = {"images": np.zeros((1, 1, 3, 56, 56), np.float32), "tokens": np.zeros((1, 64), np.int32),
              "token_mask": np.zeros((1, 64), np.int32), "state": np.full((1, 8), 9.0, np.float32)}
    enc.encode(Observation([np.zeros((50, 70, 3), np.uint8)], "close the gripper", state), inputs)
    want = processor.normalize(torch.from_numpy(state), "state").numpy()
    np.testing.assert_array_equal(inputs["state"][0, :3], want)
    assert np.all(inputs["state"][0, 3:] == 0.0)
    for bad, match in ((np.array([1.0, 2.0]), r"shape \(3,\)"), (np.array([1.0, np.nan, 0.0]), "NaN")):
        with pytest.raises(ObservationError, match=match):
            enc.encode(Observation([np.zeros((50, 70, 3), np.uint8)], "x", bad), inputs)
    with pytest.raises(ObservationError, match="uint8 RGB"):
        enc.encode(Observation([np.zeros((50, 70, 3), np.float32)], "x", state), inputs)


def test_tokenizer_without_image_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"<bos>": 0, "a": 1}, unk_token="<bos>")).save(str(path))
    with pytest.raises(BundleError, match="no '<image>' token"):
        PromptTokenizer(path, PromptLayout("<image>", 4, 1, "<bos>", 0, 16))
    with pytest.raises(BundleError, match="missing"):
        PromptTokenizer(tmp_path / "nope.json", PromptLayout("<image>", 4, 1, "<bos>", 0, 16))
