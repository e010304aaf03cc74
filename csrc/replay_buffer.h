// The MRBP replay buffer (docs/design.md, "Memory Replay Back-Propagation"): preallocated
// storage for `capacity` states of one shape and dtype, each with the integer seed that
// recreates its segment's randomness.
//
// ReplayBuffer validates arguments and keeps the bookkeeping (size, seeds); a Storage decides
// where states live and how they move: host memory (cpu), device memory (cuda), or pinned host
// memory with a small device staging area and a side stream (cuda with offload).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace memformer_fast {

class Storage;

class ReplayBuffer {
 public:
  ReplayBuffer(int64_t capacity, std::vector<int64_t> shape, at::ScalarType dtype,
               at::Device device, bool offload);
  ~ReplayBuffer();
  ReplayBuffer(const ReplayBuffer&) = delete;
  ReplayBuffer& operator=(const ReplayBuffer&) = delete;
  ReplayBuffer(ReplayBuffer&&) = delete;
  ReplayBuffer& operator=(ReplayBuffer&&) = delete;

  // Copies `state` into the next entry and returns its index; a failed push changes nothing.
  int64_t push(const at::Tensor& state, int64_t rng_seed);
  // A new tensor on device() holding entry `index`, ready for the caller's current stream.
  at::Tensor get(int64_t index);
  int64_t rng_seed(int64_t index) const;
  // Starts bringing entry `index` to the device (offload only; checks the index otherwise).
  void prefetch(int64_t index);
  // Removes the last entry and returns it as get() would.
  at::Tensor pop();
  void clear();
  int64_t size() const noexcept { return size_; }
  // Bytes the buffer holds in device or host memory (`where` is "device" or "host").
  int64_t nbytes(const std::string& where) const;
  // Offload: reads whose entry was neither prefetched nor cached, so they waited for a copy.
  int64_t fetch_misses() const;

  int64_t capacity() const noexcept { return capacity_; }
  const std::vector<int64_t>& shape() const noexcept { return shape_; }
  at::ScalarType dtype() const noexcept { return dtype_; }
  at::Device device() const noexcept { return device_; }
  bool offload() const noexcept { return offload_; }

 private:
  void check_index(const char* method, int64_t index) const;
  void check_state(const at::Tensor& state) const;

  int64_t capacity_;
  std::vector<int64_t> shape_;
  at::ScalarType dtype_;
  at::Device device_;
  bool offload_;
  std::unique_ptr<Storage> storage_;
  std::vector<int64_t> seeds_;
  int64_t size_ = 0;
  bool cleared_ = false;  // for the error message of an index used after clear()
};

}  // namespace memformer_fast
