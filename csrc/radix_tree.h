// Page-granular radix tree over int32 token prefixes: the native core of radixrt's prefix cache.
//
// Same semantics as radixrt/cache/radix.py (the reference): edges are whole pages of tokens,
// children are filed under their first page, a match ending inside an edge splits it (the
// original node keeps the lower part, so handles stay valid), every match/insert is one tick of
// a deterministic clock stamped on the path it touched, and eviction takes exactly the pages
// asked for from the tails of unlocked leaves in (last_access, id) order. Node ids come from
// one counter in the same order as the Python tree's, so the two can be compared node by node.
//
// The tree holds page ids as payload only: allocator references are the caller's business.
// Nodes live in a slot vector (reused after eviction); a caller's handle is (slot, id), and a
// handle whose id no longer matches its slot is a node that was evicted.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace radixrt {

using Tok = int32_t;
using Page = int32_t;

struct Node {
  int64_t id = -1;
  int32_t parent = -1;  // slot; -1 for a root or a detached node
  int32_t ns = 0;       // namespace index (0 = the default namespace)
  bool is_root = false;
  bool alive = false;
  bool in_lru = false;
  int32_t lock_ref = 0;  // locks on this node or any descendant
  int64_t last_access = 0;
  std::vector<Tok> key;     // [num_pages * page_size]
  std::vector<Page> pages;  // [num_pages]
  // Hash of the first page of tokens -> child slot; equal hashes are told apart by the keys.
  std::unordered_multimap<uint64_t, int32_t> children;
};

struct Counters {
  int64_t cached_tokens = 0;
  int64_t locked_pages = 0;
  int64_t num_nodes = 0;
  int64_t hit_tokens = 0;
  int64_t query_tokens = 0;
  int64_t evicted_pages = 0;
};

class RadixTree {
 public:
  explicit RadixTree(int page_size);

  int page_size() const { return ps_; }
  const Counters& counters() const { return c_; }
  int64_t clock() const { return clock_; }
  int64_t evictable_pages() const { return c_.cached_tokens / ps_ - c_.locked_pages; }

  // Namespace index for a name (created on first use; indices are never reused).
  int32_t intern(const std::string& name);
  const std::string& ns_name(int32_t ns) const { return ns_names_[ns]; }
  int32_t root_of(int32_t ns) const { return ns < (int32_t)roots_.size() ? roots_[ns] : -1; }
  int32_t default_root() const { return roots_[0]; }

  // Longest cached page-aligned prefix of t[0:n] in namespace ns. keep_last leaves at least the
  // last token uncached (the model needs its logits). Fills path (non-root nodes, root to leaf)
  // and returns the matched tokens; handle is the deepest node (a root when nothing matched).
  int64_t match(const Tok* t, int64_t n, int32_t ns, bool record_stats, bool keep_last,
                std::vector<int32_t>& path, int32_t& handle);

  // Caches t[0:n] (whole pages) backed by pages[0:n/ps]; the part the tree had keeps the
  // tree's pages. Returns the tokens that already existed; handle ends exactly at the span.
  int64_t insert(const Tok* t, int64_t n, const Page* pages, int64_t num_pages, int32_t ns,
                 std::vector<int32_t>& path, int32_t& handle);

  void lock(int32_t slot);
  void unlock(int32_t slot);
  // Takes num_pages pages (or all evictable ones) from unlocked leaves, LRU first; appends
  // their ids to out and returns how many.
  int64_t evict(int64_t num_pages, std::vector<Page>& out);

  // Handle access.
  // A root dropped with its emptied namespace: its handles still lock / unlock as no-ops.
  bool dropped_root(int64_t id) const { return dropped_roots_.count(id) > 0; }
  int32_t dropped_root_ns(int64_t id) const { return dropped_roots_.at(id); }
  bool valid(int32_t slot, int64_t id) const {
    return slot >= 0 && slot < (int32_t)nodes_.size() && nodes_[slot].alive &&
           nodes_[slot].id == id;
  }
  const Node& node(int32_t slot) const { return nodes_[slot]; }
  std::vector<int32_t> children_of(int32_t slot) const;
  int32_t find_child(int32_t node, const Tok* first_page) const;  // -1: none
  std::vector<int32_t> live_nodes() const;  // non-root nodes, any order
  std::vector<int32_t> live_roots() const;  // roots of namespaces that exist
  std::vector<std::tuple<int64_t, int64_t>> lru_keys() const;

  // The tree's self-check; returns "" or the first violation.
  std::string check() const;

  // lpm order: group handles (slot, id, count) -> the order of the groups in the DFS over the
  // tree of their nodes and ancestors, heavier subtrees first, ties by node id; a node's own
  // group after its subtree's. Invalid handles are placed as their own tops.
  std::vector<int64_t> lpm_order(const std::vector<int32_t>& slots,
                                 const std::vector<int64_t>& ids,
                                 const std::vector<int64_t>& counts) const;

 private:
  uint64_t page_hash(const Tok* t) const;
  void replace_child(int32_t parent, const Tok* first_page, int32_t from, int32_t to);
  int32_t alloc_slot();
  void free_slot(int32_t slot);
  int32_t new_root(int32_t ns);
  int64_t descend(int32_t root, const Tok* t, int64_t n, std::vector<int32_t>& path);
  int32_t split(int32_t child, int64_t m);
  void touch(const std::vector<int32_t>& path);
  void lru_add(int32_t slot);
  void lru_discard(int32_t slot);
  int32_t detach(int32_t slot);

  int ps_;
  int64_t next_id_ = 0;
  int64_t clock_ = 0;
  Counters c_;
  std::vector<Node> nodes_;
  std::vector<int32_t> free_slots_;
  std::vector<int32_t> roots_;  // by namespace index; -1 = no root now
  std::vector<std::string> ns_names_;
  std::unordered_map<int64_t, int32_t> dropped_roots_;  // root id -> namespace
  std::unordered_map<std::string, int32_t> ns_index_;
  std::set<std::tuple<int64_t, int64_t, int32_t>> lru_;  // (last_access, id, slot)
};

}  // namespace radixrt
