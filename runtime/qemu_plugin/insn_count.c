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
 * Build (the header comes from the QEMU source; see tools/build_runtime.sh):
 *   gcc -O2 -shared -fPIC -I<dir with qemu-plugin.h> insn_count.c -o libinsn_count.so
 */

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define INSN_COUNT_FORMAT_VERSION 1

/* The running total, updated by inline TCG ops (see the thread-safety note). */
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

static bool in_span(void) { return n_markers % 2 == 1; }

static void vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index) {
    (void)id; (void)vcpu_index;
    ++threads_created;
    ++threads_live;
    if (in_span() && threads_live > span_max_live) span_max_live = threads_live;
}

static void vcpu_exit(qemu_plugin_id_t id, unsigned int vcpu_index) {
    (void)id; (void)vcpu_index;
    if (threads_live) --threads_live;
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb* tb) {
    (void)id;
    const size_t n = qemu_plugin_tb_n_insns(tb);
    if (per_insn) {
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
    (void)id; (void)vcpu_index;
    (void)a1; (void)a2; (void)a3; (void)a4; (void)a5; (void)a6; (void)a7; (void)a8;
    if (num != marker_syscall || markers_oom) return;
    if (n_markers == cap_markers) {
        const size_t cap = cap_markers ? 2 * cap_markers : 256;
        uint64_t* p = realloc(markers, cap * sizeof *p);
        if (p == NULL) {
            markers_oom = true;
            return;
        }
        markers = p;
        cap_markers = cap;
    }
    markers[n_markers++] = insn_total;
    if (in_span()) {
        span_max_live = threads_live;  /* a span opens */
    } else if (span_max_live > max_live_in_spans) {
        max_live_in_spans = span_max_live;  /* a span closes */
    }
}

/* Writes the JSON report, one line:
 *   {"plugin": "insn_count", "format": 1, "target": "aarch64",
 *    "marker_syscall": 173, "granularity": "tb",
 *    "threads_created": 4, "max_threads_in_spans": 1, "exact": true,
 *    "total": <all guest instructions until exit>,
 *    "markers": [<running total at each marker>, ...],
 *    "spans": [<markers[2i+1] - markers[2i]>, ...],
 *    "unpaired_marker": false, "error": null}
 * "exact" is false when more than one guest thread was alive during some span:
 * the shared counter is then racy and includes the other threads' work.
 * "unpaired_marker" is true for an odd number of markers (the last one has no
 * partner, e.g. the guest died inside a forward call); it is not in a span. */
static void write_report(FILE* f) {
    unsigned max_live = max_live_in_spans;
    if (in_span() && span_max_live > max_live) max_live = span_max_live;
    fprintf(f,
            "{\"plugin\": \"insn_count\", \"format\": %d, \"target\": \"%s\", "
            "\"marker_syscall\": %" PRId64 ", \"granularity\": \"%s\", "
            "\"threads_created\": %u, \"max_threads_in_spans\": %u, \"exact\": %s, "
            "\"total\": %" PRIu64 ", \"markers\": [",
            INSN_COUNT_FORMAT_VERSION, target_name, marker_syscall,
            per_insn ? "insn" : "tb", threads_created, max_live,
            max_live <= 1 && !markers_oom ? "true" : "false", insn_total);
    for (size_t i = 0; i < n_markers; ++i)
        fprintf(f, "%s%" PRIu64, i ? ", " : "", markers[i]);
    fputs("], \"spans\": [", f);
    for (size_t i = 0; i + 1 < n_markers; i += 2)
        fprintf(f, "%s%" PRIu64, i ? ", " : "", markers[i + 1] - markers[i]);
    fprintf(f, "], \"unpaired_marker\": %s, \"error\": %s}\n",
            n_markers % 2 ? "true" : "false",
            markers_oom ? "\"out of memory: later markers were dropped\"" : "null");
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
        } else if (key_len == 11 && strncmp(a, "granularity", 11) == 0 &&
                   (strcmp(val, "tb") == 0 || strcmp(val, "insn") == 0)) {
            per_insn = strcmp(val, "insn") == 0;
        } else {
            fprintf(stderr,
                    "insn_count: unknown or malformed argument '%s' "
                    "(expected out=PATH, syscall=N, granularity=tb|insn)\n", a);
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
