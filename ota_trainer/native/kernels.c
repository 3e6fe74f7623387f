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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { S_NONE = 0, S_RANK1 = 1, S_FULL = 2, S_MAGNITUDE = 3 };
enum { W_UNIFORM = 0, W_RANK1 = 1, W_FULL = 2 };

#define CHUNK 512
#define BIN_SHIFT 42
#define BIN_MASK ((1u << 21) - 1u)

int ota_native_version(void) { return 5; }

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

/* Saliency of a chunk of edits into s[0..len). */
static inline void saliency_chunk(int mode, const float *d, int64_t len, double ai, const double *b,
                                  const float *v, double *s) {
    if (mode == S_RANK1) {
        for (int64_t k = 0; k < len; k++) s[k] = (((double)d[k] * (double)d[k]) * ai) * b[k];
    } else if (mode == S_FULL) {
        for (int64_t k = 0; k < len; k++) s[k] = ((double)d[k] * (double)d[k]) * (double)v[k];
    } else {
        for (int64_t k = 0; k < len; k++) s[k] = (double)d[k] * (double)d[k];
    }
}

/* Pass 1: add the saliency bins of rows [r0, r1) of every expert with smode != S_NONE to hist[t]
 * (int64[2^21] each). */
void ota_saliency_hist(const void *w0, int dt0, int T, const void *const *e, const int *dte,
                       int64_t n, int64_t r0, int64_t r1, const int *smode, const double *const *sa,
                       const double *const *sb, const float *const *sv, int64_t *const *hist) {
    float bw[CHUNK], be[CHUNK], d[CHUNK];
    double s[CHUNK];
    for (int64_t i = r0; i < r1; i++) {
        for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
            int64_t len = n - j0 < CHUNK ? n - j0 : CHUNK, off = i * n + j0;
            load_f32(w0, dt0, off, len, bw);
            for (int t = 0; t < T; t++) {
                int mode = smode[t];
                if (mode == S_NONE) continue;
                load_f32(e[t], dte[t], off, len, be);
                for (int64_t k = 0; k < len; k++) d[k] = be[k] - bw[k];
                saliency_chunk(mode, d, len, mode == S_RANK1 ? sa[t][i] : 1.0, mode == S_RANK1 ? sb[t] + j0 : 0,
                               mode == S_FULL ? sv[t] + off : 0, s);
                int64_t *h = hist[t];
                for (int64_t k = 0; k < len; k++) {
                    uint64_t bits;
                    memcpy(&bits, &s[k], sizeof bits);
                    h[(bits >> BIN_SHIFT) & BIN_MASK]++;
                }
            }
        }
    }
}

/* Pass 2: OTA (+ FFG masks) of rows [r0, r1) into out (dtype dto). Per expert t:
 *   smode[t], sa/sb/sv, cut[t]: the keep mask (S_NONE: keep every edit), kept[t] += entries kept;
 *   wmode[t], pa/pb (rank one, float32), wv (full, float32): the curvature P;
 *   for W_FULL: sqrt_p (P = sqrt(v), else P = v) and pdiv[t] (P /= pdiv when > 0);
 *   coef[t]: the expert's weight c_t. ``uniform`` is (float)(1 + eps), the weight without moments.
 * Returns 1 if any merged value is not finite (the caller finds and names the input), else 0. */
int ota_merge_rows(const void *w0, int dt0, int T, const void *const *e, const int *dte, int64_t n,
                   int64_t r0, int64_t r1, const int *smode, const double *const *sa,
                   const double *const *sb, const float *const *sv, const double *cut, const int *wmode,
                   const float *const *pa, const float *const *pb, const float *const *wv, int sqrt_p,
                   const float *pdiv, float eps, float uniform, const float *coef, void *out, int dto,
                   int64_t *kept) {
    float bw[CHUNK], be[CHUNK], d[CHUNK], w[CHUNK], num[CHUNK], den[CHUNK], res[CHUNK];
    double s[CHUNK];
    const float tiny = 0x1p-149f;
    int bad = 0;
    for (int64_t i = r0; i < r1; i++) {
        for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
            int64_t len = n - j0 < CHUNK ? n - j0 : CHUNK, off = i * n + j0;
            load_f32(w0, dt0, off, len, bw);
            for (int64_t k = 0; k < len; k++) num[k] = 0.0f, den[k] = 0.0f;
            for (int t = 0; t < T; t++) {
                load_f32(e[t], dte[t], off, len, be);
                for (int64_t k = 0; k < len; k++) d[k] = be[k] - bw[k];
                /* curvature weight */
                if (wmode[t] == W_RANK1) {
                    float ai = pa[t][i];
                    const float *b = pb[t] + j0;
                    for (int64_t k = 0; k < len; k++) w[k] = ai * b[k] + eps;
                } else if (wmode[t] == W_FULL) {
                    const float *v = wv[t] + off;
                    float div = pdiv[t];
                    for (int64_t k = 0; k < len; k++) w[k] = sqrt_p ? sqrtf(v[k]) : v[k];
                    if (div > 0.0f)
                        for (int64_t k = 0; k < len; k++) w[k] = w[k] / div;
                    for (int64_t k = 0; k < len; k++) w[k] = w[k] + eps;
                } else {
                    for (int64_t k = 0; k < len; k++) w[k] = uniform;
                }
                /* FFG keep mask */
                int mode = smode[t];
                if (mode != S_NONE) {
                    saliency_chunk(mode, d, len, mode == S_RANK1 ? sa[t][i] : 1.0, mode == S_RANK1 ? sb[t] + j0 : 0,
                                   mode == S_FULL ? sv[t] + off : 0, s);
                    double c = cut[t];
                    int64_t kk = 0;
                    for (int64_t k = 0; k < len; k++) {
                        float m = s[k] >= c ? 1.0f : 0.0f;
                        kk += s[k] >= c;
                        w[k] = w[k] * m;
                    }
                    kept[t] += kk;
                } else {
                    kept[t] += len;
                }
                float ct = coef[t];
                for (int64_t k = 0; k < len; k++) {
                    float wk = w[k] * ct;
                    num[k] = fmaf(wk, d[k], num[k]);
                    den[k] = den[k] + wk;
                }
            }
            for (int64_t k = 0; k < len; k++) {
                float dk = den[k] < tiny ? tiny : den[k];
                res[k] = bw[k] + num[k] / dk;
                bad |= !isfinite(res[k]);
            }
            store(out, dto, off, len, res);
        }
    }
    return bad;
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

static inline float signf(float x) { return x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : x; }

int ota_ties(const void *w0, int dt0, int T, const void *const *e, const int *dte, int64_t start, int64_t end,
             const float *cut, const float *coef, float lam, void *out, int dto) {
    float bw[CHUNK], be[CHUNK], res[CHUNK], sum[CHUNK], g[CHUNK], total[CHUNK], cnt[CHUNK];
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
                r[k] = (d * (fabsf(d) >= c ? 1.0f : 0.0f)) * ct;
                sum[k] = sum[k] + r[k];
            }
        }
        for (int64_t k = 0; k < len; k++) g[k] = signf(sum[k]);
        for (int t = 0; t < T; t++) {
            const float *r = tr[t];
            for (int64_t k = 0; k < len; k++) {
                float a = (signf(r[k]) == g[k]) & (r[k] != 0.0f) ? 1.0f : 0.0f;
                total[k] = total[k] + r[k] * a;
                cnt[k] = cnt[k] + a;
            }
        }
        for (int64_t k = 0; k < len; k++) {
            res[k] = bw[k] + (lam * total[k]) / (cnt[k] > 1.0f ? cnt[k] : 1.0f);
            bad |= !isfinite(res[k]);
        }
        store(out, dto, off, len, res);
    }
    return bad;
}
