// Vector loads and stores between memory of element type T and registers of its
// accumulation type (float for float16/bfloat16/float32, double for float64), and the
// vector gate. Compiled once per CPU capability, like cpu_kernels.h.
#pragma once

#include <cstdint>
#include <tuple>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/vec_convert.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace sa_kernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool kReduced = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// One vector of the accumulation type holds kSize consecutive elements of T.
template <typename T>
struct Lanes {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr int64_t kSize = V::size();

  static V load(const T* p) {
    if constexpr (kReduced<T>) {
      V v;
      at::vec::load_to_float(p, v);
      return v;
    } else {
      return V::loadu(p);
    }
  }

  // The first n < kSize elements; the other lanes are zero.
  static V load(const T* p, int64_t n) {
    if constexpr (kReduced<T>) {
      // One vector of T holds twice kSize elements: convert only the low half.
      return at::vec::convert<A>(at::vec::Vectorized<T>::loadu(p, n));
    } else {
      return V::loadu(p, n);
    }
  }

  static void store(T* p, const V& v, int64_t n = kSize) {
    if constexpr (kReduced<T>) {
      at::vec::convert<T>(v).store(p, int(n));  // rounds to nearest even, into the low half
    } else {
      v.store(p, int(n));
    }
  }
};

// sigmoid(z) = 1 / (1 + exp(-z)). In float it uses ATen's exp_u20 (a short polynomial,
// documented 20 ULP) rather than Sleef's exp (u10): measured over every float z against
// float64 (AVX-512 and AVX2), the sigmoid's worst relative error is 4.2e-7 (3.5 float ulps;
// 1.5e-7 with u10) where the result is a normal float, and 2.9e-39 absolute below it (the
// same as u10), far inside the tests' float32 rtol of 1e-4. exp_u20 turns NaN into a number,
// so a NaN z is passed through: a NaN plane (its mean) keeps a NaN output. Double keeps u10.
template <typename V>
inline V vec_sigmoid(const V& z) {
  const V one(1);
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    const V s = one / (one + z.neg().exp_u20());
    return V::blendv(s, z, z.isnan());
  } else {
    return one / (one + z.neg().exp());
  }
}

// Sum of a vector's lanes as a pairwise tree: a fixed order (reproducible results) with a
// short dependency chain.
template <typename V>
inline typename V::value_type lane_sum(const V& v) {
  using A = typename V::value_type;
  A lanes[V::size()];
  v.store(lanes);
  for (int width = V::size() / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace sa_kernels
