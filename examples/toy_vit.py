"""A small timm-style Vision Transformer whose attention is captured with get_local.

Written like timm's `vision_transformer.py` (Attention, Mlp, Block,
VisionTransformer) so what works here works on the models people use, but
small enough to train in seconds on a CPU. `Attention.forward` carries
`@get_local('attn')` and keeps it during training: while capture is off the
decorator costs nothing.

`fused=True` switches attention to `F.scaled_dot_product_attention`, as timm's
`fused_attn` does: then no `attn` local exists, and only the fused capture
(`visualizer.fused`) can recover the maps.
"""
import torch
import torch.nn.functional as F
from torch import nn

from visualizer import get_local


class Attention(nn.Module):
    def __init__(self, dim, num_heads, fused=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    @get_local("attn")
    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=2.0, fused=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, fused=fused)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding, CLS (+ optional register) tokens, blocks, classifier on CLS.

    Tokens are ordered [CLS, registers..., patches in row-major order], as in
    timm and DINOv2, so `num_prefix_tokens = 1 + num_registers`.
    """

    def __init__(
        self,
        img_size=(32, 32),
        patch_size=4,
        num_classes=3,
        dim=32,
        depth=12,
        num_heads=4,
        num_registers=0,
        fused=False,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_prefix_tokens = 1 + num_registers
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, dim) * 0.02)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, fused=fused) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images):
        patches = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        batch = patches.shape[0]
        prefix = torch.cat(
            [self.cls_token.expand(batch, -1, -1), self.register_tokens.expand(batch, -1, -1)],
            dim=1,
        )
        x = self.blocks(torch.cat([prefix, patches], dim=1))
        return self.head(self.norm(x)[:, 0])
