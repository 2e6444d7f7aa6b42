"""A float64 numpy softmax attention: the reference of the attention tests."""

import numpy as np


def numpy_attention(q, k, v):
    """float64 softmax(q k^T / sqrt(H)) v per batch and head, (B, L, N, H) layout."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("blnh,bmnh->bnlm", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnlm,bmnh->blnh", weights, v)
