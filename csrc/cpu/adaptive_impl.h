// The adaptive solvers' per-attempt kernels (rk45, adaptive_sde): the scaled error's per-sample sum
// of squares, the step controller and the accepted-row select.  Included by kernels_impl.h inside
// namespace scorefast_cpu (it uses kTile, tile_sumsq, add_tile_partials, for_each_block, as_float).
//
// Arithmetic is the torch reference's, one path per element (scalar float64 controller with libm's
// pow for every sample; fp32 vector scaling with masked tails), so nothing depends on the batch.
#pragma once

// NaN-propagating max (torch.maximum), as std::max drops a NaN in its second argument.
inline float nan_max(float a, float b) { return (a != a || b != b) ? NAN : (a > b ? a : b); }

// Per-sample sums of squares into o [B] of the scaled error: mode 0 (rk45) e / (atol + rtol
// max(|y|, |y2|)); mode 1 (adaptive_sde) (e - y) / max(atol, rtol max(|y|, |y2|)).  Tiles of kTile
// elements from each sample's first one, scaled in fp32 (the reference's rounding), summed by
// tile_sumsq and the tile partials added in tile order: the sums of sumsq_norms on the scaled rows.
void scaled_sumsq(at::Tensor out, const at::Tensor& e, const at::Tensor& y, const at::Tensor& y2, double rtol,
                  double atol, int64_t mode) {
  const int64_t B = e.size(0), D = e.size(1);
  check_rows(e, B, D, "e");
  check_rows(y, B, D, "y");
  check_rows(y2, B, D, "y2");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == B, "out must be float32 [B]");
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (rk45) or 1 (adaptive_sde)");
  const int64_t tiles = (D + kTile - 1) / kTile;
  std::vector<float> partial(static_cast<size_t>(B * tiles), 0.0f);
  const float rt = static_cast<float>(rtol), at_ = static_cast<float>(atol);
  for_each_block(B, D, 0, [&](int64_t b0, int64_t nb, int64_t first, int64_t n) {
    alignas(64) std::array<float, kTile> eb, yb, y2b, v;
    for (int64_t b = b0; b < b0 + nb; ++b) {
      const float* ev = as_float(e.data_ptr(), e.scalar_type(), b * D + first, n, eb.data());
      const float* yv = as_float(y.data_ptr(), y.scalar_type(), b * D + first, n, yb.data());
      const float* y2v = as_float(y2.data_ptr(), y2.scalar_type(), b * D + first, n, y2b.data());
      for (int64_t i = 0; i < n; ++i) {
        const float big = nan_max(std::fabs(yv[i]), std::fabs(y2v[i]));
        if (mode == 0) {
          const volatile float s = big * rt;  // no contraction into an fma: the reference rounds twice
          v[i] = ev[i] / (s + at_);
        } else {
          const float s = big * rt;
          const float scale = (s != s) ? s : (s < at_ ? at_ : s);  // clamp_min (NaN stays NaN)
          const volatile float d = ev[i] - yv[i];
          v[i] = d / scale;
        }
      }
      partial[b * tiles + first / kTile] = tile_sumsq(v.data(), n);
    }
  });
  add_tile_partials(partial, B, tiles, out.data_ptr<float>());
}

// The step controller of one attempt, per sample, in float64; state [9, B] rows (r, h, steps,
// rejected, retry, fail, hs, t, active), see scorefast/ops/step_control.py for the arithmetic.
void step_control(at::Tensor state, const c10::optional<at::Tensor>& sumsq, const at::Tensor& t_end,
                  const at::Tensor& direction, int64_t n, const at::Tensor& c_stage, at::Tensor stage_t,
                  const at::Tensor& base, const at::Tensor& mult, at::Tensor table, at::Tensor accept, int64_t numel,
                  bool batch_norm, int64_t rule, double safety, double exponent, double e_min_grow,
                  double e_min_retry, double e_max, bool advance) {
  const int64_t B = state.size(1), S = c_stage.numel(), R = base.numel();
  auto f64 = [&](const at::Tensor& t, int64_t numel_, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() && t.numel() == numel_, name,
                " must be a contiguous float64 tensor of ", numel_, " values");
  };
  f64(state, 9 * B, "state");
  f64(t_end, B, "t_end");
  f64(direction, B, "direction");
  f64(stage_t, S * B, "stage_t");
  f64(mult, R, "mult");
  TORCH_CHECK(table.is_contiguous() && table.numel() == R * B &&
                  (table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble),
              "table must be a contiguous float32/float64 [R, B] tensor");
  TORCH_CHECK(accept.scalar_type() == at::kBool && accept.numel() == B, "accept must be bool [B]");
  TORCH_CHECK(rule == 0 || rule == 1, "rule must be 0 (rk45) or 1 (adaptive_sde)");
  double* st = state.data_ptr<double>();
  double *r = st, *h = st + B, *steps = st + 2 * B, *rej = st + 3 * B, *retry = st + 4 * B, *fail = st + 5 * B;
  double *hs = st + 6 * B, *t = st + 7 * B, *active = st + 8 * B;
  bool* acc = accept.data_ptr<bool>();
  const double* te = t_end.data_ptr<double>();
  const double* dir = direction.data_ptr<double>();
  if (advance) {
    TORCH_CHECK(sumsq.has_value() && sumsq->defined(), "sumsq is required when advance is true");
    const at::Tensor sq = sumsq->to(at::kDouble);  // fp32 sums widen exactly
    f64(sq, B, "sumsq");
    const double* ss = sq.data_ptr<double>();
    double batch = 0.0;
    if (batch_norm) {
      double total = 0.0;
      for (int64_t b = 0; b < B; ++b) total += ss[b];
      batch = std::sqrt(total / static_cast<double>(B * numel));
    }
    const double tiny = 8.0 * std::numeric_limits<double>::epsilon();
    for (int64_t b = 0; b < B; ++b) {
      const double err = batch_norm ? batch : std::sqrt(ss[b] / static_cast<double>(numel));
      const bool on = active[b] != 0.0;
      const bool ok = on && (err <= 1.0);
      const bool down = on != ok;
      acc[b] = ok;
      if (ok) r[b] = r[b] - h[b];
      steps[b] += ok;
      rej[b] += down;
      double hn;
      if (rule == 0) {
        // the floors are float32 numbers, as the original torch.where of two Python floats made them
        const double lo = static_cast<float>((retry[b] != 0.0 || down) ? e_min_retry : e_min_grow);
        const double c = err != err ? err : std::min(std::max(err, lo), e_max);
        hn = h[b] * (safety * std::pow(c, -exponent));
      } else {
        const double c = err != err ? err : std::max(err, 1e-10);
        hn = safety * h[b] * std::pow(c, -exponent);
      }
      const bool nonfinite = !std::isfinite(err);
      const bool stuck = down && (hn <= tiny * std::fabs(t[b])) && !nonfinite;
      if ((nonfinite || stuck) && fail[b] < 0) fail[b] = (stuck ? 0.5 : 0.0) + static_cast<double>(n);
      h[b] = hn;
      retry[b] = down;
    }
  } else {
    for (int64_t b = 0; b < B; ++b) acc[b] = false;
  }
  const double* cs = c_stage.data_ptr<double>();
  const double* bs = base.data_ptr<double>();
  const double* ml = mult.data_ptr<double>();
  double* stt = stage_t.data_ptr<double>();
  // the table's pointer once (data_ptr checks its dtype on every call: ~R * B calls otherwise)
  const bool table_f32 = table.scalar_type() == at::kFloat;
  float* table32 = table_f32 ? table.data_ptr<float>() : nullptr;  // (nullptr for an empty table)
  double* table64 = table_f32 ? nullptr : table.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    active[b] = r[b] > 0.0;
    h[b] = (h[b] != h[b] || r[b] != r[b]) ? NAN : std::min(h[b], r[b]);
    if (rule == 0) {
      hs[b] = h[b] * dir[b];
      const volatile double p = -dir[b] * r[b];
      t[b] = te[b] + p;
    } else {
      hs[b] = h[b];
      t[b] = r[b] + te[b];
    }
    // torch.addcmul rounds once (a fused multiply-add) on the CPU: the same here
    for (int64_t s = 0; s < S; ++s) stt[s * B + b] = std::fma(cs[s], hs[b], t[b]);
    for (int64_t k = 0; k < R; ++k) {
      const double v = std::fma(ml[k], hs[b], bs[k]);
      if (table_f32)
        table32[k * B + b] = static_cast<float>(v);
      else
        table64[k * B + b] = v;
    }
  }
}

// out_i[b] = mask[b] ? new_i[b] : old_i[b] for rows of contiguous [B, D_i] pairs (one pass over all
// pairs; a rejected row's new values, NaN or not, are never read into the output).
void select_rows(const at::Tensor& mask, const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& news,
                 const std::vector<at::Tensor>& olds) {
  const int64_t B = mask.numel();
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous(), "mask must be contiguous bool [B]");
  TORCH_CHECK(outs.size() == news.size() && news.size() == olds.size(), "outs, news, olds must have equal lengths");
  const bool* m = mask.data_ptr<bool>();
  for (size_t i = 0; i < news.size(); ++i) {
    const auto& o = outs[i];
    TORCH_CHECK(o.is_contiguous() && news[i].is_contiguous() && olds[i].is_contiguous() && o.size(0) == B &&
                    news[i].sizes() == o.sizes() && olds[i].sizes() == o.sizes() &&
                    news[i].scalar_type() == o.scalar_type() && olds[i].scalar_type() == o.scalar_type(),
                "select_rows: pair ", i, " must be contiguous [B, ...] tensors of one shape and dtype");
    const int64_t row = B ? o.numel() / B * o.element_size() : 0;
    auto* op = static_cast<char*>(o.data_ptr());
    const auto* np = static_cast<const char*>(news[i].data_ptr());
    const auto* pp = static_cast<const char*>(olds[i].data_ptr());
    at::parallel_for(0, B, std::max<int64_t>(1, 65536 / std::max<int64_t>(row, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) std::memcpy(op + b * row, (m[b] ? np : pp) + b * row, row);
    });
  }
}

// adaptive_sde's coefficient table out [10, B] (float32/float64) from h [B] and times, a, b [2, B]
// (float64), see scorefast/ops/sde_coefs.py: float64 per sample, each product and sum rounded once
// (volatile: no contraction into an fma), one cast at the store.  fa, fb [2, B] (both or neither):
// an adapter's affine coefficients, folded into the drift, a + b fa and b fb; the noise keeps b.
void sde_coefs(at::Tensor out, const at::Tensor& h, const at::Tensor& times, const at::Tensor& a,
               const at::Tensor& b, const c10::optional<at::Tensor>& fa, const c10::optional<at::Tensor>& fb) {
  const int64_t B = h.numel();
  TORCH_CHECK(h.scalar_type() == at::kDouble && h.is_contiguous(), "h must be a contiguous float64 [B] tensor");
  for (const auto* t : {&times, &a, &b})
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->numel() == 2 * B,
                "times, a, b must be contiguous float64 [2, B] tensors");
  const bool fold = fa.has_value() && fa->defined();
  TORCH_CHECK(fold == (fb.has_value() && fb->defined()), "fa, fb: give both or neither");
  if (fold)
    for (const auto* t : {&*fa, &*fb})
      TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->numel() == 2 * B,
                  "fa, fb must be contiguous float64 [2, B] tensors");
  const double* fap = fold ? fa->data_ptr<double>() : nullptr;
  const double* fbp = fold ? fb->data_ptr<double>() : nullptr;
  TORCH_CHECK(out.is_contiguous() && out.numel() == 10 * B &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble),
              "out must be a contiguous float32/float64 [10, B] tensor");
  const double *hp = h.data_ptr<double>(), *tp = times.data_ptr<double>();
  const double *ap = a.data_ptr<double>(), *bp = b.data_ptr<double>();
  const bool out_f32 = out.scalar_type() == at::kFloat;
  float* out32 = out_f32 ? out.data_ptr<float>() : nullptr;  // once, not per store (nullptr when empty)
  double* out64 = out_f32 ? nullptr : out.data_ptr<double>();
  auto store = [&](int64_t k, int64_t i, double v) {
    if (out_f32)
      out32[k * B + i] = static_cast<float>(v);
    else
      out64[k * B + i] = v;
  };
  for (int64_t i = 0; i < B; ++i) {
    const double hv = hp[i];
    double a0 = ap[i], a1 = ap[B + i], b0 = bp[i], b1 = bp[B + i];
    const double sh = std::sqrt(hv), half = 0.5 * hv;
    const double g0 = std::sqrt(-b0) * sh, g1 = std::sqrt(-b1) * sh;  // the noise: the SDE's own b
    if (fold) {
      const volatile double p0 = b0 * fap[i], p1 = b1 * fap[B + i];  // rounded before the sums (no fma)
      a0 = a0 + p0;
      a1 = a1 + p1;
      b0 = b0 * fbp[i];
      b1 = b1 * fbp[B + i];
    }
    const volatile double ha0 = hv * a0, qa0 = half * a0;
    store(0, i, 1.0 - ha0);
    store(1, i, -(hv * b0));
    store(2, i, g0);
    store(3, i, 1.0 - qa0);
    store(4, i, -(half * b0));
    store(5, i, -(half * a1));
    store(6, i, -(half * b1));
    store(7, i, 0.5 * (g0 + g1));
    store(8, i, tp[i]);
    store(9, i, tp[B + i]);
  }
}
