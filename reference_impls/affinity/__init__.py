"""Task affinity and task embeddings: how much tasks help each other, measured, not trained.

Nothing in this package is an architecture or a loss weighting. Each function reads a
model, data or losses and returns a measurement that a person (or a search) uses to decide
which tasks to train together and where to split a shared network:

- a K x K task-affinity matrix, entry ``[i, j]`` saying how much task i helps task j
  (:mod:`transference`: the relative change of task j's loss after a lookahead step on
  task i, Fifty et al. 2020);
- a task embedding, one fixed-length vector per task, and distances between embeddings
  (:mod:`task2vec`: the diagonal Fisher information of a fixed probe network, Achille et
  al. 2019);
- a K x K source-to-target affinity from measured transfer losses, normalised ordinally by
  the Analytic Hierarchy Process, and the budgeted choice of which tasks to supervise
  (:mod:`taskonomy`, Zamir et al. 2018);
- a ranking of tree-structured multi-task architectures scored from per-branch-point
  pairwise measurements (:mod:`tree_recommender`, Zhang et al. 2022).
- affinities estimated from multi-task results on sampled task subsets, and task groups
  from them (:mod:`higher_order_affinity`, Li et al. 2023; :mod:`grad_tag`, which replaces the
  training on each subset by a linearised base model, Li et al. 2024);
- a per-task gain predicted for any group from a gradient affinity score
  (:mod:`etap`, Ayman et al. 2026), and its predecessor, a group's gain predicted from
  single-task and pairwise statistics, steering a randomised search over partitions
  (:mod:`task_grouping_predictor`, Ayman et al. 2023).

Functions take a ``torch.Generator`` where they draw random numbers, follow the device and
dtype of their inputs, and never modify the model they are given.
"""
