// train_moe — the byte-level corpus: text of several domains, a held-out split, batches of
// (context bytes, next byte, domain) drawn with a fixed seed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace train_moe {

/// One domain of text (e.g. license prose, C headers, CMake scripts).
struct Domain {
  std::string name;
  std::string text;
  std::size_t files = 0;
};

/// A batch of next-byte prediction examples: for token i, `context[i * n + c]` is the byte
/// c + 1 places before the target (c = 0 is the previous byte), `target[i]` the byte to
/// predict and `domain[i]` the index of its domain.
struct Batch {
  int context_length = 0;
  std::vector<std::uint8_t> context;
  std::vector<std::uint8_t> target;
  std::vector<int> domain;
  [[nodiscard]] int size() const { return int(target.size()); }
};

/// Text of several domains, each split into a training part (the first 90 % of its bytes)
/// and a held-out part (the rest).
class Corpus {
 public:
  Corpus() = default;
  /// Builds a corpus from domains already in memory. Domains shorter than 64 bytes are an error.
  Corpus(std::vector<Domain> domains, double held_out_fraction = 0.1) : domains_(std::move(domains)) {
    if (domains_.empty()) throw std::invalid_argument("corpus: no domain has any text");
    for (const Domain& d : domains_) {
      if (d.text.size() < 64)
        throw std::invalid_argument("corpus: domain '" + d.name + "' has only " + std::to_string(d.text.size()) +
                                    " bytes (need >= 64)");
      split_.push_back(std::size_t(double(d.text.size()) * (1.0 - held_out_fraction)));
    }
  }

  [[nodiscard]] const std::vector<Domain>& domains() const { return domains_; }
  [[nodiscard]] int num_domains() const { return int(domains_.size()); }
  [[nodiscard]] std::size_t train_bytes(int d) const { return split_[std::size_t(d)]; }
  [[nodiscard]] std::size_t held_out_bytes(int d) const {
    return domains_[std::size_t(d)].text.size() - split_[std::size_t(d)];
  }

  /// A training batch of `tokens` examples: token i comes from domain i mod D (so every batch
  /// holds the domains in equal shares) at a uniformly random position of its training part.
  Batch train_batch(int tokens, int context_length, std::mt19937_64& rng) const {
    Batch b = empty_batch(tokens, context_length);
    for (int i = 0; i < tokens; ++i) {
      const int d = i % num_domains();
      std::uniform_int_distribution<std::size_t> pos(std::size_t(context_length), split_[std::size_t(d)] - 1);
      fill(b, i, d, pos(rng));
    }
    return b;
  }

  /// The held-out examples used for evaluation: `per_domain` evenly spaced positions of each
  /// domain's held-out part (fewer if the part is shorter), interleaved by domain.
  Batch held_out(int per_domain, int context_length) const {
    std::vector<std::pair<int, std::size_t>> picks;
    std::vector<std::vector<std::size_t>> positions(domains_.size());
    for (int d = 0; d < num_domains(); ++d) {
      const std::size_t lo = split_[std::size_t(d)] + std::size_t(context_length);
      const std::size_t hi = domains_[std::size_t(d)].text.size() - 1;  // last target index
      if (hi <= lo) continue;
      const std::size_t n = std::min<std::size_t>(std::size_t(per_domain), hi - lo);
      for (std::size_t j = 0; j < n; ++j) positions[std::size_t(d)].push_back(lo + (hi - lo) * j / n);
    }
    for (std::size_t j = 0;; ++j) {
      bool any = false;
      for (int d = 0; d < num_domains(); ++d)
        if (j < positions[std::size_t(d)].size()) picks.emplace_back(d, positions[std::size_t(d)][j]), any = true;
      if (!any) break;
    }
    Batch b = empty_batch(int(picks.size()), context_length);
    for (std::size_t i = 0; i < picks.size(); ++i) fill(b, int(i), picks[i].first, picks[i].second);
    return b;
  }

 private:
  static Batch empty_batch(int tokens, int n) {
    Batch b;
    b.context_length = n;
    b.context.resize(std::size_t(tokens) * std::size_t(n));
    b.target.resize(std::size_t(tokens));
    b.domain.resize(std::size_t(tokens));
    return b;
  }
  // Example i predicts text[pos] of domain d from the n bytes before it.
  void fill(Batch& b, int i, int d, std::size_t pos) const {
    const std::string& s = domains_[std::size_t(d)].text;
    const int n = b.context_length;
    for (int c = 0; c < n; ++c)
      b.context[std::size_t(i) * std::size_t(n) + std::size_t(c)] = std::uint8_t(s[pos - 1 - std::size_t(c)]);
    b.target[std::size_t(i)] = std::uint8_t(s[pos]);
    b.domain[std::size_t(i)] = d;
  }

  std::vector<Domain> domains_;
  std::vector<std::size_t> split_;
};

namespace detail {
inline std::string read_prefix(const std::filesystem::path& p, std::size_t max_bytes) {
  std::ifstream f(p, std::ios::binary);
  if (!f) return {};
  std::string s(max_bytes, '\0');
  f.read(s.data(), std::streamsize(max_bytes));
  s.resize(std::size_t(f.gcount()));
  return s;
}

// Regular files of `dir` (not recursing) whose names end with `suffix` (empty: any), sorted
// by name, with symbolic links to files already listed removed.
inline std::vector<std::filesystem::path> list_files(const std::filesystem::path& dir, const std::string& suffix) {
  namespace fs = std::filesystem;
  std::vector<fs::path> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file(ec)) continue;  // follows symlinks
    if (!suffix.empty() &&
        (name.size() < suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0))
      continue;
    out.push_back(entry.path());
  }
  std::sort(out.begin(), out.end());
  std::set<fs::path> seen;
  std::vector<fs::path> unique;
  for (const auto& p : out)
    if (seen.insert(fs::weakly_canonical(p, ec)).second) unique.push_back(p);
  return unique;
}

// Concatenates up to `per_file` bytes of each file, in order, until `budget` bytes.
inline Domain gather(const std::string& name, const std::vector<std::filesystem::path>& files, std::size_t budget,
                     std::size_t per_file) {
  Domain d{name, {}, 0};
  for (const auto& p : files) {
    if (d.text.size() >= budget) break;
    std::string s = read_prefix(p, std::min(per_file, budget - d.text.size()));
    if (s.empty()) continue;
    if (s.find('\0') != std::string::npos) continue;  // not text
    d.text += s;
    d.text += '\n';
    ++d.files;
  }
  return d;
}
}  // namespace detail

/// Where the default corpus comes from: text every Debian machine that can build this project
/// has. "prose": the license texts of base-files (/usr/share/common-licenses); "c": the C
/// library headers (/usr/include/*.h, from libc6-dev, which the compiler pulls in); "cmake": the
/// modules shipped with CMake (/usr/share/cmake-*/Modules/*.cmake). Files are read in name
/// order, at most `per_file` bytes of each, until `budget` bytes per domain. A domain that is
/// missing on this machine is skipped with a note in `notes`.
inline Corpus system_corpus(std::size_t budget, std::vector<std::string>& notes, std::size_t per_file = 12000) {
  namespace fs = std::filesystem;
  std::vector<Domain> ds;
  auto add = [&](Domain d, const std::string& where) {
    if (d.text.size() < 4096) {
      notes.push_back("domain '" + d.name + "' skipped: " + where + " has too little text (" +
                      std::to_string(d.text.size()) + " bytes)");
      return;
    }
    notes.push_back("domain '" + d.name + "': " + std::to_string(d.text.size()) + " bytes from " +
                    std::to_string(d.files) + " files in " + where);
    ds.push_back(std::move(d));
  };
  add(detail::gather("prose", detail::list_files("/usr/share/common-licenses", ""), budget, per_file),
      "/usr/share/common-licenses");
  add(detail::gather("c", detail::list_files("/usr/include", ".h"), budget, per_file), "/usr/include");
  // the newest CMake data directory (cmake-3.25, ...)
  std::vector<fs::path> cmake_dirs;
  std::error_code ec;
  if (fs::is_directory("/usr/share", ec))
    for (const auto& e : fs::directory_iterator("/usr/share", ec))
      if (e.path().filename().string().rfind("cmake-", 0) == 0) cmake_dirs.push_back(e.path() / "Modules");
  std::sort(cmake_dirs.begin(), cmake_dirs.end());
  std::vector<fs::path> cmake_files;
  if (!cmake_dirs.empty()) cmake_files = detail::list_files(cmake_dirs.back(), ".cmake");
  add(detail::gather("cmake", cmake_files, budget, per_file),
      cmake_dirs.empty() ? std::string("/usr/share/cmake-*/Modules") : cmake_dirs.back().string());
  if (ds.empty()) throw std::runtime_error("no training text found on this machine; pass --data DIR");
  return Corpus(std::move(ds));
}

/// A corpus from a directory: each subdirectory is a domain (its files read recursively in name
/// order), or, without subdirectories, each file is a domain.
inline Corpus directory_corpus(const std::filesystem::path& root, std::size_t budget, std::vector<std::string>& notes,
                               std::size_t per_file = 1 << 20) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) throw std::invalid_argument("--data: '" + root.string() + "' is not a directory");
  std::vector<Domain> ds;
  std::vector<fs::path> subdirs, files;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (e.is_directory(ec))
      subdirs.push_back(e.path());
    else if (e.is_regular_file(ec))
      files.push_back(e.path());
  }
  std::sort(subdirs.begin(), subdirs.end());
  std::sort(files.begin(), files.end());
  if (!subdirs.empty()) {
    for (const auto& dir : subdirs) {
      std::vector<fs::path> inner;
      for (const auto& e : fs::recursive_directory_iterator(dir, ec))
        if (e.is_regular_file(ec)) inner.push_back(e.path());
      std::sort(inner.begin(), inner.end());
      ds.push_back(detail::gather(dir.filename().string(), inner, budget, per_file));
    }
  } else {
    for (const auto& f : files) ds.push_back(detail::gather(f.stem().string(), {f}, budget, per_file));
  }
  for (const Domain& d : ds)
    notes.push_back("domain '" + d.name + "': " + std::to_string(d.text.size()) + " bytes from " +
                    std::to_string(d.files) + " files");
  return Corpus(std::move(ds));
}

}  // namespace train_moe
