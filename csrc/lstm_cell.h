// Pointwise math of the LSTM cell, forward and backward, written once for
// every backend.
//
// Every function is a template over the value type T, which is the opmath
// type of the tensors (float for float/half/bfloat16, double for double) on
// CUDA and a SIMD vector of it (at::vec::Vectorized<float>) in the CPU
// kernels. The only operations T needs are + - * / and the two activation
// functions supplied by MathOps<T> (sigmoid, tanh); each backend specialises
// MathOps for its vector types, this header provides the scalar ones.
//
// Gate order is torch.nn.LSTM's: i, f, g, o.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>

namespace rnnfast {

template <typename T>
struct MathOps;

template <>
struct MathOps<float> {
  static C10_HOST_DEVICE inline float sigmoid(float x) {
    return 1.0f / (1.0f + ::expf(-x));
  }
  static C10_HOST_DEVICE inline float tanh(float x) { return ::tanhf(x); }
};

template <>
struct MathOps<double> {
  static C10_HOST_DEVICE inline double sigmoid(double x) {
    return 1.0 / (1.0 + ::exp(-x));
  }
  static C10_HOST_DEVICE inline double tanh(double x) { return ::tanh(x); }
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
  T r;           // o * tanh(c)
};

template <typename T>
C10_HOST_DEVICE inline LstmCellForward<T> lstm_cell_forward(
    T pre_i, T pre_f, T pre_g, T pre_o, T c_prev) {
  LstmCellForward<T> out;
  out.i = sigmoid(pre_i);
  out.f = sigmoid(pre_f);
  out.g = tanh(pre_g);
  out.o = sigmoid(pre_o);
  out.c = out.f * c_prev + out.i * out.g;
  out.r = out.o * tanh(out.c);
  return out;
}

// Backward of one cell element, written in terms of the saved activated
// gates and cell states.
//   dr:      gradient w.r.t. r = o * tanh(c) of this step
//   dc_next: gradient w.r.t. c flowing back from the next step (or from c_n)
// Produces the gradients w.r.t. the four gate pre-activations and w.r.t.
// c_prev.
template <typename T>
struct LstmCellBackward {
  T di, df, dg, do_;  // gradients w.r.t. the pre-activations
  T dc_prev;
};

template <typename T>
C10_HOST_DEVICE inline LstmCellBackward<T> lstm_cell_backward(
    T i, T f, T g, T o, T c, T c_prev, T dr, T dc_next) {
  LstmCellBackward<T> out;
  const T tanh_c = tanh(c);
  const T dc = dc_next + dr * o * (T(1) - tanh_c * tanh_c);
  out.do_ = dr * tanh_c * o * (T(1) - o);
  out.di = dc * g * i * (T(1) - i);
  out.df = dc * c_prev * f * (T(1) - f);
  out.dg = dc * i * (T(1) - g * g);
  out.dc_prev = dc * f;
  return out;
}

}  // namespace rnnfast
