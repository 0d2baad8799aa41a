// The Python-facing radix tree (module radixrt.cache._radix_native, class Tree): shared by
// bindings.cpp (the GPU tree) and bind_tier.cpp (the host tier's methods).
//
// Tokens and pages cross as int32 numpy arrays (a Python list of ints is read in one C loop,
// never through numpy's generic converter); results come back as fresh int32 arrays. Handles are
// (slot, id) pairs: the Python wrapper (radixrt/cache/native.py) turns them into node objects.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "py_arrays.h"
#include "radix_tree.h"

namespace radixrt {


// Pages of a path, concatenated into one array.
// (count: the first count nodes of the path; -1 for all of it)
inline py::array_t<int32_t> path_pages(const RadixTree& t, const std::vector<int32_t>& path,
                                       int64_t count = -1) {
  size_t total = 0, n = count < 0 ? path.size() : (size_t)count;
  for (size_t i = 0; i < n; ++i) total += t.node(path[i]).pages.size();
  py::array_t<int32_t> out((py::ssize_t)total);
  int32_t* dst = out.mutable_data();
  for (size_t i = 0; i < n; ++i) {
    int32_t s = path[i];
    const auto& pg = t.node(s).pages;
    if (!pg.empty()) std::memcpy(dst, pg.data(), pg.size() * sizeof(int32_t));
    dst += pg.size();
  }
  return out;
}

class PyTree {
 public:
  explicit PyTree(int page_size) : t_(page_size) {}

  // Namespace index: None -> 0; an unknown name -> -1 unless create.
  int32_t ns(py::handle name, bool create) {
    if (name.is_none()) return 0;
    std::string s = py::cast<std::string>(name);
    if (create) return t_.intern(s);
    auto it = known_.find(s);
    if (it != known_.end()) return it->second;
    return -1;
  }

  py::tuple match(py::handle tokens, py::handle name, bool record_stats, bool keep_last) {
    I32View toks(tokens, "tokens");
    int32_t handle;
    int64_t len = t_.match(toks.data, toks.n, ns(name, false), record_stats, keep_last, path_,
                           handle);
    return py::make_tuple(path_pages(t_, path_, (int64_t)t_.match_gpu_nodes()), len, handle,
                          t_.node(handle).id);
  }

  int64_t match_length(py::handle tokens, py::handle name, bool keep_last) {
    I32View toks(tokens, "tokens");
    int32_t handle;
    return t_.match(toks.data, toks.n, ns(name, false), false, keep_last, path_, handle);
  }

  // pages must be an int32 array (the wrapper converts): when the tree's pages for the span
  // equal the caller's, the caller's array is returned as the span's pages (no copy).
  py::tuple insert(py::handle tokens, py::handle pages, py::handle name, bool want_pages) {
    I32View toks(tokens, "tokens");
    I32View pg(pages, "pages");
    int32_t nsi = ns(name, toks.n > 0);
    if (nsi > 0) known_.emplace(t_.ns_name(nsi), nsi);
    int32_t handle;
    int64_t existing = t_.insert(toks.data, toks.n, pg.data, pg.n, nsi < 0 ? 0 : nsi, path_,
                                 handle);
    int64_t ps = t_.page_size();
    // Whether the tree's pages for the part it already had differ from the caller's (then the
    // caller swaps its duplicates for the tree's).
    bool differs = false;
    int64_t off = 0, have = existing / ps;
    for (int32_t s : path_) {
      const auto& p = t_.node(s).pages;
      int64_t k = std::min<int64_t>((int64_t)p.size(), have - off);
      if (k <= 0) break;
      if (std::memcmp(p.data(), pg.data + off, k * sizeof(Page)) != 0) {
        differs = true;
        break;
      }
      off += k;
    }
    py::object all = py::none();
    if (want_pages) {
      if (!differs && pg.arr && pg.arr.ptr() == pages.ptr())
        all = py::reinterpret_borrow<py::object>(pages);
      else
        all = path_pages(t_, path_);
    }
    return py::make_tuple(handle, t_.node(handle).id, existing, all, differs);
  }

  void check_handle(int32_t slot, int64_t id, const char* op) const {
    if (!t_.valid(slot, id))
      throw std::logic_error(std::string(op) + " of node " + std::to_string(id) +
                             ", which was evicted");
  }
  void lock(int32_t slot, int64_t id) {
    if (t_.dropped_root(id)) return;  // roots are never locked
    check_handle(slot, id, "lock");
    t_.lock(slot);
  }
  void unlock(int32_t slot, int64_t id) {
    if (t_.dropped_root(id)) return;
    check_handle(slot, id, "unlock");
    t_.unlock(slot);
  }

  py::array_t<int32_t> evict(int64_t num_pages) {
    out_.clear();
    t_.evict(num_pages, out_);
    return to_array(out_.data(), out_.size());
  }

  // Handle access (an evicted handle reads as detached and empty).
  py::object parent(int32_t slot, int64_t id) const {
    if (!t_.valid(slot, id) || t_.node(slot).parent < 0) return py::none();
    int32_t p = t_.node(slot).parent;
    return py::make_tuple(p, t_.node(p).id);
  }
  py::list children(int32_t slot, int64_t id) const {
    py::list out;
    if (!t_.valid(slot, id)) return out;
    int64_t bytes = t_.page_size() * (int64_t)sizeof(Tok);
    for (int32_t c : t_.children_of(slot)) {
      const auto& n = t_.node(c);
      out.append(py::make_tuple(py::bytes((const char*)n.key.data(), bytes), c, n.id));
    }
    return out;
  }
  py::set child_keys(int32_t slot, int64_t id) const {  // first pages of the children
    py::set out;
    if (!t_.valid(slot, id)) return out;
    int64_t bytes = t_.page_size() * (int64_t)sizeof(Tok);
    for (int32_t c : t_.children_of(slot))
      out.add(py::bytes((const char*)t_.node(c).key.data(), bytes));
    return out;
  }
  py::object child(int32_t slot, int64_t id, py::bytes first_page) const {
    std::string_view k = first_page;
    if (!t_.valid(slot, id) || (int64_t)k.size() != t_.page_size() * (int64_t)sizeof(Tok))
      return py::none();
    int32_t c = t_.find_child(slot, (const Tok*)k.data());
    if (c < 0) return py::none();
    return py::make_tuple(c, t_.node(c).id);
  }
  int64_t num_children(int32_t slot, int64_t id) const {
    return t_.valid(slot, id) ? (int64_t)t_.node(slot).children.size() : 0;
  }
  py::array_t<int32_t> pages(int32_t slot, int64_t id) const {
    if (!t_.valid(slot, id)) return to_array(nullptr, 0);
    const auto& p = t_.node(slot).pages;
    return to_array(p.data(), p.size());
  }
  py::array_t<int32_t> key(int32_t slot, int64_t id) const {
    if (!t_.valid(slot, id)) return to_array(nullptr, 0);
    const auto& k = t_.node(slot).key;
    return to_array(k.data(), k.size());
  }
  int64_t lock_ref(int32_t slot, int64_t id) const {
    return t_.valid(slot, id) ? t_.node(slot).lock_ref : 0;
  }
  int64_t last_access(int32_t slot, int64_t id) const {
    return t_.valid(slot, id) ? t_.node(slot).last_access : 0;
  }
  // (is_root, namespace) of a handle; an evicted node reads as a non-root without one.
  py::tuple describe(int32_t slot, int64_t id) const {
    if (t_.valid(slot, id)) {
      const auto& n = t_.node(slot);
      return py::make_tuple(n.is_root, name_of(n.ns));
    }
    if (t_.dropped_root(id)) return py::make_tuple(true, name_of(t_.dropped_root_ns(id)));
    return py::make_tuple(false, py::none());
  }
  py::tuple root(py::handle name) {
    int32_t nsi = ns(name, false);
    int32_t r = nsi >= 0 ? t_.root_of(nsi) : -1;
    if (r < 0) r = t_.default_root();
    return py::make_tuple(r, t_.node(r).id);
  }

  py::dict counters() const {
    const auto& c = t_.counters();
    py::dict d;
    d["cached_tokens"] = c.cached_tokens;
    d["locked_pages"] = c.locked_pages;
    d["num_nodes"] = c.num_nodes;
    d["hit_tokens"] = c.hit_tokens;
    d["query_tokens"] = c.query_tokens;
    d["evicted_pages"] = c.evicted_pages;
    d["clock"] = t_.clock();
    d["host_tokens"] = c.host_tokens;
    d["host_only_tokens"] = c.host_only_tokens;
    d["host_hit_tokens"] = c.host_hit_tokens;
    d["loading_pages"] = c.loading_pages;
    d["loaded_tokens"] = c.loaded_tokens;
    d["load_used_tokens"] = c.load_used_tokens;
    d["load_wasted_pages"] = c.load_wasted_pages;
    return d;
  }
  int64_t cached_tokens() const { return t_.counters().cached_tokens; }
  int64_t locked_pages() const { return t_.counters().locked_pages; }
  int64_t evictable_pages() const { return t_.evictable_pages(); }
  int64_t num_nodes() const { return t_.counters().num_nodes; }

  // Every node (roots too) as (id, parent id or -1, is_root, namespace, key, pages, lock_ref,
  // last_access), sorted by id, and the LRU as ids in eviction order: the differential test
  // compares this with the Python tree's.
  py::tuple snapshot() const {
    std::vector<int32_t> all = t_.live_roots();
    for (int32_t s : t_.live_nodes()) all.push_back(s);
    std::sort(all.begin(), all.end(),
              [&](int32_t a, int32_t b) { return t_.node(a).id < t_.node(b).id; });
    py::list nodes;
    for (int32_t s : all) {
      const auto& n = t_.node(s);
      int64_t pid = n.parent >= 0 ? t_.node(n.parent).id : -1;
      nodes.append(py::make_tuple(n.id, pid, n.is_root, name_of(n.ns),
                                  py::cast(n.key), py::cast(n.pages), n.lock_ref,
                                  n.last_access));
    }
    py::list lru;
    for (const auto& e : t_.lru_keys()) lru.append(std::get<1>(e));
    return py::make_tuple(nodes, lru);
  }

  py::array_t<int32_t> all_pages() const {
    std::vector<int32_t> out;
    for (int32_t s : t_.live_nodes()) {
      const auto& p = t_.node(s).pages;
      out.insert(out.end(), p.begin(), p.end());
    }
    return to_array(out.data(), out.size());
  }

  std::string check() const { return t_.check(); }

  py::array_t<int64_t> lpm_order(py::array_t<int32_t, py::array::c_style | py::array::forcecast> slots,
                                 py::array_t<int64_t, py::array::c_style | py::array::forcecast> ids,
                                 py::array_t<int64_t, py::array::c_style | py::array::forcecast> counts) const {
    size_t n = (size_t)slots.size();
    if ((size_t)ids.size() != n || (size_t)counts.size() != n)
      throw std::logic_error("lpm_order needs one slot, id and count per group");
    std::vector<int32_t> s(slots.data(), slots.data() + n);
    std::vector<int64_t> i(ids.data(), ids.data() + n), c(counts.data(), counts.data() + n);
    std::vector<int64_t> order = t_.lpm_order(s, i, c);
    py::array_t<int64_t> out((py::ssize_t)order.size());
    if (!order.empty()) std::memcpy(out.mutable_data(), order.data(), order.size() * 8);
    return out;
  }

  int page_size() const { return t_.page_size(); }

  // For the host tier's bindings (bind_tier.cpp).
  RadixTree& tree() { return t_; }
  std::vector<int32_t>& path_scratch() { return path_; }
  std::vector<Page>& scratch() { return out_; }
  py::object host_allocator;  // keeps the host tier's allocator alive as long as the tree
  py::object name_of(int32_t ns) const {
    return ns == 0 ? py::object(py::none()) : py::object(py::str(t_.ns_name(ns)));
  }

 private:
  RadixTree t_;
  std::unordered_map<std::string, int32_t> known_;  // names with an index (ns 0 excluded)
  std::vector<int32_t> path_;  // scratch, reused across calls
  std::vector<Page> out_;
};

void bind_tier(py::class_<PyTree>& cls);

}  // namespace radixrt
