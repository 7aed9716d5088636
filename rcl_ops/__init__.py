"""rcl_ops: fused pairwise statistical distances and the residual contrastive loss (RCL)."""

from ._backend import BACKEND_NAMES, available_backends
from ._checks import check_finite_enabled, set_check_finite
from .losses import ResidualContrastiveLoss, residual_contrastive_loss
from .ops import default_bandwidth, pairwise_bd, pairwise_emd, pairwise_mmd

try:
    from . import _native  # noqa: F401  registers the "cpu" (and "cuda") backends
except ImportError as error:  # the extension was not built
    from ._backend import mark_unavailable

    mark_unavailable("cpu", f"the native extension rcl_ops._C did not load: {error}")
    mark_unavailable("cuda", f"the native extension rcl_ops._C did not load: {error}")

from . import triton as _triton  # registers the "triton" backend when triton imports

if not _triton.AVAILABLE:
    from ._backend import mark_unavailable

    mark_unavailable("triton", _triton.UNAVAILABLE_REASON)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "ResidualContrastiveLoss",
    "available_backends",
    "check_finite_enabled",
    "default_bandwidth",
    "pairwise_bd",
    "pairwise_emd",
    "pairwise_mmd",
    "residual_contrastive_loss",
    "set_check_finite",
]
