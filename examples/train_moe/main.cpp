// train_moe — trains the same small byte-level MoE language model under each balancing policy
// and compares loss, balance and expert specialisation. Run with --help for the flags.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "trainer.hpp"

#ifndef TRAIN_MOE_SOURCE_DIR
#define TRAIN_MOE_SOURCE_DIR "."
#endif

namespace {

using namespace train_moe;

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

struct Cli {
  TrainOptions train;
  std::vector<std::string> policies;
  std::vector<float> decays{0.65f};
  int threads = 2;
  std::string out = "out";
  std::string data;
  std::size_t domain_bytes = 200000;
  bool plot = true;
  std::string plot_script = std::string(TRAIN_MOE_SOURCE_DIR) + "/scripts/plot_training.py";
};

void usage() {
  std::string names;
  for (const auto& n : policy_names()) names += (names.empty() ? "" : ",") + n;
  std::printf(
      "train_moe: trains one byte-level MoE language model per balancing policy and compares them.\n"
      "  --policies LIST   comma-separated, or 'all' (default: all): %s\n"
      "  --steps N         optimizer steps per policy (1500)\n"
      "  --batch N         tokens per step (256)\n"
      "  --experts E       experts per layer (16)\n"
      "  --k K             experts per token (2)\n"
      "  --layers N        MoE layers (2)\n"
      "  --d N / --hidden N  model width (64) / expert hidden size (128)\n"
      "  --context N       previous bytes the model sees (8)\n"
      "  --capacity CF     expert capacity factor (1.25)\n"
      "  --alpha A         aux-loss coefficient of switch and phi-* (0.01)\n"
      "  --decay LIST      phi's rho; several values run a sweep (0.65)\n"
      "  --update-rate U   lossfree's bias step (0.001)\n"
      "  --lr LR           peak AdamW learning rate (0.003)\n"
      "  --seed S          initialisation and data order (1234)\n"
      "  --threads N       policies trained in parallel, one per thread (2)\n"
      "  --out DIR         output folder for CSV logs and plots (out)\n"
      "  --data DIR        text to train on: one subfolder per domain (default: system text)\n"
      "  --domain-bytes N  bytes per domain read from the system text (200000)\n"
      "  --eval-tokens N   held-out tokens per domain (2048)\n"
      "  --log-every N     steps between progress lines (100)\n"
      "  --no-plot         do not run scripts/plot_training.py\n",
      names.c_str());
}

Cli parse(int argc, char** argv) {
  Cli c;
  c.train.log_every = 100;
  c.policies = policy_names();
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw std::invalid_argument(std::string(argv[i]) + ": missing value");
    return argv[++i];
  };
  auto to_int = [](const std::string& flag, const std::string& v, int lo) {
    std::size_t pos = 0;
    int x = 0;
    try {
      x = std::stoi(v, &pos);
    } catch (const std::exception&) {
      pos = 0;
    }
    if (pos != v.size() || x < lo)
      throw std::invalid_argument(flag + ": '" + v + "' is not an integer >= " + std::to_string(lo));
    return x;
  };
  auto to_float = [](const std::string& flag, const std::string& v) {
    std::size_t pos = 0;
    float x = 0;
    try {
      x = std::stof(v, &pos);
    } catch (const std::exception&) {
      pos = 0;
    }
    if (pos != v.size() || !std::isfinite(x) || x < 0)
      throw std::invalid_argument(flag + ": '" + v + "' is not a finite number >= 0");
    return x;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else if (a == "--policies") {
      const std::string v = need(i);
      c.policies = v == "all" ? policy_names() : split(v, ',');
      for (const auto& p : c.policies)
        if (!with_policy(p, [](auto) {})) throw std::invalid_argument("--policies: unknown policy '" + p + "'");
    } else if (a == "--steps") {
      c.train.steps = to_int(a, need(i), 1);
    } else if (a == "--batch") {
      c.train.batch = to_int(a, need(i), 1);
    } else if (a == "--experts") {
      c.train.model.experts = to_int(a, need(i), 1);
    } else if (a == "--k") {
      c.train.model.top_k = to_int(a, need(i), 1);
    } else if (a == "--layers") {
      c.train.model.layers = to_int(a, need(i), 1);
    } else if (a == "--d") {
      c.train.model.d = to_int(a, need(i), 1);
    } else if (a == "--hidden") {
      c.train.model.hidden = to_int(a, need(i), 1);
    } else if (a == "--context") {
      c.train.model.context = to_int(a, need(i), 1);
    } else if (a == "--capacity") {
      c.train.model.capacity_factor = to_float(a, need(i));
      if (c.train.model.capacity_factor <= 0) throw std::invalid_argument("--capacity: must be > 0");
    } else if (a == "--alpha") {
      c.train.hyper.alpha = to_float(a, need(i));
    } else if (a == "--decay") {
      c.decays.clear();
      for (const auto& v : split(need(i), ',')) {
        c.decays.push_back(to_float(a, v));
        if (c.decays.back() >= 1.0f) throw std::invalid_argument("--decay: '" + v + "' must be in [0, 1)");
      }
      if (c.decays.empty()) throw std::invalid_argument("--decay: no value");
    } else if (a == "--update-rate") {
      c.train.hyper.update_rate = to_float(a, need(i));
    } else if (a == "--lr") {
      c.train.lr = to_float(a, need(i));
    } else if (a == "--seed") {
      c.train.seed = std::uint64_t(to_int(a, need(i), 0));
    } else if (a == "--threads") {
      c.threads = to_int(a, need(i), 1);
    } else if (a == "--out") {
      c.out = need(i);
    } else if (a == "--data") {
      c.data = need(i);
    } else if (a == "--domain-bytes") {
      c.domain_bytes = std::size_t(to_int(a, need(i), 1024));
    } else if (a == "--eval-tokens") {
      c.train.eval_per_domain = to_int(a, need(i), 1);
    } else if (a == "--log-every") {
      c.train.log_every = to_int(a, need(i), 0);
    } else if (a == "--no-plot") {
      c.plot = false;
    } else {
      throw std::invalid_argument("unknown flag '" + a + "' (see --help)");
    }
  }
  if (c.train.model.top_k > c.train.model.experts)
    throw std::invalid_argument("--k: k = " + std::to_string(c.train.model.top_k) + " exceeds --experts " +
                                std::to_string(c.train.model.experts));
  return c;
}

struct Job {
  std::string policy, name;
  float decay;
};

std::string fmt(double x, int prec = 4) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", prec, x);
  return b;
}

void write_outputs(const Cli& cli, const Corpus& corpus, const std::vector<RunResult>& runs) {
  namespace fs = std::filesystem;
  fs::create_directories(cli.out);
  {
    std::ofstream f(fs::path(cli.out) / "steps.csv");
    f << "run,policy,decay,step,loss,aux_loss,maxvio,gini,load_entropy,dropped,lr,soft_maxvio\n";
    for (const auto& r : runs)
      for (const auto& s : r.log)
        f << r.name << ',' << r.policy << ',' << r.decay << ',' << s.step << ',' << s.loss << ',' << s.aux << ','
          << s.maxvio << ',' << s.gini << ',' << s.entropy << ',' << s.dropped << ',' << s.lr << ',' << s.soft_maxvio
          << '\n';
  }
  {
    std::ofstream f(fs::path(cli.out) / "summary.csv");
    f << "run,policy,decay,train_loss,heldout_loss,maxvio_global_heldout,maxvio_batch_training,gini_training,"
         "load_entropy_heldout,dropped_training,dropped_heldout,specialisation_mi,expert_similarity,soft_maxvio_"
         "training,seconds\n";
    for (const auto& r : runs)
      f << r.name << ',' << r.policy << ',' << r.decay << ',' << r.train.loss << ',' << r.held_out.loss << ','
        << r.held_out.maxvio << ',' << r.maxvio_training << ',' << r.gini_training << ',' << r.held_out.entropy << ','
        << r.dropped_training << ',' << r.held_out.dropped << ',' << r.held_out.specialisation << ',' << r.similarity
        << ',' << r.soft_maxvio_training << ',' << r.seconds << '\n';
  }
  {
    std::ofstream f(fs::path(cli.out) / "loads.csv");
    f << "run,layer,expert,heldout_assignments\n";
    for (const auto& r : runs)
      for (std::size_t l = 0; l < r.held_out.loads.size(); ++l)
        for (std::size_t e = 0; e < r.held_out.loads[l].size(); ++e)
          f << r.name << ',' << l << ',' << e << ',' << r.held_out.loads[l][e] << '\n';
  }
  {
    std::ofstream f(fs::path(cli.out) / "specialisation.csv");
    f << "run,layer,domain,top_expert_share\n";
    for (const auto& r : runs)
      for (std::size_t l = 0; l < r.held_out.domain_top_share.size(); ++l)
        for (int d = 0; d < corpus.num_domains(); ++d)
          f << r.name << ',' << l << ',' << corpus.domains()[std::size_t(d)].name << ','
            << r.held_out.domain_top_share[l][std::size_t(d)] << '\n';
  }
}

void print_table(const std::vector<RunResult>& runs, std::ostream& os) {
  os << "| policy | train loss | held-out loss | global MaxVio (held-out) | batch MaxVio (training) | Gini (training) "
        "| load entropy | dropped | specialisation I(D;E)/H(D) | router similarity | time (s) |\n";
  os << "|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& r : runs)
    os << "| " << r.name << " | " << fmt(r.train.loss) << " | " << fmt(r.held_out.loss) << " | "
       << fmt(r.held_out.maxvio, 3) << " | " << fmt(r.maxvio_training, 3) << " | " << fmt(r.gini_training, 3) << " | "
       << fmt(r.held_out.entropy, 3) << " | " << fmt(100.0 * r.dropped_training, 2) << "% | "
       << fmt(r.held_out.specialisation, 3) << " | " << fmt(r.similarity, 3) << " | " << fmt(r.seconds, 0) << " |\n";
}

}  // namespace

int main(int argc, char** argv) try {
  const Cli cli = parse(argc, argv);
  std::vector<std::string> notes;
  const Corpus corpus =
      cli.data.empty() ? system_corpus(cli.domain_bytes, notes) : directory_corpus(cli.data, cli.domain_bytes, notes);
  for (const auto& n : notes) std::printf("data: %s\n", n.c_str());
  for (int d = 0; d < corpus.num_domains(); ++d)
    std::printf("data: '%s' train %zu bytes, held-out %zu bytes\n", corpus.domains()[std::size_t(d)].name.c_str(),
                corpus.train_bytes(d), corpus.held_out_bytes(d));
  const ModelConfig& m = cli.train.model;
  std::printf(
      "model: %d MoE layers, E = %d experts, top-%d, d = %d, expert hidden %d, context %d bytes, capacity %.2f; "
      "%d steps x %d tokens, AdamW lr %.g\n",
      m.layers, m.experts, m.top_k, m.d, m.hidden, m.context, double(m.capacity_factor), cli.train.steps,
      cli.train.batch, double(cli.train.lr));

  std::vector<Job> jobs;
  for (const auto& p : cli.policies) {
    if (policy_uses_decay(p) && cli.decays.size() > 1) {
      for (float d : cli.decays) jobs.push_back({p, p + "@" + fmt(d, 2), d});
    } else {
      jobs.push_back({p, p, cli.decays.front()});
    }
  }

  std::vector<RunResult> runs(jobs.size());
  std::vector<std::string> errors(jobs.size());
  std::mutex print_mutex;
  auto progress = [&](const std::string& line) {
    std::lock_guard<std::mutex> lock(print_mutex);
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  };
  std::atomic<std::size_t> next{0};
  auto worker = [&] {
    for (std::size_t i; (i = next.fetch_add(1)) < jobs.size();) {
      TrainOptions o = cli.train;
      o.hyper.decay = jobs[i].decay;
      try {
        runs[i] = train_named(jobs[i].policy, corpus, o, jobs[i].name, progress);
      } catch (const std::exception& e) {
        errors[i] = e.what();
        progress("[" + jobs[i].name + "] failed: " + e.what());
      }
    }
  };
  std::vector<std::thread> pool;
  const int nthreads = std::max(1, std::min<int>(cli.threads, int(jobs.size())));
  for (int t = 0; t < nthreads; ++t) pool.emplace_back(worker);
  for (auto& t : pool) t.join();

  std::vector<RunResult> done;
  for (std::size_t i = 0; i < runs.size(); ++i)
    if (errors[i].empty()) done.push_back(runs[i]);
  write_outputs(cli, corpus, done);
  std::printf("\n");
  print_table(done, std::cout);
  {
    std::ofstream f(std::filesystem::path(cli.out) / "summary.md");
    print_table(done, f);
  }
  std::printf("\nCSV logs in %s/ (steps.csv, summary.csv, loads.csv, specialisation.csv)\n", cli.out.c_str());
  if (cli.plot) {
    if (std::filesystem::exists(cli.plot_script) && std::filesystem::exists("/usr/bin/python3")) {
      const std::string cmd = "/usr/bin/python3 '" + cli.plot_script + "' '" + cli.out + "'";
      if (std::system(cmd.c_str()) != 0) std::printf("plotting failed (is python3-matplotlib installed?)\n");
    } else {
      std::printf("plots skipped: %s or /usr/bin/python3 not found\n", cli.plot_script.c_str());
    }
  }
  for (std::size_t i = 0; i < errors.size(); ++i)
    if (!errors[i].empty()) return 1;
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "train_moe: %s\n", e.what());
  return 2;
}
