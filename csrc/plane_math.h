// Per-plane Shuffle Attention maths, in plain C++ (no torch, no CUDA headers), so the CPU
// kernels (csrc/torch_ops/) and any device code can share one statement of it.
//
// Every output plane is one input plane times a gate. With the plane's mean and rstd,
//   out[b, o(c)] = x * sigmoid(alpha * (x - mean) + beta),  o(c) = 2 * (c % (C/2)) + c / (C/2)
// and, with k = c % (2 * half): channel planes (k < half, p = k) alpha = 0,
// beta = cweight[p] * mean + cbias[p]; spatial planes (p = k - half)
// alpha = sweight[p] * gn_weight[p] * rstd, beta = sweight[p] * gn_bias[p] + sbias[p].
//
// Backward, with s the gate and dt = dy * x * s * (1 - s), per plane S1 = sum(dt) and
// S2 = rstd * sum(dt * (x - mean)) over its N elements:
//   dx = dy * s + alpha * dt + k0 + k1 * (x - mean),
//   channel planes k0 = cweight * S1 / N, k1 = 0; spatial planes k0 = -alpha * S1 / N,
//   k1 = -alpha * rstd * S2 / N;
// and, summed over batch and groups in a fixed order: dcbias = S1, dcweight = S1 * mean
// (channel planes); dsbias = S1, dsweight = gn_weight * S2 + gn_bias * S1,
// dgn_weight = sweight * S2, dgn_bias = sweight * S1 (spatial planes).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SA_HOST_DEVICE inline
#endif

namespace sa_kernels {
namespace plane_math {

// Input channel c = i * C/2 + j goes to output channel 2 * j + i (0 <= c < C; written
// without dividing by C/2: a division per plane costs as much as a small plane's arithmetic).
SA_HOST_DEVICE int64_t output_channel(int64_t c, int64_t channels) {
  const int64_t half_c = channels / 2;
  return c < half_c ? 2 * c : 2 * (c - half_c) + 1;
}

// The six per-channel parameters, `half` values each, in the accumulation type A.
template <typename A>
struct Params {
  const A* cweight;
  const A* cbias;
  const A* sweight;
  const A* sbias;
  const A* gn_weight;
  const A* gn_bias;
  int64_t half;
};

// The gate of one plane and where its parameters live.
template <typename A>
struct Gate {
  A alpha, beta;
  bool spatial;   // spatial-branch plane (else channel branch: alpha = 0)
  int64_t param;  // index into the six parameter arrays
};

// The gate of a plane whose channel has index k = c % (2 * half) within its group.
template <typename A>
SA_HOST_DEVICE Gate<A> gate_in_group(const Params<A>& g, int64_t k, A mean, A rstd) {
  Gate<A> r;
  if (k < g.half) {
    r.spatial = false;
    r.param = k;
    r.alpha = A(0);
    r.beta = g.cweight[k] * mean + g.cbias[k];
  } else {
    r.spatial = true;
    r.param = k - g.half;
    r.alpha = g.sweight[r.param] * g.gn_weight[r.param] * rstd;
    r.beta = g.sweight[r.param] * g.gn_bias[r.param] + g.sbias[r.param];
  }
  return r;
}

template <typename A>
SA_HOST_DEVICE Gate<A> plane_gate(const Params<A>& g, int64_t c, A mean, A rstd) {
#if defined(__CUDA_ARCH__)
  // 32-bit on the device, where a 64-bit division is a slow call (the CUDA binding checks
  // that C fits in 32 bits).
  return gate_in_group(g, int64_t(int(c) % int(2 * g.half)), mean, rstd);
#else
  return gate_in_group(g, c % (2 * g.half), mean, rstd);
#endif
}

// dx = dy * s + alpha * dt + k0 + k1 * (x - mean).
template <typename A>
struct GradCoefficients {
  A k0, k1;
};

// inv_n = 1 / N, N the plane's element count.
template <typename A>
SA_HOST_DEVICE GradCoefficients<A> grad_coefficients(const Params<A>& g, const Gate<A>& gate,
                                                     A rstd, A s1, A s2, A inv_n) {
  if (!gate.spatial) return {g.cweight[gate.param] * s1 * inv_n, A(0)};
  return {-gate.alpha * s1 * inv_n, -gate.alpha * rstd * s2 * inv_n};
}

// The two numbers per plane that the parameter gradients sum over (batch, group):
// S1 and, for channel planes S1 * mean, for spatial planes S2.
template <typename A>
SA_HOST_DEVICE void plane_partials(A* out2, bool spatial, A s1, A s2, A mean) {
  out2[0] = s1;
  out2[1] = spatial ? s2 : s1 * mean;
}

// The six parameter gradients of index p from the partials of (B, C, 2) planes, summed
// over batch then group in that fixed order. Outputs in the order cweight, cbias,
// sweight, sbias, gn_weight, gn_bias.
template <typename A>
SA_HOST_DEVICE void parameter_gradients(const Params<A>& g, const A* partials,
                                        int64_t batch, int64_t channels, int64_t p,
                                        A (&grads)[6]) {
  const int64_t groups = channels / (2 * g.half);
  A sum_c = A(0), sum_cm = A(0), sum_s1 = A(0), sum_s2 = A(0);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t base = b * channels + grp * 2 * g.half;
      const A* c_plane = partials + 2 * (base + p);
      const A* s_plane = partials + 2 * (base + g.half + p);
      sum_c += c_plane[0];
      sum_cm += c_plane[1];
      sum_s1 += s_plane[0];
      sum_s2 += s_plane[1];
    }
  }
  grads[0] = sum_cm;
  grads[1] = sum_c;
  grads[2] = g.gn_weight[p] * sum_s2 + g.gn_bias[p] * sum_s1;
  grads[3] = sum_s1;
  grads[4] = g.sweight[p] * sum_s2;
  grads[5] = g.sweight[p] * sum_s1;
}

}  // namespace plane_math
}  // namespace sa_kernels
