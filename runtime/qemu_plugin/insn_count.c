/*
 * insn_count: a qemu TCG plugin (qemu-user, plugin API version 1 = QEMU 7.2)
 * that counts the guest instructions of each inference of vitq-runner.
 *
 * vitq-runner calls getppid() once right before and once right after every
 * forward call (warmup calls first, then the timed ones) and nowhere else.
 * The plugin counts every executed guest instruction and snapshots the running
 * total at each such "marker" system call; span i (the i-th forward call) is
 *
 *     markers[2i+1] - markers[2i]
 *
 * i.e. the instructions after the opening marker's svc up to and including the
 * closing marker's svc (the forward call plus a few dozen instructions of the
 * getppid wrapper). With vitq-runner --warmup W the first W spans are warmup
 * calls. Spans repeat exactly from run to run; the whole-process "total" does
 * not (program start-up depends on the environment, the paths and host memory
 * layout), so compare spans only.
 *
 * At exit it writes one JSON object (see write_report) to the file named by
 * out=PATH, or to stderr when no out= is given. A stale PATH is removed at
 * start, so a missing file means the guest did not exit normally.
 *
 *   qemu-aarch64 -cpu cortex-a72 -L build/runtime/pi-prefix/rpi4 \
 *       -plugin build/runtime/qemu-plugin/libinsn_count.so,out=counts.json \
 *       build/runtime/aarch64/bin/vitq-runner model.pte --warmup 1 --runs 2 --threads 1
 *
 * Arguments (comma-separated after the library path, all optional):
 *   out=PATH          where to write the JSON report (default: stderr)
 *   syscall=N         marker system call number (default: getppid of the guest
 *                     architecture: 173 on aarch64 and riscv64, 110 on x86_64,
 *                     64 on arm)
 *   granularity=tb|insn
 *                     tb (default): one inline add of the block's instruction
 *                     count per executed translation block, added when the
 *                     block starts; insn: one inline add per executed
 *                     instruction (slower). They differ only when a block is
 *                     left half way (a fault, a signal): tb then counts the
 *                     rest of that block too. A marker's svc ends its block,
 *                     so the snapshots themselves are exact in both modes
 *                     (vitq-runner spans measured equal in both).
 *   threads=N         the schedule mode (below): model an N-thread run
 *
 * Counting uses inline TCG ops on one shared 64-bit counter. In QEMU 7.2
 * inline ops are NOT thread-safe: every vCPU (every guest thread in
 * qemu-user) adds to the same memory location without atomics, and the
 * snapshot at a marker includes whatever other threads executed meanwhile.
 * Counts are exact and repeat run to run only with ONE guest thread during
 * the spans (vitq-runner --threads 1; its default pool is created and joined
 * before the first marker). The report says how many guest threads were alive
 * in the spans ("max_threads_in_spans", "exact"); treat counts with
 * "exact": false as approximate.
 *
 * threads=N (the schedule mode, for multi-threaded runs): every guest thread
 * counts its own instructions (one callback per executed block instead of the
 * shared inline counter), split by where they run: in the thread pool's code
 * (pthreadpool: scheduling, spinning, sleeping, and the libc calls it makes
 * through its PLT) or outside it. The runner declares the pool's code range
 * once, before its first marker (see POOL_CODE_MAGIC). A stretch of code the
 * pool reaches by an indirect call or tail call and that returns into the pool
 * is one pool *task*; the main thread's code outside the pool and outside tasks is the
 * *serial* part; the tasks the pool hands out between the main thread's entry
 * into the pool and its return form one parallel *region*. Which thread runs
 * which task under emulation depends on how the host schedules its threads (two
 * host cores for four guest threads here), so per-thread counts are reported
 * but not used as the cost. Each task's count does not depend on the host, so
 * the N-thread cost is modelled from them: per span,
 *
 *     critical_path = serial + sum over regions of makespan(region's tasks, N)
 *
 * where makespan is the longest-processing-time-first list schedule on N
 * equal threads (what pthreadpool's even split plus work stealing achieves on
 * equal cores, to within one task). Pool instructions -- waiting above all --
 * are left out. See runtime/qemu_plugin/README.md.
 *
 * Build (the header comes from the QEMU source; see tools/build_runtime.sh):
 *   gcc -O2 -shared -fPIC -I<dir with qemu-plugin.h> insn_count.c -o libinsn_count.so
 */

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define INSN_COUNT_FORMAT_VERSION 2

/* A marker syscall whose first argument is this value is not a marker: it
 * declares the thread pool's code, [second argument, third argument) (the
 * runner's declare_pool_code). Plain getppid() leaves x0 as it is, and no
 * caller's x0 holds this by accident. */
#define POOL_CODE_MAGIC UINT64_C(0x7669747120706f6f) /* "vitq poo" */

/* ---------------------------------------------------------------- counting */

/* The running total, updated by inline TCG ops (see the thread-safety note);
 * in the schedule mode, the sum of the per-thread counts at each marker. */
static uint64_t insn_total;

/* Snapshots of insn_total at each marker syscall, in order. Written from the
 * syscall callback; with one guest thread there is no concurrent writer. */
static uint64_t* markers;
static size_t n_markers, cap_markers;
static bool markers_oom;

static int64_t marker_syscall = -1;
static bool per_insn;
static char* out_path;
static char target_name[32];

/* Guest threads (vCPUs in qemu-user): created so far, alive now, and the most
 * alive at once inside any span (markers 2i..2i+1). A thread pool that is
 * created and joined before the first marker does not spoil the counts. */
static unsigned threads_created, threads_live, span_max_live, max_live_in_spans;

/* Room for one more item in a growing array (*items holds n of *cap): doubles
 * it when full, starting at `first`. False when out of memory (nothing changed). */
static bool room_for_one(void** items, size_t n, size_t* cap, size_t size, size_t first) {
    if (n < *cap) return true;
    const size_t grown = *cap ? 2 * *cap : first;
    void* p = realloc(*items, grown * size);
    if (p == NULL) return false;
    *items = p;
    *cap = grown;
    return true;
}

static bool in_span(void) { return n_markers % 2 == 1; }

/* ------------------------------------------------------- the schedule mode */

static unsigned model_threads; /* threads=N; 0 = the inline counter only */
static uint64_t pool_lo, pool_hi; /* the pool's code, once declared */

/* How a translation block ends, from its last instruction (AArch64 encodings;
 * the pointer-authenticating forms too). An indirect jump through x17 is a PLT
 * stub's (the AArch64 ELF convention: x16 = the GOT slot, x17 = the target):
 * a call into another library, libc's futex or sched_yield for the pool. Any
 * other indirect jump out of the pool is a tail call of a task (std::function's
 * invoker and pthreadpool's one-thread path jump to the task through x16). */
enum exit_kind { EXIT_OTHER = 0, EXIT_CALL = 1, EXIT_PLT_JUMP = 2, EXIT_RET = 3, EXIT_TAIL_CALL = 4 };

static enum exit_kind exit_of(uint32_t insn) {
    if ((insn & 0xfffffc1fu) == 0xd63f0000u) return EXIT_CALL;  /* blr */
    if ((insn & 0xfefff800u) == 0xd63f0800u) return EXIT_CALL;  /* blraa/blrab(z) */
    if (insn == 0xd61f0220u) return EXIT_PLT_JUMP;              /* br x17 */
    if ((insn & 0xfffffc1fu) == 0xd61f0000u) return EXIT_TAIL_CALL;  /* br */
    if ((insn & 0xfefff800u) == 0xd61f0800u) return EXIT_TAIL_CALL;  /* braa/brab(z) */
    if ((insn & 0xfffffc1fu) == 0xd65f0000u) return EXIT_RET;   /* ret */
    if ((insn & 0xfffffbffu) == 0xd65f0bffu) return EXIT_RET;   /* retaa/retab */
    return EXIT_OTHER;
}

/* A block's facts, packed into its callback's user data (no allocation per
 * translation): guest address (48 bits), instruction count (13), exit kind (3). */
#define VADDR_BITS 48
#define VADDR_MASK ((UINT64_C(1) << VADDR_BITS) - 1)
#define COUNT_MASK 0x1fff

static uint64_t pack_tb(uint64_t vaddr, size_t n, enum exit_kind e) {
    return (vaddr & VADDR_MASK) | ((uint64_t)(n & COUNT_MASK) << VADDR_BITS) | ((uint64_t)e << 61);
}

/* Where a guest thread is, as far as the pool is concerned. */
enum where {
    OUTSIDE,     /* the thread's own code: the main thread's serial part */
    POOL,        /* the pool's code */
    POOL_CALLEE, /* code the pool reaches through its PLT (libc's futex, sched_yield): pool */
    TASK,        /* a task: reached from the pool by an indirect call or tail call */
    TASK_IN_POOL /* the pool's code called from inside a task: task work */
};

typedef struct {
    uint64_t work;       /* instructions outside the pool */
    uint64_t pool;       /* instructions in the pool and its PLT callees */
    uint64_t serial;     /* work outside tasks (the main thread's serial part) */
    uint64_t task_start; /* `work` when the running task began */
    uint64_t span_work, span_pool, span_serial; /* the counters when the span opened */
    uint8_t where;
    uint8_t last_exit;   /* how the thread's previous block ended */
} vcpu_state;

/* qemu-user numbers threads from 0 and reuses the numbers of exited ones, so
 * this bounds the threads alive at once (the runner refuses --threads > 256). */
#define MAX_VCPUS 1024
static vcpu_state vcpus[MAX_VCPUS];
static bool vcpu_overflow, vaddr_overflow;

static unsigned main_vcpu;               /* the thread that runs the markers */
static uint32_t region;                  /* the main thread's parallel region, in this span */

/* The tasks of the open span: (region, instructions). Appended by whichever
 * thread finishes a task, read by the main thread when the span closes. */
typedef struct { uint32_t region; uint64_t insns; } task_record;
static task_record* tasks;
static size_t n_tasks, cap_tasks;
static bool tasks_oom;
static pthread_mutex_t tasks_lock = PTHREAD_MUTEX_INITIALIZER;

/* One span's schedule, kept for the report. */
typedef struct {
    uint64_t critical_path, serial, task_work, largest_task, pool, untracked;
    uint64_t busiest_thread;  /* the most work one thread did under emulation */
    size_t tasks, regions;
    unsigned threads_seen;
} span_schedule;
static span_schedule* schedules;
static size_t n_schedules, cap_schedules;

static void record_task(uint64_t insns) {
    pthread_mutex_lock(&tasks_lock);
    if (!room_for_one((void**)&tasks, n_tasks, &cap_tasks, sizeof *tasks, 4096)) {
        tasks_oom = true;
        pthread_mutex_unlock(&tasks_lock);
        return;
    }
    tasks[n_tasks].region = __atomic_load_n(&region, __ATOMIC_ACQUIRE);
    tasks[n_tasks].insns = insns;
    ++n_tasks;
    pthread_mutex_unlock(&tasks_lock);
}

/* The block callback of the schedule mode: the thread's state machine. */
static void tb_exec(unsigned int vcpu_index, void* udata) {
    if (vcpu_index >= MAX_VCPUS) {
        vcpu_overflow = true;
        return;
    }
    vcpu_state* s = &vcpus[vcpu_index];
    const uint64_t info = (uint64_t)(uintptr_t)udata;
    const uint64_t vaddr = info & VADDR_MASK;
    const uint64_t n = (info >> VADDR_BITS) & COUNT_MASK;
    const enum exit_kind exit = (enum exit_kind)(info >> 61);
    const bool in_pool = vaddr >= pool_lo && vaddr < pool_hi;
    const enum exit_kind came_by = (enum exit_kind)s->last_exit;
    s->last_exit = (uint8_t)exit;
    switch ((enum where)s->where) {
        case OUTSIDE:
            if (in_pool) {
                s->where = POOL;
                if (vcpu_index == main_vcpu && in_span())
                    __atomic_add_fetch(&region, 1, __ATOMIC_RELEASE);
            }
            break;
        case POOL:
            if (!in_pool) {
                if (came_by == EXIT_CALL || came_by == EXIT_TAIL_CALL) {
                    s->where = TASK;
                    s->task_start = s->work;
                } else {
                    s->where = came_by == EXIT_PLT_JUMP ? POOL_CALLEE : OUTSIDE;
                }
            }
            break;
        case POOL_CALLEE:
            if (in_pool) s->where = POOL;
            break;
        case TASK:
            if (in_pool) {
                if (came_by == EXIT_RET) {  /* the task returned to the pool */
                    if (in_span()) record_task(s->work - s->task_start);
                    s->where = POOL;
                } else {
                    s->where = TASK_IN_POOL;
                }
            }
            break;
        case TASK_IN_POOL:
            if (!in_pool && came_by == EXIT_RET) s->where = TASK;
            break;
    }
    switch ((enum where)s->where) {
        case POOL:
        case POOL_CALLEE:
            s->pool += n;
            break;
        case OUTSIDE:
            s->serial += n;
            s->work += n;
            break;
        default:
            s->work += n;
    }
}

static int by_size_descending(const void* a, const void* b) {
    const uint64_t x = *(const uint64_t*)a, y = *(const uint64_t*)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Longest task first, each to the least loaded of `threads` equal threads;
 * returns the most loaded thread's total. Sorts `costs`. */
static uint64_t makespan(uint64_t* costs, size_t n, unsigned threads, uint64_t* load) {
    qsort(costs, n, sizeof *costs, by_size_descending);
    memset(load, 0, threads * sizeof *load);
    for (size_t i = 0; i < n; ++i) {
        unsigned least = 0;
        for (unsigned t = 1; t < threads; ++t)
            if (load[t] < load[least]) least = t;
        load[least] += costs[i];
    }
    uint64_t most = 0;
    for (unsigned t = 0; t < threads; ++t)
        if (load[t] > most) most = load[t];
    return most;
}

static uint64_t sum_counts(void) {
    uint64_t total = 0;
    for (unsigned v = 0; v < MAX_VCPUS; ++v)
        total += __atomic_load_n(&vcpus[v].work, __ATOMIC_RELAXED) +
                 __atomic_load_n(&vcpus[v].pool, __ATOMIC_RELAXED);
    return total;
}

static void open_schedule(unsigned vcpu_index) {
    main_vcpu = vcpu_index;
    __atomic_store_n(&region, 0, __ATOMIC_RELEASE);
    pthread_mutex_lock(&tasks_lock);
    n_tasks = 0;
    pthread_mutex_unlock(&tasks_lock);
    for (unsigned v = 0; v < MAX_VCPUS; ++v) {
        vcpu_state* s = &vcpus[v];
        s->span_work = __atomic_load_n(&s->work, __ATOMIC_RELAXED);
        s->span_pool = __atomic_load_n(&s->pool, __ATOMIC_RELAXED);
        s->span_serial = __atomic_load_n(&s->serial, __ATOMIC_RELAXED);
    }
}

/* The span closes (on the main thread; the pool's workers are idle): its
 * modelled N-thread cost and what each thread did under emulation. */
static void close_schedule(void) {
    span_schedule sc;
    memset(&sc, 0, sizeof sc);
    for (unsigned v = 0; v < MAX_VCPUS; ++v) {
        const vcpu_state* s = &vcpus[v];
        const uint64_t work = __atomic_load_n(&s->work, __ATOMIC_RELAXED) - s->span_work;
        const uint64_t serial = __atomic_load_n(&s->serial, __ATOMIC_RELAXED) - s->span_serial;
        sc.pool += __atomic_load_n(&s->pool, __ATOMIC_RELAXED) - s->span_pool;
        if (work > sc.busiest_thread) sc.busiest_thread = work;
        if (work) ++sc.threads_seen;
        if (v == main_vcpu) sc.serial = serial;
        else sc.untracked += serial;  /* a worker's code outside tasks: should be ~0 */
    }
    pthread_mutex_lock(&tasks_lock);
    uint64_t* costs = malloc((n_tasks ? n_tasks : 1) * sizeof *costs);
    uint64_t* load = malloc(model_threads * sizeof *load);
    if (costs == NULL || load == NULL) {
        tasks_oom = true;
    } else {
        sc.critical_path = sc.serial;
        sc.tasks = n_tasks;
        /* Records arrive in region order: a region's tasks all finish before
         * the main thread leaves the pool, and the next region starts after. */
        for (size_t i = 0; i < n_tasks;) {
            size_t j = i, k = 0;
            while (j < n_tasks && tasks[j].region == tasks[i].region) {
                costs[k++] = tasks[j].insns;
                sc.task_work += tasks[j].insns;
                if (tasks[j].insns > sc.largest_task) sc.largest_task = tasks[j].insns;
                ++j;
            }
            sc.critical_path += makespan(costs, k, model_threads, load);
            ++sc.regions;
            i = j;
        }
    }
    free(costs);
    free(load);
    pthread_mutex_unlock(&tasks_lock);
    if (!room_for_one((void**)&schedules, n_schedules, &cap_schedules, sizeof *schedules, 64)) {
        tasks_oom = true;
        return;
    }
    schedules[n_schedules++] = sc;
}

/* ------------------------------------------------------------- callbacks */

static void vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index) {
    (void)id;
    ++threads_created;
    ++threads_live;
    if (in_span() && threads_live > span_max_live) span_max_live = threads_live;
    if (vcpu_index < MAX_VCPUS) {  /* a reused number starts a new thread */
        vcpus[vcpu_index].where = OUTSIDE;
        vcpus[vcpu_index].last_exit = EXIT_OTHER;
    }
}

static void vcpu_exit(qemu_plugin_id_t id, unsigned int vcpu_index) {
    (void)id; (void)vcpu_index;
    if (threads_live) --threads_live;
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb* tb) {
    (void)id;
    const size_t n = qemu_plugin_tb_n_insns(tb);
    if (model_threads) {
        const uint64_t vaddr = qemu_plugin_tb_vaddr(tb);
        if (vaddr > VADDR_MASK || n > COUNT_MASK) vaddr_overflow = true;
        enum exit_kind e = EXIT_OTHER;
        if (n) {
            const struct qemu_plugin_insn* last = qemu_plugin_tb_get_insn(tb, n - 1);
            if (qemu_plugin_insn_size(last) == 4) {
                uint32_t word;
                memcpy(&word, qemu_plugin_insn_data(last), 4);
                e = exit_of(word);
            }
        }
        qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS,
                                             (void*)(uintptr_t)pack_tb(vaddr, n, e));
    } else if (per_insn) {
        for (size_t i = 0; i < n; ++i)
            qemu_plugin_register_vcpu_insn_exec_inline(qemu_plugin_tb_get_insn(tb, i),
                                                       QEMU_PLUGIN_INLINE_ADD_U64,
                                                       &insn_total, 1);
    } else {
        /* Added when the block starts executing: a snapshot taken in the
         * syscall callback of a block's final svc includes that whole block. */
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64,
                                                 &insn_total, n);
    }
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num,
                       uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
                       uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8) {
    (void)id;
    (void)a4; (void)a5; (void)a6; (void)a7; (void)a8;
    if (num != marker_syscall || markers_oom) return;
    if (a1 == POOL_CODE_MAGIC) {
        pool_lo = a2;
        pool_hi = a3;
        return;
    }
    if (!room_for_one((void**)&markers, n_markers, &cap_markers, sizeof *markers, 256)) {
        markers_oom = true;
        return;
    }
    if (model_threads) insn_total = sum_counts();
    markers[n_markers++] = insn_total;
    if (in_span()) {
        span_max_live = threads_live;  /* a span opens */
        if (model_threads) open_schedule(vcpu_index);
    } else {
        if (span_max_live > max_live_in_spans) max_live_in_spans = span_max_live;  /* a span closes */
        if (model_threads) close_schedule();
    }
}

/* The schedule mode's part of the report: null, or
 *   {"threads": N, "pool_code": [lo, hi] or null, "spans": [{...}, ...]}
 * with one object per span (see span_schedule). */
static void write_schedule(FILE* f) {
    if (!model_threads) {
        fputs("null", f);
        return;
    }
    fprintf(f, "{\"threads\": %u, \"pool_code\": ", model_threads);
    if (pool_hi > pool_lo)
        fprintf(f, "[%" PRIu64 ", %" PRIu64 "]", pool_lo, pool_hi);
    else
        fputs("null", f);
    fputs(", \"spans\": [", f);
    for (size_t i = 0; i < n_schedules; ++i) {
        const span_schedule* sc = &schedules[i];
        fprintf(f,
                "%s{\"critical_path\": %" PRIu64 ", \"serial\": %" PRIu64
                ", \"task_work\": %" PRIu64 ", \"tasks\": %zu, \"regions\": %zu"
                ", \"largest_task\": %" PRIu64 ", \"pool\": %" PRIu64
                ", \"untracked\": %" PRIu64 ", \"busiest_thread\": %" PRIu64
                ", \"threads_seen\": %u}",
                i ? ", " : "", sc->critical_path, sc->serial, sc->task_work, sc->tasks,
                sc->regions, sc->largest_task, sc->pool, sc->untracked, sc->busiest_thread,
                sc->threads_seen);
    }
    fputs("]}", f);
}

/* Writes the JSON report, one line:
 *   {"plugin": "insn_count", "format": 2, "target": "aarch64",
 *    "marker_syscall": 173, "granularity": "tb",
 *    "threads_created": 4, "max_threads_in_spans": 1, "exact": true,
 *    "total": <all guest instructions until exit>,
 *    "markers": [<running total at each marker>, ...],
 *    "spans": [<markers[2i+1] - markers[2i]>, ...],
 *    "schedule": null, "unpaired_marker": false, "error": null}
 * "exact" is false when more than one guest thread was alive during some span
 * of the inline counter (racy, includes the other threads' work), or when the
 * schedule mode lost track (too many threads, addresses, memory). In the
 * schedule mode ("granularity": "schedule") spans are every thread's
 * instructions, waiting included; "schedule" holds the modelled cost.
 * "unpaired_marker" is true for an odd number of markers (the last one has no
 * partner, e.g. the guest died inside a forward call); it is not in a span. */
static void write_report(FILE* f) {
    unsigned max_live = max_live_in_spans;
    if (in_span() && span_max_live > max_live) max_live = span_max_live;
    const bool lost = markers_oom || tasks_oom || vcpu_overflow || vaddr_overflow;
    const bool exact = !lost && (model_threads ? pool_hi > pool_lo : max_live <= 1);
    fprintf(f,
            "{\"plugin\": \"insn_count\", \"format\": %d, \"target\": \"%s\", "
            "\"marker_syscall\": %" PRId64 ", \"granularity\": \"%s\", "
            "\"threads_created\": %u, \"max_threads_in_spans\": %u, \"exact\": %s, "
            "\"total\": %" PRIu64 ", \"markers\": [",
            INSN_COUNT_FORMAT_VERSION, target_name, marker_syscall,
            model_threads ? "schedule" : per_insn ? "insn" : "tb", threads_created, max_live,
            exact ? "true" : "false", model_threads ? sum_counts() : insn_total);
    for (size_t i = 0; i < n_markers; ++i)
        fprintf(f, "%s%" PRIu64, i ? ", " : "", markers[i]);
    fputs("], \"spans\": [", f);
    for (size_t i = 0; i + 1 < n_markers; i += 2)
        fprintf(f, "%s%" PRIu64, i ? ", " : "", markers[i + 1] - markers[i]);
    fputs("], \"schedule\": ", f);
    write_schedule(f);
    const char* error = markers_oom    ? "\"out of memory: later markers were dropped\""
                        : tasks_oom    ? "\"out of memory: tasks were dropped\""
                        : vcpu_overflow ? "\"more than 1024 guest threads\""
                        : vaddr_overflow ? "\"a code address above 2^48\""
                        : model_threads && pool_hi <= pool_lo
                            ? "\"the runner declared no thread-pool code (threads=N needs vitq-runner)\""
                            : "null";
    fprintf(f, ", \"unpaired_marker\": %s, \"error\": %s}\n", n_markers % 2 ? "true" : "false", error);
}

static void at_exit(qemu_plugin_id_t id, void* userdata) {
    (void)id; (void)userdata;
    if (out_path == NULL) {
        write_report(stderr);
        fflush(stderr);
        return;
    }
    /* Write to PATH.tmp and rename, so a reader never sees half a report. */
    const size_t len = strlen(out_path) + 5;
    char* tmp = malloc(len);
    if (tmp == NULL) {
        fprintf(stderr, "insn_count: out of memory writing %s\n", out_path);
        return;
    }
    snprintf(tmp, len, "%s.tmp", out_path);
    FILE* f = fopen(tmp, "w");
    if (f == NULL) {
        fprintf(stderr, "insn_count: cannot write %s: %s\n", tmp, strerror(errno));
        free(tmp);
        return;
    }
    write_report(f);
    const bool ok = !ferror(f);
    if (fclose(f) != 0 || !ok || rename(tmp, out_path) != 0) {
        fprintf(stderr, "insn_count: cannot write %s: %s\n", out_path, strerror(errno));
        remove(tmp);
    }
    free(tmp);
}

static int64_t default_marker_syscall(const char* target) {
    if (strcmp(target, "aarch64") == 0 || strcmp(target, "riscv64") == 0) return 173;
    if (strcmp(target, "x86_64") == 0) return 110;
    if (strcmp(target, "arm") == 0) return 64;
    return -1;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t* info,
                                           int argc, char** argv) {
    snprintf(target_name, sizeof target_name, "%s",
             info->target_name ? info->target_name : "?");
    if (info->system_emulation) {
        fprintf(stderr, "insn_count: only qemu-user (linux-user) emulation is supported\n");
        return -1;
    }
    for (int i = 0; i < argc; ++i) {
        const char* a = argv[i];
        const char* eq = strchr(a, '=');
        const size_t key_len = eq ? (size_t)(eq - a) : strlen(a);
        const char* val = eq ? eq + 1 : "";
        if (key_len == 3 && strncmp(a, "out", 3) == 0 && *val) {
            free(out_path);
            out_path = strdup(val);
        } else if (key_len == 7 && strncmp(a, "syscall", 7) == 0 && *val) {
            char* end = NULL;
            errno = 0;
            const long long n = strtoll(val, &end, 0);
            if (errno || *end || n < 0) {
                fprintf(stderr, "insn_count: syscall= expects a number, got '%s'\n", val);
                return -1;
            }
            marker_syscall = n;
        } else if (key_len == 7 && strncmp(a, "threads", 7) == 0 && *val) {
            char* end = NULL;
            errno = 0;
            const long n = strtol(val, &end, 10);
            if (errno || *end || n < 1 || n > 256) {
                fprintf(stderr, "insn_count: threads= expects 1..256, got '%s'\n", val);
                return -1;
            }
            model_threads = (unsigned)n;
        } else if (key_len == 11 && strncmp(a, "granularity", 11) == 0 &&
                   (strcmp(val, "tb") == 0 || strcmp(val, "insn") == 0)) {
            per_insn = strcmp(val, "insn") == 0;
        } else {
            fprintf(stderr,
                    "insn_count: unknown or malformed argument '%s' "
                    "(expected out=PATH, syscall=N, granularity=tb|insn, threads=N)\n", a);
            return -1;
        }
    }
    if (marker_syscall < 0) marker_syscall = default_marker_syscall(target_name);
    if (marker_syscall < 0) {
        fprintf(stderr, "insn_count: no default marker syscall for target '%s'; pass syscall=N\n",
                target_name);
        return -1;
    }
    if (out_path != NULL) {
        /* A stale report from an earlier run must not pass for this one: remove
         * it (the report appears only when this run exits), and fail now rather
         * than after a long run if the report cannot be written. */
        if (remove(out_path) != 0 && errno != ENOENT) {
            fprintf(stderr, "insn_count: cannot replace out=%s: %s\n", out_path, strerror(errno));
            return -1;
        }
        FILE* f = fopen(out_path, "w");
        if (f == NULL) {
            fprintf(stderr, "insn_count: cannot write out=%s: %s\n", out_path, strerror(errno));
            return -1;
        }
        fclose(f);
        remove(out_path);
    }
    qemu_plugin_register_vcpu_init_cb(id, vcpu_init);
    qemu_plugin_register_vcpu_exit_cb(id, vcpu_exit);
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
