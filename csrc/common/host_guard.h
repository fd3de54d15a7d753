// The C ABI of the host-only check libraries (csrc/*/host_check.cpp, loaded by the tests through
// ctypes): a call returns nullptr, or the message of the exception it threw.
#pragma once

#include <exception>
#include <string>

namespace pyfastrl {

template <typename F>
const char* guarded(F&& f) {
  thread_local std::string last_error;
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    last_error = e.what();
    return last_error.c_str();
  }
}

}  // namespace pyfastrl
