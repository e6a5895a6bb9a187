"""ESMM: click-through and conversion estimated together over every impression.

Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, "Entire Space Multi-Task Model: An Effective Approach
for Estimating Post-Click Conversion Rate", SIGIR 2018 (arXiv:1804.07931), Sec. 2.
Conversion z can only follow a click y, so over all impressions x

    p(y=1, z=1 | x) = p(y=1 | x) * p(z=1 | y=1, x)          Eq. (1)
         pCTCVR     =   pCTR    *      pCVR

A conversion model trained on clicked impressions only sees a biased sample of the space
it is later applied to. ESMM instead supervises pCTR and the product pCTCVR, both defined
on every impression (loss of Eq. (3), :func:`entire_space_loss`); pCVR is an unsupervised
intermediate factor, and dividing instead (Eq. (2)) is avoided because small pCTR makes
the ratio unstable. The CTR and CVR towers read one shared embedding, so the rare
conversion signal borrows the representation learned from plentiful clicks.

Task mapping: the model has exactly two outputs, named after the problem's first and
second task. The first is pCTR, the second pCTCVR = pCTR * pCVR, both given as *logits*,
the repository's form for a binary output (the training loop scores them with
cross-entropy on logits and its accuracy thresholds them at 0): logit(pCTCVR) is computed
from log-sigmoids, so it stays finite where the product underflows or rounds to 1.
:meth:`ESMM.probabilities` gives the three probabilities. Both tasks need the same output
width (each channel is one binary event); the dense benchmark problem (5 and 1 channels) is
rejected for that reason.
The "embedding" of dense features is a bias-free linear map (per pixel for images),
which is what a lookup table applied to one-hot fields computes.

Left out: sparse categorical fields and their lookup tables (inputs here are dense), the
paper's 360-200-80 tower sizes and the Taobao data. Checked against the authors' XDL script
(alibaba/x-deeplearning at a710108, xdl-algorithm-solution/ESMM/script/esmm.py): the shared
embedding, pCTCVR = pCTR * pCVR and a loss without a CVR-only term match; its towers have two
hidden layers with PReLU (one with ReLU here) and end in two logits and a softmax (one logit
and a sigmoid here, the same family), and its loss is averaged over the batch, a constant
factor from the sum here.

Equation numbers were checked in the arXiv:1804.07931v2 text of wzhe06/Ad-papers (24 Apr
2018, 4 pages carrying the SIGIR '18 notice; file "Deep Learning CTR Prediction/[ESMM] Entire
Space Multi-Task Model - An Effective Approach for Estimating Post-Click Conversion Rate
(Alibaba 2018).pdf", commit c840cfc): Eq. (1) is the product above, Eq. (2) the quotient
pCVR = pCTCVR / pCTR (the DIVISION baseline), Eq. (3) the sum over all N impressions of
l(y_i, f(x_i; theta_ctr)) + l(y_i & z_i, f(x_i; theta_ctr) * f(x_i; theta_cvr)) with l the
cross-entropy, as computed here. (Sec. 2.1 of that text writes pCTR as p(z = 1 | x), a
misprint for p(y = 1 | x), which Eq. (1) uses.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import MultiTaskModel
from .encoders import ChannelLinear, conv_block, conv_head, mlp_head, pooled_head


def tower_for(problem, width: int, out_dim: int) -> nn.Module:
    """A tower with one hidden layer (ESMM's CTR and CVR networks share this structure)."""
    if not problem.is_image:
        return mlp_head(width, out_dim, hidden_dims=(width,))
    if problem.dense:
        return conv_head(width, out_dim, hidden_channels=width)
    return nn.Sequential(conv_block(width, width), pooled_head(width, out_dim))


class ESMM(MultiTaskModel):
    """Shared embedding; logits of pCTR (first task) and pCTCVR = pCTR * pCVR (second task)."""

    name = "esmm"
    equations_checked_in = "arXiv:1804.07931v2 text of wzhe06/Ad-papers"

    def __init__(self, tasks: Sequence[str], embedding: nn.Module,
                 ctr_tower: nn.Module, cvr_tower: nn.Module):
        super().__init__(tasks)
        if len(self.tasks) != 2:
            raise ValueError(f"ESMM predicts exactly two tasks (CTR, CTCVR), got {list(self.tasks)}")
        self.ctr_task, self.ctcvr_task = self.tasks
        self.embedding = embedding
        self.ctr_tower = ctr_tower
        self.cvr_tower = cvr_tower

    @classmethod
    def from_problem(cls, problem, width: int = 16) -> "ESMM":
        if len(problem.tasks) != 2:
            raise ValueError(f"ESMM needs a two-task problem (CTR, CTCVR), got {problem.tasks}")
        dims = problem.task_out_dims
        ctr_dim, ctcvr_dim = dims[problem.tasks[0]], dims[problem.tasks[1]]
        if ctr_dim != ctcvr_dim:
            raise ValueError(f"ESMM needs equal output widths for CTR and CTCVR "
                             f"(pCTCVR = pCTR * pCVR per channel), got {ctr_dim} and {ctcvr_dim}")
        embedding = ChannelLinear(problem.input_shape[0], width, bias=False)
        return cls(problem.tasks, embedding, tower_for(problem, width, ctr_dim),
                   tower_for(problem, width, ctr_dim))

    def factors(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """pCTR and pCVR from the shared embedding ``z``."""
        return torch.sigmoid(self.ctr_tower(z)), torch.sigmoid(self.cvr_tower(z))

    def probabilities(self, x: Tensor) -> dict[str, Tensor]:
        """pCTR, pCVR and pCTCVR; pCVR is the factor no loss term sees directly."""
        p_ctr, p_cvr = self.factors(self.encode(x))
        return {"ctr": p_ctr, "cvr": p_cvr, "ctcvr": p_ctr * p_cvr}  # Eq. (1)

    def encode(self, x: Tensor) -> Tensor:
        return self.embedding(x)  # the shared embedding both towers read

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """Logits of pCTR and of pCTCVR = pCTR * pCVR (Eq. (1), multiplied in log space)."""
        ctr, cvr = self.ctr_tower(z), self.cvr_tower(z)
        return {self.ctr_task: ctr, self.ctcvr_task: logit_of_product(ctr, cvr)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # pCTR enters both outputs, so the CTR tower is shared; only pCVR is CTCVR's alone.
        if task == self.ctcvr_task:
            yield from self.cvr_tower.parameters()


def logit_of_product(a: Tensor, b: Tensor) -> Tensor:
    """logit(sigmoid(a) * sigmoid(b)) = log p - log(1 - p), both terms from log-sigmoids.

    log p = log sigmoid(a) + log sigmoid(b), and 1 - p = sigmoid(-a) + sigmoid(a) sigmoid(-b)
    (no click, or a click without conversion), so log(1 - p) is a log-sum-exp of log-sigmoids:
    finite when p underflows and when both factors round to 1 (1 - e^{log p} would be 0 there).
    """
    log_p = F.logsigmoid(a) + F.logsigmoid(b)
    log_not_p = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(a) + F.logsigmoid(-b))
    return log_p - log_not_p


def entire_space_loss(outputs: dict[str, Tensor], ctr_task: str, ctcvr_task: str,
                      click: Tensor, click_and_conversion: Tensor) -> Tensor:
    """Eq. (3): cross-entropy of pCTR against y plus of pCTCVR against y & z, over all impressions.

    ``outputs`` are the model's logits. Summed over examples as in the paper; there is no term
    with a conversion label alone. Labels may be soft (probabilities) as well as 0/1.
    """
    ctr = F.binary_cross_entropy_with_logits(outputs[ctr_task], click, reduction="sum")
    ctcvr = F.binary_cross_entropy_with_logits(outputs[ctcvr_task], click_and_conversion, reduction="sum")
    return ctr + ctcvr
