// moeroute — the CPU backend's parallel-for: a small std::thread pool, or the caller's own.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../../core.hpp"

namespace moeroute {

/// A user-supplied parallel-for: run `body(i)` for every i in [0, n), in any order and on any
/// threads, and return when all have finished. Lets the CPU backend run on an engine's own
/// thread pool (no oversubscription). The bodies never throw.
using ParallelFor = std::function<void(index_t n, const std::function<void(index_t)>& body)>;

/// A fixed pool of `threads - 1` workers plus the calling thread. Tasks are handed out through
/// one atomic counter, so which thread runs a task varies; the CPU backend makes its results
/// independent of that (fixed token chunks, reductions in chunk order).
class ThreadPool {
 public:
  /// `threads` >= 1 threads in all (the caller counts as one).
  explicit ThreadPool(int threads) : threads_(std::max(threads, 1)) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, i] { work(i); });
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  [[nodiscard]] int threads() const noexcept { return threads_; }

  /// The calling thread's slot in this pool, in [0, threads()): i for worker i, 0 for any
  /// thread that is not one of its workers (such as the caller of run()). Within one run the
  /// slots of the threads taking part are distinct, so a body can index per-thread workspace
  /// sized once, instead of thread-local storage that each worker would size on its first
  /// task (an allocation at an arbitrary step). Runs that execute inline (n == 1 or one
  /// thread) are not serialised with others: their slot 0 is distinct only within the run.
  [[nodiscard]] int slot() const noexcept { return current().pool == this ? current().slot : 0; }

  /// Runs body(i) for i in [0, n) on the pool and the calling thread; returns when all are
  /// done and every worker that joined has left (workers that wake later find the job
  /// closed). Allocates nothing. Calls from several threads are serialised. If a body throws
  /// on the calling thread, no further task starts, run waits for the tasks the workers hold
  /// and rethrows; a body that throws on a worker terminates the program (std::thread).
  void run(index_t n, const std::function<void(index_t)>& body) {
    if (n <= 0) return;
    if (threads_ == 1 || n == 1) {
      for (index_t i = 0; i < n; ++i) body(i);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_.body = &body;
      job_.n = n;
      job_.next.store(0, std::memory_order_relaxed);
      job_.done.store(0, std::memory_order_relaxed);
      open_ = true;
      ++generation_;
    }
    wake_.notify_all();
    try {
      drain();
    } catch (...) {
      job_.next.store(n, std::memory_order_relaxed);  // hand out no further task
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [&] { return inside_ == 0; });
      open_ = false;
      throw;
    }
    std::unique_lock<std::mutex> lock(mu_);
    // no worker may still be reading the job when the next run rewrites it
    done_.wait(lock, [&] { return job_.done.load(std::memory_order_acquire) == n && inside_ == 0; });
    open_ = false;
  }

 private:
  /// The current run; its fields are written under mu_ before workers join (under mu_).
  struct Job {
    const std::function<void(index_t)>* body = nullptr;
    index_t n = 0;
    std::atomic<index_t> next{0}, done{0};
  };
  struct Slot {
    const ThreadPool* pool = nullptr;
    int slot = 0;
  };
  static Slot& current() noexcept {
    thread_local Slot s;
    return s;
  }
  void drain() {
    for (index_t i = job_.next.fetch_add(1, std::memory_order_relaxed); i < job_.n;
         i = job_.next.fetch_add(1, std::memory_order_relaxed)) {
      (*job_.body)(i);
      if (job_.done.fetch_add(1, std::memory_order_acq_rel) + 1 == job_.n) {
        std::lock_guard<std::mutex> lock(mu_);
        done_.notify_all();
      }
    }
  }
  void work(int slot) {
    current() = Slot{this, slot};
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (!open_) continue;  // woke after its run ended
        ++inside_;
      }
      drain();
      {
        std::lock_guard<std::mutex> lock(mu_);
        --inside_;
      }
      done_.notify_all();
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable wake_, done_;
  Job job_;
  bool open_ = false;  ///< workers may join job_ (under mu_)
  int inside_ = 0;     ///< workers inside drain() (under mu_)
  std::uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace moeroute
