// vitq-runner: run an ExecuTorch .pte program on .npy inputs, time it, and
// report one JSON object on stdout. Used by the device harness on the host,
// under qemu (emulated Raspberry Pi) and on a real Pi over SSH.
//
//   vitq-runner [options] MODEL.pte [INPUT.npy ...]
//
// Exit codes: 0 success, 2 any error (one line on stderr, nothing on stdout).
// Run with --help for the options.

#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <executorch/devtools/etdump/etdump_flatcc.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

#include "npy.h"

#ifndef VITQ_RUNNER_VERSION
#define VITQ_RUNNER_VERSION "dev"
#endif

// --- Thread pool --------------------------------------------------------------
// The wheel ships libexecutorch_threadpool.so but not extension/threadpool/
// threadpool.h, so the three functions we need are declared here. Names and
// signatures match the exported symbols (checked with `nm -D -C`):
//   executorch::extension::threadpool::get_threadpool()
//   executorch::extension::threadpool::ThreadPool::get_thread_count() const
//   executorch::extension::threadpool::ThreadPool::_unsafe_reset_threadpool(unsigned int)
// Only non-virtual member functions are called through a pointer the library
// hands out, so the class layout does not matter here.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

// --- cpuinfo -------------------------------------------------------------------
// pytorch/cpuinfo is exported from libexecutorch_threadpool.so and is the same
// instance XNNPACK uses to pick its kernels. Reporting what it detected lets the
// harness check that an emulated Pi prefix is seen as the real board.
// struct cpuinfo_uarch_info: {enum uarch; uint32 midr (ARM) or cpuid (x86);
// uint32 processor_count; uint32 core_count} -- the same layout on both.
extern "C" {
struct cpuinfo_uarch_info {
  uint32_t uarch;
  uint32_t midr_or_cpuid;
  uint32_t processor_count;
  uint32_t core_count;
};
bool cpuinfo_initialize(void);
uint32_t cpuinfo_get_processors_count(void);
uint32_t cpuinfo_get_cores_count(void);
uint32_t cpuinfo_get_uarchs_count(void);
const struct cpuinfo_uarch_info* cpuinfo_get_uarch(uint32_t index);
}

namespace {

namespace et = ::executorch::runtime;
using executorch::aten::ScalarType;
using executorch::etdump::ETDumpGen;
using executorch::extension::from_blob;
using executorch::extension::module::Module;
using Clock = std::chrono::steady_clock;

constexpr int kExitError = 2;
// --threads above this is refused. pthreadpool does not check that its threads
// were created (see require_startable_threads), and no board we target has
// anywhere near this many cores, so a larger value is a typo, not a setting.
constexpr int kMaxThreads = 256;
constexpr const char* kDefaultKernelsLib = "libvitq_kernels.so";

// An error reported to the user as one line on stderr, exit code 2.
struct RunnerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct UsageError : RunnerError {
  using RunnerError::RunnerError;
};

// --- ExecuTorch log capture ------------------------------------------------------
// ExecuTorch reports why a load failed (e.g. "Missing operator: [3]
// vitq::foo.out") only through its log. We install our own PAL log hook so the
// message can go into the single error line, and the log itself stays quiet
// unless --verbose.
bool g_verbose = false;
std::vector<std::string> g_et_errors;  // recent error-level messages

void et_log_hook(et_timestamp_t, et_pal_log_level_t level, const char* filename,
                 const char*, size_t line, const char* message, size_t length) {
  std::string msg(message, length);
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == '\r')) msg.pop_back();
  const char lvl = static_cast<char>(level);
  if (lvl == 'E' || lvl == 'F') {
    g_et_errors.push_back(msg);
    if (g_et_errors.size() > 8) g_et_errors.erase(g_et_errors.begin());
  }
  if (g_verbose) {
    const char* base = filename ? std::strrchr(filename, '/') : nullptr;
    std::fprintf(stderr, "[executorch %c %s:%zu] %s\n", lvl,
                 base ? base + 1 : (filename ? filename : "?"), line, msg.c_str());
  }
}

// One line: newlines in captured messages become spaces.
std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

// ExecuTorch's fatal checks (ET_CHECK, e.g. a kernel registered twice by two
// different libraries) end in the PAL abort. Report them like every other
// error -- one stderr line with the captured reason, exit code 2 -- instead of
// dying with SIGABRT and no message.
[[noreturn]] void et_abort_hook() {
  std::string msg = "ExecuTorch aborted";
  if (!g_et_errors.empty()) msg += ": " + g_et_errors.back();
  std::fprintf(stderr, "vitq-runner: error: %s\n", one_line(msg).c_str());
  std::fflush(stderr);
  std::_Exit(kExitError);
}

std::string et_failure(const std::string& what, et::Error err) {
  std::string msg = what + " failed: " + et::to_string(err) + " (0x";
  char hex[8];
  std::snprintf(hex, sizeof hex, "%x", static_cast<unsigned>(err));
  msg += hex;
  msg += ")";
  if (!g_et_errors.empty()) {
    msg += ": ";
    for (size_t i = 0; i < g_et_errors.size(); ++i)
      msg += (i ? "; " : "") + g_et_errors[i];
  }
  if (err == et::Error::OperatorMissing)
    msg += " -- the program uses an operator no loaded library provides "
           "(custom ops need --kernels PATH/libvitq_kernels.so)";
  g_et_errors.clear();
  return one_line(msg);
}

// --- Options -------------------------------------------------------------------------
struct Options {
  std::string model;
  std::vector<std::string> inputs;
  std::string out;  // "" = do not write outputs
  std::string etdump;  // "" = no event tracer
  std::string method = "forward";
  std::vector<std::string> kernels;
  bool default_kernels = true;
  int warmup = 1;
  int runs = 1;
  int threads = 0;  // 0 = keep the runtime's default (one per performance core)
};

const char* kUsage =
    "usage: vitq-runner [options] MODEL.pte [INPUT.npy ...]\n"
    "\n"
    "Runs an ExecuTorch program on float32 .npy inputs and prints one JSON\n"
    "object (latency, load time, peak RSS, ...) on stdout.\n"
    "\n"
    "Inputs: each file holds one image [C,H,W] or [1,C,H,W], or a batch\n"
    "[N,C,H,W] that is run image by image (in chunks of the program's own\n"
    "batch size). Without inputs, one deterministic synthetic image is used.\n"
    "\n"
    "options:\n"
    "  --warmup W        untimed forward calls on the first image first (default 1)\n"
    "  --runs N          timed forward calls per image (default 1)\n"
    "  --threads T       thread-pool size, 0..256; 0 = runtime default (default 0)\n"
    "  --out PATH        write outputs: PATH.npy (single-output programs) or a\n"
    "                    directory receiving output_<k>.npy; per-image results\n"
    "                    are concatenated along axis 0 in input order\n"
    "  --etdump FILE     profile: attach ExecuTorch's ETDump event tracer and\n"
    "                    write it to FILE (operator, delegate call and\n"
    "                    XNNPACK-operator times of the timed calls only)\n"
    "  --kernels LIB     dlopen a kernel library (custom ops) before loading the\n"
    "                    program; repeatable. By default <bin>/../lib/"
    "libvitq_kernels.so\n"
    "                    is loaded when it exists\n"
    "  --no-default-kernels  do not load the bundled libvitq_kernels.so\n"
    "  --method NAME     method to run (default forward)\n"
    "  --verbose         print ExecuTorch log messages on stderr\n"
    "  --version, --help\n";

int parse_int(const std::string& flag, const std::string& value, int min_value,
              int max_value = INT_MAX) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(value.c_str(), &end, 10);
  // strtol saturates on overflow: a positive ERANGE is simply above any limit.
  const bool integer = !value.empty() && *end == '\0' && (errno == 0 || (errno == ERANGE && v > 0));
  if (!integer || v < min_value)
    throw UsageError(flag + " expects an integer >= " + std::to_string(min_value) +
                     ", got '" + value + "'");
  if (v > max_value)
    throw UsageError(flag + " " + value + " is above the limit of " + std::to_string(max_value));
  return static_cast<int>(v);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    std::string value;
    bool has_inline_value = false;
    if (a.rfind("--", 0) == 0) {
      const size_t eq = a.find('=');
      if (eq != std::string::npos) {
        value = a.substr(eq + 1);
        a = a.substr(0, eq);
        has_inline_value = true;
      }
    }
    auto next = [&]() -> std::string {
      if (has_inline_value) return value;
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (a == "--version") {
      std::printf("vitq-runner %s\n", VITQ_RUNNER_VERSION);
      std::exit(0);
    } else if (a == "--warmup") {
      o.warmup = parse_int(a, next(), 0);
    } else if (a == "--runs") {
      o.runs = parse_int(a, next(), 1);
    } else if (a == "--threads") {
      o.threads = parse_int(a, next(), 0, kMaxThreads);
    } else if (a == "--out") {
      o.out = next();
    } else if (a == "--etdump") {
      o.etdump = next();
      if (o.etdump.empty()) throw UsageError("--etdump needs a file name");
    } else if (a == "--kernels") {
      o.kernels.push_back(next());
    } else if (a == "--no-default-kernels") {
      o.default_kernels = false;
    } else if (a == "--method") {
      o.method = next();
    } else if (a == "--verbose" || a == "-v") {
      g_verbose = true;
    } else if (a == "--") {
      for (++i; i < argc; ++i) positional.push_back(argv[i]);
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError("unknown option " + a);
    } else {
      positional.push_back(a);
    }
  }
  if (positional.empty()) throw UsageError("missing MODEL.pte");
  o.model = positional[0];
  o.inputs.assign(positional.begin() + 1, positional.end());
  return o;
}

// --- Helpers ---------------------------------------------------------------------------
void require_regular_file(const std::string& path, const char* what) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0)
    throw RunnerError(std::string(what) + " not found: " + path + " (" +
                      std::strerror(errno) + ")");
  if (!S_ISREG(st.st_mode))
    throw RunnerError(std::string(what) + " is not a regular file: " + path);
  if (access(path.c_str(), R_OK) != 0)
    throw RunnerError(std::string(what) + " is not readable: " + path);
}

// mkdir -p: creates `dir` and its missing parents.
void make_dirs(const std::string& dir) {
  size_t pos = 0;
  do {
    pos = dir.find('/', pos + 1);  // +1: a leading '/' is not a component
    const std::string part = dir.substr(0, pos);
    if (mkdir(part.c_str(), 0777) != 0 && errno != EEXIST)
      throw RunnerError("cannot create output directory " + part + ": " +
                        std::strerror(errno));
  } while (pos != std::string::npos);
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw RunnerError("--out " + dir + " is not a directory (end it in .npy for a file)");
}

std::string exe_dir() {
  char buf[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  buf[n] = '\0';
  std::string p(buf);
  const size_t slash = p.rfind('/');
  return slash == std::string::npos ? "." : p.substr(0, slash);
}

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

std::string json_escape(const std::string& s) {
  std::string r;
  for (unsigned char c : s) {
    switch (c) {
      case '"': r += "\\\""; break;
      case '\\': r += "\\\\"; break;
      case '\n': r += "\\n"; break;
      case '\t': r += "\\t"; break;
      default:
        if (c < 0x20) {
          char b[8];
          std::snprintf(b, sizeof b, "\\u%04x", c);
          r += b;
        } else {
          r += static_cast<char>(c);
        }
    }
  }
  return r;
}

std::string json_num(double v) {
  if (!std::isfinite(v)) return "null";
  char b[32];
  std::snprintf(b, sizeof b, "%.4f", v);
  return b;
}

// numpy dtype string for an ExecuTorch scalar type ("" if unsupported).
std::string npy_descr(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "<f4";
    case ScalarType::Double: return "<f8";
    case ScalarType::Half: return "<f2";
    case ScalarType::Long: return "<i8";
    case ScalarType::Int: return "<i4";
    case ScalarType::Short: return "<i2";
    case ScalarType::Char: return "|i1";
    case ScalarType::Byte: return "|u1";
    case ScalarType::Bool: return "|b1";
    default: return "";
  }
}

// A few cpuinfo microarchitecture codes (enum cpuinfo_uarch in cpuinfo.h).
const char* uarch_name(uint32_t code) {
  switch (code) {
    case 0x00300353: return "cortex-a53";
    case 0x00300355: return "cortex-a55";
    case 0x00300357: return "cortex-a57";
    case 0x00300372: return "cortex-a72";
    case 0x00300373: return "cortex-a73";
    case 0x00300375: return "cortex-a75";
    case 0x00300376: return "cortex-a76";
    case 0x00300400: return "neoverse-n1";
    case 0: return "unknown";
    default: return nullptr;
  }
}

// Marker system call around each forward call. getppid() is cheap, has no side
// effect and nothing else in the process calls it, so a qemu TCG plugin can
// snapshot its instruction counter at every getppid syscall and count exactly
// the instructions of each inference (not program loading, I/O or timing).
// Order per forward: marker, forward, marker. Warmup calls are marked too and
// come first, so the plugin's first `warmup` spans are the warmup calls.
inline void inference_marker() {
  volatile pid_t sink = getppid();
  (void)sink;
}

// The thread pool's code, declared to the same plugin once, before the first
// marker: getppid with a magic first argument and the pool library's executable
// segment (the plugin's threads=N mode tells pool work -- scheduling, waiting --
// from the tasks the pool runs; runtime/qemu_plugin/insn_count.c). Anywhere
// else it is an ordinary getppid.
constexpr uint64_t kPoolCodeMagic = 0x7669747120706f6fULL;  // "vitq poo"

void declare_pool_code() {
  struct Search {
    uintptr_t inside = 0, lo = 0, hi = 0;
  } search;
  search.inside = reinterpret_cast<uintptr_t>(dlsym(RTLD_DEFAULT, "pthreadpool_parallelize_1d"));
  if (search.inside == 0) return;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) -> int {
        auto* s = static_cast<Search*>(data);
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          if (ph.p_type != PT_LOAD || (ph.p_flags & PF_X) == 0) continue;
          const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
          if (s->inside >= lo && s->inside < lo + ph.p_memsz) {
            s->lo = lo;
            s->hi = lo + ph.p_memsz;
            return 1;
          }
        }
        return 0;
      },
      &search);
  if (search.hi > search.lo) syscall(SYS_getppid, kPoolCodeMagic, search.lo, search.hi);
}

// A file the runner will create: its directory must exist and be writable.
void require_writable_target(const std::string& flag, const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string parent = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  if (access(parent.c_str(), W_OK) != 0)
    throw RunnerError("cannot write " + flag + " " + path + ": directory " + parent +
                      " is missing or not writable");
}

// --- Thread pool size --------------------------------------------------------------
// pthreadpool_create ignores what pthread_create returns, and pthreadpool_destroy
// then joins threads that were never created: a SIGSEGV at exit, after the report
// was printed (seen with --threads 100000, and with --threads 200 under a user's
// RLIMIT_NPROC of 40; a cgroup's pids.max would do the same). So before resizing
// the pool, start `extra` threads ourselves, with the same default attributes,
// all alive at once, and refuse the size if the system will not have them.
// (Another process could still take the last threads in between; this turns
// the common case -- a limit below --threads -- into an error line.) The probe
// threads are joined before the first inference marker, so they do not show in
// qemu instruction counts.
void require_startable_threads(int extra) {
  if (extra <= 0) return;
  pthread_mutex_t gate = PTHREAD_MUTEX_INITIALIZER;
  pthread_mutex_lock(&gate);  // every probe thread waits here until all are started
  std::vector<pthread_t> started;
  started.reserve(static_cast<size_t>(extra));
  int err = 0;
  for (int i = 0; i < extra && err == 0; ++i) {
    pthread_t t;
    err = pthread_create(
        &t, nullptr,
        [](void* g) -> void* {
          auto* m = static_cast<pthread_mutex_t*>(g);
          pthread_mutex_lock(m);
          pthread_mutex_unlock(m);
          return nullptr;
        },
        &gate);
    if (err == 0) started.push_back(t);
  }
  pthread_mutex_unlock(&gate);
  for (pthread_t t : started) pthread_join(t, nullptr);
  pthread_mutex_destroy(&gate);
  if (err != 0)
    throw RunnerError("--threads " + std::to_string(extra + 1) + ": only " +
                      std::to_string(started.size()) + " of the " + std::to_string(extra) +
                      " worker threads could be started (" + std::strerror(err) +
                      "); use a smaller --threads");
}

// --- Sizes the program states ------------------------------------------------------------
// The runner allocates the program's memory-planned buffers (in load_method) and
// the synthetic input at the sizes the program states, and a corrupt program
// can state any size. They are checked against the machine's memory first, so
// the user gets the sizes rather than "out of memory" (and an AddressSanitizer
// build, whose operator new aborts instead of throwing, fails the same way).

// RAM + swap in bytes, or UINT64_MAX when unknown.
uint64_t machine_memory() {
  struct sysinfo si {};
  if (sysinfo(&si) != 0) return UINT64_MAX;
  return (static_cast<uint64_t>(si.totalram) + si.totalswap) * std::max<uint32_t>(si.mem_unit, 1);
}

std::string mib(uint64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return b;
}

// Not knowing the method is left to load_method to report.
void check_memory_plan(Module& module, const std::string& method) {
  const auto meta = module.method_meta(method);
  if (!meta.ok()) return;
  uint64_t total = 0;
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    const auto size = meta->memory_planned_buffer_size(i);
    if (!size.ok()) throw RunnerError(et_failure("memory_planned_buffer_size", size.error()));
    if (*size < 0)
      throw RunnerError("the program's memory plan is invalid (buffer " + std::to_string(i) +
                        " has size " + std::to_string(*size) + ")");
    const uint64_t s = static_cast<uint64_t>(*size);
    total = s > UINT64_MAX - total ? UINT64_MAX : total + s;
  }
  const uint64_t memory = machine_memory();
  if (total > memory)
    throw RunnerError("the program's memory plan needs " + mib(total) + ", more than this machine's " +
                      mib(memory) + " of memory (RAM + swap)");
}

// Elements of one forward call's input [B, C, H, W]. The product must not wrap:
// the tensor handed to the program has the stated sizes, so a buffer sized by a
// wrapped product would be read out of bounds.
size_t input_elements(const std::vector<int64_t>& sizes) {
  uint64_t n = 1;
  for (int64_t d : sizes) {
    if (d < 0 || (d > 0 && n > UINT64_MAX / sizeof(float) / static_cast<uint64_t>(d)))
      throw RunnerError("the program input has an invalid shape " + shape_str(sizes));
    n *= static_cast<uint64_t>(d);
  }
  const uint64_t memory = machine_memory();
  if (n * sizeof(float) > memory || n > SIZE_MAX / sizeof(float))
    throw RunnerError("the program input " + shape_str(sizes) + " needs " + mib(n * sizeof(float)) +
                      ", more than this machine's " + mib(memory) + " of memory (RAM + swap)");
  return static_cast<size_t>(n);
}

// --- Outputs ---------------------------------------------------------------------------
// Accumulates one program output over all images: per-forward results are
// concatenated along axis 0.
struct OutputAccumulator {
  std::string descr;
  ScalarType dtype = ScalarType::Undefined;
  std::vector<int64_t> rest;  // shape without the leading dimension
  int64_t rows = 0;
  std::vector<uint8_t> bytes;

  void append(size_t index, const executorch::aten::Tensor& t) {
    const auto sizes = t.sizes();
    std::vector<int64_t> shape(sizes.begin(), sizes.end());
    if (shape.empty()) shape.push_back(1);  // scalar output: one row per forward
    const std::vector<int64_t> r(shape.begin() + 1, shape.end());
    if (descr.empty()) {
      descr = npy_descr(t.scalar_type());
      if (descr.empty())
        throw RunnerError("output " + std::to_string(index) + " has dtype code " +
                          std::to_string(static_cast<int>(t.scalar_type())) +
                          ", which cannot be written as .npy");
      dtype = t.scalar_type();
      rest = r;
    } else if (r != rest || t.scalar_type() != dtype) {
      throw RunnerError("output " + std::to_string(index) +
                        " changes shape or dtype between images");
    }
    rows += shape[0];
    const auto* p = static_cast<const uint8_t*>(t.const_data_ptr());
    bytes.insert(bytes.end(), p, p + t.nbytes());
  }

  std::vector<int64_t> shape() const {
    std::vector<int64_t> s{rows};
    s.insert(s.end(), rest.begin(), rest.end());
    return s;
  }
};

// --- Inputs ----------------------------------------------------------------------------
struct InputFile {
  std::string path;  // "" = synthetic
  std::vector<int64_t> shape;
  int64_t chunks = 0;  // forward calls this file needs
};

// Checks a file's shape against the program input `expected` ([B, C, H, W]);
// returns the number of forward calls (chunks of B images) it holds.
int64_t chunks_for(const std::string& path, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& expected) {
  const int64_t batch = expected.empty() ? 1 : expected[0];
  const std::vector<int64_t> per_image(expected.begin() + (expected.empty() ? 0 : 1),
                                       expected.end());
  if (shape.size() == expected.size() && !expected.empty()) {
    const std::vector<int64_t> rest(shape.begin() + 1, shape.end());
    if (rest == per_image && shape[0] > 0 && shape[0] % batch == 0)
      return shape[0] / batch;
  } else if (batch == 1 && shape == per_image) {
    return 1;
  }
  std::vector<int64_t> batched{-1};
  batched.insert(batched.end(), per_image.begin(), per_image.end());
  std::string want = shape_str(batched);
  want.replace(1, 2, "N");
  if (batch != 1) want += " with N a multiple of " + std::to_string(batch);
  throw RunnerError(path + ": input shape " + shape_str(shape) +
                    " does not match the program input " + shape_str(expected) +
                    " (expected " + want + ")");
}

// --- The steps of a run ------------------------------------------------------------------

// Step 1: ExecuTorch's runtime, its log routed through our hook before anything
// can log (null entries keep the default implementation).
void init_runtime() {
  et::register_pal(et::PalImpl::create(
      /*init=*/nullptr, et_abort_hook, /*current_ticks=*/nullptr,
      /*ticks_to_ns_multiplier=*/nullptr, et_log_hook, /*allocate=*/nullptr,
      /*free=*/nullptr, __FILE__));
  et::runtime_init();
}

// Step 2: kernel libraries (custom ops). They must be registered before the
// program's methods are loaded: registration happens in their static
// initializers. Returns the libraries loaded, in order.
std::vector<std::string> load_kernel_libraries(const Options& opt) {
  std::vector<std::string> kernels = opt.kernels;
  if (opt.default_kernels) {
    const std::string bundled = exe_dir() + "/../lib/" + kDefaultKernelsLib;
    if (access(bundled.c_str(), R_OK) == 0 &&
        std::find(kernels.begin(), kernels.end(), bundled) == kernels.end())
      kernels.insert(kernels.begin(), bundled);
  }
  for (const auto& lib : kernels) {
    require_regular_file(lib, "kernel library");
    // RTLD_GLOBAL: a later library may depend on symbols of an earlier one.
    if (dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      const char* e = dlerror();
      throw RunnerError(one_line("cannot load kernel library " + lib + ": " +
                                 (e ? e : "unknown dlopen error")));
    }
    if (!g_et_errors.empty())  // a registration problem the runtime did not abort on
      throw RunnerError(one_line("registering the kernels of " + lib +
                                 " failed: " + g_et_errors.back()));
  }
  return kernels;
}

// The integer arithmetic of the kernels loaded (libvitq_kernels.so's vitq_arithmetic_version)
// as a JSON value, null when none exports it (no kernels, or a library from before versions).
// The SDK compares it with the arithmetic a program was built for: an old bundle would run the
// program but compute other bits than its build measured.
std::string kernels_arithmetic_json() {
  using VersionFn = int (*)();
  auto fn = reinterpret_cast<VersionFn>(dlsym(RTLD_DEFAULT, "vitq_arithmetic_version"));
  return fn != nullptr ? std::to_string(fn()) : "null";
}

// The int8 GEMM the kernels loaded run on this CPU (libvitq_kernels.so's vitq_gemm: e.g. "dot"
// on a Pi 5, "xnnpack" on an x86 CPU without VNNI) as a JSON value, null without kernels.
std::string kernels_gemm_json() {
  using NameFn = const char* (*)();
  auto fn = reinterpret_cast<NameFn>(dlsym(RTLD_DEFAULT, "vitq_gemm"));
  return fn != nullptr ? "\"" + json_escape(fn()) + "\"" : "null";
}

// Step 3: the thread pool's size (--threads). XNNPACK takes the pool when a
// method is loaded, so this has to happen before load_method. Returns the size.
size_t size_thread_pool(int threads) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr) throw RunnerError("the ExecuTorch thread pool is unavailable");
  if (threads > 0 && static_cast<size_t>(threads) != pool->get_thread_count()) {
    require_startable_threads(threads - 1);  // the calling thread is worker 0
    // Declared to return false on failure, but ExecuTorch 1.5 returns true even
    // when pthreadpool_create failed and left a pool of 0 threads: check both.
    if (!pool->_unsafe_reset_threadpool(static_cast<uint32_t>(threads)) ||
        pool->get_thread_count() != static_cast<size_t>(threads))
      throw RunnerError("cannot create a thread pool of " + std::to_string(threads) +
                        " threads (--threads)");
  }
  return pool->get_thread_count();
}

// Step 4a: with --etdump, the event tracer the Module will own and hand to every
// method it loads. The shipped libraries are built with ET_EVENT_TRACER_ENABLED,
// so Method records one event per instruction (OPERATOR_CALL / DELEGATE_CALL,
// with the instruction index as debug handle) and the XNNPACK delegate one per
// XNNPACK operator when it profiles (see runtime/README.md). Returns the
// generator (owned by *tracer), or null without --etdump.
ETDumpGen* make_tracer(const Options& opt, std::unique_ptr<et::EventTracer>* tracer) {
  if (opt.etdump.empty()) return nullptr;
  require_writable_target("--etdump", opt.etdump);
  auto gen = std::make_unique<ETDumpGen>();  // no buffer: the builder mallocs
  ETDumpGen* etdump = gen.get();
  *tracer = std::move(gen);
  return etdump;
}

// Step 4b: load the program and the method: this is where XNNPACK builds its
// runtime and where missing operators are reported. Returns the milliseconds.
double load_program(Module& module, const Options& opt) {
  const auto t0 = Clock::now();
  // InternalConsistency verifies the flatbuffer, so a corrupt file is an
  // error rather than a crash.
  if (const auto e = module.load(et::Program::Verification::InternalConsistency); e != et::Error::Ok)
    throw RunnerError(et_failure("loading program " + opt.model, e));
  check_memory_plan(module, opt.method);
  if (const auto e = module.load_method(opt.method); e != et::Error::Ok)
    throw RunnerError(et_failure("load_method('" + opt.method + "')", e));
  return ms_between(t0, Clock::now());
}

// What one forward call takes: a float32 tensor of `sizes`.
struct ProgramInput {
  std::vector<int64_t> sizes;  // [B, C, H, W]
  int64_t batch;
  size_t elements;
  size_t num_outputs;
};

// Step 5: the program's input signature: exactly one float32 tensor.
ProgramInput program_input(Module& module, const std::string& method) {
  auto meta = module.method_meta(method);
  if (!meta.ok()) throw RunnerError(et_failure("method_meta", meta.error()));
  if (meta->num_inputs() != 1)
    throw RunnerError("the program's '" + method + "' takes " + std::to_string(meta->num_inputs()) +
                      " inputs; vitq-runner supports exactly one image tensor");
  auto in_meta = meta->input_tensor_meta(0);
  if (!in_meta.ok()) throw RunnerError(et_failure("input_tensor_meta(0)", in_meta.error()));
  if (in_meta->scalar_type() != ScalarType::Float)
    throw RunnerError("the program input has dtype code " + std::to_string(static_cast<int>(in_meta->scalar_type())) +
                      "; vitq-runner feeds float32 only");
  ProgramInput in;
  in.sizes.assign(in_meta->sizes().begin(), in_meta->sizes().end());
  in.batch = in.sizes.empty() ? 1 : in.sizes[0];
  if (in.batch < 1) throw RunnerError("the program input has a non-positive batch size");
  in.elements = input_elements(in.sizes);
  in.num_outputs = meta->num_outputs();
  return in;
}

// Step 6: every input file and the output path checked before anything runs.
// Returns the inputs (one synthetic image when there are no files); sets
// *out_is_file for an --out ending in .npy.
std::vector<InputFile> check_inputs_and_output(const Options& opt, const ProgramInput& in, bool* out_is_file) {
  std::vector<InputFile> files;
  if (opt.inputs.empty()) {
    files.push_back({"", in.sizes, 1});
  } else {
    for (const auto& p : opt.inputs) {
      require_regular_file(p, "input");
      std::vector<int64_t> shape;
      try {
        shape = vitq::npy::read_float32_shape(p);
      } catch (const std::runtime_error& e) {
        throw RunnerError(e.what());
      }
      files.push_back({p, shape, chunks_for(p, shape, in.sizes)});
    }
  }
  *out_is_file = !opt.out.empty() && ends_with(opt.out, ".npy");
  if (*out_is_file) {
    if (in.num_outputs != 1)
      throw RunnerError("--out " + opt.out + " names one file, but the program has " +
                        std::to_string(in.num_outputs) + " outputs; pass a directory instead");
    require_writable_target("--out", opt.out);
  } else if (!opt.out.empty()) {
    make_dirs(opt.out);
  }
  return files;
}

// An input file's values, or the runner's deterministic synthetic image:
// pseudo-random values in [-1, 1) (LCG).
std::vector<float> input_values(const InputFile& f, size_t elements) {
  std::vector<float> data;
  if (f.path.empty()) {
    data.resize(elements);
    uint32_t s = 12345u;
    for (float& v : data) {
      s = s * 1664525u + 1013904223u;
      v = static_cast<float>(s >> 8) / static_cast<float>(1u << 23) - 1.0f;
    }
    return data;
  }
  try {
    return vitq::npy::read_float32(f.path).data;
  } catch (const std::runtime_error& e) {
    throw RunnerError(e.what());
  }
}

// What the timed calls produced.
struct Inferences {
  std::vector<double> latencies;          // ms, one per timed call
  std::vector<OutputAccumulator> outputs;  // with --out
  int64_t images = 0;
};

// Step 7: warmup (untimed) on the first image, then every image `runs` times.
Inferences run_inferences(Module& module, const Options& opt, const ProgramInput& in,
                          const std::vector<InputFile>& files, ETDumpGen* etdump) {
  const std::vector<executorch::aten::SizesType> chunk_sizes(in.sizes.begin(), in.sizes.end());
  auto forward = [&](float* data) -> std::vector<et::EValue> {
    auto tensor = from_blob(data, chunk_sizes, ScalarType::Float);
    std::vector<et::EValue> input{et::EValue(*tensor)};
    inference_marker();
    auto result = module.execute(opt.method, input);
    inference_marker();
    if (!result.ok()) throw RunnerError(et_failure("execute('" + opt.method + "')", result.error()));
    return std::move(*result);
  };
  Inferences done;
  // Reserve up front: growing this vector between forwards changes the heap state
  // that the next forward's allocations see, and with it the instruction count.
  int64_t total_chunks = 0;
  for (const auto& f : files) total_chunks += f.chunks;
  done.latencies.reserve(static_cast<size_t>(total_chunks * opt.runs));
  bool warmed_up = false, trace_started = false;
  for (const auto& f : files) {
    std::vector<float> data = input_values(f, in.elements);
    for (int64_t c = 0; c < f.chunks; ++c) {
      float* chunk = data.data() + c * in.elements;
      if (!warmed_up) {
        for (int w = 0; w < opt.warmup; ++w) forward(chunk);
        warmed_up = true;
      }
      if (etdump != nullptr && !trace_started) {
        // Drop what load_method and the warmup calls recorded: the etdump
        // holds exactly the timed calls, one event block ("Execute") each.
        etdump->reset();
        trace_started = true;
      }
      std::vector<et::EValue> result;
      for (int r = 0; r < opt.runs; ++r) {
        const auto t0 = Clock::now();
        result = forward(chunk);
        done.latencies.push_back(ms_between(t0, Clock::now()));
      }
      if (!opt.out.empty()) {
        if (done.outputs.empty()) done.outputs.resize(result.size());
        for (size_t k = 0; k < result.size(); ++k) {
          if (!result[k].isTensor()) throw RunnerError("output " + std::to_string(k) + " is not a tensor");
          done.outputs[k].append(k, result[k].toTensor());
        }
      }
      done.images += in.batch;
    }
  }
  return done;
}

// Step 8: the outputs as .npy files; returns their paths.
std::vector<std::string> write_outputs(const Options& opt, const std::vector<OutputAccumulator>& outputs,
                                       bool out_is_file) {
  std::vector<std::string> paths;
  for (size_t k = 0; k < outputs.size(); ++k) {
    const std::string path = out_is_file ? opt.out : opt.out + "/output_" + std::to_string(k) + ".npy";
    try {
      vitq::npy::write(path, outputs[k].descr, outputs[k].shape(), outputs[k].bytes.data(), outputs[k].bytes.size());
    } catch (const std::runtime_error& e) {
      throw RunnerError(e.what());
    }
    paths.push_back(path);
  }
  return paths;
}

struct EtdumpFile {
  size_t bytes = 0, blocks = 0;
};

// Step 9: the event trace (after the timing, so writing it is not timed).
EtdumpFile write_etdump(ETDumpGen& etdump, const std::string& path) {
  EtdumpFile written_file;
  written_file.blocks = etdump.get_num_blocks();
  const executorch::etdump::ETDumpResult data = etdump.get_etdump_data();
  if (data.buf == nullptr || data.size == 0)
    throw RunnerError("the event tracer recorded nothing (is the ExecuTorch runtime built "
                      "with ET_EVENT_TRACER_ENABLED?)");
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw RunnerError("cannot write --etdump " + path + ": " + std::strerror(errno));
  const size_t written = std::fwrite(data.buf, 1, data.size, f);
  const bool closed = std::fclose(f) == 0;
  std::free(data.buf);  // flatcc's aligned buffer: malloc'd memory
  if (written != data.size || !closed)
    throw RunnerError("cannot write --etdump " + path + ": " + std::strerror(errno));
  written_file.bytes = data.size;
  return written_file;
}

// The latency summary of the report: min, median, p90 (nearest rank), mean, max.
std::string latency_json(std::vector<double> sorted) {
  std::sort(sorted.begin(), sorted.end());
  const size_t n = sorted.size();
  double mean = 0;
  for (double v : sorted) mean += v;
  mean /= static_cast<double>(n);
  const double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  const size_t rank = static_cast<size_t>(std::ceil(0.9 * static_cast<double>(n)));
  const double p90 = sorted[std::max<size_t>(rank, 1) - 1];
  std::ostringstream js;
  js << "{\"min\": " << json_num(sorted.front()) << ", \"median\": " << json_num(median)
     << ", \"p90\": " << json_num(p90) << ", \"mean\": " << json_num(mean)
     << ", \"max\": " << json_num(sorted.back()) << ", \"count\": " << n << "}";
  return js.str();
}

// What cpuinfo (and so XNNPACK) believes the CPU is, as the report's "cpu"
// member (with its leading comma), or "" when cpuinfo has nothing.
std::string cpu_json() {
  if (!cpuinfo_initialize() || cpuinfo_get_uarchs_count() == 0) return "";
  const cpuinfo_uarch_info* u = cpuinfo_get_uarch(0);
  char uarch[16], id[16];
  const char* name = uarch_name(u->uarch);
  if (name) std::snprintf(uarch, sizeof uarch, "%s", name);
  else std::snprintf(uarch, sizeof uarch, "0x%08" PRIx32, u->uarch);
  std::snprintf(id, sizeof id, "0x%08" PRIx32, u->midr_or_cpuid);
  std::ostringstream js;
  js << ", \"cpu\": {\"processors\": " << cpuinfo_get_processors_count()
     << ", \"cores\": " << cpuinfo_get_cores_count() << ", \"uarch\": \"" << uarch << "\""
#if defined(__aarch64__) || defined(__arm__)
     << ", \"midr\": \"" << id << "\""
#else
     << ", \"cpuid\": \"" << id << "\""
#endif
     << "}";
  return js.str();
}

// Everything the report says besides the run's own numbers.
struct RunFacts {
  const ProgramInput* input;
  size_t threads;
  double load_ms, total_ms;
  const std::vector<std::string>* kernels;
  const std::vector<std::string>* out_paths;
  const EtdumpFile* etdump;  // null without --etdump
};

// Step 10: the JSON report (one object, one line on stdout).
std::string report_json(const Options& opt, const Inferences& done, const RunFacts& facts) {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);  // ru_maxrss is in KiB on Linux
  std::ostringstream js;
  js << "{\"runner\": \"vitq-runner\", \"version\": \"" << VITQ_RUNNER_VERSION << "\""
     << ", \"model\": \"" << json_escape(opt.model) << "\""
     << ", \"method\": \"" << json_escape(opt.method) << "\""
     << ", \"input_shape\": " << shape_str(facts.input->sizes)
     << ", \"num_images\": " << done.images
     << ", \"synthetic_input\": " << (opt.inputs.empty() ? "true" : "false")
     << ", \"warmup\": " << opt.warmup << ", \"runs_per_image\": " << opt.runs
     << ", \"threads\": " << facts.threads
     << ", \"arithmetic_version\": " << kernels_arithmetic_json()
     << ", \"gemm\": " << kernels_gemm_json()
     << ", \"load_ms\": " << json_num(facts.load_ms)
     << ", \"latency_ms\": " << latency_json(done.latencies)
     << ", \"total_ms\": " << json_num(facts.total_ms)
     << ", \"peak_rss_kb\": " << ru.ru_maxrss
     << ", \"peak_rss_mb\": " << json_num(ru.ru_maxrss / 1024.0);
  js << ", \"kernels\": [";
  for (size_t i = 0; i < facts.kernels->size(); ++i)
    js << (i ? ", " : "") << "\"" << json_escape((*facts.kernels)[i]) << "\"";
  js << "], \"outputs\": [";
  for (size_t k = 0; k < facts.out_paths->size(); ++k)
    js << (k ? ", " : "") << "{\"path\": \"" << json_escape((*facts.out_paths)[k])
       << "\", \"shape\": " << shape_str(done.outputs[k].shape()) << ", \"dtype\": \""
       << done.outputs[k].descr << "\"}";
  js << "]";
  if (facts.etdump != nullptr)
    js << ", \"etdump\": {\"path\": \"" << json_escape(opt.etdump) << "\", \"bytes\": " << facts.etdump->bytes
       << ", \"blocks\": " << facts.etdump->blocks << "}";
  js << cpu_json() << "}";
  return js.str();
}

// --- Main ------------------------------------------------------------------------------
int run(const Options& opt) {
  const auto t_start = Clock::now();
  init_runtime();
  const std::vector<std::string> kernels = load_kernel_libraries(opt);
  const size_t threads = size_thread_pool(opt.threads);
  declare_pool_code();
  require_regular_file(opt.model, "model");
  std::unique_ptr<et::EventTracer> tracer;
  ETDumpGen* etdump = make_tracer(opt, &tracer);
  Module module(opt.model, Module::LoadMode::Mmap, std::move(tracer));
  const double load_ms = load_program(module, opt);
  const ProgramInput input = program_input(module, opt.method);
  bool out_is_file = false;
  const std::vector<InputFile> files = check_inputs_and_output(opt, input, &out_is_file);

  const Inferences done = run_inferences(module, opt, input, files, etdump);
  const double total_ms = ms_between(t_start, Clock::now());

  const std::vector<std::string> out_paths =
      opt.out.empty() ? std::vector<std::string>{} : write_outputs(opt, done.outputs, out_is_file);
  EtdumpFile etdump_file;
  if (etdump != nullptr) etdump_file = write_etdump(*etdump, opt.etdump);
  const RunFacts facts{&input, threads, load_ms, total_ms, &kernels, &out_paths,
                       etdump != nullptr ? &etdump_file : nullptr};
  std::printf("%s\n", report_json(opt, done, facts).c_str());
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::fprintf(stderr, "vitq-runner: error: %s (see --help)\n", one_line(e.what()).c_str());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "vitq-runner: error: out of memory\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vitq-runner: error: %s\n", one_line(e.what()).c_str());
  }
  return kExitError;
}
