// Page-granular radix tree over int32 token prefixes: the native core of radixrt's prefix cache.
//
// Same semantics as radixrt/cache/radix.py (the reference): edges are whole pages of tokens,
// children are filed under their first page, a match ending inside an edge splits it (the
// original node keeps the lower part, so handles stay valid), every match/insert is one tick of
// a deterministic clock stamped on the path it touched, and eviction takes exactly the pages
// asked for from the tails of unlocked leaves in (last_access, id) order. Node ids come from
// one counter in the same order as the Python tree's, so the two can be compared node by node.
//
// The host tier (tier.cpp, mirroring radixrt/cache/tiered.py): with a host allocator attached a
// node's KV is on the GPU (pages), on the host (host_pages), or both; GPU eviction writes a leaf
// down instead of dropping it, a match is a GPU prefix plus a host-only continuation, and a host
// LRU evicts host copies. Copies are the caller's (Python's PageTransfer, CUDA streams): an
// operation that starts write-backs leaves them in the I/O buffers (take them, issue them, hand
// back the tickets with resolve_writes); loads are set up in three steps (begin/finish/abort).
//
// The tree holds GPU page ids as payload only: their allocator references are the caller's
// business. Host pages are the tree's alone: it allocates and frees them itself.
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

#include "page_allocator.h"

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
  std::vector<Page> pages;  // [num_pages] GPU pages, or empty (host-only)
  std::vector<Page> host_pages;  // [num_pages] host pages, or empty (not on the host)
  // Transfer tickets (0 = none): a pending load means the GPU pages are not filled yet (-1:
  // the host copy is pinned while a load is being set up); a write's GPU pages must not be
  // reused before it ends (< 0 only inside an operation: -(index + 1) of a write not issued yet).
  int64_t load_seq = 0;
  int64_t write_seq = 0;
  bool load_unused = false;  // loaded and not yet claimed by a sequence
  bool in_host_lru = false;
  bool on_gpu() const { return !pages.empty(); }
  bool on_host() const { return !host_pages.empty(); }
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
  // Host tier.
  int64_t host_tokens = 0;       // tokens with a host copy
  int64_t host_only_tokens = 0;  // ... and no GPU copy
  int64_t host_hit_tokens = 0;
  int64_t loading_pages = 0;
  int64_t loaded_tokens = 0;
  int64_t load_used_tokens = 0;
  int64_t load_wasted_pages = 0;
};

// Write-backs an operation started (one per node, in order) and the write tickets the caller
// must fence the compute stream on before reusing the GPU pages it got back (> 0: a ticket;
// < 0: -(index + 1) of one of these writes).
struct PendingIO {
  std::vector<Page> gpu, host;
  std::vector<int64_t> offsets{0};  // write j copies gpu/host[offsets[j] : offsets[j + 1]]
  std::vector<int32_t> slots;
  std::vector<int64_t> ids;
  std::vector<int64_t> fences;
  bool empty() const { return slots.empty() && fences.empty(); }
};

struct Load {
  int64_t ticket;
  int32_t slot;  // deepest loading node (locked until the load is retired)
  int64_t id;
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

  // The host tier: off until a host allocator is attached (it must outlive the tree).
  void attach_host(PageAllocator* host);
  bool tiered() const { return host_ != nullptr; }
  PageAllocator* host() const { return host_; }

  // Longest cached page-aligned prefix of t[0:n] in namespace ns. keep_last leaves at least the
  // last token uncached (the model needs its logits). Fills path (non-root nodes, root to leaf)
  // and returns the matched GPU tokens; handle is the deepest GPU node (a root when nothing
  // matched on the GPU). With a host tier, path[match_gpu_nodes():] is the host-only rest.
  int64_t match(const Tok* t, int64_t n, int32_t ns, bool record_stats, bool keep_last,
                std::vector<int32_t>& path, int32_t& handle);

  size_t match_gpu_nodes() const { return match_gpu_nodes_; }

  // Caches t[0:n] (whole pages) backed by pages[0:n/ps]; the part the tree had keeps the
  // tree's pages. Returns the tokens that already existed; handle ends exactly at the span.
  // Host-only nodes of the path adopt the caller's pages (adopted(): the caller increfs them)
  // and loading ones want a fence on their load (adopt_fences()).
  int64_t insert(const Tok* t, int64_t n, const Page* pages, int64_t num_pages, int32_t ns,
                 std::vector<int32_t>& path, int32_t& handle);

  void lock(int32_t slot);
  void unlock(int32_t slot);
  // Takes num_pages pages (or all evictable ones) from unlocked leaves, LRU first; appends
  // their ids to out and returns how many.
  int64_t evict(int64_t num_pages, std::vector<Page>& out);

  // Host tier (tier.cpp); see radixrt/cache/tiered.py for each operation's contract.
  const std::vector<Page>& adopted() const { return adopted_; }
  const std::vector<int64_t>& adopt_fences() const { return adopt_fences_; }
  PendingIO& io() { return io_; }
  void set_writes_enabled(bool on) { writes_enabled_ = on; }
  int64_t backup_ahead(int64_t num_pages);
  // A load of the host-only nodes slots[0:n] (root to leaf, children of handle): pins them and
  // locks handle; returns their host pages. Then finish_load with GPU pages and the ticket, or
  // abort_load when no GPU pages could be had.
  std::vector<Page> begin_load(const int32_t* slots, int64_t n, int32_t handle);
  void abort_load(const int32_t* slots, int64_t n, int32_t handle);
  int64_t finish_load(const int32_t* slots, int64_t n, int32_t handle, const Page* gpu,
                      int64_t num_gpu, int64_t ticket);
  const std::vector<Load>& loads() const { return loads_; }
  void retire_loads(const std::vector<bool>& done);  // one flag per loads() entry
  int64_t claim_loaded(int32_t slot);
  int64_t evict_host(int64_t num_pages, bool bounded, int64_t older_than);
  void resolve_writes(const int64_t* tickets, int64_t n);  // the tickets of io()'s writes
  std::vector<std::tuple<int64_t, int64_t>> host_lru_keys() const;

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
  bool has_gpu_child(int32_t slot) const;
  void remove_leaf(int32_t slot, std::vector<Page>& out);
  void gpu_leaf_released(int32_t parent);
  std::string check_tier() const;  // radix_walk.cpp
  // Host tier internals (tier.cpp).
  void release_gpu(int32_t slot, std::vector<Page>& out);
  bool write_back(int32_t slot, bool bounded, int64_t older_than);
  bool host_alloc(int64_t n, bool bounded, int64_t older_than, std::vector<Page>& out);
  void drop_host_copy(int32_t slot);
  void drop_host_subtree(int32_t slot);
  void adopt_path(const std::vector<int32_t>& path, const Page* pages);
  void to_gpu(int32_t slot, const Page* gpu);
  void host_sync(int32_t slot);
  void host_discard(int32_t slot);

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
  size_t match_gpu_nodes_ = 0;
  // Host tier.
  PageAllocator* host_ = nullptr;
  bool writes_enabled_ = true;
  std::set<std::tuple<int64_t, int64_t, int32_t>> host_lru_;  // evictable host copies
  std::vector<Load> loads_;
  PendingIO io_;
  std::vector<Page> adopted_, host_scratch_;
  std::vector<int64_t> adopt_fences_;
};

}  // namespace radixrt
