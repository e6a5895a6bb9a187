"""Florence-2: a vision encoder feeding a prompted encoder-decoder that writes text and locations.

Xiao, Wu, Xu, Dai, Hu, Lu, Zeng, Liu, Yuan. "Florence-2: Advancing a Unified
Representation for a Variety of Vision Tasks", CVPR 2024 (arXiv:2311.06242).

Florence-2 is a sequence-to-sequence generalist of the same family as Unified-IO
(:mod:`.unified_io`, whose class this one extends): every task is a text prompt, the
answer is a token sequence, one set of weights serves all tasks. At small scale it
differs in two ways, both implemented and tested here:

    vision encoder     the image first goes through its own vision encoder (DaViT in the
                       paper); its visual token embeddings are then concatenated with the
                       embedded prompt and read by the multi-modality encoder-decoder.
                       Unified-IO feeds linearly embedded patches straight into its encoder.
    output vocabulary  text tokens plus location tokens only: coordinates are quantised
                       into bins (1,000 in the paper, ``num_bins`` here) relative to the
                       image size, and boxes, quadrilaterals and polygons are sequences of
                       such tokens. There are no image-code tokens, so a per-pixel map
                       cannot be written; a dense problem is refused with a ValueError
                       (the paper writes masks as polygons, which this small model does not
                       rasterise).

Regression outputs reuse the location bins over [-value_range, value_range], as in our
Unified-IO. The quantisation rule (floor of coord / size x bins; decode to the bin
centre) follows the released processor; the paper only states the binning (Sec. 3,
"Task formulation"). Training uses the paper's Eq. 1, the one numbered formula of its
Sec. 3: the cross-entropy of the target tokens, each predicted from the image, the prompt
and the tokens before it. The inherited :meth:`loss` averages it over the tokens (Eq. 1
sums them) and adds up the tasks. (Checked in a text transcript of arXiv:2311.06242v1.)

Left out: DaViT (here ``vision_depth`` plain transformer blocks over patches) and all
pretrained weights, the BART tokenizer, the FLD-5B data engine and its annotations,
polygon rasterisation for segmentation, region-level prompts with location tokens in the
input, and beam search. The released model (the Hugging Face microsoft/Florence-2 files)
uses BART, with layer norms after each residual and on the embeddings, adds an average-pooled
token, a projection and a layer norm after the vision encoder, and ties its output head to
the token embedding; its location bins, token order and token-averaged loss match ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .registry import Problem
from .unified_io import Block, UnifiedIO


class Florence2(UnifiedIO):
    """Vision encoder -> [prompt; visual tokens] -> encoder-decoder over text + location tokens.

    The paper puts the visual tokens first; the order is inherited from Unified-IO here, and
    with learned positions for each part the encoder's result does not depend on it.
    """

    name = "florence_2"
    equations_checked_in = "a text transcript of arXiv:2311.06242v1"
    training_procedure = ("the network is trained by loss(): teacher-forced cross-entropy of every task's answer "
                          "tokens, which needs the labels as decoder inputs, not by forward's soft decoding")

    def __init__(self, tasks: Sequence[str], input_shape: Sequence[int], out_dims: Mapping[str, int],
                 dense: bool = False, vision_depth: int = 1, **kwargs: object):
        if dense and len(input_shape) == 3:
            raise ValueError("Florence-2 writes text and location tokens only: it has no "
                             "image tokens for a dense per-pixel output (masks are polygons)")
        super().__init__(tasks, input_shape, out_dims, False, **kwargs)
        dim, heads = self.embedding.embedding_dim, self.encoder[0].self_attention.num_heads
        self.vision_encoder = nn.ModuleList(Block(dim, heads, False) for _ in range(vision_depth))

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, **kw: object) -> "Florence2":
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, problem.dense, dim=width, **kw)

    def embed_input(self, x: Tensor) -> Tensor:
        """Visual token embeddings: the vision encoder runs before, and without, the prompt."""
        h = self.inputs(x)
        for block in self.vision_encoder:
            h = block(h)
        return h

    def location_tokens(self, coords: Tensor, size: float) -> Tensor:
        """Coordinates in [0, size] -> location token ids (one bin of size / num_bins each)."""
        num_bins = len(self.bin_centres)
        bins = (coords / size * num_bins).floor().long().clamp(0, num_bins - 1)
        return self.bin_start + bins

    def location_values(self, tokens: Tensor, size: float) -> Tensor:
        """Location token ids -> the centre of their bin, in the image's coordinates."""
        return (tokens - self.bin_start + 0.5) * size / len(self.bin_centres)
