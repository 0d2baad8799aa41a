// Python bindings of the native radix tree (module radixrt.cache._radix_native); the Tree
// class itself is in py_tree.h, the host tier's methods in bind_tier.cpp. Tree errors raise
// AssertionError, as the Python tree's asserts do.
#include "py_tree.h"

using radixrt::I32View;
using radixrt::PyTree;
using radixrt::to_array;

PYBIND11_MODULE(_radix_native, m) {
  m.doc() = "Native radix-tree core of radixrt's prefix cache (csrc/radix_tree.cpp)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::logic_error& e) {
      PyErr_SetString(PyExc_AssertionError, e.what());
    }
  });
  m.def("as_int32", [](py::handle obj) {
    I32View v(obj, "tokens");
    if (v.arr && v.arr.ptr() == obj.ptr()) return py::reinterpret_borrow<py::array_t<int32_t>>(obj);
    return to_array(v.data, (size_t)v.n);
  }, py::arg("obj"), "A 1-D int32 array of an array, list or tuple of ints (no copy if it is one)");
  radixrt::bind_allocator(m);
  py::class_<PyTree> tree(m, "Tree");
  tree
      .def(py::init<int>(), py::arg("page_size"))
      .def_property_readonly("page_size", &PyTree::page_size)
      .def("match", &PyTree::match, py::arg("tokens"), py::arg("namespace"),
           py::arg("record_stats") = true, py::arg("keep_last") = true)
      .def("match_length", &PyTree::match_length, py::arg("tokens"), py::arg("namespace"),
           py::arg("keep_last") = true)
      .def("insert", &PyTree::insert, py::arg("tokens"), py::arg("pages"), py::arg("namespace"),
           py::arg("want_pages") = true)
      .def("lock", &PyTree::lock)
      .def("unlock", &PyTree::unlock)
      .def("evict", &PyTree::evict)
      .def("parent", &PyTree::parent)
      .def("children", &PyTree::children)
      .def("num_children", &PyTree::num_children)
      .def("child_keys", &PyTree::child_keys)
      .def("child", &PyTree::child)
      .def("pages", &PyTree::pages)
      .def("key", &PyTree::key)
      .def("lock_ref", &PyTree::lock_ref)
      .def("last_access", &PyTree::last_access)
      .def("describe", &PyTree::describe)
      .def("root", &PyTree::root)
      .def("counters", &PyTree::counters)
      .def_property_readonly("cached_tokens", &PyTree::cached_tokens)
      .def_property_readonly("locked_pages", &PyTree::locked_pages)
      .def_property_readonly("evictable_pages", &PyTree::evictable_pages)
      .def_property_readonly("num_nodes", &PyTree::num_nodes)
      .def("snapshot", &PyTree::snapshot)
      .def("all_pages", &PyTree::all_pages)
      .def("check", &PyTree::check)
      .def("lpm_order", &PyTree::lpm_order);
  radixrt::bind_tier(tree);
}
