"""rcl_ops: fused pairwise statistical distances and the residual contrastive loss (RCL)."""

from . import reference  # noqa: F401  registers the "reference" backend (the tests' oracle)
from ._backend import BACKEND_NAMES, available_backends, mark_unavailable, select_backend
from ._checks import check_finite_enabled, set_check_finite
from .losses import DISTANCES, ResidualContrastiveLoss, residual_contrastive_loss
from .ops import GridAccuracyWarning, default_bandwidth, pairwise_bd, pairwise_emd, pairwise_mmd
from .sketch import Sketch, bd_sketch, emd_sketch, mmd_sketch

# Only a missing or unloadable extension falls back to the reference backend (with a warning
# on first use); an error in the package's own Python modules propagates.
try:
    from . import _C  # noqa: F401
except ImportError as error:
    mark_unavailable("cpu", f"the native extension rcl_ops._C did not load: {error}")
    mark_unavailable("cuda", f"the native extension rcl_ops._C did not load: {error}")
else:
    from . import _native  # noqa: F401  registers the "cpu" (and "cuda") backends

from . import triton as _triton  # registers the "triton" backend when triton imports

if not _triton.AVAILABLE:
    mark_unavailable("triton", _triton.UNAVAILABLE_REASON)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "DISTANCES",
    "GridAccuracyWarning",
    "ResidualContrastiveLoss",
    "Sketch",
    "available_backends",
    "bd_sketch",
    "check_finite_enabled",
    "default_bandwidth",
    "emd_sketch",
    "mmd_sketch",
    "pairwise_bd",
    "pairwise_emd",
    "pairwise_mmd",
    "residual_contrastive_loss",
    "select_backend",
    "set_check_finite",
]
