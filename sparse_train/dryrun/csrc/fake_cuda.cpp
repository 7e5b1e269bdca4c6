// A CUDA device for a CPU-only PyTorch build, as far as fake tensors need one.
//
// Under FakeTensorMode no kernel runs and no memory is allocated, but autograd's engine, device
// guards and copies still ask the CUDA device guard and the CUDA hooks about the device (its
// count, the current index, whether CUDA exists). A CPU build registers neither, so a backward
// pass over fake CUDA tensors aborts and a CPU->CUDA copy is refused. This library registers a
// guard that only tracks indices (c10's FakeGuardImpl) and hooks that report `count` devices.
// It must never be loaded into a process that trains: sparse_train loads it only for
// `sparse-train dry-run`, which runs on fake tensors throughout.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

#include <cstdlib>

namespace {

constexpr c10::DeviceIndex kDefaultDevices = 8;

c10::DeviceIndex device_count() {
  // SPARSE_TRAIN_FAKE_CUDA_DEVICES: the devices a node of the planned run has
  const char* value = std::getenv("SPARSE_TRAIN_FAKE_CUDA_DEVICES");
  return value ? static_cast<c10::DeviceIndex>(std::atoi(value)) : kDefaultDevices;
}

struct FakeCUDAHooks : at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return device_count(); }
  int getNumGPUs() const override { return device_count(); }
  c10::DeviceIndex current_device() const override { return 0; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  void setCurrentDevice(c10::DeviceIndex) const override {}
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex) const override { return 0; }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex) const override { return 0; }
};

}  // namespace

C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);

namespace at {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", FakeCUDAHooks);
}  // namespace at

// A symbol to look up: proves the library is the one loaded (see fake_cuda.py).
extern "C" int sparse_train_fake_cuda_devices() { return device_count(); }
