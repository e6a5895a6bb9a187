"""Which architectures still accept a size of 0 and fail late.

    python benchmarks/size_arguments.py

Every integer argument whose default is at least 1 (a width, a rank, a number of experts,
tokens or layers) is set to 0, one at a time, for a vector and a dense-image problem. A good
architecture either refuses the value with a ValueError when it is built or runs a forward
pass with finite outputs (0 layers or 0 shared experts can be meaningful). Everything else
is counted: another error while building, an error in the first forward pass, or a
non-finite output. TypeErrors "got multiple values" (an alias of ``width`` that the small
default already sets) are counted apart. Not a test: the remaining cases are known work.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter

import torch

from reference_impls.architectures import registry

PROBLEMS = {
    "vector": (registry.Problem(("a", "b"), (12,), {"a": 2, "b": 1}), (2, 12)),
    "dense": (registry.Problem(("a", "b"), (3, 8, 8), {"a": 2, "b": 1}, dense=True), (2, 3, 8, 8)),
}


def size_arguments(name: str) -> list[str]:
    """Integer arguments with a default of at least 1, of ``from_problem`` and ``__init__``."""
    cls = registry.get(name)
    found: list[str] = []
    for function in (getattr(cls, "from_problem", None), cls.__init__):
        if function is None:
            continue
        for argument, spec in inspect.signature(function).parameters.items():
            if type(spec.default) is int and spec.default >= 1 and argument != "width" and argument not in found:
                found.append(argument)
    return found


def outcome(name: str, problem: registry.Problem, shape: tuple[int, ...], argument: str) -> str:
    """'refused', 'fine', 'alias', or what went wrong with ``argument`` = 0."""
    torch.manual_seed(0)
    try:
        model = registry.build(name, problem, **{argument: 0})
    except ValueError:
        return "refused"
    except TypeError as error:
        if "unexpected keyword" in str(error):
            return "fine"  # not an argument this route accepts
        return "alias" if "multiple values" in str(error) else "build error"
    except Exception:  # noqa: BLE001 - the point is to count what escapes
        return "build error"
    try:
        finite = all(bool(torch.isfinite(o).all()) for o in model(torch.randn(shape)).values())
    except Exception:  # noqa: BLE001 - includes outputs that are not tensors
        return "forward error"
    return "fine" if finite else "non-finite"


def main() -> None:
    warnings.filterwarnings("ignore")  # zero-size layers warn while they are initialised
    counts: Counter[str] = Counter()
    late: list[str] = []
    for name in registry.available():
        for kind, (problem, shape) in PROBLEMS.items():
            try:
                registry.build(name, problem)
            except ValueError:
                continue  # the architecture refuses this kind of problem
            for argument in size_arguments(name):
                result = outcome(name, problem, shape, argument)
                counts[result] += 1
                if result not in ("refused", "fine", "alias"):
                    late.append(f"{name}.{argument}=0 ({kind}): {result}")
    print(", ".join(f"{key}: {counts[key]}" for key in
                    ("refused", "fine", "alias", "build error", "forward error", "non-finite")))
    print(f"{len(late)} late failures in {len({line.split('.')[0] for line in late})} architectures")
    for line in late:
        print(" ", line)


if __name__ == "__main__":
    main()
