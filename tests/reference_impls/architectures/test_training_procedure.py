"""Every ``training_procedure`` line reads as the clause the run prints and names what exists.

The run prints "<arch>: in the paper, <line>; this run trains the network on the task losses
only" (train.procedure_note), and the site shows the line beside the code: a capital letter or
a full stop breaks the sentence, and a method or function the line names must be there to call
(``name()`` an attribute of the class, ``module.name()`` a function of that architecture module).
"""

import pytest

from reference_impls.architectures.registry import available, get

from .procedure_names import unresolved_names

FLAGGED = [n for n in available() if get(n).training_procedure]


@pytest.mark.parametrize("name", FLAGGED)
def test_the_line_is_a_clause_naming_what_exists(name):
    line = get(name).training_procedure
    assert line == line.strip() and line[0].islower() and not line.endswith("."), line
    assert unresolved_names(get(name)) == []
