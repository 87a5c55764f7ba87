// The CUDA backend's LSTM step kernels, elementwise kernels and cuBLAS calls,
// compiled by the host compiler for the CPU emulation (csrc/cuda/
// simt_emulation.h): the same source files the wheel builds with nvcc.
#include "../../csrc/cuda/gemm_and_copy.cpp"
#include "../../csrc/cuda/elementwise.cu"
#include "../../csrc/cuda/lstm_forward_step.cu"
#include "../../csrc/cuda/lstm_backward_step.cu"
