// The few CUDA runtime calls the replay buffer makes, behind a header that names no CUDA type.
//
// runtime_ops.cu implements them with cuda_runtime.h alone (raw pointers, streams and events as
// opaque handles, no torch headers), so `nvcc -c` compiles it even where torch is a CPU build;
// runtime_ops_cpu.cpp is the implementation linked into builds without CUDA. Every function
// acts on the current CUDA device: callers set it (replay_buffer.cpp holds a c10::DeviceGuard).
// Failures throw std::runtime_error naming the call; the *_noexcept cleanups ignore them.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

namespace memformer_fast::cuda {

using StreamHandle = void*;  // cudaStream_t
using EventHandle = void*;   // cudaEvent_t

// Build and runtime facts, for build_info() and for rejecting CUDA buffers in CPU builds.
bool built_with_cuda() noexcept;
int device_count() noexcept;                  // 0 without a driver or device
int runtime_version() noexcept;               // cudaRuntimeGetVersion, 0 when unknown
int compiled_runtime_version() noexcept;      // CUDART_VERSION the sources were compiled with
std::vector<int> compiled_archs();            // __CUDA_ARCH_LIST__, e.g. {800, 900}

StreamHandle stream_create();  // non-blocking: never serialises with the legacy default stream
void stream_destroy_noexcept(StreamHandle stream) noexcept;
void stream_synchronize_noexcept(StreamHandle stream) noexcept;

EventHandle event_create();  // timing disabled: the cheapest event to record and wait on
void event_destroy_noexcept(EventHandle event) noexcept;
void event_record(EventHandle event, StreamHandle stream);
void event_synchronize_noexcept(EventHandle event) noexcept;
// Later work on `stream` waits for the last record of `event`; a never-recorded event is done.
void stream_wait_event(StreamHandle stream, EventHandle event);

void* host_alloc(std::size_t bytes);  // page-locked and portable across devices
void host_free_noexcept(void* ptr) noexcept;

// Asynchronous copy on `stream`; the direction follows from unified addressing.
void memcpy_async(void* dst, const void* src, std::size_t bytes, StreamHandle stream);

// Owns a CUDA event of the current device (move-only).
class Event {
 public:
  Event() : handle_(event_create()) {}
  ~Event() {
    if (handle_ != nullptr) event_destroy_noexcept(handle_);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  Event(Event&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Event& operator=(Event&& other) noexcept {
    std::swap(handle_, other.handle_);
    return *this;
  }

  void record(StreamHandle stream) { event_record(handle_, stream); }
  void block(StreamHandle stream) const { stream_wait_event(stream, handle_); }
  void synchronize_noexcept() const noexcept { event_synchronize_noexcept(handle_); }

 private:
  EventHandle handle_;
};

// Owns a dedicated non-blocking stream of the current device (move-only).
class Stream {
 public:
  Stream() : handle_(stream_create()) {}
  ~Stream() {
    if (handle_ != nullptr) stream_destroy_noexcept(handle_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  Stream(Stream&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Stream& operator=(Stream&& other) noexcept {
    std::swap(handle_, other.handle_);
    return *this;
  }

  StreamHandle handle() const noexcept { return handle_; }

 private:
  StreamHandle handle_;
};

}  // namespace memformer_fast::cuda
