// See page_allocator.h; error messages match allocator.py's.
#include "page_allocator.h"

#include <algorithm>
#include <stdexcept>
#include <unordered_map>

namespace radixrt {

PageAllocator::PageAllocator(int64_t num_pages)
    : n_(num_pages), top_(num_pages), ref_(num_pages + 1, 0), stack_(num_pages + 1),
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

namespace {

// Page lists mostly come in runs of consecutive ids: a node's pages were allocated together,
// and an allocation pops what one freed list pushed (reversed). A run's refcounts are one
// contiguous slice, updated without a gather (several times faster per page); pages outside
// long runs take the plain per-page loop. In list order, split(pages, n, run, each) calls
//   run(first, len, step)  for each run of >= kRun pages first, first+step, ... (step +-1)
//   each(from, to)         for the pages[from..to) between runs
constexpr int64_t kRun = 16;
constexpr int32_t kBlock = 64;

inline int64_t run_end(const int32_t* pages, int64_t i, int64_t n, int32_t step) {
  int64_t j = i + 1;
  while (j < n && j - i < kRun && pages[j] == pages[j - 1] + step) ++j;
  // A run this long is likely longer: test whole blocks (vectorized) while they continue it.
  while (j - i >= kRun && j + kBlock <= n) {
    const int32_t base = pages[j - 1] + step;
    int32_t off = 0;
    for (int32_t k = 0; k < kBlock; ++k) off |= pages[j + k] ^ (base + k * step);
    if (off) break;
    j += kBlock;
  }
  while (j < n && pages[j] == pages[j - 1] + step) ++j;
  return j;
}

template <class Run, class Each>
inline void split(const int32_t* pages, int64_t n, Run&& run, Each&& each) {
  int64_t i = 0, loose = 0;  // pages[loose..i) are not in a run yet
  while (i < n) {
    // Skip blocks with no neighbours one apart (vectorized): no run can start inside them.
    while (i + kBlock < n) {
      int32_t near = 0;
      for (int32_t k = 0; k < kBlock; ++k)
        near |= (uint32_t)(pages[i + k + 1] - pages[i + k] + 1) <= 2u;
      if (near) break;
      i += kBlock;
    }
    const int32_t d = i + 1 < n ? pages[i + 1] - pages[i] : 0;
    if (d != 1 && d != -1) {  // the common test for a loose page: one compare
      ++i;
      continue;
    }
    const int64_t j = run_end(pages, i, n, d);
    if (j - i < kRun) {
      i = j;  // too short to pay off: loose pages
      continue;
    }
    if (loose < i) each(loose, i);
    run(pages[i], j - i, d);
    i = loose = j;
  }
  if (loose < n) each(loose, n);
}

inline int32_t* slice(int32_t* ref, int32_t first, int64_t len, int32_t step) {
  return ref + (step > 0 ? first : first - len + 1);
}

}  // namespace

bool PageAllocator::alloc(int64_t n, int32_t* out) {
  if (n < 0) throw std::logic_error("alloc of a negative page count " + std::to_string(n));
  if (n > top_) return false;
  const int32_t* src = stack_.data() + top_ - 1;
  for (int64_t i = 0; i < n; ++i) out[i] = src[-i];
  int32_t* ref = ref_.data();
  split(out, n,
        [ref](int32_t first, int64_t len, int32_t step) {
          std::fill_n(slice(ref, first, len, step), len, 1);
        },
        [ref, out](int64_t from, int64_t to) {
          for (int64_t i = from; i < to; ++i) ref[out[i]] = 1;
        });
  top_ -= n;
  return true;
}

bool PageAllocator::in_range(const int32_t* pages, int64_t n) const {
  // min/max vectorizes; the per-page passes below then index ref_ unchecked.
  int32_t lo = 1, hi = 1;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, pages[i]);
    hi = std::max(hi, pages[i]);
  }
  return lo >= 1 && hi <= n_;
}

void PageAllocator::incref(const int32_t* pages, int64_t n) {
  if (!in_range(pages, n)) check_range(pages, n);  // throws, naming the page
  // One pass: count up and note a free page; on one, undo and report the first (in list
  // order, as allocator.py does: a page listed twice cannot become free in between).
  int32_t* ref = ref_.data();
  int32_t free_page = 0;
  split(pages, n,
        [ref, &free_page](int32_t first, int64_t len, int32_t step) {
          int32_t* r = slice(ref, first, len, step);
          int32_t zero = 0;
          for (int64_t k = 0; k < len; ++k) {
            zero |= r[k] == 0;
            r[k] += 1;
          }
          free_page |= zero;
        },
        [ref, pages, &free_page](int64_t from, int64_t to) {
          for (int64_t i = from; i < to; ++i) {
            int32_t r = ref[pages[i]];
            free_page |= r == 0;
            ref[pages[i]] = r + 1;
          }
        });
  if (!free_page) return;
  for (int64_t i = 0; i < n; ++i) --ref[pages[i]];
  for (int64_t i = 0; i < n; ++i) {
    if (ref[pages[i]] == 0)
      throw std::logic_error("incref of free page " + std::to_string(pages[i]) +
                             ": a free page has no owner to share");
  }
}

int64_t PageAllocator::decref(const int32_t* pages, int64_t n) {
  if (!in_range(pages, n)) check_range(pages, n);
  // Count down, pushing each page that reaches 0 in list order. A run holds no page twice, so
  // a count at 0 after its run's pass means that run freed it. Loose pages push branch-free:
  // the slot past the last push is overwritten by the next (stack_ has one spare entry).
  int32_t* ref = ref_.data();
  int32_t* push = stack_.data() + top_;
  int64_t freed = 0;
  int32_t negative = 0;
  split(pages, n,
        [&](int32_t first, int64_t len, int32_t step) {
          int32_t* r = slice(ref, first, len, step);
          int32_t neg = 0, zeros = 0;
          for (int64_t k = 0; k < len; ++k) {
            int32_t v = r[k] - 1;
            r[k] = v;
            neg |= v < 0;
            zeros += v == 0;
          }
          negative |= neg;
          if (zeros == 0 || neg) return;
          for (int64_t k = 0; k < len; ++k) {
            int32_t page = first + (int32_t)k * step;
            if (ref[page] == 0) push[freed++] = page;
          }
        },
        [&](int64_t from, int64_t to) {
          int32_t neg = 0;
          for (int64_t i = from; i < to; ++i) {
            int32_t p = pages[i];
            int32_t v = ref[p] - 1;
            ref[p] = v;
            neg |= v < 0;
            push[freed] = p;
            freed += v == 0;
          }
          negative |= neg;
        });
  if (negative) {  // a free page, or one listed more often than held: undo, then report it
    for (int64_t i = 0; i < n; ++i) ++ref[pages[i]];
    decref_error(pages, n);
  }
  // allocator.py pushes freed pages in list order, but sorted when the list had duplicates;
  // that order matters (alloc pops it) only with two or more freed pages, and a list whose
  // every page was freed has none.
  if (freed >= 2 && freed < n && has_duplicates(pages, n)) std::sort(push, push + freed);
  top_ += freed;
  return freed;
}

bool PageAllocator::has_duplicates(const int32_t* pages, int64_t n) {
  if (++stamp_ == 0) {  // wrapped: old stamps could collide
    std::fill(seen_.begin(), seen_.end(), 0);
    stamp_ = 1;
  }
  uint32_t* seen = seen_.data();
  const uint32_t stamp = stamp_;
  bool dup = false;
  for (int64_t i = 0; i < n; ++i) {
    dup |= seen[pages[i]] == stamp;
    seen[pages[i]] = stamp;
  }
  return dup;
}

void PageAllocator::decref_error(const int32_t* pages, int64_t n) const {
  // allocator.py's order of checks: a page free before the call first, else the first page
  // listed more often than it is held.
  for (int64_t i = 0; i < n; ++i) {
    if (ref_[pages[i]] == 0)
      throw std::logic_error("decref of free page " + std::to_string(pages[i]) +
                             " (double free?)");
  }
  std::unordered_map<int32_t, int32_t> left;  // each page's count after the whole list
  for (int64_t i = 0; i < n; ++i) --left.emplace(pages[i], ref_[pages[i]]).first->second;
  for (int64_t i = 0; i < n; ++i) {
    if (left[pages[i]] < 0)
      throw std::logic_error("decref of page " + std::to_string(pages[i]) +
                             " below zero (listed more than held)");
  }
  throw std::logic_error("decref: inconsistent refcounts");  // unreachable
}

}  // namespace radixrt
