"""The reduced sim π0 at test widths, shared by the π0 training tests: 64 px frames, patch 16 (16 image tokens),
2 + 2 Gemma layers; initialises in a second, and a training step takes well under one."""

TINY = {"vlm_config": {"text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "head_dim": 16},
                       "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "patch_size": 16},
                       "projection_dim": 32},
        "dit_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "head_dim": 16}}
