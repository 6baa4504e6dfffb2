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
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { work(); });
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

  /// Runs body(i) for i in [0, n) on the pool and the calling thread; returns when all are
  /// done (workers that wake late find no task left; the caller never waits for them).
  /// Calls from several threads are serialised.
  void run(index_t n, const std::function<void(index_t)>& body) {
    if (n <= 0) return;
    if (threads_ == 1 || n == 1) {
      for (index_t i = 0; i < n; ++i) body(i);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mu_);
    auto job = std::make_shared<Job>(&body, n);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      ++generation_;
    }
    wake_.notify_all();
    drain(*job);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return job->done.load(std::memory_order_acquire) == n; });
    job_.reset();
  }

 private:
  /// One run: its own counters, kept alive by every thread that took part.
  struct Job {
    Job(const std::function<void(index_t)>* b, index_t count) : body(b), n(count) {}
    const std::function<void(index_t)>* body;
    index_t n;
    std::atomic<index_t> next{0}, done{0};
  };
  void drain(Job& j) {
    for (index_t i = j.next.fetch_add(1, std::memory_order_relaxed); i < j.n;
         i = j.next.fetch_add(1, std::memory_order_relaxed)) {
      (*j.body)(i);
      if (j.done.fetch_add(1, std::memory_order_acq_rel) + 1 == j.n) {
        std::lock_guard<std::mutex> lock(mu_);
        done_.notify_all();
      }
    }
  }
  void work() {
    std::uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      if (job) drain(*job);
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable wake_, done_;
  std::shared_ptr<Job> job_;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace moeroute
