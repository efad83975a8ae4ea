// Fused CPU Lp normalization kernels, compiled on first use by normmatters/kernels/build.py.
//
// The code includes no torch headers: it builds in about a second with a plain C++ compiler and
// is called through ctypes (normmatters/kernels/cpu.py) on raw pointers of tensors that the
// Python side allocates.
//
// Layouts (enum Layout): a tensor is viewed as ``[N, C, S]`` (statistics per channel c over N·S values), stored
// either ``NCS`` (each (n, c) a contiguous run of S values: NCHW batch norm, and layer/group norm
// as N=1, C=rows) or ``NSC`` (each of the N·S rows holds C contiguous values: channels-last).
//
// Modes (enum Mode): 1 = L1 (σ̂ = C·mean|d|), 2 = Top(k) (σ̂ = C·mean of the k largest |d|; L∞ is k=1).
// The Top(k) set is found in the same pass as the mean: the k largest |x − μ| lie among the k
// largest and the k smallest x, kept in two small heaps that most chunks skip after one vectorised
// min/max. The backward pass finds the set again from x and the saved μ (deterministically the same
// set), so nothing but x, μ and 1/(σ̂+eps) is saved for backward, as for torch's batch norm.
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>
#include <limits>
#include <type_traits>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Each build instantiates one storage dtype (compile time is per dtype; a process loads only
// the libraries of the dtypes it uses).
#ifndef NM_DTYPE
#define NM_DTYPE 0
#endif

namespace {

typedef uint16_t bf16_t;
typedef _Float16 f16_t;
const int64_t CH = 2048;   // chunk of a run summed in the accumulation type before a double add
const int64_t SHORT = 16384;  // statistics of at most this many values select Top(k) by short_topk
// (measured on Zen 4: 2-5x faster than the heaps at 5000-8000 values, about even at 131072).

template <typename T> struct IO;
template <> struct IO<float> {
  typedef float A;
  static inline float ld(const float* p, int64_t i) { return p[i]; }
  static inline void st(float* p, int64_t i, float v) { p[i] = v; }
};
template <> struct IO<double> {
  typedef double A;
  static inline double ld(const double* p, int64_t i) { return p[i]; }
  static inline void st(double* p, int64_t i, double v) { p[i] = v; }
};
template <> struct IO<bf16_t> {
  typedef float A;
  static inline float ld(const bf16_t* p, int64_t i) {
    uint32_t u = ((uint32_t)p[i]) << 16; float f; std::memcpy(&f, &u, 4); return f;
  }
  static inline void st(bf16_t* p, int64_t i, float v) {
    uint32_t u; std::memcpy(&u, &v, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;   // round to nearest even
    uint32_t q = (u >> 16) | 0x40u;                          // quiet NaN
    p[i] = (bf16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? q : r);
  }
};
template <> struct IO<f16_t> {
  typedef float A;
  static inline float ld(const f16_t* p, int64_t i) { return (float)p[i]; }
  static inline void st(f16_t* p, int64_t i, float v) { p[i] = (f16_t)v; }
};

// Runs `body` on a team of nt threads, or directly on this one when nt = 1: a parallel region
// costs microseconds even for one thread (a team, a barrier with futex calls), the whole cost of a
// small normalization. The bodies use orphaned worksharing (omp for / single / barrier), which
// binds to the team when there is one and runs the whole loop otherwise.
template <typename F> inline void parallel(int nt, F&& body) {
  if (nt <= 1) {
    body();
    return;
  }
#pragma omp parallel num_threads(nt)
  body();
}

// Keeps the k largest (value, −index) pairs pushed: larger values first, and among equal values
// the lower index, so the kept set does not depend on the order of the pushes (nor on how rows
// are split between threads). Root = the worst kept pair (the admission threshold).
template <typename A> struct Heap {
  int k = 0, n = 0; A* v = nullptr; int64_t* id = nullptr;
  static inline bool better(A x, int64_t i, A y, int64_t j) { return x > y || (x == y && i < j); }
  inline A thr() const { return n < k ? -std::numeric_limits<A>::infinity() : v[0]; }
  void push(A x, int64_t i) {
    if (n < k) {
      int j = n++;
      while (j > 0) { int p = (j - 1) / 2; if (!better(v[p], id[p], x, i)) break; v[j] = v[p]; id[j] = id[p]; j = p; }
      v[j] = x; id[j] = i; return;
    }
    if (!better(x, i, v[0], id[0])) return;
    int j = 0;
    for (;;) {
      int l = 2 * j + 1; if (l >= n) break;
      int r = l + 1; int m = (r < n && better(v[l], id[l], v[r], id[r])) ? r : l;
      if (!better(x, i, v[m], id[m])) break;
      v[j] = v[m]; id[j] = id[m]; j = m;
    }
    v[j] = x; id[j] = i;
  }
};

// Storage for `count` pairs of heaps (largest x, largest −x), each of capacity k.
template <typename A> struct HeapSet {
  std::vector<A> vals; std::vector<int64_t> ids; std::vector<Heap<A>> hi, lo;
  void init(int64_t count, int k) {
    vals.assign((size_t)(2 * count * k), A(0)); ids.assign((size_t)(2 * count * k), 0);
    hi.assign((size_t)count, Heap<A>()); lo.assign((size_t)count, Heap<A>());
    for (int64_t c = 0; c < count; ++c) {
      hi[c].k = k; hi[c].v = vals.data() + 2 * c * k; hi[c].id = ids.data() + 2 * c * k;
      lo[c].k = k; lo[c].v = hi[c].v + k; lo[c].id = hi[c].id + k;
    }
  }
};

// Push the values of a contiguous piece that can enter the heap (NEG: push −x). A vectorised
// pass takes the maxima of blocks of 16; the k-th largest block maximum T is a lower bound of the
// piece's k-th largest value (k blocks each hold a value >= T), so only values >= T (and >= the
// heap's threshold) are pushed: a few dozen, found by a loop whose branch is almost never taken.
template <typename T, typename A, bool NEG>
inline void scan_piece(const T* x, int64_t len, int64_t base, Heap<A>& h, std::vector<A>& bm,
                       std::vector<A>& sel, A bound, bool block_bound) {
  const int64_t SB = 16;
  const int64_t nb = (len + SB - 1) / SB;
  bm.resize((size_t)nb);
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t s0 = j * SB, l = std::min(SB, len - s0);
    const T* xb = x + s0;
    A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max:m)
    for (int64_t i = 0; i < l; ++i) { A v = NEG ? -IO<T>::ld(xb, i) : IO<T>::ld(xb, i); m = v > m ? v : m; }
    bm[j] = m;
  }
  A t = std::max(h.thr(), bound);
  if (block_bound && nb >= h.k) {
    sel.assign(bm.begin(), bm.end());
    std::nth_element(sel.begin(), sel.begin() + (h.k - 1), sel.end(), [](A p, A q) { return p > q; });
    t = std::max(t, sel[h.k - 1]);
  }
  for (int64_t j = 0; j < nb; ++j) {
    if (!(bm[j] >= t) || !(bm[j] >= h.thr())) continue;  // no value of this block can enter
    const int64_t s0 = j * SB, l = std::min(SB, len - s0);
    for (int64_t i = s0; i < s0 + l; ++i) {
      A v = NEG ? -IO<T>::ld(x, i) : IO<T>::ld(x, i);
      if (v >= t && v >= h.thr()) h.push(v, base + i);
    }
  }
}

// The pieces (contiguous chunks) of one channel with their max and min, recorded during the
// pass that computes the mean. The k largest values lie in the k pieces with the largest maxima
// (each holds its own maximum, so after scanning them the threshold is at least the k-th largest
// piece maximum and no other piece can beat it, ties aside): only those are scanned.
template <typename T, typename A> struct Pieces {
  std::vector<A> mx, mn, bm, sel; std::vector<int64_t> off, base, len, order;
  void clear() { mx.clear(); mn.clear(); off.clear(); base.clear(); len.clear(); }
  inline void add(int64_t o, int64_t b, int64_t l, A hi, A lo) {
    off.push_back(o); base.push_back(b); len.push_back(l); mx.push_back(hi); mn.push_back(lo);
  }
  template <bool NEG> void fill(const T* x, int k, Heap<A>& h) {
    const int64_t P = (int64_t)mx.size();
    order.resize((size_t)P);
    for (int64_t p = 0; p < P; ++p) order[p] = p;
    const int64_t m = std::min<int64_t>(k, P);
    auto key = [&](int64_t p) { return NEG ? -mn[p] : mx[p]; };
    std::nth_element(order.begin(), order.begin() + (m - 1), order.end(), [&](int64_t a, int64_t b) {
      return key(a) > key(b) || (key(a) == key(b) && a < b); });
    // With k pieces or more, the k-th largest piece maximum bounds the k-th largest value from
    // below for the whole channel; with fewer, each piece bounds itself from its blocks.
    const bool many = P >= k;
    const A bound = many ? key(order[m - 1]) : -std::numeric_limits<A>::infinity();
    for (int64_t j = 0; j < m; ++j)
      scan_piece<T, A, NEG>(x + off[order[j]], len[order[j]], base[order[j]], h, bm, sel, bound, !many);
    for (int64_t j = m; j < P; ++j)
      if (key(order[j]) >= h.thr())
        scan_piece<T, A, NEG>(x + off[order[j]], len[order[j]], base[order[j]], h, bm, sel, bound, !many);
  }
  void finish(const T* x, int k, Heap<A>& hi, Heap<A>& lo) {
    hi.n = 0; lo.n = 0;
    if (mx.empty()) return;
    fill<false>(x, k, hi); fill<true>(x, k, lo);
  }
};

struct Cand { double a; int64_t id; int s; };

// The k largest |x − mu| among the candidates of `nsrc` heap pairs; returns their sum and writes
// their within-channel indices and signs. Order: |d| descending, then index ascending.
template <typename A>
double select_topk(Heap<A>* const* his, Heap<A>* const* los, int nsrc, int k, A mu,
                   int64_t* out_id, int* out_s, std::vector<Cand>& buf) {
  buf.clear();
  for (int t = 0; t < nsrc; ++t) {
    for (int j = 0; j < his[t]->n; ++j) { A d = his[t]->v[j] - mu; buf.push_back({(double)std::fabs(d), his[t]->id[j], (d > 0) - (d < 0)}); }
    for (int j = 0; j < los[t]->n; ++j) { A d = -los[t]->v[j] - mu; buf.push_back({(double)std::fabs(d), los[t]->id[j], (d > 0) - (d < 0)}); }
  }
  std::sort(buf.begin(), buf.end(), [](const Cand& p, const Cand& q) { return p.id < q.id; });
  buf.erase(std::unique(buf.begin(), buf.end(), [](const Cand& p, const Cand& q) { return p.id == q.id; }), buf.end());
  int m = std::min<int>(k, (int)buf.size());
  std::partial_sort(buf.begin(), buf.begin() + m, buf.end(), [](const Cand& p, const Cand& q) {
    return p.a > q.a || (p.a == q.a && p.id < q.id); });
  double s = 0.0;
  for (int j = 0; j < m; ++j) { s += buf[j].a; if (out_id) { out_id[j] = buf[j].id; out_s[j] = buf[j].s; } }
  return s;
}

// A chunk sum taken in the accumulation type (fast); one that overflowed (values near the top of
// float's range) is taken again in double by `again`, so the statistics stay finite wherever the
// exact sum is.
template <typename A, typename F> inline double finite_or(A s, F again) {
  const double d = (double)s;
  return std::isfinite(d) ? d : again();
}

// The values of b[0, n) that are >= t (t >= 0) with their indices, in index order, into cv and ci;
// returns their number. b is padded with −1 (never >= t) to a whole number of 16 values, and cv
// and ci have room for as many.
template <typename A> inline int64_t compact_ge(const A* b, int64_t n, A t, A* cv, int32_t* ci) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) { cv[m] = b[i]; ci[m] = (int32_t)i; m += b[i] >= t; }
  return m;
}

// The first positions of the values a and b in x[0, S) (-1 where absent; NaN matches nothing):
// for L∞'s backward, where a and b are the row's max and min. Blocks of 16: a vectorised test per
// block, a scalar look only inside the (one or two) blocks that hold them.
template <typename T, typename A>
inline void first_of_two(const T* x, int64_t S, A a, A b, int64_t& ia, int64_t& ib) {
  ia = -1; ib = -1;
  for (int64_t b0 = 0; b0 < S && (ia < 0 || ib < 0); b0 += 16) {
    const int64_t l = std::min<int64_t>(16, S - b0);
    int hit = 0;
#pragma omp simd reduction(|:hit)
    for (int64_t i = 0; i < l; ++i) {
      const A v = IO<T>::ld(x, b0 + i);
      hit |= (v == a ? 1 : 0) | (v == b ? 2 : 0);
    }
    if (!hit) continue;
    for (int64_t i = b0; i < b0 + l; ++i) {
      const A v = IO<T>::ld(x, i);
      if (ia < 0 && v == a) ia = i;
      if (ib < 0 && v == b) ib = i;
    }
  }
}

#if defined(__AVX512F__)
// The same by compare masks and a bit scan: no data-dependent branch inside a block (the scalar
// look mispredicts about once per value up to the hit, the row's whole cost for rows of 64).
template <> inline void first_of_two<float, float>(const float* x, int64_t S, float a, float b,
                                                   int64_t& ia, int64_t& ib) {
  ia = -1; ib = -1;
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  for (int64_t b0 = 0; b0 < S && (ia < 0 || ib < 0); b0 += 16) {
    const int64_t l = std::min<int64_t>(16, S - b0);
    const __mmask16 live = (__mmask16)((1u << l) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + b0);
    const unsigned ma = _mm512_mask_cmp_ps_mask(live, v, va, _CMP_EQ_OQ);
    const unsigned mb = _mm512_mask_cmp_ps_mask(live, v, vb, _CMP_EQ_OQ);
    if (ia < 0 && ma) ia = b0 + __builtin_ctz(ma);
    if (ib < 0 && mb) ib = b0 + __builtin_ctz(mb);
  }
}
#endif

// The sum of b[0, n).
template <typename A> inline A sum_of(const A* b, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+:s)
  for (int64_t i = 0; i < n; ++i) s += b[i];
  return s;
}
// One pass of the rows backward over n values: with g' = γ·dy (γ per position, or none),
// l1 = Σ g', l2 = Σ g'·(x − mu), l3 = Σ sign(x − mu), and the max and min of x.
template <typename T, typename A>
inline void row_sums_simd(const T* x, const T* g, const A* w, int64_t n, A mu, A& l1, A& l2, A& l3, A& mx, A& mn) {
  A s1 = 0, s2 = 0, s3 = 0;
  A hi = -std::numeric_limits<A>::infinity(), lo = std::numeric_limits<A>::infinity();
#pragma omp simd reduction(+:s1, s2, s3) reduction(max:hi) reduction(min:lo)
  for (int64_t i = 0; i < n; ++i) {
    A v = IO<T>::ld(x, i), gi = IO<T>::ld(g, i), d = v - mu;
    A gp = w ? w[i] * gi : gi;
    s1 += gp; s2 += gp * d; s3 += (A)((d > 0) - (d < 0));
    hi = v > hi ? v : hi; lo = v < lo ? v : lo;
  }
  l1 = s1; l2 = s2; l3 = s3; mx = hi; mn = lo;
}
template <typename T, typename A>
inline void row_sums(const T* x, const T* g, const A* w, int64_t n, A mu, A& l1, A& l2, A& l3, A& mx, A& mn) {
  row_sums_simd<T, A>(x, g, w, n, mu, l1, l2, l3, mx, mn);
}

// The sum, max and min of b[0, n) (a NaN is passed over by the max and min, not by the sum).
template <typename A> inline void sum_ext(const A* b, int64_t n, A& sum, A& mx, A& mn) {
  A s = 0, hi = -std::numeric_limits<A>::infinity(), lo = std::numeric_limits<A>::infinity();
#pragma omp simd reduction(+:s) reduction(max:hi) reduction(min:lo)
  for (int64_t i = 0; i < n; ++i) { const A v = b[i]; s += v; hi = v > hi ? v : hi; lo = v < lo ? v : lo; }
  sum = s; mx = hi; mn = lo;
}

// The sum of |b − mu| over b[0, n).
template <typename A> inline A sum_abs_dev(const A* b, int64_t n, A mu) {
  A s = 0;
#pragma omp simd reduction(+:s)
  for (int64_t i = 0; i < n; ++i) { const A d = b[i] - mu; s += d < 0 ? -d : d; }
  return s;
}

// The candidates (values cv, indices ci; j < m, both readable up to a whole number of 16) that
// fewer than k others exceed, into val and pos in index order, their values added to sum (in
// double); returns their number g >= k. The exact top k are among them: all of them when g = k,
// else values equal to the k-th largest straddle it (see short_topk). cnt: room for m rounded
// up to 16.
template <typename A>
inline int pick_ranked(const A* cv, const int32_t* ci, int64_t m, int k, int32_t* cnt, int32_t* pos, A* val,
                       double& sum) {
  const int32_t mi = (int32_t)m, mp = (mi + 15) & ~15;
  for (int32_t j = 0; j < mp; ++j) cnt[j] = 0;
  for (int32_t i = 0; i < mi; ++i) {
    const A v = cv[i];
#pragma omp simd
    for (int32_t j = 0; j < mp; ++j) cnt[j] += (int32_t)(v > cv[j]);
  }
  int got = 0;
  for (int32_t j = 0; j < mi; ++j) if (cnt[j] < k) { pos[got] = ci[j]; val[got] = cv[j]; sum += (double)cv[j]; ++got; }
  return got;
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
// The same with vector compress (its register form: the memory form is slow on AMD Zen 4).
// Most vectors of a long statistic hold no candidate: a first pass flags those that do (64 per
// word), then only they are compressed and stored.
template <> inline int64_t compact_ge<float>(const float* b, int64_t n, float t, float* cv, int32_t* ci) {
  const __m512 tv = _mm512_set1_ps(t);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t m = 0;
  for (int64_t i0 = 0; i0 < n; i0 += 1024) {
    const int64_t nv = std::min<int64_t>(64, (n - i0 + 15) / 16);
    uint64_t any = 0;
    for (int64_t v = 0; v < nv; ++v)
      any |= (uint64_t)(_mm512_cmp_ps_mask(_mm512_loadu_ps(b + i0 + 16 * v), tv, _CMP_GE_OQ) != 0) << v;
    for (; any; any &= any - 1) {
      const int64_t i = i0 + 16 * __builtin_ctzll(any);
      const __m512 v = _mm512_loadu_ps(b + i);
      const __mmask16 keep = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
      _mm512_storeu_ps(cv + m, _mm512_maskz_compress_ps(keep, v));
      _mm512_storeu_si512(ci + m, _mm512_maskz_compress_epi32(keep, _mm512_add_epi32(lane, _mm512_set1_epi32((int)i))));
      m += __builtin_popcount((unsigned)keep);
    }
  }
  return m;
}
template <> inline int64_t compact_ge<double>(const double* b, int64_t n, double t, double* cv, int32_t* ci) {
  const __m512d tv = _mm512_set1_pd(t);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t m = 0;
  for (int64_t i = 0; i < n; i += 8) {
    const __m512d v = _mm512_loadu_pd(b + i);
    const __mmask8 keep = _mm512_cmp_pd_mask(v, tv, _CMP_GE_OQ);
    _mm512_storeu_pd(cv + m, _mm512_maskz_compress_pd(keep, v));
    _mm256_storeu_si256((__m256i*)(ci + m), _mm256_maskz_compress_epi32(keep, idx));
    m += __builtin_popcount((unsigned)keep);
    idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
  }
  return m;
}
// Float sums in registers: GCC ends an omp simd reduction with the lanes added one by one
// through memory, a long chain for a short statistic.
template <> inline float sum_of<float>(const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(b + i)); s1 = _mm512_add_ps(s1, _mm512_loadu_ps(b + i + 16));
  }
  for (; i < n; i += 16) {
    const __mmask16 in = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
    s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(in, b + i));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
// The same with the sums in registers (GCC ends each omp simd reduction with its lanes added one
// by one through memory: five such chains cost more than the pass over a row of 64).
template <> inline void row_sums<float, float>(const float* x, const float* g, const float* w, int64_t n, float mu,
                                               float& l1, float& l2, float& l3, float& mx, float& mn) {
  if (n >= 256) {   // long rows: the compiler's loop is as fast (its reduction tail is amortised)
    row_sums_simd<float, float>(x, g, w, n, mu, l1, l2, l3, mx, mn);
    return;
  }
  const __m512 m = _mm512_set1_ps(mu), one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  // Two sets of accumulators (rows of 32 and more: the chains of adds overlap), merged at the end.
  __m512 a1[2] = {zero, zero}, a2[2] = {zero, zero}, a3[2] = {zero, zero};
  __m512 hi[2], lo[2];
  hi[0] = hi[1] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  lo[0] = lo[1] = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  auto step = [&](int u, int64_t i, __mmask16 in) {
    const __m512 v = _mm512_maskz_loadu_ps(in, x + i);
    __m512 gp = _mm512_maskz_loadu_ps(in, g + i);
    if (w) gp = _mm512_mul_ps(gp, _mm512_maskz_loadu_ps(in, w + i));
    const __m512 d = _mm512_sub_ps(v, m);
    a1[u] = _mm512_add_ps(a1[u], gp);
    a2[u] = _mm512_fmadd_ps(gp, d, a2[u]);
    a3[u] = _mm512_mask_add_ps(a3[u], _mm512_mask_cmp_ps_mask(in, d, zero, _CMP_GT_OQ), a3[u], one);
    a3[u] = _mm512_mask_sub_ps(a3[u], _mm512_mask_cmp_ps_mask(in, d, zero, _CMP_LT_OQ), a3[u], one);
    hi[u] = _mm512_mask_max_ps(hi[u], in, v, hi[u]);   // v > hi ? v : hi (a NaN v is passed over)
    lo[u] = _mm512_mask_min_ps(lo[u], in, v, lo[u]);
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) { step(0, i, (__mmask16)0xffff); step(1, i + 16, (__mmask16)0xffff); }
  for (; i < n; i += 16) step(0, i, n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u));
  l1 = _mm512_reduce_add_ps(_mm512_add_ps(a1[0], a1[1]));
  l2 = _mm512_reduce_add_ps(_mm512_add_ps(a2[0], a2[1]));
  l3 = _mm512_reduce_add_ps(_mm512_add_ps(a3[0], a3[1]));
  mx = _mm512_reduce_max_ps(_mm512_max_ps(hi[0], hi[1]));
  mn = _mm512_reduce_min_ps(_mm512_min_ps(lo[0], lo[1]));
}
template <> inline void sum_ext<float>(const float* b, int64_t n, float& sum, float& mx, float& mn) {
  __m512 s0 = _mm512_setzero_ps();
  __m512 hi = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 lo = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(in, b + i);
    s0 = _mm512_add_ps(s0, v);
    hi = _mm512_mask_max_ps(hi, in, v, hi);
    lo = _mm512_mask_min_ps(lo, in, v, lo);
  }
  sum = _mm512_reduce_add_ps(s0); mx = _mm512_reduce_max_ps(hi); mn = _mm512_reduce_min_ps(lo);
}
template <> inline float sum_abs_dev<float>(const float* b, int64_t n, float mu) {
  const __m512 m = _mm512_set1_ps(mu);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_add_ps(s0, _mm512_abs_ps(_mm512_sub_ps(_mm512_loadu_ps(b + i), m)));
    s1 = _mm512_add_ps(s1, _mm512_abs_ps(_mm512_sub_ps(_mm512_loadu_ps(b + i + 16), m)));
  }
  for (; i < n; i += 16) {
    const __mmask16 in = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
    s0 = _mm512_mask_add_ps(s0, in, s0, _mm512_abs_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, b + i), m)));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
// The counts of 16 candidates at a time kept in a register (the portable loop's counts go
// through memory, a store-to-load round trip per candidate), each compared with the others
// broadcast from a register (a broadcast from memory waits for the compaction's stores); the
// chosen values summed in two double vectors.
template <>
inline int pick_ranked<float>(const float* cv, const int32_t* ci, int64_t m, int k, int32_t*, int32_t* pos,
                              float* val, double& sum) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512d lo = _mm512_setzero_pd(), hi = lo;
  int got = 0;
  for (int64_t j0 = 0; j0 < m; j0 += 16) {
    const __m512 vj = _mm512_loadu_ps(cv + j0);
    __m512i cnt = _mm512_setzero_si512();
    for (int64_t i0 = 0; i0 < m; i0 += 16) {
      const __m512 vi = _mm512_loadu_ps(cv + i0);
      const int64_t l = std::min<int64_t>(16, m - i0);
      for (int64_t i = 0; i < l; ++i) {
        const __m512 v = _mm512_permutexvar_ps(_mm512_set1_epi32((int)i), vi);
        cnt = _mm512_mask_add_epi32(cnt, _mm512_cmp_ps_mask(v, vj, _CMP_GT_OQ), cnt, one);
      }
    }
    const __mmask16 valid = m - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (m - j0)) - 1u);
    const __mmask16 win = _mm512_mask_cmplt_epi32_mask(valid, cnt, _mm512_set1_epi32(k));
    _mm512_storeu_si512(pos + got, _mm512_maskz_compress_epi32(win, _mm512_loadu_si512(ci + j0)));
    _mm512_storeu_ps(val + got, _mm512_maskz_compress_ps(win, vj));
    got += __builtin_popcount((unsigned)win);
    const __m512 w = _mm512_maskz_mov_ps(win, vj);
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(w)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1))));
  }
  sum += _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  return got;
}
#endif

// Per-thread scratch of short_topk, sized for statistics of n values, with the threshold factor
// of (n, k): for Gaussian data |d| is half-normal, and about target = k + 1.5√k of n values
// exceed ratio·mean|d| with ratio = √π·erfinv(1 − target/n). Only a guess (short_topk is exact
// whatever it is), computed once per kernel call and thread since n and k are fixed there.
template <typename A> struct TopScratch {
  static const int64_t RANKED = 48;  // at most this many candidates are ranked by counting
  std::vector<A> buf, cv, sel, val; std::vector<int32_t> ci, cnt, pos;
  int k; int64_t n = -1;
  A scale = A(0);   // ratio / n: the threshold is scale·Σ|d|
  A cut = A(0);     // 1 − target/n: the fallback threshold is cut·max|d|
  explicit TopScratch(int k_)
      : val((size_t)RANKED + 16), cnt((size_t)RANKED), pos((size_t)std::max<int64_t>(RANKED, k_) + 16), k(k_) {}
  void prepare(int64_t n_) {
    if (n_ == n) return;
    n = n_;
    const int64_t np = (n + 15) & ~int64_t(15);
    buf.assign((size_t)np, A(-1)); cv.resize((size_t)np); ci.resize((size_t)np); sel.resize((size_t)n);
    const double tg = k + 1.5 * std::sqrt((double)k);
    cut = (A)(1.0 - tg / (double)n);
    if (tg >= (double)n) { scale = A(0); return; }
    // erfinv(p) by Newton's method on erf from 0: erf is concave on [0, ∞), so the iterates
    // rise monotonically to the root.
    const double p = 1.0 - tg / (double)n, rpi = std::sqrt(std::acos(-1.0));
    double y = 0.0;
    for (int it = 0; it < 50; ++it) y -= (std::erf(y) - p) * rpi / 2.0 * std::exp(y * y);
    scale = (A)(rpi * y / (double)n);
  }
};

// Top(k) of a statistic of n <= SHORT values (a layer-norm row, a group, a batch-norm channel of
// a small batch), ties to the lowest index (the tie rule). Its passes are vectorised and their
// cost does not grow with k; longer statistics go by pieces and heaps (Pieces, select_topk),
// whose running threshold rejects most values after the first few thousand. A NaN makes the sum
// NaN (as the reference's). Three steps:
// 1. |d| = |x − mu| into a scratch array, then their sum (vectorised passes);
// 2. the candidates: the values >= a threshold t = ratio·mean|d| that admits a few more than k
//    values for most data (TopScratch), compacted in index order. If fewer than k pass, t was
//    too high for the data (light tails: |d| near uniform): next t = max|d|·(1 − target/n),
//    right for uniform |d|, then lower and lower, at last 0 (all values);
// 3. the exact top k among the m candidates. Up to RANKED of them, by counting for each how
//    many exceed it (pick_ranked); more (heavy ties, odd distributions): the k-th largest value,
//    found among the few largest distinct values or else by nth_element. Then the values above
//    it and the first of those equal to it.
// The k chosen are written in index order (the callers need only the set).
#if defined(__AVX512F__)
// Rows of at most 64 float values, held in four registers: |x − mu| (lanes past n: −1, never
// chosen), their sum, and the lanes >= t.
struct Row64 {
  __m512 b[4];
  __mmask16 in[4];
  Row64(const float* x, int64_t n, float mu) {
    const __m512 m = _mm512_set1_ps(mu), none = _mm512_set1_ps(-1.0f);
    for (int v = 0; v < 4; ++v) {
      const int64_t i = 16 * v, l = n - i;
      in[v] = l <= 0 ? (__mmask16)0 : l >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << l) - 1u);
      const __m512 d = _mm512_abs_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(in[v], x + i), m));
      b[v] = _mm512_mask_mov_ps(none, in[v], d);
    }
  }
  float sum() const {
    __m512 s = _mm512_setzero_ps();
    for (int v = 0; v < 4; ++v) s = _mm512_mask_add_ps(s, in[v], s, b[v]);
    return _mm512_reduce_add_ps(s);
  }
  int at_least(float t, __mmask16* c) const {
    const __m512 tv = _mm512_set1_ps(t);
    int m = 0;
    for (int v = 0; v < 4; ++v) { c[v] = _mm512_cmp_ps_mask(b[v], tv, _CMP_GE_OQ); m += __builtin_popcount((unsigned)c[v]); }
    return m;
  }
  // The lanes c (at most 32 in all) packed, in index order, into two registers of values and two
  // of positions (lanes past them: −1 and 0). A piece placed at offset off spans the first
  // register's lanes from off and the second's from 0: the same lane permutation, two masks.
  void pack(const __mmask16* c, __m512* cv, __m512i* ci) const {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    cv[0] = cv[1] = _mm512_set1_ps(-1.0f); ci[0] = ci[1] = _mm512_setzero_si512();
    int off = 0;
    for (int v = 0; v < 4; ++v) {
      if (!c[v]) continue;
      const int pc = __builtin_popcount((unsigned)c[v]);
      const __m512 pv = _mm512_maskz_compress_ps(c[v], b[v]);
      const __m512i pi = _mm512_maskz_compress_epi32(c[v], _mm512_add_epi32(lane, _mm512_set1_epi32(16 * v)));
      const __m512i idx = _mm512_sub_epi32(lane, _mm512_set1_epi32(off));   // used mod 16
      const uint32_t span = ((1u << pc) - 1u) << off;                        // bits off .. off+pc-1
      for (int h = 0; h < 2; ++h) {
        const __mmask16 dst = (__mmask16)(span >> (16 * h));
        if (!dst) continue;
        cv[h] = _mm512_mask_permutexvar_ps(cv[h], dst, idx, pv);
        ci[h] = _mm512_mask_permutexvar_epi32(ci[h], dst, idx, pi);
      }
      off += pc;
    }
  }
};

// The lowest `keep` set bits of m.
inline uint32_t lowest_bits(uint32_t m, int keep) {
  uint32_t r = 0;
  for (int j = 0; j < keep && m; ++j) { r |= m & (0u - m); m &= m - 1; }
  return r;
}

// short_topk for a row of n <= 64 floats without leaving the registers: the threshold guess of
// TopScratch, the candidates packed into two registers, ranked by counting, ties to the lower
// index. False (the caller goes the general way) for a NaN, an overflowed sum, or a guess that
// admits fewer than k or more than 32 values.
inline bool topk_row64(const float* x, int64_t n, float mu, int k, float scale, double& sum,
                       float& kth, int32_t* pos) {
  const Row64 row(x, n, mu);
  const float t = scale * row.sum();
  if (!(t < std::numeric_limits<float>::infinity())) return false;   // NaN or overflow
  __mmask16 c[4];
  const int m = row.at_least(t, c);
  if (m < k || m > 32) return false;
  __m512 cv[2]; __m512i ci[2];
  row.pack(c, cv, ci);
  const int hs = m > 16 ? 2 : 1;
  __m512i cnt0 = _mm512_setzero_si512(), cnt1 = cnt0;
  const __m512i one = _mm512_set1_epi32(1);
  if (hs == 1) {   // how many candidates exceed each one
    for (int i = 0; i < m; ++i) {
      const __m512 v = _mm512_permutexvar_ps(_mm512_set1_epi32(i), cv[0]);
      cnt0 = _mm512_mask_add_epi32(cnt0, _mm512_cmp_ps_mask(v, cv[0], _CMP_GT_OQ), cnt0, one);
    }
  } else {
    const __m512 c0 = cv[0], c1 = cv[1];
    for (int i = 0; i < m; ++i) {
      const __m512 v = _mm512_permutexvar_ps(_mm512_set1_epi32(i & 15), i < 16 ? c0 : c1);
      cnt0 = _mm512_mask_add_epi32(cnt0, _mm512_cmp_ps_mask(v, c0, _CMP_GT_OQ), cnt0, one);
      cnt1 = _mm512_mask_add_epi32(cnt1, _mm512_cmp_ps_mask(v, c1, _CMP_GT_OQ), cnt1, one);
    }
  }
  const uint32_t valid = m == 32 ? 0xffffffffu : (1u << m) - 1u;
  const __m512i kv = _mm512_set1_epi32(k);
  uint32_t win = ((uint32_t)_mm512_cmplt_epi32_mask(cnt0, kv)
                  | (uint32_t)_mm512_cmplt_epi32_mask(cnt1, kv) << 16) & valid;
  kth = std::min(_mm512_mask_reduce_min_ps((__mmask16)win, cv[0]),
                 _mm512_mask_reduce_min_ps((__mmask16)(win >> 16), cv[1]));
  if (__builtin_popcount(win) > k) {   // values equal to the k-th straddle the cut
    const __m512 kt = _mm512_set1_ps(kth);
    const uint32_t above = (uint32_t)_mm512_mask_cmp_ps_mask((__mmask16)win, cv[0], kt, _CMP_GT_OQ)
                           | (uint32_t)_mm512_mask_cmp_ps_mask((__mmask16)(win >> 16), cv[1], kt, _CMP_GT_OQ) << 16;
    const uint32_t eq = (uint32_t)_mm512_mask_cmp_ps_mask((__mmask16)win, cv[0], kt, _CMP_EQ_OQ)
                        | (uint32_t)_mm512_mask_cmp_ps_mask((__mmask16)(win >> 16), cv[1], kt, _CMP_EQ_OQ) << 16;
    win = above | lowest_bits(eq, k - __builtin_popcount(above));
  }
  const __mmask16 w0 = (__mmask16)win, w1 = (__mmask16)(win >> 16);
  _mm512_mask_compressstoreu_epi32(pos, w0, ci[0]);
  _mm512_mask_compressstoreu_epi32(pos + __builtin_popcount((unsigned)w0), w1, ci[1]);
  __m512d acc = _mm512_setzero_pd();
  for (int h = 0; h < 2; ++h) {
    const __m512 w = _mm512_maskz_mov_ps(h ? w1 : w0, cv[h]);
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(w)));
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1))));
  }
  sum = _mm512_reduce_add_pd(acc);
  return true;
}

// topk_at for a row of n <= 64 floats: the lanes >= t when they are exactly k (no tie at t).
inline bool topk_at_row64(const float* x, int64_t n, float mu, int k, float t, int32_t* pos) {
  const Row64 row(x, n, mu);
  __mmask16 c[4];
  if (row.at_least(t, c) != k) return false;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int got = 0;
  for (int v = 0; v < 4; ++v) {
    if (!c[v]) continue;
    _mm512_mask_compressstoreu_epi32(pos + got, c[v], _mm512_add_epi32(lane, _mm512_set1_epi32(16 * v)));
    got += __builtin_popcount((unsigned)c[v]);
  }
  return true;
}
#endif

// |x − mu| of statistic c (its N runs of S values) into ts.buf, prepared for them; returns it.
template <typename T, typename A>
inline A* fill_abs_dev(const T* x, int64_t N, int64_t C, int64_t S, int64_t c, A mu, TopScratch<A>& ts) {
  ts.prepare(N * S);
  A* b = ts.buf.data();
  for (int64_t q = 0; q < N; ++q) {
    const T* xp = x + (q * C + c) * S;
    A* bq = b + q * S;
#pragma omp simd
    for (int64_t i = 0; i < S; ++i) { const A d = IO<T>::ld(xp, i) - mu; bq[i] = d < 0 ? -d : d; }
  }
  return b;
}

// The signs of x − mu at the chosen positions pos[0, k) into out_id / out_s.
template <typename T, typename A>
inline void chosen_signs(const T* x, int64_t N, int64_t C, int64_t S, int64_t c, A mu, int k,
                         const int32_t* pos, int64_t* out_id, int* out_s) {
  for (int j = 0; j < k; ++j) {
    const int64_t p = pos[j];
    const A d = IO<T>::ld(x, N == 1 ? c * S + p : ((p / S) * C + c) * S + p % S) - mu;
    out_id[j] = p; out_s[j] = (d > 0) - (d < 0);
  }
}

// kth (may be null): the k-th largest |x − mu| (NaN for a NaN statistic), which with the tie rule
// fixes the choice (topk_at).
template <typename T, typename A>
double short_topk(const T* x, int64_t N, int64_t C, int64_t S, int64_t c, A mu, int k,
                  int64_t* out_id, int* out_s, TopScratch<A>& ts, A* kth_out = nullptr) {
  const int64_t n = N * S;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (N == 1 && n <= 64) {   // a short row: in registers when the guess admits at most 32
      ts.prepare(n);
      double sum; float kth;
      int32_t* pos = ts.pos.data();
      if (topk_row64(x + c * S, n, mu, k, ts.scale, sum, kth, pos)) {
        if (out_id) chosen_signs<T, A>(x, N, C, S, c, mu, k, pos, out_id, out_s);
        if (kth_out) *kth_out = kth;
        return sum;
      }
    }
  }
#endif
  A* b = fill_abs_dev<T, A>(x, N, C, S, c, mu, ts);
  // The sum is NaN iff a |d| is: a sum of values >= 0 overflows to +inf, never to NaN.
  const A sb = sum_of<A>(b, n);
  if (sb != sb) {
    if (out_id) for (int j = 0; j < k; ++j) { out_id[j] = j; out_s[j] = 0; }
    if (kth_out) *kth_out = sb;
    return std::numeric_limits<double>::quiet_NaN();
  }
  A* cv = ts.cv.data();
  int32_t* ci = ts.ci.data();
  A t = ts.scale * sb;
  if (!(t < std::numeric_limits<A>::infinity())) t = A(0);  // the sum overflowed
  int64_t m = compact_ge<A>(b, n, t, cv, ci);
  for (int tries = 0; m < k; ++tries) {
    if (tries == 0) {
      t = t * A(0.9);   // a near miss (Gaussian data, a few values short): a little lower
    } else if (tries == 1) {
      A mx = A(0);
#pragma omp simd reduction(max:mx)
      for (int64_t i = 0; i < n; ++i) mx = b[i] > mx ? b[i] : mx;
      t = std::min(mx * ts.cut, t * A(0.7));
    } else {
      t = tries < 5 ? t * A(0.7) : A(0);
    }
    m = compact_ge<A>(b, n, t, cv, ci);
  }
  int32_t* pos = ts.pos.data();
  A* val = ts.val.data();
  auto finish = [&](double sum) {   // the positions and signs of the k chosen, and their sum
    if (out_id) chosen_signs<T, A>(x, N, C, S, c, mu, k, pos, out_id, out_s);
    if (kth_out) {   // the least of the k chosen
      const int64_t p0 = pos[0];
      A least = b[p0];
      for (int j = 1; j < k; ++j) least = b[pos[j]] < least ? b[pos[j]] : least;
      *kth_out = least;
    }
    return sum;
  };
  if (m <= TopScratch<A>::RANKED) {
    double sum = 0.0;
    const int got = pick_ranked<A>(cv, ci, m, k, ts.cnt.data(), pos, val, sum);
    if (got == k) return finish(sum);
    // Values equal to the k-th largest kth straddle it: all values above it stay, and the first
    // of those equal to it.
    A kth = val[0];
    for (int j = 1; j < got; ++j) kth = val[j] < kth ? val[j] : kth;
    int above = 0;
    for (int j = 0; j < got; ++j) above += val[j] > kth;
    int ties = k - above, kept = 0;
    sum = 0.0;
    for (int j = 0; j < got; ++j)
      if (val[j] > kth || ties-- > 0) { pos[kept] = pos[j]; sum += (double)val[j]; ++kept; }
    return finish(sum);
  }
  double sum = 0.0;
  if (m == k) {   // all of them (k = n)
    for (int64_t j = 0; j < m; ++j) { pos[j] = ci[j]; sum += (double)cv[j]; }
    return finish(sum);
  }
  // The k-th largest value: first by stepping down the largest distinct values (one pass each;
  // few steps where ties are many), else by nth_element.
  A kth = std::numeric_limits<A>::infinity();
  int above = 0;   // values > kth
  for (int step = 0;; ++step) {
    if (step == 4) {
      A* sel = ts.sel.data();
      std::copy(cv, cv + m, sel);
      std::nth_element(sel, sel + (k - 1), sel + m, [](A p, A q) { return p > q; });
      kth = sel[k - 1];
      above = 0;
      for (int j = 0; j < k - 1; ++j) above += sel[j] > kth;
      break;
    }
    A v = A(-1);
#pragma omp simd reduction(max:v)
    for (int64_t j = 0; j < m; ++j) v = cv[j] < kth && cv[j] > v ? cv[j] : v;
    int eq = 0;
#pragma omp simd reduction(+:eq)
    for (int64_t j = 0; j < m; ++j) eq += cv[j] == v;
    kth = v;
    if (above + eq >= k) break;
    above += eq;
  }
  int ties = k - above, got = 0;   // the values equal to kth that are chosen: the first ones
  for (int64_t j = 0; j < m; ++j)
    if (cv[j] > kth || (cv[j] == kth && ties-- > 0)) { pos[got++] = ci[j]; sum += (double)cv[j]; }
  return finish(sum);
}

// The Top(k) choice of statistic c from the k-th largest |x − mu| the forward saved (sel[c]; < 0 or
// NaN: none saved): the values above it and, by the tie rule, the first of those equal to it, in
// index order, with the signs of x − mu into tid / tsg. One pass and a compaction instead of
// short_topk's selection. False when none was saved.
template <typename T, typename A>
inline bool topk_at(const A* sel, const T* x, int64_t N, int64_t C, int64_t S, int64_t c, A mu, int k,
                    int64_t* tid, int* tsg, TopScratch<A>& ts) {
  if (!sel || !(sel[c] >= A(0))) return false;
  const A t = sel[c];
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (N == 1 && S <= 64) {
      int32_t* pos = ts.pos.data();
      if (topk_at_row64(x + c * S, S, mu, k, t, pos)) {
        chosen_signs<T, A>(x, N, C, S, c, mu, k, pos, tid, tsg);
        return true;
      }
    }
  }
#endif
  A* b = fill_abs_dev<T, A>(x, N, C, S, c, mu, ts);
  A* cv = ts.cv.data();
  int32_t* ci = ts.ci.data();
  const int64_t m = compact_ge<A>(b, N * S, t, cv, ci);
  if (m < k) return false;   // not this statistic's k-th value: choose afresh
  if (m == k) {              // no tie at t (the usual case): all of them
    chosen_signs<T, A>(x, N, C, S, c, mu, k, ci, tid, tsg);
    return true;
  }
  int above = 0;
  for (int64_t j = 0; j < m; ++j) above += cv[j] > t;
  if (above > k) return false;
  int ties = k - above, got = 0;
  int32_t* pos = ts.pos.data();
  for (int64_t j = 0; j < m && got < k; ++j)
    if (cv[j] > t || (cv[j] == t && ties-- > 0)) pos[got++] = ci[j];
  chosen_signs<T, A>(x, N, C, S, c, mu, k, pos, tid, tsg);
  return true;
}

// ---------------------------------------------------------------- NCS layout: one channel per task
template <typename T>
void fwd_ncs(const T* x, T* y, int64_t N, int64_t C, int64_t S,
             const typename IO<T>::A* w, const typename IO<T>::A* b, int aff, int64_t G, int64_t HW,
             int mode, int k, double cst, double eps, int center,
             typename IO<T>::A* mean_o, typename IO<T>::A* inv_o, typename IO<T>::A* sig_o,
             typename IO<T>::A* sel_o, int nt) {
  typedef typename IO<T>::A A;
  const int64_t n = N * S;
  const bool short_rows = n <= SHORT;
  const int64_t chunk = std::max<int64_t>(1, C / (8 * (int64_t)nt));
  parallel(nt, [&] {
    HeapSet<A> hs; std::vector<Cand> buf; Pieces<T, A> pieces; TopScratch<A> ts(k);
    if (mode == 2) hs.init(1, k);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t c = 0; c < C; ++c) {
      double sum = 0.0;
      Heap<A>* hi = mode == 2 ? &hs.hi[0] : nullptr; Heap<A>* lo = mode == 2 ? &hs.lo[0] : nullptr;
      A gmx = -std::numeric_limits<A>::infinity(), gmn = std::numeric_limits<A>::infinity();
      pieces.clear();
      for (int64_t q = 0; q < N; ++q) {
        const T* xp = x + (q * C + c) * S;
        for (int64_t s0 = 0; s0 < S; s0 += CH) {
          const int64_t len = std::min(CH, S - s0);
          const T* xc = xp + s0;
          A ls = 0;
          if (mode == 2 && (k == 1 || !short_rows)) {   // short_topk needs no extremes
            A mx = -std::numeric_limits<A>::infinity(), mn = std::numeric_limits<A>::infinity();
            if constexpr (std::is_same<T, A>::value) {
              sum_ext<A>(xc, len, ls, mx, mn);
            } else {
#pragma omp simd reduction(+:ls) reduction(max:mx) reduction(min:mn)
              for (int64_t i = 0; i < len; ++i) { A v = IO<T>::ld(xc, i); ls += v; mx = v > mx ? v : mx; mn = v < mn ? v : mn; }
            }
            if (k > 1) pieces.add((q * C + c) * S + s0, q * S + s0, len, mx, mn);
            gmx = mx > gmx ? mx : gmx; gmn = mn < gmn ? mn : gmn;
          } else if constexpr (std::is_same<T, A>::value) {
            ls = sum_of<A>(xc, len);   // float: the lanes summed in registers
          } else {
#pragma omp simd reduction(+:ls)
            for (int64_t i = 0; i < len; ++i) ls += IO<T>::ld(xc, i);
          }
          sum += finite_or(ls, [&] { double t = 0; for (int64_t i = 0; i < len; ++i) t += (double)IO<T>::ld(xc, i); return t; });
        }
      }
      const A mu = center ? (A)(sum / (double)n) : A(0);
      double sig;
      if (mode == 1) {
        double sa = 0.0;
        for (int64_t q = 0; q < N; ++q) {
          const T* xp = x + (q * C + c) * S;
          for (int64_t s0 = 0; s0 < S; s0 += CH) {
            const int64_t len = std::min(CH, S - s0);
            const T* xc = xp + s0;
            A la = 0;
            if constexpr (std::is_same<T, A>::value) {
              la = sum_abs_dev<A>(xc, len, mu);
            } else {
#pragma omp simd reduction(+:la)
              for (int64_t i = 0; i < len; ++i) { A d = IO<T>::ld(xc, i) - mu; la += d < 0 ? -d : d; }
            }
            sa += finite_or(la, [&] { double t = 0; for (int64_t i = 0; i < len; ++i) t += std::fabs((double)IO<T>::ld(xc, i) - (double)mu); return t; });
          }
        }
        sig = cst * sa / (double)n;
      } else if (k == 1) {
        // L∞ needs no position in the forward: max|x − μ| = max(max x − μ, μ − min x).
        const A up = gmx - mu, dn = mu - gmn;
        sig = cst * (double)(up > dn ? up : dn);
      } else if (short_rows) {
        // The k-th largest |x − μ| kept for the backward (topk_at).
        sig = cst * short_topk<T, A>(x, N, C, S, c, mu, k, nullptr, nullptr, ts, sel_o ? sel_o + c : nullptr)
              / (double)k;
      } else {
        pieces.finish(x, k, *hi, *lo);
        sig = cst * select_topk<A>(&hi, &lo, 1, k, mu, nullptr, nullptr, buf) / (double)k;
      }
      const A sg = (A)sig;
      const A inv = A(1) / (sg + (A)eps);
      if (aff == 2) {  // weight and bias per position s (layer and RMS norm)
        for (int64_t q = 0; q < N; ++q) {
          const T* xp = x + (q * C + c) * S;
          T* yp = y + (q * C + c) * S;
          if (w && b) {
#pragma omp simd
            for (int64_t i = 0; i < S; ++i) IO<T>::st(yp, i, (IO<T>::ld(xp, i) - mu) * inv * w[i] + b[i]);
          } else if (w) {
#pragma omp simd
            for (int64_t i = 0; i < S; ++i) IO<T>::st(yp, i, (IO<T>::ld(xp, i) - mu) * inv * w[i]);
          } else {
#pragma omp simd
            for (int64_t i = 0; i < S; ++i) IO<T>::st(yp, i, (IO<T>::ld(xp, i) - mu) * inv + (b ? b[i] : A(0)));
          }
        }
      } else if (aff == 3) {
        // Group norm (N = 1, row c = one group of one sample): γ and β per channel, the row being
        // the group's S / HW channels of HW values each.
        const int64_t cg = S / HW, c0 = (c % G) * cg;
        for (int64_t j = 0; j < cg; ++j) {
          const A a = inv * (w ? w[c0 + j] : A(1));
          const A off = b ? b[c0 + j] : A(0);
          const T* xp = x + c * S + j * HW;
          T* yp = y + c * S + j * HW;
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) IO<T>::st(yp, i, (IO<T>::ld(xp, i) - mu) * a + off);
        }
      } else {
        const A a = inv * (w ? w[c] : A(1));
        const A off = b ? b[c] : A(0);
        for (int64_t q = 0; q < N; ++q) {
          const T* xp = x + (q * C + c) * S;
          T* yp = y + (q * C + c) * S;
#pragma omp simd
          for (int64_t i = 0; i < S; ++i) IO<T>::st(yp, i, (IO<T>::ld(xp, i) - mu) * a + off);
        }
      }
      mean_o[c] = mu; inv_o[c] = inv; sig_o[c] = sg;
    }
  });
}

template <typename T>
void bwd_ncs(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t S,
             const typename IO<T>::A* w, const typename IO<T>::A* mean, const typename IO<T>::A* invs,
             int mode, int k, double cst, int center,
             typename IO<T>::A* dw, typename IO<T>::A* db, const typename IO<T>::A* sel, int nt) {
  typedef typename IO<T>::A A;
  const int64_t n = N * S;
  const bool short_rows = n <= SHORT;
  const int64_t chunk = std::max<int64_t>(1, C / (8 * (int64_t)nt));
  parallel(nt, [&] {
    HeapSet<A> hs; std::vector<Cand> buf; Pieces<T, A> pieces; TopScratch<A> ts(k);
    std::vector<int64_t> tid((size_t)std::max(k, 1)); std::vector<int> tsg((size_t)std::max(k, 1));
    if (mode == 2) hs.init(1, k);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t c = 0; c < C; ++c) {
      const A mu = mean[c];
      const bool want_sign = (mode == 1 && center);
      const bool want_top = (mode == 2 && dx != nullptr);
      Heap<A>* hi = mode == 2 ? &hs.hi[0] : nullptr; Heap<A>* lo = mode == 2 ? &hs.lo[0] : nullptr;
      pieces.clear();
      double sdy = 0.0, sdyd = 0.0, ssg = 0.0;
      for (int64_t q = 0; q < N; ++q) {
        const T* xp = x + (q * C + c) * S; const T* gp = dy + (q * C + c) * S;
        for (int64_t s0 = 0; s0 < S; s0 += CH) {
          const int64_t len = std::min(CH, S - s0);
          const T* xc = xp + s0; const T* gc = gp + s0;
          A l1 = 0, l2 = 0, l3 = 0;
          if constexpr (std::is_same<T, A>::value) {   // float, double: row_sums (registers)
            A mx, mn;
            row_sums<T, A>(xc, gc, nullptr, len, mu, l1, l2, l3, mx, mn);
            if (want_top && !short_rows) pieces.add((q * C + c) * S + s0, q * S + s0, len, mx, mn);
          } else if (want_top && !short_rows) {   // short_topk needs no extremes
            A mx = -std::numeric_limits<A>::infinity(), mn = std::numeric_limits<A>::infinity();
#pragma omp simd reduction(+:l1, l2) reduction(max:mx) reduction(min:mn)
            for (int64_t i = 0; i < len; ++i) {
              A v = IO<T>::ld(xc, i), g = IO<T>::ld(gc, i);
              l1 += g; l2 += g * (v - mu); mx = v > mx ? v : mx; mn = v < mn ? v : mn;
            }
            pieces.add((q * C + c) * S + s0, q * S + s0, len, mx, mn);
          } else if (want_sign) {
#pragma omp simd reduction(+:l1, l2, l3)
            for (int64_t i = 0; i < len; ++i) {
              A d = IO<T>::ld(xc, i) - mu, g = IO<T>::ld(gc, i);
              l1 += g; l2 += g * d; l3 += (A)((d > 0) - (d < 0));
            }
          } else {
#pragma omp simd reduction(+:l1, l2)
            for (int64_t i = 0; i < len; ++i) { A g = IO<T>::ld(gc, i); l1 += g; l2 += g * (IO<T>::ld(xc, i) - mu); }
          }
          if (!std::isfinite((double)l1) || !std::isfinite((double)l2)) {
            double t1 = 0, t2 = 0;
            for (int64_t i = 0; i < len; ++i) { const double g = IO<T>::ld(gc, i); t1 += g; t2 += g * ((double)IO<T>::ld(xc, i) - (double)mu); }
            sdy += t1; sdyd += t2;
          } else {
            sdy += (double)l1; sdyd += (double)l2;
          }
          ssg += (double)l3;
        }
      }
      const double inv = (double)invs[c];
      const double gam = w ? (double)w[c] : 1.0;
      if (dw) dw[c] = (A)(inv * sdyd);
      if (db) db[c] = (A)sdy;
      if (!dx) continue;
      // g' = γ·dy; M = mean(g'·x̂); dx = inv·(g' − mean(g') − C·(s − mean(s))·M)
      const double M = gam * inv * sdyd / (double)n;
      const double mg = center ? gam * sdy / (double)n : 0.0;
      const A a = (A)(inv * gam);
      if (mode == 1) {
        const A bc = (A)(inv * (-mg + (center ? cst * M * ssg / (double)n : 0.0)));
        const A e = (A)(-inv * cst * M);
        for (int64_t q = 0; q < N; ++q) {
          const T* xp = x + (q * C + c) * S; const T* gp = dy + (q * C + c) * S; T* op = dx + (q * C + c) * S;
#pragma omp simd
          for (int64_t i = 0; i < S; ++i) {
            A d = IO<T>::ld(xp, i) - mu;
            IO<T>::st(op, i, a * IO<T>::ld(gp, i) + bc + e * (A)((d > 0) - (d < 0)));
          }
        }
      } else {
        if (topk_at<T, A>(sel, x, N, C, S, c, mu, k, tid.data(), tsg.data(), ts)) {
          // the forward's choice, from its saved k-th value
        } else if (short_rows) {
          short_topk<T, A>(x, N, C, S, c, mu, k, tid.data(), tsg.data(), ts);
        } else {
          pieces.finish(x, k, *hi, *lo);
          select_topk<A>(&hi, &lo, 1, k, mu, tid.data(), tsg.data(), buf);
        }
        int sti = 0;   // Σ sign over the chosen (exact in int)
        for (int j = 0; j < k; ++j) sti += tsg[j];
        const double st = sti;
        const double bcd = inv * (-mg + (center ? cst * M * st / (double)k : 0.0));
        const A bc = (A)bcd;
        for (int64_t q = 0; q < N; ++q) {
          const T* gp = dy + (q * C + c) * S; T* op = dx + (q * C + c) * S;
#pragma omp simd
          for (int64_t i = 0; i < S; ++i) IO<T>::st(op, i, a * IO<T>::ld(gp, i) + bc);
        }
        const double e = -inv * cst * M * (double)n / (double)k;
        for (int j = 0; j < k; ++j) {
          const int64_t q = tid[j] / S, s = tid[j] % S, off = (q * C + c) * S + s;
          IO<T>::st(dx, off, (A)((double)a * (double)IO<T>::ld(dy, off) + bcd + e * tsg[j]));
        }
      }
    }
  });
}

// Backward of rows (N = 1, NCS) with weight and bias per position s (layer and RMS norm, G = 0),
// or per channel of a group (group norm, G > 0: row r is one group of one sample, g = r mod G,
// holding the group's S / HW channels as segments of HW values).
// g' = γ·dy; dx = inv·(g' − mean(g') − C·(s − mean(s))·M) as in bwd_ncs. Per position:
// dw_s = Σ_rows dy·x̂, db_s = Σ_rows dy, accumulated per thread and summed in thread order. Per
// channel: each row's segment sums kept per (row, channel) and summed over the samples in order.
//
// One thread's share of bwd_rows' rows (orphaned omp for). A function of its own, with every
// size and pointer a parameter: inside bwd_rows' region lambda the compiler keeps the simd
// reductions in memory and turns γ's conditional load into a gather (about 1.5× slower).
template <typename T, bool GRP>
__attribute__((noinline)) void bwd_rows_part(
    const T* dy, const T* x, T* dx, int64_t R, int64_t S, int64_t G, int64_t HW,
    const typename IO<T>::A* w, const typename IO<T>::A* mean, const typename IO<T>::A* invs,
    int mode, int k, double cst, int center, int64_t chunk,
    double* tw, double* tb, double* cw, double* cb, const typename IO<T>::A* sel) {
  typedef typename IO<T>::A A;
  // γ, β gradients per position into this thread's sums tw / tb, or per (row, channel) into cw / cb.
  const bool pos_affine = tw != nullptr, chan_affine = cw != nullptr;
  const int64_t n = S;
  const bool short_rows = n <= SHORT;
  constexpr bool grp = GRP;
  const int64_t seg = grp ? HW : S, nseg = grp ? S / seg : 1;  // segments of one γ (group) or one
  const A* wpos = grp ? nullptr : w;                           // γ per position (layer, RMS norm)
  {
    HeapSet<A> hs; std::vector<Cand> buf; Pieces<T, A> pieces; TopScratch<A> ts(k);
    std::vector<int64_t> tid((size_t)std::max(k, 1)); std::vector<int> tsg((size_t)std::max(k, 1));
    if (mode == 2) hs.init(1, k);
    const int FLUSH = 32;
    std::vector<A> fwv(pos_affine ? (size_t)S : 0, A(0)), fbv(pos_affine ? (size_t)S : 0, A(0));
    A* fw = fwv.data(); A* fb = fbv.data();
    int pending = 0;
    auto flush = [&] {
      for (int64_t i = 0; i < S; ++i) { tw[i] += (double)fw[i]; tb[i] += (double)fb[i]; fw[i] = A(0); fb[i] = A(0); }
      pending = 0;
    };
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t r = 0; r < R; ++r) {
      const T* xr = x + r * S; const T* gr = dy + r * S;
      const A mu = mean[r], inv = invs[r];
      const A* wseg = grp && w ? w + (r % G) * nseg : nullptr;  // γ of each segment
      Heap<A>* hi = &hs.hi[0]; Heap<A>* lo = &hs.lo[0];
      pieces.clear();
      double s1 = 0.0, s2 = 0.0, s3 = 0.0;
      A gmx = -std::numeric_limits<A>::infinity(), gmn = std::numeric_limits<A>::infinity();
      for (int64_t j = 0; j < nseg; ++j) {
        const double gs = wseg ? (double)wseg[j] : 1.0;
        double e1 = 0.0, e2 = 0.0;  // this segment's Σ g' and Σ g'·d, g' = dy (γ per position: w_s·dy)
        for (int64_t s0 = j * seg; s0 < (j + 1) * seg; s0 += CH) {
          const int64_t len = std::min(CH, (j + 1) * seg - s0);
          A l1, l2, l3, mx, mn;
          row_sums<T, A>(xr + s0, gr + s0, wpos ? wpos + s0 : nullptr, len, mu, l1, l2, l3, mx, mn);
          if (mode == 2 && dx && k > 1 && !short_rows) pieces.add(s0, s0, len, mx, mn);
          gmx = mx > gmx ? mx : gmx; gmn = mn < gmn ? mn : gmn;
          if (!std::isfinite((double)l1) || !std::isfinite((double)l2)) {
            double t1 = 0, t2 = 0;
            for (int64_t i = s0; i < s0 + len; ++i) {
              const double g = (double)IO<T>::ld(gr, i) * (wpos ? (double)wpos[i] : 1.0);
              t1 += g; t2 += g * ((double)IO<T>::ld(xr, i) - (double)mu);
            }
            e1 += t1; e2 += t2;
          } else {
            e1 += (double)l1; e2 += (double)l2;
          }
          s3 += (double)l3;
        }
        s1 += gs * e1; s2 += gs * e2;
        if (chan_affine) { cw[(size_t)(r * nseg + j)] = (double)inv * e2; cb[(size_t)(r * nseg + j)] = e1; }
      }
      if (pos_affine) {
        // γ and β gradients: summed in A over blocks of FLUSH rows (vectorised), then into the
        // thread's double sums, so long columns keep double accuracy at float speed.
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) {
          A g = IO<T>::ld(gr, i);
          fw[i] += g * (IO<T>::ld(xr, i) - mu) * inv; fb[i] += g;
        }
        if (++pending == FLUSH) flush();
      }
      if (!dx) continue;
      const double M = (double)inv * s2 / (double)n;
      const double mg = center ? s1 / (double)n : 0.0;
      T* orow = dx + r * S;
      if (mode == 1) {
        const A bc = (A)((double)inv * (-mg + (center ? cst * M * s3 / (double)n : 0.0)));
        const A e = (A)(-(double)inv * cst * M);
        for (int64_t j = 0; j < nseg; ++j) {
          const A gs = wseg ? wseg[j] : A(1);
#pragma omp simd
          for (int64_t i = j * seg; i < (j + 1) * seg; ++i) {
            A g = IO<T>::ld(gr, i), d = IO<T>::ld(xr, i) - mu;
            IO<T>::st(orow, i, inv * (wpos ? wpos[i] * g : gs * g) + bc + e * (A)((d > 0) - (d < 0)));
          }
        }
      } else {
        if (k == 1) {
          // L∞: the first position of the max or of the min of x, whichever deviates more
          // (the lower position on a tie), as select_topk would choose.
          int64_t imx, imn;
          first_of_two<T, A>(xr, S, gmx, gmn, imx, imn);
          if (imx < 0) imx = S - 1;  // no match (NaN): as the scan to the end would leave it
          if (imn < 0) imn = S - 1;
          const A up = gmx - mu, dn = mu - gmn;
          const bool take_up = up > dn || (up == dn && imx <= imn);
          const A d = take_up ? up : -dn;
          tid[0] = take_up ? imx : imn; tsg[0] = (d > 0) - (d < 0);
        } else {
          if (topk_at<T, A>(sel, x, 1, R, S, r, mu, k, tid.data(), tsg.data(), ts)) {
            // the forward's choice, from its saved k-th value
          } else if (short_rows) {
            short_topk<T, A>(xr, 1, 1, S, 0, mu, k, tid.data(), tsg.data(), ts);
          } else {
            pieces.finish(xr, k, *hi, *lo);
            select_topk<A>(&hi, &lo, 1, k, mu, tid.data(), tsg.data(), buf);
          }
        }
        int sti = 0;   // Σ sign over the chosen (exact in int)
        for (int j = 0; j < k; ++j) sti += tsg[j];
        const double st = sti;
        const double bcd = (double)inv * (-mg + (center ? cst * M * st / (double)k : 0.0));
        const A bc = (A)bcd;
        for (int64_t j = 0; j < nseg; ++j) {
          const A gs = wseg ? wseg[j] : A(1);
#pragma omp simd
          for (int64_t i = j * seg; i < (j + 1) * seg; ++i) {
            A g = IO<T>::ld(gr, i);
            IO<T>::st(orow, i, inv * (wpos ? wpos[i] * g : gs * g) + bc);
          }
        }
        const double e = -(double)inv * cst * M * (double)n / (double)k;
        for (int j = 0; j < k; ++j) {
          const int64_t i = tid[j];
          const double gam = wpos ? (double)wpos[i] : wseg ? (double)wseg[i / seg] : 1.0;
          const double g = (double)IO<T>::ld(gr, i) * gam;
          IO<T>::st(orow, i, (A)((double)inv * g + bcd + e * tsg[j]));
        }
      }
    }
    if (pos_affine && pending) flush();
  }
}

// Backward of rows: see bwd_rows_part for one thread's share.
template <typename T>
void bwd_rows(const T* dy, const T* x, T* dx, int64_t R, int64_t S, int64_t G, int64_t HW,
              const typename IO<T>::A* w, const typename IO<T>::A* mean, const typename IO<T>::A* invs,
              int mode, int k, double cst, int center,
              typename IO<T>::A* dw, typename IO<T>::A* db, const typename IO<T>::A* sel, int nt) {
  typedef typename IO<T>::A A;
  const bool grp = G > 0;
  const int64_t nseg = grp ? S / HW : 1;
  const int64_t chunk = std::max<int64_t>(1, R / (8 * (int64_t)nt));
  const bool pos_affine = dw && !grp, chan_affine = dw && grp;
  std::vector<double> pw(pos_affine ? (size_t)(nt * S) : 0, 0.0), pb(pos_affine ? (size_t)(nt * S) : 0, 0.0);
  std::vector<double> cw(chan_affine ? (size_t)(R * nseg) : 0), cb(chan_affine ? (size_t)(R * nseg) : 0);
  int used = 1;
  parallel(nt, [&] {
    const int t = omp_get_thread_num();
#pragma omp single
    used = omp_get_num_threads();
    double* tw = pos_affine ? pw.data() + (size_t)t * S : nullptr;
    double* tb = pos_affine ? pb.data() + (size_t)t * S : nullptr;
    if (grp)
      bwd_rows_part<T, true>(dy, x, dx, R, S, G, HW, w, mean, invs, mode, k, cst, center, chunk,
                             nullptr, nullptr, chan_affine ? cw.data() : nullptr,
                             chan_affine ? cb.data() : nullptr, sel);
    else
      bwd_rows_part<T, false>(dy, x, dx, R, S, 0, 0, w, mean, invs, mode, k, cst, center, chunk,
                              tw, tb, nullptr, nullptr, sel);
  });
  if (pos_affine) {
    for (int64_t i = 0; i < S; ++i) {
      double a = 0.0, b = 0.0;
      for (int u = 0; u < used; ++u) { a += (double)pw[(size_t)u * S + i]; b += (double)pb[(size_t)u * S + i]; }
      dw[i] = (A)a; db[i] = (A)b;
    }
  } else if (dw) {
    // Channel c = g·(S / HW) + j of group g: the sum over the samples (rows r = q·G + g), in order.
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < nseg; ++j) {
        double a = 0.0, b = 0.0;
        for (int64_t r = g; r < R; r += G) { a += cw[(size_t)(r * nseg + j)]; b += cb[(size_t)(r * nseg + j)]; }
        dw[g * nseg + j] = (A)a; db[g * nseg + j] = (A)b;
      }
  }
}

// ---------------------------------------------------------------- rows layout: rows split across threads
// A tensor viewed as R rows of C·G contiguous values: column j = c·G + g belongs to channel c, and
// channel c's statistic runs over its R·G values, value (r, g) having within-channel index r·G + g.
// NSC (channels-last) is G = 1 with R = N·S rows; an NCS tensor of short runs (S small) is G = S
// with R = N rows, so the inner loops run over C·S contiguous values instead of S.
inline void row_range(int64_t R, int t, int nth, int64_t& r0, int64_t& r1) { r0 = R * t / nth; r1 = R * (t + 1) / nth; }

template <typename T, typename A>
void grp_track_rows(const T* x, int64_t r0, int64_t r1, int64_t J, int64_t G, HeapSet<A>& hs,
                    std::vector<A>& th, std::vector<A>& tl) {
  for (int64_t j = 0; j < J; ++j) { th[j] = hs.hi[j].thr(); tl[j] = -hs.lo[j].thr(); }
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * J;
    int any = 0;
#pragma omp simd reduction(|:any)
    for (int64_t j = 0; j < J; ++j) { A v = IO<T>::ld(xr, j); any |= (v >= th[j]) | (v <= tl[j]); }
    if (!any) continue;
    for (int64_t j = 0; j < J; ++j) {
      A v = IO<T>::ld(xr, j);
      const int64_t id = r * G + j % G;
      if (v >= th[j]) { hs.hi[j].push(v, id); th[j] = hs.hi[j].thr(); }
      if (v <= tl[j]) { hs.lo[j].push(-v, id); tl[j] = -hs.lo[j].thr(); }
    }
  }
}

template <typename T>
void fwd_grp(const T* x, T* y, int64_t R, int64_t C, int64_t G,
             const typename IO<T>::A* w, const typename IO<T>::A* b, int mode, int k,
             double cst, double eps, int center,
             typename IO<T>::A* mean_o, typename IO<T>::A* inv_o, typename IO<T>::A* sig_o, int nt) {
  typedef typename IO<T>::A A;
  const int64_t J = C * G, n = R * G;
  std::vector<double> part((size_t)(nt * J), 0.0);
  // Top(k) of statistics of at most SHORT values: short_topk per channel, straight from x (strided
  // for channels-last, and still 2-3x faster than the heaps there); longer ones by heaps of the k
  // extremes of each column, kept during the pass over the rows.
  const bool shortk = mode == 2 && k > 1 && n <= SHORT;
  const bool heap = mode == 2 && k > 1 && !shortk;   // L∞ keeps the extremes of each column instead
  const bool ext = mode == 2 && k == 1;
  std::vector<HeapSet<A>> heaps(heap ? nt : 0);
  std::vector<A> pmx(ext ? (size_t)(nt * J) : 0, -std::numeric_limits<A>::infinity());
  std::vector<A> pmn(ext ? (size_t)(nt * J) : 0, std::numeric_limits<A>::infinity());
  std::vector<A> mu((size_t)J), a((size_t)J), off((size_t)J);
  int used = 1;
  parallel(nt, [&] {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
#pragma omp single
    used = nth;
    int64_t r0, r1; row_range(R, t, nth, r0, r1);
    double* ps = part.data() + t * J;
    if (ext) {
      A* mx = pmx.data() + t * J; A* mn = pmn.data() + t * J;
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * J;
#pragma omp simd
        for (int64_t j = 0; j < J; ++j) {
          const A v = IO<T>::ld(xr, j);
          ps[j] += (double)v; mx[j] = v > mx[j] ? v : mx[j]; mn[j] = v < mn[j] ? v : mn[j];
        }
      }
    } else {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * J;
#pragma omp simd
        for (int64_t j = 0; j < J; ++j) ps[j] += (double)IO<T>::ld(xr, j);
      }
    }
    if (heap) {
      heaps[t].init(J, k);
      std::vector<A> th((size_t)J), tl((size_t)J);
      grp_track_rows<T, A>(x, r0, r1, J, G, heaps[t], th, tl);
    }
#pragma omp barrier
#pragma omp for
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0;
      for (int u = 0; u < nth; ++u) for (int64_t g = 0; g < G; ++g) s += part[(size_t)(u * J + c * G + g)];
      const A m = center ? (A)(s / (double)n) : A(0);
      for (int64_t g = 0; g < G; ++g) mu[c * G + g] = m;
    }
    if (mode == 1) {
      std::fill(ps, ps + J, 0.0);
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * J;
#pragma omp simd
        for (int64_t j = 0; j < J; ++j) { A d = IO<T>::ld(xr, j) - mu[j]; ps[j] += (double)(d < 0 ? -d : d); }
      }
#pragma omp barrier
    }
    std::vector<Cand> buf; std::vector<Heap<A>*> hp((size_t)(nth * G)), lp((size_t)(nth * G));
    TopScratch<A> ts(k);
#pragma omp for
    for (int64_t c = 0; c < C; ++c) {
      double sig;
      if (mode == 1) {
        double s = 0.0;
        for (int u = 0; u < nth; ++u) for (int64_t g = 0; g < G; ++g) s += part[(size_t)(u * J + c * G + g)];
        sig = cst * s / (double)n;
      } else if (ext) {
        A gmx = -std::numeric_limits<A>::infinity(), gmn = std::numeric_limits<A>::infinity();
        for (int u = 0; u < nth; ++u) for (int64_t g = 0; g < G; ++g) {
          const A hi = pmx[(size_t)(u * J + c * G + g)], lo = pmn[(size_t)(u * J + c * G + g)];
          gmx = hi > gmx ? hi : gmx; gmn = lo < gmn ? lo : gmn;
        }
        const A up = gmx - mu[c * G], dn = mu[c * G] - gmn;
        sig = cst * (double)(up > dn ? up : dn);
      } else if (shortk) {
        sig = cst * short_topk<T, A>(x, R, C, G, c, mu[c * G], k, nullptr, nullptr, ts) / (double)k;
      } else {
        for (int u = 0; u < nth; ++u) for (int64_t g = 0; g < G; ++g) {
          hp[u * G + g] = &heaps[u].hi[c * G + g]; lp[u * G + g] = &heaps[u].lo[c * G + g]; }
        sig = cst * select_topk<A>(hp.data(), lp.data(), (int)(nth * G), k, mu[c * G], nullptr, nullptr, buf) / (double)k;
      }
      const A sg = (A)sig;
      const A inv = A(1) / (sg + (A)eps);
      for (int64_t g = 0; g < G; ++g) { a[c * G + g] = inv * (w ? w[c] : A(1)); off[c * G + g] = b ? b[c] : A(0); }
      mean_o[c] = mu[c * G]; inv_o[c] = inv; sig_o[c] = sg;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * J; T* yr = y + r * J;
#pragma omp simd
      for (int64_t j = 0; j < J; ++j) IO<T>::st(yr, j, (IO<T>::ld(xr, j) - mu[j]) * a[j] + off[j]);
    }
  });
  (void)used;
}

template <typename T>
void bwd_grp(const T* dy, const T* x, T* dx, int64_t R, int64_t C, int64_t G,
             const typename IO<T>::A* w, const typename IO<T>::A* mean, const typename IO<T>::A* invs,
             int mode, int k, double cst, int center,
             typename IO<T>::A* dw, typename IO<T>::A* db, int nt) {
  typedef typename IO<T>::A A;
  const int64_t J = C * G, n = R * G;
  const bool want_sign = (mode == 1 && center && dx);
  const bool want_top = (mode == 2 && dx);
  std::vector<double> part((size_t)(3 * nt * J), 0.0);
  const bool ext = want_top && k == 1;   // L∞: the first position of each column's extremes
  const bool shortk = want_top && k > 1 && n <= SHORT;   // as in fwd_grp
  const bool heap = want_top && k > 1 && !shortk;
  std::vector<HeapSet<A>> heaps(heap ? nt : 0);
  std::vector<A> pmx(ext ? (size_t)(nt * J) : 0, -std::numeric_limits<A>::infinity());
  std::vector<A> pmn(ext ? (size_t)(nt * J) : 0, std::numeric_limits<A>::infinity());
  std::vector<int64_t> pimx(ext ? (size_t)(nt * J) : 0, 0), pimn(ext ? (size_t)(nt * J) : 0, 0);
  std::vector<int64_t> gof((size_t)J);
  for (int64_t j = 0; j < J; ++j) gof[j] = j % G;
  std::vector<A> muj((size_t)J), invj((size_t)J), av((size_t)J), bv((size_t)J), ev((size_t)J);
  for (int64_t j = 0; j < J; ++j) { muj[j] = mean[j / G]; invj[j] = invs[j / G]; }
  const int kk = std::max(k, 1);
  std::vector<int64_t> tid((size_t)(C * kk)); std::vector<int> tsg((size_t)(C * kk));
  std::vector<double> bcd((size_t)C), ed((size_t)C);
  parallel(nt, [&] {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t r0, r1; row_range(R, t, nth, r0, r1);
    double* p1 = part.data() + (size_t)(3 * t * J); double* p2 = p1 + J; double* p3 = p2 + J;
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * J; const T* gr = dy + r * J;
      if (want_sign) {
#pragma omp simd
        for (int64_t j = 0; j < J; ++j) {
          A d = IO<T>::ld(xr, j) - muj[j], g = IO<T>::ld(gr, j);
          p1[j] += (double)g; p2[j] += (double)g * (double)d; p3[j] += (double)((d > 0) - (d < 0));
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < J; ++j) {
          A g = IO<T>::ld(gr, j);
          p1[j] += (double)g; p2[j] += (double)g * (double)(IO<T>::ld(xr, j) - muj[j]);
        }
      }
      if (ext) {
        A* mx = pmx.data() + t * J; A* mn = pmn.data() + t * J;
        int64_t* imx = pimx.data() + t * J; int64_t* imn = pimn.data() + t * J;
        const int64_t base = r * G;
#pragma omp simd
        for (int64_t j = 0; j < J; ++j) {
          const A v = IO<T>::ld(xr, j);
          const bool bu = v > mx[j], bd = v < mn[j];
          mx[j] = bu ? v : mx[j]; imx[j] = bu ? base + gof[j] : imx[j];
          mn[j] = bd ? v : mn[j]; imn[j] = bd ? base + gof[j] : imn[j];
        }
      }
    }
    if (heap) {
      heaps[t].init(J, k);
      std::vector<A> th((size_t)J), tl((size_t)J);
      grp_track_rows<T, A>(x, r0, r1, J, G, heaps[t], th, tl);
    }
#pragma omp barrier
    std::vector<Cand> buf; std::vector<Heap<A>*> hp((size_t)(nth * G)), lp((size_t)(nth * G));
    TopScratch<A> ts(k);
#pragma omp for
    for (int64_t c = 0; c < C; ++c) {
      double sdy = 0.0, sdyd = 0.0, ssg = 0.0;
      for (int u = 0; u < nth; ++u) {
        const double* q = part.data() + (size_t)(3 * u * J);
        for (int64_t g = 0; g < G; ++g) { const int64_t j = c * G + g; sdy += q[j]; sdyd += q[J + j]; ssg += q[2 * J + j]; }
      }
      const double inv = (double)invs[c];
      const double gam = w ? (double)w[c] : 1.0;
      if (dw) dw[c] = (A)(inv * sdyd);
      if (db) db[c] = (A)sdy;
      // g' = γ·dy; M = mean(g'·x̂); dx = inv·(g' − mean(g') − C·(s − mean(s))·M)
      const double M = gam * inv * sdyd / (double)n;
      const double mg = center ? gam * sdy / (double)n : 0.0;
      A a_, b_, e_;
      a_ = (A)(inv * gam);
      if (mode == 1) {
        b_ = (A)(inv * (-mg + (center ? cst * M * ssg / (double)n : 0.0)));
        e_ = (A)(-inv * cst * M);
      } else {
        double st = 0.0;
        if (ext) {
          // The larger deviation's first position; on a tie the lower one (the tie rule).
          A gmx = -std::numeric_limits<A>::infinity(), gmn = std::numeric_limits<A>::infinity();
          int64_t imx = 0, imn = 0;
          for (int u = 0; u < nth; ++u) for (int64_t g = 0; g < G; ++g) {
            const size_t o = (size_t)(u * J + c * G + g);
            if (pmx[o] > gmx || (pmx[o] == gmx && pimx[o] < imx)) { gmx = pmx[o]; imx = pimx[o]; }
            if (pmn[o] < gmn || (pmn[o] == gmn && pimn[o] < imn)) { gmn = pmn[o]; imn = pimn[o]; }
          }
          const A up = gmx - mean[c], dn = mean[c] - gmn;
          const bool take_up = up > dn || (up == dn && imx <= imn);
          const A dd = take_up ? up : -dn;
          tid[(size_t)c] = take_up ? imx : imn; tsg[(size_t)c] = (dd > 0) - (dd < 0);
          st = tsg[(size_t)c];
        } else if (want_top) {
          if (shortk) {
            short_topk<T, A>(x, R, C, G, c, mean[c], k, tid.data() + c * k, tsg.data() + c * k, ts);
          } else {
            for (int u = 0; u < nth; ++u) for (int64_t g = 0; g < G; ++g) {
              hp[u * G + g] = &heaps[u].hi[c * G + g]; lp[u * G + g] = &heaps[u].lo[c * G + g]; }
            select_topk<A>(hp.data(), lp.data(), (int)(nth * G), k, mean[c], tid.data() + c * k, tsg.data() + c * k, buf);
          }
          for (int j = 0; j < k; ++j) st += tsg[(size_t)(c * k + j)];
        }
        bcd[c] = inv * (-mg + (center ? cst * M * st / (double)k : 0.0));
        b_ = (A)bcd[c];
        ed[c] = -inv * cst * M * (double)n / (double)k;
        e_ = A(0);
      }
      for (int64_t g = 0; g < G; ++g) { av[c * G + g] = a_; bv[c * G + g] = b_; ev[c * G + g] = e_; }
    }
    if (dx) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * J; const T* gr = dy + r * J; T* orow = dx + r * J;
        if (mode == 1) {
#pragma omp simd
          for (int64_t j = 0; j < J; ++j) {
            A d = IO<T>::ld(xr, j) - muj[j];
            IO<T>::st(orow, j, av[j] * IO<T>::ld(gr, j) + bv[j] + ev[j] * (A)((d > 0) - (d < 0)));
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < J; ++j) IO<T>::st(orow, j, av[j] * IO<T>::ld(gr, j) + bv[j]);
        }
      }
#pragma omp barrier
      if (mode == 2) {
#pragma omp for
        for (int64_t c = 0; c < C; ++c)
          for (int j = 0; j < k; ++j) {
            const int64_t id = tid[(size_t)(c * k + j)];
            const int64_t o = (id / G) * J + c * G + id % G;
            IO<T>::st(dx, o, (A)((double)av[c * G] * (double)IO<T>::ld(dy, o) + bcd[c] + ed[c] * tsg[(size_t)(c * k + j)]));
          }
      }
    }
  });
}

// Evaluation: y = a_c·x + b_c with a_c = γ_c / (√running_var_c + eps), b_c = β_c − running_mean_c·a_c.
template <typename T>
void eval_t(int layout, const T* x, T* y, int64_t N, int64_t C, int64_t S,
            const typename IO<T>::A* rm, const typename IO<T>::A* rv,
            const typename IO<T>::A* w, const typename IO<T>::A* b, double eps, int nt) {
  typedef typename IO<T>::A A;
  std::vector<A> a((size_t)C), o((size_t)C);
  for (int64_t c = 0; c < C; ++c) {
    A s = A(1) / (std::sqrt(rv[c]) + (A)eps);
    if (w) s = s * w[c];
    A t = -rm[c] * s;
    if (b) t = t + b[c];
    a[c] = s; o[c] = t;
  }
  if (layout == 0) {
    parallel(nt, [&] {
#pragma omp for schedule(static)
      for (int64_t q = 0; q < N * C; ++q) {
        const int64_t c = q % C;
        const T* xp = x + q * S; T* yp = y + q * S;
        const A s = a[c], t = o[c];
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) IO<T>::st(yp, i, t + IO<T>::ld(xp, i) * s);
      }
    });
  } else {
    parallel(nt, [&] {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < N * S; ++r) {
        const T* xr = x + r * C; T* yr = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) IO<T>::st(yr, c, o[c] + IO<T>::ld(xr, c) * a[c]);
      }
    });
  }
}

// Group affine (aff 3) needs N = 1 rows of whole groups: C = samples·G rows of S = (channels per
// group)·HW values.
inline bool group_view(int64_t N, int64_t C, int64_t S, int64_t G, int64_t HW) {
  return N == 1 && G > 0 && HW > 0 && C % G == 0 && S % HW == 0;
}

// NCS tensors whose runs are short go through the rows kernels (see fwd_grp); long runs through
// one channel per task. Top(k) (k > 1) only for short statistics of several runs, or of up to 256
// single values (a BatchNorm1d of [N, C]), which short_topk selects from (the rows kernels' heaps
// are slow for NCS runs).
inline bool use_rows(int64_t N, int64_t C, int64_t S, int mode, int k) {
  return S < 32 && C * S <= 8192 &&
         (mode == 1 || k == 1 || (N > 1 && (S > 1 ? N * S <= 2048 : N <= 256)));
}

template <typename T>
int fwd_t(int layout, const void* x, void* y, int64_t N, int64_t C, int64_t S, const void* w, const void* b,
          int aff, int64_t G, int64_t HW, int mode, int k, double cst, double eps, int center, void* m, void* inv, void* sig,
          void* sel, void* rm, void* rv, double momentum, double bessel, int nt) {
  typedef typename IO<T>::A A;
  if (aff >= 2 && layout != 0) return -3;
  if (aff == 3 && !group_view(N, C, S, G, HW)) return -3;
  A* selv = mode == 2 && k > 1 ? (A*)sel : nullptr;
  if (selv) std::fill(selv, selv + C, A(-1));   // none saved unless fwd_ncs's short_topk fills it
  if (layout == 0 && aff < 2 && use_rows(N, C, S, mode, k))
    fwd_grp<T>((const T*)x, (T*)y, N, C, S, (const A*)w, (const A*)b, mode, k, cst, eps, center, (A*)m, (A*)inv, (A*)sig, nt);
  else if (layout == 0)
    fwd_ncs<T>((const T*)x, (T*)y, N, C, S, (const A*)w, (const A*)b, aff, G, HW, mode, k, cst, eps, center, (A*)m, (A*)inv, (A*)sig, selv, nt);
  else
    fwd_grp<T>((const T*)x, (T*)y, N * S, C, 1, (const A*)w, (const A*)b, mode, k, cst, eps, center, (A*)m, (A*)inv, (A*)sig, nt);
  // Running statistics, as torch: r ← (1 − m)·r + m·(batch value); running_var takes σ̂²·n/(n−1).
  A* pm = (A*)rm; A* pv = (A*)rv; const A* mean = (const A*)m; const A* sg = (const A*)sig;
  const A keep = (A)(1.0 - momentum), take = (A)momentum, bes = (A)bessel;
  for (int64_t c = 0; c < C; ++c) {
    if (pm) pm[c] = pm[c] * keep + take * mean[c];
    if (pv) { const A u = (sg[c] * sg[c]) * bes; pv[c] = pv[c] * keep + take * u; }
  }
  return 0;
}

template <typename T>
int bwd_t(int layout, const void* dy, const void* x, void* dx, int64_t N, int64_t C, int64_t S, const void* w,
          int aff, int64_t G, int64_t HW, const void* m, const void* inv, const void* sel, int mode, int k, double cst,
          int center, void* dw, void* db, int nt) {
  typedef typename IO<T>::A A;
  const A* selv = mode == 2 && k > 1 ? (const A*)sel : nullptr;
  if (aff >= 2) {
    if (layout != 0 || N != 1 || (aff == 3 && !group_view(N, C, S, G, HW))) return -3;
    bwd_rows<T>((const T*)dy, (const T*)x, (T*)dx, C, S, aff == 3 ? G : 0, HW, (const A*)w, (const A*)m, (const A*)inv, mode, k, cst, center, (A*)dw, (A*)db, selv, nt);
    return 0;
  }
  if (layout == 0 && use_rows(N, C, S, mode, k))
    bwd_grp<T>((const T*)dy, (const T*)x, (T*)dx, N, C, S, (const A*)w, (const A*)m, (const A*)inv, mode, k, cst, center, (A*)dw, (A*)db, nt);
  else if (layout == 0)
    bwd_ncs<T>((const T*)dy, (const T*)x, (T*)dx, N, C, S, (const A*)w, (const A*)m, (const A*)inv, mode, k, cst, center, (A*)dw, (A*)db, selv, nt);
  else
    bwd_grp<T>((const T*)dy, (const T*)x, (T*)dx, N * S, C, 1, (const A*)w, (const A*)m, (const A*)inv, mode, k, cst, center, (A*)dw, (A*)db, nt);
  return 0;
}

}  // namespace

#if NM_DTYPE == 0
typedef float nm_t;
#elif NM_DTYPE == 1
typedef double nm_t;
#elif NM_DTYPE == 2
typedef bf16_t nm_t;
#else
typedef f16_t nm_t;
#endif

extern "C" {

// Checked by kernels/build.py: the ABI of the entry points below, and the dtype of this build.
int nm_abi_version() { return 6; }
int nm_dtype() { return NM_DTYPE; }

// The integer arguments are the IntEnums of normmatters/kernels/enums.py:
// dtype (DType): 0 float32, 1 float64, 2 bfloat16, 3 float16 — a build serves only its NM_DTYPE;
// layout (Layout): 0 NCS, 1 NSC; aff (Affine): 0 none, 1 per channel, 2 per position (NCS, N = 1),
// 3 per channel of a group norm (NCS, N = 1, C = samples·G rows of the G groups, each row S / HW
// channels of HW values; G and HW are read only for aff 3);
// mode (Mode): 1 L1, 2 Top(k) (L∞ is k = 1).
// Statistics, weight, bias and running buffers are float32 (float64 for float64 builds).

// sel (may be null; read only for Top(k), k > 1): C statistics-type values, where the forward
// saves each statistic's k-th largest |x − μ| when it chose by short_topk (else −1), and from
// which the backward finds the same k positions in one pass instead of choosing again.
// Training forward: y, per-channel mean, 1/(σ̂ + eps) and σ̂; updates rm / rv (may be null).
int nm_forward(int dtype, int layout, const void* x, void* y, int64_t N, int64_t C, int64_t S,
               const void* w, const void* b, int aff, int64_t G, int64_t HW, int mode, int k, double cst,
               double eps, int center, void* mean, void* inv, void* sig, void* sel, void* rm, void* rv, double momentum,
               double bessel, int nt) {
  if (nt < 1) nt = 1;
  if (dtype != NM_DTYPE) return -2;  // a dtype this build does not instantiate
  if (mode == 2 && (k < 1 || k > 64)) return -4;  // MAX_K of normmatters/kernels/autograd.py
  return fwd_t<nm_t>(layout, x, y, N, C, S, w, b, aff, G, HW, mode, k, cst, eps, center, mean, inv, sig, sel, rm, rv, momentum,
                     bessel, nt);
}

// Closed-form backward: dx (may be null), dw and db (may be null).
int nm_backward(int dtype, int layout, const void* dy, const void* x, void* dx, int64_t N, int64_t C, int64_t S,
                const void* w, int aff, int64_t G, int64_t HW, const void* mean, const void* inv, const void* sel,
                int mode, int k, double cst, int center, void* dw, void* db, int nt) {
  if (nt < 1) nt = 1;
  if (dtype != NM_DTYPE) return -2;
  if (mode == 2 && (k < 1 || k > 64)) return -4;
  return bwd_t<nm_t>(layout, dy, x, dx, N, C, S, w, aff, G, HW, mean, inv, sel, mode, k, cst, center, dw, db, nt);
}

// Evaluation forward of batch norm from the running statistics.
int nm_eval(int dtype, int layout, const void* x, void* y, int64_t N, int64_t C, int64_t S,
            const void* rm, const void* rv, const void* w, const void* b, double eps, int nt) {
  typedef IO<nm_t>::A A;
  if (nt < 1) nt = 1;
  if (dtype != NM_DTYPE) return -2;
  if (layout != 0 && layout != 1) return -3;
  eval_t<nm_t>(layout, (const nm_t*)x, (nm_t*)y, N, C, S, (const A*)rm, (const A*)rv, (const A*)w, (const A*)b, eps, nt);
  return 0;
}

}  // extern "C"
