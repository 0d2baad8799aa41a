// Python bindings of the host tier's operations on the native tree (tier.cpp), used by
// radixrt/cache/native_tiered.py. Node lists cross as (slots int32, ids int64) arrays; pages as
// int32 arrays; what only Python can do (the copies and their tickets) comes back as arrays.
#include "py_tree.h"

namespace radixrt {

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

py::array_t<int64_t> to_i64(const std::vector<int64_t>& v) {
  py::array_t<int64_t> out((py::ssize_t)v.size());
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(int64_t));
  return out;
}

void check_handle(const RadixTree& t, int32_t slot, int64_t id, const char* op) {
  if (!t.valid(slot, id))
    throw std::logic_error(std::string(op) + " of node " + std::to_string(id) +
                           ", which was evicted");
}

// The node slots of a (slots, ids) pair of arrays, each checked to be a live node.
std::vector<int32_t> node_slots(const RadixTree& t, py::handle slots, const I64Array& ids,
                                const char* op) {
  I32View s(slots, "slots");
  if (s.n != ids.size()) throw std::logic_error(std::string(op) + ": one id per slot");
  std::vector<int32_t> out(s.data, s.data + s.n);
  for (int64_t i = 0; i < s.n; ++i) check_handle(t, out[i], ids.data()[i], op);
  return out;
}

// match on a tiered tree: (GPU pages, GPU length, handle slot, handle id, host node slots,
// host node ids, host length, ready).
py::tuple match_tiered(PyTree& self, py::handle tokens, py::handle name, bool record_stats) {
  RadixTree& t = self.tree();
  I32View toks(tokens, "tokens");
  std::vector<int32_t>& path = self.path_scratch();
  int32_t handle;
  int64_t len = t.match(toks.data, toks.n, self.ns(name, false), record_stats, true, path, handle);
  size_t on_gpu = t.match_gpu_nodes();
  size_t rest = path.size() - on_gpu;
  py::array_t<int32_t> host_slots((py::ssize_t)rest);
  py::array_t<int64_t> host_ids((py::ssize_t)rest);
  int64_t host_len = 0;
  for (size_t i = 0; i < rest; ++i) {
    const Node& n = t.node(path[on_gpu + i]);
    host_slots.mutable_data()[i] = path[on_gpu + i];
    host_ids.mutable_data()[i] = n.id;
    host_len += (int64_t)n.key.size();
  }
  bool ready = true;
  for (size_t i = 0; i < on_gpu; ++i) ready = ready && t.node(path[i]).load_seq == 0;
  return py::make_tuple(path_pages(t, path, (int64_t)on_gpu), len, handle, t.node(handle).id,
                        host_slots, host_ids, host_len, ready);
}

// Write-backs and fences the last operation left for the caller, or None:
// (gpu pages, host pages, offsets, fence tickets; < 0: -(index + 1) of one of these writes).
py::object take_io(PyTree& self) {
  PendingIO& io = self.tree().io();
  if (io.empty()) return py::none();
  return py::make_tuple(to_array(io.gpu.data(), io.gpu.size()),
                        to_array(io.host.data(), io.host.size()), to_i64(io.offsets),
                        to_i64(io.fences));
}

// (adopted pages, load tickets to fence) of the last insert, or None when it adopted nothing.
py::object insert_extras(PyTree& self) {
  const RadixTree& t = self.tree();
  if (t.adopted().empty() && t.adopt_fences().empty()) return py::none();
  return py::make_tuple(to_array(t.adopted().data(), t.adopted().size()), to_i64(t.adopt_fences()));
}

// Per node (roots too), by id: (id, host pages, load_seq, write_seq, load_unused); the host LRU
// as ids in eviction order; pending loads as (ticket, deepest node id).
py::tuple tier_snapshot(PyTree& self) {
  const RadixTree& t = self.tree();
  std::vector<int32_t> all = t.live_roots();
  for (int32_t s : t.live_nodes()) all.push_back(s);
  std::sort(all.begin(), all.end(), [&](int32_t a, int32_t b) { return t.node(a).id < t.node(b).id; });
  py::list nodes, lru, loads;
  for (int32_t s : all) {
    const Node& n = t.node(s);
    nodes.append(py::make_tuple(n.id, py::cast(n.host_pages), n.load_seq, n.write_seq,
                                n.load_unused));
  }
  for (const auto& e : t.host_lru_keys()) lru.append(std::get<1>(e));
  for (const Load& ld : t.loads()) loads.append(py::make_tuple(ld.ticket, ld.id));
  return py::make_tuple(nodes, lru, loads);
}

}  // namespace

void bind_tier(py::class_<PyTree>& cls) {
  cls.def("attach_host", [](PyTree& self, py::object allocator) {
        self.tree().attach_host(native_allocator(allocator));
        self.host_allocator = allocator;
      }, "Turn the host tier on, with this _radix_native.Allocator for the host pages")
      .def("match_tiered", &match_tiered, py::arg("tokens"), py::arg("namespace"),
           py::arg("record_stats") = true)
      .def("insert_extras", &insert_extras)
      .def("take_io", &take_io)
      .def_property_readonly("io_pending", [](PyTree& self) { return !self.tree().io().empty(); })
      .def("resolve_writes", [](PyTree& self, const I64Array& tickets) {
        self.tree().resolve_writes(tickets.data(), tickets.size());
      })
      .def("set_writes_enabled", [](PyTree& self, bool on) { self.tree().set_writes_enabled(on); })
      .def("backup_ahead", [](PyTree& self, int64_t n) { return self.tree().backup_ahead(n); })
      .def("evict_host", [](PyTree& self, int64_t n) { return self.tree().evict_host(n, false, 0); })
      .def("begin_load", [](PyTree& self, py::handle slots, const I64Array& ids, int32_t hslot,
                            int64_t hid) {
        RadixTree& t = self.tree();
        std::vector<int32_t> s = node_slots(t, slots, ids, "start_load");
        check_handle(t, hslot, hid, "start_load");
        std::vector<Page> host = t.begin_load(s.data(), (int64_t)s.size(), hslot);
        return to_array(host.data(), host.size());
      })
      .def("abort_load", [](PyTree& self, py::handle slots, const I64Array& ids, int32_t hslot,
                            int64_t hid) {
        RadixTree& t = self.tree();
        std::vector<int32_t> s = node_slots(t, slots, ids, "start_load");
        check_handle(t, hslot, hid, "start_load");
        t.abort_load(s.data(), (int64_t)s.size(), hslot);
      })
      .def("finish_load", [](PyTree& self, py::handle slots, const I64Array& ids, int32_t hslot,
                             int64_t hid, py::handle gpu, int64_t ticket) {
        RadixTree& t = self.tree();
        std::vector<int32_t> s = node_slots(t, slots, ids, "start_load");
        check_handle(t, hslot, hid, "start_load");
        I32View g(gpu, "pages");
        return t.finish_load(s.data(), (int64_t)s.size(), hslot, g.data, g.n, ticket);
      })
      .def_property_readonly("num_loads", [](PyTree& self) { return self.tree().loads().size(); })
      .def("load_tickets", [](PyTree& self) {
        py::list out;
        for (const Load& ld : self.tree().loads()) out.append(ld.ticket);
        return out;
      })
      .def("retire_loads", [](PyTree& self, const std::vector<bool>& done) {
        self.tree().retire_loads(done);
      })
      .def("claim_loaded", [](PyTree& self, int32_t slot, int64_t id) -> int64_t {
        RadixTree& t = self.tree();
        return t.valid(slot, id) ? t.claim_loaded(slot) : 0;
      })
      .def("host_pages", [](PyTree& self, int32_t slot, int64_t id) {
        const RadixTree& t = self.tree();
        if (!t.valid(slot, id)) return to_array(nullptr, 0);
        const auto& p = t.node(slot).host_pages;
        return to_array(p.data(), p.size());
      })
      .def("tier_state", [](PyTree& self, int32_t slot, int64_t id) -> py::tuple {
        const RadixTree& t = self.tree();
        if (!t.valid(slot, id)) return py::make_tuple(0, 0, false);  // evicted: no transfers
        const Node& n = t.node(slot);
        return py::make_tuple(n.load_seq, n.write_seq, n.load_unused);
      }, "(load_seq, write_seq, load_unused) of a node")
      .def("tier_snapshot", &tier_snapshot)
      .def("node_handles", [](PyTree& self) {  // every non-root node as (slots, ids)
        const RadixTree& t = self.tree();
        std::vector<int32_t> slots = t.live_nodes();
        std::vector<int64_t> ids;
        for (int32_t s : slots) ids.push_back(t.node(s).id);
        return py::make_tuple(to_array(slots.data(), slots.size()), to_i64(ids));
      });
}

}  // namespace radixrt
