// See radix_tree.h. Comments here say why; the what mirrors radixrt/cache/radix.py.
#include "radix_tree.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <unordered_set>

namespace radixrt {

namespace {
[[noreturn]] void fail(const std::string& msg) { throw std::logic_error(msg); }
}  // namespace

RadixTree::RadixTree(int page_size) : ps_(page_size) {
  if (page_size < 1) fail("page_size must be >= 1, got " + std::to_string(page_size));
  ns_names_.push_back("");  // index 0: the default namespace (None)
  roots_.push_back(-1);
  roots_[0] = new_root(0);
}

int32_t RadixTree::intern(const std::string& name) {
  auto it = ns_index_.find(name);
  if (it != ns_index_.end()) return it->second;
  int32_t idx = (int32_t)ns_names_.size();
  ns_names_.push_back(name);
  roots_.push_back(-1);
  ns_index_.emplace(name, idx);
  return idx;
}

uint64_t RadixTree::page_hash(const Tok* t) const {
  // Exact for pages of 1 or 2 tokens; longer pages are mixed and told apart by find_child.
  if (ps_ == 1) return (uint32_t)t[0];
  if (ps_ == 2) return ((uint64_t)(uint32_t)t[0] << 32) | (uint32_t)t[1];
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < ps_; ++i) {
    h ^= (uint32_t)t[i];
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 31;
  }
  return h;
}

int32_t RadixTree::find_child(int32_t node, const Tok* first_page) const {
  auto range = nodes_[node].children.equal_range(page_hash(first_page));
  for (auto it = range.first; it != range.second; ++it) {
    if (std::memcmp(nodes_[it->second].key.data(), first_page, ps_ * sizeof(Tok)) == 0)
      return it->second;
  }
  return -1;
}

void RadixTree::replace_child(int32_t parent, const Tok* first_page, int32_t from, int32_t to) {
  auto range = nodes_[parent].children.equal_range(page_hash(first_page));
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == from) {
      if (to < 0)
        nodes_[parent].children.erase(it);
      else
        it->second = to;
      return;
    }
  }
  fail("node " + std::to_string(nodes_[from].id) + " not filed under its first page");
}

int32_t RadixTree::alloc_slot() {
  if (!free_slots_.empty()) {
    int32_t s = free_slots_.back();
    free_slots_.pop_back();
    return s;
  }
  nodes_.emplace_back();
  return (int32_t)nodes_.size() - 1;
}

void RadixTree::free_slot(int32_t slot) {
  Node& n = nodes_[slot];
  n.alive = false;
  n.parent = -1;
  n.children.clear();
  // Keep small buffers for reuse; give long edges' memory back.
  n.key.clear();
  n.pages.clear();
  n.host_pages.clear();
  n.load_seq = n.write_seq = 0;
  n.load_unused = n.in_host_lru = false;
  if (n.key.capacity() > 4096) std::vector<Tok>().swap(n.key);
  if (n.pages.capacity() > 4096) std::vector<Page>().swap(n.pages);
  free_slots_.push_back(slot);
}

int32_t RadixTree::new_root(int32_t ns) {
  int32_t s = alloc_slot();
  Node& r = nodes_[s];
  r.id = next_id_++;
  r.parent = -1;
  r.ns = ns;
  r.is_root = true;
  r.alive = true;
  r.in_lru = false;
  r.lock_ref = 0;
  r.last_access = 0;
  return s;
}

int64_t RadixTree::descend(int32_t root, const Tok* t, int64_t n, std::vector<int32_t>& path) {
  int32_t node = root;
  int64_t pos = 0;
  while (pos < n) {
    int32_t c = find_child(node, t + pos);
    if (c < 0) break;
    const Node& ch = nodes_[c];
    int64_t klen = (int64_t)ch.key.size();
    int64_t span = std::min(klen, n - pos);
    int64_t m;
    if (std::memcmp(ch.key.data(), t + pos, span * sizeof(Tok)) == 0) {
      m = span;
    } else {
      m = std::mismatch(ch.key.data(), ch.key.data() + span, t + pos).first - ch.key.data();
    }
    m -= m % ps_;  // >= ps: the first page matched through the child map
    if (m < klen) c = split(c, m);
    path.push_back(c);
    pos += m;
    node = c;
  }
  return pos;
}

int32_t RadixTree::split(int32_t child, int64_t m) {
  int32_t up = alloc_slot();  // may move nodes_: take references after it
  Node& ch = nodes_[child];
  Node& u = nodes_[up];
  int64_t cut = m / ps_;
  u.id = next_id_++;
  u.parent = ch.parent;
  u.ns = ch.ns;
  u.is_root = false;
  u.alive = true;
  u.in_lru = false;
  u.lock_ref = ch.lock_ref;
  u.last_access = ch.last_access;
  u.key.assign(ch.key.begin(), ch.key.begin() + m);
  // Both tiers split at the same page; transfer tickets apply to both halves.
  if (ch.on_gpu()) u.pages.assign(ch.pages.begin(), ch.pages.begin() + cut);
  if (ch.on_host()) u.host_pages.assign(ch.host_pages.begin(), ch.host_pages.begin() + cut);
  u.load_seq = ch.load_seq;
  u.write_seq = ch.write_seq;
  u.load_unused = ch.load_unused;
  u.children.clear();
  u.children.emplace(page_hash(ch.key.data() + m), child);
  replace_child(ch.parent, ch.key.data(), child, up);  // same first page, same map entry
  ch.key.erase(ch.key.begin(), ch.key.begin() + m);
  if (ch.on_gpu()) ch.pages.erase(ch.pages.begin(), ch.pages.begin() + cut);
  if (ch.on_host()) ch.host_pages.erase(ch.host_pages.begin(), ch.host_pages.begin() + cut);
  ch.parent = up;
  ++c_.num_nodes;
  if (host_) host_sync(up);
  return up;
}

void RadixTree::touch(const std::vector<int32_t>& path) {
  ++clock_;
  for (int32_t s : path) {
    Node& n = nodes_[s];
    // Re-key the LRU entries: their keys include last_access.
    if (n.in_lru) lru_.erase({n.last_access, n.id, s});
    if (n.in_host_lru) host_lru_.erase({n.last_access, n.id, s});
    n.last_access = clock_;
    if (n.in_lru) lru_.insert({n.last_access, n.id, s});
    if (n.in_host_lru) host_lru_.insert({n.last_access, n.id, s});
  }
}

void RadixTree::lru_add(int32_t slot) {
  Node& n = nodes_[slot];
  if (n.is_root || n.in_lru) return;
  n.in_lru = true;
  lru_.insert({n.last_access, n.id, slot});
}

void RadixTree::lru_discard(int32_t slot) {
  Node& n = nodes_[slot];
  if (!n.in_lru) return;
  n.in_lru = false;
  lru_.erase({n.last_access, n.id, slot});
}

int64_t RadixTree::match(const Tok* t, int64_t n, int32_t ns, bool record_stats, bool keep_last,
                         std::vector<int32_t>& path, int32_t& handle) {
  path.clear();
  match_gpu_nodes_ = 0;
  if (record_stats) c_.query_tokens += n;
  int32_t root = ns >= 0 ? root_of(ns) : -1;
  if (root < 0 || n == 0) {
    handle = root >= 0 ? root : roots_[0];
    return 0;
  }
  int64_t limit = keep_last ? ((n - 1) / ps_) * ps_ : (n / ps_) * ps_;
  int64_t length = descend(root, t, limit, path);
  touch(path);
  // The GPU nodes are closed towards the root: a GPU prefix, then the host-only rest.
  size_t on_gpu = path.size();
  int64_t host_length = 0;
  if (host_) {
    on_gpu = 0;
    while (on_gpu < path.size() && nodes_[path[on_gpu]].on_gpu()) ++on_gpu;
    for (size_t i = on_gpu; i < path.size(); ++i) host_length += (int64_t)nodes_[path[i]].key.size();
  }
  match_gpu_nodes_ = on_gpu;
  if (record_stats) {
    c_.hit_tokens += length;
    c_.host_hit_tokens += host_length;
  }
  handle = on_gpu ? path[on_gpu - 1] : root;
  return length - host_length;
}

int64_t RadixTree::insert(const Tok* t, int64_t n, const Page* pages, int64_t num_pages,
                          int32_t ns, std::vector<int32_t>& path, int32_t& handle) {
  path.clear();
  adopted_.clear();
  adopt_fences_.clear();
  if (n % ps_ != 0)
    fail("insert of " + std::to_string(n) + " tokens: not a multiple of page " +
         std::to_string(ps_));
  if (num_pages != n / ps_)
    fail("insert of " + std::to_string(n) + " tokens needs " + std::to_string(n / ps_) +
         " pages, got " + std::to_string(num_pages));
  if (n == 0) {
    int32_t r = root_of(ns);
    handle = r >= 0 ? r : roots_[0];
    return 0;
  }
  if (roots_[ns] < 0) roots_[ns] = new_root(ns);
  int32_t root = roots_[ns];
  int64_t pos = descend(root, t, n, path);
  if (host_) adopt_path(path, pages);
  int32_t node = path.empty() ? root : path.back();
  if (pos < n) {
    int32_t leaf = alloc_slot();
    Node& l = nodes_[leaf];
    l.id = next_id_++;
    l.parent = node;
    l.ns = ns;
    l.is_root = false;
    l.alive = true;
    l.in_lru = false;
    l.lock_ref = 0;
    l.last_access = 0;
    l.key.assign(t + pos, t + n);
    l.pages.assign(pages + pos / ps_, pages + n / ps_);
    l.children.clear();
    lru_discard(node);  // gains a GPU child: no longer a GPU leaf
    nodes_[node].children.emplace(page_hash(l.key.data()), leaf);
    lru_add(leaf);
    ++c_.num_nodes;
    c_.cached_tokens += n - pos;
    path.push_back(leaf);
    node = leaf;
  }
  touch(path);
  handle = node;
  return pos;
}

void RadixTree::lock(int32_t slot) {
  if (nodes_[slot].is_root) return;
  if (!nodes_[slot].alive || nodes_[slot].parent < 0)
    fail("lock of node " + std::to_string(nodes_[slot].id) + ", which was evicted");
  if (!nodes_[slot].on_gpu())
    fail("lock of node " + std::to_string(nodes_[slot].id) + ", which is not on the GPU");
  int32_t s = slot;
  while (!nodes_[s].is_root) {
    Node& n = nodes_[s];
    if (n.lock_ref == 0) {
      lru_discard(s);
      c_.locked_pages += (int64_t)n.pages.size();
    }
    ++n.lock_ref;
    s = n.parent;
  }
}

void RadixTree::unlock(int32_t slot) {
  if (nodes_[slot].is_root) return;
  if (nodes_[slot].lock_ref <= 0)
    fail("unlock of node " + std::to_string(nodes_[slot].id) + " below zero (not locked)");
  int32_t s = slot;
  while (!nodes_[s].is_root) {
    Node& n = nodes_[s];
    --n.lock_ref;
    if (n.lock_ref == 0) {
      c_.locked_pages -= (int64_t)n.pages.size();
      if (!has_gpu_child(s)) lru_add(s);
    }
    s = n.parent;
  }
}

int32_t RadixTree::detach(int32_t slot) {
  Node& n = nodes_[slot];
  int32_t parent = n.parent;
  if (parent < 0 || !n.children.empty()) fail("detach of node " + std::to_string(n.id));
  host_discard(slot);
  replace_child(parent, n.key.data(), slot, -1);
  --c_.num_nodes;
  free_slot(slot);
  Node& p = nodes_[parent];
  if (p.is_root && p.children.empty() && parent != roots_[0]) {
    roots_[p.ns] = -1;  // an emptied namespace goes
    dropped_roots_.emplace(p.id, p.ns);
    free_slot(parent);
  } else if (host_ && !p.is_root) {
    host_sync(parent);  // a host-only parent may now be a host leaf
  }
  return parent;
}

int64_t RadixTree::evict(int64_t num_pages, std::vector<Page>& out) {
  int64_t count = 0;
  while (count < num_pages && !lru_.empty()) {
    int32_t s = std::get<2>(*lru_.begin());
    lru_.erase(lru_.begin());
    nodes_[s].in_lru = false;
    int64_t keep = (int64_t)nodes_[s].pages.size() - (num_pages - count);
    if (keep > 0) split(s, keep * ps_);  // only the tail this call needs; the head stays
    if (nodes_[s].lock_ref != 0) fail("evicting locked node " + std::to_string(nodes_[s].id));
    size_t before = out.size();
    if (host_)
      release_gpu(s, out);  // kept on the host when it can be
    else
      remove_leaf(s, out);
    count += (int64_t)(out.size() - before);
  }
  c_.evicted_pages += count;
  return count;
}

}  // namespace radixrt
