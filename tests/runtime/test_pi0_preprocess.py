"""π0 robot-side preprocessing (numpy + tokenizers) against transformers' PI0Processor / torch's resize."""

from __future__ import annotations

import numpy as np
import pytest

from edge_vla.errors import BundleError, ObservationError
from edge_vla.hf_tokenizer import PromptLayout, PromptTokenizer
from edge_vla.preprocess import ImageSpec, Pi0ObservationEncoder, fit_size, preprocess_image, resize_bicubic_aa
from edge_vla.runtime.types import Observation

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

FRAMES = [(480, 640), (100, 150), (224, 224), (30, 40), (300, 200), (57, 91), (224, 300)]
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
    """What torchvision.transforms.v2.functional.resize does to a uint8 CPU tensor with BICUBIC + antialias:
    float32 interpolate, clamp, round, back to uint8 (the resize PI0ImageProcessor calls)."""
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    out = torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp_(0, 255).round_().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def test_fit_size_matches_transformers():
    from transformers.image_utils import get_image_size_for_max_height_width

    for h, w in [*FRAMES, (1000, 3), (7, 224)]:
        assert fit_size(h, w, 224, 224) == get_image_size_for_max_height_width((h, w), 224, 224)


def test_resize_matches_torch_antialiased_bicubic():
    total = mismatched = 0
    for img in frames():
        h, w = fit_size(*img.shape[:2], 224, 224)
        want = img if (h, w) == img.shape[:2] else torchvision_resize(img, h, w)
        got = resize_bicubic_aa(img, h, w)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1, f"{img.shape} -> {(h, w)}: off by {diff.max()} levels"
        total, mismatched = total + diff.size, mismatched + int((diff > 0).sum())
    # float64 weights vs ATen's float32 only flip values that sit on a rounding boundary
    assert mismatched / total < 1e-3


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
    assert np.abs(out[:, :h, :w] - want).max() <= 1.0 / 127.5 + 1e-6  # at most one uint8 level
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
        np.testing.assert_allclose(preprocess_image(img, spec), ref["pixel_values"][0, i].numpy(), atol=1 / 127.5 + 1e-6)
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
