// Whole-tree walks of the native radix tree (radix_tree.h): listings, the self-check and the
// lpm order. Kept apart from the hot paths in radix_tree.cpp.
#include <algorithm>
#include <set>
#include <unordered_set>

#include "radix_tree.h"

namespace radixrt {

std::vector<int32_t> RadixTree::children_of(int32_t slot) const {
  std::vector<int32_t> out;
  for (const auto& kv : nodes_[slot].children) out.push_back(kv.second);
  return out;
}

std::vector<int32_t> RadixTree::live_roots() const {
  std::vector<int32_t> out;
  for (int32_t r : roots_)
    if (r >= 0) out.push_back(r);
  return out;
}

std::vector<int32_t> RadixTree::live_nodes() const {
  std::vector<int32_t> out, stack = live_roots();
  while (!stack.empty()) {
    int32_t s = stack.back();
    stack.pop_back();
    for (const auto& kv : nodes_[s].children) stack.push_back(kv.second);
    if (!nodes_[s].is_root) out.push_back(s);
  }
  return out;
}

std::vector<std::tuple<int64_t, int64_t>> RadixTree::lru_keys() const {
  std::vector<std::tuple<int64_t, int64_t>> out;
  for (const auto& e : lru_) out.emplace_back(std::get<0>(e), std::get<1>(e));
  return out;
}

std::string RadixTree::check() const {
  auto id = [&](int32_t s) { return std::to_string(nodes_[s].id); };
  for (size_t ns = 0; ns < roots_.size(); ++ns) {
    int32_t r = roots_[ns];
    if (r < 0) continue;
    const Node& root = nodes_[r];
    if (!root.alive || !root.is_root || root.ns != (int32_t)ns || root.lock_ref != 0)
      return "root of namespace " + std::to_string(ns) + " is malformed";
    if (ns != 0 && root.children.empty()) return "empty namespace root " + id(r) + " not removed";
  }
  std::unordered_set<Page> owner;
  std::set<int64_t> unlocked_leaves;
  int64_t locked = 0, tokens = 0;
  std::vector<int32_t> nodes = live_nodes();
  for (int32_t s : nodes) {
    const Node& n = nodes_[s];
    if (!n.alive || n.is_root || n.parent < 0) return "node " + id(s) + " reachable but detached";
    const Node& p = nodes_[n.parent];
    int64_t klen = (int64_t)n.key.size();
    if (klen == 0 || klen % ps_ != 0)
      return "node " + id(s) + ": key of " + std::to_string(klen) + " tokens with page " +
             std::to_string(ps_);
    if (find_child(n.parent, n.key.data()) != s)
      return "node " + id(s) + " not filed under its first page in parent " + id(n.parent);
    if (n.ns != p.ns) return "node " + id(s) + " crosses namespaces";
    int64_t np = (int64_t)n.pages.size(), nh = (int64_t)n.host_pages.size();
    if ((np != 0 && np != klen / ps_) || (nh != 0 && nh != klen / ps_) || (!host_ && nh))
      return "node " + id(s) + ": " + std::to_string(np) + " GPU / " + std::to_string(nh) +
             " host pages for " + std::to_string(klen) + " tokens";
    if (!n.on_gpu() && !n.on_host()) return "node " + id(s) + " holds its tokens in no tier";
    if (n.on_gpu() && !p.is_root && !p.on_gpu())
      return "node " + id(s) + " is on the GPU but its parent " + id(n.parent) + " is not";
    if (!n.on_gpu() && n.lock_ref) return "host-only node " + id(s) + " is locked";
    int64_t child_locks = 0;
    for (const auto& kv : n.children) child_locks += nodes_[kv.second].lock_ref;
    if (n.lock_ref < child_locks)
      return "node " + id(s) + ": lock_ref " + std::to_string(n.lock_ref) +
             " < children's total " + std::to_string(child_locks);
    if (!p.is_root && p.last_access < n.last_access)
      return "node " + id(s) + " accessed after its parent " + id(n.parent) +
             ": LRU cascade order broken";
    bool gpu_leaf = n.on_gpu() && !has_gpu_child(s);
    if (n.in_lru != (gpu_leaf && n.lock_ref == 0))
      return "node " + id(s) + ": LRU membership out of date";
    if (!n.on_gpu()) continue;
    tokens += klen;
    for (Page pg : n.pages)
      if (!owner.insert(pg).second)
        return "page " + std::to_string(pg) + " held twice (second: node " + id(s) + ")";
    if (n.lock_ref)
      locked += (int64_t)n.pages.size();
    else if (gpu_leaf)
      unlocked_leaves.insert(n.id);
  }
  if ((int64_t)nodes.size() != c_.num_nodes)
    return "num_nodes " + std::to_string(c_.num_nodes) + " != " + std::to_string(nodes.size());
  if (tokens != c_.cached_tokens)
    return "cached_tokens " + std::to_string(c_.cached_tokens) + " != " + std::to_string(tokens);
  if (locked != c_.locked_pages)
    return "locked_pages " + std::to_string(c_.locked_pages) + " != " + std::to_string(locked);
  std::set<int64_t> in_lru;
  for (const auto& e : lru_) {
    int32_t s = std::get<2>(e);
    const Node& n = nodes_[s];
    if (!n.alive || n.id != std::get<1>(e) || n.last_access != std::get<0>(e))
      return "LRU keys out of date with nodes' last_access";
    in_lru.insert(n.id);
  }
  if (in_lru != unlocked_leaves) return "evictable set != unlocked leaves";
  return host_ ? check_tier() : "";
}

std::string RadixTree::check_tier() const {
  // The host pool's half: host pages held once, counters, the host LRU, pending loads and
  // writes (the host allocator's refcounts are audited by the caller against host_pages).
  auto id = [&](int32_t s) { return std::to_string(nodes_[s].id); };
  std::unordered_set<Page> owner;
  std::set<int64_t> evictable, tickets;
  for (const Load& ld : loads_) tickets.insert(ld.ticket);
  int64_t host_tokens = 0, host_only = 0;
  for (int32_t s : live_nodes()) {
    const Node& n = nodes_[s];
    if (n.write_seq < 0) return "node " + id(s) + " has a write that was never issued";
    if (n.load_seq) {
      if (n.load_seq < 0) return "node " + id(s) + " still pinned for a load set-up";
      if (!n.on_gpu() || n.lock_ref <= 0)
        return "loading node " + id(s) + " must be on the GPU and locked";
      if (!tickets.count(n.load_seq)) return "node " + id(s) + " loads under unknown ticket";
    }
    if (n.in_host_lru != (n.on_host() && n.load_seq == 0 && (n.on_gpu() || n.children.empty())))
      return "node " + id(s) + ": host LRU membership out of date";
    if (!n.on_host()) continue;
    host_tokens += (int64_t)n.key.size();
    if (!n.on_gpu()) host_only += (int64_t)n.key.size();
    for (Page pg : n.host_pages)
      if (!owner.insert(pg).second)
        return "host page " + std::to_string(pg) + " held twice (second: node " + id(s) + ")";
    if (n.in_host_lru) evictable.insert(n.id);
  }
  if (host_tokens != c_.host_tokens)
    return "host tokens " + std::to_string(c_.host_tokens) + " != " + std::to_string(host_tokens);
  if (host_only != c_.host_only_tokens)
    return "host-only tokens " + std::to_string(c_.host_only_tokens) + " != " +
           std::to_string(host_only);
  std::set<int64_t> listed;
  for (const auto& [last_access, nid, s] : host_lru_) {
    if (!nodes_[s].alive || nodes_[s].id != nid || nodes_[s].last_access != last_access)
      return "host LRU keys out of date with nodes' last_access";
    listed.insert(nid);
  }
  if (listed != evictable) return "host evictable set != host LRU";
  if (!io_.empty()) return "write-backs left unissued";
  return "";
}

std::vector<int64_t> RadixTree::lpm_order(const std::vector<int32_t>& slots,
                                          const std::vector<int64_t>& ids,
                                          const std::vector<int64_t>& counts) const {
  struct Info {
    int64_t weight = 0;
    bool linked = false;  // filed under its parent (or among the tops)
    std::vector<int64_t> kids;
    std::vector<int64_t> groups;
  };
  std::unordered_map<int64_t, Info> info;
  info.reserve(slots.size() * 4 + 8);
  std::vector<int64_t> tops;
  for (size_t g = 0; g < slots.size(); ++g) {
    info[ids[g]].groups.push_back((int64_t)g);
    int32_t s = slots[g];
    int64_t cur = ids[g];
    bool ok = valid(s, cur);
    while (true) {
      info[cur].weight += counts[g];
      int32_t parent = ok ? nodes_[s].parent : -1;
      if (parent < 0) {
        Info& me = info[cur];
        if (!me.linked) {
          me.linked = true;
          tops.push_back(cur);
        }
        break;
      }
      int64_t pid = nodes_[parent].id;
      if (!info[cur].linked) {
        info[cur].linked = true;
        info[pid].kids.push_back(cur);
      }
      s = parent;
      cur = pid;
    }
  }
  auto heaviest_first = [&](std::vector<int64_t>& v) {
    std::sort(v.begin(), v.end(), [&](int64_t a, int64_t b) {
      int64_t wa = info[a].weight, wb = info[b].weight;
      return wa != wb ? wa > wb : a < b;
    });
  };
  std::vector<int64_t> out;
  out.reserve(slots.size());
  heaviest_first(tops);
  // Iterative DFS: (node id, next kid index); a node's own groups follow its subtree.
  std::vector<std::pair<int64_t, size_t>> stack;
  for (int64_t top : tops) {
    stack.emplace_back(top, 0);
    heaviest_first(info[top].kids);
    while (!stack.empty()) {
      auto& [nid, next] = stack.back();
      Info& in = info[nid];
      if (next < in.kids.size()) {
        int64_t kid = in.kids[next++];
        heaviest_first(info[kid].kids);
        stack.emplace_back(kid, 0);
        continue;
      }
      out.insert(out.end(), in.groups.begin(), in.groups.end());
      stack.pop_back();
    }
  }
  return out;
}

}  // namespace radixrt
