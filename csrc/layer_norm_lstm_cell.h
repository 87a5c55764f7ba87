// Per-element math of the LayerNorm-LSTM cell, written once for every
// backend (the CPU kernels run it on SIMD vectors, CUDA on float / double),
// beside the LayerNorm gradient of layer_norm.h and the LSTM cell of
// lstm_cell.h. Row statistics (sums over a row) stay per backend.
#pragma once

#include <c10/macros/Macros.h>

#include "layer_norm.h"
#include "lstm_cell.h"

namespace rnnfast {

// a * b + c, one fused multiply-add: MathOps<T>::fmadd (at::vec::fmadd for
// SIMD vectors; the plain expression for scalars, which nvcc contracts).
// Arguments by reference: a SIMD vector by value changes the ABI (-Wpsabi).
template <typename T>
C10_HOST_DEVICE inline T fmadd(const T& a, const T& b, const T& c) {
  return MathOps<T>::fmadd(a, b, c);
}

// xhat = (x - mean) * rstd
template <typename T>
C10_HOST_DEVICE inline T layer_norm_normalize(const T& x, const T& mean,
                                              const T& rstd) {
  return (x - mean) * rstd;
}

// The affine step of a LayerNorm: xhat * gamma + beta.
template <typename T>
C10_HOST_DEVICE inline T layer_norm_affine(const T& xhat, const T& gamma,
                                           const T& beta) {
  return fmadd(xhat, gamma, beta);
}

// A gate's pre-activation from the two normalised products,
//   LN_ih(W_ih x) + LN_hh(W_hh h) + biases
//   = xhat_ih * gamma_ih + (xhat_hh * gamma_hh + bias),
// where bias is the sum of the four gate biases (they enter alike). The
// forward computes the gates with it and the backward recomputes them with
// it from the saved xhat, so both see the same bits.
template <typename T>
C10_HOST_DEVICE inline T layer_norm_gate(const T& xhat_ih, const T& gamma_ih,
                                         const T& xhat_hh, const T& gamma_hh,
                                         const T& bias) {
  return fmadd(xhat_ih, gamma_ih, fmadd(xhat_hh, gamma_hh, bias));
}

}  // namespace rnnfast
