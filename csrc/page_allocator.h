// Reference-counted KV page allocator: the native twin of radixrt/cache/allocator.py.
//
// Same behaviour, page for page: ids 1..num_pages (0 is the scratch page), a LIFO free stack
// (a fresh allocator hands out 1, 2, 3, ...), alloc(n) takes the top n, incref/decref check
// every page before changing any, a page listed twice counts twice, and pages freed by one
// decref go on the stack in list order (sorted, when the list had duplicates).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace radixrt {

class PageAllocator {
 public:
  explicit PageAllocator(int64_t num_pages);

  int64_t num_total() const { return n_; }
  int64_t num_free() const { return top_; }
  int32_t refcount(int64_t page) const;
  const std::vector<int32_t>& refs() const { return ref_; }
  // The free stack, bottom to top.
  std::vector<int32_t> free_stack() const { return {stack_.begin(), stack_.begin() + top_}; }

  bool alloc(int64_t n, int32_t* out);  // false (allocating nothing) if fewer are free
  void incref(const int32_t* pages, int64_t n);
  int64_t decref(const int32_t* pages, int64_t n);  // returns how many became free

 private:
  bool in_range(const int32_t* pages, int64_t n) const;
  void check_range(const int32_t* pages, int64_t n) const;  // throws for the first bad page
  bool has_duplicates(const int32_t* pages, int64_t n);
  [[noreturn]] void decref_error(const int32_t* pages, int64_t n) const;

  int64_t n_;
  int64_t top_;
  std::vector<int32_t> ref_;    // [n + 1]
  std::vector<int32_t> stack_;  // [n + 1]: one spare slot for decref's branch-free push
  std::vector<uint32_t> seen_;  // [n + 1] duplicate detection: the stamp of the last pass
  uint32_t stamp_ = 0;
};

}  // namespace radixrt
