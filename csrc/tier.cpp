// The host tier of the native radix tree (radix_tree.h): residency, write-back, loads and the
// host LRU. The what mirrors radixrt/cache/tiered.py operation by operation (same node ids, same
// host pages in the same order, same tickets); comments here say why.
#include <algorithm>
#include <stdexcept>

#include "radix_tree.h"

namespace radixrt {

namespace {
[[noreturn]] void fail(const std::string& msg) { throw std::logic_error(msg); }
}  // namespace

void RadixTree::attach_host(PageAllocator* host) {
  if (c_.num_nodes != 0) fail("a host tier is attached to an empty tree only");
  host_ = host;
}

bool RadixTree::has_gpu_child(int32_t slot) const {
  for (const auto& kv : nodes_[slot].children)
    if (nodes_[kv.second].on_gpu()) return true;
  return false;
}

void RadixTree::gpu_leaf_released(int32_t parent) {
  // A child of parent left the GPU: the parent may now be an unlocked GPU leaf (the cascade).
  const Node& p = nodes_[parent];
  if (p.alive && !p.is_root && p.lock_ref == 0 && !has_gpu_child(parent)) lru_add(parent);
}

void RadixTree::remove_leaf(int32_t slot, std::vector<Page>& out) {
  const Node& n = nodes_[slot];
  if (n.parent < 0 || !n.children.empty() || n.lock_ref != 0)
    fail("evicting node " + std::to_string(n.id) + " that is detached, internal or locked");
  out.insert(out.end(), n.pages.begin(), n.pages.end());  // before detach frees the slot
  c_.cached_tokens -= (int64_t)n.pages.size() * ps_;
  gpu_leaf_released(detach(slot));
}

void RadixTree::release_gpu(int32_t slot, std::vector<Page>& out) {
  Node& n = nodes_[slot];
  if (n.load_unused) {  // loaded for a sequence that never read it: the copy was wasted
    n.load_unused = false;
    c_.load_wasted_pages += (int64_t)n.pages.size();
  }
  if (!n.on_host() && !(writes_enabled_ && write_back(slot, false, 0))) {
    drop_host_subtree(slot);  // the host tier is full: the tokens leave the cache
    remove_leaf(slot, out);
    return;
  }
  // write_back only frees slots (host LRU evictions), so n is still valid.
  if (n.write_seq) io_.fences.push_back(n.write_seq);
  out.insert(out.end(), n.pages.begin(), n.pages.end());
  int64_t klen = (int64_t)n.key.size();
  n.pages.clear();
  c_.cached_tokens -= klen;
  c_.host_only_tokens += klen;
  host_sync(slot);
  if (n.parent < 0) fail("GPU release of detached node " + std::to_string(n.id));
  gpu_leaf_released(n.parent);
}

bool RadixTree::write_back(int32_t slot, bool bounded, int64_t older_than) {
  if (!host_alloc((int64_t)nodes_[slot].pages.size(), bounded, older_than, host_scratch_))
    return false;
  Node& n = nodes_[slot];
  n.write_seq = -(int64_t)io_.slots.size() - 1;  // the ticket comes with resolve_writes
  io_.gpu.insert(io_.gpu.end(), n.pages.begin(), n.pages.end());
  io_.host.insert(io_.host.end(), host_scratch_.begin(), host_scratch_.end());
  io_.offsets.push_back((int64_t)io_.gpu.size());
  io_.slots.push_back(slot);
  io_.ids.push_back(n.id);
  n.host_pages = host_scratch_;
  c_.host_tokens += (int64_t)n.key.size();
  host_sync(slot);
  return true;
}

void RadixTree::resolve_writes(const int64_t* tickets, int64_t n) {
  if (n != (int64_t)io_.slots.size()) fail("resolve_writes needs one ticket per write");
  for (int64_t j = 0; j < n; ++j) {
    int32_t s = io_.slots[j];
    // The node may have left both tiers since (a later write evicted its host copy).
    if (valid(s, io_.ids[j]) && nodes_[s].write_seq == -j - 1) nodes_[s].write_seq = tickets[j];
  }
  io_ = PendingIO();
}

bool RadixTree::host_alloc(int64_t n, bool bounded, int64_t older_than,
                           std::vector<Page>& out) {
  out.resize(n);
  if (host_->alloc(n, out.data())) return true;
  evict_host(n - host_->num_free(), bounded, older_than);
  return host_->alloc(n, out.data());
}

int64_t RadixTree::evict_host(int64_t num_pages, bool bounded, int64_t older_than) {
  int64_t freed = 0;
  while (freed < num_pages && !host_lru_.empty()) {
    const auto& [last_access, id, slot] = *host_lru_.begin();
    if (bounded && last_access > older_than) break;
    int32_t s = slot;
    freed += (int64_t)nodes_[s].host_pages.size();
    drop_host_copy(s);
  }
  return freed;
}

void RadixTree::drop_host_copy(int32_t slot) {
  host_discard(slot);
  Node& n = nodes_[slot];
  host_->decref(n.host_pages.data(), (int64_t)n.host_pages.size());
  n.host_pages.clear();
  int64_t klen = (int64_t)n.key.size();
  c_.host_tokens -= klen;
  if (!n.on_gpu()) {  // its only copy: the node goes (a host-only leaf)
    c_.host_only_tokens -= klen;
    detach(slot);
  }
}

void RadixTree::drop_host_subtree(int32_t slot) {
  // The host-only descendants of a GPU node leaving the cache, deepest first, then by id (the
  // order the Python tree frees them in, so both free the host pages in one order).
  std::vector<std::tuple<int64_t, int64_t, int32_t>> order;  // (-depth, id, slot)
  std::vector<std::pair<int32_t, int64_t>> stack;
  for (const auto& kv : nodes_[slot].children) stack.emplace_back(kv.second, 1);
  while (!stack.empty()) {
    auto [s, depth] = stack.back();
    stack.pop_back();
    const Node& n = nodes_[s];
    if (n.on_gpu() || n.load_seq != 0)
      fail("node " + std::to_string(n.id) + " under a GPU leaf is busy");
    order.emplace_back(-depth, n.id, s);
    for (const auto& kv : n.children) stack.emplace_back(kv.second, depth + 1);
  }
  std::sort(order.begin(), order.end());
  for (const auto& e : order) drop_host_copy(std::get<2>(e));
}

void RadixTree::host_sync(int32_t slot) {
  Node& n = nodes_[slot];
  // Evictable host copies: removing one keeps every node in some tier.
  bool evictable = n.on_host() && n.load_seq == 0 && (n.on_gpu() || n.children.empty());
  if (!evictable) {
    host_discard(slot);
  } else if (!n.in_host_lru) {
    n.in_host_lru = true;
    host_lru_.insert({n.last_access, n.id, slot});
  }
}

void RadixTree::host_discard(int32_t slot) {
  Node& n = nodes_[slot];
  if (!n.in_host_lru) return;
  n.in_host_lru = false;
  host_lru_.erase({n.last_access, n.id, slot});
}

void RadixTree::to_gpu(int32_t slot, const Page* gpu) {
  Node& n = nodes_[slot];
  if (n.parent < 0 || n.on_gpu()) fail("node " + std::to_string(n.id) + " cannot join the GPU");
  n.pages.assign(gpu, gpu + n.host_pages.size());
  int64_t klen = (int64_t)n.key.size();
  c_.cached_tokens += klen;
  c_.host_only_tokens -= klen;
  lru_discard(n.parent);  // gains a GPU child: no longer a GPU leaf
}

void RadixTree::adopt_path(const std::vector<int32_t>& path, const Page* pages) {
  // An insert over host-only nodes: the caller computed those tokens on the GPU, so its pages
  // become the nodes' GPU copies (no load needed).
  adopted_.clear();
  adopt_fences_.clear();
  int64_t off = 0;
  for (int32_t s : path) {
    const Node& n = nodes_[s];
    int64_t k = (int64_t)n.key.size() / ps_;
    if (!n.on_gpu()) {
      adopted_.insert(adopted_.end(), pages + off, pages + off + k);
      to_gpu(s, pages + off);
      lru_add(s);  // a GPU leaf until the next node of the path joins the GPU
      host_sync(s);
    } else if (n.load_seq > 0) {  // the caller will read the tree's pages: order after the load
      adopt_fences_.push_back(n.load_seq);
    }
    off += k;
  }
}

int64_t RadixTree::backup_ahead(int64_t num_pages) {
  int64_t started = 0, covered = 0;
  // Writing back touches only the host LRU (and host-only nodes), never lru_: safe to iterate.
  for (const auto& [last_access, id, slot] : lru_) {
    if (covered >= num_pages) break;
    int64_t k = (int64_t)nodes_[slot].pages.size();
    covered += k;
    if (nodes_[slot].on_host()) continue;
    if (!write_back(slot, true, last_access)) break;  // evicts only host copies older than it
    started += k;
  }
  return started;
}

std::vector<Page> RadixTree::begin_load(const int32_t* slots, int64_t n, int32_t handle) {
  if (n == 0 || nodes_[slots[0]].parent != handle) fail("start_load of a match the tree changed since");
  for (int64_t i = 0; i < n; ++i)
    if (nodes_[slots[i]].on_gpu()) fail("start_load of a match the tree changed since");
  lock(handle);  // keeps the GPU path while the caller's allocation evicts
  std::vector<Page> host;
  for (int64_t i = 0; i < n; ++i) {  // pins the host copies while eviction writes back
    Node& node = nodes_[slots[i]];
    node.load_seq = -1;
    host_sync(slots[i]);
    host.insert(host.end(), node.host_pages.begin(), node.host_pages.end());
  }
  return host;
}

void RadixTree::abort_load(const int32_t* slots, int64_t n, int32_t handle) {
  for (int64_t i = 0; i < n; ++i) {
    nodes_[slots[i]].load_seq = 0;
    host_sync(slots[i]);
  }
  unlock(handle);
}

int64_t RadixTree::finish_load(const int32_t* slots, int64_t n, int32_t handle, const Page* gpu,
                               int64_t num_gpu, int64_t ticket) {
  int64_t off = 0, tokens = 0;
  for (int64_t i = 0; i < n; ++i) {
    Node& node = nodes_[slots[i]];
    int64_t k = (int64_t)node.host_pages.size();
    if (off + k > num_gpu) fail("finish_load: fewer GPU pages than host pages");
    node.load_seq = 0;
    to_gpu(slots[i], gpu + off);
    node.load_seq = ticket;
    node.load_unused = true;
    host_sync(slots[i]);
    off += k;
    tokens += (int64_t)node.key.size();
  }
  if (off != num_gpu) fail("finish_load: more GPU pages than host pages");
  int32_t deepest = slots[n - 1];
  lock(deepest);
  unlock(handle);
  loads_.push_back({ticket, deepest, nodes_[deepest].id});
  c_.loading_pages += num_gpu;
  c_.loaded_tokens += tokens;
  return tokens;
}

void RadixTree::retire_loads(const std::vector<bool>& done) {
  if (done.size() != loads_.size()) fail("retire_loads needs one flag per pending load");
  std::vector<Load> keep;
  for (size_t i = 0; i < loads_.size(); ++i) {
    const Load& ld = loads_[i];
    if (!done[i]) {
      keep.push_back(ld);
      continue;
    }
    int32_t s = ld.slot;
    // Splits since the load put the ticket on each part: walk up while it is this load's.
    while (s >= 0 && !nodes_[s].is_root && nodes_[s].load_seq == ld.ticket) {
      nodes_[s].load_seq = 0;
      c_.loading_pages -= (int64_t)nodes_[s].pages.size();
      host_sync(s);
      s = nodes_[s].parent;
    }
    unlock(ld.slot);
  }
  loads_ = std::move(keep);
}

int64_t RadixTree::claim_loaded(int32_t slot) {
  int64_t claimed = 0;
  for (int32_t s = slot; s >= 0 && !nodes_[s].is_root; s = nodes_[s].parent) {
    Node& n = nodes_[s];
    if (n.load_unused) {
      n.load_unused = false;
      claimed += (int64_t)n.key.size();
    }
  }
  c_.load_used_tokens += claimed;
  return claimed;
}

std::vector<std::tuple<int64_t, int64_t>> RadixTree::host_lru_keys() const {
  std::vector<std::tuple<int64_t, int64_t>> out;
  for (const auto& e : host_lru_) out.emplace_back(std::get<0>(e), std::get<1>(e));
  return out;
}

}  // namespace radixrt
