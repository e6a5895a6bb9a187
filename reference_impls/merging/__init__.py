"""Model merging: one multi-task model from several single-task fine-tuned models.

Merging methods are neither architectures nor loss weightings: nothing is trained jointly.
Every task ``t`` has been fine-tuned separately from the same pre-trained weights
``θ_pre``; the method only sees what fine-tuning changed.

The contract, shared by every method in this package:

- in: task vectors ``τ_t = θ_t − θ_pre`` (:func:`base.task_vector`), one per task, each
  either a flat tensor or a dict ``{parameter name: tensor}`` with the same keys and
  shapes for every task, plus ``θ_pre`` in the same form;
- out: merged parameters ``θ_pre + τ_m`` in that form (a dict can be loaded with
  ``model.load_state_dict(..., strict=False)`` or evaluated with
  ``torch.func.functional_call``).

Data-free methods (task arithmetic, TIES-Merging) subclass :class:`base.Merging` and map
the K x d stack of flattened task vectors to one merged d-vector ``τ_m``. AdaMerging
learns its coefficients from unlabelled inputs and is an ``nn.Module`` whose only
parameters are those coefficients.

NeuralMerger is the exception to the task-vector contract: it merges networks trained
separately, from no common starting point and possibly of different architectures, so it
takes their state dicts and a pairing of their layers, and shares one quantisation
codebook per pair of layers; its parameters are those codewords.

MC-SGD merges in a continual-learning loop: the previous merged solution plays ``θ_pre`` and
the new task's solution, trained from it, the one fine-tuned model; it takes the two as state
dicts, plus loss functions on a replay memory and on the new task, and its parameters are
the merged weights themselves.
"""
