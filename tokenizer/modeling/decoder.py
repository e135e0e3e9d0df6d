"""The bidirectional token decoder: kept tokens + learned grid queries -> the VQ latent grid.

Padding tokens are masked out of attention, so a prefix of any length decodes, and decoding a batch
equals decoding each image alone.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from .config import DoveConfig


class TokenDecoder(nn.Module):
    def __init__(self, config: DoveConfig) -> None:
        super().__init__()
        width = config.decoder_hidden_size
        self.grid_size = config.grid_size
        self.latent_channels = config.latent_channels
        self.token_in = nn.Linear(config.token_dim, width)
        # Unit-scale position tables: with the usual 0.02 every grid cell starts as the same vector and the
        # decoder needs hundreds of steps before attention tells cells apart (measured on shapes data).
        self.token_pos = nn.Parameter(torch.randn(config.max_tokens, width))
        self.grid_queries = nn.Parameter(torch.randn(config.grid_size**2, width))
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=config.decoder_heads,
            dim_feedforward=int(width * config.decoder_mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, config.decoder_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.latent_out = nn.Linear(width, config.latent_channels)
        self.gradient_checkpointing = False  # set through DoveTokenizer.set_gradient_checkpointing

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens [B,L,D] with mask [B,L] (1 = kept) -> latent grid [B,C,g,g]."""
        batch, length, _ = tokens.shape
        dtype = self.token_in.weight.dtype
        token_states = self.token_in(tokens.to(dtype)) + self.token_pos[:length]
        queries = self.grid_queries.unsqueeze(0).expand(batch, -1, -1)
        states = torch.cat([token_states, queries], dim=1)
        grid_cells = queries.shape[1]
        padding = torch.cat(
            [attention_mask == 0, torch.zeros(batch, grid_cells, dtype=torch.bool, device=tokens.device)], dim=1
        )
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Layer by layer, as nn.TransformerEncoder runs them, each recomputed in the backward pass.
            for layer in self.transformer.layers:
                states = torch.utils.checkpoint.checkpoint(
                    layer, states, src_key_padding_mask=padding, use_reentrant=False
                )
            out = states[:, length:]
        else:
            out = self.transformer(states, src_key_padding_mask=padding)[:, length:]
        latents = self.latent_out(self.norm(out))
        return latents.transpose(1, 2).reshape(batch, self.latent_channels, self.grid_size, self.grid_size)
