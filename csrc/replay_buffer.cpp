#include "replay_buffer.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <limits>
#include <sstream>
#include <tuple>
#include <utility>

#include "cuda/runtime_ops.h"

namespace memformer_fast {

// Where the states live and how they move. Indices are checked by ReplayBuffer before any call.
class Storage {
 public:
  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  Storage(Storage&&) = delete;
  Storage& operator=(Storage&&) = delete;
  virtual ~Storage() = default;

  virtual void write(int64_t index, const at::Tensor& state) = 0;
  virtual at::Tensor read(int64_t index) = 0;
  virtual void prefetch(int64_t /*index*/) {}
  // Entry `index` was removed: anything cached for it is stale.
  virtual void forget(int64_t /*index*/) {}
  virtual void forget_all() {}
  virtual int64_t device_bytes() const = 0;
  virtual int64_t host_bytes() const = 0;
  // Reads that found their entry neither on the device nor on its way there.
  virtual int64_t fetch_misses() const { return 0; }
};

namespace {

std::string shape_string(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i > 0 ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

at::Device checked_device(const at::Device& device) {
  if (device.is_cpu()) return at::Device(at::kCPU);
  TORCH_CHECK_VALUE(device.is_cuda(), "ReplayBuffer: device must be cpu or cuda, got ", device);
  TORCH_CHECK(cuda::built_with_cuda(), "ReplayBuffer: device ", device,
              " needs CUDA, but memformer_fast._C was built without it; rebuild where CUDA is "
              "present (or with FORCE_CUDA=1): pip install --no-build-isolation -e .");
  const int count = cuda::device_count();
  TORCH_CHECK(count > 0, "ReplayBuffer: device ", device,
              " requested, but no CUDA device is visible");
  const c10::DeviceIndex index =
      device.has_index() ? device.index()
                         : c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getDevice().index();
  TORCH_CHECK_VALUE(index < count, "ReplayBuffer: device ", device, " does not exist (", count,
                    " CUDA devices visible)");
  return {at::kCUDA, index};
}

// Bytes of `capacity` states, checked against int64 overflow.
int64_t checked_total_bytes(int64_t capacity, const std::vector<int64_t>& shape,
                            at::ScalarType dtype) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  int64_t total = static_cast<int64_t>(c10::elementSize(dtype));
  for (const int64_t size : shape) {
    TORCH_CHECK_VALUE(size <= kMax / total, "ReplayBuffer: a state of shape ", shape_string(shape),
                      " is too large");
    total *= size;
  }
  TORCH_CHECK_VALUE(capacity <= kMax / total, "ReplayBuffer: capacity ", capacity,
                    " states of shape ", shape_string(shape), " do not fit in int64 bytes");
  return total * capacity;
}

std::vector<int64_t> stacked_shape(int64_t capacity, const std::vector<int64_t>& shape) {
  std::vector<int64_t> sizes{capacity};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  return sizes;
}

// Page-locked host memory owned by the returned tensor (cudaHostAlloc, exact size: torch's caching
// host allocator would round a large buffer up to a power of two and keep it cached after use).
at::Tensor pinned_empty(at::IntArrayRef sizes, at::ScalarType dtype, int64_t bytes) {
  std::unique_ptr<void, void (*)(void*)> memory(cuda::host_alloc(static_cast<size_t>(bytes)),
                                               cuda::host_free_noexcept);
  at::Tensor tensor = at::from_blob(memory.get(), sizes, cuda::host_free_noexcept,
                                    at::TensorOptions().dtype(dtype).device(at::kCPU));
  (void)memory.release();
  return tensor;
}

cuda::StreamHandle current_stream(const at::Device& device) {
  return c10::impl::VirtualGuardImpl(device.type()).getStream(device).native_handle();
}

// States in host memory, for device cpu (pinned with offload when CUDA is present).
class HostStorage final : public Storage {
 public:
  explicit HostStorage(at::Tensor data) : data_(std::move(data)) {}

  void write(int64_t index, const at::Tensor& state) override {
    data_.select(0, index).copy_(state);
  }
  at::Tensor read(int64_t index) override { return data_.select(0, index).clone(); }
  int64_t device_bytes() const override { return 0; }
  int64_t host_bytes() const override { return static_cast<int64_t>(data_.nbytes()); }

 private:
  at::Tensor data_;
};

// States in device memory. One event marks the buffer's latest access; an access from another
// stream waits for it first, so a read never overtakes the write it needs and a push into a slot
// never overtakes an earlier read of it, whichever streams the caller uses.
class DeviceStorage final : public Storage {
 public:
  explicit DeviceStorage(at::Tensor data) : device_(data.device()), data_(std::move(data)) {}
  ~DeviceStorage() override { last_access_.synchronize_noexcept(); }
  DeviceStorage(const DeviceStorage&) = delete;
  DeviceStorage& operator=(const DeviceStorage&) = delete;
  DeviceStorage(DeviceStorage&&) = delete;
  DeviceStorage& operator=(DeviceStorage&&) = delete;

  void write(int64_t index, const at::Tensor& state) override {
    const c10::DeviceGuard guard(device_);
    const cuda::StreamHandle stream = enter();
    data_.select(0, index).copy_(state);
    last_access_.record(stream);
  }

  at::Tensor read(int64_t index) override {
    const c10::DeviceGuard guard(device_);
    const cuda::StreamHandle stream = enter();
    at::Tensor state = data_.select(0, index).clone();
    last_access_.record(stream);
    return state;
  }

  int64_t device_bytes() const override { return static_cast<int64_t>(data_.nbytes()); }
  int64_t host_bytes() const override { return 0; }

 private:
  cuda::StreamHandle enter() {
    const cuda::StreamHandle stream = current_stream(device_);
    if (stream != last_stream_) last_access_.block(stream);
    last_stream_ = stream;
    return stream;
  }

  at::Device device_;
  at::Tensor data_;
  cuda::Event last_access_;
  cuda::StreamHandle last_stream_ = nullptr;
};

// States in pinned host memory; the device holds kPushSlots + kReadSlots states whatever the
// capacity. Copies between the two run on a dedicated side stream, so they overlap compute:
//   push:  producer stream: wait `drained` (slot free), copy state -> push slot, record `staged`;
//          side stream:     wait `staged`, copy push slot -> host[i], record `drained`.
//   prefetch(i): side stream: wait `consumed` (earlier readers of the read slot are done),
//          copy host[i] -> read slot, record `filled`. Being on the side stream, it also follows
//          the copy that wrote host[i].
//   get(i): consumer stream: wait `filled` and `consumed`, copy read slot -> a new tensor
//          allocated on the consumer stream, record `consumed`. The caller owns that tensor and
//          may use it on its stream with no further synchronisation; nothing ever writes to it.
class OffloadStorage final : public Storage {
 public:
  OffloadStorage(at::Tensor host, const std::vector<int64_t>& shape, const at::Device& device)
      : device_(device),
        host_(std::move(host)),
        state_bytes_(static_cast<int64_t>(host_.nbytes()) / host_.size(0)) {
    const auto options = at::TensorOptions().dtype(host_.scalar_type()).device(device);
    for (auto& slot : pushes_) slot.data = at::empty(shape, options);
    for (auto& slot : reads_) slot.data = at::empty(shape, options);
  }

  // The copies in flight read or write host_ and the staging slots: finish them before either
  // is released.
  ~OffloadStorage() override {
    cuda::stream_synchronize_noexcept(side_.handle());
    for (const auto& slot : reads_) slot.consumed.synchronize_noexcept();
  }
  OffloadStorage(const OffloadStorage&) = delete;
  OffloadStorage& operator=(const OffloadStorage&) = delete;
  OffloadStorage(OffloadStorage&&) = delete;
  OffloadStorage& operator=(OffloadStorage&&) = delete;

  void write(int64_t index, const at::Tensor& state) override {
    const c10::DeviceGuard guard(device_);
    forget(index);
    const cuda::StreamHandle producer = current_stream(device_);
    PushSlot& slot = pushes_[next_push_];
    slot.drained.block(producer);
    slot.data.copy_(state);
    slot.staged.record(producer);
    slot.staged.block(side_.handle());
    cuda::memcpy_async(host_entry(index), slot.data.const_data_ptr(), state_bytes_, side_.handle());
    slot.drained.record(side_.handle());
    next_push_ = (next_push_ + 1) % kPushSlots;
  }

  at::Tensor read(int64_t index) override {
    const c10::DeviceGuard guard(device_);
    ReadSlot* slot = holding(index);
    if (slot == nullptr) {
      ++fetch_misses_;
      slot = &fetch(index);
    }
    const cuda::StreamHandle consumer = current_stream(device_);
    slot->filled.block(consumer);
    slot->consumed.block(consumer);  // so that `consumed` covers readers on other streams too
    at::Tensor state = at::empty_like(slot->data);
    cuda::memcpy_async(state.mutable_data_ptr(), slot->data.const_data_ptr(), state_bytes_,
                       consumer);
    slot->consumed.record(consumer);
    slot->read = true;
    slot->last_use = ++clock_;
    return state;
  }

  void prefetch(int64_t index) override {
    const c10::DeviceGuard guard(device_);
    if (holding(index) == nullptr) (void)fetch(index);
  }

  void forget(int64_t index) override {
    for (auto& slot : reads_) {
      if (slot.index == index) slot.index = kNone;
    }
  }

  void forget_all() override {
    for (auto& slot : reads_) slot.index = kNone;
  }

  int64_t device_bytes() const override { return (kPushSlots + kReadSlots) * state_bytes_; }
  int64_t host_bytes() const override { return static_cast<int64_t>(host_.nbytes()); }
  int64_t fetch_misses() const override { return fetch_misses_; }

 private:
  static constexpr int64_t kPushSlots = 2;  // a push waits only if the side stream is 2 behind
  static constexpr int64_t kReadSlots = 2;  // the entry being read and the one prefetched next
  static constexpr int64_t kNone = -1;

  struct PushSlot {
    at::Tensor data;
    cuda::Event staged;   // the producer has copied the state into `data`
    cuda::Event drained;  // the side stream has copied `data` to the host
  };
  struct ReadSlot {
    at::Tensor data;
    int64_t index = kNone;  // the entry held (or on its way)
    bool read = false;      // read since it was filled
    uint64_t last_use = 0;  // when it was last filled or read
    cuda::Event filled;    // the side stream has copied the entry into `data`
    cuda::Event consumed;  // every reader so far has copied `data` out
  };

  void* host_entry(int64_t index) const {
    return static_cast<char*>(host_.data_ptr()) + index * state_bytes_;
  }

  ReadSlot* holding(int64_t index) {
    for (auto& slot : reads_) {
      if (slot.index == index) return &slot;
    }
    return nullptr;
  }

  // Starts copying entry `index` into a read slot. The victim is a free slot if any, else the
  // slot read longest ago, and only then the oldest prefetch not read yet: MRBP prefetches t - 1
  // while t, prefetched a step earlier, is still unread; evicting t would make every read a miss.
  ReadSlot& fetch(int64_t index) {
    const auto rank = [](const ReadSlot& slot) {
      return std::make_tuple(slot.index != kNone, !slot.read, slot.last_use);
    };
    ReadSlot& victim = *std::min_element(
        reads_.begin(), reads_.end(),
        [&](const ReadSlot& a, const ReadSlot& b) { return rank(a) < rank(b); });
    victim.index = kNone;
    victim.consumed.block(side_.handle());
    cuda::memcpy_async(victim.data.mutable_data_ptr(), host_entry(index), state_bytes_,
                       side_.handle());
    victim.filled.record(side_.handle());
    victim.index = index;
    victim.read = false;
    victim.last_use = ++clock_;
    return victim;
  }

  at::Device device_;
  at::Tensor host_;
  int64_t state_bytes_;
  cuda::Stream side_;
  std::array<PushSlot, kPushSlots> pushes_;
  std::array<ReadSlot, kReadSlots> reads_;
  int64_t next_push_ = 0;
  uint64_t clock_ = 0;
  int64_t fetch_misses_ = 0;
};

std::unique_ptr<Storage> make_storage(int64_t capacity, const std::vector<int64_t>& shape,
                                      at::ScalarType dtype, const at::Device& device,
                                      bool offload) {
  const int64_t bytes = checked_total_bytes(capacity, shape, dtype);
  const std::vector<int64_t> sizes = stacked_shape(capacity, shape);
  if (device.is_cpu()) {
    // Pinning pays only when a device may copy from it; without CUDA there is none.
    const bool pin = offload && cuda::device_count() > 0;
    return std::make_unique<HostStorage>(pin ? pinned_empty(sizes, dtype, bytes)
                                             : at::empty(sizes, at::TensorOptions().dtype(dtype)));
  }
  // Events, the side stream and the staging slots belong to the buffer's device.
  const c10::DeviceGuard guard(device);
  if (!offload) {
    return std::make_unique<DeviceStorage>(
        at::empty(sizes, at::TensorOptions().dtype(dtype).device(device)));
  }
  return std::make_unique<OffloadStorage>(pinned_empty(sizes, dtype, bytes), shape, device);
}

}  // namespace

ReplayBuffer::ReplayBuffer(int64_t capacity, std::vector<int64_t> shape, at::ScalarType dtype,
                           at::Device device, bool offload)
    : capacity_(capacity),
      shape_(std::move(shape)),
      dtype_(dtype),
      device_(checked_device(device)),
      offload_(offload) {
  TORCH_CHECK_VALUE(capacity_ > 0, "ReplayBuffer: capacity must be positive, got ", capacity_);
  for (const int64_t size : shape_) {
    TORCH_CHECK_VALUE(size > 0, "ReplayBuffer: shape must have positive sizes, got ",
                      shape_string(shape_));
  }
  storage_ = make_storage(capacity_, shape_, dtype_, device_, offload_);
  seeds_.assign(static_cast<size_t>(capacity_), 0);
}

ReplayBuffer::~ReplayBuffer() = default;

void ReplayBuffer::check_index(const char* method, int64_t index) const {
  TORCH_CHECK_INDEX(index >= 0 && index < size_, "ReplayBuffer.", method, ": index ", index,
                    " is out of range [0, ", size_, ")",
                    cleared_ && size_ == 0 ? " (the buffer was cleared)" : "");
}

void ReplayBuffer::check_state(const at::Tensor& state) const {
  TORCH_CHECK_TYPE(state.defined(), "ReplayBuffer.push: state is an undefined tensor");
  TORCH_CHECK_TYPE(state.layout() == at::kStrided,
                   "ReplayBuffer.push: state must be a dense (strided) tensor, got layout ",
                   state.layout());
  TORCH_CHECK_TYPE(state.scalar_type() == dtype_, "ReplayBuffer.push: state has dtype ",
                   state.scalar_type(), ", expected ", dtype_);
  TORCH_CHECK_VALUE(state.device() == device_, "ReplayBuffer.push: state is on ", state.device(),
                    ", expected ", device_);
  TORCH_CHECK_VALUE(state.sizes() == at::IntArrayRef(shape_), "ReplayBuffer.push: state has shape ",
                    shape_string(state.sizes()), ", expected ", shape_string(shape_));
}

int64_t ReplayBuffer::push(const at::Tensor& state, int64_t rng_seed) {
  check_state(state);
  TORCH_CHECK_INDEX(size_ < capacity_, "ReplayBuffer.push: the buffer is full (capacity ",
                    capacity_, ")");
  const c10::NoGradGuard no_grad;  // a state that requires grad must not pull storage into a graph
  storage_->write(size_, state);
  seeds_[static_cast<size_t>(size_)] = rng_seed;
  cleared_ = false;
  return size_++;
}

at::Tensor ReplayBuffer::get(int64_t index) {
  check_index("get", index);
  const c10::NoGradGuard no_grad;
  return storage_->read(index);
}

int64_t ReplayBuffer::rng_seed(int64_t index) const {
  check_index("rng_seed", index);
  return seeds_[static_cast<size_t>(index)];
}

void ReplayBuffer::prefetch(int64_t index) {
  check_index("prefetch", index);
  storage_->prefetch(index);
}

at::Tensor ReplayBuffer::pop() {
  TORCH_CHECK_INDEX(size_ > 0, "ReplayBuffer.pop: the buffer is empty",
                    cleared_ ? " (it was cleared)" : "");
  const c10::NoGradGuard no_grad;
  at::Tensor state = storage_->read(size_ - 1);
  storage_->forget(--size_);
  return state;
}

void ReplayBuffer::clear() {
  size_ = 0;
  cleared_ = true;
  storage_->forget_all();
}

int64_t ReplayBuffer::fetch_misses() const { return storage_->fetch_misses(); }

int64_t ReplayBuffer::nbytes(const std::string& where) const {
  if (where == "device") return storage_->device_bytes();
  TORCH_CHECK_VALUE(where == "host", "ReplayBuffer.nbytes: where must be 'device' or 'host', got '",
                    where, "'");
  return storage_->host_bytes();
}

}  // namespace memformer_fast
