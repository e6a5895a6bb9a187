"""NeuralMerger: two trained networks share one product-quantisation codebook per aligned layer.

Chou, Chan, Lee, Chiu, Chen, "Unifying and Merging Well-trained Deep Neural Networks for
Inference Stage", IJCAI 2018, arXiv:1805.04980.

Unlike the task-vector methods of this package, the networks merged here need not share a
pre-trained starting point, nor even an architecture: each was trained on its own task.
The method first aligns their layers (a layer of one network is paired with a layer of the
other, or with none), then merges every aligned pair by product quantisation with a shared
codebook, and finally fine-tunes ("calibrates") the shared codewords:

1. Sub-vectors. A weight of shape (out, in, *kernel) is cut along its input channels into
   S segments of r channels; at every (out, kernel position) each segment gives one
   sub-vector of length r (a 1 x 1 x r slice of a convolution kernel, r inputs of a
   fully connected unit).
2. Shared codebook. For each segment s, the sub-vectors of both networks' aligned layers
   are pooled and clustered into K codewords; segment s of every layer in the group uses
   that one codebook. A network's layer is then stored as one codeword index per
   sub-vector, and its weight is read back by looking the codewords up. A layer with fewer
   input channels than its partner simply uses the first segments' codebooks.
3. Calibration. The codewords are trained so that each merged network imitates the
   original: for network k, the mean absolute difference between the merged and original
   output of every layer, summed over layers, plus γ times the cross-entropy on the
   labels (γ = 10); each network's own output layer, not merged, is trained as well.

Sources: the authors' official code (github.com/ivclab/NeuralMerger, README: "Official
implementation of [this paper]") gives the layout of step 1 and the use of the codebooks
in steps 2 and 3: one codebook tensor (segments x codewords x r) per aligned layer, shared
by both networks, a per-network index tensor into it, each network's biases kept as
constants and its output layer left unmerged and trainable, the calibration loss with
γ = 10 (``Fine-tuning/loss.py``), and, for VGG-Avg with ZF-Net, the seven ZF layers
sharing the codebooks of seven of VGG's fifteen quantised layers. That code ships the
codebooks and indices precomputed, so how they are found is not in it: here the pooled
sub-vectors are clustered by k-means (Lloyd's algorithm), the rule of the Q-CNN product
quantisation on which the official inference code is built (``Inference/README`` on the
``yiming-dev`` branch of ivclab/NeuralMerger, commit f33b8b1; on master it says "Coming Soon");
the paper's own clustering may differ in detail.

Left out (with ivclab/NeuralMerger's own quirks: its LeNet merged networks put a ReLU on the
logits the originals do not have, its calibration trains the output layer's weight but not its
bias, and its VGG pair counts pooling outputs as extra layers in the calibration loss): the
choice of which layers to align (given here by the caller), the paper's
two size settings ("ACCU", "LIGHT") and its speed measurements, and the training schedule
of calibration (``calibration_loss`` gives one network's objective; the authors' code
steps one Adam optimiser per network's objective, here any optimiser can minimise them
over ``parameters()``). Our choices: k-means starts from k-means++ seeds drawn with ``seed``
and stops when no assignment changes (or after ``iterations`` rounds), and an emptied
cluster keeps its previous codeword.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.checks import require_positive
from reference_impls.clustering import kmeans


def split_subvectors(weight: Tensor, r: int) -> Tensor:
    """(out, in, *kernel) -> (S, out·kernel, r): segment s holds every r-long slice of
    input channels s·r .. s·r + r − 1, one per output unit and kernel position."""
    if weight.ndim < 2 or weight.shape[1] % r:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} has no input channels divisible by subspace_dim={r}")
    channels_last = weight.movedim(1, -1)  # (out, *kernel, in)
    return channels_last.reshape(-1, weight.shape[1] // r, r).transpose(0, 1)


def join_subvectors(subvectors: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`split_subvectors` for a weight of ``shape``."""
    out, in_channels, *kernel = shape
    channels_last = subvectors.transpose(0, 1).reshape(out, *kernel, in_channels)
    return channels_last.movedim(-1, 1)


def joint_codebook(
    weights: Sequence[Tensor], r: int, k: int, iterations: int, generator: torch.Generator
) -> tuple[Tensor, list[Tensor]]:
    """One aligned group: the shared (S, k, r) codebook and each weight's (S_i, N_i) indices.

    Segment s is clustered over the s-th sub-vectors of every weight that has an s-th
    segment, so both networks' sub-vectors compete for, and shape, the same codewords.
    """
    pieces = [split_subvectors(w, r) for w in weights]
    segments = max(p.shape[0] for p in pieces)
    codebook, indices = [], [[] for _ in pieces]
    for s in range(segments):
        members = [i for i, p in enumerate(pieces) if p.shape[0] > s]
        pooled = torch.cat([pieces[i][s] for i in members])
        if k > len(pooled):
            raise ValueError(f"num_codewords={k} is more than the {len(pooled)} sub-vectors to cluster")
        centers, assignment = kmeans(pooled, k, generator, iterations)
        codebook.append(centers)
        for i, part in zip(members, assignment.split([pieces[i].shape[1] for i in members])):
            indices[i].append(part)
    return torch.stack(codebook), [torch.stack(parts) for parts in indices]


def calibration_loss(
    merged_outputs: Sequence[Tensor],
    original_outputs: Sequence[Tensor],
    labels: Tensor,
    gamma: float = 10.0,
) -> Tensor:
    """One network's calibration objective: Σ_l mean|merged_l − original_l| + γ · CE.

    The last entry of ``merged_outputs`` is the merged network's logits; the originals are
    the layer outputs of the network before merging on the same inputs (targets, no grad).
    """
    if len(merged_outputs) != len(original_outputs):
        raise ValueError("merged and original networks must give the same number of layer outputs")
    layer_gap = sum((m - o.detach()).abs().mean() for m, o in zip(merged_outputs, original_outputs))
    return layer_gap + gamma * F.cross_entropy(merged_outputs[-1], labels)


def _key(name: str) -> str:
    return name.replace(".", "__")  # parameter names may not contain dots


class NeuralMerger(nn.Module):
    """Networks given as state dicts, merged group by group into shared codebooks.

    ``groups[g][k]`` names the weight of network k that joins codebook g (None where
    network k has no layer in that group). Entries named in ``tune`` (each network's
    output layer in the paper) stay unmerged and trainable; every other unmerged entry
    (biases, say) is kept fixed. :meth:`state_dict_of` gives network k's parameters, its
    merged weights read from the codebooks, ready for ``torch.func.functional_call``.
    """

    name = "neural_merger"

    def __init__(
        self,
        state_dicts: Sequence[Mapping[str, Tensor]],
        groups: Sequence[Sequence[str | None]],
        subspace_dim: int,
        num_codewords: int,
        tune: Sequence[str] = (),
        iterations: int = 50,
        seed: int = 0,
    ):
        super().__init__()
        require_positive(subspace_dim=subspace_dim, num_codewords=num_codewords, iterations=iterations)
        if not state_dicts or any(len(g) != len(state_dicts) for g in groups):
            raise ValueError("every group needs one name (or None) per network")
        generator = torch.Generator().manual_seed(seed)
        self.merged_names: list[dict[str, int]] = [{} for _ in state_dicts]  # name -> group
        self.shapes: list[dict[str, torch.Size]] = [{} for _ in state_dicts]
        self.codebooks = nn.ParameterList()
        for g, group in enumerate(groups):
            members = [(k, n) for k, n in enumerate(group) if n is not None]
            if not members:
                raise ValueError(f"group {g} names no layer")
            weights = [state_dicts[k][n].detach() for k, n in members]
            codebook, indices = joint_codebook(weights, subspace_dim, num_codewords, iterations, generator)
            self.codebooks.append(nn.Parameter(codebook))
            for (k, n), index in zip(members, indices):
                self.merged_names[k][n] = g
                self.shapes[k][n] = state_dicts[k][n].shape
                self.register_buffer(f"index_{k}_{_key(n)}", index)
        self.tuned = nn.ModuleList(nn.ParameterDict() for _ in state_dicts)
        self.fixed = nn.ModuleList(nn.Module() for _ in state_dicts)
        self.extra: list[dict[str, object]] = [{} for _ in state_dicts]  # entries that are no tensor
        for k, sd in enumerate(state_dicts):
            for n, value in sd.items():
                if n in self.merged_names[k]:
                    continue
                if not isinstance(value, Tensor):  # a module's extra state (PathNet's pathways)
                    self.extra[k][n] = value
                    continue
                if n in tune:
                    self.tuned[k][_key(n)] = nn.Parameter(value.detach().clone())
                else:
                    self.fixed[k].register_buffer(_key(n), value.detach().clone())

    def merged_weight(self, k: int, name: str) -> Tensor:
        """Network k's weight ``name``, each sub-vector replaced by its shared codeword."""
        codebook = self.codebooks[self.merged_names[k][name]]
        index = getattr(self, f"index_{k}_{_key(name)}")
        segments = torch.arange(index.shape[0], device=index.device).unsqueeze(1)
        return join_subvectors(codebook[segments, index], self.shapes[k][name])

    def state_dict_of(self, k: int) -> dict[str, Tensor]:
        """Every parameter of network k: merged weights, tuned and fixed entries."""
        merged = {n: self.merged_weight(k, n) for n in self.merged_names[k]}
        tuned = {n.replace("__", "."): p for n, p in self.tuned[k].items()}
        fixed = {n.replace("__", "."): b for n, b in self.fixed[k].named_buffers()}
        return {**self.extra[k], **merged, **tuned, **fixed}

    def stored_size(self) -> int:
        """Numbers kept for the merged layers: shared codewords plus one index per sub-vector
        and network (what the merge saves against storing each network's weights)."""
        codewords = sum(c.numel() for c in self.codebooks)
        indices = sum(b.numel() for n, b in self.named_buffers() if n.startswith("index_"))
        return codewords + indices

