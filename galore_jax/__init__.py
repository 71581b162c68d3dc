"""galore_jax: GaLore-family memory-efficient training as composable Optax transforms.

The public names are below; the modules behind them are listed in ``ARCHITECTURE.md``.
"""

from galore_jax import adafactor
from galore_jax import apollo
from galore_jax import draws
from galore_jax import ldadam
from galore_jax import memory
from galore_jax import projection
from galore_jax import quantization
from galore_jax import refresh
from galore_jax import scaling
from galore_jax import sharding
from galore_jax import subspace
from galore_jax.adafactor import ScaleByFactoredRmsState
from galore_jax.adafactor import scale_by_adafactor
from galore_jax.adam8bit import ScaleByAdam8bitState
from galore_jax.adam8bit import adamw_8bit
from galore_jax.adam8bit import scale_by_adam_8bit
from galore_jax.apollo import APOLLO_PROJ_TYPES
from galore_jax.apollo import ScaleByApolloState
from galore_jax.apollo import apollo_adamw
from galore_jax.apollo import apollo_mini
from galore_jax.apollo import scale_by_apollo
from galore_jax.galore import GaLoreProjectionState
from galore_jax.galore import fira_adamw
from galore_jax.galore import galore_adafactor
from galore_jax.galore import galore_adamw
from galore_jax.galore import galore_adamw_8bit
from galore_jax.galore import galore_projection
from galore_jax.galore import refresh_counts
from galore_jax.hf_adam import scale_by_adam_hf
from galore_jax.hf_adam import scale_by_hf_bias_correction
from galore_jax.ldadam import LDADAM_PROJ_TYPES
from galore_jax.ldadam import ScaleByLDAdamState
from galore_jax.ldadam import ldadamw
from galore_jax.ldadam import scale_by_ldadam
from galore_jax.memory import tree_bytes
from galore_jax.projection import DimensionNumbers
from galore_jax.projection import PROJ_TYPES
from galore_jax.refresh import RefreshPolicy
from galore_jax.refresh import every
from galore_jax.refresh import every_step
from galore_jax.refresh import lazy
from galore_jax.refresh import staggered
from galore_jax.subspace import Bases
from galore_jax.draws import StackSlice
from galore_jax.targets import linear_kernels

__version__ = "0.1.0"

__all__ = (
    "APOLLO_PROJ_TYPES",
    "Bases",
    "DimensionNumbers",
    "GaLoreProjectionState",
    "LDADAM_PROJ_TYPES",
    "PROJ_TYPES",
    "RefreshPolicy",
    "ScaleByAdam8bitState",
    "ScaleByApolloState",
    "ScaleByFactoredRmsState",
    "ScaleByLDAdamState",
    "StackSlice",
    "adafactor",
    "adamw_8bit",
    "apollo",
    "apollo_adamw",
    "apollo_mini",
    "draws",
    "every",
    "every_step",
    "fira_adamw",
    "galore_adafactor",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_projection",
    "lazy",
    "ldadam",
    "ldadamw",
    "linear_kernels",
    "memory",
    "projection",
    "quantization",
    "refresh",
    "refresh_counts",
    "scale_by_adafactor",
    "scale_by_adam_8bit",
    "scale_by_adam_hf",
    "scale_by_apollo",
    "scale_by_hf_bias_correction",
    "scale_by_ldadam",
    "scaling",
    "sharding",
    "staggered",
    "subspace",
    "tree_bytes",
)
