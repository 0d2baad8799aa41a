"""Build of the native radix-tree core (csrc/) as radixrt.cache._radix_native.

Everything else about the package is in pyproject.toml. The extension is optional: where it
cannot be compiled (no C++ compiler, or no pybind11 in a --no-build-isolation install), the
install still succeeds and radixrt uses the pure-Python tree, logging one line that says so
(radixrt/cache/native.py).
"""

from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # only without build isolation (pyproject.toml requires pybind11)
    print("radixrt: pybind11 not installed; the native radix core is not built")
    setup()
else:
    native = Pybind11Extension(
        "radixrt.cache._radix_native",
        sources=["csrc/radix_tree.cpp", "csrc/radix_walk.cpp", "csrc/page_allocator.cpp",
                 "csrc/tier.cpp", "csrc/bindings.cpp", "csrc/bind_allocator.cpp",
                 "csrc/bind_tier.cpp"],
        include_dirs=["csrc"],
        depends=["csrc/radix_tree.h", "csrc/page_allocator.h", "csrc/py_arrays.h",
                 "csrc/py_tree.h"],
        cxx_std=17,
        extra_compile_args=["-O3"],
        optional=True,  # a failed compile is a warning: the Python tree is the fallback
    )
    setup(ext_modules=[native], cmdclass={"build_ext": build_ext})
