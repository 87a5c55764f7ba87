// Pointwise math of the LSTM cell, forward and backward, written once for
// every backend.
//
// Every function is a template over the value type T, which is the opmath
// type of the tensors (float for float/half/bfloat16, double for double) on
// CUDA and a SIMD vector of it (at::vec::Vectorized<float>) in the CPU
// kernels. The only operations T needs are + - * / and what MathOps<T>
// supplies (the activations sigmoid and tanh, and fmadd); each backend
// specialises MathOps for its vector types, this header provides the scalar
// ones.
//
// Gate order is torch.nn.LSTM's: i, f, g, o.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace rnnfast {

template <typename T>
struct MathOps;

// Scalar float, used by the CUDA kernels. The device code is built without
// --use_fast_math (setup.py): subnormals are kept, so tanhf(1e-40) is 1e-40
// and not 0. On the device the sigmoid still uses the fast exponential
// __expf, where flushing cannot matter: a subnormal argument or result of
// exp only ever meets 1 + e, which rounds to 1 either way, and its error
// (2 + 1.2|x| ulps relative) reaches the sigmoid scaled by
// s(1 - s) <= 1/4, well inside 2 ulps of 1 for every x. __frcp_rn is the
// correctly rounded reciprocal, subnormal results included (sigmoid(-88)).
// tanhf is CUDA's accurate one (2 ulps): its fast form __tanhf is only
// good to 2^-11 relative. Cost against --use_fast_math: tanhf becomes a
// short polynomial instead of one MUFU instruction, a few dozen
// instructions per cell element in kernels bound by memory traffic.
template <>
struct MathOps<float> {
  static C10_HOST_DEVICE inline float sigmoid(float x) {
#ifdef __CUDA_ARCH__
    return __frcp_rn(1.0f + __expf(-x));
#else
    return 1.0f / (1.0f + ::expf(-x));
#endif
  }
  static C10_HOST_DEVICE inline float tanh(float x) { return ::tanhf(x); }
  static C10_HOST_DEVICE inline float fmadd(float a, float b, float c) {
    return a * b + c;
  }
};

template <>
struct MathOps<double> {
  static C10_HOST_DEVICE inline double sigmoid(double x) {
    return 1.0 / (1.0 + ::exp(-x));
  }
  static C10_HOST_DEVICE inline double tanh(double x) { return ::tanh(x); }
  static C10_HOST_DEVICE inline double fmadd(double a, double b, double c) {
    return a * b + c;
  }
};

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  return MathOps<T>::sigmoid(x);
}

template <typename T>
C10_HOST_DEVICE inline T tanh(T x) {
  return MathOps<T>::tanh(x);
}

// Forward of one cell element. Inputs are the gate pre-activations and the
// previous cell state; outputs are the activated gates, the new cell state
// and r = o * tanh(c), which is the hidden state (or, with a projection, the
// value the projection multiplies).
template <typename T>
struct LstmCellForward {
  T i, f, g, o;  // activated gates
  T c;           // new cell state
  T r;           // o * tanh(c) (set by lstm_cell_forward only)
};

// Activations and the state update, without the output: the LayerNorm-LSTM
// normalises c before its tanh.
template <typename T>
C10_HOST_DEVICE inline LstmCellForward<T> lstm_cell_state(T pre_i, T pre_f,
                                                          T pre_g, T pre_o,
                                                          T c_prev) {
  LstmCellForward<T> out;
  out.i = sigmoid(pre_i);
  out.f = sigmoid(pre_f);
  out.g = tanh(pre_g);
  out.o = sigmoid(pre_o);
  out.c = out.f * c_prev + out.i * out.g;
  return out;
}

template <typename T>
C10_HOST_DEVICE inline LstmCellForward<T> lstm_cell_forward(
    T pre_i, T pre_f, T pre_g, T pre_o, T c_prev) {
  LstmCellForward<T> out = lstm_cell_state(pre_i, pre_f, pre_g, pre_o, c_prev);
  out.r = out.o * tanh(out.c);
  return out;
}

// The backward is split in two so that the LayerNorm-LSTM, whose hidden
// state is o * tanh(LN(c)), reuses both halves.
//
// Output half: h = o * tanh(y), with y = c (LSTM) or LN_cell(c).
//   dh:     gradient w.r.t. h (w.r.t. r = o * tanh(c) with a projection)
//   tanh_y: tanh(y) of the forward
// gives the gradient w.r.t. o's pre-activation and w.r.t. y.
template <typename T>
struct LstmOutputBackward {
  T do_;  // w.r.t. the pre-activation of o
  T dy;   // w.r.t. y, the argument of tanh
};

template <typename T>
C10_HOST_DEVICE inline LstmOutputBackward<T> lstm_output_backward(T dh, T o,
                                                                  T tanh_y) {
  LstmOutputBackward<T> out;
  out.do_ = dh * tanh_y * o * (T(1) - o);
  out.dy = dh * o * (T(1) - tanh_y * tanh_y);
  return out;
}

// State half: c = f * c_prev + i * g.
//   dc: the whole gradient w.r.t. c (from the output and from the next step)
// gives the gradients w.r.t. the pre-activations of i, f, g and w.r.t. c_prev.
template <typename T>
struct LstmStateBackward {
  T di, df, dg;  // w.r.t. the pre-activations
  T dc_prev;
};

template <typename T>
C10_HOST_DEVICE inline LstmStateBackward<T> lstm_state_backward(T dc, T i, T f,
                                                                T g, T c_prev) {
  LstmStateBackward<T> out;
  out.di = dc * g * i * (T(1) - i);
  out.df = dc * c_prev * f * (T(1) - f);
  out.dg = dc * i * (T(1) - g * g);
  out.dc_prev = dc * f;
  return out;
}

// The whole LSTM cell backward, from the saved activated gates and states.
//   dr:      gradient w.r.t. r = o * tanh(c) of this step
//   dc_next: gradient w.r.t. c flowing back from the next step (or from c_n)
template <typename T>
struct LstmCellBackward {
  T di, df, dg, do_;  // gradients w.r.t. the pre-activations
  T dc_prev;
};

template <typename T>
C10_HOST_DEVICE inline LstmCellBackward<T> lstm_cell_backward(
    T i, T f, T g, T o, T c, T c_prev, T dr, T dc_next) {
  const auto out_grad = lstm_output_backward(dr, o, tanh(c));
  const auto state = lstm_state_backward(dc_next + out_grad.dy, i, f, g, c_prev);
  LstmCellBackward<T> out;
  out.di = state.di;
  out.df = state.df;
  out.dg = state.dg;
  out.do_ = out_grad.do_;
  out.dc_prev = state.dc_prev;
  return out;
}

// ---- Zoneout (Krueger et al. 2016) ---------------------------------------
// A zoned-out state keeps its previous value with coefficient a:
//   x_t = a * x_{t-1} + (1 - a) * x~_t
// where x~_t is the cell's candidate (c~_t = f c_{t-1} + i g, or
// h~_t = o tanh(c~_t)). In training a is the unit's Bernoulli mask (0 or 1:
// the candidate or the previous value exactly), in evaluation the rate
// itself (the expectation). One formula serves both, forward and backward.
template <typename T>
C10_HOST_DEVICE inline T zoneout(const T& a, const T& prev, const T& cand) {
  return a * prev + (T(1) - a) * cand;
}

// The coefficient a of element e of a step: its mask byte as 0 / 1, or
// the rate without a mask (training / evaluation).
template <typename T, typename R>
C10_HOST_DEVICE inline T zoneout_coefficient_at(const bool* mask, int64_t e,
                                                R rate) {
  return mask != nullptr ? (mask[e] ? T(1) : T(0)) : static_cast<T>(rate);
}

// The backward of zoneout: from d = dL/dx_t, the gradient w.r.t. the
// candidate x~_t and the share of dL/dx_{t-1} that flows straight back.
template <typename T>
struct ZoneoutBackward {
  T dcand;  // (1 - a) d
  T dprev;  // a d
};

template <typename T>
C10_HOST_DEVICE inline ZoneoutBackward<T> zoneout_backward(const T& a,
                                                           const T& d) {
  ZoneoutBackward<T> out;
  out.dcand = (T(1) - a) * d;
  out.dprev = a * d;
  return out;
}

// The LSTM cell backward with zoneout on c: c_t = a c_{t-1} + (1 - a) c~_t,
// the output computed from c~_t.
//   c_cand:  c~_t of the forward
//   dc_next: gradient w.r.t. the carried c_t
template <typename T>
C10_HOST_DEVICE inline LstmCellBackward<T> lstm_cell_backward_zoneout(
    T i, T f, T g, T o, T c_cand, T c_prev, T dr, T dc_next, T a) {
  const auto z = zoneout_backward(a, dc_next);
  LstmCellBackward<T> out =
      lstm_cell_backward(i, f, g, o, c_cand, c_prev, dr, z.dcand);
  out.dc_prev = out.dc_prev + z.dprev;
  return out;
}

}  // namespace rnnfast
