"""The Triton kernels of the fused selection (device code only; the host side is :mod:`bh_helpers.selection.fused`).

``_select_kernel`` computes p-values (given, or looked up in a null's tables inside the kernel),
the step-up count of the chosen procedure, the min/max clamp and the weights of one row per
program; ``_sorted_select_kernel`` does the same from a sorted row and precomputed logit cuts.
Float64 arithmetic goes through libdevice on GPUs and plain operators under the interpreter
(``TRITON_INTERPRET=1``), which is the CPU oracle of every kernel here.
"""

from __future__ import annotations

import importlib.util

#: Whether Triton is installed (the kernels below exist only then).
HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON"]


if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    # One wrapper per float64 operation, alike in shape on purpose: each picks at COMPILE time
    # (constexpr LIBDEV) between the libdevice intrinsic (GPU, correctly rounded, no FMA
    # contraction) and the plain operator (the interpreter has no libdevice). Folding them into
    # one helper would need a constexpr operation code and a branch per operation: the same
    # lines, less readable at the call sites.
    @triton.jit
    def _exp64(x, LIBDEV: tl.constexpr):
        if LIBDEV:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def _expm1_64(x, LIBDEV: tl.constexpr):
        if LIBDEV:
            return libdevice.expm1(x)
        else:
            return tl.exp(x) - 1.0  # interpreter only (lower tail, p near 1: never selected)

    @triton.jit
    def _add(a, b, LIBDEV: tl.constexpr):
        # Round-to-nearest add/mul/div: no fused multiply-add contraction, as in torch's kernels.
        if LIBDEV:
            return libdevice.add_rn(a, b)
        else:
            return a + b

    @triton.jit
    def _sub(a, b, LIBDEV: tl.constexpr):
        if LIBDEV:
            return libdevice.sub_rn(a, b)
        else:
            return a - b

    @triton.jit
    def _mul(a, b, LIBDEV: tl.constexpr):
        if LIBDEV:
            return libdevice.mul_rn(a, b)
        else:
            return a * b

    @triton.jit
    def _div(a, b, LIBDEV: tl.constexpr):
        if LIBDEV:
            return libdevice.div_rn(a, b)
        else:
            return a / b

    @triton.jit
    def _sqrt64(x, LIBDEV: tl.constexpr):
        if LIBDEV:
            return libdevice.sqrt_rn(x)
        else:
            return tl.sqrt(x)

    @triton.jit
    def _pvalues_from_null(x, e, emask, gs_ptr, bk_ptr, prm_ptr, G, B,
                           PER_EXPERT: tl.constexpr, ITERS: tl.constexpr, LIBDEV: tl.constexpr):
        """NullModel.sf(x) in float64, rounded to float32 and clipped; x: (R, EP) float32."""
        xq = x.to(tl.float64)
        if PER_EXPERT:
            row = e  # (1, EP)
        else:
            row = e * 0
        pbase = prm_ptr + row * 9
        x_min = tl.load(pbase + 0, mask=emask, other=0.0)
        inv_h = tl.load(pbase + 1, mask=emask, other=1.0)
        x_max = tl.load(pbase + 2, mask=emask, other=1.0)
        sf_first = tl.load(pbase + 3, mask=emask, other=1.0)
        sf_last = tl.load(pbase + 4, mask=emask, other=1.0)
        log_sf_last = tl.load(pbase + 5, mask=emask, other=0.0)
        log_cdf_first = tl.load(pbase + 6, mask=emask, other=0.0)
        beta_upper = tl.load(pbase + 7, mask=emask, other=1.0)
        beta_lower = tl.load(pbase + 8, mask=emask, other=1.0)

        # searchsorted(grid, x, right=True) = number of grid points <= x, in [lo, hi].
        t = tl.floor(_mul(_sub(xq, x_min, LIBDEV), inv_h, LIBDEV))
        t = tl.minimum(tl.maximum(t, 0.0), (B - 1) * 1.0)  # NaN-free logits assumed (validated)
        b = t.to(tl.int32)
        bptr = bk_ptr + (row * B + b) * 2
        lo = tl.load(bptr, mask=emask, other=0)
        hi = tl.load(bptr + 1, mask=emask, other=0)
        gbase = gs_ptr + row.to(tl.int64) * G * 2
        for _ in tl.static_range(ITERS):
            active = lo < hi
            mid = (lo + hi) >> 1
            gm = tl.load(gbase + mid.to(tl.int64) * 2, mask=active & emask, other=0.0)
            le = gm <= xq
            lo = tl.where(active & le, mid + 1, lo)
            hi = tl.where(active & (~le), mid, hi)
        idx = lo
        upper = (idx == G) & (xq > x_max)
        lower = idx == 0
        j = tl.minimum(tl.maximum(idx - 1, 0), G - 2).to(tl.int64)
        x0 = tl.load(gbase + j * 2, mask=emask, other=0.0)
        y0 = tl.load(gbase + j * 2 + 1, mask=emask, other=1.0)
        x1 = tl.load(gbase + j * 2 + 2, mask=emask, other=1.0)
        y1 = tl.load(gbase + j * 2 + 3, mask=emask, other=1.0)
        den = tl.maximum(_sub(x1, x0, LIBDEV), 2.2250738585072014e-308)
        w = _div(_sub(xq, x0, LIBDEV), den, LIBDEV)
        w = tl.minimum(tl.maximum(w, 0.0), 1.0)
        y = _add(y0, _mul(w, _sub(y1, y0, LIBDEV), LIBDEV), LIBDEV)
        y = tl.minimum(tl.maximum(y, tl.minimum(y0, y1)), tl.maximum(y0, y1))
        log_sf_up = tl.minimum(_sub(log_sf_last, _div(_sub(xq, x_max, LIBDEV), beta_upper, LIBDEV), LIBDEV), log_sf_last)
        log_cdf_lo = tl.minimum(_add(log_cdf_first, _div(_sub(xq, x_min, LIBDEV), beta_lower, LIBDEV), LIBDEV), log_cdf_first)
        up_val = tl.minimum(_exp64(log_sf_up, LIBDEV), sf_last)
        lo_val = tl.maximum(-_expm1_64(log_cdf_lo, LIBDEV), sf_first)
        sf = tl.where(upper, up_val, tl.where(lower, lo_val, y))
        p = sf.to(tl.float32)
        p = tl.minimum(tl.maximum(p, 1.1754943508222875e-38), 0.99999994)  # [tiny, 1 - eps/2]
        return p

    @triton.jit
    def _slot_weights(used, probs, cnt, WMODE: tl.constexpr, pvals):
        """Weights ``(R, S)`` at the used slots, 0 elsewhere: 1/count (2), the softmax probabilities
        ``probs`` (1), those renormalised over the used slots (0), or ``1/p`` of the float32
        p-values ``pvals`` renormalised, as a softmax of ``-log p`` (3)."""
        if WMODE == 3:
            nlp = tl.where(used, -tl.log(tl.maximum(pvals, 1.1754943508222875e-38)), float("-inf"))
            top = tl.max(nlp, axis=1)[:, None]
            e = tl.where(used, tl.exp(nlp - tl.where(top > float("-inf"), top, 0.0)), 0.0)
            total = tl.sum(e, axis=1)[:, None]
            w = tl.where(total > 0, e / tl.maximum(total, 1.1754943508222875e-38), e)
        elif WMODE == 2:
            w = tl.where(used, 1.0 / tl.maximum(cnt, 1).to(tl.float32)[:, None], 0.0)
        else:
            w = tl.where(used, probs, 0.0)
            if WMODE == 0:
                total = tl.sum(w, axis=1)[:, None]
                w = tl.where(total > 0, w / tl.maximum(total, 1.1754943508222875e-38), w)
        return w

    @triton.jit
    def _select_kernel(
        logits_ptr, stride_l, pv_ptr, stride_p,
        gs_ptr, bk_ptr, prm_ptr, G, B,
        thr_ptr, idx_ptr, w_ptr, cnt_ptr,
        T, min_k, temperature,
        E: tl.constexpr, EP: tl.constexpr, MAX_K: tl.constexpr, KP: tl.constexpr,
        BLOCK_R: tl.constexpr, PMODE: tl.constexpr, STEP_DOWN: tl.constexpr, WMODE: tl.constexpr,
        PER_EXPERT: tl.constexpr, ITERS: tl.constexpr, LIBDEV: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
        rmask = rows < T
        cols = tl.arange(0, EP)  # (EP,)
        r2 = rows[:, None].to(tl.int64)  # (R, 1)
        e2 = cols[None, :]  # (1, EP)
        emask = e2 < E
        m2 = rmask[:, None] & emask  # (R, EP)

        x = tl.load(logits_ptr + r2 * stride_l + e2, mask=m2, other=float("-inf")).to(tl.float32)
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: torch orders them as equal

        # 1. p-values
        if PMODE == 2:
            p = _pvalues_from_null(x, e2, emask, gs_ptr, bk_ptr, prm_ptr, G, B, PER_EXPERT, ITERS, LIBDEV)
            p = tl.where(m2, p, 2.0)
        else:
            p = tl.load(pv_ptr + r2 * stride_p + e2, mask=m2, other=2.0).to(tl.float32)

        # 2. count per row
        ranks = tl.arange(0, EP)[None, :] + 1  # (1, EP)
        sorted_p = tl.sort(p, dim=1)  # (R, EP) ascending
        thr = tl.load(thr_ptr + cols)[None, :]  # (1, EP) float32, rounded down; -1 when padded
        below = sorted_p <= thr
        if STEP_DOWN:
            cnt = tl.min(tl.where(below, E, ranks - 1), axis=1)
        else:
            cnt = tl.max(tl.where(below, ranks, 0), axis=1)
        cnt = tl.minimum(tl.maximum(cnt, min_k), MAX_K)

        # 3. ranked experts: key = (p bits, descending logit bits), ties to the lower id
        pbits = p.to(tl.int32, bitcast=True).to(tl.int64)  # p >= 0: bits are monotone
        u = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        asc = tl.where(u >= 0x80000000, (~u) & 0xFFFFFFFF, u | 0x80000000)  # increasing in x
        key = (pbits << 32) | (0xFFFFFFFF - asc)
        key = tl.where(m2, key, 0x7FFFFFFFFFFFFFFF)

        # softmax over all experts (float32)
        xs = x / temperature
        mx = tl.max(xs, axis=1)
        ex = tl.exp(xs - mx[:, None])
        ex = tl.where(m2, ex, 0.0)
        probs = ex / tl.sum(ex, axis=1)[:, None]

        kcols = tl.arange(0, KP)[None, :]  # (1, KP)
        chosen = tl.zeros([BLOCK_R, KP], dtype=tl.int32)
        chosen_x = tl.zeros([BLOCK_R, KP], dtype=tl.float32)
        chosen_p = tl.zeros([BLOCK_R, KP], dtype=tl.float32)  # softmax probabilities
        chosen_pv = tl.zeros([BLOCK_R, KP], dtype=tl.float32)  # p-values (inverse_p weights)
        for r in tl.static_range(MAX_K):
            j = tl.argmin(key, axis=1)  # (R,) first index among equal keys
            hit = e2 == j[:, None]  # (R, EP)
            xj = tl.sum(tl.where(hit, x, 0.0), axis=1)
            pj = tl.sum(tl.where(hit, probs, 0.0), axis=1)
            key = tl.where(hit, 0x7FFFFFFFFFFFFFFF, key)
            at = kcols == r
            chosen = tl.where(at, j[:, None], chosen)
            chosen_x = tl.where(at, xj[:, None], chosen_x)
            chosen_p = tl.where(at, pj[:, None], chosen_p)
            if WMODE == 3:
                chosen_pv = tl.where(at, tl.sum(tl.where(hit, p, 0.0), axis=1)[:, None], chosen_pv)

        used = kcols < cnt[:, None]  # (R, KP) rounds that are selected
        # 4. order the selected by decreasing logit, ties by rank (round)
        xa = chosen_x[:, :, None]  # (R, KP, 1) this round
        xb = chosen_x[:, None, :]  # (R, 1, KP) other rounds
        ra = tl.arange(0, KP)[None, :, None]
        rb = tl.arange(0, KP)[None, None, :]
        before = (xb > xa) | ((xb == xa) & (rb < ra))
        before = before & used[:, None, :]
        slot = tl.sum(before.to(tl.int32), axis=2)  # (R, KP)
        slot = tl.where(used, slot, kcols)

        # 5. weights
        w = _slot_weights(used, chosen_p, cnt, WMODE, chosen_pv)

        out_mask = rmask[:, None] & (kcols < MAX_K)
        dest = r2 * MAX_K + slot
        tl.store(idx_ptr + dest, tl.where(used, chosen, -1).to(tl.int64), mask=out_mask)
        tl.store(w_ptr + dest, w, mask=out_mask)
        tl.store(cnt_ptr + rows, cnt.to(tl.int64), mask=rmask)


    @triton.jit
    def _ordered_int(x):
        """float32 -> int32, increasing in the value (for NaN-free x)."""
        b = x.to(tl.int32, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)

    @triton.jit(do_not_specialize=["T"])  # one compiled variant for every row count (see _launch_sorted_kernel)
    def _sorted_select_kernel(
        logits_ptr, cut_ptr, idx_ptr, w_ptr, cnt_ptr, T,
        E: tl.constexpr, EP: tl.constexpr, MAX_K: tl.constexpr, BLOCK_R: tl.constexpr,
        CUT: tl.constexpr, STEP_DOWN: tl.constexpr, MIN_K: tl.constexpr, WMODE: tl.constexpr,
        TEMPERATURE: tl.constexpr, STAT: tl.constexpr, LIBDEV: tl.constexpr,
    ):
        """Top-k (CUT=False, MIN_K=k) or a pooled-null test by logit cuts (CUT=True), one sort per row.

        Experts are ranked by decreasing logit, ties to the lower id: for a pooled null that is
        exactly the reference's order (smallest p-value, then larger logit, then lower id), since
        the p-value is non-increasing in the logit. One descending sort of 64-bit keys
        ``(ordered logit bits, EP - 1 - id)`` gives both the order and the ids. With a per-token
        statistic (STAT 1: centred, 2: z-score) the cuts apply to ``(x - shift) / scale`` of each
        row, shift and scale accumulated in float64 and rounded once to float32, then the same
        round-to-nearest float32 operations as :func:`bh_helpers.nulls.statistics.apply_statistic`;
        the statistic is monotone in the logit, so the ranking is unchanged.
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
        rmask = rows < T
        r2 = rows[:, None].to(tl.int64)  # (R, 1)
        e2 = tl.arange(0, EP)[None, :]  # (1, EP)
        m2 = rmask[:, None] & (e2 < E)  # (R, EP)
        x = tl.load(logits_ptr + r2 * E + e2, mask=m2, other=float("-inf")).to(tl.float32)
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: torch orders them as equal

        key = (_ordered_int(x).to(tl.int64) << 32) | (EP - 1 - e2).to(tl.int64)  # (R, EP)
        key = tl.sort(key, dim=1, descending=True)  # padded columns (-inf, high ids) last
        hi = (key >> 32).to(tl.int32)
        xs = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)  # (R, EP) logits, sorted
        ids = (EP - 1) - (key & 0xFFFFFFFF).to(tl.int32)  # (R, EP) their expert ids

        if CUT:
            ranks = e2 + 1  # (1, EP)
            cut = tl.load(cut_ptr + e2)  # (1, EP) float32; NaN: never passes
            if STAT == 0:
                ok = xs >= cut
            else:
                x64 = tl.where(m2, x.to(tl.float64), 0.0)  # (R, EP) padded lanes out of the sums
                n64 = tl.zeros([BLOCK_R], dtype=tl.float64) + E  # (R,) the expert count, as a float64 tensor
                mean = _div(tl.sum(x64, axis=1), n64, LIBDEV)[:, None]  # (R, 1) float64
                ts = _sub(xs, mean.to(tl.float32), LIBDEV)  # (R, EP) float32, as torch computes it
                if STAT == 2:
                    dev = tl.where(m2, _sub(x64, mean, LIBDEV), 0.0)
                    var = _div(tl.sum(_mul(dev, dev, LIBDEV), axis=1), n64, LIBDEV)[:, None]
                    scale = _sqrt64(var, LIBDEV).to(tl.float32)
                    ts = _div(ts, tl.where(scale > 0, scale, 1.0), LIBDEV)
                ok = ts >= cut
            if STEP_DOWN:
                cnt = tl.min(tl.where(ok, E, ranks - 1), axis=1)
            else:
                cnt = tl.max(tl.where(ok, ranks, 0), axis=1)
            cnt = tl.minimum(tl.maximum(cnt, MIN_K), MAX_K)
        else:
            cnt = tl.zeros([BLOCK_R], dtype=tl.int32) + MIN_K
        used = e2 < cnt[:, None]  # (R, EP): the first cnt sorted experts

        # weights: softmax over all experts (float32), taken at the sorted positions
        mx = tl.max(x / TEMPERATURE, axis=1)[:, None]  # (R, 1)
        den = tl.sum(tl.where(m2, tl.exp(x / TEMPERATURE - mx), 0.0), axis=1)[:, None]
        probs = tl.exp(xs / TEMPERATURE - mx) / den
        w = _slot_weights(used, probs, cnt, WMODE, probs)  # no p-values here: WMODE is never 3

        out_mask = rmask[:, None] & (e2 < MAX_K)
        dest = r2 * MAX_K + e2
        tl.store(idx_ptr + dest, tl.where(used, ids, -1).to(tl.int64), mask=out_mask)
        tl.store(w_ptr + dest, w, mask=out_mask)
        tl.store(cnt_ptr + rows, cnt.to(tl.int64), mask=rmask)
