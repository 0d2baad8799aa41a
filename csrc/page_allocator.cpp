// See page_allocator.h; error messages match allocator.py's.
#include "page_allocator.h"

#include <algorithm>
#include <stdexcept>

namespace radixrt {

PageAllocator::PageAllocator(int64_t num_pages)
    : n_(num_pages), top_(num_pages), ref_(num_pages + 1, 0), stack_(num_pages),
      seen_(num_pages + 1, 0) {
  if (num_pages < 1)
    throw std::logic_error("need at least one page, got num_pages=" + std::to_string(num_pages));
  for (int64_t i = 0; i < num_pages; ++i) stack_[i] = (int32_t)(num_pages - i);
}

void PageAllocator::check_range(const int32_t* pages, int64_t n) const {
  for (int64_t i = 0; i < n; ++i) {
    if (pages[i] < 1 || pages[i] > n_)
      throw std::logic_error("page " + std::to_string(pages[i]) + " out of range 1.." +
                             std::to_string(n_) + " (page 0 is the scratch page)");
  }
}

int32_t PageAllocator::refcount(int64_t page) const {
  int32_t p = (int32_t)page;
  check_range(&p, 1);
  return ref_[p];
}

bool PageAllocator::alloc(int64_t n, int32_t* out) {
  if (n < 0) throw std::logic_error("alloc of a negative page count " + std::to_string(n));
  if (n > top_) return false;
  for (int64_t i = 0; i < n; ++i) {
    int32_t p = stack_[top_ - 1 - i];
    out[i] = p;
    ref_[p] = 1;
  }
  top_ -= n;
  return true;
}

void PageAllocator::incref(const int32_t* pages, int64_t n) {
  bool bad = false;  // one pass in the common case; the exact error comes from the slow path
  const int32_t* ref = ref_.data();
  const int64_t limit = n_;
  for (int64_t i = 0; i < n; ++i) {
    int32_t p = pages[i];
    if (p < 1 || p > limit) {
      bad = true;
      break;
    }
    bad |= ref[p] == 0;
  }
  if (bad) {
    check_range(pages, n);
    for (int64_t i = 0; i < n; ++i) {
      if (ref_[pages[i]] == 0)
        throw std::logic_error("incref of free page " + std::to_string(pages[i]) +
                               ": a free page has no owner to share");
    }
  }
  for (int64_t i = 0; i < n; ++i) ++ref_[pages[i]];
}

int64_t PageAllocator::decref(const int32_t* pages, int64_t n) {
  // One pass checks every page and stamps it (a page stamped twice is listed twice).
  if (++stamp_ == 0) {  // wrapped: old stamps could collide
    std::fill(seen_.begin(), seen_.end(), 0);
    stamp_ = 1;
  }
  bool bad = false, dup = false;
  const int32_t* ref = ref_.data();
  uint32_t* seen = seen_.data();
  const uint32_t stamp = stamp_;
  const int64_t limit = n_;
  for (int64_t i = 0; i < n; ++i) {
    int32_t p = pages[i];
    if (p < 1 || p > limit) {
      bad = true;
      break;
    }
    bad |= ref[p] == 0;
    dup |= seen[p] == stamp;
    seen[p] = stamp;
  }
  if (bad) {
    check_range(pages, n);
    for (int64_t i = 0; i < n; ++i) {
      if (ref_[pages[i]] == 0)
        throw std::logic_error("decref of free page " + std::to_string(pages[i]) +
                               " (double free?)");
    }
  }
  int64_t freed = 0;
  if (!dup) {
    for (int64_t i = 0; i < n; ++i) {
      if (--ref_[pages[i]] == 0) {
        stack_[top_++] = pages[i];
        ++freed;
      }
    }
    return freed;
  }
  for (int64_t i = 0; i < n; ++i) --ref_[pages[i]];
  for (int64_t i = 0; i < n; ++i) {
    if (ref_[pages[i]] < 0) {  // listed more often than held: undo, then report it
      int32_t bad = pages[i];
      for (int64_t j = 0; j < n; ++j) ++ref_[pages[j]];
      throw std::logic_error("decref of page " + std::to_string(bad) +
                             " below zero (listed more than held)");
    }
  }
  std::vector<int32_t> zero;
  for (int64_t i = 0; i < n; ++i)
    if (ref_[pages[i]] == 0) zero.push_back(pages[i]);
  std::sort(zero.begin(), zero.end());
  zero.erase(std::unique(zero.begin(), zero.end()), zero.end());
  for (int32_t p : zero) stack_[top_++] = p;
  return (int64_t)zero.size();
}

}  // namespace radixrt
