// Python bindings of the native page allocator (page_allocator.h) as _radix_native.Allocator.
#include <algorithm>

#include "page_allocator.h"
#include "py_arrays.h"

namespace radixrt {

namespace {

class PyAllocator {
 public:
  explicit PyAllocator(int64_t num_pages) : a_(num_pages) {}
  int64_t num_total() const { return a_.num_total(); }
  int64_t num_free() const { return a_.num_free(); }
  int32_t refcount(int64_t page) const { return a_.refcount(page); }
  py::array_t<int32_t> refcounts() const { return to_array(a_.refs().data(), a_.refs().size()); }
  py::array_t<int32_t> free_stack() const {
    std::vector<int32_t> f = a_.free_stack();
    return to_array(f.data(), f.size());
  }
  py::object alloc(int64_t n) {  // a list, as PageAllocator.alloc returns
    scratch_.resize(std::max<int64_t>(n, 0));
    if (!a_.alloc(n, scratch_.data())) return py::none();
    py::list out(n);
    for (int64_t i = 0; i < n; ++i) PyList_SET_ITEM(out.ptr(), i, PyLong_FromLong(scratch_[i]));
    return out;
  }
  py::object alloc_array(int64_t n) {
    if (n < 0) throw std::logic_error("alloc of a negative page count " + std::to_string(n));
    if (n > a_.num_free()) return py::none();
    py::array_t<int32_t> out((py::ssize_t)n);
    a_.alloc(n, out.mutable_data());
    return out;
  }
  void incref(py::handle pages) {
    I32View v(pages, "pages");
    a_.incref(v.data, v.n);
  }
  int64_t decref(py::handle pages) {
    I32View v(pages, "pages");
    return a_.decref(v.data, v.n);
  }

 radixrt::PageAllocator& core() { return a_; }

 private:
  radixrt::PageAllocator a_;
  std::vector<int32_t> scratch_;
};

}  // namespace

PageAllocator* native_allocator(py::handle allocator) {
  return &py::cast<PyAllocator&>(allocator).core();
}

void bind_allocator(py::module_& m) {
  py::class_<PyAllocator>(m, "Allocator")
      .def(py::init<int64_t>(), py::arg("num_pages"))
      .def_property_readonly("num_total", &PyAllocator::num_total)
      .def_property_readonly("num_free", &PyAllocator::num_free)
      .def("refcount", &PyAllocator::refcount)
      .def("refcounts", &PyAllocator::refcounts)
      .def("free_stack", &PyAllocator::free_stack)
      .def("alloc", &PyAllocator::alloc)
      .def("alloc_array", &PyAllocator::alloc_array)
      .def("incref", &PyAllocator::incref)
      .def("decref", &PyAllocator::decref);
}

}  // namespace radixrt
