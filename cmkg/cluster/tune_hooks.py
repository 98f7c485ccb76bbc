"""Where sweeps' Ray-side classes lived before ``cmkg.cluster.ray_compat``: a sweep started then
pickled its searcher, scheduler and progress callback by these names (Ray Tune's ``tuner.pkl``),
so ``cmkg tune --resume`` of such a sweep needs them to resolve. New code imports them from
``cmkg.cluster.ray_compat`` and ``cmkg.cluster.tune``."""

from cmkg.cluster.ray_compat import OptunaPruning, PruningSearch
from cmkg.cluster.tune import Progress

__all__ = ["OptunaPruning", "Progress", "PruningSearch"]
