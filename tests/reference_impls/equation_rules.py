"""Sentence patterns shared by the tests that hold docstrings to where their equation numbers come from."""

from __future__ import annotations

import re

CITES_A_NUMBER = re.compile(r"\bEqs?\.\s*\(?\d|\bEquations?\s*\(?\d")
_UNCHECKED = r"(?:not|never) (?:be )?(?:checked|verified|cited|quoted|read)|unchecked"
# "... equation numbers were not checked", "Equations are not cited by number: ...": one sentence.
SAYS_UNCHECKED = re.compile(rf"(?:equation|number)[^.]*?(?:{_UNCHECKED})|(?:{_UNCHECKED})[^.]*?(?:equation|number)",
                            re.IGNORECASE)
# "Equation numbers were checked in a Markdown conversion of ...", "Equation numbers are those of ...".
NAMES_A_TEXT = re.compile(r"(?:equation|number)s?\b[^.]*?(?:checked in|are those of|match(?:ed)? it)",
                          re.IGNORECASE)
