"""The Mamba-2 decode step as three Triton kernels per layer, state rows read and written in place by index.

Per layer, for M rows (E d_inner, C conv_dim, H heads, P headdim, G groups, N d_state, K d_conv):

1. `_rms_proj_kernel` (in_proj): prologue, the RMSNorm of each residual row (layer 0 reads the
   embedding rows of the tokens instead, and stores them as the residual); the GEMM with in_proj
   [E + C + H, d_model]; epilogue, for the C convolution columns, the conv state update (window
   shifted by one, the new column in), the depthwise conv with its bias and SiLU. Every conv channel
   belongs to one program, so the state is updated in place without a race. Out: `act` [M, 2E+2GN+H]
   holding z, the convolved x|B|C and the raw dt.
2. `_ssm_kernel`: per (row, head, block of P): dt = softplus(dt + dt_bias), dA = exp(dt A), state =
   state * dA + dt x B (read from the source row, written to the destination row), y = C.state + D x,
   then the gate y * silu(z). Out: `gated` [M, E].
3. `_gated_proj_kernel` (out_proj): prologue, the gated RMSNorm per group (it reduces over all the
   heads of a group, which kernel 2 splits over programs, hence a kernel boundary); the GEMM with
   out_proj; epilogue, the residual add, so the next layer's kernel 1 only normalises.

After the last layer, kernel 1's GEMM with a plain epilogue is norm_f + lm_head. So a step is
3 L + 1 kernels; the layered step (model.py) launches ~15 per layer (norms, GEMMs, the torch
convolution update, the state update, the gated norm, and the A = -exp(A_log) of every layer).

Why GEMMs in Triton and not cuBLAS: the norms' prologues and the conv / residual epilogues need the
GEMM's program structure; cuBLAS would add one kernel on each side of every projection. At batch 1
the projections are GEMVs (one row of activations; a reduction over K in registers), from batch 2
`tl.dot` tiles of 16 to 64 rows.

Rows: the state tensors are per layer `conv [R, C, K]` and `ssm [R, H, P, N]` over R pool rows;
batch entry m reads row `src_rows[m]` and writes row `dst_rows[m]` (the same for an in-place step;
None for both: rows 0..M-1). The destination rows must be distinct, and none may be another entry's
source row: programs of different entries run in any order.

Arithmetic is fp32 inside; values are rounded to the model's dtype where the reference backbone
stores them in it (the GEMM outputs, the conv output, y, the norms' outputs, the residual add's
input), so that in bf16 the two backbones differ by bf16 noise, not by a different rounding plan; in
fp32 every rounding is exact. The kernels avoid constructs Triton's CPU interpreter cannot run
(`TRITON_INTERPRET=1`), which is how tests/test_step_kernels.py checks them without a GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..config import ConfigError, MambaConfig
from ..state import RecurrentState
from .tiles import proj_tiles

MAX_D_CONV = 4        # the conv window lives in registers, one tensor per tap
BF16_DOT = True       # a bf16 model's projections multiply bf16 operands on the GPU (see _accumulate)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)   # as torch.nn.functional.softplus: above it softplus(x) = x


@triton.jit
def _row_rstd(a_ptr, a_rows, m_ok, eps, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(a^2) + eps) of the rows at offsets a_rows [BLOCK_M] -> [BLOCK_M] fp32."""
    ks = tl.arange(0, BLOCK_K)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        a = tl.load(a_ptr + a_rows[:, None] + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(a * a, axis=1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def _round(x, BF16: tl.constexpr):
    """x (fp32) rounded to bf16 when BF16 (round to nearest even, by its bits), kept in fp32.

    By bits because the CPU interpreter's float casts truncate (and its round-to-nearest mode does
    not carry into the exponent); a value rounded here is stored to a bf16 tensor exactly."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _accumulate(acc, a, w, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_DOT: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += a [BLOCK_M, BLOCK_K] @ w [BLOCK_N, BLOCK_K]^T; a and w fp32 holding
    model-dtype values, so every product is exact and the sum is fp32. For a bf16 model the operands
    go to the tensor cores as bf16 (BF16_DOT: exact, they hold bf16 values; half the shared memory
    and twice the rate of tf32) or in tf32, which holds them exactly too (the CPU interpreter, which
    multiplies bf16 operands as integers)."""
    if BLOCK_M == 1:   # a GEMV
        acc += tl.sum(a * w, axis=1)[None, :]
    elif BF16_DOT:
        acc = tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)
    else:
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20) with an accurate log1p: dt_bias puts most of dt near 1e-3,
    where log(1 + exp(x)) loses 4 of fp32's digits."""
    e = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(x > SOFTPLUS_THRESHOLD, x, log1p)


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


# Compiled once per tile size and dtype, not per batch: M only bounds masks, and the token and row
# vectors are read one entry per row (their alignment varies with where a caller slices them), so
# Triton does not specialize on either (the captured buckets 2, 4, 8, 16 share one BLOCK_M 16 kernel).
INDEX_VECTORS = ["tokens_ptr", "src_rows_ptr", "dst_rows_ptr"]


@triton.jit(do_not_specialize=["M"], do_not_specialize_on_alignment=INDEX_VECTORS)
def _rms_proj_kernel(
        a_ptr, stride_a, tokens_ptr, norm_w_ptr, w_ptr, stride_w, out_ptr, stride_out, res_ptr, stride_res,
        conv_w_ptr, conv_b_ptr, conv_src_ptr, conv_dst_ptr, src_rows_ptr, dst_rows_ptr, sc0, sc1, sc2,
        M, N, eps, conv_lo, conv_hi, K: tl.constexpr,
        FROM_EMBEDDING: tl.constexpr, CONV: tl.constexpr, HAS_ROWS: tl.constexpr, D_CONV: tl.constexpr,
        MODEL_BF16: tl.constexpr, STATE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BF16_DOT: tl.constexpr):
    """out[m, n] = (rmsnorm(a[m]) @ w^T)[n], plus the conv epilogue when CONV (see the module docstring).

    a: [M, K] residual rows, or with FROM_EMBEDDING the embedding table [V, K] read at rows tokens[m]
    (then also stored to res [M, K], by the programs of the first column block); w: [N, K]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    m_ok = ms < M
    n_ok = ns < N
    if FROM_EMBEDDING:
        a_rows = tl.load(tokens_ptr + ms, mask=m_ok, other=0).to(tl.int64) * stride_a
    else:
        a_rows = ms.to(tl.int64) * stride_a
    rstd = _row_rstd(a_ptr, a_rows, m_ok, eps, K, BLOCK_M, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = ns.to(tl.int64) * stride_w
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        a_ok = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + a_rows[:, None] + kk[None, :], mask=a_ok, other=0.0).to(tl.float32)
        if FROM_EMBEDDING:
            tl.store(res_ptr + ms[:, None].to(tl.int64) * stride_res + kk[None, :], a, mask=a_ok & (pid_n == 0))
        norm_w = tl.load(norm_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        a = _round(a * rstd[:, None] * norm_w[None, :], MODEL_BF16)
        w = tl.load(w_ptr + w_rows[:, None] + kk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = _accumulate(acc, a, w, BLOCK_M, DOT_PRECISION, BF16_DOT)

    out = _round(acc, MODEL_BF16)   # the GEMM's output in the model dtype
    out_ok = m_ok[:, None] & n_ok[None, :]
    if CONV:
        is_conv = (ns >= conv_lo) & (ns < conv_hi) & n_ok
        c = tl.where(is_conv, ns - conv_lo, 0)
        ok = m_ok[:, None] & is_conv[None, :]
        if HAS_ROWS:
            src = tl.load(src_rows_ptr + ms, mask=m_ok, other=0).to(tl.int64)
            dst = tl.load(dst_rows_ptr + ms, mask=m_ok, other=0).to(tl.int64)
        else:
            src = ms.to(tl.int64)
            dst = ms.to(tl.int64)
        src_at = src[:, None] * sc0 + c[None, :] * sc1
        dst_at = dst[:, None] * sc0 + c[None, :] * sc1
        new = _round(out, STATE_BF16)                        # the column the state keeps
        taps = conv_w_ptr + c * D_CONV
        # window after the shift: [old[1], ..., old[K-1], new]; reference order: sum of taps, then bias
        conv = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if D_CONV >= 2:
            s1 = tl.load(conv_src_ptr + src_at + 1 * sc2, mask=ok, other=0.0).to(tl.float32)
            conv += s1 * tl.load(taps + 0, mask=is_conv, other=0.0).to(tl.float32)[None, :]
        if D_CONV >= 3:
            s2 = tl.load(conv_src_ptr + src_at + 2 * sc2, mask=ok, other=0.0).to(tl.float32)
            conv += s2 * tl.load(taps + 1, mask=is_conv, other=0.0).to(tl.float32)[None, :]
        if D_CONV >= 4:
            s3 = tl.load(conv_src_ptr + src_at + 3 * sc2, mask=ok, other=0.0).to(tl.float32)
            conv += s3 * tl.load(taps + 2, mask=is_conv, other=0.0).to(tl.float32)[None, :]
        conv += new * tl.load(taps + (D_CONV - 1), mask=is_conv, other=0.0).to(tl.float32)[None, :]
        conv += tl.load(conv_b_ptr + c, mask=is_conv, other=0.0).to(tl.float32)[None, :]
        tl.debug_barrier()   # every thread's loads of the old window before any store (src may be dst)
        if D_CONV >= 2:
            tl.store(conv_dst_ptr + dst_at + 0 * sc2, s1, mask=ok)
        if D_CONV >= 3:
            tl.store(conv_dst_ptr + dst_at + 1 * sc2, s2, mask=ok)
        if D_CONV >= 4:
            tl.store(conv_dst_ptr + dst_at + 2 * sc2, s3, mask=ok)
        tl.store(conv_dst_ptr + dst_at + (D_CONV - 1) * sc2, new, mask=ok)
        conv = _round(_silu(conv), MODEL_BF16)
        out = tl.where(is_conv[None, :], conv, out)
    tl.store(out_ptr + ms[:, None].to(tl.int64) * stride_out + ns[None, :], out, mask=out_ok)


@triton.jit(do_not_specialize_on_alignment=INDEX_VECTORS[1:])
def _ssm_kernel(
        act_ptr, stride_act, dt_bias_ptr, a_log_ptr, d_ptr, ssm_src_ptr, ssm_dst_ptr, src_rows_ptr, dst_rows_ptr,
        ss0, ss1, ss2, ss3, gated_ptr, stride_gated,
        x_lo, b_lo, c_lo, dt_lo, heads_per_group,
        P: tl.constexpr, NS: tl.constexpr, HAS_ROWS: tl.constexpr, MODEL_BF16: tl.constexpr,
        STATE_BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (row m, head h, block of P channels): the selective state update and the gate."""
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    p_ok = ps < P
    n_ok = ns < NS
    g = h // heads_per_group
    row = act_ptr + m * stride_act
    x = tl.load(row + x_lo + h * P + ps, mask=p_ok, other=0.0)
    z = tl.load(row + h * P + ps, mask=p_ok, other=0.0)
    b = tl.load(row + b_lo + g * NS + ns, mask=n_ok, other=0.0)
    c = tl.load(row + c_lo + g * NS + ns, mask=n_ok, other=0.0)
    dt = _softplus(tl.load(row + dt_lo + h) + tl.load(dt_bias_ptr + h).to(tl.float32))
    decay = tl.exp(dt * -tl.exp(tl.load(a_log_ptr + h).to(tl.float32)))
    if HAS_ROWS:
        src = tl.load(src_rows_ptr + m).to(tl.int64)
        dst = tl.load(dst_rows_ptr + m).to(tl.int64)
    else:
        src = m
        dst = m
    at = h * ss1 + ps[:, None] * ss2 + ns[None, :] * ss3
    ok = p_ok[:, None] & n_ok[None, :]
    state = tl.load(ssm_src_ptr + src * ss0 + at, mask=ok, other=0.0).to(tl.float32)
    state = state * decay + (dt * x)[:, None] * b[None, :]
    tl.store(ssm_dst_ptr + dst * ss0 + at, _round(state, STATE_BF16), mask=ok)
    y = tl.sum(state * c[None, :], axis=1) + x * tl.load(d_ptr + h).to(tl.float32)
    y = _round(y, MODEL_BF16)
    tl.store(gated_ptr + m * stride_gated + h * P + ps, y * _silu(z), mask=p_ok)


@triton.jit(do_not_specialize=["M"])
def _gated_proj_kernel(
        g_ptr, stride_g, norm_w_ptr, w_ptr, stride_w, res_ptr, stride_res,
        M, N, eps, K: tl.constexpr, group_size: tl.constexpr,
        MODEL_BF16: tl.constexpr, RES_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BF16_DOT: tl.constexpr):
    """res[m, n] += (groupwise rmsnorm(g[m]) @ w^T)[n]; g: [M, K] gated; w: [N, K]; each block of K
    lies in one group (_group_block)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    groups = tl.arange(0, BLOCK_G)
    m_ok = ms < M
    n_ok = ns < N
    g_rows = ms.to(tl.int64) * stride_g
    ss = tl.zeros([BLOCK_M, BLOCK_G], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        a = tl.load(g_ptr + g_rows[:, None] + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        ss += tl.where(groups[None, :] == k0 // group_size, tl.sum(a * a, axis=1)[:, None], 0.0)
    rstd = tl.rsqrt(ss / group_size + eps)                      # [BLOCK_M, BLOCK_G]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = ns.to(tl.int64) * stride_w
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        a = tl.load(g_ptr + g_rows[:, None] + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        r = tl.sum(tl.where(groups[None, :] == k0 // group_size, rstd, 0.0), axis=1)
        norm_w = tl.load(norm_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        a = _round(a * r[:, None] * norm_w[None, :], MODEL_BF16)
        w = tl.load(w_ptr + w_rows[:, None] + kk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = _accumulate(acc, a, w, BLOCK_M, DOT_PRECISION, BF16_DOT)

    out = _round(acc, MODEL_BF16)
    at = res_ptr + ms[:, None].to(tl.int64) * stride_res + ns[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    residual = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    tl.store(at, _round(out + residual, RES_BF16), mask=ok)


# ---- launch ------------------------------------------------------------------------------------------

@functools.cache
def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def check_config(config: MambaConfig) -> None:
    """What the step kernels support; raises ConfigError otherwise."""
    s = config.ssm_cfg
    if config.d_intermediate:
        raise ConfigError("the fused step kernels cover Mamba-2 blocks without an MLP (d_intermediate 0)")
    if not 2 <= s.d_conv <= MAX_D_CONV:
        raise ConfigError(f"the fused step kernels take d_conv in [2, {MAX_D_CONV}], got {s.d_conv}")
    if (config.d_inner // s.ngroups) % 16:
        raise ConfigError(f"the fused step kernels need d_inner / ngroups to be a multiple of 16, "
                          f"got {config.d_inner // s.ngroups}")


def _group_block(group_size: int, groups: int, limit: int) -> int:
    """out_proj's K block: `limit` for one group (masked at the end), else the largest power of two
    <= limit that divides group_size (>= 16 by check_config), so that no block straddles two groups."""
    if groups == 1:
        return limit
    block = limit
    while group_size % block:
        block //= 2
    return block


def decode_step(model, tokens: torch.Tensor, state: RecurrentState, src_rows: torch.Tensor | None,
                dst_rows: torch.Tensor | None) -> torch.Tensor:
    """tokens: [M] long; state: R >= M rows ([L, R, C, K] and [L, R, H, P, N]); src_rows, dst_rows:
    [M] int (None: rows 0..M-1, in place); the [M] vectors may be strided. Returns logits
    [M, vocab_size] in the model's dtype."""
    config, s = model.config, model.config.ssm_cfg
    m = tokens.shape[0]
    has_rows = src_rows is not None
    if has_rows and (dst_rows is None or src_rows.shape != (m,) or dst_rows.shape != (m,)):
        raise ValueError(f"src_rows and dst_rows must both be [{m}]")
    # The kernels index tokens and rows as dense vectors (entry m at offset m), and a column of a
    # [B, S] token matrix is strided: made dense here (a no-op for the engine's static buffers).
    tokens = tokens.contiguous()
    if has_rows:
        src_rows, dst_rows = src_rows.contiguous(), dst_rows.contiguous()
    if not has_rows and state.batch < m:
        raise ValueError(f"{m} tokens for a state of {state.batch} rows")
    device, dtype = model.device, model.dtype
    d_model, e, gn, heads = config.d_model, config.d_inner, s.ngroups * s.d_state, config.nheads
    conv_dim, d_in_proj = config.conv_dim, config.d_in_proj
    if dtype not in (torch.float32, torch.bfloat16) or state.ssm.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the fused step kernels run fp32 or bf16 models and states, not {dtype} / {state.ssm.dtype}")
    model_bf16 = dtype == torch.bfloat16
    precision = "tf32" if model_bf16 else "ieee"   # tf32 holds bf16 operands exactly; fp32 stays fp32
    bf16_dot = BF16_DOT and model_bf16 and device.type == "cuda"
    res_dtype = torch.float32 if config.residual_in_fp32 else dtype
    act = torch.empty(m, d_in_proj, dtype=torch.float32, device=device)     # z | conv(x B C) | dt
    gated = torch.empty(m, e, dtype=torch.float32, device=device)           # y * silu(z)
    residual = torch.empty(m, d_model, dtype=res_dtype, device=device)
    logits = torch.empty(m, config.vocab_size, dtype=dtype, device=device)
    rows = (src_rows, dst_rows) if has_rows else (tokens, tokens)           # unread without rows
    embedding = model.backbone.embedding.weight

    name = _device_name(device)
    t_in, t_out, t_head = proj_tiles(m, d_in_proj, d_model, name), proj_tiles(m, d_model, e, name), \
        proj_tiles(m, config.vocab_size, d_model, name)
    group_size = e // s.ngroups
    out_block_k = _group_block(group_size, s.ngroups, t_out.block_k)
    block_p = min(16, triton.next_power_of_2(s.headdim))
    ssm_grid = (m, heads, triton.cdiv(s.headdim, block_p))
    for i, block in enumerate(model.backbone.layers):
        mixer = block.mixer
        conv, ssm = state.conv[i], state.ssm[i]
        first = i == 0
        a = embedding if first else residual
        _rms_proj_kernel[(triton.cdiv(m, t_in.block_m), triton.cdiv(d_in_proj, t_in.block_n))](
            a, a.stride(0), tokens, block.norm.weight, mixer.in_proj.weight, mixer.in_proj.weight.stride(0),
            act, act.stride(0), residual, residual.stride(0),
            mixer.conv1d.weight, mixer.conv1d.bias, conv, conv, *rows, *conv.stride(),
            m, d_in_proj, block.norm.eps, e, e + conv_dim, K=d_model,
            FROM_EMBEDDING=first, CONV=True, HAS_ROWS=has_rows, D_CONV=s.d_conv, MODEL_BF16=model_bf16,
            STATE_BF16=conv.dtype == torch.bfloat16,
            BLOCK_M=t_in.block_m, BLOCK_N=t_in.block_n, BLOCK_K=t_in.block_k, DOT_PRECISION=precision,
            BF16_DOT=bf16_dot, num_warps=t_in.num_warps)
        _ssm_kernel[ssm_grid](
            act, act.stride(0), mixer.dt_bias, mixer.A_log, mixer.D, ssm, ssm, *rows, *ssm.stride(),
            gated, gated.stride(0), e, 2 * e, 2 * e + gn, 2 * e + 2 * gn, heads // s.ngroups,
            P=s.headdim, NS=s.d_state, HAS_ROWS=has_rows, MODEL_BF16=model_bf16,
            STATE_BF16=ssm.dtype == torch.bfloat16,
            BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(s.d_state), num_warps=4)
        _gated_proj_kernel[(triton.cdiv(m, t_out.block_m), triton.cdiv(d_model, t_out.block_n))](
            gated, gated.stride(0), mixer.norm.weight, mixer.out_proj.weight, mixer.out_proj.weight.stride(0),
            residual, residual.stride(0), m, d_model, mixer.norm.eps, K=e, group_size=group_size,
            MODEL_BF16=model_bf16, RES_BF16=res_dtype == torch.bfloat16,
            BLOCK_M=t_out.block_m, BLOCK_N=t_out.block_n, BLOCK_K=out_block_k,
            BLOCK_G=max(2, triton.next_power_of_2(s.ngroups)), DOT_PRECISION=precision,
            BF16_DOT=bf16_dot, num_warps=t_out.num_warps)
    head, norm_f = model.lm_head.weight, model.backbone.norm_f
    _rms_proj_kernel[(triton.cdiv(m, t_head.block_m), triton.cdiv(config.vocab_size, t_head.block_n))](
        residual, residual.stride(0), tokens, norm_f.weight, head, head.stride(0), logits, logits.stride(0),
        residual, residual.stride(0), head, head, head, head, tokens, tokens, 0, 0, 0,
        m, config.vocab_size, norm_f.eps, 0, 0, K=d_model,
        FROM_EMBEDDING=False, CONV=False, HAS_ROWS=False, D_CONV=s.d_conv, MODEL_BF16=model_bf16,
        STATE_BF16=False,
        BLOCK_M=t_head.block_m, BLOCK_N=t_head.block_n, BLOCK_K=t_head.block_k, DOT_PRECISION=precision,
        BF16_DOT=bf16_dot, num_warps=t_head.num_warps)
    return logits
