"""Batch-size studies: the source papers' headline experiments, and the default study.

Each study is registered here, by importing its module (a plug-in is imported
explicitly, never discovered): ``largebatch study --list`` shows them. See
:mod:`largebatch.experiments.studies.base` for what a study is and how to add one.
"""

# each import registers a study; the order is that of `largebatch study --list`
from largebatch.experiments.studies import demo  # noqa: F401, I001
from largebatch.experiments.studies import keskar, alto, extrap, shampoo, scaling  # noqa: F401
from largebatch.experiments.studies import classical  # noqa: F401
from largebatch.experiments.studies import decentralized  # noqa: F401
from largebatch.experiments.studies.base import (
    Grid,
    Part,
    Study,
    StudyContext,
    StudyError,
    Tuned,
    get_study,
    list_studies,
    register,
    run_study,
)

__all__ = [
    "Grid",
    "Part",
    "Study",
    "StudyContext",
    "StudyError",
    "Tuned",
    "get_study",
    "list_studies",
    "register",
    "run_study",
]
