/* hot_blocks: a qemu TCG plugin (qemu-user, plugin API version 1) that counts how often
 * each translation block runs inside vitq-runner's timed forward calls: where a
 * program's instructions go, block by block (tools/insn_profile.py names the blocks'
 * functions and writes the table).
 *
 *   qemu-aarch64 -cpu cortex-a72 -L build/runtime/pi-prefix/rpi4 \
 *       -plugin build/runtime/qemu-plugin/libhot_blocks.so,out=blocks.txt,skip=1 \
 *       build/runtime/aarch64/bin/vitq-runner model.pte --warmup 1 --runs 1 --threads 1
 *
 * Arguments: out=PATH (default stderr), skip=N (forward calls left out: the warmup
 * ones; default 0). Markers as insn_count.c's: the runner's getppid() calls around each
 * forward call (syscall 173 on aarch64), a call whose first argument is the pool
 * declaration's magic value excepted. One guest thread (--threads 1): the counters are
 * inline adds shared by all threads, as insn_count's default mode.
 *
 * Each block's counter is snapshotted at a span's start marker and what it ran until
 * the end marker is added to the block's total; blocks of a translation that QEMU
 * flushes and redoes are separate entries with the same address (the tool adds them).
 * Output, one line per block that ran in a counted span:
 *
 *     <guest address, hex> <instructions in the block> <executions>
 *
 * after a first line "# hot_blocks spans=<counted spans>". */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define POOL_CODE_MAGIC UINT64_C(0x7669747120706f6f) /* as insn_count.c: not a marker */
#define MARKER_SYSCALL_AARCH64 173                   /* getppid */

typedef struct Block {
    uint64_t pc;
    uint64_t insns;
    uint64_t executed;  /* inline counter: every execution */
    uint64_t at_start;  /* executed at the current span's start marker */
    uint64_t in_spans;  /* executions inside counted spans */
    struct Block* next;
} Block;

static Block* blocks; /* every translation, newest first */
static uint64_t markers;
static uint64_t skip;
static uint64_t spans;
static char out_path[4096];

static void on_translation(qemu_plugin_id_t id, struct qemu_plugin_tb* tb) {
    (void)id;
    Block* b = calloc(1, sizeof *b);
    if (b == NULL) return; /* uncounted; the totals the tool prints would show the gap */
    b->pc = qemu_plugin_tb_vaddr(tb);
    b->insns = qemu_plugin_tb_n_insns(tb);
    b->next = blocks;
    blocks = b; /* translation runs with QEMU's translation lock held */
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->executed, 1);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7,
                       uint64_t a8) {
    (void)id, (void)vcpu_index, (void)a2, (void)a3, (void)a4, (void)a5, (void)a6, (void)a7, (void)a8;
    if (num != MARKER_SYSCALL_AARCH64 || a1 == POOL_CODE_MAGIC) return;
    const uint64_t span = markers / 2;
    const int start = markers % 2 == 0;
    ++markers;
    if (span < skip) return;
    for (Block* b = blocks; b != NULL; b = b->next) {
        if (start) b->at_start = b->executed;
        else b->in_spans += b->executed - b->at_start;
    }
    if (!start) ++spans;
}

static void write_blocks(qemu_plugin_id_t id, void* data) {
    (void)id, (void)data;
    FILE* f = out_path[0] ? fopen(out_path, "w") : stderr;
    if (f == NULL) {
        fprintf(stderr, "hot_blocks: cannot write %s\n", out_path);
        return;
    }
    fprintf(f, "# hot_blocks spans=%" PRIu64 "\n", spans);
    for (Block* b = blocks; b != NULL; b = b->next)
        if (b->in_spans) fprintf(f, "%" PRIx64 " %" PRIu64 " %" PRIu64 "\n", b->pc, b->insns, b->in_spans);
    if (f != stderr) fclose(f);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t* info, int argc,
                                           char** argv) {
    if (info->system_emulation || strcmp(info->target_name, "aarch64") != 0) {
        fprintf(stderr, "hot_blocks: only qemu-aarch64 (linux-user) is supported\n");
        return -1;
    }
    for (int i = 0; i < argc; ++i) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
        } else if (strncmp(argv[i], "skip=", 5) == 0) {
            skip = strtoull(argv[i] + 5, NULL, 10);
        } else {
            fprintf(stderr, "hot_blocks: unknown argument '%s' (expected out=PATH, skip=N)\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translation);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, write_blocks, NULL);
    return 0;
}
