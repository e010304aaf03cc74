// CUDA runtime calls of the replay buffer: cuda_runtime.h only, no torch headers (see
// runtime_ops.h), so CI compiles this file with `nvcc -c` on a machine whose torch is CPU-only.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "runtime_ops.h"

namespace memformer_fast::cuda {
namespace {

cudaStream_t as_stream(StreamHandle stream) { return static_cast<cudaStream_t>(stream); }
cudaEvent_t as_event(EventHandle event) { return static_cast<cudaEvent_t>(event); }

void check(cudaError_t status, const char* call) {
  if (status == cudaSuccess) return;
  // Clear the thread's last error too, or torch's next launch check would report ours as its own.
  (void)cudaGetLastError();
  throw std::runtime_error(std::string("memformer_fast: ") + call + " failed: " +
                           cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

void ignore(cudaError_t status) noexcept {
  if (status != cudaSuccess) (void)cudaGetLastError();
}

}  // namespace

bool built_with_cuda() noexcept { return true; }

int device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

int runtime_version() noexcept {
  int version = 0;
  ignore(cudaRuntimeGetVersion(&version));
  return version;
}

int compiled_runtime_version() noexcept { return CUDART_VERSION; }

std::vector<int> compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

StreamHandle stream_create() {
  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  return stream;
}

void stream_destroy_noexcept(StreamHandle stream) noexcept {
  ignore(cudaStreamDestroy(as_stream(stream)));
}

void stream_synchronize_noexcept(StreamHandle stream) noexcept {
  ignore(cudaStreamSynchronize(as_stream(stream)));
}

EventHandle event_create() {
  cudaEvent_t event = nullptr;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  return event;
}

void event_destroy_noexcept(EventHandle event) noexcept {
  ignore(cudaEventDestroy(as_event(event)));
}

void event_record(EventHandle event, StreamHandle stream) {
  check(cudaEventRecord(as_event(event), as_stream(stream)), "cudaEventRecord");
}

void event_synchronize_noexcept(EventHandle event) noexcept {
  ignore(cudaEventSynchronize(as_event(event)));
}

void stream_wait_event(StreamHandle stream, EventHandle event) {
  check(cudaStreamWaitEvent(as_stream(stream), as_event(event), 0), "cudaStreamWaitEvent");
}

void* host_alloc(std::size_t bytes) {
  void* ptr = nullptr;
  check(cudaHostAlloc(&ptr, bytes, cudaHostAllocPortable), "cudaHostAlloc");
  return ptr;
}

void host_free_noexcept(void* ptr) noexcept { ignore(cudaFreeHost(ptr)); }

void memcpy_async(void* dst, const void* src, std::size_t bytes, StreamHandle stream) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, as_stream(stream)), "cudaMemcpyAsync");
}

}  // namespace memformer_fast::cuda
