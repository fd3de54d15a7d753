// Host-side helpers of the .cu launchers (not of the host-only check libraries).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace pyfastrl {

// Throws std::runtime_error naming `what` when the last launch failed (bad configuration, no device).
inline void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

}  // namespace pyfastrl
