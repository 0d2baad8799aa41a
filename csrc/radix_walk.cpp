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
    if ((int64_t)n.pages.size() != klen / ps_)
      return "node " + id(s) + ": " + std::to_string(n.pages.size()) + " pages for " +
             std::to_string(klen) + " tokens";
    int64_t child_locks = 0;
    for (const auto& kv : n.children) child_locks += nodes_[kv.second].lock_ref;
    if (n.lock_ref < child_locks)
      return "node " + id(s) + ": lock_ref " + std::to_string(n.lock_ref) +
             " < children's total " + std::to_string(child_locks);
    if (!p.is_root && p.last_access < n.last_access)
      return "node " + id(s) + " accessed after its parent " + id(n.parent) +
             ": LRU cascade order broken";
    tokens += klen;
    for (Page pg : n.pages)
      if (!owner.insert(pg).second)
        return "page " + std::to_string(pg) + " held twice (second: node " + id(s) + ")";
    if (n.lock_ref)
      locked += (int64_t)n.pages.size();
    else if (n.children.empty())
      unlocked_leaves.insert(n.id);
    if (n.in_lru != (n.lock_ref == 0 && n.children.empty()))
      return "node " + id(s) + ": LRU membership out of date";
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
