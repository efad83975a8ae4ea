// The eager CPU entry of the fused Lp normalizations as torch operators, with the autograd node in
// C++ (built on first use by normmatters/kernels/build.py against the installed torch's headers).
//
// Why: a normalization of a small tensor costs a few microseconds of kernel time, and a Python
// torch.autograd.Function around it costs more than that in the interpreter (checks, views,
// allocations, the node). Here one operator call does the layout choice, the allocations, the
// kernel, the running statistics and the autograd node, as torch's own batch_norm does.
//
// The kernels themselves stay in lp_norm_cpu.cpp (no torch headers, one small library per
// dtype); normmatters/kernels/cpu.py hands their addresses to this library once per dtype with
// normmatters::set_kernels. This file only adapts tensors to them.
//
// Operators (registered as CompositeImplicitAutograd: autograd records the C++ node and the
// ATen ops around it; torch.compile never sees them, it traces the torch.library ops of
// normmatters/kernels/autograd.py instead):
//   eager_norm(x, weight, bias, running_mean, running_var, kind, arg, mode, k, constant, eps,
//              momentum) -> y
//     kind 0: batch norm, training (statistics per channel, dim 1; running statistics updated);
//     kind 1: layer norm over the last `arg` dims; kind 2: group norm with `arg` groups;
//     kind 3: RMS norm over the last `arg` dims (no centring).
//   eager_bn_eval(x, running_mean, running_var, weight, bias, eps) -> y   (no autograd)
//   set_kernels(dtype, forward, backward, evaluate) -> ()
//
// Second-order gradients: a backward that runs in grad mode (create_graph=True) calls the
// differentiable closed form normmatters::closed_form_grads, defined in Python.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>
#include <stdexcept>
#include <string>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

typedef int (*fwd_fn)(int, int, const void*, void*, int64_t, int64_t, int64_t, const void*, const void*,
                      int, int64_t, int64_t, int, int, double, double, int, void*, void*, void*, void*,
                      void*, void*, double, double, int);
typedef int (*bwd_fn)(int, int, const void*, const void*, void*, int64_t, int64_t, int64_t, const void*,
                      int, int64_t, int64_t, const void*, const void*, const void*, int, int, double,
                      int, void*, void*, int);
typedef int (*eval_fn)(int, int, const void*, void*, int64_t, int64_t, int64_t, const void*, const void*,
                       const void*, const void*, double, int);

struct Kernels { fwd_fn fwd = nullptr; bwd_fn bwd = nullptr; eval_fn eval = nullptr; };
std::array<Kernels, 4> g_kernels;  // by DType code (enums.py): float32, float64, bfloat16, float16

// Below this many elements one thread: starting an OpenMP team costs more than it saves (cpu.SMALL).
const int64_t SMALL = 1 << 14;
const int NCS = 0, NSC = 1;              // enums.Layout
const int AFF_NONE = 0, AFF_CHANNEL = 1, AFF_POSITION = 2, AFF_GROUP = 3;  // enums.Affine

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kBFloat16: return 2;
    case at::kHalf: return 3;
    default: return -1;
  }
}

const Kernels& kernels_for(const Tensor& x) {
  const int code = dtype_code(x.scalar_type());
  TORCH_CHECK(code >= 0 && g_kernels[code].fwd != nullptr,
              "normmatters: no fused CPU kernels registered for ", x.scalar_type());
  return g_kernels[code];
}

at::ScalarType stat_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int threads(const Tensor& x) {
  return x.numel() < SMALL ? 1 : at::get_num_threads();
}

const void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// γ / β / running buffers as the kernels read them: contiguous, in the statistics dtype. The
// conversion (if any) is an ATen op recorded by autograd.
Tensor as_stat(const Tensor& t, at::ScalarType st) {
  if (!t.defined()) return t;
  if (t.scalar_type() == st && t.is_contiguous()) return t;
  return t.to(st).contiguous();
}

// The dense tensor the kernels read as [N, C, S], its layout and where γ, β apply. kind 0 batch
// norm: per channel (dim 1), NCS or NSC (channels-last of any rank) without a copy where the
// memory allows (autograd.prepare_input), else a contiguous copy; kind 1 / 3 layer / RMS norm:
// rows over the last `arg` dims, γ and β per position; kind 2 group norm: rows of one (sample,
// group) of `arg` groups, γ and β per channel (each channel a run of `inner` values of the row).
//
// x.reshape() copies silently when x's strides do not merge (a permuted, sliced or expanded
// input); the copy is contiguous, so whatever reshape did, x3's own strides say which layout the
// kernel reads, and outputs are allocated in that layout (like()), never in x's. Layer, RMS and
// group norm read x itself (or its contiguous copy) with the sizes N, C, S: no view is made for
// them, a tensor allocation less per call.
struct View3 {
  Tensor x3;  // [N, C, S] for batch norm; x's sizes, contiguous, for the row kinds
  int64_t N, C, S;
  int layout, affine;
  bool center;
  int64_t groups = 0, inner = 0;
};

bool nsc_dense(const Tensor& x3) { return x3.transpose(1, 2).is_contiguous(); }

View3 prepare(const Tensor& x, int64_t kind, int64_t arg, bool has_affine) {
  if (kind == 0) {
    const int64_t N = x.size(0), C = x.size(1);
    const int64_t S = x.numel() / (N * C);
    Tensor x3 = x.reshape({N, C, S});
    if (!x3.is_contiguous() && !nsc_dense(x3)) x3 = x3.contiguous();
    const int layout = x3.is_contiguous() ? (S == 1 ? NSC : NCS) : NSC;
    return {x3, N, C, S, layout, AFF_CHANNEL, true};
  }
  const Tensor xc = x.contiguous();
  if (kind == 2) {
    const int64_t rows = x.size(0) * arg;
    return {xc, 1, rows, x.numel() / rows, NCS, has_affine ? AFF_GROUP : AFF_NONE, true, arg,
            x.numel() / (x.size(0) * x.size(1))};
  }
  int64_t d = 1;
  for (int64_t i = x.dim() - arg; i < x.dim(); ++i) d *= x.size(i);
  return {xc, 1, x.numel() / d, d, NCS, has_affine ? AFF_POSITION : AFF_NONE, kind != 3};
}

// An output (or input gradient) with x's sizes, stored in the memory order in which the kernel
// writes it: v.x3's layout (contiguous NCS, or NSC: channels-last of any rank). This is torch's
// choice too: a contiguous result, except for a channels-last input. A tensor of its own, not a
// view (autograd refuses in-place changes of a custom function's view outputs: ReLU(inplace=True)).
Tensor like(const Tensor& x, const View3& v) {
  if (v.layout != NSC) return at::empty(x.sizes(), x.options());
  const int64_t d = x.dim();
  std::vector<int64_t> strides(d);
  int64_t step = x.size(1);  // channels innermost, then the trailing axes, then the batch
  strides[1] = 1;
  for (int64_t i = d - 1; i >= 2; --i) {
    strides[i] = step;
    step *= x.size(i);
  }
  strides[0] = step;
  return at::empty_strided(x.sizes(), strides, x.options());
}

// A gradient in the layout of the saved input (autograd._fix_layout).
Tensor fix_layout(const Tensor& g, int layout) {
  if (layout == NCS) return g.contiguous();
  if (g.transpose(1, 2).is_contiguous()) return g;
  return g.transpose(1, 2).contiguous().transpose(1, 2);
}

// A constant left to run time: graphs that torch.compile traces with symbolic sizes pass
// constant = -1 (the calibrated C_k(n)) or -2 (the paper's formula) for L∞ / Top(k), and the value
// for this call's n (= N·S) comes from normmatters::runtime_constant (functional.constants through
// Python, cached here per (n, k, which)). Eager calls pass the value itself.
double resolve_constant(double constant, int64_t k, int64_t n) {
  if (constant >= 0) return constant;
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, int64_t>, double> cache;
  const int64_t which = constant < -1.5 ? 2 : 1;
  const auto key = std::make_tuple(n, k, which);
  {
    std::lock_guard<std::mutex> guard(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("normmatters::runtime_constant", "")
      .typed<double(int64_t, int64_t, int64_t)>();
  const double c = op.call(n, k, which);
  std::lock_guard<std::mutex> guard(mu);
  cache[key] = c;
  return c;
}

// One forward kernel call on v (dense [N, C, S] in its layout), writing y and the three statistics
// (mean, 1/(σ̂ + eps), σ̂) at the given addresses, and (sel, may be null) the k-th largest |x − μ|
// of Top(k), for the backward; rm / rv (may be undefined) updated in place with the Bessel factor
// n/(n − 1).
void call_forward(const View3& v, const Tensor& y, const Tensor& w, const Tensor& b, int64_t mode,
                  int64_t k, double constant, double eps, void* mean, void* inv, void* sigma,
                  void* sel, const Tensor& rm, const Tensor& rv, double momentum) {
  const Tensor& x3 = v.x3;
  const int64_t n = v.N * v.S;
  constant = resolve_constant(constant, k, n);
  const int rc = kernels_for(x3).fwd(dtype_code(x3.scalar_type()), v.layout, x3.data_ptr(),
                                     y.data_ptr(), v.N, v.C, v.S, ptr(w), ptr(b), v.affine,
                                     v.groups, v.inner, (int)mode, (int)k, constant, eps,
                                     v.center ? 1 : 0, mean, inv, sigma, sel, mptr(rm), mptr(rv),
                                     momentum, n > 1 ? (double)n / (double)(n - 1) : 1.0,
                                     threads(x3));
  TORCH_CHECK(rc == 0, "normmatters CPU forward kernel failed with code ", rc);
  if (rm.defined()) rm.unsafeGetTensorImpl()->bump_version();
  if (rv.defined()) rv.unsafeGetTensorImpl()->bump_version();
}

// One closed-form backward kernel call: dx, dw, db (each may be undefined: not computed) from the
// gradient g (dense in v's layout) and the saved mean, 1/(σ̂ + eps) and (sel, may be null) the
// forward's k-th largest |x − μ|.
void call_backward(const Tensor& g, const View3& v, const Tensor& dx, const Tensor& w,
                   const void* mean, const void* inv, const void* sel, int64_t mode, int64_t k,
                   double constant, const Tensor& dw, const Tensor& db) {
  const Tensor& x3 = v.x3;
  constant = resolve_constant(constant, k, v.N * v.S);
  const int rc = kernels_for(x3).bwd(dtype_code(x3.scalar_type()), v.layout, g.data_ptr(),
                                     x3.data_ptr(), mptr(dx), v.N, v.C, v.S, ptr(w), v.affine,
                                     v.groups, v.inner, mean, inv, sel, (int)mode, (int)k, constant,
                                     v.center ? 1 : 0, mptr(dw), mptr(db), threads(x3));
  TORCH_CHECK(rc == 0, "normmatters CPU backward kernel failed with code ", rc);
}

// The fused forward: {y (x's sizes), stats} with stats the [3, C] rows mean, 1/(σ̂ + eps), σ̂
// (undefined unless keep_stats: the kernel then writes them into this thread's scratch); rm / rv
// (may be undefined) are updated in the kernel. For Top(k), k > 1, stats has a fourth row: each
// statistic's k-th largest |x − μ| (−1 where the kernel saved none: statistics too long for its
// direct selection), from which the backward finds the forward's choice without choosing again.
std::pair<Tensor, Tensor> forward_kernel(const Tensor& x, const View3& v, const Tensor& w,
                                         const Tensor& b, const Tensor& rm, const Tensor& rv,
                                         int64_t mode, int64_t k, double constant, double eps,
                                         double momentum, bool keep_stats) {
  const int64_t C = v.C;
  Tensor y = like(x, v);
  Tensor stats;
  char* sp;
  int64_t step;
  void* sel = nullptr;
  if (keep_stats) {
    const bool save_sel = mode == 2 && k > 1 && v.layout == NCS;
    stats = at::empty({save_sel ? 4 : 3, C}, v.x3.options().dtype(stat_type(v.x3)));
    sp = static_cast<char*>(stats.data_ptr());
    step = C * stats.element_size();
    if (save_sel) sel = sp + 3 * step;
  } else {
    thread_local std::vector<double> scratch;  // 8-byte units: room for float or double
    if (scratch.size() < (size_t)(3 * C)) scratch.resize((size_t)(3 * C));
    sp = reinterpret_cast<char*>(scratch.data());
    step = C * (v.x3.scalar_type() == at::kDouble ? 8 : 4);
  }
  call_forward(v, y, w, b, mode, k, constant, eps, sp, sp + step, sp + 2 * step, sel, rm, rv,
               momentum);
  return {y, stats};
}

Tensor opt(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }
std::optional<Tensor> some(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

struct LpNormFn : public torch::autograd::Function<LpNormFn> {
  // x is the caller's tensor (its view is taken here, so autograd records no view node); absent
  // γ, β and buffers travel as empty optionals (undefined tensors are not inputs).
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const std::optional<Tensor>& wo, const std::optional<Tensor>& bo,
                               const std::optional<Tensor>& rmo, const std::optional<Tensor>& rvo,
                               int64_t kind, int64_t arg, int64_t mode, int64_t k,
                               double constant, double eps, double momentum, bool want_stats) {
    const Tensor w = opt(wo), b = opt(bo), rm = opt(rmo), rv = opt(rvo);
    const View3 v = prepare(x, kind, arg, w.defined() || b.defined());
    auto out = forward_kernel(x, v, w, b, rm, rv, mode, k, constant, eps, momentum, true);
    // Only x, γ and the statistics are saved, as for torch's batch norm; two saved_data entries
    // (each a hash-map insertion): the integers and the two reals.
    ctx->save_for_backward({x, w, out.second});
    const bool need_affine = (w.defined() && w.requires_grad()) || (b.defined() && b.requires_grad());
    ctx->saved_data["i"] = std::vector<int64_t>{kind, arg, mode, k, x.requires_grad(), w.defined(),
                                                b.defined(), need_affine};
    ctx->saved_data["d"] = std::vector<double>{constant, eps};
    if (!want_stats) return {out.first};  // one output: less for autograd to wrap
    ctx->mark_non_differentiable({out.second});
    return {out.first, out.second.narrow(0, 0, 3)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& w = saved[1];
    const Tensor& stats = saved[2];
    const auto iv = ctx->saved_data["i"].toIntVector();
    const auto dv = ctx->saved_data["d"].toDoubleVector();
    const int64_t kind = iv[0], arg = iv[1];
    const int mode = (int)iv[2], k = (int)iv[3];
    const bool need_x = iv[4] != 0, has_w = iv[5] != 0, has_b = iv[6] != 0, need_affine = iv[7] != 0;
    const double constant = dv[0], eps = dv[1];
    variable_list out(13);  // one per argument of forward
    const Tensor& gy = grads[0];
    if (!gy.defined() || !(need_x || need_affine)) return out;
    const View3 v = prepare(x, kind, arg, has_w || has_b);
    const int64_t N = v.N, C = v.C, S = v.S;
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      // create_graph: the closed form as differentiable torch ops (exact double backward).
      static auto op = c10::Dispatcher::singleton()
          .findSchemaOrThrow("normmatters::closed_form_grads", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                                    const Tensor&, int64_t, int64_t, int64_t,
                                                    double, double, bool, int64_t)>();
      // Group affine: γ goes in as [G, channels per group, 1], the shape telling the closed form
      // how the rows' positions map to channels (ones when there is only β).
      Tensor wv = w;
      if (v.affine == AFF_GROUP) {
        const int64_t cg = x.size(1) / v.groups;
        wv = w.defined() ? w.view({v.groups, cg, 1}) : at::ones({v.groups, cg, 1}, stats.options());
      }
      auto r = op.call(v.x3.view({N, C, S}), some(wv), gy.reshape({N, C, S}), v.layout, mode, k,
                       constant, eps, v.center, v.affine);
      dx = std::get<0>(r).reshape(x.sizes());
      dw = std::get<1>(r);
      db = std::get<2>(r);
    } else {
      // The gradient dense in v's layout (the row kinds: contiguous, as x).
      const Tensor g = kind == 0 ? fix_layout(gy.reshape({N, C, S}), v.layout) : gy.contiguous();
      if (need_x) dx = like(x, v);
      const int64_t size = v.affine == AFF_POSITION ? S : v.affine == AFF_GROUP ? x.size(1) : C;
      if (need_affine) {
        dw = at::empty({size}, stats.options());
        db = at::empty({size}, stats.options());
      }
      const char* sp = static_cast<const char*>(stats.data_ptr());
      const int64_t step = C * stats.element_size();
      call_backward(g, v, dx, w, sp, sp + step, stats.size(0) > 3 ? sp + 3 * step : nullptr, mode,
                    k, constant, dw, db);
    }
    if (v.affine == AFF_POSITION && arg > 1) {
      // γ and β have the normalized shape (e.g. [5, 6] for a layer norm over two axes); the
      // kernels sum their gradients as flat vectors.
      const auto shape = x.sizes().slice(x.dim() - arg);
      if (dw.defined()) dw = dw.view(shape);
      if (db.defined()) db = db.view(shape);
    }
    if (need_x) out[0] = dx;
    if (need_affine && has_w) out[1] = dw;
    if (need_affine && has_b) out[2] = db;
    return out;
  }
};

// {y, stats}: through the autograd node when a gradient is needed, else the kernel alone; stats
// (undefined unless want_stats) for running buffers the kernel cannot update itself.
std::pair<Tensor, Tensor> run(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& rm,
                              const Tensor& rv, int64_t kind, int64_t arg, int64_t mode,
                              int64_t k, double constant, double eps, double momentum,
                              bool want_stats = false) {
  const bool grad = at::GradMode::is_enabled() &&
      (x.requires_grad() || (w.defined() && w.requires_grad()) || (b.defined() && b.requires_grad()));
  if (grad) {
    auto out = LpNormFn::apply(x, some(w), some(b), some(rm), some(rv), kind, arg, mode, k,
                               constant, eps, momentum, want_stats);
    return {out[0], want_stats ? out[1] : Tensor()};
  }
  at::NoGradGuard no_grad;
  const View3 v = prepare(x, kind, arg, w.defined() || b.defined());
  return forward_kernel(x, v, w, b, rm, rv, mode, k, constant, eps, momentum, want_stats);
}

// Running buffers the kernel can update in place: contiguous, statistics dtype, no grad.
bool in_kernel(const Tensor& t, at::ScalarType st) {
  return !t.defined() || (t.scalar_type() == st && t.is_contiguous() && !t.requires_grad());
}

bool on_cpu(const std::optional<Tensor>& t) { return !t.has_value() || t->device().is_cpu(); }

Tensor eager_norm(const Tensor& x, const std::optional<Tensor>& weight,
                  const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                  const std::optional<Tensor>& running_var, int64_t kind, int64_t arg,
                  int64_t mode, int64_t k, double constant, double eps, double momentum) {
  TORCH_CHECK(x.device().is_cpu() && on_cpu(weight) && on_cpu(bias) && on_cpu(running_mean) &&
              on_cpu(running_var), "normmatters::eager_norm: every tensor on the CPU");
  TORCH_CHECK(x.numel() > 0 && x.dim() >= 2, "normmatters::eager_norm: a non-empty input of 2 or more dims");
  const at::ScalarType st = stat_type(x);
  if (kind == 0) {  // batch norm, training
    Tensor w = as_stat(opt(weight), st), b = as_stat(opt(bias), st);
    Tensor rm = opt(running_mean), rv = opt(running_var);
    const bool fused_running = in_kernel(rm, st) && in_kernel(rv, st);
    auto out = run(x, w, b, fused_running ? rm : Tensor(), fused_running ? rv : Tensor(), 0, 0,
                   mode, k, constant, eps, momentum, !fused_running);
    if (!fused_running) {
      // Buffers of another dtype or layout: updated from the returned statistics.
      at::NoGradGuard no_grad;
      const int64_t n = x.numel() / x.size(1);
      if (rm.defined()) rm.mul_(1.0 - momentum).add_(out.second[0].to(rm.scalar_type()), momentum);
      if (rv.defined()) {
        Tensor u = out.second[2].to(rv.scalar_type()).pow(2) *
                   ((double)n / (double)std::max<int64_t>(n - 1, 1));
        rv.mul_(1.0 - momentum).add_(u, momentum);
      }
    }
    return out.first;
  }
  if (kind == 2) {  // group norm: γ and β per channel, inside the kernel
    TORCH_CHECK(arg > 0 && x.size(1) % arg == 0, "normmatters::eager_norm: ", x.size(1),
                " channels in ", arg, " groups");
    return run(x, as_stat(opt(weight), st), as_stat(opt(bias), st), Tensor(), Tensor(), 2, arg,
               mode, k, constant, eps, 0.0).first;
  }
  TORCH_CHECK(kind == 1 || kind == 3, "normmatters::eager_norm: kind ", kind);
  Tensor w = as_stat(opt(weight), st), b = kind == 1 ? as_stat(opt(bias), st) : Tensor();
  return run(x, w, b, Tensor(), Tensor(), kind, arg, mode, k, constant, eps, 0.0).first;
}

Tensor eager_bn_eval(const Tensor& x, const Tensor& running_mean, const Tensor& running_var,
                     const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                     double eps) {
  TORCH_CHECK(x.device().is_cpu() && running_mean.device().is_cpu() &&
              running_var.device().is_cpu() && on_cpu(weight) && on_cpu(bias),
              "normmatters::eager_bn_eval: every tensor on the CPU");
  TORCH_CHECK(x.numel() > 0 && x.dim() >= 2, "normmatters::eager_bn_eval: a non-empty input of 2 or more dims");
  const at::ScalarType st = stat_type(x);
  const Kernels& kern = kernels_for(x);
  TORCH_CHECK(kern.eval != nullptr, "normmatters: no evaluation kernel registered");
  at::NoGradGuard no_grad;
  const View3 v = prepare(x, 0, 0, true);
  Tensor rm = as_stat(running_mean, st), rv = as_stat(running_var, st);
  Tensor w = as_stat(opt(weight), st), b = as_stat(opt(bias), st);
  Tensor y = like(x, v);
  const int rc = kern.eval(dtype_code(x.scalar_type()), v.layout, v.x3.data_ptr(), y.data_ptr(),
                           v.N, v.C, v.S, rm.data_ptr(), rv.data_ptr(),
                           ptr(w), ptr(b), eps, threads(x));
  TORCH_CHECK(rc == 0, "normmatters CPU evaluation kernel failed with code ", rc);
  return y;
}

// The compiled graphs hand the twins below x dense in `layout` (autograd.prepare_input); a tensor
// that is not (a graph that changed its strides) is made so first, and the result is returned in
// x's strides, which the fake implementations promise. Never a kernel over the wrong memory order.
Tensor dense_in(const Tensor& x, int layout) {
  return (layout == NCS ? x.is_contiguous() : nsc_dense(x)) ? x : fix_layout(x, layout);
}

Tensor in_strides_of(const Tensor& y, const Tensor& x) {
  if (y.strides() == x.strides() || !x.is_non_overlapping_and_dense()) return y;
  Tensor out = at::empty_strided(x.sizes(), x.strides(), y.options());
  out.copy_(y);
  return out;
}

// The same kernels as operators on a prepared [N, C, S] tensor in `layout` (what
// autograd.lp_norm_fwd / lp_norm_bwd compute), for graphs that torch.compile builds: their fake
// implementations and autograd formula are registered from Python (autograd.py), so the graph
// calls C++ directly at run time.
std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_lp_norm_fwd(
    const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    int64_t layout, int64_t mode, int64_t k, double constant, double eps, bool center,
    int64_t affine) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu(), "normmatters::cpu_lp_norm_fwd: a [N, C, S] CPU tensor");
  const int64_t C = x.size(1);
  const Tensor xx = dense_in(x, (int)layout);
  Tensor y = at::empty_strided(x.sizes(), xx.strides(), x.options());
  // Three allocations: the outputs of an operator may not alias each other.
  const auto so = x.options().dtype(stat_type(x));
  Tensor mean = at::empty({C}, so), inv = at::empty({C}, so), sigma = at::empty({C}, so);
  const View3 v{xx, x.size(0), C, x.size(2), (int)layout, (int)affine, center};
  call_forward(v, y, opt(weight), opt(bias), mode, k, constant,
               eps, mean.data_ptr(), inv.data_ptr(), sigma.data_ptr(), nullptr, Tensor(), Tensor(),
               0.0);
  return {in_strides_of(y, x), mean, inv, sigma};
}

std::tuple<Tensor, Tensor, Tensor> cpu_lp_norm_bwd(
    const Tensor& grad, const Tensor& x, const std::optional<Tensor>& weight, const Tensor& mean,
    const Tensor& inv, int64_t layout, int64_t mode, int64_t k, double constant, bool center,
    bool need_input, bool need_affine, int64_t affine) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu(), "normmatters::cpu_lp_norm_bwd: a [N, C, S] CPU tensor");
  const int64_t C = x.size(1), S = x.size(2);
  const Tensor g = fix_layout(grad, (int)layout);
  const Tensor xx = dense_in(x, (int)layout);
  const Tensor m = mean.contiguous(), iv = inv.contiguous();
  Tensor dx = need_input ? at::empty_strided(x.sizes(), xx.strides(), x.options()) : x.new_empty({0});
  const int64_t size = affine == AFF_POSITION ? S : C;
  Tensor dw = need_affine ? at::empty({size}, m.options()) : m.new_empty({0});
  Tensor db = need_affine ? at::empty({size}, m.options()) : m.new_empty({0});
  const View3 v{xx, x.size(0), C, S, (int)layout, (int)affine, center};
  call_backward(g, v, need_input ? dx : Tensor(), opt(weight),
                m.data_ptr(), iv.data_ptr(), nullptr, mode, k, constant, need_affine ? dw : Tensor(),
                need_affine ? db : Tensor());
  return {need_input ? in_strides_of(dx, x) : dx, dw, db};
}

void set_kernels(int64_t dtype, int64_t fwd, int64_t bwd, int64_t eval) {
  TORCH_CHECK(dtype >= 0 && dtype < 4, "normmatters::set_kernels: dtype code ", dtype);
  g_kernels[dtype].fwd = reinterpret_cast<fwd_fn>(static_cast<intptr_t>(fwd));
  g_kernels[dtype].bwd = reinterpret_cast<bwd_fn>(static_cast<intptr_t>(bwd));
  g_kernels[dtype].eval = reinterpret_cast<eval_fn>(static_cast<intptr_t>(eval));
}

}  // namespace

extern "C" int nm_op_abi_version() { return 1; }

TORCH_LIBRARY_FRAGMENT(normmatters, m) {
  m.def("eager_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, int kind, int arg, int mode, int k, float constant, float eps, "
        "float momentum) -> Tensor");
  m.def("eager_bn_eval(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, "
        "Tensor? bias, float eps) -> Tensor");
  m.def("set_kernels(int dtype, int forward, int backward, int evaluate) -> ()");
  m.def("cpu_lp_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, int layout, int mode, int k, "
        "float constant, float eps, bool center, int affine=1) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_lp_norm_bwd(Tensor grad, Tensor x, Tensor? weight, Tensor mean, Tensor inv, "
        "int layout, int mode, int k, float constant, bool center, bool need_input, "
        "bool need_affine, int affine=1) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normmatters, CPU, m) {
  m.impl("cpu_lp_norm_fwd", cpu_lp_norm_fwd);
  m.impl("cpu_lp_norm_bwd", cpu_lp_norm_bwd);
}

TORCH_LIBRARY_IMPL(normmatters, CompositeImplicitAutograd, m) {
  m.impl("eager_norm", eager_norm);
  m.impl("eager_bn_eval", eager_bn_eval);
  m.impl("set_kernels", set_kernels);
}
