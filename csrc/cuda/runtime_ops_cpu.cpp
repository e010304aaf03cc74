// runtime_ops.h for builds without CUDA: no devices. The replay buffer rejects CUDA devices in
// such builds before it could reach any other function, so those only guard against misuse.
#include <stdexcept>

#include "runtime_ops.h"

namespace memformer_fast::cuda {
namespace {

[[noreturn]] void unavailable() {
  throw std::logic_error(
      "memformer_fast._C was built without CUDA; rebuild on a machine with CUDA (or with "
      "FORCE_CUDA=1): pip install --no-build-isolation -e .");
}

}  // namespace

bool built_with_cuda() noexcept { return false; }
int device_count() noexcept { return 0; }
int runtime_version() noexcept { return 0; }
int compiled_runtime_version() noexcept { return 0; }
std::vector<int> compiled_archs() { return {}; }

StreamHandle stream_create() { unavailable(); }
void stream_destroy_noexcept(StreamHandle /*stream*/) noexcept {}
void stream_synchronize_noexcept(StreamHandle /*stream*/) noexcept {}

EventHandle event_create() { unavailable(); }
void event_destroy_noexcept(EventHandle /*event*/) noexcept {}
void event_record(EventHandle /*event*/, StreamHandle /*stream*/) { unavailable(); }
void event_synchronize_noexcept(EventHandle /*event*/) noexcept {}
void stream_wait_event(StreamHandle /*stream*/, EventHandle /*event*/) { unavailable(); }

void* host_alloc(std::size_t /*bytes*/) { unavailable(); }
void host_free_noexcept(void* /*ptr*/) noexcept {}

void memcpy_async(void* /*dst*/, const void* /*src*/, std::size_t /*bytes*/,
                  StreamHandle /*stream*/) {
  unavailable();
}

}  // namespace memformer_fast::cuda
