"""The 3D ViT shared by `vit3d` and `m3d_clip`, built from MONAI blocks.

Module and parameter names are those of M3D's `ViT` (itself MONAI's), so M3D-CLIP's released
vision weights load by name: `patch_embedding.patch_embeddings.1.*` (linear patch embedding,
MONAI `perceptron`), `patch_embedding.position_embeddings`, `cls_token`, `blocks.N.norm1`,
`blocks.N.attn.qkv`, `blocks.N.attn.out_proj`, `blocks.N.norm2`, `blocks.N.mlp.linear1/2`.
Position embeddings are added to the patch tokens before the CLS token is prepended (the CLS
token has none), as in M3D. Attention runs through PyTorch SDPA (`use_flash_attention=True`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medmvl_cli.errors import ModelError


def _require_einops() -> None:
    # MONAI's attention and patch-embedding blocks rearrange tensors with einops.
    try:
        import einops  # noqa: F401
    except ImportError:
        raise ModelError(
            "the 3D ViT encoders (vit3d, m3d_clip) need the `einops` package, which is not installed",
            hint="pip install einops",
        ) from None


class MonaiViT3d(nn.Module):
    """Patch embedding -> [CLS] -> transformer blocks. Input (N, C, D, H, W); see `hidden_states`."""

    def __init__(
        self,
        img_size: Sequence[int],
        patch_size: Sequence[int],
        hidden_size: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        in_channels: int = 1,
        cls_token: bool = True,
        qkv_bias: bool = False,
    ):
        super().__init__()
        _require_einops()
        from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock

        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=in_channels, img_size=tuple(img_size), patch_size=tuple(patch_size),
            hidden_size=hidden_size, num_heads=num_heads, proj_type="perceptron",
            pos_embed_type="learnable", dropout_rate=0.0, spatial_dims=3,
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, 0.0, qkv_bias, use_flash_attention=True)
            for _ in range(num_layers)
        )
        for block in self.blocks:
            # MONAI >= 1.4 always creates a cross-attention norm; without cross-attention it is
            # never used, and M3D's checkpoints (MONAI 1.3) do not have it.
            block.norm_cross_attn = nn.Identity()
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.grid = tuple(s // p for s, p in zip(img_size, patch_size))
        self.gradient_checkpointing = False

    def init_own_weights(self, std: float) -> None:
        """The ViT init (MONAI's, timm's): every linear layer N(0, std), biases zero; called by
        `MedmvlPreTrainedModel._init_weights` after the children's fan-in init. With the fan-in init
        the blocks' residual branches start ~3x larger than the patch embedding and add one vector
        common to all tokens (attention at init averages them), burying the per-patch signal at the
        selected layer."""
        from transformers import initialization as init

        for linear in self.modules():
            if isinstance(linear, nn.Linear):
                init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-2.0, b=2.0)
                if linear.bias is not None:
                    init.zeros_(linear.bias)
        init.trunc_normal_(self.patch_embedding.position_embeddings, mean=0.0, std=std, a=-2.0, b=2.0)
        if hasattr(self, "cls_token"):
            init.zeros_(self.cls_token)

    def hidden_states(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        """(N, C, D, H, W) -> hidden state number `upto` (0 = embeddings after the CLS token is
        prepended, k = output of block k), shape (N, [1 +] gd*gh*gw, hidden). Blocks after `upto`
        are not run."""
        x = self.patch_embedding(x)
        if hasattr(self, "cls_token"):
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks[:upto]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block.__call__, x)
            else:
                x = block(x)
        return x
