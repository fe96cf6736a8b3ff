"""Float32 tolerances for the tests, with the rule written once.

A float32 result that comes out of a reduction depends on the order of the additions, and that order differs
between CPUs (ATen's AVX-512, AVX2 and scalar "default" kernels; BLAS blocking) and devices. One rounding moves
a value by at most EPS/2 relative; a sum of n terms of size <= m is off by about EPS * sqrt(n) * m (the n
roundings add up like a random walk; n * EPS * m is the worst case). So comparisons of float32 results allow

    fp32_tol(values, n_terms, k) = k * EPS * sqrt(n_terms) * max|values|

with `values` the compared results (or the terms of the sum behind them), n_terms the length of the longest
reduction behind one result and k a small safety factor. Each use names its n; each parity test also shows that
a planted bug moves the result by >= 10x its tolerance (excess() >= 10), so a tolerance cannot hide a real bug.
Results that must be identical (tokens, spans, n-best order) are compared with ==, never with a tolerance.
"""
import math

import torch

EPS = torch.finfo(torch.float32).eps       # 2**-23, twice the unit roundoff
K = 4.0                                    # safety factor: measured errors need k <= 1 (see each test)


def fp32_tol(values, n_terms, k=K, dim=None, dtype=torch.float32):
    """k * EPS * sqrt(n_terms) * max|values|: a float, or with `dim` a tensor of maxima over `dim` (keepdim).
    dtype=torch.float64 uses float64's eps instead, for computations done in double."""
    scale = k * torch.finfo(dtype).eps * math.sqrt(n_terms)
    magnitude = torch.as_tensor(values, dtype=torch.float64).abs()
    if dim is None:
        return scale * float(magnitude.max())
    return scale * magnitude.amax(dim=dim, keepdim=True)


def model_terms(config):
    """n for an output of image.IMAGE (a Config or its dict): the longest sum in a layer (max of the ffn widths and
    d_model) x the layers the output passes (encoder + decoder). Every layer adds the rounding of its sums,
    relative to values of the output's size (LayerNorm keeps them there), and independent roundings add like a
    random walk; a backward pass goes through every layer a second time (2n)."""
    c = config if isinstance(config, dict) else vars(config)
    return max(c["encoder_ffn"], c["decoder_ffn"], c["d_model"]) * (c["encoder_layers"] + c["decoder_layers"])


def excess(actual, expected, tol):
    """max |actual - expected| / tol (tol a float or a broadcastable tensor): <= 1 passes; a planted bug >= 10."""
    diff = (torch.as_tensor(actual, dtype=torch.float64) - torch.as_tensor(expected, dtype=torch.float64)).abs()
    return float((diff / tol).max())
