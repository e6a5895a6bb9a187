"""3D-aware regularisation: shared features lifted to a tri-plane field and volume-rendered per task.

Li, McDonagh, Leonardis & Bilen, "Multi-task Learning with 3D-Aware Regularization",
ICLR 2024, arXiv:2310.00986 (github.com/VICO-UoE/3DAwareMTL; the repository held only a
licence when it was read, so this file follows the paper's description as quoted in its
public ICLR reviews and summaries, not its code).

A vanilla multi-task network predicts ``y_t = h_t(f(I))``: a shared encoder ``f`` and one
decoder ``h_t`` per task. Its cross-task correlations live in an unstructured 2D feature
space. The paper adds, *during training only*, a branch that forces ``f(I)`` to describe a
3D scene from which every task's output can be rendered:

1. **Tri-plane lifting.** A light encoder ``e`` maps the shared feature map ``f(I)`` to three
   axis-aligned feature planes ``P_xy, P_xz, P_yz`` (the EG3D tri-plane). A 3D point
   ``p = (x, y, z)`` in the box ``[-1, 1]^3`` gets the feature

       F(p) = P_xy(x, y) + P_xz(x, z) + P_yz(y, z)        (bilinear look-ups, summed)

2. **Task fields.** A light task-specific MLP ``n_t`` maps ``F(p)`` to a density
   ``sigma_t(p) >= 0`` and a task vector ``v_t(p)`` (``out_dims[t]`` channels).
3. **Rendering.** Each output pixel casts one camera ray; ``N`` points ``p_k`` at depths
   ``z_k`` along it are decoded and composited with the volume rendering equation

       w_k = T_k (1 - exp(-sigma_k delta)),   T_k = exp(-sum_{j<k} sigma_j delta)
       g_t(I)[pixel] = sum_k w_k v_t(p_k),     depth_t[pixel] = sum_k w_k z_k

   The paper assumes a camera looking orthogonally at the image centre and a rendering
   function that does not take the viewpoint (as its reviewers quote it): here an
   orthographic camera whose ray through pixel ``(i, j)`` is the line ``x = x_j, y = y_i``
   through the box, from ``z = -1`` (near) to ``z = 1`` (far). An optional rigid pose
   ``p_world = R p_cam + t`` renders the same field from another view (the paper's cross-view
   variant renders a second frame with its relative camera pose).
4. **Objective** (the paper's training loss as its reviewers write it; the numbered text of
   the paper was not available, so no equation numbers are cited here):

       L = sum_t L_t(h_t(f(I)), y_t) + alpha_t * L_t(g_t(f(I)), y_t)

   The rendered predictions are scored by each task's own loss against the same labels, so
   the gradient of the second term reaches ``f`` only through the 3D field. At inference the
   branch (``e``, ``n_t``, the renderer) is dropped: :meth:`forward` never runs it.

Implemented at small scale: a small convolutional ``f`` at input resolution with 1x1 heads
``h_t`` (the MTI-Net / InvPT decoders of the paper are left out); the tri-plane encoder is a
1x1 convolution of ``f(I)``, average-pooled by ``render_stride`` (adaptive average pooling
to ``ceil(h / render_stride) x ceil(w / render_stride)``, so windows overlap when the stride
does not divide the size; the paper renders at a fraction of the input size, e.g. 56x72 on
NYUv2), to ``3 * plane_channels`` channels, split
into the three planes; rendered maps are at plane resolution. :meth:`forward_with_intermediate`
returns them so the training harness supervises them (with weight 1: the harness does not
apply ``alpha``); :meth:`objective` is that loss with one ``alpha`` for every task.

Choices where the descriptions available are silent (stated so they can be changed):
the three plane look-ups are summed (EG3D's aggregation); every plane has the pooled feature
map's ``h x w`` grid, the xz plane with rows indexing ``z`` and the yz plane with columns
indexing ``z``; look-ups use pixel centres (``align_corners=False``) and zero features outside
the box; ``N = num_samples`` deterministic samples at the midpoints of equal depth bins (no
stratified jitter, no importance sampling), all with ``delta = 2 / N``, and light left over
(``T_{N+1}``) renders as zero; density is ``softplus`` of the MLP's first output; ``n_t`` has
one hidden ReLU layer of ``plane_channels`` units. Whether density is per task or shared
reads both ways in the sources; per task is the default (the rendering function "takes only
the output of n_t"), ``shared_density=True`` uses one density MLP for all tasks.

Left out: pretrained HRNet / ViT backbones, NYUv2 and PASCAL-Context, the training schedule,
the cross-validated per-task ``alpha_t`` values, the cross-view training with COLMAP poses
on video frames (only the posed renderer is here), any super-resolution of rendered maps.
Images only: a vector input has no image plane to lift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_at_least, require_positive
from .base import MultiTaskModel
from .bilinear import grid_sample
from .encoders import ConvEncoder, image_head
from .registry import Problem

#: Decodes tri-plane features ``(..., P)`` to ``(density (...), task vector (..., C))``.
FieldDecoder = Callable[[Tensor], tuple[Tensor, Tensor]]


def pixel_centres(n: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Centres of ``n`` equal cells of ``[-1, 1]``: ``-1 + (2i + 1) / n``."""
    return -1.0 + (2.0 * torch.arange(n, device=device, dtype=dtype) + 1.0) / n


def orthographic_rays(height: int, width: int, num_samples: int, rotation: Tensor | None = None,
                      translation: Tensor | None = None, *, device: torch.device,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """Sample points of one ray per pixel: ``(points (h, w, N, 3), camera depths (N,), delta)``.

    In camera coordinates the ray of pixel ``(i, j)`` is ``x = x_j, y = y_i`` (pixel centres
    of ``[-1, 1]``) and its samples sit at the bin midpoints ``z_k`` of ``[-1, 1]``: parallel
    rays, viewing along ``+z``. ``rotation`` (3x3) and ``translation`` (3,) move the camera:
    ``p_world = R p_cam + t``.
    """
    ys = pixel_centres(height, device=device, dtype=dtype)
    xs = pixel_centres(width, device=device, dtype=dtype)
    zs = pixel_centres(num_samples, device=device, dtype=dtype)
    y, x, z = torch.meshgrid(ys, xs, zs, indexing="ij")
    points = torch.stack([x, y, z], dim=-1)
    if rotation is not None:
        points = points @ rotation.to(points).T
    if translation is not None:
        points = points + translation.to(points)
    return points, zs, 2.0 / num_samples


def sample_triplane(planes: Tensor, points: Tensor) -> Tensor:
    """``F(p) = P_xy(x, y) + P_xz(x, z) + P_yz(y, z)``, bilinear, zero outside the box.

    ``planes``: ``(B, 3, P, h, w)`` in the order xy (rows y, columns x), xz (rows z,
    columns x), yz (rows y, columns z). ``points``: ``(..., 3)``, shared by the batch.
    Returns ``(B, ..., P)``.
    """
    b, _, p = planes.shape[:3]
    flat = points.reshape(1, 1, -1, 3).expand(b, 1, -1, 3)
    x, y, z = flat.unbind(-1)
    # grid_sample reads (column coordinate, row coordinate), as F.grid_sample does
    grids = (torch.stack([x, y], -1), torch.stack([x, z], -1), torch.stack([z, y], -1))
    feature = sum(grid_sample(planes[:, i], grid, "zeros") for i, grid in enumerate(grids))
    return feature.squeeze(2).transpose(1, 2).reshape(b, *points.shape[:-1], p)


def volume_render(sigma: Tensor, values: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """Composite samples front to back: ``(sum_k w_k v_k, w)``.

    ``sigma``: ``(..., N)`` densities, ``values``: ``(..., N, C)``; ``w_k = T_k (1 - e^{-sigma_k
    delta})`` with ``T_k = exp(-sum_{j<k} sigma_j delta)``.
    """
    optical = sigma * delta
    transmittance = torch.exp(-(torch.cumsum(optical, dim=-1) - optical))  # exclusive sum: j < k
    weights = transmittance * (1.0 - torch.exp(-optical))
    return (weights.unsqueeze(-1) * values).sum(dim=-2), weights


class Rendering(NamedTuple):
    """One task's rendered view: ``map (B, C, h, w)``, ray weights ``(B, h, w, N)``, and the
    expected camera depth ``(B, h, w)`` of the surface it sees."""

    map: Tensor
    weights: Tensor
    depth: Tensor


def render_field(planes: Tensor, decoders: Mapping[str, FieldDecoder], num_samples: int,
                 rotation: Tensor | None = None, translation: Tensor | None = None) -> dict[str, Rendering]:
    """Render every task's field of the tri-plane ``planes`` with the (posed) orthographic camera."""
    height, width = planes.shape[-2:]
    points, depths, delta = orthographic_rays(height, width, num_samples, rotation, translation,
                                              device=planes.device, dtype=planes.dtype)
    features = sample_triplane(planes, points)  # (B, h, w, N, P), decoded once per task below
    renderings = {}
    for task, decode in decoders.items():
        sigma, values = decode(features)
        rendered, weights = volume_render(sigma, values, delta)
        renderings[task] = Rendering(rendered.permute(0, 3, 1, 2), weights, (weights * depths).sum(-1))
    return renderings


def _light_mlp(width: int, out: int) -> nn.Sequential:
    """``n_t``: one hidden ReLU layer, as light as the field decoders of tri-plane renderers."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))


class ThreeDAwareMTL(MultiTaskModel):
    """``h_t(f(I))`` at inference; in training also ``g_t(f(I))`` rendered from a tri-plane of ``f(I)``."""

    name = "three_d_aware"

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: Mapping[str, int], channels: int = 16,
                 depth: int = 2, plane_channels: int = 8, num_samples: int = 16, render_stride: int = 2,
                 alpha: float = 1.0, shared_density: bool = False, dense: bool = True):
        super().__init__(tasks)
        require_positive(in_channels=in_channels, channels=channels, depth=depth, plane_channels=plane_channels,
                         num_samples=num_samples, render_stride=render_stride)
        require_at_least(0, alpha=alpha)  # 0 is vanilla MTL; a negative weight rewards rendering badly
        self.out_dims = {t: out_dims[t] for t in self.tasks}
        self.plane_channels, self.num_samples, self.render_stride = plane_channels, num_samples, render_stride
        self.alpha, self.shared_density, self.dense = alpha, shared_density, dense
        # the vanilla multi-task network: shared f, task decoders h_t
        self.encoder = ConvEncoder(in_channels, (channels,) * depth)
        self.heads = nn.ModuleDict({t: image_head(channels, self.out_dims[t], dense) for t in self.tasks})
        # the regulariser: tri-plane encoder e, task fields n_t (and a shared density MLP if asked)
        self.to_planes = nn.Conv2d(channels, 3 * plane_channels, 1)
        own_density = 0 if shared_density else 1
        self.fields = nn.ModuleDict({t: _light_mlp(plane_channels, own_density + self.out_dims[t])
                                     for t in self.tasks})
        self.density = _light_mlp(plane_channels, 1) if shared_density else None

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> ThreeDAwareMTL:
        if not problem.is_image:
            raise ValueError("the 3D-aware regulariser lifts an image feature map to a tri-plane; "
                             "it needs image inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.out_dims, channels=width,
                   dense=problem.dense, **kwargs)

    # -- the network kept at inference ----------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)  # f(I)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](z) for t in self.tasks}  # h_t(f(I))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Inference: the regulariser is discarded, so only ``h_t(f(I))`` runs."""
        return self.decode(self.encode(x))

    # -- the training-only 3D-aware branch -------------------------------------------------------

    def triplane(self, z: Tensor) -> Tensor:
        """``e(f(I))``: ``(B, 3, P, h, w)`` planes xy, xz, yz at ``1 / render_stride`` resolution."""
        height, width = z.shape[-2:]
        size = (-(-height // self.render_stride), -(-width // self.render_stride))  # ceil: any image size
        planes = self.to_planes(F.adaptive_avg_pool2d(z, size))
        return planes.reshape(z.shape[0], 3, self.plane_channels, *size)

    def _decoder(self, task: str) -> FieldDecoder:
        def decode(features: Tensor) -> tuple[Tensor, Tensor]:
            out = self.fields[task](features)
            if self.density is not None:
                return F.softplus(self.density(features).squeeze(-1)), out
            return F.softplus(out[..., 0]), out[..., 1:]
        return decode

    def render(self, z: Tensor, rotation: Tensor | None = None,
               translation: Tensor | None = None) -> dict[str, Rendering]:
        """``g_t``: every task rendered from the tri-plane of the shared features ``z = f(I)``."""
        return render_field(self.triplane(z), {t: self._decoder(t) for t in self.tasks}, self.num_samples,
                            rotation, translation)

    def forward_with_intermediate(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(h_t(f(I)), rendered maps g_t(f(I)) at plane resolution)``; training supervises both."""
        return self.decode_with_intermediate(self.encode(x))

    def decode_with_intermediate(self, z: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The same from ``z = f(I)``: the training loop's route for the methods that read z
        (Rep-MTL, MGDA-UB), which would otherwise skip the renderer."""
        return self.decode(z), {t: r.map for t, r in self.render(z).items()}

    def rendered_as_outputs(self, rendered: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Rendered maps in the outputs' form: resized to a dense output, averaged for a pooled one."""
        shaped = {}
        for t in self.tasks:
            r, o = rendered[t], outputs[t]
            shaped[t] = (F.interpolate(r, size=o.shape[-2:], mode="bilinear", align_corners=False)
                         if o.dim() == 4 else r.mean(dim=(2, 3)))
        return shaped

    def objective(self, x: Tensor, targets: Mapping[str, Tensor],
                  losses: Mapping[str, Callable[[Tensor, Tensor], Tensor]]) -> Tensor:
        """``sum_t L_t(h_t(f(I)), y_t) + alpha * L_t(g_t(f(I)), y_t)`` over the tasks with a target."""
        outputs, rendered = self.forward_with_intermediate(x)
        shaped = self.rendered_as_outputs(rendered, outputs)
        terms = [losses[t](outputs[t], targets[t]) + self.alpha * losses[t](shaped[t], targets[t])
                 for t in self.tasks if t in targets]
        return torch.stack(terms).sum()

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """``h_t`` and the task's field ``n_t``; ``f``, ``e`` and a shared density are shared."""
        yield from self.heads[task].parameters()
        yield from self.fields[task].parameters()
