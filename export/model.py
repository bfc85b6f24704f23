"""The reference pi0-style VLA in PyTorch, built from a VLAConfig.

    images, instruction tokens, state --trunk--> prefix --per expert layer K/V--> prefix_kv   (once per chunk)
    x_t, t, prefix_kv --action expert (adaLN on t, cross-attention to prefix_kv)--> velocity  (each ODE step)

Flow convention (rectified flow): x_0 = noise, x_1 = normalized action chunk,
x_t = (1 - t) x_0 + t x_1, target velocity v = x_1 - x_0, sampling integrates t from 0 to 1.
Attention is written as MatMul + Softmax so that both onnxruntime and TensorRT's ONNX parser take it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_vla.config import VLAConfig

TIME_SCALE = 100.0  # t in [0, 1] is scaled before the sinusoidal embedding
LN_EPS = 1e-6


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [B, h, Tq, d], k/v [B, h, Tk, d] -> [B, h, Tq, d]; scale = 1/sqrt(d) as a Python float (a constant)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        y = attention(split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads), self.scale)
        return self.out(merge_heads(y))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(ratio * dim, dim))


class TrunkBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: LayerNorm without affine, then a per-channel scale and shift computed from t."""
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ExpertBlock(nn.Module):
    """DiT-style block: adaLN-modulated self-attention and MLP, plus cross-attention to the prefix."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, prefix_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.mod = nn.Linear(dim, 6 * dim)
        self.attn = SelfAttention(dim, heads)
        self.cross_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(prefix_dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def prefix_kv(self, prefix: Tensor) -> Tensor:
        """[B, P, prefix_dim] -> [2, B, heads, P, head_dim]: computed once per chunk."""
        k, v = self.cross_kv(prefix).chunk(2, dim=-1)
        return torch.stack([split_heads(k, self.heads), split_heads(v, self.heads)])

    def forward(self, x: Tensor, c: Tensor, kv: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(F.silu(c)).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(x, shift1, scale1))
        q = split_heads(self.cross_q(self.cross_norm(x)), self.heads)
        x = x + self.cross_out(merge_heads(attention(q, kv[0], kv[1], self.scale)))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(x, shift2, scale2))


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """t [B] in [0, 1] -> [B, dim]: cos/sin of t * TIME_SCALE at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * TIME_SCALE).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConvStem(nn.Module):
    """Per-camera conv stem: instruction-FiLM on full-resolution features, the patch grid, and keypoints.

    The FiLM after the first conv lets the instruction pick a colour per pixel; a spatial softmax over the
    next feature maps then gives each keypoint channel's expected image coordinates, which is where a
    selected block is, at sub-patch precision. Coordinates use Mul + ReduceSum (not a MatMul) so that INT8
    quantization, which takes MatMul/Gemm/Conv, leaves them in floating point.
    """

    def __init__(self, cfg: VLAConfig) -> None:
        super().__init__()
        c1, w = cfg.stem_channels, cfg.width
        c2 = 2 * c1
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.film = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, 2 * c1))
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.grid = nn.Conv2d(c2, w, kernel_size=cfg.patch_size // 2, stride=cfg.patch_size // 2)
        self.keypoints = cfg.keypoints
        if self.keypoints:
            self.kp_logits = nn.Conv2d(c2, self.keypoints, 1)
            self.kp_proj = nn.Linear(2, w)
            self.kp_emb = nn.Parameter(torch.randn(1, self.keypoints, w) * 0.02)
            half = cfg.image_size // 2
            lin = (torch.arange(half, dtype=torch.float32) + 0.5) / half * 2 - 1  # pixel centres in [-1, 1]
            ys, xs = torch.meshgrid(lin, lin, indexing="ij")
            self.register_buffer("kp_x", xs.reshape(1, 1, -1), persistent=False)
            self.register_buffer("kp_y", ys.reshape(1, 1, -1), persistent=False)

    def forward(self, images: Tensor, text: Tensor) -> Tensor:
        """images [N, 3, S, S] (normalized); text [N, w] pooled instruction -> tokens [N, T, w]."""
        gamma, beta = self.film(text).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        x = F.relu(self.conv1(images) * (1 + gamma) + beta)
        x = F.relu(self.conv2(x))
        tokens = self.grid(x).flatten(2).transpose(1, 2)
        if not self.keypoints:
            return tokens
        attn = torch.softmax(self.kp_logits(x).flatten(2), dim=-1)  # [N, K, S/2 * S/2]
        xy = torch.stack([(attn * self.kp_x).sum(-1), (attn * self.kp_y).sum(-1)], dim=-1)  # [N, K, 2]
        return torch.cat([tokens, self.kp_proj(xy) + self.kp_emb], dim=1)


class VLA(nn.Module):
    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        cfg = self.config = config.validate()
        w = cfg.width
        if cfg.vision == "conv":
            self.stem = ConvStem(cfg)
        else:
            self.patch = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.camera_emb = nn.Parameter(torch.zeros(cfg.num_cameras, 1, w))
        self.patch_pos = nn.Parameter(torch.randn(1, cfg.tokens_per_camera, w) * 0.02)
        self.token_emb = nn.Embedding(cfg.vocab_size, w)
        self.text_pos = nn.Parameter(torch.randn(1, cfg.max_text_len, w) * 0.02)
        self.state_proj = nn.Linear(cfg.state_dim, w)
        self.text_film = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, 2 * w)) if cfg.text_film else None
        self.trunk = nn.ModuleList(TrunkBlock(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.trunk_norm = nn.LayerNorm(w, eps=LN_EPS)
        self.goal = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, cfg.goal_dim)) if cfg.goal_head else None

        e = cfg.expert_width
        self.action_in = nn.Linear(cfg.action_dim, e)
        self.action_pos = nn.Parameter(torch.randn(1, cfg.chunk_len, e) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        # RTC (config.rtc_max_delay > 0): added to the action tokens of the frozen prefix (mask 1), whose x_t is
        # the clean action; absent otherwise, so models without RTC keep their parameters and random draws.
        self.prefix_emb = nn.Parameter(torch.randn(1, 1, e) * 0.02) if cfg.rtc_max_delay > 0 else None
        self.expert = nn.ModuleList(
            ExpertBlock(e, cfg.expert_heads, cfg.mlp_ratio, w) for _ in range(cfg.expert_depth)
        )
        self.final_mod = nn.Linear(e, 2 * e)
        self.action_out = nn.Linear(e, cfg.action_dim)
        # Normalization statistics travel with the weights (and into the bundle manifest).
        self.register_buffer("state_mean", torch.zeros(cfg.state_dim))
        self.register_buffer("state_std", torch.ones(cfg.state_dim))
        self.register_buffer("action_mean", torch.zeros(cfg.action_dim))
        self.register_buffer("action_std", torch.ones(cfg.action_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.text_film is not None:  # starts as the identity on the patch tokens
            nn.init.zeros_(self.text_film[-1].weight)
        if self.config.vision == "conv":  # the stem's FiLM starts as the identity too
            nn.init.zeros_(self.stem.film[-1].weight)
        # adaLN-zero: each expert block starts as the identity, a well-known stabiliser for DiTs.
        for blk in self.expert:
            nn.init.zeros_(blk.mod.weight)
        nn.init.zeros_(self.final_mod.weight)
        nn.init.zeros_(self.action_out.weight)

    # --- prefix: once per chunk -----------------------------------------------------------------
    def embed_prefix(self, images: Tensor, tokens: Tensor, state: Tensor) -> Tensor:
        """images float [B, C, 3, S, S] in [0, 1]; tokens int [B, L]; state [B, state_dim] (physical)."""
        h = self.prefix_tokens(images, tokens, state)
        for blk in self.trunk:
            h = blk(h)
        return self.trunk_norm(h)

    def prefix_tokens(self, images: Tensor, tokens: Tensor, state: Tensor) -> Tensor:
        """The trunk's input: image, text and state tokens [B, P, width] (the export's prefix graph reuses it)."""
        b, c = images.shape[:2]
        w = self.config.width
        text = self.token_emb(tokens) + self.text_pos
        # Mean over every position, pads included: no mask, so no Cast that FP16 conversion would break.
        pooled = text.mean(dim=1)
        pixels = (images.flatten(0, 1) - 0.5) / 0.25
        if self.config.vision == "conv":
            x = self.stem(pixels, pooled.unsqueeze(1).expand(b, c, w).reshape(b * c, w))  # [B*C, T, w]
        else:
            x = self.patch(pixels).flatten(2).transpose(1, 2)  # [B*C, (S/p)^2, w]
        x = x.reshape(b, c, -1, w)
        x = (x + self.patch_pos.unsqueeze(0) + self.camera_emb.unsqueeze(0)).flatten(1, 2)
        if self.text_film is not None:
            gamma, beta = self.text_film(pooled).unsqueeze(1).chunk(2, dim=-1)
            x = x * (1 + gamma) + beta
        s = self.state_proj((state - self.state_mean) / self.state_std).unsqueeze(1)
        return torch.cat([x, text, s], dim=1)

    def prefix_kv(self, images: Tensor, tokens: Tensor, state: Tensor) -> Tensor:
        """-> [expert_depth, 2, B, heads, P, head_dim]: each expert layer's cross-attention K and V."""
        prefix = self.embed_prefix(images, tokens, state)
        return torch.stack([blk.prefix_kv(prefix) for blk in self.expert])

    # --- one ODE step -------------------------------------------------------------------------------
    def time_condition(self, t: Tensor) -> Tensor:
        return self.time_mlp(timestep_embedding(t, self.config.expert_width))

    def velocity(self, x_t: Tensor, t: Tensor, prefix_kv: Tensor, prefix_mask: Tensor | None = None) -> Tensor:
        """x_t [B, H, D] (normalized actions), t [B] -> velocity [B, H, D]. With RTC, `prefix_mask` [B, H] is 1 on
        the frozen prefix (whose x_t holds the clean actions) and 0 elsewhere; None means no prefix."""
        c = self.time_condition(t)
        h = self.action_in(x_t) + self.action_pos
        if prefix_mask is not None and self.prefix_emb is not None:
            h = h + prefix_mask.unsqueeze(-1) * self.prefix_emb
        for i, blk in enumerate(self.expert):
            h = blk(h, c, prefix_kv[i])
        shift, scale = self.final_mod(F.silu(c)).chunk(2, dim=-1)
        return self.action_out(modulate(h, shift, scale))

    # --- training and sampling ----------------------------------------------------------------------
    def normalize_actions(self, actions: Tensor) -> Tensor:
        return (actions - self.action_mean) / self.action_std

    def denormalize_actions(self, x: Tensor) -> Tensor:
        return x * self.action_std + self.action_mean

    def flow_loss(self, images: Tensor, tokens: Tensor, state: Tensor, actions: Tensor,
                  noise: Tensor | None = None, t: Tensor | None = None, goals: Tensor | None = None,
                  goal_weight: float = 0.0, hold: Tensor | None = None, hold_fraction: float = 0.0) -> Tensor:
        """Flow-matching loss for a batch of physical-unit action chunks [B, H, D]; with `goals` (positions in
        metres, [B, goal_dim]: the sim's target xy, MetaWorld's object and goal xyz) and a goal head, plus `goal_weight` times the goal-location loss."""
        x1 = self.normalize_actions(actions)
        x0 = torch.randn_like(x1) if noise is None else noise
        if t is None:
            t = torch.rand(x1.shape[0], device=x1.device)
        x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * x1
        prefix = self.embed_prefix(images, tokens, state)
        kv = torch.stack([blk.prefix_kv(prefix) for blk in self.expert])
        if self.config.rtc_max_delay > 0:
            held = None if hold is None or hold_fraction <= 0 else self.normalize_actions(hold)
            loss = self.prefix_flow_loss(x0, x1, x_t, t, kv, held, hold_fraction)
        else:
            loss = F.mse_loss(self.velocity(x_t, t, kv), x1 - x0)
        if goals is not None and goal_weight > 0 and self.goal is not None:
            # In table-normalised units (centre 0.5 m, scale 0.25 m), so the loss is O(1) like the flow loss.
            loss = loss + goal_weight * F.mse_loss(self.goal(prefix.mean(dim=1)), (goals - 0.5) / 0.25)
        return loss

    def prefix_flow_loss(self, x0: Tensor, x1: Tensor, x_t: Tensor, t: Tensor, kv: Tensor,
                         hold: Tensor | None = None, hold_fraction: float = 0.0) -> Tensor:
        """Training-time RTC: per example a delay d uniform in 0..rtc_max_delay; the first d actions are given
        clean (x_t = x1, mask 1) and the loss covers only the others, the ones the model generates.

        `hold` [B, D] (normalized; the action that keeps the arm where it is, e.g. the joint positions when
        actions are joint-position targets): in a `hold_fraction` of the examples the prefix is d holds and the
        target continues with the plan delayed by d (the arm waited, then the same plan). This is what a robot
        starting from rest executes while its first chunk is computed; without it that prefix is one the model
        never saw (measured: it then jumps at the first hand-over)."""
        b, h = x1.shape[:2]
        d = torch.randint(0, self.config.rtc_max_delay + 1, (b, 1), device=x1.device)
        positions = torch.arange(h, device=x1.device).unsqueeze(0)
        mask = (positions < d).to(x1.dtype)  # [B, H]
        if hold is not None and hold_fraction > 0:
            held = (torch.rand(b, device=x1.device) < hold_fraction).view(-1, 1, 1)
            delayed = x1.gather(1, (positions - d).clamp_min(0).unsqueeze(-1).expand_as(x1))
            delayed = torch.where(mask.unsqueeze(-1) > 0, hold.unsqueeze(1).expand_as(x1), delayed)
            x1 = torch.where(held, delayed, x1)
            tt = t.view(-1, 1, 1)
            x_t = (1 - tt) * x0 + tt * x1
        x_t = torch.where(mask.unsqueeze(-1) > 0, x1, x_t)
        err = (self.velocity(x_t, t, kv, mask) - (x1 - x0)) ** 2  # [B, H, D]
        free = (1 - mask).unsqueeze(-1)
        return (err * free).sum() / (free.sum() * x1.shape[-1]).clamp_min(1.0)

    def goal_xy(self, prefix: Tensor) -> Tensor:
        """Where the named block is (metres), read from the mean of the prefix tokens (training probe)."""
        assert self.goal is not None, "built without goal_head"
        return self.goal(prefix.mean(dim=1)) * 0.25 + 0.5  # the table is [0, 1] m: predict around its centre

    @torch.no_grad()
    def sample(self, images: Tensor, tokens: Tensor, state: Tensor, noise: Tensor,
               steps: int | None = None, solver: str = "euler", cache_prefix: bool = True,
               prefix: Tensor | None = None) -> Tensor:
        """Integrate the flow from noise to an action chunk in physical units. With RTC, `prefix` [B, d, D]
        (physical units, d <= rtc_max_delay) are the chunk's first d actions, given: they come back unchanged and
        the rest is generated consistent with them."""
        steps = steps or self.config.num_steps
        kv = self.prefix_kv(images, tokens, state) if cache_prefix else None
        x = noise
        dt = 1.0 / steps
        mask, frozen = self._frozen_prefix(noise, prefix)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1) > 0, frozen, x)

        def v_at(x: Tensor, t: float) -> Tensor:
            tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            v = self.velocity(x, tt, kv if kv is not None else self.prefix_kv(images, tokens, state), mask)
            # The frozen actions do not move: every solver stage then keeps them exactly.
            return v if mask is None else v * (1 - mask).unsqueeze(-1)

        for i in range(steps):
            t = i * dt
            v = v_at(x, t)
            if solver == "euler":
                x = x + dt * v
            elif solver == "heun":
                x_pred = x + dt * v
                x = x + 0.5 * dt * (v + v_at(x_pred, t + dt))
            elif solver == "midpoint":
                x = x + dt * v_at(x + 0.5 * dt * v, t + 0.5 * dt)
            else:
                raise ValueError(f"unknown solver {solver!r}; use euler, heun or midpoint")
        return self.denormalize_actions(x)


    def _frozen_prefix(self, noise: Tensor, prefix: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(mask [B, H], the prefix in normalized units padded to [B, H, D]) or (None, None) without a prefix."""
        if prefix is None or prefix.shape[1] == 0:
            return None, None
        d, cfg = prefix.shape[1], self.config
        if self.prefix_emb is None:
            raise ValueError("this model was not trained for real-time chunking (rtc_max_delay = 0): it cannot "
                             "take an action prefix; train it with --rtc-max-delay")
        if d > cfg.rtc_max_delay or prefix.shape[0] != noise.shape[0] or prefix.shape[2] != cfg.action_dim:
            raise ValueError(f"prefix of shape {tuple(prefix.shape)}: expected [{noise.shape[0]}, d <= "
                             f"{cfg.rtc_max_delay}, {cfg.action_dim}]")
        mask = torch.zeros(noise.shape[:2], dtype=noise.dtype, device=noise.device)
        mask[:, :d] = 1.0
        frozen = torch.zeros_like(noise)
        frozen[:, :d] = self.normalize_actions(prefix.to(noise.dtype))
        return mask, frozen


def fake_inputs(config: VLAConfig, batch: int = 1, seed: int = 0) -> dict[str, Tensor]:
    """Random inputs of the right shapes and dtypes for shape tests and export."""
    g = torch.Generator().manual_seed(seed)
    c = config
    return {
        "images": torch.rand(batch, c.num_cameras, 3, c.image_size, c.image_size, generator=g),
        "tokens": torch.randint(2, c.vocab_size, (batch, c.max_text_len), generator=g, dtype=torch.int64).int(),
        "state": torch.randn(batch, c.state_dim, generator=g),
        "noise": torch.randn(batch, c.chunk_len, c.action_dim, generator=g),
    }


def untrained_with_live_outputs(config: VLAConfig, seed: int = 0) -> VLA:
    """An untrained model whose zero-initialised (adaLN-zero) layers are randomised, with non-trivial
    normalization, so that its actions depend on its inputs: for export round trips, tests and latency work."""
    torch.manual_seed(seed)
    model = VLA(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0 and p.dim() == 2:
                p.normal_(0.0, 0.05)
        model.action_mean.copy_(torch.tensor([1.5, 0.3]))
        model.action_std.copy_(torch.tensor([0.4, 0.8]))
        model.state_mean.copy_(torch.tensor([1.5, 0.0]))
        model.state_std.copy_(torch.tensor([0.3, 0.3]))
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
