"""Tolerances for every numeric test, in one place.

Errors are relative Frobenius norms, ``|x - ref| / |ref|``, against the float64
oracle (full attention on one process, reference backend). The low-precision
figures cover rounding of the inputs and the output to that dtype plus float32
accumulation; gradients get a looser bound because they go through two more
matrix products in low precision.
"""

import torch

FORWARD = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
GRADIENT = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# Error growth with world size below this floor counts as rounding: a few units of roundoff for the
# float32/float64 accumulators (a ring adds one merge per step), one unit for half types, whose error at
# world size 1 is already dominated by rounding the output.
GROWTH_FLOOR = {torch.float64: 8 * 2.0 ** -53, torch.float32: 8 * 2.0 ** -24, torch.float16: 2.0 ** -11,
                torch.bfloat16: 2.0 ** -8}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in float64; -inf entries (rows that saw no key) must match exactly and are left out."""
    x, ref = x.double(), ref.double()
    if bool(torch.isnan(x).any()):
        return float("inf")
    both_inf = torch.isinf(ref) & (x == ref)
    if bool((torch.isinf(ref) ^ torch.isinf(x)).any()):
        return float("inf")
    x, ref = x.masked_fill(both_inf, 0), ref.masked_fill(both_inf, 0)
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)
