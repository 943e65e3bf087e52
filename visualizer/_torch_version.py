"""Torch version gates: every branch on the installed torch's version lives here.

Each flag names the torch release that brought the feature and the releases
it was checked on (the rows of `.ci/torch_matrix`). A feature the installed
torch lacks is never an ImportError at `import visualizer`: the call that
needs it says so with `require_torch`, naming the version the user has and
the one it needs. Imported only by the modules that import torch (the core
runs without torch).
"""

from typing import Tuple

import torch

from ._errors import VisualizerError


def _release(version: str) -> Tuple[int, int]:
    """(major, minor) of a torch version string: '2.5.0a0+git1234' -> (2, 5)."""
    parts = version.split("+")[0].split(".")
    digits = "".join(c for c in parts[1] if c.isdigit()) if len(parts) > 1 else "0"
    return int(parts[0]), int(digits or 0)


TORCH_RELEASE = _release(str(torch.__version__))

# torch.nn.attention.bias (CausalBias, CausalVariant), an SDPA attn_mask that
# stands for a causal mask: new in torch 2.3 (torch.nn.attention itself is
# new in 2.3). Checked on 2.1.2 (absent), 2.2.2 (absent), 2.3.1, 2.6.0,
# 2.8.0, 2.13.0, 2.14.1.
TORCH_2_3 = TORCH_RELEASE >= (2, 3)
HAS_CAUSAL_BIAS = TORCH_2_3

# F.scaled_dot_product_attention(..., enable_gqa=...): new in torch 2.5.
# Checked on 2.1.2 and 2.4.1 (absent), 2.5.1, 2.6.0, 2.8.0, 2.13.0, 2.14.1.
TORCH_2_5 = TORCH_RELEASE >= (2, 5)

# torch.compiler.set_stance (Dynamo's "force_eager"): new in torch 2.6.
# Checked on 2.1.2 and 2.5.1 (absent), 2.6.0, 2.8.0, 2.13.0, 2.14.1.
TORCH_2_6 = TORCH_RELEASE >= (2, 6)


def is_compiling() -> bool:
    """Whether Dynamo is tracing the caller: torch.compiler.is_compiling, new in
    torch 2.3 (checked on 2.3.1, 2.6.0, 2.8.0, 2.13.0, 2.14.1). Before 2.6 Dynamo
    does not trace torch function modes, the only place this is asked."""
    return TORCH_2_3 and torch.compiler.is_compiling()


def torch_too_old(feature: str, needed: str) -> str:
    """The sentence that says `feature` needs torch `needed` and which torch this is."""
    return f"{feature} needs torch>={needed}; this is torch {torch.__version__}"


def require_torch(available: bool, feature: str, needed: str, who: str, advice: str = "") -> None:
    """Raise a VisualizerError naming both versions unless `available`."""
    if not available:
        raise VisualizerError(f"{who}: {torch_too_old(feature, needed)}{advice}")
