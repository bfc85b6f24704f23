"""Small π0 checkpoint directories built offline (no downloads), as `save_pretrained` writes them.

Used by the tests (narrow widths, a few layers) and the benchmark (full widths, a few layers). The
tokenizer is a tiny BPE trained here with the `tokenizers` library; the processor is transformers'
`PI0Processor` with its `PI0ImageProcessor`, so the directory holds exactly the files a real π0 export has:
config.json, model.safetensors, tokenizer.json, tokenizer_config.json, processor_config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_CORPUS = [
    "pick up the red block", "put the cube in the bowl", "open the top drawer", "push the green button",
    "stack the blue block on the red block", "move the arm to the left", "close the gripper", "reach the target\n",
]


def tiny_pi0_config(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of `PI0Config` for an 8M-parameter π0 (2+2 Gemma layers, 1 SigLIP layer, 56 px)."""
    cfg: dict[str, Any] = {
        "vlm_config": {
            "model_type": "paligemma",
            "text_config": {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                            "head_dim": 32, "vocab_size": 300},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 14,
                              "image_size": 56, "vision_use_head": False},
            "projection_dim": 64,
            "image_token_id": 299,  # replaced by the tokenizer's <image> id in make_checkpoint
        },
        "dit_config": {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32},
        "chunk_size": 8, "max_state_dim": 8, "max_action_dim": 8,
    }
    cfg.update(overrides)
    return cfg


def full_width_pi0_config(vlm_layers: int = 2, dit_layers: int = 2, vision_layers: int = 2,
                          chunk_size: int = 50) -> dict[str, Any]:
    """π0's real widths (SigLIP so400m, Gemma-2B, Gemma-300M expert, 224 px, 32-dim padding) with few layers."""
    return {
        "vlm_config": {
            "model_type": "paligemma",
            "text_config": {"model_type": "gemma", "hidden_size": 2048, "num_hidden_layers": vlm_layers,
                            "intermediate_size": 16384, "num_attention_heads": 8, "num_key_value_heads": 1,
                            "head_dim": 256, "vocab_size": 257152},
            "vision_config": {"model_type": "siglip_vision_model", "intermediate_size": 4304, "hidden_size": 1152,
                              "patch_size": 14, "image_size": 224, "num_hidden_layers": vision_layers,
                              "num_attention_heads": 16, "vision_use_head": False},
            "projection_dim": 2048, "image_token_id": 257152,
        },
        "dit_config": {"model_type": "gemma", "hidden_size": 1024, "num_hidden_layers": dit_layers,
                       "intermediate_size": 4096, "num_attention_heads": 8, "num_key_value_heads": 1,
                       "head_dim": 256},
        "chunk_size": chunk_size,
    }


def build_tokenizer(vocab_size: int = 96, corpus: list[str] | None = None):
    """A small BPE tokenizer wrapped for transformers (bos/eos/pad/unk like Gemma's, Metaspace like SentencePiece),
    trained on `corpus` (default: a few robot instructions)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.train_from_iterator(corpus or _CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def fan_in_init(model: Any, seed: int = 0) -> None:
    """Redraw every Linear / Conv2d weight and bias from N(0, 1/fan_in).

    transformers initialises them at N(0, 0.02^2): at the tiny widths the expert's velocity is then so small
    that the sampled chunk stays within a few % of its noise and barely depends on the image or the
    instruction, which hides a wrong velocity (a numerics gate passes whatever the graphs do to it). At
    1/sqrt(fan_in) activations keep their scale layer to layer: the chunk moves far from the noise and
    another image or instruction changes it (tests/export/test_pi0_fp16.py checks both)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                std = module.weight[0].numel() ** -0.5  # fan_in: the inputs one output sums over
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * std)


def make_checkpoint(out: str | Path, config: dict[str, Any] | None = None, num_cameras: int = 2,
                    state_dim: int = 3, action_dim: int = 3, seed: int = 0, with_processor: bool = True,
                    dtype: str = "float32", max_shard_size: str | None = None, init: str = "transformers") -> Path:
    """Write a random-weight π0 checkpoint directory with its tokenizer and processor (statistics included).
    max_shard_size (e.g. "1GB"): safetensors serialises a shard in memory, so the full π0 needs small shards.
    init: "transformers" (its own initialisation) or "fan_in" (`fan_in_init`: a π0 whose chunk depends on
    its inputs, for numerics tests)."""
    import numpy as np
    import torch
    from transformers import PI0Config, PI0ForConditionalGeneration, PI0Processor
    from transformers.models.pi0.image_processing_pi0 import PI0ImageProcessor

    out = Path(out)
    cfg = dict(config or tiny_pi0_config())
    vision = cfg["vlm_config"]["vision_config"]
    size = int(vision["image_size"])
    seq_len = (size // int(vision["patch_size"])) ** 2
    tokenizer = build_tokenizer()
    image_processor = PI0ImageProcessor(size={"max_height": size, "max_width": size},
                                        pad_size={"height": size, "width": size}, image_seq_length=seq_len)
    g = np.random.default_rng(seed)
    processor = PI0Processor(
        image_processor=image_processor, tokenizer=tokenizer,
        state_mean=g.normal(0, 0.5, state_dim).round(4).tolist(), state_std=g.uniform(0.2, 1.0, state_dim).round(4).tolist(),
        actions_mean=g.normal(0, 0.5, action_dim).round(4).tolist(),
        actions_std=g.uniform(0.2, 1.0, action_dim).round(4).tolist(),
        max_state_dim=int(cfg.get("max_state_dim", 32)), chunk_size=int(cfg.get("chunk_size", 50)),
    )
    # The tokenizer decides the <image> id (Gemma's real one: 257152, just past its vocabulary).
    cfg["vlm_config"] = dict(cfg["vlm_config"], image_token_id=processor.image_token_id)
    torch.manual_seed(seed)
    model = PI0ForConditionalGeneration(PI0Config(**cfg)).eval()
    if init == "fan_in":
        fan_in_init(model, seed)
    elif init != "transformers":
        raise ValueError(f"init must be 'transformers' or 'fan_in', got {init!r}")
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if with_processor:
        processor.save_pretrained(out)
    return out
