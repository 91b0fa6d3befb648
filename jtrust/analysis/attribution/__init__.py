"""Training-data attribution: influence functions, DDA's debias and denoise.

    from jtrust.analysis import attribution as attr
    task = attr.Task(modules=attr.Modules(names=("q", "v"), layers=(10, 20)))
    s = attr.scores(model, train, queries, task=task, options=attr.Options(method="ekfac"))  # [M, N]
    variants = attr.dda(series, base, train, queries, task=task)   # raw, debias, denoise, dda, ...

`task` states what is differentiated (the parameter subset, the training loss, the query
measurement), `curvature` the inverse-Hessian options and their costs, `scores` the passes, the
artifacts and DDA. Method notes: docs/attribution.md.
"""

from jtrust.analysis.attribution.curvature import CURVATURES, FREE_METHODS, METHODS, MODULE_METHODS
from jtrust.analysis.attribution.scores import Options, dda, scores, self_influence, token_scores, top_k
from jtrust.analysis.attribution.task import Modules, Task, row_nll

__all__ = ["CURVATURES", "FREE_METHODS", "METHODS", "MODULE_METHODS", "Modules", "Options", "Task", "dda",
           "row_nll", "scores", "self_influence", "token_scores", "top_k"]
