// Shared by the bindings: int32 views of arrays / lists of ints, and int32 arrays out.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace radixrt {

// A small exact int without PyLong_AsLong's generic path (~8x faster on token lists).
inline bool compact_long(PyObject* o, long* v) {
  if (!PyLong_CheckExact(o)) return false;
#if PY_VERSION_HEX >= 0x030C0000
  if (!PyUnstable_Long_IsCompact((PyLongObject*)o)) return false;
  *v = (long)PyUnstable_Long_CompactValue((PyLongObject*)o);
  return true;
#else
  Py_ssize_t size = Py_SIZE(o);
  if (size < -1 || size > 1) return false;
  *v = size == 0 ? 0 : (long)((PyLongObject*)o)->ob_digit[0] * (long)size;
  return true;
#endif
}

using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// A read-only int32 view of a 1-D array, list or tuple of ints.
struct I32View {
  const int32_t* data = nullptr;
  int64_t n = 0;
  std::vector<int32_t> own;
  I32Array arr;

  explicit I32View(py::handle h, const char* what) {
    PyObject* o = h.ptr();
    if (PyList_Check(o) || PyTuple_Check(o)) {
      Py_ssize_t len = PySequence_Fast_GET_SIZE(o);
      PyObject** items = PySequence_Fast_ITEMS(o);
      own.resize(len);
      for (Py_ssize_t i = 0; i < len; ++i) {
        long v;
        if (!compact_long(items[i], &v)) {
          v = PyLong_AsLong(items[i]);
          if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
        }
        if (v < INT32_MIN || v > INT32_MAX)
          throw std::logic_error(std::string(what) + " value " + std::to_string(v) +
                                 " does not fit int32");
        own[i] = (int32_t)v;
      }
      data = own.data();
      n = len;
      return;
    }
    arr = I32Array::ensure(h);
    if (!arr) throw py::type_error(std::string(what) + " must be an int array or a list of ints");
    if (arr.ndim() != 1)
      throw std::logic_error(std::string(what) + " must be 1-D, got " +
                             std::to_string(arr.ndim()) + " dimensions");
    data = arr.data();
    n = arr.shape(0);
  }
};

inline py::array_t<int32_t> to_array(const int32_t* p, size_t n) {
  py::array_t<int32_t> out((py::ssize_t)n);
  if (n) std::memcpy(out.mutable_data(), p, n * sizeof(int32_t));
  return out;
}

class PageAllocator;

void bind_allocator(py::module_& m);
// The allocator inside a _radix_native.Allocator object (a cast error for anything else).
PageAllocator* native_allocator(py::handle allocator);

}  // namespace radixrt
