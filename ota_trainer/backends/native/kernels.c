/* Fused FFG + OTA kernels for the streaming merge engine (ota_trainer.native).
 *
 * Each call handles rows [r0, r1) of one tensor viewed as an (m, n) matrix, for T experts,
 * reading the stored dtypes directly (no float32 copies of whole tensors). The arithmetic is
 * the engine's reference path in ota_trainer/merge.py operation for operation, in the same
 * order and precision, so both give the same bits (tests/test_native.py checks it):
 *
 *   d    = float32(e) - float32(w0)
 *   s    = ((double)d * d) * a_i * b_j        rank-one moments (a, b float64)
 *        = ((double)d * d) * (double)v        full moments
 *        = (double)d * d                      magnitude score
 *   bin  = (bits(s) >> 42) & (2^21 - 1)       the saliency histogram's bin
 *   M    = s >= cut
 *   W    = ((pa_i * pb_j + eps) * M) * c      rank-one curvature, or (P + eps) * M * c with
 *          P = v, sqrt(v), P / mean            full moments, or (1 + eps) * M * c uniform
 *   num  = fma(W, d, num);  den += W     (PyTorch's addcmul_ is fused)
 *   out  = w0 + num / max(den, 2^-149)        then rounded to the output dtype
 *
 * Build: cc -O3 -ffp-contract=off: no implicit FMA contraction (it would change roundings);
 * the one fused multiply-add PyTorch does is written out as fmaf.
 */
#include <float.h>
#include <math.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Portability: every intrinsic is guarded by the extension it needs (__AVX512F__, __AVX2__) and
 * has plain C beside it that gives the same bits (used on aarch64 and x86-64 baseline builds).
 * The hot loops are written without branches (selects are bit masks: see one_if) so that the
 * compiler vectorises them on every target: under -ftrapping-math (the default) gcc if-converts
 * `x >= c ? 1.0f : 0.0f` only where it has masked vector operations (AVX-512); AVX2 (e.g.
 * -march=znver3), SSE2 or NEON builds ran such loops one element at a time, 5-13x slower. */

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { S_NONE = 0, S_RANK1 = 1, S_FULL = 2, S_MAGNITUDE = 3 };
enum { W_UNIFORM = 0, W_RANK1 = 1, W_FULL = 2 };

#define CHUNK 512
#define BIN_SHIFT 42
#define BIN_MASK ((1u << 21) - 1u)

int ota_native_version(void) { return 10; }

int ota_native_has_f16(void) {
#ifdef __FLT16_MAX__
    return 1;
#else
    return 0;
#endif
}

static inline void load_f32(const void *src, int dt, int64_t off, int64_t len, float *dst) {
    if (dt == DT_F32) {
        memcpy(dst, (const float *)src + off, (size_t)len * sizeof(float));
    } else if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        uint32_t *d = (uint32_t *)dst;
        for (int64_t k = 0; k < len; k++) d[k] = (uint32_t)s[k] << 16;
    } else {
#ifdef __FLT16_MAX__
        const _Float16 *s = (const _Float16 *)src + off;
        for (int64_t k = 0; k < len; k++) dst[k] = (float)s[k];
#endif
    }
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float f32_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* 1.0f if c else 0.0f (c is 0 or 1), by a bit mask: the same value as the select, and a loop
 * using it needs no if-conversion to vectorise */
static inline float one_if(int c) { return f32_of((uint32_t)-c & 0x3F800000u); }

static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0x7FC0;  /* NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  /* round to nearest even */
}

static inline void store(void *dst, int dt, int64_t off, int64_t len, const float *src) {
    if (dt == DT_F32) {
        memcpy((float *)dst + off, src, (size_t)len * sizeof(float));
    } else if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (int64_t k = 0; k < len; k++) d[k] = bf16_round(src[k]);
    } else {
#ifdef __FLT16_MAX__
        _Float16 *d = (_Float16 *)dst + off;
        for (int64_t k = 0; k < len; k++) d[k] = (_Float16)src[k];
#endif
    }
}

/* Output bytes go out with non-temporal stores where the destination is aligned: the merged
 * tensor is written once and read next by the disk's DMA (the writer's staging memory), so
 * ordinary stores would first read every output cache line from memory (read-for-ownership).
 * The merge loop is memory-bound (~6 GB/s here): the output's 1 GB of a 0.5B merge was one
 * fifth of its traffic. Callers end with stream_done() (a store fence) before returning. */
static inline void put(void *dst, const void *src, size_t n) {
    char *d = (char *)dst;
    const char *s = (const char *)src;
#if defined(__AVX512F__)
    size_t head = (size_t)(-(uintptr_t)d & 63u);
    if (n >= head + 64) {
        memcpy(d, s, head);
        d += head, s += head, n -= head;
        for (; n >= 64; n -= 64, d += 64, s += 64) _mm512_stream_si512((void *)d, _mm512_loadu_si512((const void *)s));
    }
#elif defined(__AVX2__)
    size_t head = (size_t)(-(uintptr_t)d & 31u);
    if (n >= head + 32) {
        memcpy(d, s, head);
        d += head, s += head, n -= head;
        for (; n >= 32; n -= 32, d += 32, s += 32)
            _mm256_stream_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
    }
#endif
    memcpy(d, s, n);
}

static inline void stream_done(void) {
#if defined(__AVX512F__) || defined(__AVX2__)
    _mm_sfence();  /* the non-temporal stores are visible before the caller hands the output on */
#endif
}

/* store() of a chunk through put(): the output dtype's bytes made here, then streamed out. */
static inline void emit(void *dst, int dt, int64_t off, int64_t len, const float *src) {
    if (dt == DT_F32) {
        put((float *)dst + off, src, (size_t)len * sizeof(float));
    } else {
        uint16_t buf[CHUNK];  /* bf16 / f16: two bytes each */
        store(buf, dt, 0, len, src);
        put((uint16_t *)dst + off, buf, (size_t)len * sizeof(uint16_t));
    }
}

/* Pass 1: add the saliency bins of rows [r0, r1) of every expert with smode != S_NONE to hist[t]
 * (int64[2^21] each). Edits, saliencies and bins are computed in one loop per expert chunk. */
#define INLINE static inline __attribute__((always_inline))
/* rows are counted in blocks of about this many entries, expert after expert: the scatter into
 * the bins is bound by the cache holding them, which then holds one expert's, not T */
#define HIST_BLOCK 16384

INLINE void hist_chunk(int mode, const float *be, const float *bw, int64_t len, double ai, const double *b,
                       const float *v, int64_t *h) {
    uint32_t bin[CHUNK];
    for (int64_t k = 0; k < len; k++) {  /* vectorised: edits, saliencies, bins */
        float dk = be[k] - bw[k];
        double dd = (double)dk * (double)dk, s;
        if (mode == S_RANK1) s = (dd * ai) * b[k];
        else if (mode == S_FULL) s = dd * (double)v[k];
        else s = dd;
        uint64_t bits;
        memcpy(&bits, &s, sizeof bits);
        bin[k] = (uint32_t)((bits >> BIN_SHIFT) & BIN_MASK);
    }
    for (int64_t k = 0; k < len; k++) h[bin[k]]++;  /* the scatter, apart */
}

void ota_saliency_hist(const void *w0, int dt0, int T, const void *const *e, const int *dte,
                       int64_t n, int64_t r0, int64_t r1, const int *smode, const double *const *sa,
                       const double *const *sb, const float *const *sv, int64_t *const *hist) {
    float bw[CHUNK], be[CHUNK];
    const int64_t rb = n >= HIST_BLOCK ? 1 : HIST_BLOCK / (n > 0 ? n : 1);  /* n = 0: an empty tensor */
    for (int64_t i0 = r0; i0 < r1; i0 += rb) {
        int64_t i1 = i0 + rb < r1 ? i0 + rb : r1;
        for (int t = 0; t < T; t++) {
            int mode = smode[t];
            if (mode == S_NONE) continue;
            for (int64_t i = i0; i < i1; i++) {
                for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
                    int64_t len = n - j0 < CHUNK ? n - j0 : CHUNK, off = i * n + j0;
                    load_f32(w0, dt0, off, len, bw);  /* again per expert: from the cache */
                    load_f32(e[t], dte[t], off, len, be);
                    if (mode == S_RANK1) hist_chunk(S_RANK1, be, bw, len, sa[t][i], sb[t] + j0, 0, hist[t]);
                    else if (mode == S_FULL) hist_chunk(S_FULL, be, bw, len, 1.0, 0, sv[t] + off, hist[t]);
                    else hist_chunk(S_MAGNITUDE, be, bw, len, 1.0, 0, 0, hist[t]);
                }
            }
        }
    }
}

/* The saliency-share rule's masses of a chunk's saliencies ``sal`` (s >= 0 or NaN), added to
 * mass[0..2]: of those at or above ``chi``, in [``clo``, ``chi``) and below ``clo``. Each weighs its
 * bin's middle (its bits down to its bin, then half a bin), bin 0 and the +inf/NaN bins nothing,
 * as ota_trainer.backends.thresholds.share_bin weighs a histogram. Eight partial sums per side,
 * lane j taking entries j, j + 8, ... in order (the same bits on every build: an entry left out
 * adds nothing, as adding +0.0 to a positive sum does), then added in lane order. */
INLINE double mid_of(double x) {
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits = (bits >> BIN_SHIFT << BIN_SHIFT) | (1ull << (BIN_SHIFT - 1));
    memcpy(&x, &bits, sizeof x);
    return x;
}

INLINE void share_masses(const double *sal, int64_t len, double clo, double chi, double *mass) {
    double sa[8] = {0}, sb[8] = {0}, sc[8] = {0};
    const double e1 = 0x1p-1032; /* bin 1's lower edge (bits 1 << 42): bin 0 below it */
    int64_t k = 0;
#if defined(__AVX512F__)
    {
        const __m512d vlo = _mm512_set1_pd(clo), vhi = _mm512_set1_pd(chi), ve1 = _mm512_set1_pd(e1);
        const __m512d vinf = _mm512_set1_pd(INFINITY);
        const __m512i keep = _mm512_set1_epi64((int64_t)(~0ull << BIN_SHIFT)), half = _mm512_set1_epi64(1ll << (BIN_SHIFT - 1));
        __m512d a = _mm512_setzero_pd(), b = _mm512_setzero_pd(), c = _mm512_setzero_pd();
        for (; k + 8 <= len; k += 8) {
            __m512d x = _mm512_loadu_pd(sal + k);
            __m512d mid = _mm512_castsi512_pd(_mm512_or_si512(_mm512_and_si512(_mm512_castpd_si512(x), keep), half));
            __mmask8 w = _mm512_cmp_pd_mask(x, ve1, _CMP_GE_OQ) & _mm512_cmp_pd_mask(x, vinf, _CMP_LT_OQ);
            __mmask8 up = _mm512_cmp_pd_mask(x, vhi, _CMP_GE_OQ), in = _mm512_cmp_pd_mask(x, vlo, _CMP_GE_OQ);
            a = _mm512_mask_add_pd(a, w & up, a, mid);
            b = _mm512_mask_add_pd(b, w & in & (__mmask8)~up, b, mid);
            c = _mm512_mask_add_pd(c, w & (__mmask8)~in, c, mid);
        }
        _mm512_storeu_pd(sa, a), _mm512_storeu_pd(sb, b), _mm512_storeu_pd(sc, c);
    }
#elif defined(__AVX2__)
    {
        const __m256d vlo = _mm256_set1_pd(clo), vhi = _mm256_set1_pd(chi), ve1 = _mm256_set1_pd(e1);
        const __m256d vinf = _mm256_set1_pd(INFINITY);
        const __m256i keep = _mm256_set1_epi64x((int64_t)(~0ull << BIN_SHIFT)), half = _mm256_set1_epi64x(1ll << (BIN_SHIFT - 1));
        __m256d a[2], b[2], c[2];
        for (int h = 0; h < 2; h++) a[h] = b[h] = c[h] = _mm256_setzero_pd();
        for (; k + 8 <= len; k += 8) {
            for (int h = 0; h < 2; h++) { /* lanes 0-3, then 4-7 */
                __m256d x = _mm256_loadu_pd(sal + k + 4 * h);
                __m256d mid = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(_mm256_castpd_si256(x), keep), half));
                __m256d w = _mm256_and_pd(_mm256_cmp_pd(x, ve1, _CMP_GE_OQ), _mm256_cmp_pd(x, vinf, _CMP_LT_OQ));
                __m256d up = _mm256_cmp_pd(x, vhi, _CMP_GE_OQ), in = _mm256_cmp_pd(x, vlo, _CMP_GE_OQ);
                __m256d m = _mm256_and_pd(w, mid);
                a[h] = _mm256_add_pd(a[h], _mm256_and_pd(up, m));
                b[h] = _mm256_add_pd(b[h], _mm256_andnot_pd(up, _mm256_and_pd(in, m)));
                c[h] = _mm256_add_pd(c[h], _mm256_andnot_pd(in, m));
            }
        }
        for (int h = 0; h < 2; h++)
            _mm256_storeu_pd(sa + 4 * h, a[h]), _mm256_storeu_pd(sb + 4 * h, b[h]), _mm256_storeu_pd(sc + 4 * h, c[h]);
    }
#endif
    for (; k < len; k++) { /* the rest (and every entry on other builds): lane k % 8 */
        double x = sal[k], mid = mid_of(x);
        int j = (int)(k & 7), w = x >= e1 && x < INFINITY;
        if (w && x >= chi) sa[j] += mid;
        else if (w && x >= clo) sb[j] += mid;
        else if (w) sc[j] += mid;
    }
    for (int j = 0; j < 8; j++) mass[0] += sa[j], mass[1] += sb[j], mass[2] += sc[j];
}

/* One expert's contribution to a chunk of pass 2, in one loop: edit, curvature weight, keep
 * mask, running sums. ``smode``/``wmode``/``sqrt_p``/``divide`` (div > 0)/``check`` are constants
 * at every call site, so each combination is compiled into a branch-free loop of its own. Returns
 * the entries kept. With ``check`` 1, the entries whose saliency is at least ``clo``, and at least
 * ``chi``, are added to ``*nlo``, ``*nhi``: the counts at two more bin edges that let the runner
 * prove a threshold taken from a histogram it did not count (ota_trainer.merger.runner). With
 * ``check`` 2 (the saliency-share rule's proof), the saliency masses the share rule sees (each
 * entry's bin middle; bin 0 and the +inf/NaN bins none) of the entries at or above ``chi``, in
 * [``clo``, ``chi``) and below ``clo`` are added to ``mass[0..2]``, in float64 (the runner bounds
 * their rounding: ota_trainer.backends.thresholds.share_proved). */
INLINE int64_t merge_chunk(int smode, int wmode, int sqrt_p, int divide, int check, const float *be,
                           const float *bw, int64_t len, double sai, const double *sbj, const float *svv, double cut,
                           float pai, const float *pbj, const float *wvv, float div, float eps, float uniform,
                           float ct, float *restrict num, float *restrict den, double clo, double chi, int64_t *nlo,
                           int64_t *nhi, double *mass) {
    int64_t kept = 0, k = 0, klo = 0, khi = 0;
    double sal[CHUNK]; /* (check 2 only) each entry's saliency, for the masses after the loop */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
    /* The loop below, 8 entries at a time, operation for operation (same bits). gcc vectorises
     * the loop by itself too, but on AVX2 it narrows the float64 keep masks to float32 lanes
     * with five shuffles (AVX-512: one vpermt2d); here it takes two, and the kept entries are
     * counted from a movemask: ~10% faster on AVX2. */
    {
        const __m256 veps = _mm256_set1_ps(eps), vct = _mm256_set1_ps(ct), one = _mm256_set1_ps(1.0f);
        const __m256 vpai = _mm256_set1_ps(pai), vdiv = _mm256_set1_ps(div), vuni = _mm256_set1_ps(uniform);
        const __m256d vsai = _mm256_set1_pd(sai), vcut = _mm256_set1_pd(cut);
        const __m256d vclo = _mm256_set1_pd(clo), vchi = _mm256_set1_pd(chi);
        for (; k + 8 <= len; k += 8) {
            __m256 dk = _mm256_sub_ps(_mm256_loadu_ps(be + k), _mm256_loadu_ps(bw + k)), w;
            if (wmode == W_RANK1) {
                w = _mm256_add_ps(_mm256_mul_ps(vpai, _mm256_loadu_ps(pbj + k)), veps);
            } else if (wmode == W_FULL) {
                w = _mm256_loadu_ps(wvv + k);
                if (sqrt_p) w = _mm256_sqrt_ps(w);
                if (divide) w = _mm256_div_ps(w, vdiv);
                w = _mm256_add_ps(w, veps);
            } else {
                w = vuni;
            }
            if (smode != S_NONE) {
                __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(dk)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(dk, 1));
                lo = _mm256_mul_pd(lo, lo);
                hi = _mm256_mul_pd(hi, hi);
                if (smode == S_RANK1) {
                    lo = _mm256_mul_pd(_mm256_mul_pd(lo, vsai), _mm256_loadu_pd(sbj + k));
                    hi = _mm256_mul_pd(_mm256_mul_pd(hi, vsai), _mm256_loadu_pd(sbj + k + 4));
                } else if (smode == S_FULL) {
                    lo = _mm256_mul_pd(lo, _mm256_cvtps_pd(_mm_loadu_ps(svv + k)));
                    hi = _mm256_mul_pd(hi, _mm256_cvtps_pd(_mm_loadu_ps(svv + k + 4)));
                }
                __m256 mlo = _mm256_castpd_ps(_mm256_cmp_pd(lo, vcut, _CMP_GE_OQ));  /* s >= cut (NaN: no) */
                __m256 mhi = _mm256_castpd_ps(_mm256_cmp_pd(hi, vcut, _CMP_GE_OQ));
                /* the low halves of the 64-bit masks, in entry order */
                __m256 m = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(mlo, mhi, 0x88)), 0xD8));
                kept += __builtin_popcount((unsigned)_mm256_movemask_ps(m));
                if (check == 2) _mm256_storeu_pd(sal + k, lo), _mm256_storeu_pd(sal + k + 4, hi);
                if (check == 1) {
                    klo += __builtin_popcount((unsigned)(_mm256_movemask_pd(_mm256_cmp_pd(lo, vclo, _CMP_GE_OQ)) |
                                                         _mm256_movemask_pd(_mm256_cmp_pd(hi, vclo, _CMP_GE_OQ)) << 4));
                    khi += __builtin_popcount((unsigned)(_mm256_movemask_pd(_mm256_cmp_pd(lo, vchi, _CMP_GE_OQ)) |
                                                         _mm256_movemask_pd(_mm256_cmp_pd(hi, vchi, _CMP_GE_OQ)) << 4));
                }
                w = _mm256_mul_ps(w, _mm256_and_ps(m, one));  /* w * one_if(keep) */
            }
            __m256 wk = _mm256_mul_ps(w, vct);
            _mm256_storeu_ps(num + k, _mm256_fmadd_ps(wk, dk, _mm256_loadu_ps(num + k)));
            _mm256_storeu_ps(den + k, _mm256_add_ps(_mm256_loadu_ps(den + k), wk));
        }
    }
#endif
    for (; k < len; k++) {
        float dk = be[k] - bw[k], w;
        if (wmode == W_RANK1) {
            w = pai * pbj[k] + eps;
        } else if (wmode == W_FULL) {
            w = sqrt_p ? sqrtf(wvv[k]) : wvv[k];
            if (divide) w = w / div;
            w = w + eps;
        } else {
            w = uniform;
        }
        if (smode != S_NONE) {
            double dd = (double)dk * (double)dk, s;
            if (smode == S_RANK1) s = (dd * sai) * sbj[k];
            else if (smode == S_FULL) s = dd * (double)svv[k];
            else s = dd;
            int keep = s >= cut;
            kept += keep;
            if (check == 1) klo += s >= clo, khi += s >= chi;
            if (check == 2) sal[k] = s;
            w = w * one_if(keep);
        }
        float wk = w * ct;
        num[k] = fmaf(wk, dk, num[k]);
        den[k] = den[k] + wk;
    }
    if (check == 1) *nlo += klo, *nhi += khi;
    if (check == 2 && smode != S_NONE) share_masses(sal, len, clo, chi, mass);
    return smode != S_NONE ? kept : len;
}

#define MERGE_C(SM, WM, SQ, DV, CK) \
    merge_chunk(SM, WM, SQ, DV, CK, be, bw, len, sai, sbj, svv, c, pai, pbj, wvv, div, eps, uniform, ct, num, den, \
                clo, chi, nlo, nhi, ms)
#define MERGE_W(SM, WM, SQ, DV)                          \
    ((SM) == S_NONE ? MERGE_C(SM, WM, SQ, DV, 0)         \
     : ms != 0      ? MERGE_C(SM, WM, SQ, DV, 2)         \
     : nlo != 0     ? MERGE_C(SM, WM, SQ, DV, 1)         \
                    : MERGE_C(SM, WM, SQ, DV, 0))
#define MERGE_F(SM) (sqrt_p ? (div > 0.0f ? MERGE_W(SM, W_FULL, 1, 1) : MERGE_W(SM, W_FULL, 1, 0)) \
                            : (div > 0.0f ? MERGE_W(SM, W_FULL, 0, 1) : MERGE_W(SM, W_FULL, 0, 0)))
#define MERGE_S(SM) (wm == W_RANK1 ? MERGE_W(SM, W_RANK1, 0, 0) : wm == W_FULL ? MERGE_F(SM) : MERGE_W(SM, W_UNIFORM, 0, 0))

/* w0 + num / max(den, 2^-149) of a chunk, rounded into out; returns 1 if any value is not finite. */
INLINE int finish_chunk(int dto, const float *bw, const float *num, const float *den, int64_t len, void *out,
                        int64_t off) {
    const float tiny = 0x1p-149f;
    int bad = 0;
    if (dto == DT_BF16) {
        uint16_t o[CHUNK];
        for (int64_t k = 0; k < len; k++) {
            float dk = den[k] < tiny ? tiny : den[k];
            float r = bw[k] + num[k] / dk;
            bad |= !isfinite(r);
            o[k] = bf16_round(r);
        }
        put((uint16_t *)out + off, o, (size_t)len * sizeof(uint16_t));
    } else {
        float res[CHUNK];
        for (int64_t k = 0; k < len; k++) {
            float dk = den[k] < tiny ? tiny : den[k];
            res[k] = bw[k] + num[k] / dk;
            bad |= !isfinite(res[k]);
        }
        emit(out, dto, off, len, res);
    }
    return bad;
}

/* Pass 2: OTA (+ FFG masks) of rows [r0, r1) into out (dtype dto). Per expert t:
 *   smode[t], sa/sb/sv, cut[t]: the keep mask (S_NONE: keep every edit), kept[t] += entries kept;
 *   wmode[t], pa/pb (rank one, float32), wv (full, float32): the curvature P;
 *   for W_FULL: sqrt_p (P = sqrt(v), else P = v) and pdiv[t] (P /= pdiv when > 0);
 *   coef[t]: the expert's weight c_t. ``uniform`` is (float)(1 + eps), the weight without moments.
 * chk (NULL: none): per expert two more cuts (lo, hi) whose entries kept are counted into
 * chkd[2t], chkd[2t + 1] (see merge_chunk); with mass (not NULL), for the experts whose
 * mode[t] is 2 the saliency masses at or above hi, in [lo, hi) and below lo are added to
 * mass[3t..3t + 2] instead (see merge_chunk), and mode[t] 0 checks nothing.
 * Returns 1 if any merged value is not finite (the caller finds and names the input), else 0. */
int ota_merge_rows(const void *w0, int dt0, int T, const void *const *e, const int *dte, int64_t n,
                   int64_t r0, int64_t r1, const int *smode, const double *const *sa,
                   const double *const *sb, const float *const *sv, const double *cut, const int *wmode,
                   const float *const *pa, const float *const *pb, const float *const *wv, int sqrt_p,
                   const float *pdiv, float eps, float uniform, const float *coef, void *out, int dto,
                   int64_t *kept, const double *chk, int64_t *chkd, const int *mode, double *mass) {
    float bw[CHUNK], be[CHUNK], num[CHUNK], den[CHUNK];
    int bad = 0;
    for (int64_t i = r0; i < r1; i++) {
        for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
            int64_t len = n - j0 < CHUNK ? n - j0 : CHUNK, off = i * n + j0;
            load_f32(w0, dt0, off, len, bw);
            for (int64_t k = 0; k < len; k++) num[k] = 0.0f, den[k] = 0.0f;
            for (int t = 0; t < T; t++) {
                load_f32(e[t], dte[t], off, len, be);
                int sm = smode[t], wm = wmode[t];
                double sai = sm == S_RANK1 ? sa[t][i] : 1.0, c = cut[t];
                const double *sbj = sm == S_RANK1 ? sb[t] + j0 : 0;
                const float *svv = sm == S_FULL ? sv[t] + off : 0;
                float pai = wm == W_RANK1 ? pa[t][i] : 0.0f, div = pdiv[t], ct = coef[t];
                const float *pbj = wm == W_RANK1 ? pb[t] + j0 : 0, *wvv = wm == W_FULL ? wv[t] + off : 0;
                double clo = chk != 0 ? chk[2 * t] : 0.0, chi = chk != 0 ? chk[2 * t + 1] : 0.0;
                int ck = chk == 0 ? 0 : mode != 0 ? mode[t] : 1;
                int64_t *nlo = ck == 1 ? chkd + 2 * t : 0, *nhi = ck == 1 ? chkd + 2 * t + 1 : 0;
                double *ms = ck == 2 ? mass + 3 * t : 0;
                if (sm == S_RANK1) kept[t] += MERGE_S(S_RANK1);
                else if (sm == S_FULL) kept[t] += MERGE_S(S_FULL);
                else if (sm == S_MAGNITUDE) kept[t] += MERGE_S(S_MAGNITUDE);
                else kept[t] += MERGE_S(S_NONE);
            }
            bad |= finish_chunk(dto, bw, num, den, len, out, off);
        }
    }
    stream_done();
    return bad;
}

/* -- small helpers of the native fast path (ota_trainer.fastpath) -------------------------------
 * Rank-one factors as the engine derives them (ota_trainer.format.MomentsReader.rank1 and the
 * aggregate/graft Score and Curvature): a = r / total and b = c * scale in float32 (scale only
 * when apply_scale), their float64 copies for the saliency, and the curvature factors
 * P = a, b (power 1) or sqrt(a), sqrt(b) (power 1/2: correctly rounded, through float64).
 * total <= 0 (or NaN) gives a = 0. Returns 1 if r or c holds NaN, Inf or a negative value. */
int ota_rank1_prep(const float *r, const float *c, int64_t m, int64_t n, float total, float scale,
                   int apply_scale, int sqrt_p, double *a64, double *b64, float *pa, float *pb) {
    int zero = !(total > 0.0f), bad = 0;
    for (int64_t i = 0; i < m; i++) {
        bad |= !(r[i] >= 0.0f && r[i] <= FLT_MAX);  /* NaN, Inf or negative */
        float a = zero ? 0.0f : r[i] / total;
        a64[i] = (double)a;
        pa[i] = sqrt_p ? (float)sqrt((double)a) : a;
    }
    for (int64_t j = 0; j < n; j++) {
        bad |= !(c[j] >= 0.0f && c[j] <= FLT_MAX);
        float b = apply_scale ? c[j] * scale : c[j];
        b64[j] = (double)b;
        pb[j] = sqrt_p ? (float)sqrt((double)b) : b;
    }
    return bad;
}

/* dst[i] += src[i], and src[i] = 0 (private histogram bins into the shared ones). */
void ota_add_i64(int64_t *dst, int64_t *src, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (src[i]) dst[i] += src[i], src[i] = 0;  /* only the counted bins' pages are written */
}

/* The bin holding the k-th largest element of a histogram and that element's rank from the top
 * inside it (ota_trainer.aggregate._select_from_top). */
int64_t ota_select_from_top(const int64_t *counts, int64_t nbins, int64_t k, int64_t *rank) {
    int64_t above = 0;
    for (int64_t b = nbins - 1; b >= 0; b--) {
        if (above + counts[b] >= k) {
            *rank = k - above;
            return b;
        }
        above += counts[b];
    }
    *rank = k - above;
    return 0;
}

/* -- TIES ---------------------------------------------------------------------------------------
 * The trim threshold of each task vector is the k-th largest |d| of the whole tensor, found
 * exactly by a two-level radix select on the bits of |d| (ota_trainer.aggregate.kth_largest_abs):
 * ota_abs_hist counts the top 16 bits (bucket == NULL) or, for entries whose top bits equal
 * bucket[t], the low 16 bits. Then, as ota_trainer.aggregate.ties_merge computes it:
 *   tr_t  = (d_t * (|d_t| >= cut_t)) * c_t
 *   g     = sign(tr_0 + tr_1 + ...)                 (summed in expert order)
 *   a_t   = sign(tr_t) == g && tr_t != 0
 *   out   = w0 + (lam * sum_t(tr_t * a_t)) / max(#a, 1)
 * Element ranges [start, end) of the flattened tensor. */
void ota_abs_hist(const void *w0, int dt0, int T, const void *const *e, const int *dte, int64_t start,
                  int64_t end, const int64_t *bucket, int64_t *const *hist) {
    float bw[CHUNK], be[CHUNK];
    uint32_t bits[CHUNK];
    /* |d| of fine-tuning edits fills few buckets: four interleaved copies of the counters keep
     * consecutive increments of one bucket from waiting on each other */
    uint32_t *sub = bucket == 0 ? calloc((size_t)4 << 15, sizeof *sub) : 0;
    for (int t = 0; t < T; t++) {
        int64_t *h = hist[t];
        for (int64_t off = start; off < end; off += CHUNK) {
            int64_t len = end - off < CHUNK ? end - off : CHUNK;
            load_f32(w0, dt0, off, len, bw);
            load_f32(e[t], dte[t], off, len, be);
            for (int64_t k = 0; k < len; k++) {
                float d = be[k] - bw[k];
                memcpy(&bits[k], &d, sizeof d);
                bits[k] &= 0x7FFFFFFFu;
            }
            if (bucket != 0) {
                for (int64_t k = 0; k < len; k++)
                    if ((int64_t)(bits[k] >> 16) == bucket[t]) h[bits[k] & 0xFFFFu]++;
            } else if (sub != 0) {
                for (int64_t k = 0; k < len; k++) sub[((k & 3) << 15) | (bits[k] >> 16)]++;
                if (((off - start) / CHUNK) % 4096 == 4095 || off + len >= end) { /* flush before 2^32 */
                    for (int q = 0; q < 4; q++)
                        for (int64_t j = 0; j < (1 << 15); j++) h[j] += sub[(q << 15) | j], sub[(q << 15) | j] = 0;
                }
            } else {
                for (int64_t k = 0; k < len; k++) h[bits[k] >> 16]++;
            }
        }
    }
    free(sub);
}

/* The TIES cut in one pass when a sample has bracketed it (ota_trainer.native.raw_magnitude_cuts):
 * ota_abs_sample counts the top 16 bits of |d| of 8 entries every stride entries into hist[t]
 * (int64[2^15]); ota_abs_bracket then adds the entries
 * of one expert whose top bits exceed hi to above and copies the |d| bits of the entries with
 * lo <= top <= hi into cand (at most cap; returns how many, or -1 when they do not fit). When the
 * k-th largest lies in the bracket (above < k <= above + candidates) ota_select_bits finds it
 * among them exactly; otherwise the caller falls back to the two full passes of ota_abs_hist. */
void ota_abs_sample(const void *w0, int dt0, int T, const void *const *e, const int *dte, int64_t start,
                    int64_t end, int64_t stride, int64_t *const *hist) {
    enum { BLOCK = 8 };  /* 8 neighbours per sample point: one cache line instead of eight */
    float bw[BLOCK], be[BLOCK];
    for (int64_t off = start; off < end; off += stride) {
        int64_t len = end - off < BLOCK ? end - off : BLOCK;
        load_f32(w0, dt0, off, len, bw);
        for (int t = 0; t < T; t++) {
            load_f32(e[t], dte[t], off, len, be);
            for (int64_t k = 0; k < len; k++) {
                float d = be[k] - bw[k];
                uint32_t bits;
                memcpy(&bits, &d, sizeof bits);
                hist[t][(bits & 0x7FFFFFFFu) >> 16]++;
            }
        }
    }
}

#if !defined(__AVX512F__) && defined(__AVX2__)
/* AVX2 has no compress: lanes kept under an 8-bit mask are gathered to the front by one
 * permute, whose indices (8 x 4 bits) this table holds for every mask */
static uint32_t compress_idx[256];

__attribute__((constructor)) static void init_compress_idx(void) {
    for (unsigned m = 0; m < 256; m++) {
        uint32_t idx = 0, n = 0;
        for (unsigned b = 0; b < 8; b++)
            if (m & (1u << b)) idx |= b << (4 * n++);
        compress_idx[m] = idx;
    }
}
#endif

int64_t ota_abs_bracket(const void *w0, int dt0, const void *e, int dte, int64_t start, int64_t end, uint32_t lo,
                        uint32_t hi, int64_t *above, uint32_t *cand, int64_t cap) {
    float bw[CHUNK], be[CHUNK];
    uint32_t bits[CHUNK];
    int64_t ab = 0, nc = 0;
    const uint32_t width = hi - lo;
    for (int64_t off = start; off < end; off += CHUNK) {
        int64_t len = end - off < CHUNK ? end - off : CHUNK;
        load_f32(w0, dt0, off, len, bw);
        load_f32(e, dte, off, len, be);
        int64_t in = 0;
        for (int64_t k = 0; k < len; k++) {  /* vectorised */
            float d = be[k] - bw[k];
            uint32_t u;
            memcpy(&u, &d, sizeof u);
            u &= 0x7FFFFFFFu;
            ab += (u >> 16) > hi;
            in += (u >> 16) - lo <= width;
            bits[k] = u;
        }
        if (in == 0) continue;
        if (nc + in + 16 > cap) return -1;  /* more candidates than room: the caller falls back */
        int64_t k = 0;
#if defined(__AVX512F__)
        const __m512i vlo = _mm512_set1_epi32((int)lo), vw = _mm512_set1_epi32((int)width);
        for (; k + 16 <= len; k += 16) {  /* compress in a register, store 16 lanes (cap keeps 16 spare) */
            __m512i u = _mm512_loadu_si512((const void *)(bits + k));
            __mmask16 m = _mm512_cmple_epu32_mask(_mm512_sub_epi32(_mm512_srli_epi32(u, 16), vlo), vw);
            _mm512_storeu_si512((void *)(cand + nc), _mm512_maskz_compress_epi32(m, u));
            nc += __builtin_popcount((unsigned)m);
        }
#elif defined(__AVX2__)
        /* (top - lo) <= width unsigned, as min(top - lo, width) == top - lo (AVX2 compares signed) */
        const __m256i vlo = _mm256_set1_epi32((int)lo), vw = _mm256_set1_epi32((int)width);
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), nib = _mm256_set1_epi32(15);
        for (; k + 8 <= len; k += 8) {  /* store 8 lanes (cap keeps 16 spare) */
            __m256i u = _mm256_loadu_si256((const __m256i *)(bits + k));
            __m256i x = _mm256_sub_epi32(_mm256_srli_epi32(u, 16), vlo);
            __m256i in8 = _mm256_cmpeq_epi32(_mm256_min_epu32(x, vw), x);
            unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(in8));
            __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)compress_idx[m]), shifts), nib);
            _mm256_storeu_si256((__m256i *)(cand + nc), _mm256_permutevar8x32_epi32(u, idx));
            nc += __builtin_popcount(m);
        }
#endif
        for (; k < len; k++) {
            cand[nc] = bits[k];
            nc += (bits[k] >> 16) - lo <= width;  /* branch-free compaction */
        }
    }
    *above += ab;
    return nc;
}

/* The k-th largest of n values (1 <= k <= n), by a two-level radix select on their bits. */
uint32_t ota_select_bits(const uint32_t *v, int64_t n, int64_t k) {
    int64_t *h = calloc((size_t)1 << 16, sizeof *h), rank = 0;
    if (h == 0) return 0;
    for (int64_t i = 0; i < n; i++) h[v[i] >> 16]++;
    int64_t top = ota_select_from_top(h, (int64_t)1 << 16, k, &rank);
    memset(h, 0, sizeof *h << 16);
    for (int64_t i = 0; i < n; i++)
        if ((int64_t)(v[i] >> 16) == top) h[v[i] & 0xFFFFu]++;
    int64_t low = ota_select_from_top(h, (int64_t)1 << 16, rank, &rank);
    free(h);
    return (uint32_t)((top << 16) | low);
}

int ota_ties(const void *w0, int dt0, int T, const void *const *e, const int *dte, int64_t start, int64_t end,
             const float *cut, const float *coef, float lam, void *out, int dto) {
    float bw[CHUNK], be[CHUNK], res[CHUNK], sum[CHUNK], total[CHUNK], cnt[CHUNK];
    float tr[16][CHUNK];
    int bad = 0;
    for (int64_t off = start; off < end; off += CHUNK) {
        int64_t len = end - off < CHUNK ? end - off : CHUNK;
        load_f32(w0, dt0, off, len, bw);
        for (int64_t k = 0; k < len; k++) sum[k] = 0.0f, total[k] = 0.0f, cnt[k] = 0.0f;
        for (int t = 0; t < T; t++) {
            load_f32(e[t], dte[t], off, len, be);
            float c = cut[t], ct = coef[t];
            float *r = tr[t];
            for (int64_t k = 0; k < len; k++) {
                float d = be[k] - bw[k];
                r[k] = (d * one_if(fabsf(d) >= c)) * ct;
                sum[k] = sum[k] + r[k];
            }
        }
        /* a_t = sign(tr_t) == sign(sum) && tr_t != 0: tr_t and the sum both > 0 or both < 0 (a
         * NaN or zero on either side fails both) */
        for (int t = 0; t < T; t++) {
            const float *r = tr[t];
            for (int64_t k = 0; k < len; k++) {
                float a = one_if(((r[k] > 0.0f) & (sum[k] > 0.0f)) | ((r[k] < 0.0f) & (sum[k] < 0.0f)));
                total[k] = total[k] + r[k] * a;
                cnt[k] = cnt[k] + a;
            }
        }
        for (int64_t k = 0; k < len; k++) {
            uint32_t more = (uint32_t)-(int32_t)(cnt[k] > 1.0f);  /* max(cnt, 1): cnt is a count */
            float n = f32_of((f32_bits(cnt[k]) & more) | (0x3F800000u & ~more));
            res[k] = bw[k] + (lam * total[k]) / n;
            bad |= !isfinite(res[k]);
        }
        emit(out, dto, off, len, res);
    }
    stream_done();
    return bad;
}
