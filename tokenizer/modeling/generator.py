"""The causal token generator: GPT-NeoX over `[proj(H_v) ; H_q ; t_1..t_N]` in one forward pass.

Each timestep slot t_i reads the whole image (and the query) plus t_1..t_{i-1}, so token z_i never
depends on how many tokens are eventually kept: every length is a prefix of the same sequence, and
choosing the length costs nothing beyond this one pass.

Queries of different lengths are left-padded inside their segment; position ids skip the padding, so a
sample's tokens in a batch equal its tokens alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXModel

from .config import DoveConfig


def sinusoidal_encoding(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The transformer's fixed sin/cos table for positions 1..length, [length, dim], fp32."""
    positions = torch.arange(1, length + 1, device=device, dtype=torch.float32).unsqueeze(1)
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = positions * frequencies.unsqueeze(0)
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(length, 1, device=device)], dim=1)
    return table


def initial_eos_bias(max_tokens: int, threshold: float) -> float:
    """The EOS logit a fresh head gives every position: end probability 1/N, and below the threshold.

    With the head's weights at zero every position reads this bias, so nothing passes the threshold and
    every image starts at all N tokens. How far below matters little for learning: a sample that beats
    the length-control threshold pushes its logit up with gradient 1 - sigmoid(bias), close to 1 for any
    negative bias, and the zero weights start learning from the first step. 1/N keeps the EOS
    probabilities summed over the sequence near 1; the bias is in any case at least one logit below the
    threshold's.
    """
    return min(math.log(1.0 / max(max_tokens - 1, 1)), math.log(threshold / (1.0 - threshold)) - 1.0)


class TokenGenerator(nn.Module):
    def __init__(self, config: DoveConfig, backbone: GPTNeoXModel | None = None) -> None:
        super().__init__()
        self.max_tokens = config.max_tokens
        self.backbone = backbone if backbone is not None else GPTNeoXModel(GPTNeoXConfig(**config.generator))
        hidden = self.backbone.config.hidden_size
        grid_cells = config.grid_size**2
        # Unit-scale inputs on purpose. A freshly initialised transformer adds only small residual updates
        # (weights of std 0.02), so a timestep slot's output is mostly its own input at first; with small
        # visual inputs and large timestep inputs every image got the same tokens and training settled on
        # the mean image. Normalised visual embeddings, unit-scale grid positions and the raw sinusoidal
        # table keep image content and position on one scale from the first step, whatever the VQ's scale.
        self.visual_proj = nn.Linear(config.latent_channels, hidden)
        self.visual_norm = nn.LayerNorm(hidden)
        self.visual_pos = nn.Parameter(torch.randn(grid_cells, hidden))
        # t_i = sinusoid_i + MLP(sinusoid_i); the MLP's last layer starts at zero, so t_i starts as the table.
        self.timestep_proj = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.timestep_proj[-1].weight)
        nn.init.zeros_(self.timestep_proj[-1].bias)
        self.token_head = nn.Linear(hidden, config.token_dim)
        self.eos_head = nn.Linear(hidden, 1)
        # A fresh tokenizer ends at N: a randomly initialised head ends wherever its noise first passes the
        # threshold (at 1 token for dove-tiny), and half of each early batch then trains at that length.
        nn.init.zeros_(self.eos_head.weight)
        nn.init.constant_(self.eos_head.bias, initial_eos_bias(config.max_tokens, config.eos_threshold))

    def embed_query(self, query_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(query_ids)

    def forward(
        self,
        latents: torch.Tensor,
        query_ids: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent grid [B,C,g,g] (+ left-padded query ids [B,Q]) -> tokens [B,N,D] and EOS logits [B,N]."""
        batch = latents.shape[0]
        dtype = self.visual_proj.weight.dtype
        visual = self.visual_norm(self.visual_proj(latents.to(dtype).flatten(2).transpose(1, 2))) + self.visual_pos
        table = sinusoidal_encoding(self.max_tokens, visual.shape[-1], device=latents.device).to(dtype)
        timesteps = (table + self.timestep_proj(table)).unsqueeze(0).expand(batch, -1, -1)
        pieces = [visual]
        masks = [torch.ones(batch, visual.shape[1], dtype=torch.long, device=latents.device)]
        if query_ids is not None and query_ids.shape[1] > 0:
            if query_mask is None:
                query_mask = torch.ones_like(query_ids)
            pieces.append(self.embed_query(query_ids).to(dtype))
            masks.append(query_mask.long())
        pieces.append(timesteps)
        masks.append(torch.ones(batch, self.max_tokens, dtype=torch.long, device=latents.device))
        embeddings = torch.cat(pieces, dim=1)
        attention_mask = torch.cat(masks, dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.backbone(
            inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[:, -self.max_tokens :]
        return self.token_head(hidden), self.eos_head(hidden).squeeze(-1)
