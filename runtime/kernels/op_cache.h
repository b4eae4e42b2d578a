// A cache of prepacked XNNPACK operators (or other per-weight prepacked data:
// log_linear keeps its transposed integer weights here).
//
// Creating an XNNPACK fully-connected operator packs (copies and reorders) its
// weights, which costs about as much as several runs. A program's weights are
// constant, so each operator is created on the first call and reused.
//
// The key is the weight's data pointer AND a checksum of the weight, scale,
// zero-point and bias contents: when a program is unloaded and another one
// loaded, its constants can land at the same address, and a pointer-only key
// would silently reuse the old program's packed weights. The checksum hashes
// the small per-channel tensors completely and the weight tensor sampled
// (common.h: hash_sampled), so a lookup costs O(N + 4k) bytes, not O(N*K).
//
// Thread safety: lookups and creation hold the cache's mutex. An XNNPACK
// operator keeps the pointers of its last reshape/setup inside itself, so two
// threads must not run one operator at the same time: each entry carries its
// own mutex, held from reshape to run. Entries are shared_ptrs, so evicting an
// entry another thread is still running is safe. At most `capacity` entries
// are kept (least recently used evicted): stale entries of unloaded programs
// do not pile up.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <utility>

#include "xnnpack_api.h"

namespace vitq {

// Owns one xnn_operator_t.
class XnnOperator {
 public:
  XnnOperator() = default;
  XnnOperator(const XnnOperator&) = delete;
  XnnOperator& operator=(const XnnOperator&) = delete;
  ~XnnOperator() {
    if (op_ != nullptr) xnn_delete_operator(op_);
  }
  xnn_operator_t get() const { return op_; }
  xnn_operator_t* out() { return &op_; }  // for xnn_create_*

 private:
  xnn_operator_t op_ = nullptr;
};

struct OperatorKey {
  const void* weight = nullptr;
  uint64_t checksum = 0;
  bool operator==(const OperatorKey& o) const {
    return weight == o.weight && checksum == o.checksum;
  }
};

template <class Entry>
class OperatorCache {
 public:
  explicit OperatorCache(size_t capacity) : capacity_(capacity) {}

  // The entry for `key`, created by make() (returning std::shared_ptr<Entry>,
  // null on failure) when missing. Null if make() failed.
  template <class Make>
  std::shared_ptr<Entry> get_or_create(const OperatorKey& key, Make&& make) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->first == key) {
        entries_.splice(entries_.begin(), entries_, it);  // most recent first
        return entries_.front().second;
      }
    }
    std::shared_ptr<Entry> entry = make();
    if (!entry) return nullptr;
    entries_.emplace_front(key, entry);
    while (entries_.size() > capacity_) entries_.pop_back();
    return entry;
  }

 private:
  const size_t capacity_;
  std::mutex mutex_;
  std::list<std::pair<OperatorKey, std::shared_ptr<Entry>>> entries_;
};

}  // namespace vitq
