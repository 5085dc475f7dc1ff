// Vector loads and stores between memory of element type T and registers of its
// accumulation type (float for float16/bfloat16/float32, double for float64), and the
// vector gate. Compiled once per CPU capability, like cpu_kernels.h.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/vec_convert.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace sa_kernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool kReduced = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

#if defined(CPU_CAPABILITY_AVX512)
// Whether the kernels convert float to bfloat16 in one instruction: where the CPU has
// AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later), unless
// SA_KERNELS_CPU_BF16_INSTRUCTIONS=0 (the tests compare both ways). Read once, at load.
inline bool use_bf16_instructions() {
#if defined(__GNUC__)
  const char* env = std::getenv("SA_KERNELS_CPU_BF16_INSTRUCTIONS");
  return !(env && std::string(env) == "0") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}
inline const bool kCpuHasAvx512Bf16 = use_bf16_instructions();

// 16 floats as 16 elements of T (bfloat16 or float16), rounded to nearest even. bfloat16 in
// software takes eight instructions (rounding bias, NaN check, narrowing); VCVTNEPS2BF16 does
// it in one where the CPU has it, written as assembly because this module is compiled for
// AVX-512 without AVX512_BF16 and runs on CPUs that lack it. The two give the same bits
// except for NaN (another NaN pattern) and values below 2^-126 (1.2e-38) in magnitude, which
// the instruction flushes to zero where software keeps or rounds up the subnormal.
template <typename T>
C10_ALWAYS_INLINE __m256i reduced_bits(__m512 v) {
#if defined(__GNUC__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (kCpuHasAvx512Bf16) {
      __m256i r;
      asm volatile("vcvtneps2bf16 {%1, %0|%0, %1}" : "=v"(r) : "v"(v));  // volatile: never hoisted above the check
      return r;
    }
  }
#endif
  return _mm512_castsi512_si256(at::vec::convert<T>(at::vec::Vectorized<float>(v)));
}
#endif

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

  // A full vector stored past the caches (non-temporal), for outputs too large to stay in
  // them: no read for ownership of the line it fills. p must be aligned to kStoreBytes.
  // Where the ISA has no such store (the default capability), an ordinary one.
  static constexpr int64_t kStoreBytes = kSize * int64_t(sizeof(T));
  C10_ALWAYS_INLINE static void stream(T* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kReduced<T>) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reduced_bits<T>(v));
    } else if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, v);
    } else {
      _mm512_stream_pd(p, v);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (kReduced<T>) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(at::vec::convert<T>(v)));
    } else if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, v);
    } else {
      _mm256_stream_pd(p, v);
    }
#else
    store(p, v);
#endif
  }

  C10_ALWAYS_INLINE static void store(T* p, const V& v, int64_t n = kSize) {
    if constexpr (kReduced<T>) {
#if defined(CPU_CAPABILITY_AVX512)
      const __m256i r = reduced_bits<T>(v);
      if (n == kSize) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
      } else {
        _mm256_mask_storeu_epi16(p, __mmask16((1u << n) - 1), r);
      }
#else
      at::vec::convert<T>(v).store(p, int(n));  // rounds to nearest even, into the low half
#endif
    } else {
      v.store(p, int(n));
    }
  }
};

// Where a kernel writes its output: ordinary stores, or (stream) non-temporal ones for
// full, aligned vectors. A thread that streamed calls fence() before its writes may be read
// by another thread. Always inlined: GCC called it out of line from the channels-last loops,
// with both vectors passed through memory.
template <typename T>
struct OutputStores {
  bool stream = false;

  C10_ALWAYS_INLINE void operator()(T* p, const typename Lanes<T>::V& v, int64_t count) const {
    if (stream && count == Lanes<T>::kSize &&
        reinterpret_cast<uintptr_t>(p) % Lanes<T>::kStoreBytes == 0) {
      Lanes<T>::stream(p, v);
    } else {
      Lanes<T>::store(p, v, count);
    }
  }

  void fence() const {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (stream) _mm_sfence();
#endif
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// float sigmoid on AVX-512 from e = exp(-|z|), which lies in (0, 1] and never overflows:
// sigmoid(z) = 1 / (1 + e) for z >= 0 and e / (1 + e) below. exp as 2^n * p(r) (n the
// nearest integer to -|z| / ln 2, r the remainder, p = 1 + r q(r) a degree-5 polynomial
// fitted to e^r on [-ln 2 / 2, ln 2 / 2] for relative error, 9.1e-8 in exact arithmetic; p(0)
// = 1, so sigmoid(0) = 0.5 exactly), 2^n applied by scalef, which underflows to 0 as the true
// value does; 1 / (1 + e) as rcp14 and one Newton step. 17 instructions where at::vec's
// exp_u20 and the fix-ups its overflow needs took 27. |z| is capped at 104 (e = 0 beyond it
// in float) so that infinities never meet; a NaN z stays NaN through every step (min returns
// its second operand when that is NaN), so a NaN plane keeps a NaN output. Worst relative
// error 3.8e-7 over float z in [-87, 30] (float32 model of these steps against float64; the
// test suite's float32 rtol is 1e-4); below -87 the result is subnormal, of large relative
// but tiny absolute error.
C10_ALWAYS_INLINE __m512 sigmoid_avx512(__m512 z) {
  const __m512 az = _mm512_min_ps(_mm512_set1_ps(104.f), _mm512_abs_ps(z));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(az, _mm512_set1_ps(-1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(0.693147182f), az);  // -|z| - n ln 2
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0x1.0fa834p-7f), r, _mm512_set1_ps(0x1.573a54p-5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.555a6ap-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.fffdc6p-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.fffff6p-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512 e = _mm512_scalef_ps(p, n);
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 d = _mm512_add_ps(one, e);
  const __m512 r0 = _mm512_rcp14_ps(d);
  const __m512 s = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(d, r0, one), r0);
  return _mm512_mask_mul_ps(s, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), e, s);
}
#endif

// sigmoid(z) = 1 / (1 + exp(-z)), always inlined (GCC called it out of line from loops,
// through the PLT). float on AVX-512: sigmoid_avx512. Other float: ATen's
// exp_u20 (a short polynomial, documented 20 ULP) rather than Sleef's exp (u10), and on AVX2
// an approximate reciprocal with one Newton step rather than a divide; measured through the
// op against float64 on 2^20 values of z in [-87, 30]: worst relative error of x * sigmoid(x)
// 4.5e-7, the product's rounding included. exp_u20 turns NaN into a number, so a NaN z is
// passed through: a NaN plane (its mean) keeps a NaN output. Double keeps u10 and the divide.
template <typename V>
C10_ALWAYS_INLINE V vec_sigmoid(const V& z) {
  const V one(1);
  if constexpr (std::is_same_v<typename V::value_type, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    return sigmoid_avx512(z);
#else
    const V d = one + z.neg().exp_u20();
#if defined(CPU_CAPABILITY_AVX2)
    // 1 / d as an approximate reciprocal and one Newton step (a divide is the slowest
    // instruction of the gate); d = inf (z below about -88) has the limit 0.
    const V r0 = _mm256_rcp_ps(d);
    const V r = at::vec::fmadd(r0, at::vec::fnmadd(d, r0, one), r0);
    const V s = V::blendv(r, V(0), d == V(std::numeric_limits<float>::infinity()));
#else
    const V s = one / d;
#endif
    return V::blendv(s, z, z.isnan());
#endif
  } else {
    return one / (one + z.neg().exp());
  }
}

// Packs the lanes of two vectors that need a per-element sigmoid (a mask each) into one
// vector and unpacks the result, so one sigmoid serves both when their lanes fit in one.
// Channels-last vectors hold consecutive channels, which alternate between the channel
// branch (a constant gate per plane) and the spatial branch every `half` channels: without
// packing, every lane of a mixed vector would pay for an exp. Only lanes move; the sigmoid's
// value per lane is unchanged. Where the ISA has no cheap lane permutes (or for double),
// packable() is false and callers take a sigmoid of each vector.
template <typename V>
class LanePacker {
 public:
  static constexpr int kSize = V::size();
  LanePacker() = default;
  // mask_a[l], mask_b[l]: whether lane l of a (of b) needs its sigmoid.
  LanePacker(const bool* mask_a, const bool* mask_b) {
    count_a_ = 0;
    int count = 0;
    for (int l = 0; l < kSize; ++l) count_a_ += mask_a[l];
    for (int l = 0; l < kSize; ++l) count += mask_a[l] + mask_b[l];
    packable_ = kHasPermutes && count <= kSize;
    if (!packable_) return;
    int next = 0;
    for (int l = 0; l < kSize; ++l) {
      if (mask_a[l]) source_[next++] = l;
    }
    for (int l = 0; l < kSize; ++l) {
      if (mask_b[l]) source_[next++] = kSize + l;
    }
    for (; next < kSize; ++next) source_[next] = 0;
    for (int l = 0; l < kSize; ++l) {
      mask_a_[l] = mask_a[l];
      mask_b_[l] = mask_b[l];
    }
    prepare();
  }

  bool packable() const { return packable_; }

  // The masked lanes of a, then those of b, in lane order.
  V pack(const V& a, const V& b) const;
  // Scatters packed lanes back where pack() took them; other lanes from fill_a, fill_b.
  void unpack(const V& packed, const V& fill_a, const V& fill_b, V& a, V& b) const;

 private:
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  static constexpr bool kHasPermutes = std::is_same_v<typename V::value_type, float>;
#else
  static constexpr bool kHasPermutes = false;
#endif
  void prepare();

  bool packable_ = false;
  int count_a_ = 0;
  int32_t source_[kSize] = {};  // lane of packed <- lane of a (< kSize) or b (>= kSize)
  bool mask_a_[kSize] = {}, mask_b_[kSize] = {};
#if defined(CPU_CAPABILITY_AVX512)
  __m512i pack_index_, shift_index_;
  __mmask16 lanes_a_ = 0, lanes_b_ = 0;
#elif defined(CPU_CAPABILITY_AVX2)
  __m256i from_, to_a_, to_b_;
  __m256 take_b_, lanes_a_, lanes_b_;
#endif
};

template <typename V>
inline void LanePacker<V>::prepare() {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kHasPermutes) {
    int32_t shift[kSize];
    for (int l = 0; l < kSize; ++l) {
      shift[l] = (l + count_a_) % kSize;
      lanes_a_ |= __mmask16(mask_a_[l]) << l;
      lanes_b_ |= __mmask16(mask_b_[l]) << l;
    }
    pack_index_ = _mm512_loadu_si512(source_);
    shift_index_ = _mm512_loadu_si512(shift);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (kHasPermutes) {
    // AVX2 permutes one source at a time: a's lanes and b's lanes are permuted separately
    // and blended; unpacking permutes each lane's packed value back, then blends.
    int32_t from[kSize], to_a[kSize], to_b[kSize], take_b[kSize], in_a[kSize], in_b[kSize];
    int rank_a = 0, rank_b = count_a_;
    for (int l = 0; l < kSize; ++l) {
      from[l] = source_[l] % kSize;  // the lane of a or of b, as take_b picks
      take_b[l] = l >= count_a_ ? -1 : 0;
      to_a[l] = mask_a_[l] ? rank_a++ : 0;
      to_b[l] = mask_b_[l] ? rank_b++ : 0;
      in_a[l] = mask_a_[l] ? -1 : 0;
      in_b[l] = mask_b_[l] ? -1 : 0;
    }
    auto load = [](const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
    from_ = load(from);
    to_a_ = load(to_a);
    to_b_ = load(to_b);
    take_b_ = _mm256_castsi256_ps(load(take_b));
    lanes_a_ = _mm256_castsi256_ps(load(in_a));
    lanes_b_ = _mm256_castsi256_ps(load(in_b));
  }
#endif
}

template <typename V>
C10_ALWAYS_INLINE V LanePacker<V>::pack(const V& a, const V& b) const {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kHasPermutes) return _mm512_permutex2var_ps(a, pack_index_, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (kHasPermutes) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(a, from_), _mm256_permutevar8x32_ps(b, from_), take_b_);
  }
#endif
  return a;  // not reached: callers check packable()
}

template <typename V>
C10_ALWAYS_INLINE void LanePacker<V>::unpack(const V& packed, const V& fill_a, const V& fill_b, V& a, V& b) const {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kHasPermutes) {
    a = _mm512_mask_expand_ps(fill_a, lanes_a_, packed);
    b = _mm512_mask_expand_ps(fill_b, lanes_b_, _mm512_permutexvar_ps(shift_index_, packed));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (kHasPermutes) {
    a = _mm256_blendv_ps(fill_a, _mm256_permutevar8x32_ps(packed, to_a_), lanes_a_);
    b = _mm256_blendv_ps(fill_b, _mm256_permutevar8x32_ps(packed, to_b_), lanes_b_);
    return;
  }
#endif
  a = fill_a;  // not reached: callers check packable()
  b = fill_b;
}

// The first `count` (< size) lanes of v; the others zero.
template <typename V>
C10_ALWAYS_INLINE V first_lanes(const V& v, int64_t count) {
  using A = typename V::value_type;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    return _mm512_maskz_mov_ps(__mmask16((1u << count) - 1), v);
  } else {
    return _mm512_maskz_mov_pd(__mmask8((1u << count) - 1), v);
  }
#else
  return V::set(V(A(0)), v, count);
#endif
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// lane_sum's tree on 8 float lanes, in registers: lanes i + 4, then i + 2, then i + 1.
inline float lane_sum8(__m256 v) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  t = _mm_add_ss(t, _mm_movehdup_ps(t));
  return _mm_cvtss_f32(t);
}
#endif

// Sum of a vector's lanes as a pairwise tree (lanes i + size/2, then i + size/4, ...): a
// fixed order (reproducible results) with a short dependency chain.
template <typename V>
inline typename V::value_type lane_sum(const V& v) {
  using A = typename V::value_type;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __m512 w = v;
    return lane_sum8(_mm256_add_ps(_mm512_castps512_ps256(w), _mm512_extractf32x8_ps(w, 1)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) return lane_sum8(v);
#endif
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
