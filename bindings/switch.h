// A module function `name(enable=None) -> bool` over a native on/off switch: reports the
// state, and sets it first when `enable` is given (the kernel and thread-pool switches).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

namespace pmsolve_bindings {

inline void def_switch(pybind11::module_& m, const char* name, bool (*enabled)(), void (*set)(bool),
                       const char* doc) {
  m.def(
      name,
      [enabled, set](std::optional<bool> enable) {
        if (enable) set(*enable);
        return enabled();
      },
      pybind11::arg("enable") = pybind11::none(), doc);
}

}  // namespace pmsolve_bindings
