"""Plain-PyTorch local linear attention (LLA): the ``"torch"`` backend, and the naive reference.

Notation (one head, query i, causal keys j <= i, tau = softmax scale):
``p_ij = softmax_j(tau q_i.k_j)``, ``kbar_i = sum_j p_ij k_j``, ``vbar_i = sum_j p_ij v_j``,
``C_i = sum_j p_ij (k_j - kbar_i)(k_j - kbar_i)^T`` (the p-weighted key covariance) and
``B_i = C_i + lambda I``.

The spec's estimator ``o_i = sum_j p_ij (1 - rho^T x_ij) v_j / (1 - mu^T rho)`` (``x_ij = k_j - q_i``,
``mu = kbar - q``, ``rho = (C + mu mu^T + lambda I)^-1 mu``) equals, by Sherman-Morrison,

    eta_i = B_i^-1 (q_i - kbar_i),       o_i = vbar_i + sum_j p_ij (eta_i.(k_j - kbar_i)) v_j,

so every solve is with ``B_i``. The exact gradient (g_i = dL/do_i, r_ij = g_i.v_j, rbar_i = g_i.vbar_i)
needs one adjoint solve per query, ``xi_i = B_i^-1 sum_j p_ij (r_ij - rbar_i)(k_j - kbar_i)``; with

    a_ij = 1 + eta_i.(k_j - kbar_i)               (o_i = sum_j p_ij a_ij v_j: the effective weights)
    b_ij = r_ij - rbar_i - xi_i.(k_j - kbar_i)
    dS_ij = p_ij (a_ij b_ij - lambda xi_i.eta_i)  (gradient of the scaled score tau q_i.k_j)

it is ``dq_i = tau sum_j dS_ij k_j + xi_i``, ``dk_j = sum_i tau dS_ij q_i + p_ij (b_ij eta_i - a_ij xi_i)``,
``dv_j = sum_i p_ij a_ij g_i`` and ``dlambda = -sum_i xi_i.eta_i``. Nothing is dropped: the ridge's
dependence on q and k (the terms the published FlashLLA backward omits) is inside ``dS`` and ``xi``.
The tests check this against autograd of ``naive_local_linear_attention``, which is written in the
spec's own variables (rho, mu, Sigma), not in these.

* ``naive_local_linear_attention``: the spec's formulas with a dense D x D solve per query, all
  queries at once (memory T^2 D: tiny inputs only); the tests' float64 ground truth.
* ``forward`` / ``backward``: the torch backend. Query chunks, a Cholesky solve of ``B_i`` per query
  (exact, no iteration), key chunks for the covariances, so memory is bounded by
  ``_CHUNK_ELEMENTS`` whatever T is; computed in float64 for every input dtype (``_COMPUTE_DTYPE``);
  any head dim.
"""
from __future__ import annotations

import torch

# Elements (scores, or D x D covariances) one chunk may hold: bounds the torch backend's memory.
_CHUNK_ELEMENTS = 1 << 24


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved eta and lse (and of the ridge tensor the op passes in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The torch backend computes in float64 whatever the input dtype: the solve with C + lambda I loses
# about log10(cond) digits, cond reaching (lambda_max(C) + lambda) / lambda ~ 1e7 on large keys with a
# small lambda, which fp32 (7 digits) cannot afford. Measured against the float64 reference with fp32
# inputs and Gaussian keys x10: within 1e-7 relative at T=D=4, lambda=1e-5 and T=D=64, lambda=1e-3
# (where computing in fp32 failed in Cholesky), within 1e-5 at lambda=1e-6..1e-7. On a CPU float64
# costs about what fp32 does here (the batched solves dominate, not the GEMMs).
_COMPUTE_DTYPE = torch.float64


# ----------------------------------------------------------------------------- naive reference


def naive_local_linear_attention(q, k, v, ridge_lambda, scale: float):
    """The spec's estimator, dense, in q's dtype (use float64). Differentiable by autograd.

    ``q (B, T, Hq, D)``, ``k, v (B, T, Hkv, D)``, ``ridge_lambda`` a float or an ``(Hq,)`` tensor.
    Returns ``(B, T, Hq, D)``.
    """
    batch, num_tokens, num_heads, head_dim = q.shape
    rep = num_heads // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    ridge = torch.as_tensor(ridge_lambda, dtype=q.dtype, device=q.device).expand(num_heads)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    x = k[:, :, None, :, :] - q[:, :, :, None, :]  # x_ij = k_j - q_i: (B, H, T, T, D)
    mu = torch.einsum("bhij,bhijd->bhid", p, x)
    sigma = torch.einsum("bhij,bhijd,bhije->bhide", p, x, x)
    eye = torch.eye(head_dim, dtype=q.dtype, device=q.device)
    rho = torch.linalg.solve(sigma + ridge[None, :, None, None, None] * eye, mu.unsqueeze(-1)).squeeze(-1)
    weights = p * (1 - torch.einsum("bhid,bhijd->bhij", rho, x))
    denominator = 1 - (mu * rho).sum(-1)
    out = torch.einsum("bhij,bhjd->bhid", weights, v) / denominator[..., None]
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- torch backend


def _query_chunks(num_tokens: int, num_heads: int, head_dim: int):
    """Query ranges whose scores (heads x L x T) and covariances (heads x L x D^2) fit the budget."""
    step = max(1, _CHUNK_ELEMENTS // (num_heads * max(num_tokens, head_dim * head_dim)))
    for start in range(0, num_tokens, step):
        yield start, min(start + step, num_tokens)


def _heads_first(t, b, start, end, acc):
    """Rows start..end-1 of batch b as (H, L, D) in the accumulation dtype."""
    return t[b, start:end].to(acc).transpose(0, 1)


def ridge_cholesky(matrix, where):
    """Cholesky factors of a batch of ridge matrices ``(..., D, D)``.

    A matrix that is not numerically positive definite (lambda below the covariance's float64
    rounding, about 1e-16 of its largest eigenvalue) is an error naming the op, the head
    (``where(index)`` describes the failed matrix's batch index) and the remedy. On the CPU it is
    raised at once (reading ``info`` there waits for no device). On a GPU reading it would
    synchronise the host on every call, so the failed factors are set to NaN instead: their outputs
    (and gradients) come out NaN, never a silently wrong number."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if matrix.device.type == "cpu":
        failed = info.numpy().nonzero()
        if failed[0].size:
            raise RuntimeError(
                f"local_linear_attention: the ridge system (C + lambda I) of {where(tuple(int(i[0]) for i in failed))} "
                "is not numerically positive definite (lambda is below its float64 rounding); pass a larger ridge_lambda"
            )
        return factor
    return torch.where((info > 0)[..., None, None], float("nan"), factor)


class _Chunk:
    """One query chunk of one batch element: probabilities, means, covariance solve.

    Query heads are grouped by kv head: tensors are ``(Hkv, rep * L, ...)``, row ``r * L + l``
    being query head ``kv * rep + r`` at position ``start + l``.
    """

    def __init__(self, q, k, v, ridge, scale, b, start, end, lse=None):
        acc = _COMPUTE_DTYPE
        num_heads, num_kv = q.shape[2], k.shape[2]
        self.length = end - start
        self.rep = num_heads // num_kv
        self.q = _heads_first(q, b, start, end, acc).reshape(num_kv, self.rep * self.length, -1)
        self.k = _heads_first(k, b, 0, end, acc)  # (Hkv, n, D)
        self.v = _heads_first(v, b, 0, end, acc)
        scores = self.q @ self.k.transpose(1, 2) * scale
        query_pos = torch.arange(start, end, device=q.device).repeat(self.rep)
        future = torch.arange(end, device=q.device)[None, :] > query_pos[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        self.lse = torch.logsumexp(scores, dim=-1) if lse is None else lse
        self.p = torch.exp(scores - self.lse[..., None])
        if lse is not None:
            # A saved fp32 lse leaves sum_j p_j off 1 by ~1e-7 |lse|, which the raw moments below
            # would multiply by |k|^2: renormalise.
            self.p = self.p / self.p.sum(-1, keepdim=True)
        self.kbar = self.p @ self.k
        self.ridge = ridge.to(acc).view(num_kv, self.rep, 1).expand(-1, -1, self.length).reshape(num_kv, -1)
        self.cholesky = ridge_cholesky(
            self._ridge_matrix(),
            lambda i: f"query head {i[0] * self.rep + i[1] // self.length} at position {start + i[1] % self.length}")

    def _ridge_matrix(self):
        """``B_i = sum_j p_ij k_j k_j^T - kbar kbar^T + lambda I`` per row, keys taken in chunks (one
        GEMM per chunk). The raw second moment cancels to ``C`` with an absolute error of about
        ``eps |k|^2``: harmless in float64 (``_COMPUTE_DTYPE``) unless lambda is below ~1e-12 |k|^2."""
        num_kv, rows, head_dim = self.q.shape
        second = self.q.new_zeros(num_kv, rows, head_dim * head_dim)
        step = max(1, _CHUNK_ELEMENTS // (num_kv * head_dim * head_dim))
        for j0 in range(0, self.k.shape[1], step):
            keys = self.k[:, j0:j0 + step]
            outer = (keys[..., :, None] * keys[..., None, :]).flatten(2)  # (Hkv, n, D^2)
            second += self.p[..., j0:j0 + step] @ outer
        matrix = second.view(num_kv, rows, head_dim, head_dim) - self.kbar[..., :, None] * self.kbar[..., None, :]
        return matrix + self.ridge[..., None, None] * torch.eye(head_dim, dtype=self.q.dtype, device=self.q.device)

    def centred_dot(self, x):
        """``x_i.(k_j - kbar_i)`` for ``x (Hkv, rows, D)``: ``(Hkv, rows, n)``."""
        return x @ self.k.transpose(1, 2) - (x * self.kbar).sum(-1, keepdim=True)

    def solve(self, rhs):
        return torch.cholesky_solve(rhs.unsqueeze(-1), self.cholesky).squeeze(-1)

    def to_output_layout(self, t):
        """``(Hkv, rep * L, D)`` -> ``(L, Hq, D)``."""
        return t.reshape(-1, self.length, t.shape[-1]).transpose(0, 1)

    def from_output_layout(self, t, acc):
        """``(L, Hq, D)`` rows -> ``(Hkv, rep * L, D)``."""
        return t.to(acc).transpose(0, 1).reshape(self.q.shape[0], self.rep * self.length, -1)


def forward(q, k, v, ridge, scale: float):
    """LLA forward, exact (Cholesky). ``q (B, T, Hq, D)``, ``k, v (B, T, Hkv, D)``, ``ridge (Hq,)``.

    Returns ``out (B, T, Hq, D)`` in q's dtype, ``eta (B, T, Hq, D)`` and ``lse (B, Hq, T)`` (the
    natural-log log-sum-exp of the scaled scores), both float32 (float64 for float64 inputs).
    """
    acc = accumulation_dtype(q.dtype)
    batch, num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    eta = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty((batch, num_heads, num_tokens), dtype=acc, device=q.device)
    for b in range(batch):
        for start, end in _query_chunks(num_tokens, num_heads, head_dim):
            c = _Chunk(q, k, v, ridge, scale, b, start, end)
            eta_c = c.solve(c.q - c.kbar)
            weights = c.p * (1 + c.centred_dot(eta_c))  # o = vbar + sum_j p_j (eta.(k_j - kbar)) v_j
            out[b, start:end] = c.to_output_layout(weights @ c.v).to(q.dtype)
            eta[b, start:end] = c.to_output_layout(eta_c)
            lse[b, :, start:end] = c.lse.view(num_heads, -1)
    return out, eta, lse


def backward(grad_out, q, k, v, ridge, lse, scale: float):
    """LLA backward (the module docstring's formulas); η is recomputed in float64 rather than taken
    from the forward. Returns ``dq, dk, dv`` in the inputs' dtypes
    and ``dridge (Hq,)`` in the accumulation dtype."""
    acc = _COMPUTE_DTYPE
    batch, num_tokens, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    dridge = torch.zeros(num_heads, dtype=acc, device=q.device)
    for b in range(batch):
        for start, end in _query_chunks(num_tokens, num_heads, head_dim):
            c = _Chunk(q, k, v, ridge, scale, b, start, end, lse=lse[b, :, start:end].reshape(num_kv, -1).to(acc))
            g = c.from_output_layout(grad_out[b, start:end], acc)
            # Solved again in float64 rather than read from the saved eta: eta reaches |q - kbar| / lambda,
            # and its fp32 rounding would cost digits of dk on ill-conditioned keys.
            eta_c = c.solve(c.q - c.kbar)
            r = g @ c.v.transpose(1, 2)
            rbar = (c.p * r).sum(-1, keepdim=True)
            xi = c.solve((c.p * r) @ c.k - rbar * c.kbar)
            a = 1 + c.centred_dot(eta_c)
            bcoef = r - rbar - c.centred_dot(xi)
            xi_eta = (xi * eta_c).sum(-1)
            ds = c.p * (a * bcoef - (c.ridge * xi_eta)[..., None])
            pa, pb = c.p * a, c.p * bcoef
            dq[b, start:end] = c.to_output_layout(scale * ds @ c.k + xi).to(q.dtype)
            dk_c = scale * ds.transpose(1, 2) @ c.q + pb.transpose(1, 2) @ eta_c - pa.transpose(1, 2) @ xi
            dk[b, :end] += dk_c.transpose(0, 1)
            dv[b, :end] += (pa.transpose(1, 2) @ g).transpose(0, 1)
            dridge -= xi_eta.view(num_heads, -1).sum(-1)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dridge.to(accumulation_dtype(q.dtype))


# ----------------------------------------------------------------------------- decode (one query per sequence)


def decode(q, k_cache, v_cache, cache_seqlens, ridge, scale: float):
    """The last row of LLA over each sequence's first ``cache_seqlens[b]`` cached tokens.

    ``q (B, Hq, D)``, ``k_cache, v_cache (B, T_max, Hkv, D)``, ``cache_seqlens (B,)`` int (values
    in 1..T_max; positions at or past the length are masked, whatever they hold), ``ridge (Hq,)``.
    Returns ``(B, Hq, D)`` in q's dtype. Float64, keys in chunks (memory bounded by
    ``_CHUNK_ELEMENTS`` whatever T_max is), one Cholesky solve per (sequence, head); no host
    synchronisation on a GPU.
    """
    acc = _COMPUTE_DTYPE
    batch, num_heads, head_dim = q.shape
    max_tokens, num_kv = k_cache.shape[1], k_cache.shape[2]
    rep = num_heads // num_kv
    query = q.to(acc).view(batch, num_kv, rep, head_dim)
    positions = torch.arange(max_tokens, device=q.device)
    valid = positions[None, :] < cache_seqlens.to(q.device)[:, None]  # (B, T_max)
    step = max(1, _CHUNK_ELEMENTS // (batch * num_heads * head_dim))

    def chunks(cache):
        """``(j0, (B, Hkv, n, D))`` chunks of a cache in the compute dtype, zero past each length."""
        for j0 in range(0, max_tokens, step):
            block = cache[:, j0:j0 + step].to(acc).transpose(1, 2)
            yield j0, block.masked_fill(~valid[:, None, j0:j0 + step, None], 0)

    scores = torch.cat([query @ keys.transpose(-1, -2) for _, keys in chunks(k_cache)], dim=-1)
    scores = (scores * scale).masked_fill(~valid[:, None, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)  # (B, Hkv, rep, T_max)
    kbar = query.new_zeros(query.shape)
    second = query.new_zeros(batch, num_kv, rep, head_dim, head_dim)
    for j0, keys in chunks(k_cache):
        weights = p[..., j0:j0 + keys.shape[2]]
        kbar += weights @ keys
        second += (keys[:, :, None] * weights[..., None]).transpose(-1, -2) @ keys[:, :, None]
    eye = torch.eye(head_dim, dtype=acc, device=q.device)
    matrix = second - kbar[..., :, None] * kbar[..., None, :] + ridge.to(acc).view(num_kv, rep, 1, 1) * eye
    cholesky = ridge_cholesky(matrix, lambda i: f"sequence {i[0]}, query head {i[1] * rep + i[2]} (decode)")
    eta = torch.cholesky_solve((query - kbar)[..., None], cholesky)[..., 0]
    out = query.new_zeros(query.shape)
    shift = (eta * kbar).sum(-1, keepdim=True)
    for (j0, keys), (_, values) in zip(chunks(k_cache), chunks(v_cache)):
        weights = p[..., j0:j0 + keys.shape[2]]
        effective = weights * (1 + eta @ keys.transpose(-1, -2) - shift)  # p_j (1 + eta.(k_j - kbar))
        out += effective @ values
    return out.view(batch, num_heads, head_dim).to(q.dtype)
