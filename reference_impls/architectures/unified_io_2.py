"""Unified-IO 2: Unified-IO with rotary 1D/2D positions and normalised queries and keys.

Lu, Clark, Lee, Zhang, Khosla, Marten, Hoiem, Kembhavi. "Unified-IO 2: Scaling
Autoregressive Multimodal Models with Vision, Language, Audio, and Action", CVPR 2024
(arXiv:2312.17172).

Unified-IO 2 keeps Unified-IO's recipe (:mod:`.unified_io`): every input and output is a
token sequence in a shared space, one encoder-decoder transformer, the task named by a
prompt, causal decoding. To keep training stable once images, audio and actions are mixed,
it changes the transformer itself (Sec. 3.2 and App. B.2, which describe these changes in
words and number no equations); the two that show at small scale are implemented here:

    rotary positions   no absolute position vectors; queries and keys are rotated in every
                       attention layer. Text tokens use 1D rotary embeddings; image tokens
                       use 2D ones: half of each head's features rotate with the patch row,
                       half with the column (as in the official code's
                       ``build_llama_rope_cache_2d``), so attention between two patches
                       depends on their 2D offset, not on where they sit (tested)
    QK normalisation   LayerNorm on each head's queries and keys before the dot product,
                       which bounds the attention logits whatever the scale of the
                       projections (tested)

Positions are rotated in cross-attention too, as in the official decoder
(``t5x/examples/unified_io/network.py``): its queries turn by the decoder's angles and its
keys by the encoder's, so an image-code answer patch meets each input patch by their 2D
offset (that every decoding route passes both sets of angles is tested).

Left out: the other modalities (audio, video, actions) and their pretrained encoders,
the perceiver resampler for image/audio history (with its scaled cosine attention),
dynamic packing of several examples into one sequence (a training-throughput device), the
multimodal mixture-of-denoisers pre-training objective, the ViT-VQGAN detokeniser
(here Unified-IO's fixed random codebook), and the 120-dataset instruction tuning.
No equation numbers are cited: Sec. 3 and App. B of arXiv:2312.17172v1, the version
read, state the method without numbered equations. Checked against allenai/unified-io-2 at
502ac4d (and its PyTorch port): the 2D rotary layout and the QK norm before rotation match;
there the QK norm is an RMSNorm, each modality has a learned embedding, and each modality
keeps its own vocabulary and output head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .unified_io import UnifiedIO


def rotary_1d(positions: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """Angles (N, head_dim / 2): position p turns feature pair i by p * base^(-2i / head_dim)."""
    freqs = base ** (-torch.arange(0, head_dim, 2, device=positions.device) / head_dim)
    return positions.float()[:, None] * freqs


def rotary_2d(grid: tuple[int, int], head_dim: int, device: torch.device) -> Tensor:
    """Angles (H W, head_dim / 2): first half of the pairs follow the row, second the column."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device),
                                torch.arange(grid[1], device=device), indexing="ij")
    half = head_dim // 2
    return torch.cat([rotary_1d(rows.flatten(), half), rotary_1d(cols.flatten(), half)], dim=-1)


class UnifiedIO2(UnifiedIO):
    """Unified-IO with QK-normalised attention and 1D/2D rotary positions."""

    name = "unified_io_2"
    equations_checked_in = "arXiv:2312.17172v1"
    qk_norm = True

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        if self.encoder[0].self_attention.head_dim % 4:
            raise ValueError("2D rotary embeddings need a head dimension divisible by 4")
        # Rotary positions replace every absolute position vector.
        for owner, attr in ((self.inputs, "positions"), (self, "prompt_positions"), (self, "target_positions")):
            zeros = torch.zeros_like(getattr(owner, attr))
            delattr(owner, attr)
            owner.register_buffer(attr, zeros)

    @property
    def head_dim(self) -> int:
        return self.encoder[0].self_attention.head_dim

    def token_angles(self, offset: int = 0) -> Tensor:
        """Angles of the input (or answer) tokens: 2D over the patch grid, else 1D."""
        device = self.bin_centres.device
        if self.inputs.grid is not None:
            return rotary_2d(self.inputs.grid, self.head_dim, device)
        return rotary_1d(torch.arange(self.inputs.length, device=device) + offset, self.head_dim)

    def encoder_angles(self, prompt_length: int) -> Tensor:
        device = self.bin_centres.device
        text = rotary_1d(torch.arange(prompt_length, device=device), self.head_dim)
        return torch.cat([text, self.token_angles(offset=prompt_length)])

    def decoder_angles(self, length: int) -> Tensor:
        if self.dense:  # answers are image codes laid out on the patch grid
            return self.token_angles()[:length]
        return rotary_1d(torch.arange(length, device=self.bin_centres.device), self.head_dim)
