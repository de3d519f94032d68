"""Independent NumPy reference implementations of the normalisers under test.

Plain NumPy, float64 throughout (inputs of any dtype are cast; all outputs are float64).
The equations follow /work/shared/research/powernorm_un_spec.md (section numbers cited per class).

Conventions
-----------
x, dy : [N, C] arrays (rows = tokens, features last).
mask  : bool [N], True = real token, False = pad; None means every row is real.
Stateful classes keep their cache from the last ``forward``; call ``backward`` once per forward.
A forward with ``train=False`` never changes state, and its ``backward`` is the exact gradient of the
frozen per-channel map (no state change either).
"""
import numpy as np


# ----------------------------------------------------------------------------- helpers
def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _mask(mask, n):
    if mask is None:
        return np.ones(n, dtype=bool)
    m = np.asarray(mask, dtype=bool).reshape(-1)
    if m.shape[0] != n:
        raise ValueError(f"mask has {m.shape[0]} entries, x has {n} rows")
    return m


def _affine(c, scale, bias):
    s = np.ones(c) if scale is None else _f64(scale).reshape(c)
    b = np.zeros(c) if bias is None else _f64(bias).reshape(c)
    return s, b


# ----------------------------------------------------------------------------- stateless norms
def layer_norm(x, scale=None, bias=None, eps=1e-6):
    """Per-row LayerNorm over C: (x - mean) / sqrt(var + eps) * scale + bias, biased variance."""
    x = _f64(x)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if scale is not None:
        y = y * _f64(scale)
    if bias is not None:
        y = y + _f64(bias)
    return y


def rms_norm(x, scale=None, bias=None, eps=1e-6):
    """Per-row RMSNorm over C: x / sqrt(mean(x^2) + eps) * scale (+ bias)."""
    x = _f64(x)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    if scale is not None:
        y = y * _f64(scale)
    if bias is not None:
        y = y + _f64(bias)
    return y


def _groups(a, num_groups):
    n, c = a.shape
    if c % num_groups:
        raise ValueError(f"C={c} is not divisible by num_groups={num_groups}")
    return a.reshape(n, num_groups, c // num_groups)


def group_scaling(x, num_groups, eps=1e-5):
    """GroupScaling1D (spec 1.3 step 0): per row and group k, x_(k) / sqrt(mean_(k) x^2 + eps)."""
    x = _f64(x)
    xg = _groups(x, num_groups)
    s = np.sqrt((xg * xg).mean(-1, keepdims=True) + eps)
    return (xg / s).reshape(x.shape)


def group_scaling_vjp(x, dout, num_groups, eps=1e-5):
    """Analytic VJP of group_scaling w.r.t. x.

    With s = sqrt(mean_j x_j^2 + eps) and xt = x / s inside one (row, group):
        dx_i = (dout_i - xt_i * mean_j(dout_j * xt_j)) / s.
    """
    x, dout = _f64(x), _f64(dout)
    xg, dg = _groups(x, num_groups), _groups(dout, num_groups)
    s = np.sqrt((xg * xg).mean(-1, keepdims=True) + eps)
    xt = xg / s
    return ((dg - xt * (dg * xt).mean(-1, keepdims=True)) / s).reshape(x.shape)


# ----------------------------------------------------------------------------- BatchNorm
class BatchNormRef:
    """Masked batch norm with flax.linen.BatchNorm semantics (the repo's BN baseline is spec 1.8;
    this is the plain flax variant, used as the BN control).

    Train: mean and biased var over real rows; y = (x - mean) / sqrt(var + eps) * scale + bias on ALL rows;
    running stats ra = momentum * ra + (1 - momentum) * batch_stat (init mean 0, var 1).
    Eval, or a training batch with no real rows: normalise with the running stats, state unchanged.
    """

    def __init__(self, C, momentum=0.99, eps=1e-5):
        self.C, self.momentum, self.eps = C, momentum, eps
        self.mean = np.zeros(C)
        self.var = np.ones(C)
        self._cache = None

    def forward(self, x, mask=None, train=True, scale=None, bias=None):
        x = _f64(x)
        m = _mask(mask, x.shape[0])
        scale, bias = _affine(self.C, scale, bias)
        batch = bool(train and m.any())
        if batch:
            mu, var = x[m].mean(0), x[m].var(0)
            self.mean = self.momentum * self.mean + (1 - self.momentum) * mu
            self.var = self.momentum * self.var + (1 - self.momentum) * var
        else:
            mu, var = self.mean, self.var
        sd = np.sqrt(var + self.eps)
        xhat = (x - mu) / sd
        self._cache = dict(xhat=xhat, sd=sd, m=m, scale=scale, batch=batch)
        return xhat * scale + bias

    def backward(self, dy):
        """Exact gradient. With batch stats over the real rows V (n_V of them):
        dx_n = g_n / sd - [n in V] * (sum_all g + xhat_n * sum_all g*xhat) / (n_V * sd),  g = scale * dy."""
        c = self._cache
        dy = _f64(dy)
        g = c["scale"] * dy
        dx = g / c["sd"]
        if c["batch"]:
            xhat, m = c["xhat"], c["m"]
            corr = (g.sum(0) + xhat * (g * xhat).sum(0)) / (m.sum() * c["sd"])
            dx = dx - m[:, None] * corr
        return dx, (dy * c["xhat"]).sum(0), dy.sum(0)


class PaperBatchNormRef:
    """The PowerNorm paper's BN baseline, official MaskSyncBatchNorm (spec 1.8; norms_2025.md), written
    literally: per-row LayerScaling a = x / sqrt(mean_C x^2 + ls_eps); pad rows OVERWRITTEN by the mean
    p of the real rows of a; then torch batch norm over all N rows (biased var to normalise);
    running stats with torch momentum (1 - momentum) and the UNBIASED var N/(N-1) * var.
    The backward follows the same literal graph: standard BN backward over all N rows, then the pad
    rows' gradient flows into the real rows through p (1/N_V each), then LayerScaling's VJP.
    Eval, or a training batch with no real row: every row is LayerScaled and normalised with the
    running stats (the official module would also overwrite pad rows in eval: pad outputs only).
    """

    def __init__(self, C, momentum=0.95, eps=1e-5, layer_scaling_eps=1e-5):
        self.C, self.momentum, self.eps, self.ls_eps = C, momentum, eps, layer_scaling_eps
        self.mean = np.zeros(C)
        self.var = np.ones(C)
        self._cache = None

    def forward(self, x, mask=None, train=True, scale=None, bias=None):
        x = _f64(x)
        n = x.shape[0]
        m = _mask(mask, n)
        scale, bias = _affine(self.C, scale, bias)
        a = group_scaling(x, 1, self.ls_eps)
        batch = bool(train and m.any())
        if batch:
            u = a.copy()
            u[~m] = a[m].mean(0)                                # pads <- mean of the real rows
            mu = u.mean(0)
            var = ((u - mu) ** 2).mean(0)                       # biased, over all N rows
            unbiased = var * n / (n - 1) if n > 1 else np.zeros(self.C)
            tm = 1 - self.momentum                              # torch momentum
            self.mean = (1 - tm) * self.mean + tm * mu
            self.var = (1 - tm) * self.var + tm * unbiased
        else:
            u, mu, var = a, self.mean, self.var
        sd = np.sqrt(var + self.eps)
        zhat = (u - mu) / sd
        self._cache = dict(x=x, zhat=zhat, sd=sd, m=m, scale=scale, batch=batch)
        return zhat * scale + bias

    def backward(self, dy):
        c = self._cache
        dy = _f64(dy)
        g = c["scale"] * dy
        zhat, m, sd = c["zhat"], c["m"], c["sd"]
        if c["batch"]:
            du = (g - g.mean(0) - zhat * (g * zhat).mean(0)) / sd   # BN backward over all N rows
            da = np.where(m[:, None], du, 0.0)
            da = da + m[:, None] * du[~m].sum(0) / m.sum()     # pads = mean of the real rows
        else:
            da = g / sd
        dx = group_scaling_vjp(c["x"], da, 1, self.ls_eps)
        return dx, (dy * zhat).sum(0), dy.sum(0)


# ----------------------------------------------------------------------------- PowerNorm
class PowerNormRef:
    """Official MaskPowerNorm including GroupScaling1D (spec 1.3 forward, 1.4 backward, 1.5 eval).

    backward_denominator: 'batch' (official, dxs = ghat / sqrt(psiB2 + eps)) or 'running'
        (dxs = ghat / d, the denominator the forward actually used).
    grad_mean_over: 'padded' (official, u += mean over all N rows of ghat*z) or 'valid'
        (mean over real rows only; pad rows get ghat = g, no -nu*z correction).
    A training batch with no real rows normalises with sqrt(phi + eps) and leaves t, phi and u unchanged.
    """

    def __init__(self, C, num_groups=1, warmup_steps=1000, alpha_fwd=0.9, alpha_bkw=0.9, eps=1e-5,
                 group_scaling_eps=1e-5, use_group_scaling=True,
                 backward_denominator='batch', grad_mean_over='padded'):
        if backward_denominator not in ('batch', 'running'):
            raise ValueError(backward_denominator)
        if grad_mean_over not in ('padded', 'valid'):
            raise ValueError(grad_mean_over)
        self.C, self.num_groups, self.warmup_steps = C, num_groups, warmup_steps
        self.alpha_fwd, self.alpha_bkw, self.eps = alpha_fwd, alpha_bkw, eps
        self.group_scaling_eps, self.use_group_scaling = group_scaling_eps, use_group_scaling
        self.backward_denominator, self.grad_mean_over = backward_denominator, grad_mean_over
        self.phi = np.ones(C)
        self.u = np.zeros(C)
        self.t = 0
        self._cache = None

    def _gs(self, x):
        return group_scaling(x, self.num_groups, self.group_scaling_eps) if self.use_group_scaling else x

    def forward(self, x, mask=None, train=True, scale=None, bias=None):
        x = _f64(x)
        m = _mask(mask, x.shape[0])
        scale, bias = _affine(self.C, scale, bias)
        xs = self._gs(x)                                        # step 0, every row
        if train and m.any():
            self.t += 1                                         # step 1
            t, W = self.t, self.warmup_steps
            psi2 = (xs[m] ** 2).mean(0)                         # step 2, real rows only
            d = np.sqrt(psi2 + self.eps) if t <= W else np.sqrt(self.phi + self.eps)   # step 3
            z = xs / d
            if t < W:                                           # step 4 (both lines in warmup)
                self.phi = self.phi * (t - 1) / t + psi2 / t
            self.phi = self.alpha_fwd * self.phi + (1 - self.alpha_fwd) * psi2
            self._cache = dict(x=x, z=z, d=d, psi2=psi2, m=m, scale=scale, train=True)
        else:                                                   # eval (1.5) or all-pad batch
            d = np.sqrt(self.phi + self.eps)
            z = xs / d
            self._cache = dict(x=x, z=z, d=d, m=m, scale=scale, train=False)
        return scale * z + bias

    def backward(self, dy):
        """Approximate backward (spec 1.4); updates self.u. dx includes the GroupScaling VJP."""
        c = self._cache
        dy = _f64(dy)
        z, g = c["z"], c["scale"] * dy
        if c["train"]:
            ghat = g - (1 - self.alpha_bkw) * self.u * z        # uses u_{t-1}
            if self.grad_mean_over == 'valid':
                m = c["m"]
                ghat = np.where(m[:, None], ghat, g)
                self.u = self.u + (ghat * z)[m].sum(0) / m.sum()
            else:
                self.u = self.u + (ghat * z).mean(0)
            denom = np.sqrt(c["psi2"] + self.eps) if self.backward_denominator == 'batch' else c["d"]
            dxs = ghat / denom
        else:
            dxs = g / c["d"]
        dx = (group_scaling_vjp(c["x"], dxs, self.num_groups, self.group_scaling_eps)
              if self.use_group_scaling else dxs)
        return dx, (dy * z).sum(0), dy.sum(0)


# ----------------------------------------------------------------------------- PN-V
class PNVRef:
    """PN-V (spec 1.7): z = xs / sqrt(psiB2 + eps), psiB2 = mean over REAL rows of xs^2, exact backprop
    through psiB2. xs = group_scaling(x) if use_group_scaling else x. Running phi (init 1):
    phi = momentum * phi + (1 - momentum) * psiB2. Eval (or a training batch with no real rows):
    xs / sqrt(phi + eps), state unchanged.
    """

    def __init__(self, C, num_groups=1, momentum=0.9, eps=1e-5, group_scaling_eps=1e-5,
                 use_group_scaling=True):
        self.C, self.num_groups, self.momentum, self.eps = C, num_groups, momentum, eps
        self.group_scaling_eps, self.use_group_scaling = group_scaling_eps, use_group_scaling
        self.phi = np.ones(C)
        self._cache = None

    def forward(self, x, mask=None, train=True, scale=None, bias=None):
        x = _f64(x)
        m = _mask(mask, x.shape[0])
        scale, bias = _affine(self.C, scale, bias)
        xs = group_scaling(x, self.num_groups, self.group_scaling_eps) if self.use_group_scaling else x
        batch = bool(train and m.any())
        if batch:
            psi2 = (xs[m] ** 2).mean(0)
            s = np.sqrt(psi2 + self.eps)
            self.phi = self.momentum * self.phi + (1 - self.momentum) * psi2
        else:
            s = np.sqrt(self.phi + self.eps)
        z = xs / s
        self._cache = dict(x=x, z=z, s=s, m=m, scale=scale, batch=batch)
        return scale * z + bias

    def backward(self, dy):
        """Exact gradient: dxs_n = (g_n - [n in V] * z_n * sum_all(g*z) / n_V) / s, then the GS VJP."""
        c = self._cache
        dy = _f64(dy)
        z, m, g = c["z"], c["m"], c["scale"] * dy
        if c["batch"]:
            dxs = (g - m[:, None] * z * (g * z).sum(0) / m.sum()) / c["s"]
        else:
            dxs = g / c["s"]
        dx = (group_scaling_vjp(c["x"], dxs, self.num_groups, self.group_scaling_eps)
              if self.use_group_scaling else dxs)
        return dx, (dy * z).sum(0), dy.sum(0)


# ----------------------------------------------------------------------------- Unified Normalization
class UnifiedNormRef:
    """Official UN1d (spec 2.2 state, 2.3 forward, 2.4 backward, 2.5 eval).

    mean_over='padded' (official): s_t and q_t over all rows, mask ignored.
    mean_over='valid': s_t and q_t over real rows only; pad rows are still normalised and get ghat = g.
      (A 'valid' training batch with no real rows is treated like eval: no state change.)
    mean_over='official_masked' (official UN1d given a pad_mask): s_t over real rows only (`mask_input`),
      q_t = mean over ALL rows and ghat = g - coef * z on ALL rows (the backward never sees the mask).
      (No real rows: treated like eval, as 'valid'.)
    Eval: y = x / sqrt(R + eps) * scale + bias, no GroupScaling, no state change.
    """

    def __init__(self, C, window_size=4, warmup_steps=4000, momentum=0.9, eps=1e-5,
                 outlier_filtration=False, compensation_delay=1000, compensation_clamp=5.0,
                 mean_over='padded'):
        if mean_over not in ('padded', 'valid', 'official_masked'):
            raise ValueError(mean_over)
        if isinstance(window_size, (tuple, list)):
            self.Mf, self.Mb = int(window_size[0]), int(window_size[1])
        else:
            self.Mf = self.Mb = int(window_size)
        self.C, self.warmup_steps, self.momentum, self.eps = C, warmup_steps, momentum, eps
        self.outlier_filtration, self.mean_over = outlier_filtration, mean_over
        self.compensation_delay, self.compensation_clamp = compensation_delay, compensation_clamp
        self.R = np.ones(C)
        self.nu = np.zeros(C)
        self.F = np.zeros((self.Mf, C))
        self.H = np.zeros((self.Mb, C))
        self.t = 0
        self.skip_counter = 0
        self.last_skip, self.last_r, self.last_sigma2 = False, None, None
        self._cache = None

    @staticmethod
    def _gm(F):
        with np.errstate(divide='ignore'):                      # log(0) = -inf -> GM 0, as in torch
            return np.exp(np.log(F).mean(0))

    def forward(self, x, mask=None, train=True, scale=None, bias=None):
        x = _f64(x)
        n = x.shape[0]
        rows = _mask(mask, n) if self.mean_over != 'padded' else np.ones(n, dtype=bool)
        scale, bias = _affine(self.C, scale, bias)
        if not (train and rows.any()):                          # eval (2.5)
            z = x / np.sqrt(self.R + self.eps)
            self._cache = dict(z=z, sig2=self.R, r=np.ones(self.C), rows=rows, grad_rows=rows,
                               scale=scale, train=False)
            return scale * z + bias
        Mf, W = self.Mf, self.warmup_steps
        self.t += 1                                             # step 1
        t = self.t
        s = (x[rows] ** 2).mean(0)                              # step 2
        rho = np.var(np.sqrt(self.F), ddof=1) if self.F.size > 1 else np.nan   # step 3, before insertion
        F = self.F.copy()
        k = t % Mf
        F[k] = s                                                # step 4
        skip = Mf <= 1                                          # step 5
        if self.outlier_filtration and t >= W:
            if np.any(F.mean(0) - self._gm(F) > Mf * rho):
                F[k] = self.R
                skip = True
                self.skip_counter += 1
        self.F = F
        sig2 = s if (t <= Mf or t < W or skip) else self._gm(F)  # step 6
        if t <= max(self.compensation_delay, W) or skip:        # step 7
            r = np.ones(self.C)
        else:
            r = np.sqrt(sig2 + self.eps) / np.sqrt(self.R + self.eps)
            r = np.clip(r, 1.0 / self.compensation_clamp, self.compensation_clamp)
        z = x / np.sqrt(sig2 + self.eps)                        # step 8, all rows
        self.R = self.momentum * self.R + (1 - self.momentum) * sig2   # step 9
        self.last_skip, self.last_r, self.last_sigma2 = bool(skip), r, sig2
        grad_rows = np.ones(n, dtype=bool) if self.mean_over == 'official_masked' else rows
        self._cache = dict(z=z, sig2=sig2, r=r, rows=rows, grad_rows=grad_rows, scale=scale,
                           train=True, skip=skip, t=t)
        return scale * z + bias

    def backward(self, dy):
        """Spec 2.4; updates self.nu and self.H."""
        c = self._cache
        dy = _f64(dy)
        z, r, rows = c["z"], c["r"], c["grad_rows"]
        g = r * c["scale"] * dy
        if c["train"]:
            t, skip, Mb = c["t"], c["skip"], self.Mb
            q = (g * z)[rows].mean(0)
            H = self.H.copy()
            H[t % Mb] = self.nu if skip else q
            mu = q if (t <= Mb or t < self.warmup_steps or skip) else H.mean(0)
            nu_new = self.momentum * self.nu + (1 - self.momentum) * mu
            ghat = g - (mu if skip else nu_new) * z
            ghat = np.where(rows[:, None], ghat, g)             # no-op for 'padded'
            self.H, self.nu = H, nu_new
        else:
            ghat = g
        dx = ghat / np.sqrt(c["sig2"] + self.eps)
        return dx, (dy * r * z).sum(0), dy.sum(0)


# ----------------------------------------------------------------------------- the norm zoo
# Written from /work/shared/research/norms_zoo.md (section numbers per function). Rows are tokens:
# x is [N, C]; per-row conditioning (shift, scale, tau) is given per row as well.
def _sigmoid(z):
    """1 / (1 + exp(-z)), written without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def numeric_vjp(f, x, dy, h=1e-6):
    """Central finite differences of sum(f(x) * dy) w.r.t. x (float64, for small arrays)."""
    x, dy = np.array(x, dtype=np.float64), _f64(dy)  # a writable copy
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = (f(x) * dy).sum()
        flat[i] = old - h
        down = (f(x) * dy).sum()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return g


def dyt(x, alpha, scale=None, bias=None):
    """DyT (zoo 5a): scale * tanh(alpha * x) + bias, alpha a scalar."""
    x = _f64(x)
    s, b = _affine(x.shape[-1], scale, bias)
    return s * np.tanh(float(np.reshape(alpha, ())) * x) + b


def dyt_vjp(x, dy, alpha, scale=None):
    """Analytic gradients of sum(dyt(x) * dy): (dx, dalpha, dscale, dbias)."""
    x, dy = _f64(x), _f64(dy)
    a = float(np.reshape(alpha, ()))
    s, _ = _affine(x.shape[-1], scale, None)
    t = np.tanh(a * x)
    sech2 = 1.0 - t * t
    return (dy * s * a * sech2, float((dy * s * x * sech2).sum()),
            (dy * t).reshape(-1, x.shape[-1]).sum(0), dy.reshape(-1, x.shape[-1]).sum(0))


def crms_norm(xc, eps=1e-6, scale=None, bias=None):
    """CRMSNorm (zoo 4.5): xc / sqrt((sum xc^2 + (sum xc)^2) / d + eps), d = dim(xc) + 1."""
    xc = _f64(xc)
    d = xc.shape[-1] + 1
    ms = ((xc ** 2).sum(-1, keepdims=True) + xc.sum(-1, keepdims=True) ** 2) / d
    s, b = _affine(xc.shape[-1], scale, bias)
    return xc / np.sqrt(ms + eps) * s + b


def group_norm(x, num_groups, scale=None, bias=None, eps=1e-6):
    """Per-row GroupNorm: each row's C features in G contiguous groups, biased variance per group."""
    x = _f64(x)
    xg = _groups(x, num_groups)
    mu = xg.mean(-1, keepdims=True)
    var = ((xg - mu) ** 2).mean(-1, keepdims=True)
    s, b = _affine(x.shape[-1], scale, bias)
    return ((xg - mu) / np.sqrt(var + eps)).reshape(x.shape) * s + b


def evonorm_s0(x, num_groups=32, v=None, scale=None, bias=None, eps=1e-5, nonlinearity=True):
    """EvoNorm-S0 (zoo 6a), per row: x * sigmoid(v x) / sqrt(var_group + eps) * scale + bias.

    G is decremented from num_groups until it divides C (official `_group_std`).
    nonlinearity=False: scale * x + bias.
    """
    x = _f64(x)
    c = x.shape[-1]
    s, b = _affine(c, scale, bias)
    if not nonlinearity:
        return x * s + b
    g = num_groups
    while g > 1 and c % g:
        g -= 1
    xg = _groups(x, g)
    var = xg.var(-1, keepdims=True)
    std = np.broadcast_to(np.sqrt(var + eps), xg.shape).reshape(x.shape)
    vv = np.ones(c) if v is None else _f64(v)
    return x * _sigmoid(vv * x) / std * s + b


def layer_norm_scaling(x, layer_index, base='layernorm', scale=None, bias=None, eps=1e-6):
    """LayerNorm Scaling (zoo 3): N(x) / sqrt(l), l counted from 1, N with its affine."""
    if layer_index < 1:
        raise ValueError(layer_index)
    norm = layer_norm if base == 'layernorm' else rms_norm
    return norm(x, scale, bias, eps) / np.sqrt(layer_index)


def ada_ln_zero(x, shift, scale, eps=1e-6):
    """adaLN (zoo 8, DiT `modulate(LN(x), shift, scale)`): LN(x) without affine * (1 + scale) + shift,
    with shift and scale [N, C] per row."""
    return layer_norm(x, eps=eps) * (1 + _f64(scale)) + _f64(shift)


def adaln_modulation(cond, kernel, bias):
    """DiT's adaLN_modulation: SiLU(cond) @ W + b, W [K, n, C], b [n, C]; returns [N, n, C]."""
    cond = _f64(cond)
    h = cond * _sigmoid(cond)
    return np.einsum('nk,kjc->njc', h, _f64(kernel)) + _f64(bias)


def td_parameter(p, tau):
    """DiMR `tdp_torch` (zoo 8): p1 + sigmoid((1 + w_raw) tau + b) (p0 - p1); tau [N] -> [N, C]."""
    tau = _f64(tau).reshape(-1, 1)
    p0, p1 = _f64(p['param0']), _f64(p['param1'])
    w, b = 1.0 + _f64(p['nodecay_weight']), _f64(p['nodecay_bias'])
    return p1 + (p0 - p1) * _sigmoid(tau * w + b)


def td_layer_norm(x, params, tau, eps=1e-5):
    """DiMR's time-dependent LayerNorm: LN(x) * scale(tau) + bias(tau) (torch layer_norm, eps inside)."""
    y = layer_norm(x, eps=eps)
    if 'scale' in params:
        y = y * td_parameter(params['scale'], tau)
    if 'bias' in params:
        y = y + td_parameter(params['bias'], tau)
    return y


def td_rms_norm(x, params, tau, eps=1e-8):
    """DiMR's TDRMSNorm: x / (||x|| d^-1/2 + eps) * scale(tau) (+ bias(tau)), eps outside the sqrt."""
    x = _f64(x)
    rms = np.linalg.norm(x, axis=-1, keepdims=True) * x.shape[-1] ** -0.5
    y = x / (rms + eps)
    if 'scale' in params:
        y = y * td_parameter(params['scale'], tau)
    if 'bias' in params:
        y = y + td_parameter(params['bias'], tau)
    return y


def qk_norm(t, kind='rmsnorm', scale=None, bias=None, eps=1e-6, per_head=True):
    """QK-norm (zoo 11) of one of q/k, [N, H, D]: LN or RMSNorm over D per head (per_head) or over the
    full width H*D; scale/bias of shape (D,) or (H, D)."""
    t = _f64(t)
    n, h, d = t.shape
    flat = t.reshape(n * h, d) if per_head else t.reshape(n, h * d)
    z = (layer_norm if kind == 'layernorm' else rms_norm)(flat, eps=eps).reshape(n, h, d)
    if scale is not None:
        z = z * _f64(scale)
    if bias is not None:
        z = z + _f64(bias)
    return z


# ----------------------------------------------------------------------------- by registry kind
# REFERENCES[kind](x, mask, dy, params, options) -> Step: one training step from a fresh state.
# x, dy [N, C] float64, mask [N] bool, params {name: [C] or [1]}, options: every option of the
# norm (its defaults updated with the test's). Stateless norms: dx by finite differences of the
# forward. Stateful: `state` holds the new state leaves, `backward` the backward statistics'
# updates (the cotangents of PowerNorm's ema_gz, UN's ema_gz/bwd_window), by JAX field names.
class Step:
    def __init__(self, y, dx, state=None, backward=None):
        self.y, self.dx = y, dx
        self.state, self.backward = state or {}, backward or {}


def _stateless(forward):
    """A Step function from `forward(x, params, options)` of a per-token norm."""
    def step(x, mask, dy, params, options):
        del mask
        y = forward(x, params, options)
        return Step(y, numeric_vjp(lambda v: forward(v, params, options), x, dy))
    return step


def _per_token_axis(options):
    if options.get('axis', -1) not in (-1, (-1,)):
        raise NotImplementedError('the references reduce over the last axis only')
    return options


def _stateful(make, fields, backward=()):
    """A Step function from `make(C, options)` -> a *Ref object and {JAX field: attribute}."""
    def step(x, mask, dy, params, options):
        if options.get('num_batch_groups', 1) != 1:
            raise NotImplementedError('one batch group')
        ref = make(x.shape[-1], options)
        y = ref.forward(x, mask, True, params.get('scale'), params.get('bias'))
        before = {k: np.copy(getattr(ref, fields[k])) for k in backward}
        dx = ref.backward(dy)[0]
        return Step(y, dx, {k: getattr(ref, a) for k, a in fields.items() if k not in backward},
                    {k: getattr(ref, fields[k]) - before[k] for k in backward})
    return step


def _then_affine(z, params):
    s, b = _affine(z.shape[-1], params.get('scale'), params.get('bias'))
    return z * s + b


def _pick(options, *names):
    return {n: options[n] for n in names}


def _power_norm_ref(c, o):
    if o['backward'] not in (None, 'approximate'):
        raise NotImplementedError(o['backward'])
    return PowerNormRef(c, **_pick(o, 'num_groups', 'warmup_steps', 'alpha_fwd', 'alpha_bkw', 'eps',
                                   'group_scaling_eps', 'use_group_scaling',
                                   'backward_denominator', 'grad_mean_over'))


def toy_center(x, scale=None, bias=None, center=True):
    """The toy norm of tests/norm_cases.py: (x - mean over C) * scale + bias."""
    x = _f64(x)
    s, b = _affine(x.shape[-1], scale, bias)
    return ((x - x.mean(-1, keepdims=True)) if center else x) * s + b


class ToyRunningMeanRef:
    """The stateful toy of tests/norm_cases.py: (x - mean over real rows) * scale + bias;
    mean <- m mean + (1 - m) batch mean. Eval (or no real row): the running mean."""

    def __init__(self, C, momentum=0.9):
        self.momentum, self.mean = momentum, np.zeros(C)

    def forward(self, x, mask=None, train=True, scale=None, bias=None):
        x = _f64(x)
        m = _mask(mask, x.shape[0])
        s, b = _affine(x.shape[-1], scale, bias)
        self._scale = s
        if train and m.any():
            mu = x[m].mean(0)
            self.mean = self.momentum * self.mean + (1 - self.momentum) * mu
            self._corr = m[:, None] / m.sum()
        else:
            mu, self._corr = self.mean, None
        return (x - mu) * s + b

    def backward(self, dy):
        g = self._scale * _f64(dy)
        dx = g if self._corr is None else g - self._corr * g.sum(0)
        return dx, None, None


REFERENCES = {
    'layernorm': _stateless(lambda x, p, o: layer_norm(
        x, p.get('scale'), p.get('bias'), _per_token_axis(o)['eps'])),
    'rmsnorm': _stateless(lambda x, p, o: rms_norm(
        x, p.get('scale'), p.get('bias'), _per_token_axis(o)['eps'])),
    'group_scaling': _stateless(lambda x, p, o: _then_affine(
        group_scaling(x, o['num_groups'], o['eps']), p)),
    'dyt': _stateless(lambda x, p, o: dyt(x, p.get('alpha', o['alpha']), p.get('scale'),
                                          p.get('bias'))),
    'crmsnorm': _stateless(lambda x, p, o: crms_norm(x, o['eps'], p.get('scale'), p.get('bias'))),
    'groupnorm': _stateless(lambda x, p, o: group_norm(x, o['num_groups'], p.get('scale'),
                                                       p.get('bias'), o['eps'])),
    'evonorm_s0': _stateless(lambda x, p, o: evonorm_s0(
        x, o['num_groups'], p.get('v'), p.get('scale'), p.get('bias'), o['eps'],
        o['nonlinearity'])),
    'layernorm_scaling': _stateless(lambda x, p, o: layer_norm_scaling(
        x, o['layer_index'], o['base'], p.get('scale'), p.get('bias'),
        _per_token_axis(o)['eps'])),
    'batchnorm': _stateful(lambda c, o: BatchNormRef(c, o['momentum'], o['eps']),
                           {'mean': 'mean', 'var': 'var'}),
    'paper_batchnorm': _stateful(
        lambda c, o: PaperBatchNormRef(c, **_pick(o, 'momentum', 'eps', 'layer_scaling_eps')),
        {'running_mean': 'mean', 'running_var': 'var'}),
    'pn_v': _stateful(lambda c, o: PNVRef(c, **_pick(o, 'num_groups', 'momentum', 'eps',
                                                     'group_scaling_eps', 'use_group_scaling')),
                      {'running_phi': 'phi'}),
    'powernorm': _stateful(_power_norm_ref, {'running_phi': 'phi', 'step': 't', 'ema_gz': 'u'},
                           backward=('ema_gz',)),
    'unified': _stateful(
        lambda c, o: UnifiedNormRef(c, **_pick(
            o, 'window_size', 'warmup_steps', 'momentum', 'eps', 'outlier_filtration',
            'compensation_delay', 'compensation_clamp', 'mean_over')),
        {'running_var': 'R', 'fwd_window': 'F', 'step': 't', 'skip_count': 'skip_counter',
         'ema_gz': 'nu', 'bwd_window': 'H'}, backward=('ema_gz', 'bwd_window')),
    # The toy norms of tests/norm_cases.py (registered only by the `toy_norms` fixture).
    'toy_center': _stateless(lambda x, p, o: toy_center(x, p.get('scale'), p.get('bias'),
                                                        o['center'])),
    'toy_running_mean': _stateful(lambda c, o: ToyRunningMeanRef(c, o['momentum']),
                                  {'mean': 'mean'}),
}


# ----------------------------------------------------------------------------- the family additions
# Derf, SeeDNorm, EvoNorm-B0, BCN and Weight Standardization, from the formulas of
# /work/shared/research/norms_2025.md and norms_zoo.md sections 6-7 (float64 NumPy).
_erf = np.vectorize(__import__('math').erf, otypes=[np.float64])


def derf(x, alpha, shift, scale=None, bias=None):
    """Derf: scale * erf(alpha x + shift) + bias, alpha and shift scalars."""
    x = _f64(x)
    s, b = _affine(x.shape[-1], scale, bias)
    a, sh = float(np.reshape(alpha, -1)[0]), float(np.reshape(shift, -1)[0])
    return _erf(a * x + sh) * s + b


def seednorm(x, alpha=None, beta=None, scale=None, bias=None, eps=1e-6):
    """SeeDNorm per row: [tanh(x . beta) alpha + scale] * x / sqrt(mean(x^2) + eps) + bias."""
    x = _f64(x)
    c = x.shape[-1]
    s, b = _affine(c, scale, bias)
    alpha = np.ones(c) if alpha is None else _f64(alpha)
    beta = np.zeros(c) if beta is None else _f64(beta)
    rms = np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    gain = np.tanh(x @ beta)[:, None] * alpha + s
    return gain * x / rms + b


def evonorm_b0(x, mask, var, train, params, decay=0.9, eps=1e-5):
    """EvoNorm-B0 (zoo 6) on x [B, T, C], mask [B, T] (or None); returns (y, new moving var).

    Training (with a real token): s2_batch = biased var of each feature over the real tokens;
    else the moving var. s2_inst: biased var per (example, feature) over the example's real tokens
    (all its tokens when it has none). y = x / max(sqrt(s2_b + eps), v x + sqrt(s2_i + eps)) * scale
    + bias. The moving var moves (decay var + (1 - decay) s2_b) only for a finite training batch.
    """
    x = _f64(x)
    bsz, t, c = x.shape
    m = np.ones((bsz, t), bool) if mask is None else np.asarray(mask, bool).reshape(bsz, t)
    var = _f64(var)
    new_var = var
    if train and m.any():
        rows = x[m]
        sb = ((rows - rows.mean(0)) ** 2).mean(0)
        if np.all(np.isfinite(sb)):
            new_var = decay * var + (1 - decay) * sb
    else:
        sb = var
    si = np.empty((bsz, 1, c))
    for i in range(bsz):
        rows = x[i][m[i]] if m[i].any() else x[i]
        si[i, 0] = ((rows - rows.mean(0)) ** 2).mean(0)
    v = np.ones(c) if params.get('v') is None else _f64(params['v'])
    s, b = _affine(c, params.get('scale'), params.get('bias'))
    den = np.maximum(np.sqrt(sb + eps), v * x + np.sqrt(si + eps))
    return x / den * s + b, new_var


def bcn(x, mask, mean, var, train, params, num_groups=32, momentum=0.9, eps=1e-5, group_eps=1e-5):
    """BCN (zoo 7) on rows x [N, C]: masked BN (scale/bias per feature; running stats in eval or
    without a real row) then per-row GroupNorm with the per-group affine. Returns (y, mean, var),
    the running stats moved (momentum, biased var) only for a finite training batch."""
    x = _f64(x)
    n, c = x.shape
    m = _mask(mask, n)
    mean, var = _f64(mean), _f64(var)
    new_mean, new_var = mean, var
    if train and m.any():
        mu = x[m].mean(0)
        sb = ((x[m] - mu) ** 2).mean(0)
        if np.all(np.isfinite(mu)) and np.all(np.isfinite(sb)):
            new_mean = momentum * mean + (1 - momentum) * mu
            new_var = momentum * var + (1 - momentum) * sb
    else:
        mu, sb = mean, var
    s, b = _affine(c, params.get('scale'), params.get('bias'))
    z = (x - mu) / np.sqrt(sb + eps) * s + b
    zg = _groups(z, num_groups)
    u = (zg - zg.mean(-1, keepdims=True)) / np.sqrt(zg.var(-1, keepdims=True) + group_eps)
    gs = np.ones(num_groups) if params.get('group_scale') is None else _f64(params['group_scale'])
    gb = np.zeros(num_groups) if params.get('group_bias') is None else _f64(params['group_bias'])
    return (u * gs[:, None] + gb[:, None]).reshape(n, c), new_mean, new_var


def weight_standardize(w, eps=1e-5, ddof=0):
    """(W - column mean) / (column std + eps), columns = the last axis, std with `ddof`."""
    w = _f64(w)
    cols = w.reshape(-1, w.shape[-1])
    centered = cols - cols.mean(0)
    std = np.sqrt((centered ** 2).sum(0) / (cols.shape[0] - ddof))
    return (centered / (std + eps)).reshape(w.shape)


def _evonorm_b0_step(x, mask, dy, params, options, token_shape):
    """One training step from a fresh state; dx by central differences of the NumPy forward."""
    if options.get('num_batch_groups', 1) != 1:
        raise NotImplementedError('one batch group')
    c = x.shape[-1]
    shape = tuple(token_shape) + (c,)
    o = _pick(options, 'decay', 'eps')
    f = lambda v: evonorm_b0(v.reshape(shape), mask, np.ones(c), True, params, **o)[0].reshape(-1, c)
    _, new_var = evonorm_b0(x.reshape(shape), mask, np.ones(c), True, params, **o)
    return Step(f(x), numeric_vjp(f, x, dy), {'var': new_var})


_evonorm_b0_step.token_shape = True  # norm_cases.check_reference passes x.shape[:-1]


def _bcn_step(x, mask, dy, params, options):
    if options.get('num_batch_groups', 1) != 1:
        raise NotImplementedError('one batch group')
    c = x.shape[-1]
    o = _pick(options, 'num_groups', 'momentum', 'eps', 'group_eps')
    f = lambda v: bcn(v, mask, np.zeros(c), np.ones(c), True, params, **o)[0]
    _, mean, var = bcn(x, mask, np.zeros(c), np.ones(c), True, params, **o)
    return Step(f(x), numeric_vjp(f, x, dy), {'mean': mean, 'var': var})


REFERENCES.update({
    'derf': _stateless(lambda x, p, o: derf(x, p.get('alpha', o['alpha']), p.get('shift', o['shift']),
                                            p.get('scale'), p.get('bias'))),
    'seednorm': _stateless(lambda x, p, o: seednorm(x, p.get('alpha'), p.get('beta'), p.get('scale'),
                                                    p.get('bias'), o['eps'])),
    'evonorm_b0': _evonorm_b0_step,
    'bcn': _bcn_step,
})
