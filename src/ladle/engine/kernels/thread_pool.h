// The one way the kernels split work across threads.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace ladle_kernels {

// A non-owning reference to a callable (the kernels pass lambdas down without allocating).
template <class Fn>
class FunctionRef;

template <class R, class... Args>
class FunctionRef<R(Args...)> {
 public:
  template <class Callable>
    requires(!std::is_same_v<std::remove_cvref_t<Callable>, FunctionRef>)
  FunctionRef(Callable&& fn)  // NOLINT: implicit, as std::function_ref
      : object_(const_cast<void*>(static_cast<const void*>(&fn))),
        call_([](void* object, Args... args) -> R {
          return (*static_cast<std::remove_reference_t<Callable>*>(object))(
              std::forward<Args>(args)...);
        }) {}

  R operator()(Args... args) const { return call_(object_, std::forward<Args>(args)...); }

 private:
  void* object_;
  R (*call_)(void*, Args...);
};

// The calling thread's thread count for kernels (itself included; 1 runs everything inline),
// as torch's OpenMP count is per thread; a thread that never set one takes the last set.
void set_num_threads(int n);
int num_threads();

// fn(first, last) over [0, num_items) in contiguous chunks, on the calling thread and the
// pool's workers, or inline when `work` (about the multiply-adds) is too small to pay for
// waking them. Chunks are claimed as threads come free, so a worker that the OS has not
// scheduled (another process holds its core) delays nothing: the others take its share.
void parallel_items(int64_t num_items, int64_t work, FunctionRef<void(int64_t, int64_t)> fn);

}  // namespace ladle_kernels
